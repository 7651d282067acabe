"""Core: reading and writing textual-inversion embeddings in every format A1111 v1.10 loads.

The host is the specification: modules/textual_inversion/textual_inversion.py
(`Embedding.save`, `EmbeddingDatabase.load_from_file`, `create_embedding_from_data`) and
image_embedding.py. Reading is lenient where that is harmless; writing produces exactly the
shapes the stock host loads (with its safe-unpickle check on).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from PIL import Image, PngImagePlugin

from lib_sdtrain.core.errors import FormatError, SdtrainError
from lib_sdtrain.core.formats.embedding import SDXL_KEYS, SINGLE, Embedding
from lib_sdtrain.core.formats.embedding_image import (
    TEXT_CHUNK_KEY,
    caption_image,
    decode_pixel_data,
    decode_text_chunk,
    encode_pixel_data,
    encode_text_chunk,
    read_embedding_image,
)
from lib_sdtrain.core.formats.fsutil import atomic_write
from lib_sdtrain.core.formats.limits import check_safetensors
from lib_sdtrain.core.formats.torchfile import load_torch_file, save_torch_file, to_cpu

__all__ = [
    "IMAGE_EXTS",
    "PT_EXTS",
    "SAFETENSORS_EXTS",
    "SDTRAIN_STATE_KEY",
    "decode_pixel_data",
    "decode_text_chunk",
    "embedding_from_data",
    "embedding_kind",
    "host_dict",
    "load_embedding",
    "load_optim",
    "read_embedding_image",
    "save_embedding_image",
    "save_embedding_pt",
    "save_embedding_safetensors",
    "save_optim",
]

PT_EXTS = (".pt", ".bin")
SAFETENSORS_EXTS = (".safetensors",)
IMAGE_EXTS = (".png", ".webp", ".jxl", ".avif")
#: `Embedding.save` always writes this token id (a leftover of the original TI code).
_HOST_TOKEN_ID = 265
#: Key of the single tensor in kohya / A1111-extension SD1/SD2 .safetensors embeddings.
EMB_PARAMS = "emb_params"
#: Our .safetensors header keys; anything else the caller passes is kept as is.
META_NAME, META_STEP = "sdtrain.name", "sdtrain.step"
META_CKPT, META_CKPT_NAME = "sdtrain.sd_checkpoint", "sdtrain.sd_checkpoint_name"


# --- recognising files ------------------------------------------------------------------------


def embedding_kind(path: str | os.PathLike[str]) -> str | None:
    """Core: "pt", "safetensors" or "image" by extension (any case); None for anything else.

    `<name>.preview.<image ext>` is a preview picture, never an embedding (host: load_from_file).
    """
    stem, ext = os.path.splitext(os.path.basename(os.fspath(path)))
    ext = ext.lower()
    if ext in PT_EXTS:
        return "pt"
    if ext in SAFETENSORS_EXTS:
        return "safetensors"
    if ext in IMAGE_EXTS and os.path.splitext(stem)[1].lower() != ".preview":
        return "image"
    return None


# --- dict shapes ------------------------------------------------------------------------------


def _vector_set(value: Any, path: str, what: str) -> torch.Tensor:
    """A detached float32 CPU copy `[n, d]` of one vector set (1-D becomes one vector)."""
    if not isinstance(value, torch.Tensor):
        raise FormatError(path, f"{what} is a {type(value).__name__}, not a tensor")
    if value.ndim == 1:
        value = value.unsqueeze(0)
    if value.ndim != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise FormatError(path, f"{what} has shape {tuple(value.shape)}; expected [vectors, width]")
    if value.is_complex() or value.dtype == torch.bool:
        raise FormatError(path, f"{what} has dtype {value.dtype}; expected floating point")
    out = value.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
    if not torch.isfinite(out).all():
        raise FormatError(path, f"{what} holds NaN or infinite values")
    return out


def _from_string_to_param(params: Any, path: str) -> dict[str, torch.Tensor]:
    # torch 1.11 saved a ParameterDict; the host unwraps `_parameters` the same way.
    params = getattr(params, "_parameters", params)
    if not isinstance(params, Mapping):
        raise FormatError(path, f"'string_to_param' is a {type(params).__name__}, not a dict")
    if len(params) != 1:
        raise FormatError(path, f"'string_to_param' has {len(params)} entries; an embedding has exactly one")
    ((token, value),) = params.items()
    return {SINGLE: _vector_set(value, path, f"'string_to_param'[{token!r}]")}


def _vectors_from_data(data: Any, path: str) -> dict[str, torch.Tensor]:
    """The vector sets of any shape the host's `create_embedding_from_data` accepts (and a bit more)."""
    if isinstance(data, torch.Tensor):  # a bare tensor: not loadable by the host, harmless to read
        return {SINGLE: _vector_set(data, path, "the tensor")}
    if not isinstance(data, Mapping):
        raise FormatError(path, f"holds a {type(data).__name__}, not an embedding dict")
    if "string_to_param" in data:  # A1111 .pt
        return _from_string_to_param(data["string_to_param"], path)
    if all(k in data for k in SDXL_KEYS):  # SDXL (kohya / A1111 both)
        sets = {k: _vector_set(data[k], path, f"'{k}'") for k in SDXL_KEYS}
        if len({v.shape[0] for v in sets.values()}) != 1:
            raise FormatError(path, "'clip_l' and 'clip_g' hold different numbers of vectors")
        return sets
    if isinstance(data.get(EMB_PARAMS), torch.Tensor):  # kohya / A1111 .safetensors
        return {SINGLE: _vector_set(data[EMB_PARAMS], path, f"'{EMB_PARAMS}'")}
    tensors = [(k, v) for k, v in data.items() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1 and len(data) == 1:  # diffusers concept {"<token>": tensor}
        key, value = tensors[0]
        return {SINGLE: _vector_set(value, path, f"{key!r}")}
    keys = ", ".join(repr(k) for k in list(data)[:8])
    raise FormatError(
        path,
        "not a textual-inversion embedding: expected 'string_to_param', 'clip_l' + 'clip_g', "
        f"'{EMB_PARAMS}' or a single tensor; found keys [{keys}]",
    )


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


def embedding_from_data(data: Any, name: str, path: str = "<data>") -> Embedding:
    """Core: an Embedding from a loaded dict, as the host's `create_embedding_from_data`.

    Shapes: `string_to_param` (one entry; ParameterDict-like `_parameters` tolerated),
    `clip_l` + `clip_g` (SDXL), `emb_params`, a dict of exactly one tensor (diffusers; 1-D is
    one vector) or a bare tensor. `step`/`sd_checkpoint`/`sd_checkpoint_name` come from
    `data.get`. `name` is used as given: the host takes the file stem for .pt/.safetensors and
    only images override it with `data['name']` (load_embedding does that).
    """
    vectors = _vectors_from_data(data, path)
    meta = data if isinstance(data, Mapping) else {}
    return Embedding(
        name=name,
        vectors=vectors,
        step=_as_int(meta.get("step")),
        sd_checkpoint=_as_str(meta.get("sd_checkpoint")),
        sd_checkpoint_name=_as_str(meta.get("sd_checkpoint_name")),
        filename=None if path == "<data>" else path,
    )


# --- loading ----------------------------------------------------------------------------------


def load_embedding(path: str | os.PathLike[str]) -> Embedding:
    """Core: read an embedding file (.pt/.bin, .safetensors, .png/.webp/.jxl/.avif).

    The name is the file stem, except for images whose data carries a 'name' (as the host).
    `.pt`/`.bin` are read with weights_only only. Raises FormatError naming the file otherwise.
    """
    p = os.fspath(path)
    kind = embedding_kind(p)
    if kind is None:
        why = "is a preview image" if p.lower().endswith(IMAGE_EXTS) else "has an unsupported extension"
        raise FormatError(p, f"not an embedding: it {why} (expected .pt, .bin, .safetensors or an image)")
    if not os.path.isfile(p):
        raise FormatError(p, "no such file")
    if os.path.getsize(p) == 0:
        raise FormatError(p, "empty file")
    stem = os.path.splitext(os.path.basename(p))[0]
    if kind == "pt":
        emb = embedding_from_data(load_torch_file(p), stem, p)
    elif kind == "safetensors":
        emb = _load_safetensors(p, stem)
    else:
        emb = _load_image(p, stem)
    emb.filename = p
    return emb


def _load_safetensors(path: str, stem: str) -> Embedding:
    """Read only the tensors an embedding needs (a stray checkpoint is not loaded whole)."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            header = dict(f.metadata() or {})
            wanted = _safetensors_keys(keys)
            check_safetensors(path, wanted)  # from the header, before any tensor is read
            data = {k: f.get_tensor(k) for k in wanted} if wanted else dict.fromkeys(keys[:8])
    except FormatError:
        raise
    except Exception as exc:  # SafetensorError, OSError, bad header JSON...
        raise FormatError(path, f"not a readable .safetensors file ({exc})") from None
    emb = embedding_from_data(data, stem, path)
    emb.metadata = header
    emb.step = _as_int(header.get(META_STEP))
    emb.sd_checkpoint = header.get(META_CKPT)
    emb.sd_checkpoint_name = header.get(META_CKPT_NAME)
    return emb


def _safetensors_keys(keys: list[str]) -> list[str]:
    if all(k in keys for k in SDXL_KEYS):
        return list(SDXL_KEYS)
    if EMB_PARAMS in keys:
        return [EMB_PARAMS]
    return keys if len(keys) == 1 else []


def _load_image(path: str, stem: str) -> Embedding:
    try:
        data = read_embedding_image(path)
    except ValueError as exc:
        raise FormatError(path, f"embedded data is broken ({exc})") from None
    except Exception as exc:  # PIL: UnidentifiedImageError, missing plugin, truncated file
        raise FormatError(path, f"cannot read the image ({exc})") from None
    if data is None:
        raise FormatError(
            path, f"image carries no embedding (no '{TEXT_CHUNK_KEY}' text chunk, no pixel-encoded data)"
        )
    name = data.get("name")
    # textual_inversion.py load_from_file: images take `data.get('name', name)`.
    return embedding_from_data(data, name if isinstance(name, str) and name else stem, path)


# --- saving -----------------------------------------------------------------------------------


def _layout(emb: Embedding) -> str:
    keys = set(emb.vectors)
    if keys == {SINGLE}:
        return "single"
    if keys == set(SDXL_KEYS):
        return "sdxl"
    raise SdtrainError(
        f"embedding {emb.name!r} has vector sets {sorted(keys)}; expected '*' or clip_l + clip_g"
    )


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU float32 copy with its own compact storage (torch.save writes whole storages)."""
    return t.detach().to(device="cpu", dtype=torch.float32).clone(memory_format=torch.contiguous_format)


def host_dict(emb: Embedding) -> dict[str, Any]:
    """Core: the dict the host writes to .pt and into images for this embedding.

    SD1/SD2: exactly `Embedding.save`'s dict. SDXL: only `{"clip_l", "clip_g"}` — the host's SDXL
    branch calls `.detach()` on *every* value of the dict, so metadata keys (name, step...)
    would make the stock webui fail to load it; SDXL step/checkpoint survive only in .safetensors.
    """
    if _layout(emb) == "sdxl":
        return {k: _plain(emb.vectors[k]) for k in SDXL_KEYS}
    return {
        "string_to_token": {SINGLE: _HOST_TOKEN_ID},
        "string_to_param": {SINGLE: _plain(emb.vectors[SINGLE])},
        "name": emb.name,
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
    }


def save_embedding_pt(emb: Embedding, path: str | os.PathLike[str]) -> None:
    """Core: write the host's .pt (see `host_dict`), passing its safe-unpickle check, atomically."""
    save_torch_file(host_dict(emb), path)


def _header(emb: Embedding, extra: Mapping[str, str] | None) -> dict[str, str]:
    header = {**emb.metadata, **(extra or {})}
    ours = {META_NAME: emb.name, META_STEP: emb.step, META_CKPT: emb.sd_checkpoint}
    ours[META_CKPT_NAME] = emb.sd_checkpoint_name
    for key, value in ours.items():
        header.pop(key, None)
        if value is not None:
            header[key] = str(value)
    bad = [k for k, v in header.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise SdtrainError(f".safetensors metadata must be str -> str; not: {bad[:5]}")
    return header


def save_embedding_safetensors(
    emb: Embedding, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Core: write `{"emb_params": [n, d]}` (SD1/SD2) or `{"clip_l", "clip_g"}` (SDXL), atomically.

    The host loads `emb_params` through its single-tensor (diffusers) branch. The header holds
    the embedding's own metadata, then `metadata`, then sdtrain.name/step/sd_checkpoint[_name].
    """
    if _layout(emb) == "sdxl":
        tensors = {k: _plain(emb.vectors[k]) for k in SDXL_KEYS}
    else:
        tensors = {EMB_PARAMS: _plain(emb.vectors[SINGLE])}
    header = _header(emb, metadata)
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header))


def save_embedding_image(
    emb: Embedding,
    path: str | os.PathLike[str],
    base_image: Image.Image | None = None,
    title: str | None = None,
    footer_left: str | None = None,
    footer_mid: str | None = None,
    footer_right: str | None = None,
) -> None:
    """Core: a PNG carrying the embedding twice: `sd-ti-embedding` text chunk and pixel side blocks.

    Like the host's "save images with embedding in PNG chunks" (textual_inversion.py,
    train_embedding): captioned image, then the pixel blocks, then the text chunk. Captions
    default to `<name>`, checkpoint name, `[checkpoint hash]`, `"{n}v {step}s"`.
    """
    if os.path.splitext(os.fspath(path))[1].lower() != ".png":
        raise SdtrainError(f"{os.fspath(path)}: embedding images are written as .png only")
    data = host_dict(emb)
    base = base_image if base_image is not None else Image.new("RGB", (512, 512), (56, 60, 72))
    captioned = caption_image(
        base,
        f"<{emb.name}>" if title is None else title,
        (emb.sd_checkpoint_name or "") if footer_left is None else footer_left,
        (f"[{emb.sd_checkpoint}]" if emb.sd_checkpoint else "") if footer_mid is None else footer_mid,
        f"{emb.n_vectors}v {emb.step or 0}s" if footer_right is None else footer_right,
    )
    image = encode_pixel_data(captioned, data)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK_KEY, encode_text_chunk(data))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


# --- optimizer sidecar ------------------------------------------------------------------------


#: where a `.optim` keeps a state the host must not load (an optimizer it would not build: it loads
#: `optimizer_state_dict` into its own AdamW, or for a hypernetwork into the torch.optim class named)
SDTRAIN_STATE_KEY = "sdtrain_optimizer_state_dict"


def save_optim(
    artifact_path: str | os.PathLike[str],
    optimizer_state_dict: Mapping[str, Any],
    checksum: str,
    optimizer_name: str | None = None,
    step: int | None = None,
    settings: Mapping[str, Any] | None = None,
    host_loadable: bool = True,
) -> str:
    """Core: write `<artifact>.optim` = {'hash', 'optimizer_state_dict'[, 'optimizer_name'][, 'step']
    [, 'optimizer_settings']}.

    The host's shapes: Embedding.save (hash + state) and Hypernetwork.save (+ optimizer_name).
    `step` is sdtrain's addition for files that cannot hold one (an SDXL `.pt` is two tensors and
    nothing else), `settings` the optimizer's settings (weight decay, ...); the host ignores keys it
    does not read. With `host_loadable` off the state goes under SDTRAIN_STATE_KEY, so the host
    starts a fresh optimizer ("No saved optimizer") instead of loading a state of another kind.
    Tensors are moved to the CPU. Host-safe-check compatible, atomic. Returns the path.
    """
    target = f"{os.fspath(artifact_path)}.optim"
    state_key = "optimizer_state_dict" if host_loadable else SDTRAIN_STATE_KEY
    saved: dict[str, Any] = {"hash": checksum, state_key: to_cpu(dict(optimizer_state_dict))}
    if optimizer_name is not None:
        saved["optimizer_name"] = optimizer_name
    if step is not None:
        saved["step"] = int(step)
    if settings is not None:
        saved["optimizer_settings"] = dict(settings)
    save_torch_file(saved, target)
    return target


def load_optim(artifact_path: str | os.PathLike[str], expected_hash: str) -> dict[str, Any] | None:
    """Core: the saved `.optim` dict next to `artifact_path` if its hash matches, else None.

    Returns the whole dict ({'hash', 'optimizer_state_dict'[, 'optimizer_name']...}; a state kept
    under SDTRAIN_STATE_KEY is returned as 'optimizer_state_dict'); None when the file is missing,
    the hash differs or it holds no state (host: "No saved optimizer").
    Raises FormatError when the file is unreadable or unsafe.
    """
    target = f"{os.fspath(artifact_path)}.optim"
    if not Path(target).is_file():
        return None
    saved = load_torch_file(target)
    if not isinstance(saved, Mapping):
        raise FormatError(target, f"holds a {type(saved).__name__}, not an optimizer state dict")
    out = dict(saved)
    if not isinstance(out.get("optimizer_state_dict"), Mapping):
        out["optimizer_state_dict"] = out.get(SDTRAIN_STATE_KEY)
    if out.get("hash") != expected_hash or not isinstance(out["optimizer_state_dict"], Mapping):
        return None
    return out
