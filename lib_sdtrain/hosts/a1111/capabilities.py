"""Host(any A1111-family webui): what this webui offers sdtrain, found by looking at it, not by its name.

Forks and versions drop or change what sdtrain relies on: the Train tab (Forge, Forge Classic never call
`on_ui_train_tabs`), the model stack (A1111's ldm/sgm; `ldm_patched` under an A1111 shell in reForge and
Forge Classic; Forge's own `backend/`), `--hypernetwork-dir` and the whole hypernetwork module (Forge
Classic), the `<hypernet:...>` extra network, PNG-embedded embeddings, the stock trainer, and whether the
UNet's transformer blocks add into their residual in place (autograd cannot backprop through that). Each
is probed here; sdtrain picks its path from the result, and says what it cannot do and why: one log line
at start-up, `GET /sdtrain/v1/host`, and a note in the tab.

What can only be seen later is recorded when it is seen: whether the Train-tab callback ran (when the UI
is built) and how the UNet behaves under autograd (at the first training session).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

#: model stacks sdtrain knows how to train through
FORGE_BACKEND = "forge backend"  # lllyasviel Forge 2.x: backend/ (text engines, KModel), adapter hosts/forge
LDM_PATCHED = "ldm_patched"  # reForge, Forge Classic: ComfyUI-derived model under A1111's objects
LDM = "ldm/sgm"  # A1111: the ldm (SD1/SD2) and sgm (SDXL) repositories


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def model_stack() -> str:
    """Which model code the webui generates with, by what it has: Forge's `backend` package with its
    model reload entry point; else `ldm_patched` (its UNet patcher in `modules_forge`); else ldm/sgm."""
    if _has_module("backend.diffusion_engine") and _has_module("modules"):
        try:
            from modules import sd_models
        except Exception:  # not inside a webui
            sd_models = None
        if hasattr(sd_models, "forge_model_reload"):
            return FORGE_BACKEND
    if _has_module("ldm_patched") and _has_module("modules_forge"):
        return LDM_PATCHED
    return LDM


@dataclass
class Feature:
    """One thing sdtrain does in this webui: whether it works here, and how (or why not)."""

    available: bool
    detail: str


@dataclass
class HostReport:
    model_stack: str
    #: True/False once the UI was built (the Train-tab callback ran or not); None before, or with no UI
    train_tab: bool | None
    hypernetwork_dir: str
    #: where the folder comes from: the host's flag, sdtrain's flag (the host has none), or the default
    hypernetwork_dir_source: str
    features: dict[str, Feature] = field(default_factory=dict)
    #: the UNet's transformer blocks under autograd, once a training session probed them
    autograd: str = "not probed yet (at the first training job)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_stack": self.model_stack,
            "train_tab": self.train_tab,
            "tab": (None if self.train_tab is None else "Train tab" if self.train_tab else "own top-level tab"),
            "hypernetwork_dir": self.hypernetwork_dir,
            "hypernetwork_dir_source": self.hypernetwork_dir_source,
            "autograd": self.autograd,
            "features": {k: {"available": f.available, "detail": f.detail} for k, f in self.features.items()},
            "unavailable": {k: f.detail for k, f in self.features.items() if not f.available},
        }

    def log_line(self) -> str:
        tab = "no UI" if self.train_tab is None else "Train tab" if self.train_tab else "own tab (no Train tab)"
        off = [k for k, f in self.features.items() if not f.available]
        return (f"[sdtrain] host: model {self.model_stack}; UI {tab}; hypernetworks in {self.hypernetwork_dir} "
                f"({self.hypernetwork_dir_source}); <hypernet:...> {self.features['hypernet_prompt'].detail}; "
                f"unavailable: {', '.join(off) if off else 'nothing'} (GET /sdtrain/v1/host says why)")

    def note(self) -> str:
        """The tab's note: each feature not available here, with why; "" when all are."""
        import html

        off = [(k, f.detail) for k, f in self.features.items() if not f.available]
        if not off:
            return ""
        items = "; ".join(f"{html.escape(_TITLES.get(k, k))}: {html.escape(why)}" for k, why in off)
        return f"<span class='sdtrain-note'>Not available in this webui — {items}.</span>"


_TITLES = {
    "hypernet_prompt": "hypernetworks in generation (<hypernet:name:m>)",
    "png_embeddings": "PNG-embedded embeddings",
    "stock_trainer": "the webui's own trainer",
    "hypernetwork_cards": "the Hypernetworks cards page",
    "captioning": "captioning in preprocess",
}

# -- observed while the webui starts ---------------------------------------------------------------
_train_tab_called = False
_train_tab: bool | None = None
_autograd = ""
_checkpointing = ""


def saw_train_tab_callback() -> None:
    """on_ui_train_tabs ran: the webui has a Train tab, and sdtrain's sub-tabs are in it."""
    global _train_tab_called
    _train_tab_called = True


def ui_tabs_need_own_tab() -> bool:
    """Called from on_ui_tabs, which every webui calls after the Train tab (if it builds one) and once
    per UI build: whether sdtrain needs its own top-level tab. Resets for the next build (Reload UI)."""
    global _train_tab_called, _train_tab
    _train_tab = _train_tab_called
    _train_tab_called = False
    return not _train_tab


def record_autograd(text: str) -> None:
    global _autograd
    _autograd = text


def record_checkpointing(text: str) -> None:
    """what a training session did about the checkpointing the webui built the UNet with"""
    global _checkpointing
    _checkpointing = text


# -- probes ---------------------------------------------------------------------------------------
def hypernetwork_dir() -> tuple[str, str]:
    """(folder, where it comes from). The host's `--hypernetwork-dir`, or the one sdtrain's preload adds
    where the host has none (its help starts with "sdtrain:"), or `<models>/hypernetworks`."""
    from modules import shared

    folder = getattr(shared.cmd_opts, "hypernetwork_dir", None)
    if not folder:
        from modules import paths

        return os.path.join(paths.models_path, "hypernetworks"), "default; the webui has no --hypernetwork-dir"
    try:
        from modules import cmd_args

        action = cmd_args.parser._option_string_actions.get("--hypernetwork-dir")
        ours = action is not None and str(action.help or "").startswith("sdtrain:")
    except Exception:
        ours = False
    return folder, ("sdtrain's --hypernetwork-dir; the webui has none" if ours else "the webui's --hypernetwork-dir")


def host_hypernetworks() -> bool:
    """The webui keeps its own hypernetwork list and loader (A1111's modules/hypernetworks)."""
    from modules import shared

    return _has_module("modules.hypernetworks") and hasattr(shared, "reload_hypernetworks")


def hypernet_prompt() -> Feature:
    """Who parses `<hypernet:name:m>` and who applies it in generation."""
    from lib_sdtrain.hosts.a1111 import hypernet_prompt as hp

    parser = "sdtrain" if hp.registered_by_sdtrain() else "the webui" if hp.host_parses() else None
    if parser is None:
        return Feature(False, "not parsed: the webui has no extra-network registry")
    stack = model_stack()
    if stack == LDM and host_hypernetworks():
        return Feature(True, f"parsed by {parser}, applied by the webui's attention")
    if _has_module("modules_forge"):
        return Feature(True, f"parsed by {parser}, applied by sdtrain through the UNet patcher")
    return Feature(False, f"parsed by {parser}, but this webui's UNet has neither A1111's attention hijack nor a "
                          "UNet patcher to apply it through")


def probe() -> HostReport:
    folder, source = hypernetwork_dir()
    features = {"hypernet_prompt": hypernet_prompt()}
    features["png_embeddings"] = (
        Feature(True, "the webui decodes them (modules/textual_inversion/image_embedding)")
        if _has_module("modules.textual_inversion.image_embedding") else
        Feature(False, "the webui has no image-embedding decoder: save embeddings as .pt/.safetensors (sdtrain "
                       "still writes the PNG copies to the log folder, for other webuis)"))
    try:
        from modules.textual_inversion import textual_inversion as ti

        stock = hasattr(ti, "train_embedding")
    except Exception:
        stock = False
    features["stock_trainer"] = (Feature(True, "the webui's own trainer is present (sdtrain can serve its routes)")
                                 if stock else
                                 Feature(False, "the webui removed its trainer: sdtrain serves /sdapi/v1/train/* itself"))
    cards = _has_module("modules.ui_extra_networks_hypernets")
    features["hypernetwork_cards"] = (Feature(True, "the webui's page (sdtrain registers it where the webui stopped)")
                                      if cards else
                                      Feature(False, "the webui has no Hypernetworks cards page; use "
                                                     "<hypernet:name:m> in the prompt"))
    interrogators = [m for m in ("interrogate", "deepbooru") if not _has_module(f"modules.{m}")]
    features["captioning"] = (Feature(True, "BLIP and DeepBooru through the webui's interrogators (once their "
                                            "model files are on disk)")
                              if not interrogators else
                              Feature(False, f"the webui has no {' or '.join(m + '.py' for m in interrogators)}: "
                                             "preprocess runs without the captioners it lacks"))
    report = HostReport(model_stack=model_stack(), train_tab=_train_tab, hypernetwork_dir=folder,
                        hypernetwork_dir_source=source, features=features)
    if _autograd or _checkpointing:
        report.autograd = "; ".join(t for t in (_autograd, _checkpointing) if t)
    return report
