"""Host(any A1111-family webui): `<hypernet:name:m>` where the webui no longer parses it.

A1111 registers an extra network named "hypernet" (modules/extra_networks_hypernet.py) that loads the
named files into `shared.loaded_hypernetworks`; forks that removed hypernetworks (Forge Classic: no
modules/hypernetworks at all) strip the tag from the prompt and do nothing. Where no "hypernet" extra
network is registered when the UI is built, sdtrain registers its own: it loads the files with sdtrain's
loader (the host's file format) from the hypernetwork folder and keeps them here, for the always-on script
that applies them through the UNet patcher (hosts/forge/generation.py). A name that matches no file is
reported the way the webui reports extra-network errors, naming the folder; generation goes on without it.
"""

from __future__ import annotations

import os
from typing import Any

_registered: Any = None
_active: list[Any] = []
_cache: dict[str, tuple[float, Any]] = {}


def host_parses() -> bool:
    try:
        from modules import extra_networks
    except ImportError:
        return False
    return "hypernet" in extra_networks.extra_network_registry


def registered_by_sdtrain() -> bool:
    from modules import extra_networks

    return _registered is not None and extra_networks.extra_network_registry.get("hypernet") is _registered


def active() -> list[Any]:
    """The hypernetworks the current generation's prompt asked for (through sdtrain's extra network)."""
    return list(_active)


def loaded_hypernetworks() -> list[Any]:
    """What the prompt loaded: sdtrain's list where sdtrain parses `<hypernet:...>`, else the webui's."""
    if registered_by_sdtrain():
        return active()
    from modules import shared

    return list(getattr(shared, "loaded_hypernetworks", None) or [])


def _load(path: str):
    from lib_sdtrain.core.hypernetwork.network import load_hypernetwork

    mtime = os.path.getmtime(path)
    hit = _cache.get(path)
    if hit is None or hit[0] != mtime:
        from modules import devices

        _cache[path] = (mtime, load_hypernetwork(path).to(devices.device).eval())
    return _cache[path][1]


def parse_args(items: list[str]) -> tuple[str, float]:
    """`<hypernet:name>` or `<hypernet:name:multiplier>`; a bad multiplier is named."""
    if not items or not items[0]:
        raise ValueError("<hypernet:...> needs a name: <hypernet:name> or <hypernet:name:multiplier>")
    name = items[0]
    if len(items) < 2:
        return name, 1.0
    try:
        return name, float(items[1])
    except ValueError:
        raise ValueError(f"<hypernet:{name}:{items[1]}>: the multiplier must be a number") from None


def register_if_missing(folder_of) -> bool:
    """on_before_ui: register sdtrain's "hypernet" extra network unless the webui has one. `folder_of()`
    gives the hypernetwork folder (read at each generation). True when sdtrain's is (now) registered."""
    global _registered
    from modules import extra_networks

    registry = extra_networks.extra_network_registry
    if registry.get("hypernet") is not None and registry.get("hypernet") is not _registered:
        return False  # the webui parses it itself
    if _registered is None:
        from lib_sdtrain.core.hypernetwork.network import find_hypernetwork_file

        class SdtrainHypernetworks(extra_networks.ExtraNetwork):
            """`<hypernet:name:m>`: the named files, each at multiplier m, for this generation."""

            def __init__(self):
                super().__init__("hypernet")

            def activate(self, p, params_list):
                found = []
                for params in params_list:
                    name, multiplier = parse_args(list(params.items))
                    folder = folder_of()
                    path = find_hypernetwork_file(folder, name)
                    if path is None:
                        raise FileNotFoundError(f"<hypernet:{name}>: no hypernetwork named {name!r} in {folder}")
                    found.append(_load(path).set_multiplier(multiplier))
                _active[:] = found

            def deactivate(self, p):
                _active.clear()

        _registered = SdtrainHypernetworks()
    extra_networks.register_extra_network(_registered)
    return True
