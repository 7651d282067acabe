"""Host(Forge): where Forge keeps the embedding lists sdtrain shows and refreshes, and the
Hypernetworks cards page it stopped registering.

Forge has three embedding databases and no `sd_hijack.model_hijack.embedding_db`: one per text
engine of the loaded model (what prompts use), the extra-networks cards' (module global of
modules/ui_extra_networks_textual_inversion.py) and the API's (`Api.embedding_db`, behind
`/sdapi/v1/embeddings`). A new file must reach all three, and the conditioning cache must go.
"""

from __future__ import annotations

from typing import Any

_app: Any = None


def remember_app(app) -> None:
    """on_app_started: the FastAPI app, to reach the API's own embedding database."""
    global _app
    _app = app


def _loaded_model():
    from modules import shared

    m = getattr(shared, "sd_model", None)
    return m if hasattr(m, "forge_objects") else None  # a FakeInitialModel until the first generation


def _engine_dbs() -> list:
    from lib_sdtrain.hosts.forge.host import engines

    m = _loaded_model()
    return [engine.embeddings for _, engine in engines(m)] if m is not None else []


def _cards_db():
    from modules import ui_extra_networks_textual_inversion

    return ui_extra_networks_textual_inversion.embedding_db


def embedding_names() -> list[str]:
    """What prompts resolve now: the loaded model's engines (names fitting its width); before any
    model is loaded, every embedding file the cards page knows."""
    dbs = _engine_dbs() or [_cards_db()]
    names = set()
    for db in dbs:
        names.update(db.word_embeddings)
    return sorted(names, key=str.lower)


def skipped_embeddings() -> dict[str, int]:
    out: dict[str, int] = {}
    for db in _engine_dbs():
        out.update({name: int(getattr(e, "shape", 0) or 0) for name, e in db.skipped_embeddings.items()})
    return out


def refresh_embeddings() -> None:
    """Reload every database (the GPU lock held for the engines', which prompts read) and drop the
    cached conditionings: a new or retrained embedding is listed and used at once."""
    from modules import call_queue

    from lib_sdtrain.hosts.a1111.host import clear_cond_caches

    with call_queue.queue_lock:
        for db in _engine_dbs():
            db.load_textual_inversion_embeddings()
        clear_cond_caches()
    _cards_db().load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)
    api = _api()
    if api is not None:
        api.embedding_db.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)


def _api():
    """The host's Api object, through its bound /sdapi/v1/refresh-embeddings endpoint."""
    for route in getattr(getattr(_app, "router", None), "routes", []):
        if getattr(route, "path", "") == "/sdapi/v1/refresh-embeddings":
            owner = getattr(route.endpoint, "__self__", None)
            if hasattr(owner, "embedding_db"):
                return owner
    return None


def register_hypernetwork_page() -> None:
    """on_before_ui: the Hypernetworks cards page (Forge commented its registration out,
    modules/ui_extra_networks.py register_default_pages); only where the host has none."""
    from modules import ui_extra_networks

    if any(getattr(page, "title", "") == "Hypernetworks" for page in ui_extra_networks.extra_pages):
        return
    from modules.ui_extra_networks_hypernets import ExtraNetworksPageHypernetworks

    ui_extra_networks.register_page(ExtraNetworksPageHypernetworks())


def on_main_thread(func) -> bool:
    """Run `func` on the process's main thread, where Forge and reForge keep their task loop
    (modules_forge.main_thread.loop; the webui itself and the extensions run in a worker thread there).
    Signal handlers can only be installed from that thread. False where there is no such loop."""
    try:
        from modules_forge import main_thread
    except ImportError:
        return False
    main_thread.async_run(func)
    return True
