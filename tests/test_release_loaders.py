"""Files sdtrain writes load in every webui release users still run, not only the newest (issue 20, item 5).

Each release's loading rules are written down here as data and small checks of our own: a
specification read from the webuis' history (A1111 tags v1.0.0-pre … v1.10.1; the Forge, reForge and
Forge Classic source archives in shared/hosts/). No webui code is copied or imported, and nothing is
fetched: the tests run offline. docs/files.md, "Which webui releases load these files", has the same
rules as a table with the file and tag each comes from.

The rules:

- SAFE_CHECK: A1111 replaces `torch.load` by modules/safe.py, which first checks a `.pt`'s zip entry
  names (`check_zip_filenames`, exactly one `<dir>/data.pkl`) and then unpickles `data.pkl` with a
  RestrictedUnpickler whose `find_class` allows a fixed list of globals. The entry names it allows
  grew in v1.10.0 (byteorder, .data/serialization_id); the globals grew in v1.3.0 (BFloat16Storage).
  Forge, reForge and Forge Classic keep safe.py but never install it; their `torch.load` is torch's
  own (weights_only by default from torch 2.6: reForge pins 2.9.0, Classic 2.6.0; Forge 2.3.1 does
  a plain unpickle).
- EMBEDDING: `create_embedding_from_data` (before v1.7.0 inline in `load_from_file`): the SDXL
  `clip_l`/`clip_g` branch exists from v1.6.0; SDXL models came in v1.5.0, so v1.5.x cannot load an
  SDXL embedding at all (it falls into the one-tensor "diffusers" branch, which asserts a single key).
  Forge Classic refuses embeddings in pictures (`NotImplementedError`).
- HYPERNETWORK: `Hypernetwork.load` and the trainer's `.optim` pairing are unchanged v1.0.0-pre …
  v1.10.1 (and in the Forge/reForge copies); Forge Classic has no hypernetworks.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_sdtrain.core.formats import embedding_io as eio
from lib_sdtrain.core.formats.embedding import Embedding
from lib_sdtrain.core.formats.embedding_image import decode_pixel_data
from lib_sdtrain.core.hypernetwork.network import (
    UI_ACTIVATIONS,
    Hypernetwork,
    save_hypernetwork,
    save_hypernetwork_optim,
)

# --- the releases and their rules, as data --------------------------------------------------------

#: Every A1111 release tag (release candidates left out; v1.0.0-pre is the only 1.0 tag).
A1111_TAGS = (
    "v1.0.0-pre", "v1.1.0", "v1.1.1", "v1.2.0", "v1.2.1", "v1.3.0", "v1.3.1", "v1.3.2", "v1.4.0", "v1.4.1",
    "v1.5.0", "v1.5.1", "v1.5.2", "v1.6.0", "v1.6.1", "v1.7.0", "v1.8.0", "v1.9.0", "v1.9.1", "v1.9.2",
    "v1.9.3", "v1.9.4", "v1.10.0", "v1.10.1",
)  # fmt: skip

#: safe.py `check_zip_filenames`: what may follow `<dir>/` in a zip entry's name.
ZIP_ENTRIES_V1_0 = ("version", "data.pkl", r"data/\d+")  # v1.0.0-pre … v1.9.4 (and Forge Classic's unused copy)
ZIP_ENTRIES_V1_10 = (*ZIP_ENTRIES_V1_0, "byteorder", ".data/serialization_id")  # v1.10.0 …

#: safe.py `RestrictedUnpickler.find_class`: the (module, name) pairs it returns, everything else is
#: "forbidden". The same in every release but for the bf16 storage, allowed from v1.3.0.
GLOBALS_V1_0 = frozenset(
    [("collections", "OrderedDict")]
    + [("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")]
    + [("torch", f"{n}Storage") for n in ("Float", "Half", "Int", "Long", "Double", "Byte")]
    + [("torch", "float32"), ("torch.nn.modules.container", "ParameterDict")]
    + [("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct")]
    + [("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set")]
    + [("pytorch_lightning.callbacks", "model_checkpoint")]
    + [("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")]
)
GLOBALS_V1_3 = GLOBALS_V1_0 | {("torch", "BFloat16Storage")}

#: The activation names a hypernetwork file may carry: the host's seven, then the lowercase name of
#: every class in torch.nn.modules.activation of the release's torch. The oldest pin (1.13.1) has:
TORCH_1_13_ACTIVATIONS = frozenset(
    {"linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid"}
    | {n.lower() for n in (
        "Threshold", "ReLU", "RReLU", "Hardtanh", "ReLU6", "Sigmoid", "Hardsigmoid", "Tanh", "SiLU", "Mish",
        "Hardswish", "ELU", "CELU", "SELU", "GLU", "GELU", "Hardshrink", "LeakyReLU", "LogSigmoid", "Softplus",
        "Softshrink", "MultiheadAttention", "PReLU", "Softsign", "Tanhshrink", "Softmin", "Softmax", "Softmax2d",
        "LogSoftmax")}
)  # fmt: skip
#: torch.optim classes a hypernetwork `.optim`'s `optimizer_name` may name (the host's `optimizer_dict`)
#: in the oldest torch any release pins; another name makes the host start a fresh AdamW.
TORCH_1_13_OPTIMIZERS = frozenset(
    {"ASGD", "Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "NAdam", "RAdam", "RMSprop", "Rprop",
     "SGD", "SparseAdam"}
)  # fmt: skip
#: Param-group settings the AdamW of each pinned torch reads when it steps with a loaded state.
ADAMW_GROUP_KEYS = {
    "1.13.1": {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable"},
    "2.0": {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
            "differentiable", "fused"},
}  # fmt: skip


@dataclass(frozen=True)
class Release:
    name: str
    #: safe.py zip-entry rule; None where safe.py is not installed over torch.load
    zip_entries: tuple[str, ...] | None
    #: safe.py allow-list; None where safe.py is not installed
    globals: frozenset | None
    #: the torch it installs (its torch.load reads the file after the check)
    torch: str
    #: "none": no SDXL models; "no-embeddings": SDXL models but no clip_l/clip_g branch; "yes"
    sdxl: str
    images: bool = True
    hypernetworks: bool = True

    @property
    def weights_only(self) -> bool:  # torch.load's default from 2.6 on
        return tuple(int(p) for p in self.torch.split(".")[:2]) >= (2, 6)


def _version(tag: str) -> tuple[int, int, int]:
    return tuple(int(p) for p in tag[1:].split("-")[0].split("."))  # type: ignore[return-value]


def _a1111(tag: str) -> Release:
    v = _version(tag)
    torch_pin = "1.13.1" if v < (1, 1, 0) else "2.0.0" if v < (1, 2, 0) else "2.0.1" if v < (1, 8, 0) else "2.1.2"
    sdxl = "none" if v < (1, 5, 0) else "no-embeddings" if v < (1, 6, 0) else "yes"
    return Release(
        f"a1111-{tag}",
        ZIP_ENTRIES_V1_10 if v >= (1, 10, 0) else ZIP_ENTRIES_V1_0,
        GLOBALS_V1_3 if v >= (1, 3, 0) else GLOBALS_V1_0,
        torch_pin,
        sdxl,
    )


RELEASES = [_a1111(t) for t in A1111_TAGS] + [
    Release("forge-dfdcbab6", None, None, "2.3.1", "yes"),
    Release("reforge-3b56b268", None, None, "2.9.0", "yes"),
    Release("forge-classic-1f95d717", None, None, "2.6.0", "yes", images=False, hypernetworks=False),
]
BY_NAME = {r.name: r for r in RELEASES}


class Refused(Exception):
    """The release's loader would not load the file (the message says which rule)."""


# --- the safe-check (modules/safe.py) as a specification ------------------------------------------


def zip_check(raw: bytes, entries: tuple[str, ...]) -> bytes:
    """The entry-name rule and the single data.pkl rule; returns that data.pkl."""
    allowed = re.compile(r"^[^/]+/(" + "|".join(re.escape(e) if "\\" not in e else e for e in entries) + r")$")
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        names = z.namelist()
        bad = [n for n in names if not allowed.match(n)]
        if bad:
            raise Refused(f"zip entries {bad} are not allowed")
        pkls = [n for n in names if re.match(r"^[^/]+/data\.pkl$", n)]
        if len(pkls) != 1:
            raise Refused(f"{len(pkls)} data.pkl entries")
        return z.read(pkls[0])


@dataclass
class SpecTensor:
    storage: str
    shape: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks):
    """Six arguments: the form every torch the releases pin reads (a 7th, tensor metadata, is newer)."""
    return SpecTensor(storage[1], tuple(size))


class SpecUnpickler(pickle.Unpickler):
    """A restricted unpickler built from a release's allow-list (data above): nothing real is built."""

    def __init__(self, blob: bytes, allowed: frozenset):
        super().__init__(io.BytesIO(blob))
        self.allowed = allowed

    def persistent_load(self, pid):
        if pid[0] != "storage":
            raise Refused(f"persistent id {pid[0]!r}")
        return ("storage", pid[1])

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise Refused(f"global '{module}/{name}' is forbidden")
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        return f"{module}.{name}"  # storages (only named in persistent ids) and the rest: never called by our files


def safe_check(path: Path, release: Release) -> None:
    """Refused unless `release` lets `torch.load(path)` through to torch."""
    raw = path.read_bytes()
    if release.zip_entries is not None:
        blob = zip_check(raw, release.zip_entries)
        try:
            SpecUnpickler(blob, release.globals).load()
        except Refused:
            raise
        except Exception as exc:  # e.g. a TypeError from a rebuild call of another shape
            raise Refused(f"unpickling failed: {exc!r}") from None
    if release.weights_only:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise Refused(f"torch weights_only: {str(exc).splitlines()[0]}") from None


def torch_read(path: Path):
    """What the release's torch hands back once the check passed (the dicts are plain: same in any torch)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --- the embedding loader as a specification ------------------------------------------------------


def _is_tensor(v) -> bool:
    return type(v) is torch.Tensor  # the hosts compare `type(...) == torch.Tensor`


def embedding_rule(data, release: Release) -> dict[str, torch.Tensor]:
    """What `create_embedding_from_data` makes of a loaded dict in `release`: its vector set(s)."""
    if "string_to_param" in data:
        params = getattr(data["string_to_param"], "_parameters", data["string_to_param"])
        if len(params) != 1:
            raise Refused("embedding file has multiple terms in it")
        return {"*": next(iter(params.values())).detach().float()}
    if release.sdxl == "yes" and type(data) is dict and "clip_g" in data and "clip_l" in data:
        if not all(hasattr(v, "detach") for v in data.values()):
            raise Refused("the SDXL branch calls .detach() on every value")
        return {k: v.detach().float() for k, v in data.items()}
    if type(data) is dict and _is_tensor(next(iter(data.values()))):
        if len(data) != 1:
            raise Refused("embedding file has multiple terms in it (one-tensor branch)")
        (value,) = data.values()
        return {"*": (value.unsqueeze(0) if value.ndim == 1 else value).detach().float()}
    raise Refused("neither textual inversion embedding nor diffuser concept")


def _tensor_hook(obj):
    return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float64) if "TORCHTENSOR" in obj else obj


def image_data(path: Path, release: Release) -> dict:
    """The dict a picture carries, as every release reads it: the `sd-ti-embedding` text chunk (base64
    JSON, tensors as {"TORCHTENSOR": nested lists}) first, else the pixel side blocks."""
    if not release.images:
        raise Refused("embeddings in pictures are not supported (Forge Classic)")
    with Image.open(path) as im:
        im.load()
        text = getattr(im, "text", {}).get("sd-ti-embedding")
        if text is not None:
            return json.loads(base64.b64decode(text), object_hook=_tensor_hook)
        # the pixel layout is checked against A1111's own test picture in test_formats.py
        data = decode_pixel_data(im)
    if data is None:
        raise Refused("no embedding in the picture")
    return data


def load_embedding_as(path: Path, release: Release) -> dict[str, torch.Tensor]:
    ext = path.suffix.lower()
    if ext in (".pt", ".bin"):
        safe_check(path, release)
        data = torch_read(path)
    elif ext == ".safetensors":
        data = safetensors_read(path)
    else:
        data = image_data(path, release)
    return embedding_rule(data, release)


# --- .safetensors: one rule in all releases (pins 0.2.7 in v1.0.0-pre, 0.3.1 to v1.7.0, 0.4.2 from v1.8.0) -

_ST_DTYPES = {"F32": (torch.float32, 4)}  # all we write; every safetensors version reads it


def safetensors_read(path: Path) -> dict[str, torch.Tensor]:
    """The file layout the oldest pinned safetensors reads: u64 LE header size, a JSON header (str→str
    `__metadata__`), tensors back to back from offset 0 covering the rest of the file exactly."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise Refused("__metadata__ must map str to str")
    buf, end, out = raw[8 + n :], 0, {}
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if info["dtype"] not in _ST_DTYPES:
            raise Refused(f"dtype {info['dtype']}")
        dtype, size = _ST_DTYPES[info["dtype"]]
        start, stop = info["data_offsets"]
        count = 1
        for d in info["shape"]:
            count *= d
        if start != end or stop - start != count * size:
            raise Refused(f"{key}: offsets {start, stop} are not contiguous / do not fit its shape")
        out[key] = torch.frombuffer(bytearray(buf[start:stop]), dtype=dtype).reshape(info["shape"])
        end = stop
    if end != len(buf):
        raise Refused("tensors do not cover the data")
    return out


# --- hypernetworks as a specification -------------------------------------------------------------


def _dropout_structure(data) -> list[float]:
    layers = data.get("layer_structure", [1, 2, 1])
    ds = data.get("dropout_structure")
    if ds is not None:
        return list(ds)
    use = data.get("use_dropout", False)
    if not use:
        return [0] * len(layers)
    return [0] + [0.3] * (len(layers) - 3) + [0.3 if data.get("last_layer_dropout", False) else 0, 0]


def expected_module_keys(data, width: int) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of one K/V module the host builds from the file's options:
    per step a Linear, the activation (not after the last Linear unless activate_output), a LayerNorm
    if is_layer_norm, a Dropout where the dropout structure is > 0; each takes the next index."""
    layers = data.get("layer_structure", [1, 2, 1])
    act = data.get("activation_func")
    norm = data.get("is_layer_norm", False)
    out_act = data.get("activate_output", True)
    ds = _dropout_structure(data)
    keys: dict[str, tuple[int, ...]] = {}
    idx = 0
    for i in range(len(layers) - 1):
        d_in, d_out = int(width * layers[i]), int(width * layers[i + 1])
        keys[f"linear.{idx}.weight"], keys[f"linear.{idx}.bias"] = (d_out, d_in), (d_out,)
        idx += 1
        if act not in (None, "linear") and not (i >= len(layers) - 2 and not out_act):
            if act == "prelu":
                keys[f"linear.{idx}.weight"] = (1,)
            idx += 1
        if norm:
            keys[f"linear.{idx}.weight"], keys[f"linear.{idx}.bias"] = (d_out,), (d_out,)
            idx += 1
        if ds[i + 1] > 0:
            if not 0 < ds[i + 1] < 1:
                raise Refused("dropout probability out of (0, 1)")
            idx += 1
    return keys


def hypernetwork_rule(path: Path, release: Release) -> int:
    """Refused unless `Hypernetwork.load` of `release` builds the file; returns its parameter count."""
    if not release.hypernetworks:
        raise Refused("no hypernetworks in this webui")
    if path.suffix != ".pt":
        raise Refused("hypernetworks are listed as **/*.pt only")
    safe_check(path, release)
    data = torch_read(path)
    layers = data.get("layer_structure", [1, 2, 1])
    if layers[0] != 1 or layers[-1] != 1:
        raise Refused("layer structure must start and end with 1")
    act = data.get("activation_func")
    if act is not None and act not in TORCH_1_13_ACTIVATIONS:
        raise Refused(f"activation {act!r} unknown to torch 1.13")
    n_params, sizes = 0, [k for k in data if type(k) is int]
    if not sizes:
        raise Refused("no layer widths")
    for width in sizes:
        pair = data[width]
        for sd in (pair[0], pair[1]):
            want = expected_module_keys(data, width)
            got = {k: tuple(v.shape) for k, v in sd.items()}
            if got != want:
                raise Refused(f"width {width}: state dict {got} is not the module {want}")
            n_params += len(got)
    for key, default in (("name", None), ("step", 0), ("sd_checkpoint", None), ("optional_info", None)):
        data.get(key, default)
    return n_params


def optim_rule(artifact: Path, release: Release, expected_hash: str, n_params: int, torch_pin: str) -> str:
    """What the release's trainer does with `<artifact>.optim`: "loaded" or "fresh" (no state used)."""
    optim = Path(f"{artifact}.optim")
    safe_check(optim, release)
    saved = torch_read(optim)
    if saved.get("hash") != expected_hash:
        raise Refused("hash does not pair the .optim with its file")
    state = saved.get("optimizer_state_dict")
    if not state:
        return "fresh"
    name = saved.get("optimizer_name", "AdamW")
    if name not in TORCH_1_13_OPTIMIZERS:
        raise Refused(f"{name} is not a torch.optim class of torch {torch_pin}: its state would go into AdamW")
    groups = state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != n_params:
        raise Refused("param groups do not match the host's single group of every parameter")
    if name == "AdamW":
        need = ADAMW_GROUP_KEYS["1.13.1" if torch_pin.startswith("1.") else "2.0"]
        if not need <= set(groups[0]):
            raise Refused(f"AdamW group lacks {sorted(need - set(groups[0]))}")
        for per_param in state["state"].values():
            if not {"step", "exp_avg", "exp_avg_sq"} <= set(per_param) or not _is_tensor(per_param["step"]):
                raise Refused("AdamW state lacks step/exp_avg/exp_avg_sq or its step is not a tensor")
    return "loaded"


# --- what sdtrain writes ---------------------------------------------------------------------------


def _sd1() -> Embedding:
    g = torch.Generator().manual_seed(0)
    return Embedding("cat", {"*": torch.randn(3, 768, generator=g)}, step=40, sd_checkpoint="abc123def4",
                     sd_checkpoint_name="v1-5-pruned")


def _sdxl() -> Embedding:
    g = torch.Generator().manual_seed(1)
    vectors = {"clip_l": torch.randn(2, 768, generator=g), "clip_g": torch.randn(2, 1280, generator=g)}
    return Embedding("dog", vectors, step=7, sd_checkpoint="ffee", sd_checkpoint_name="sdxl-base")


def _stepped(optimizer_cls, params, **kw) -> torch.optim.Optimizer:
    opt = optimizer_cls(params, lr=1e-3, **kw)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


HN_SHAPES = {  # name: (layer_structure, activation, layer norm, use_dropout, activate_output)
    "hn-default": ([1, 2, 1], "linear", False, False, False),
    "hn-relu-norm-dropout": ([1, 2, 2, 1], "relu", True, True, True),
    "hn-prelu": ([1, 1.5, 1], "prelu", False, False, True),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every kind of file sdtrain writes for the webuis, written once by sdtrain's own writers."""
    d = tmp_path_factory.mktemp("written")
    files: dict[str, tuple[Path, object]] = {}
    for tag, emb in (("sd1", _sd1()), ("sdxl", _sdxl())):
        eio.save_embedding_pt(emb, d / f"{tag}.pt")
        eio.save_embedding_safetensors(emb, d / f"{tag}.safetensors", {"sdtrain.config": "{}"})
        eio.save_embedding_image(emb, d / f"{tag}.png", base_image=Image.new("RGB", (96, 96), (40, 50, 60)))
        files[f"{tag}.pt"] = (d / f"{tag}.pt", emb)
        files[f"{tag}.safetensors"] = (d / f"{tag}.safetensors", emb)
        files[f"{tag}.png"] = (d / f"{tag}.png", emb)
        # the textual-inversion .optim: AdamW (the host loads it), another optimizer (kept apart)
        params = [emb.vectors[k].clone().requires_grad_(True) for k in sorted(emb.vectors)]
        opt = _stepped(torch.optim.AdamW, params, weight_decay=0.0)
        # (host_loadable as the TI task sets it: AdamW with one param group)
        eio.save_optim(d / f"{tag}.pt", opt.state_dict(), emb.checksum(), optimizer_name="AdamW", step=emb.step,
                       settings={"weight_decay": 0.0, "betas": (0.9, 0.999)}, host_loadable=True)
        files[f"{tag}.pt.optim"] = (d / f"{tag}.pt", emb)
        sgd = _stepped(torch.optim.SGD, [emb.vectors[k].clone().requires_grad_(True) for k in sorted(emb.vectors)],
                       momentum=0.9)
        eio.save_optim(d / f"{tag}-sgd.pt", sgd.state_dict(), emb.checksum(), optimizer_name="SGD",
                       host_loadable=False)
        files[f"{tag}-sgd.pt.optim"] = (d / f"{tag}-sgd.pt", emb)
    for name, (structure, act, norm, dropout, out_act) in HN_SHAPES.items():
        hn = Hypernetwork(name, [64, 40], structure, act, "Normal", norm, dropout, out_act, seed=2)
        hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name = 5, "abcdef0123", "model"
        path = save_hypernetwork(hn, d / f"{name}.pt")
        params = [p.detach().clone().requires_grad_(True) for k, v in hn.layers.values() for m in (k, v)
                  for p in m.parameters()]
        opt = _stepped(torch.optim.AdamW, params)
        save_hypernetwork_optim(path, opt.state_dict(), "AdamW", settings={"weight_decay": 0.01})
        files[name] = (Path(path), hn)
    return files


EMBEDDING_KINDS = ("sd1.pt", "sd1.safetensors", "sd1.png", "sdxl.pt", "sdxl.safetensors", "sdxl.png")
TORCH_KINDS = ("sd1.pt", "sdxl.pt", "sd1.pt.optim", "sdxl.pt.optim", "sd1-sgd.pt.optim", "sdxl-sgd.pt.optim",
               *HN_SHAPES, *(f"{n}.optim" for n in HN_SHAPES))


def _path(written, kind: str) -> Path:
    if kind.endswith(".optim"):
        base = kind[: -len(".optim")]
        return Path(f"{written[base if base in written else kind][0]}.optim")
    return written[kind][0]


def _limit(release: Release, kind: str) -> str | None:
    """Why `release` cannot load `kind` whatever sdtrain writes (None: it must load it)."""
    if kind.startswith("sdxl") and release.sdxl == "no-embeddings":
        return ("SDXL models but no clip_l/clip_g branch before v1.6.0: the two-tensor dict reaches the "
                "one-tensor branch ('multiple terms'); no single-file form can hold both encoders' vectors")
    if kind.endswith(".png") and not release.images:
        return "Forge Classic does not read embeddings from pictures (load_from_file raises NotImplementedError)"
    return None


def _cases(kinds, loader: bool = True):
    """(release, kind) pairs; with `loader` the documented limits are expected failures (the safe-check
    itself has none: every release's check passes every file)."""
    out = []
    for release in RELEASES:
        for kind in kinds:
            if kind.startswith("sdxl") and release.sdxl == "none":
                continue  # no SDXL models in the release: nothing to load an SDXL embedding for
            reason = _limit(release, kind) if loader else None
            marks = [pytest.mark.xfail(strict=True, raises=Refused, reason=reason)] if reason else []
            out.append(pytest.param(release.name, kind, marks=marks, id=f"{release.name}-{kind}"))
    return out


# --- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("release", "kind"), _cases(TORCH_KINDS, loader=False))
def test_torch_files_pass_the_release_safe_check(written, release, kind):
    safe_check(_path(written, kind), BY_NAME[release])


@pytest.mark.parametrize(("release", "kind"), _cases(EMBEDDING_KINDS))
def test_embeddings_load_in_the_release(written, release, kind):
    path, emb = written[kind]
    vectors = load_embedding_as(path, BY_NAME[release])
    assert set(vectors) == set(emb.vectors)
    for key, value in emb.vectors.items():
        assert torch.allclose(vectors[key].float(), value), key  # PNG JSON round-trips float32 exactly


@pytest.mark.parametrize(("release", "kind"), _cases(tuple(HN_SHAPES)))
def test_hypernetworks_and_their_optim_load_in_the_release(written, release, kind):
    rel = BY_NAME[release]
    if not rel.hypernetworks:
        pytest.skip("no hypernetworks in this webui (nothing to load them)")
    path, _hn = written[kind]
    n_params = hypernetwork_rule(path, rel)
    shorthash = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert optim_rule(path, rel, shorthash, n_params, rel.torch) == "loaded"


@pytest.mark.parametrize(("release", "tag"), [(r.name, t) for r in RELEASES for t in ("sd1", "sdxl")
                                               if not (t == "sdxl" and r.sdxl == "none")])
def test_embedding_optim_pairs_and_loads_into_the_host_adamw(written, release, tag):
    """The host's TI trainer uses `optimizer_state_dict` when `hash` is the embedding's checksum (SDXL:
    sdtrain's checksum over clip_g then clip_l, the host trains no SDXL embedding); a state of another
    optimizer (SGD here) stays under a key the host does not read, so it starts a fresh AdamW."""
    rel = BY_NAME[release]
    path, emb = written[f"{tag}.pt"]
    n = len(emb.vectors)
    assert optim_rule(path, rel, emb.checksum(), n, rel.torch) == "loaded"
    sgd_path, _ = written[f"{tag}-sgd.pt.optim"]
    assert optim_rule(sgd_path, rel, emb.checksum(), n, rel.torch) == "fresh"


def test_hypernetwork_choices_exist_in_the_oldest_torch():
    """Every activation the UI offers and every optimizer whose state goes where the host loads it
    exist in torch 1.13.1 (v1.0.0-pre's pin), so an old release builds what a new torch trained."""
    from lib_sdtrain.core.options.optimizers import OPTIMIZERS, host_builds

    assert set(UI_ACTIVATIONS) <= TORCH_1_13_ACTIVATIONS
    assert {n for n in OPTIMIZERS if host_builds(n)} <= TORCH_1_13_OPTIMIZERS


def test_safetensors_embeddings_have_the_oldest_reader_layout(written):
    for kind in ("sd1.safetensors", "sdxl.safetensors"):
        assert safetensors_read(written[kind][0])


# --- the rules can fail: files these releases refuse ----------------------------------------------


def _plain_save(obj, path: Path) -> Path:
    torch.save(obj, path)  # torch's own writer, not sdtrain's: every entry torch 2.x adds is kept
    return path


def test_spec_refuses_what_each_release_refuses(tmp_path):
    v19, v110, v12 = BY_NAME["a1111-v1.9.4"], BY_NAME["a1111-v1.10.1"], BY_NAME["a1111-v1.2.1"]
    plain = _plain_save({"string_to_param": {"*": torch.ones(1, 4)}}, tmp_path / "plain.pt")
    names = zipfile.ZipFile(plain).namelist()
    if any(n.endswith(("/byteorder", "/.data/serialization_id")) for n in names):
        with pytest.raises(Refused, match="not allowed"):
            safe_check(plain, v19)
    with pytest.raises(Refused, match="not allowed"):  # .format_version: refused by every release
        safe_check(plain, v110)
    bf16 = tmp_path / "bf16.pt"
    eio.save_torch_file({"x": torch.ones(2, dtype=torch.bfloat16)}, bf16)
    with pytest.raises(Refused, match="BFloat16Storage"):
        safe_check(bf16, v12)
    safe_check(bf16, BY_NAME["a1111-v1.3.0"])
    sized = tmp_path / "size.pt"
    eio.save_torch_file({"x": torch.Size([2, 3])}, sized)
    with pytest.raises(Refused, match="forbidden"):
        safe_check(sized, v110)
    with pytest.raises(Refused, match="detach"):
        embedding_rule({"clip_l": torch.ones(1, 4), "clip_g": torch.ones(1, 8), "name": "x"}, v110)
    with pytest.raises(Refused, match="multiple terms"):
        embedding_rule({"clip_l": torch.ones(1, 4), "clip_g": torch.ones(1, 8)}, BY_NAME["a1111-v1.5.2"])
    with pytest.raises(Refused, match="neither"):
        embedding_rule(collections.OrderedDict(clip_l=torch.ones(1, 4), clip_g=torch.ones(1, 8)), v110)


def test_spec_refuses_a_safetensors_file_with_a_gap(tmp_path):
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [1, 2], "data_offsets": [4, 12]}}).encode()
    bad = tmp_path / "gap.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(Refused, match="contiguous"):
        safetensors_read(bad)


def test_spec_refuses_a_hypernetwork_the_host_cannot_build(tmp_path, written):
    path, hn = written["hn-default"]
    data = torch_read(path)
    data["is_layer_norm"] = True  # the file now claims layers its state dicts do not have
    eio.save_torch_file(data, tmp_path / "lying.pt")
    with pytest.raises(Refused, match="is not the module"):
        hypernetwork_rule(tmp_path / "lying.pt", BY_NAME["a1111-v1.0.0-pre"])
    assert isinstance(hn, Hypernetwork) and isinstance(data, Mapping)
