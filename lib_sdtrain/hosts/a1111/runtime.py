"""Host(A1111): the process-wide job service and the webui facts the surfaces need.

`lib_sdtrain` stays imported across the webui's Reload UI (only scripts/ are re-executed), so the
service created here survives a reload: one worker, whatever the number of reloads.
"""

from __future__ import annotations

import atexit
import html
import logging
import os
import threading
from typing import Any

from lib_sdtrain.core.jobs.service import JobControl, JobService
from lib_sdtrain.core.jobs.signals import stop_jobs_on_signals
from lib_sdtrain.core.tasks.registry import job_config_types, job_runners
from lib_sdtrain.hosts.a1111.host import A1111Host

log = logging.getLogger(__name__)

_lock = threading.Lock()
_service: JobService | None = None
_host: A1111Host | None = None


def host() -> A1111Host:
    """The adapter for this webui: Forge's own backend, or A1111's objects (A1111, reForge)."""
    global _host
    if _host is None:
        if is_forge():
            from lib_sdtrain.hosts.forge.host import ForgeHost

            _host = ForgeHost()
        else:
            _host = A1111Host()
    return _host


def _refresh_embeddings() -> None:
    from modules import call_queue, sd_hijack

    if is_forge():
        from lib_sdtrain.hosts.forge import webui

        webui.refresh_embeddings()
        return

    with call_queue.queue_lock:
        sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)


def _refresh_hypernetworks() -> None:
    """New files appear in /sdapi/v1/hypernetworks and the Hypernetworks cards at once (where the webui
    keeps such a list; without one, sdtrain lists the folder each time it is asked)."""
    from modules import shared

    if hasattr(shared, "reload_hypernetworks"):
        shared.reload_hypernetworks()


def hypernetwork_dir() -> str:
    """The webui's --hypernetwork-dir, sdtrain's where the webui has none, else <models>/hypernetworks."""
    from lib_sdtrain.hosts.a1111 import capabilities

    return capabilities.hypernetwork_dir()[0]


def _wrapped_runners() -> dict[str, tuple[type, Any]]:
    """The core runners, plus what the webui needs around them: the GPU lock for work that is not
    a training session, and a forced embedding reload so the new file is listed at once."""
    from lib_sdtrain.hosts.a1111.host import gpu_lock

    runners = dict(job_runners())

    def with_refresh(runner, lock: bool, refresh):
        def run(h, cfg, control: JobControl):
            wait_for_model_load()
            try:
                if lock:
                    with gpu_lock():
                        return runner(h, cfg, control)
                return runner(h, cfg, control)
            finally:
                try:
                    refresh()
                except Exception:  # a failed refresh must not hide the job's own outcome
                    log.exception("sdtrain: refreshing the webui's lists failed")

        return run

    out = {}
    for kind, (cls, runner) in runners.items():
        refresh = _refresh_hypernetworks if "hypernetwork" in kind else _refresh_embeddings
        out[kind] = (cls, with_refresh(runner, lock=kind.startswith("create_"), refresh=refresh))
    return out


def wait_for_model_load() -> None:
    """Webuis that load the checkpoint in a thread of its own at start-up (A1111, reForge, Forge Classic:
    `sd_models.model_data.lock` is held meanwhile) patch torch's layer constructors while it runs
    (sd_disable_initialization: a Linear made then lands on the meta device), so a job started early —
    a create request right after start-up — waits for the load to end. Where the lock is absent, nothing."""
    try:
        from modules import sd_models
    except ImportError:
        return
    lock = getattr(getattr(sd_models, "model_data", None), "lock", None)
    if lock is not None and hasattr(lock, "acquire"):
        with lock:
            pass


def service() -> JobService:
    global _service
    with _lock:
        if _service is None:
            _service = JobService(host, _wrapped_runners(), store=_job_store())
            # at webui exit a running job saves and ends, like Stop (the worker is a daemon thread);
            # SIGTERM/Ctrl-C (which the webui ends with os._exit, skipping atexit) likewise first
            atexit.register(shutdown)
            _stop_jobs_on_signals(_service)
        return _service


def _stop_jobs_on_signals(svc: JobService) -> None:
    """A1111 creates the service on the main thread; Forge and reForge run the webui in a worker
    thread and keep the main thread for their task loop (modules_forge/main_thread.py), so the
    handlers are installed through that loop."""
    if stop_jobs_on_signals(svc):
        return
    from lib_sdtrain.hosts.forge import webui

    webui.on_main_thread(lambda: stop_jobs_on_signals(svc))


def _job_store() -> str | None:
    """The job list survives a webui restart: a JSON file in the webui's data directory."""
    try:
        from modules import paths

        return os.path.join(paths.data_path, "sdtrain", "jobs.json")
    except Exception:  # no webui (tests of the surfaces): the list lives in memory only
        return None


def shutdown() -> None:
    """Stop jobs and the worker (process exit). A UI reload keeps the service running."""
    global _service
    with _lock:
        svc, _service = _service, None
    if svc is not None:
        svc.shutdown(timeout=30)


# -- webui facts for forms and requests ----------------------------------------------------------
def job_defaults(kind: str) -> dict[str, Any]:
    """Folder and Training-settings values the host's own trainer would read from its options."""
    from modules import shared

    opts, cmd = shared.opts, shared.cmd_opts
    out: dict[str, Any] = {"embeddings_dir": cmd.embeddings_dir}
    if kind.startswith("train_"):
        # hosts that dropped training (Forge) have neither the folder nor these settings: sdtrain's own
        # templates and the in-tree trainer's defaults then apply
        out["templates_dir"] = templates_dir()
        for key, cast in (("dataset_filename_word_regex", str), ("dataset_filename_join_string", str),
                          ("training_write_csv_every", int), ("save_training_settings_to_txt", bool),
                          ("training_image_repeats_per_epoch", int), ("training_enable_tensorboard", bool),
                          ("training_tensorboard_save_images", bool), ("training_tensorboard_flush_every", int)):
            if key in getattr(opts, "data_labels", {}):  # the host registers the setting
                out[key] = cast(getattr(opts, key))
    if "hypernetwork" in kind:
        out.pop("embeddings_dir", None)
        out["hypernetwork_dir"] = hypernetwork_dir()
    fields = {f["name"] for f in job_config_types()[kind].describe()} if kind in job_config_types() else set(out)
    return {k: v for k, v in out.items() if k in fields}


def embedding_names() -> list[str]:
    from modules import sd_hijack

    if is_forge():
        from lib_sdtrain.hosts.forge import webui

        return webui.embedding_names()

    return sorted(sd_hijack.model_hijack.embedding_db.word_embeddings.keys(), key=str.lower)


def skipped_embeddings() -> dict[str, int]:
    from modules import sd_hijack

    if is_forge():
        from lib_sdtrain.hosts.forge import webui

        return webui.skipped_embeddings()

    return {name: int(e.shape or 0) for name, e in sd_hijack.model_hijack.embedding_db.skipped_embeddings.items()}


def embedding_note() -> str:
    """Which embedding files fit the loaded model: the list holds those; the webui skipped the others
    (their vectors are another width: made for another model family)."""
    fit, skipped = embedding_names(), skipped_embeddings()
    text = f"{len(fit)} embedding{'s' if len(fit) != 1 else ''} fit the loaded model."
    if skipped:
        shown = ", ".join(f"{html.escape(n)} ({w} wide)" if w else html.escape(n) for n, w in sorted(skipped.items())[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        text += f" Not listed, made for another model: {shown}{more}."
    return f"<span class='sdtrain-note'>{text}</span>"


def tensorboard_note() -> str:
    """How to get TensorBoard logging, when the webui's setting asks for it and the package is missing."""
    from modules import shared

    from lib_sdtrain.core.training.tensorboard import tensorboard_status

    if not getattr(shared.opts, "training_enable_tensorboard", False):
        return ""
    text = tensorboard_status()
    return f"<span class='sdtrain-note'>{html.escape(text)}</span>" if text else ""


def hypernetwork_names() -> list[str]:
    from modules import shared

    if hasattr(shared, "hypernetworks"):
        return sorted(shared.hypernetworks, key=str.lower)
    # a webui without hypernetworks (Forge Classic): the names its `<hypernet:...>` (sdtrain's) resolves
    from lib_sdtrain.core.hypernetwork.network import find_hypernetwork_file

    folder = hypernetwork_dir()
    names = set()
    for _root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        names.update(f[:-3] for f in files if f.endswith(".pt") and not f.startswith("."))
    return sorted((n for n in names if find_hypernetwork_file(folder, n)), key=str.lower)


def refresh_hypernetworks() -> list[str]:
    _refresh_hypernetworks()
    return hypernetwork_names()


def templates_dir() -> str:
    """The host's prompt-template folder, or sdtrain's own copy where the host has none (Forge)."""
    from modules import shared

    from lib_sdtrain.core.options.config import DEFAULT_TEMPLATES_DIR

    folder = getattr(shared.cmd_opts, "textual_inversion_templates_dir", None)
    return folder if folder and os.path.isdir(folder) else DEFAULT_TEMPLATES_DIR


def template_names() -> list[str]:
    names = set()
    for _root, _dirs, files in os.walk(templates_dir(), followlinks=True):
        names.update(f for f in files if f.endswith(".txt"))
    return sorted(names)


def refresh_embeddings() -> list[str]:
    _refresh_embeddings()
    return embedding_names()


def refresh_lists() -> dict[str, list[str]]:
    """Embeddings and hypernetworks reloaded from disk, for /sdtrain/v1/refresh."""
    return {"embeddings": refresh_embeddings(), "hypernetworks": refresh_hypernetworks()}


def api_credentials() -> dict[str, str] | None:
    """The host's --api-auth users (modules/api/api.py, Api.__init__), or None when open."""
    from modules import shared

    spec = getattr(shared.cmd_opts, "api_auth", None)
    if not spec:
        return None
    creds = {}
    for pair in spec.split(","):
        user, _, password = pair.partition(":")
        creds[user] = password
    return creds


#: Settings → sdtrain: serve the host's /sdapi training routes with sdtrain (on by default).
SETTING_REPLACE_ROUTES = "sdtrain_serve_host_training_routes"
#: Settings → sdtrain: let requests write outside the webui's folders (off by default).
SETTING_ANY_FOLDER = "sdtrain_allow_writes_outside_webui_folders"
#: read by javascript/sdtrain.js (the webui hands every setting to the page as `opts`)
SETTING_HIDE_HOST_TABS = "sdtrain_hide_host_training_tabs"


def register_settings() -> None:
    """on_ui_settings: sdtrain's section in the webui's Settings."""
    from modules import shared

    shared.opts.add_option(SETTING_REPLACE_ROUTES, shared.OptionInfo(
        True, "Serve the webui's /sdapi/v1/create/* and /sdapi/v1/train/* routes with sdtrain (restart to apply)",
        section=("sdtrain", "sdtrain")))
    shared.opts.add_option(SETTING_ANY_FOLDER, shared.OptionInfo(
        False, "Let API requests (and the UI, when the webui is reachable from other machines) make sdtrain write "
               "log folders and preprocess output outside the webui's data, embeddings and hypernetworks folders",
        section=("sdtrain", "sdtrain")))
    shared.opts.add_option(SETTING_HIDE_HOST_TABS, shared.OptionInfo(
        True, "Hide the webui's own Create embedding, Create hypernetwork and Train sub-tabs while sdtrain serves "
              "their routes (sdtrain's tabs do the same; reload the page to apply)",
        section=("sdtrain", "sdtrain")))


def write_policy():
    """Where HTTP requests may make sdtrain write: inside the webui's data directory (which holds the
    log folders), its embeddings and hypernetworks folders — unless the owner allowed more."""
    from modules import paths, shared

    from lib_sdtrain.core.options.places import WritePolicy

    if shared.opts.data.get(SETTING_ANY_FOLDER, False):
        return None
    cmd = shared.cmd_opts
    roots = [getattr(paths, "data_path", None) or os.getcwd(), getattr(cmd, "embeddings_dir", None),
             hypernetwork_dir()]
    return WritePolicy(tuple(dict.fromkeys(os.path.abspath(r) for r in roots if r)),
                       hint="the webui's owner can allow other folders in Settings → sdtrain")


def ui_write_policy():
    """The same rule for the UI when others can reach it (--listen, --share, --server-name) and the
    owner did not pass --enable-insecure-extension-access (the webui's own guard for risky actions)."""
    from modules import shared

    cmd = shared.cmd_opts
    exposed = bool(getattr(cmd, "listen", False) or getattr(cmd, "share", False) or getattr(cmd, "server_name", None))
    if not exposed or getattr(cmd, "enable_insecure_extension_access", False):
        return None
    return write_policy()


def serve_host_routes() -> bool:
    """sdtrain answers the host's training routes when the host serves an API and the setting is on."""
    from modules import shared

    return host_api_enabled() and bool(shared.opts.data.get(SETTING_REPLACE_ROUTES, True))


def is_forge() -> bool:
    """The webui runs Forge's own model code (`backend/`, loaded through `sd_models.forge_model_reload`):
    adapter hosts/forge. reForge and Forge Classic also ship `modules_forge`, but keep A1111's objects over
    `ldm_patched`, so a `modules_forge` folder (or a version string) alone says nothing."""
    from lib_sdtrain.hosts.a1111 import capabilities

    return capabilities.model_stack() == capabilities.FORGE_BACKEND


def has_unet_patcher() -> bool:
    """Forge and reForge generate through a UNet patcher (modules_forge) whose UNet ignores
    `shared.loaded_hypernetworks`; A1111 applies them in its own attention forward."""
    import importlib.util

    try:
        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


def remember_app(app) -> None:
    """on_app_started: Forge's API keeps its own embedding list, reached through the app."""
    if is_forge():
        from lib_sdtrain.hosts.forge import webui

        webui.remember_app(app)


def before_ui() -> None:
    """on_before_ui: Forge stopped registering the Hypernetworks cards page; sdtrain brings it back where
    the webui still has the page's code. A webui that no longer parses `<hypernet:...>` (Forge Classic)
    gets sdtrain's extra network for it."""
    import importlib.util

    from lib_sdtrain.hosts.a1111 import hypernet_prompt

    if is_forge() and importlib.util.find_spec("modules.ui_extra_networks_hypernets") is not None:
        from lib_sdtrain.hosts.forge import webui

        webui.register_hypernetwork_page()
    try:
        hypernet_prompt.register_if_missing(hypernetwork_dir)
    except Exception:  # never take the UI down: the host report says <hypernet:...> is not parsed
        log.exception("sdtrain: registering <hypernet:...> failed")


def host_report() -> dict[str, Any]:
    """GET /sdtrain/v1/host: the probe's result (hosts/a1111/capabilities.py)."""
    from lib_sdtrain.hosts.a1111 import capabilities

    return capabilities.probe().as_dict()


def host_note() -> str:
    """The tab's note: what this webui cannot do for sdtrain, and why."""
    from lib_sdtrain.hosts.a1111 import capabilities

    return capabilities.probe().note()


def log_host() -> None:
    """One line at start-up: what the probe found."""
    from lib_sdtrain.hosts.a1111 import capabilities

    try:
        line = capabilities.probe().log_line()
    except Exception as e:  # the probe must never stop the webui
        line = f"[sdtrain] host: the probe failed ({type(e).__name__}: {e}); features may be missing"
    print(line, flush=True)


def host_api_enabled() -> bool:
    from modules import shared

    return bool(getattr(shared.cmd_opts, "api", False) or getattr(shared.cmd_opts, "nowebui", False))


def sdtrain_api_disabled() -> bool:
    from modules import shared

    return bool(getattr(shared.cmd_opts, "sdtrain_no_api", False))


def captioner_note() -> str:
    """What the Preprocess tab says about captioning before anyone asks for it."""
    from lib_sdtrain.hosts.a1111.host import captioner_status

    parts = []
    for name, label in (("blip", "BLIP"), ("deepbooru", "DeepBooru")):
        missing = captioner_status()[name]
        parts.append(f"{label}: available" if not missing else
                     f"{label}: not available ({missing})" if missing.startswith("this webui has no") else
                     f"{label}: not available ({missing}; the webui downloads it when you first interrogate "
                     "an image in img2img with internet access)")
        # an unavailable captioner makes the job stop before it writes anything
    return "Captioning — " + "; ".join(parts)


_model_note = ""

#: per family: what an embedding trained on it holds, and the hypernetwork module sizes it uses
_FAMILIES = {
    "sdxl": ("SDXL", "an embedding holds two vector sets, clip_l [n, 768] and clip_g [n, 1280]; "
             "hypernetwork modules 2048 (cross-attention) and 640/1280 (self-attention)"),
    "sd2": ("SD2", "an embedding holds one vector set [n, 1024]; hypernetwork modules 1024, 320/640/1280"),
    "sd1": ("SD1", "an embedding holds one vector set [n, 768]; hypernetwork modules 768, 320/640/1280"),
}


def family_note(sd_model) -> str:
    if is_forge():
        from lib_sdtrain.hosts.forge.host import FAMILIES

        if not hasattr(sd_model, "forge_objects"):
            return "no model loaded yet (Forge loads it at the first generation or training job)"
        if type(sd_model).__name__ not in FAMILIES:
            return f"{type(sd_model).__name__}: not trainable by sdtrain"
    from lib_sdtrain.hosts.a1111.host import is_sd2

    family = "sdxl" if getattr(sd_model, "is_sdxl", False) else "sd2" if is_sd2(sd_model) else "sd1"
    if getattr(sd_model, "is_sd3", False):
        return "SD3: not trainable by sdtrain"
    title, what = _FAMILIES[family]
    return f"{title}: {what}"


def model_loaded(sd_model) -> None:
    """on_model_loaded: note which embeddings fit the new checkpoint and which the host skipped."""
    global _model_note
    try:
        info = getattr(sd_model, "sd_checkpoint_info", None)
        skipped = skipped_embeddings()
        _model_note = (f"Checkpoint {getattr(info, 'model_name', '?')} — {family_note(sd_model)}; "
                       f"{len(embedding_names())} embeddings fit")
        if skipped:
            _model_note += "; skipped (other width): " + ", ".join(f"{n} ({w})" for n, w in sorted(skipped.items()))
    except Exception as e:  # never break the host's model load
        _model_note = f"(could not list embeddings: {e})"


def model_note() -> str:
    return _model_note
