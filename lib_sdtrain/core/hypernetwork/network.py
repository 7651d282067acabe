"""Core: hypernetworks as the host defines them, and their `.pt`/`.optim` files.

The host is the specification (modules/hypernetworks/hypernetwork.py, A1111 v1.10.1):
`HypernetworkModule` builds the same `linear` Sequential from the same options, so its state-dict
keys (`linear.0.weight`, `linear.2.bias`, ...) are the host's; `Hypernetwork` carries the same
fields; `save_hypernetwork` writes the dict `Hypernetwork.save` writes, key for key, through the
host-safe torch writer; `load_hypernetwork` reads it back with weights-only loading and the host's
defaults for keys an older file lacks. Only torch is needed; nothing here touches a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.nn.init import kaiming_normal_, kaiming_uniform_, normal_, xavier_normal_, xavier_uniform_, zeros_

from lib_sdtrain.core.errors import ConfigError, FormatError
from lib_sdtrain.core.formats.embedding_io import load_optim, save_optim
from lib_sdtrain.core.formats.torchfile import load_torch_file, save_torch_file
from lib_sdtrain.core.options.hypernetwork_spec import HN_WEIGHT_INITS as WEIGHT_INITS
from lib_sdtrain.core.options.hypernetwork_spec import check_layer_structure, parse_float_list
from lib_sdtrain.core.options.optimizers import OPTIMIZERS, host_builds, optimizer_class

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_ENABLE_SIZES",
    "OPTIMIZERS",
    "UI_ACTIVATIONS",
    "WEIGHT_INITS",
    "Hypernetwork",
    "HypernetworkModule",
    "check_layer_structure",
    "find_hypernetwork_file",
    "hypernetwork_dict",
    "hypernetwork_from_data",
    "hypernetwork_hash",
    "load_hypernetwork",
    "load_hypernetwork_optim",
    "optimizer_class",
    "parse_dropout_structure",
    "parse_float_list",
    "save_hypernetwork",
    "save_hypernetwork_optim",
]


def _activation_table() -> dict[str, type[torch.nn.Module]]:
    # The host's seven names first ("swish" is Hardswish there, not SiLU: kept, files depend on it),
    # then every class defined in torch.nn.modules.activation under its lowercase name.
    table: dict[str, type[torch.nn.Module]] = {
        "linear": torch.nn.Identity,
        "relu": torch.nn.ReLU,
        "leakyrelu": torch.nn.LeakyReLU,
        "elu": torch.nn.ELU,
        "swish": torch.nn.Hardswish,
        "tanh": torch.nn.Tanh,
        "sigmoid": torch.nn.Sigmoid,
    }
    for cls_name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation":
            table[cls_name.lower()] = cls
    return table


#: Activation name → module class, as the host's `HypernetworkModule.activation_dict`.
ACTIVATIONS: dict[str, type[torch.nn.Module]] = _activation_table()


def _buildable(cls: type[torch.nn.Module]) -> bool:
    try:
        cls()
    except TypeError:  # threshold, multiheadattention: need arguments the host never passes
        return False
    return True


#: What the host's UI offers (hypernetworks/ui.py drops "hardswish" and "multiheadattention"),
#: less the ones the host cannot build either (their constructors need arguments).
UI_ACTIVATIONS: tuple[str, ...] = tuple(
    k for k, cls in ACTIVATIONS.items() if k not in ("hardswish", "multiheadattention") and _buildable(cls)
)
DEFAULT_ENABLE_SIZES = (768, 320, 640, 1280)
DEFAULT_LAYER_STRUCTURE = [1, 2, 1]


# --- structure -------------------------------------------------------------------------------------


def parse_dropout_structure(
    layer_structure: Sequence[float] | None, use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """The host's rule for files/objects without an explicit dropout structure:
    off → zeros; on → 0, 0.3 for every hidden layer but the last, 0.3 or 0 for the last hidden
    layer (`last_layer_dropout`), 0 after the output."""
    if layer_structure is None:
        layer_structure = DEFAULT_LAYER_STRUCTURE
    if not use_dropout:
        return [0] * len(layer_structure)
    values: list[float] = [0]
    values.extend([0.3] * (len(layer_structure) - 3))
    values.append(0.3 if last_layer_dropout else 0)
    values.append(0)
    return values


class HypernetworkModule(torch.nn.Module):
    """One K or V transform for one context width: `x + linear(x) * multiplier` (multiplier 1
    while training). `linear` is the host's Sequential: per step Linear, then the activation
    (not after the last Linear unless `activate_output`), LayerNorm, Dropout where the structure
    says so — the module indices, hence the state-dict keys, follow from these options."""

    def __init__(
        self,
        dim: int,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        layer_structure: Sequence[float] | None = None,
        activation_func: str | None = None,
        weight_init: str | None = "Normal",
        add_layer_norm: bool = False,
        activate_output: bool = False,
        dropout_structure: Sequence[float] | None = None,
    ):
        super().__init__()
        self.multiplier = 1.0
        check_layer_structure(layer_structure)
        assert layer_structure is not None
        n = len(layer_structure)
        if dropout_structure is not None and len(dropout_structure) < n:
            raise ConfigError(
                "dropout_structure", f"has {len(dropout_structure)} entries; the layer structure has {n}"
            )
        layers: list[torch.nn.Module] = []
        for i in range(n - 1):
            width_out = int(dim * layer_structure[i + 1])
            layers.append(torch.nn.Linear(int(dim * layer_structure[i]), width_out))
            last = i >= n - 2
            if activation_func == "linear" or activation_func is None or (last and not activate_output):
                pass
            elif activation_func in ACTIVATIONS:
                layers.append(ACTIVATIONS[activation_func]())
            else:
                raise ConfigError("activation_func", f"unsupported activation function {activation_func!r}")
            if add_layer_norm:
                layers.append(torch.nn.LayerNorm(width_out))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                p = dropout_structure[i + 1]
                if not 0 < p < 1:
                    raise ConfigError(
                        "dropout_structure", f"dropout probabilities must be in [0, 1); got {p}"
                    )
                layers.append(torch.nn.Dropout(p=p))
        self.linear = torch.nn.Sequential(*layers)

        if state_dict is not None:
            self.load_state_dict(fix_old_state_dict(state_dict))
        else:
            self._initialise(weight_init, activation_func)

    def _initialise(self, weight_init: str | None, activation_func: str | None) -> None:
        # Same calls in the same order as the host, so a seeded global RNG gives the host's weights.
        nonlinearity = "leaky_relu" if activation_func == "leakyrelu" else "relu"
        for layer in self.linear:
            if type(layer) not in (torch.nn.Linear, torch.nn.LayerNorm):
                continue
            w, b = layer.weight.data, layer.bias.data
            if weight_init == "Normal" or type(layer) is torch.nn.LayerNorm:  # LayerNorm too, as the host
                normal_(w, mean=0.0, std=0.01)
                normal_(b, mean=0.0, std=0)
            elif weight_init == "XavierUniform":
                xavier_uniform_(w)
                zeros_(b)
            elif weight_init == "XavierNormal":
                xavier_normal_(w)
                zeros_(b)
            elif weight_init == "KaimingUniform":
                kaiming_uniform_(w, nonlinearity=nonlinearity)
                zeros_(b)
            elif weight_init == "KaimingNormal":
                kaiming_normal_(w, nonlinearity=nonlinearity)
                zeros_(b)
            else:
                raise ConfigError("weight_init", f"{weight_init!r} is not one of {', '.join(WEIGHT_INITS)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * (self.multiplier if not self.training else 1)


def fix_old_state_dict(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """A copy with the first files' `linear1.*`/`linear2.*` keys renamed `linear.0.*`/`linear.1.*`."""
    changes = {
        "linear1.bias": "linear.0.bias",
        "linear1.weight": "linear.0.weight",
        "linear2.bias": "linear.1.bias",
        "linear2.weight": "linear.1.weight",
    }
    out = OrderedDict(state_dict)
    for old, new in changes.items():
        value = out.get(old)
        if value is None:
            continue
        del out[old]
        out[new] = value
    return out


class Hypernetwork:
    """The host's `Hypernetwork`: `layers` maps a context width to a (K module, V module) pair.

    `layers` has exactly the host's shape, so the webui's own `apply_hypernetworks` can run one
    of these objects as it is. Built modules start in eval mode with frozen parameters, as the host's.
    """

    def __init__(
        self,
        name: str | None = None,
        enable_sizes: Iterable[int] | None = None,
        layer_structure: Sequence[float] | None = None,
        activation_func: str | None = None,
        weight_init: str | None = None,
        add_layer_norm: bool = False,
        use_dropout: bool = False,
        activate_output: bool = False,
        *,
        last_layer_dropout: bool = True,
        dropout_structure: Sequence[float] | None = None,
        optional_info: str | None = None,
        seed: int | None = None,
    ):
        self.filename: str | None = None
        self.name = name
        self.layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
        self.step: int = 0
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None
        self.layer_structure = list(layer_structure) if layer_structure is not None else None
        self.activation_func = activation_func
        self.weight_init = weight_init
        self.add_layer_norm = add_layer_norm
        self.use_dropout = use_dropout
        self.activate_output = activate_output
        self.last_layer_dropout = last_layer_dropout
        self.dropout_structure = list(dropout_structure) if dropout_structure is not None else None
        if self.dropout_structure is None:
            self.dropout_structure = parse_dropout_structure(
                self.layer_structure, self.use_dropout, self.last_layer_dropout
            )
        self.optimizer_name: str | None = None
        self.optional_info = optional_info

        sizes = list(enable_sizes or [])
        # A seed makes creation reproducible without touching the caller's global RNG stream.
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            for size in sizes:
                self.layers[int(size)] = (self._module(int(size)), self._module(int(size)))
        self.eval()

    def _module(self, size: int, state_dict: Mapping[str, torch.Tensor] | None = None) -> HypernetworkModule:
        return HypernetworkModule(
            size,
            state_dict,
            self.layer_structure,
            self.activation_func,
            self.weight_init,
            self.add_layer_norm,
            self.activate_output,
            dropout_structure=self.dropout_structure,
        )

    # -- the host's methods --------------------------------------------------------------------------
    def modules(self) -> Iterator[HypernetworkModule]:
        for pair in self.layers.values():
            yield from pair

    def trainable_params(self) -> list[torch.nn.Parameter]:
        """Every parameter, what the host's trainer optimizes (`Hypernetwork.weights()`; a PReLU's
        weight included, unlike `HypernetworkModule.trainables()`)."""
        return [p for m in self.modules() for p in m.parameters()]

    weights = trainable_params

    def train(self, mode: bool = True) -> Hypernetwork:
        """Train mode (dropout on, multiplier ignored) and requires_grad = mode, as the host."""
        for m in self.modules():
            m.train(mode)
            for p in m.parameters():
                p.requires_grad_(mode)
        return self

    def eval(self) -> Hypernetwork:
        return self.train(False)

    @property
    def training(self) -> bool:
        return any(m.training for m in self.modules())

    def to(self, device: torch.device | str) -> Hypernetwork:
        for m in self.modules():
            m.to(device)
        return self

    def set_multiplier(self, multiplier: float) -> Hypernetwork:
        for m in self.modules():
            m.multiplier = multiplier
        return self

    def __repr__(self) -> str:
        return (
            f"Hypernetwork({self.name!r}, sizes={sorted(self.layers)}, structure={self.layer_structure}, "
            f"activation={self.activation_func!r}, step={self.step})"
        )


# --- files ---------------------------------------------------------------------------------------


def _cpu_state(module: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """`module.state_dict()` as compact CPU float copies, `_metadata` kept (the host pickles it too)."""
    state = module.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict(
        (k, v.detach().to("cpu").clone(memory_format=torch.contiguous_format)) for k, v in state.items()
    )
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict((k, dict(v)) for k, v in meta.items())  # type: ignore[attr-defined]
    return out


def hypernetwork_dict(hn: Hypernetwork) -> dict[Any, Any]:
    """The dict `Hypernetwork.save` writes: `{int width: (k_state, v_state)}`, then its metadata."""
    data: dict[Any, Any] = {}
    for size, (k, v) in hn.layers.items():
        data[size] = (_cpu_state(k), _cpu_state(v))
    data["step"] = hn.step
    data["name"] = hn.name
    data["layer_structure"] = hn.layer_structure
    data["activation_func"] = hn.activation_func
    data["is_layer_norm"] = hn.add_layer_norm
    data["weight_initialization"] = hn.weight_init
    data["sd_checkpoint"] = hn.sd_checkpoint
    data["sd_checkpoint_name"] = hn.sd_checkpoint_name
    data["activate_output"] = hn.activate_output
    data["use_dropout"] = hn.use_dropout
    data["dropout_structure"] = hn.dropout_structure
    ds = hn.dropout_structure
    data["last_layer_dropout"] = (ds[-2] != 0) if ds is not None else hn.last_layer_dropout
    data["optional_info"] = hn.optional_info if hn.optional_info else None
    return data


def save_hypernetwork(hn: Hypernetwork, path: str | os.PathLike[str]) -> str:
    """Write the host's `.pt` (passing its safe-unpickle check), atomically. Returns the path."""
    p = os.fspath(path)
    save_torch_file(hypernetwork_dict(hn), p)
    return p


def hypernetwork_hash(path: str | os.PathLike[str]) -> str:
    """What the host pairs an HN with its `.optim` by: `shorthash()`, the first 10 hex digits of
    the file's sha256 (hashes.sha256 over the whole file)."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def save_hypernetwork_optim(
    path: str | os.PathLike[str],
    optimizer_state_dict: Mapping[str, Any],
    optimizer_name: str,
    settings: Mapping[str, Any] | None = None,
) -> str:
    """`<path>.optim` = {'optimizer_name', 'hash', 'optimizer_state_dict'[, 'optimizer_settings']} for
    the file now at `path`. The host builds any torch.optim class by that name and loads the state
    into it; the state of an optimizer from another package (Lion, ...) is kept where the host does
    not look, so it starts a fresh AdamW instead of failing."""
    return save_optim(path, optimizer_state_dict, hypernetwork_hash(path), optimizer_name=optimizer_name,
                      settings=settings, host_loadable=host_builds(optimizer_name))


def load_hypernetwork_optim(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The `.optim` next to `path` if its hash matches the file (the host's check on load), else
    None. `optimizer_name` defaults to AdamW as in the host."""
    saved = load_optim(path, hypernetwork_hash(path))
    if saved is None:
        return None
    saved.setdefault("optimizer_name", "AdamW")
    return saved


def _module_state(value: Any, path: str, what: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(value, Mapping) or not all(isinstance(t, torch.Tensor) for t in value.values()):
        raise FormatError(path, f"{what} is not a state dict of tensors")
    return value


def hypernetwork_from_data(data: Any, name: str, path: str = "<data>") -> Hypernetwork:
    """A Hypernetwork from a loaded dict, with the host's `Hypernetwork.load` defaults: layer
    structure [1, 2, 1], activation None, init Normal, no layer norm, **activate_output True**,
    last_layer_dropout False, use_dropout inferred from a non-zero dropout structure, the
    dropout structure derived when absent; `name` from the file, else `name`."""
    if not isinstance(data, Mapping):
        raise FormatError(path, f"holds a {type(data).__name__}, not a hypernetwork dict")
    sizes = [k for k in data if type(k) is int]  # the host's test: a bool key is no width
    if not sizes:
        keys = ", ".join(repr(k) for k in list(data)[:8])
        raise FormatError(path, f"not a hypernetwork: no modules keyed by context width; found keys [{keys}]")
    layer_structure = data.get("layer_structure", DEFAULT_LAYER_STRUCTURE)
    dropout_structure = data.get("dropout_structure", None)
    use_dropout = (
        True if dropout_structure is not None and any(dropout_structure) else data.get("use_dropout", False)
    )
    hn = Hypernetwork(
        name=name,
        layer_structure=layer_structure,
        activation_func=data.get("activation_func", None),
        weight_init=data.get("weight_initialization", "Normal"),
        add_layer_norm=data.get("is_layer_norm", False),
        use_dropout=use_dropout,
        activate_output=data.get("activate_output", True),
        last_layer_dropout=data.get("last_layer_dropout", False),
        dropout_structure=dropout_structure,
        optional_info=data.get("optional_info", None),
    )
    for size in sizes:
        pair = data[size]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise FormatError(path, f"entry {size} is not a (K, V) pair of state dicts")
        k_state = _module_state(pair[0], path, f"entry {size} K")
        v_state = _module_state(pair[1], path, f"entry {size} V")
        try:
            hn.layers[size] = (hn._module(size, k_state), hn._module(size, v_state))
        except ConfigError as e:
            raise FormatError(path, f"bad hypernetwork options: {e}") from None
        except RuntimeError as e:  # load_state_dict: missing/unexpected keys, shape mismatch
            detail = " ".join(str(e).split())[:400]
            raise FormatError(path, f"entry {size} does not match its layer structure: {detail}") from None
    stored = data.get("name", None)
    hn.name = stored if isinstance(stored, str) and stored else name
    step = data.get("step", 0)
    hn.step = int(step) if isinstance(step, int) and not isinstance(step, bool) else 0
    hn.sd_checkpoint = data.get("sd_checkpoint", None)
    hn.sd_checkpoint_name = data.get("sd_checkpoint_name", None)
    hn.eval()
    return hn


def load_hypernetwork(path: str | os.PathLike[str]) -> Hypernetwork:
    """Read a hypernetwork `.pt` (weights-only: a file holding code is refused, nothing in it runs).
    The optimizer name comes from a matching `.optim`, else AdamW, as in the host."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FormatError(p, "no such file")
    if os.path.getsize(p) == 0:
        raise FormatError(p, "empty file")
    stem = os.path.splitext(os.path.basename(p))[0]
    hn = hypernetwork_from_data(load_torch_file(p), stem, p)
    hn.filename = p
    try:
        saved = load_hypernetwork_optim(p)
    except FormatError:
        saved = None  # an unreadable sidecar only loses the optimizer state
    hn.optimizer_name = saved["optimizer_name"] if saved else "AdamW"
    return hn


def find_hypernetwork_file(hypernetwork_dir: str, name: str) -> str | None:
    """The file the host lists under `name` (`list_hypernetworks`): `**/*.pt` below the folder,
    sorted case-insensitively, keyed by stem, the last one of a stem winning ("None" is never one)."""
    if name == "None":
        return None
    found: list[str] = []
    for root, dirs, files in os.walk(hypernetwork_dir, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # glob's ** skips hidden folders
        for f in files:
            if f.endswith(".pt") and not f.startswith(".") and f[:-3] == name:
                found.append(os.path.join(root, f))
    return sorted(found, key=str.lower)[-1] if found else None
