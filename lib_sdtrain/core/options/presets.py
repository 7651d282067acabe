"""Core: named option presets for training runs, chosen by measurement (bench/quality_search.py and
bench/quality.py; the figures are in README's Results).

A preset fills the fields a request leaves out: every field the request names keeps its value, so
`{"preset": "recommended", "learn_rate": "0.01"}` is the preset with another rate. No preset (the
default, "none") is the webui's own behaviour, field for field. The tab applies a preset by setting its form
fields when it is picked, so what will run is what the form shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lib_sdtrain.core.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    #: job kind -> the fields it sets
    fields: dict[str, dict[str, Any]]
    #: one line: what it does and what backs it (shown beside the choice in the tab)
    summary: str


PRESETS: dict[str, Preset] = {
    "recommended": Preset(
        "recommended",
        {
            "train_embedding": {"min_snr_gamma": 5.0},
        },
        "Min-SNR-5 loss weighting, for SD1/SD2: in the SD1 toy-world benchmark it reached the webui trainer's "
        "concept match in fewer steps at the same learning rate (on SDXL it measured no better than the defaults).",
    ),
}
#: the choices of the `preset` field ("none": the webui's behaviour)
PRESET_NAMES = ("none", *PRESETS)


def preset_fields(kind: str, name: str) -> dict[str, Any]:
    """The fields preset `name` sets for job `kind` ({} for "none" or a kind it leaves alone)."""
    if name in ("", "none"):
        return {}
    if name not in PRESETS:
        raise ConfigError("preset", f"must be one of {', '.join(repr(n) for n in PRESET_NAMES)}; got {name!r}")
    return dict(PRESETS[name].fields.get(kind, {}))


def apply_preset(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """`data` with its preset's fields filled in wherever `data` names none (or names it as null)."""
    name = data.get("preset") or "none"
    if not isinstance(name, str):
        raise ConfigError("preset", f"expected a preset name, got {name!r}")
    given = {k for k, v in data.items() if v is not None}
    return {**data, **{k: v for k, v in preset_fields(kind, name).items() if k not in given}}
