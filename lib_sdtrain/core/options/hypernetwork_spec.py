"""Core: hypernetwork option vocabulary and text parsing, torch-free (shared by config and hypernetwork)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lib_sdtrain.core.errors import ConfigError

#: The host UI's hypernetwork activation list (modules/hypernetworks/ui.py: every activation name but
#: "hardswish" and "multiheadattention"), less "threshold", which neither the host nor we can build
#: without arguments. tests/test_hypernetwork.py checks it against the installed torch.
HN_ACTIVATIONS = (
    "linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "celu", "gelu", "glu", "hardshrink",
    "hardsigmoid", "hardtanh", "logsigmoid", "logsoftmax", "mish", "prelu", "rrelu", "relu6", "selu", "silu",
    "softmax", "softmax2d", "softmin", "softplus", "softshrink", "softsign", "tanhshrink",
)  # fmt: skip
HN_WEIGHT_INITS = ("Normal", "KaimingUniform", "KaimingNormal", "XavierUniform", "XavierNormal")
#: The sizes the host's "Modules" checkboxes offer (320/640/1280: self-attention; 768/1024: text).
HN_MODULE_SIZES = (768, 1024, 320, 640, 1280, 2048)


def parse_float_list(value: Any, field: str) -> list[float]:
    """ "1, 2, 1" or [1, 2, 1] → [1.0, 2.0, 1.0] (the host parses its text boxes with float())."""
    if isinstance(value, str):
        try:
            return [float(p.strip()) for p in value.split(",")]
        except ValueError:
            raise ConfigError(field, f"expected comma-separated numbers, got {value!r}") from None
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise ConfigError(field, f"expected numbers, got {value!r}")
        return [float(v) for v in value]
    raise ConfigError(field, f"expected numbers like '1, 2, 1', got {value!r}")


def check_layer_structure(layer_structure: Sequence[float] | None, field: str = "layer_structure") -> None:
    if layer_structure is None or len(layer_structure) < 2:
        raise ConfigError(field, f"needs at least two entries, like 1, 2, 1; got {layer_structure!r}")
    if layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise ConfigError(
            field,
            f"must start and end with 1 (sizes are multiples of the width); got {list(layer_structure)}",
        )
    if any(not (x > 0) for x in layer_structure):
        raise ConfigError(field, f"every entry must be positive; got {list(layer_structure)}")
