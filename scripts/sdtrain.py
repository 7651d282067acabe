"""Webui entry point: sdtrain's composition root (the only file in scripts/).

The webui runs this file with the extension folder on sys.path, at start-up and again at every
Reload UI; `lib_sdtrain` itself stays imported, so the job service (one worker) survives reloads.
This file only wires: host adapter → job service → UI tabs and HTTP routes.
"""

from modules import script_callbacks

from lib_sdtrain.api.routes import ApiOptions, mount
from lib_sdtrain.hosts.a1111 import capabilities, runtime
from lib_sdtrain.ui.train_tabs import UiContext, build_all_tabs

if runtime.has_unet_patcher():  # Forge, reForge, Forge Classic: `<hypernet:...>` through their UNet patcher
    # the webui registers the Script classes it finds in this file
    from lib_sdtrain.hosts.forge.generation import HypernetworksInGeneration  # noqa: F401


def _ui_context(preview_params=None) -> UiContext:
    return UiContext(
        service=runtime.service(),
        defaults=runtime.job_defaults,
        embedding_names=runtime.embedding_names,
        refresh_embeddings=runtime.refresh_embeddings,
        hypernetwork_names=runtime.hypernetwork_names,
        refresh_hypernetworks=runtime.refresh_hypernetworks,
        template_names=runtime.template_names,
        model_note=runtime.model_note,
        embedding_note=runtime.embedding_note,
        tensorboard_note=runtime.tensorboard_note,
        captioner_note=runtime.captioner_note,
        txt2img_preview_params=list(preview_params or []),
        write_policy=runtime.ui_write_policy,
        host_note=runtime.host_note,
    )


def on_ui_train_tabs(params):
    capabilities.saw_train_tab_callback()
    build_all_tabs(_ui_context(params.txt2img_preview_params))


def on_ui_tabs():
    """Webuis that never call the Train-tab callback (Forge, Forge Classic; seen, not assumed: the webuis
    call on_ui_tabs after building their Train tab): one top-level tab holding the same sub-tabs."""
    import gradio as gr

    if not capabilities.ui_tabs_need_own_tab():
        return []
    with gr.Blocks(analytics_enabled=False) as tab, gr.Tabs(elem_id="sdtrain_tabs"):
        build_all_tabs(_ui_context())
    return [(tab, "Train (sdtrain)", "sdtrain_tab")]


def on_app_started(_demo, app):
    runtime.remember_app(app)
    runtime.log_host()
    if runtime.sdtrain_api_disabled():
        return
    mount(app, runtime.service(), ApiOptions(defaults=runtime.job_defaults, credentials=runtime.api_credentials(),
                                             host_routes=runtime.serve_host_routes(), refresh=runtime.refresh_lists,
                                             write_policy=runtime.write_policy, host_report=runtime.host_report))


if hasattr(script_callbacks, "on_ui_train_tabs"):
    script_callbacks.on_ui_train_tabs(on_ui_train_tabs)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(runtime.register_settings)
script_callbacks.on_before_ui(runtime.before_ui)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_model_loaded(runtime.model_loaded)
