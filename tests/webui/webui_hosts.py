"""The webuis the host-contract suite runs in, as data: one `HostSpec` per host.

A spec says how to start the host, which model files it needs, and which capabilities it claims.
Tests state what they need with `@pytest.mark.needs("capability", ...)`; conftest marks a test
that the selected host cannot pass as skipped *with the host's reason*, and fails a test whose
capability the host neither claims nor declines (so a new capability cannot be skipped silently).

The host under test is `SDTRAIN_WEBUI_HOST` (set by `tools/webui.sh`; default a1111).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: Every capability a test may ask for, with what it means.
CAPABILITIES = {
    "sd1": "trains SD1 embeddings and hypernetworks through sdtrain's routes, tabs and jobs",
    "train_tab": "the host has a Train tab: sdtrain's sub-tabs go inside it",
    "sd2": "loads an SD2 checkpoint (OpenCLIP text encoder, v-prediction) that sdtrain trains",
    "sd2_tiny_prompt": "uses the tiny SD2's (64-wide) embedding files in prompts",
    "inpainting": "loads an SD1 inpainting checkpoint (9-channel UNet, hybrid conditioning)",
    "sdxl": "loads an SDXL base checkpoint (sgm DiffusionEngine, CLIP-L + CLIP-G) that sdtrain trains",
    "stock_trainer": "the host's own (in-tree) embedding trainer runs, to exchange files with it",
    "stock_hypernetwork_trainer": "the host's own (in-tree) hypernetwork trainer runs, to exchange files with it",
    "hypernetwork_prompt": "the host applies `<hypernet:name:m>` in generation",
    "preprocess": "sdtrain's preprocess route and sub-tab",
    "toyworld_sd1": "loads the SD1 toy world (a trained model of its own small architecture, from its yaml)",
    "toyworld_sdxl": "loads the SDXL toy world (a trained sgm DiffusionEngine of its own small architecture)",
}


@dataclass(frozen=True)
class HostSpec:
    name: str
    title: str
    #: host-specific flags added to the shared start command (CPU, offline, API, data dir, model)
    launch_args: tuple[str, ...]
    #: the SD1 model this host's detector accepts: "tiny" (a tiny random SD1 and its yaml), "full" (a
    #: random SD1.5 at its real shapes) or "registered" (the tiny SD1, its shapes registered with the
    #: host's detector by a test-only extension)
    sd1_model: str
    claims: frozenset[str]
    #: capability → why this host cannot pass tests needing it
    cannot: dict[str, str] = field(default_factory=dict)
    #: the host reads the CLIP tokenizer/config by hub name from HF_HOME (offline cache layout)
    clip_in_hf_cache: bool = True
    #: the log line that says the server is ready for requests
    ready_line: str = "Startup time:"
    #: settings (config.json entries) every server of this host starts with; a server's own win
    settings: dict = field(default_factory=dict)
    #: how the host's infotext names an embedding a prompt used (`{name}`, a regex): A1111 writes its
    #: hash (modules/processing.py), Forge only its name (backend/text_processing/classic_engine.py)
    embedding_infotext: str = r'TI hashes: "[^"]*{name}: [0-9a-f]{{12}}'
    #: /sdapi/v1/embeddings reports files of another width as "skipped" (A1111's list knows the model's
    #: width; Forge's API list never learns it: modules/textual_inversion/textual_inversion.py keeps
    #: expected_shape -1 there, and only its text engines' lists skip them)
    api_lists_skipped_embeddings: bool = True
    #: the log line that says the model was built as the test meant (`{config}`: the yaml's name, escaped)
    model_log: str = r"Creating model from config: \S*{config}"
    #: log lines the host prints for every model of a kind, which are not problems (assert_clean_log)
    known_log_lines: tuple[str, ...] = ()
    #: the host lists hypernetworks itself (/sdapi/v1/hypernetworks) and has their cards page; where it
    #: removed hypernetworks, sdtrain's /sdtrain/v1/refresh lists them and `<hypernet:...>` still works
    hypernetwork_pages: bool = True
    #: the model code sdtrain's start-up probe must find (lib_sdtrain/hosts/a1111/capabilities.py); None:
    #: not known beforehand (an untried webui), the probe's answer is what the tests go by
    model_stack: str | None = "ldm/sgm"
    #: the signal a user or service manager ends this host with in the restart test
    shutdown_signal: str = "SIGINT"
    #: tests this host runs only with SDTRAIN_WEBUI_FULL=1 (test name -> what already shows the same in the
    #: default run): they pass here, and CI's time goes to what only this host can show
    full_run_only: dict[str, str] = field(default_factory=dict)

    def names_embedding(self, infotext: str, name: str) -> bool:
        import re

        return re.search(self.embedding_infotext.format(name=re.escape(name)), infotext) is not None

    def verdict(self, capability: str) -> str | None:
        """None when the host claims `capability`; else why a test needing it cannot run here."""
        if capability not in CAPABILITIES:
            raise KeyError(f"unknown capability {capability!r} (known: {', '.join(CAPABILITIES)})")
        if capability in self.claims:
            return None
        if capability in self.cannot:
            return f"{self.title} cannot: {self.cannot[capability]}"
        raise LookupError(f"{self.title} neither claims nor declines capability {capability!r}: "
                          "add it to its spec in tests/webui/hosts.py")


A1111 = HostSpec(
    name="a1111",
    title="AUTOMATIC1111 v1.10.1",
    launch_args=("--skip-prepare-environment", "--skip-version-check", "--use-cpu", "all", "--no-half",
                 "--precision", "full", "--skip-torch-cuda-test", "--no-download-sd-model"),
    sd1_model="tiny",
    claims=frozenset(CAPABILITIES),
)

#: The SDXL tests the ldm_patched webuis (reForge, Forge Classic) run only in a full run: the adapter code they
#: exercise is the same as in those webuis' SDXL TI test and in A1111's and Forge's SDXL runs
LDM_PATCHED_SDXL_FULL_RUN_ONLY = {
    "test_sdxl_job_matches_the_standalone_conditioning": "the SDXL TI test trains both encoders through this webui's "
    "CLIP path; A1111 and Forge check the losses against the standalone host",
    "test_sdxl_encoder_rate_and_norm_limit_in_the_webui": "core options, checked in A1111 and Forge",
    "test_sdxl_buckets_and_a_held_out_split_match_the_standalone_host": "core bucketing, checked in A1111 and Forge",
    "test_sdxl_interrupt_stops_within_a_step_and_keeps_a_loadable_file": "this webui's SD1 interrupt test (the same "
    "progress bar and Interrupt)",
    "test_sdxl_hypernetwork_job_matches_the_standalone_host": "the SDXL hypernetwork test (trained and applied in a "
    "prompt here); A1111 and Forge check its losses against the standalone host",
}

#: reForge (Panchovix/stable-diffusion-webui-reForge, main 3b56b268): A1111's front end (gradio 3.41,
#: pydantic 1, the Train tab, the stock trainer and its routes) over a ComfyUI-derived backend
#: (ldm_patched/, modules_forge/): the model comes from ldm_patched's detector, and the A1111-side
#: LatentDiffusion built from the yaml only holds it (modules_forge/forge_loader.py:387-553).
REFORGE = HostSpec(
    name="reforge",
    title="reForge 3b56b268",
    # --always-cpu is reForge's own (ldm_patched) flag: without it ldm_patched/modules/model_management.py
    # asks CUDA for the device at import (torch.cuda.current_device(), line 173). --clip-in-fp32: on the
    # CPU the text encoder is otherwise kept in fp16 (model_management.py:919-920); --no-half/--precision
    # full are A1111's and barely read here, the UNet and VAE are fp32 on the CPU anyway.
    launch_args=("--skip-prepare-environment", "--skip-version-check", "--use-cpu", "all", "--always-cpu",
                 "--clip-in-fp32", "--no-half", "--precision", "full", "--skip-torch-cuda-test",
                 "--no-download-sd-model"),
    # The detector takes no tiny SD1 by itself: SD15 matches only model_channels 320 + context_dim 768
    # (ldm_patched/modules/supported_models.py:30-37, matched in supported_models_base.py:41-49; "no match"
    # in model_detection.py:608-614, then forge_loader.py:246-252 and :231 "Could not detect model
    # type"), and the VAE and CLIP-L are built at fixed SD shapes whatever the file holds
    # (ldm_patched/modules/sd.py:395-406; sd1_clip.py:95-96 with sd1_clip_config.json, 12 x 768). A
    # test-only extension registers the tiny SD1 with the detector's model list (its CLIP from the tiny
    # config) and, the one place with no extension point, rebinds forge_loader.VAE to a subclass that
    # passes the tiny VAE config for that model only (tests/webui/ldm_patched_tiny.py). sd1_model="full" (a
    # random SD1.5 at real shapes through the unmodified loader) also passes, at ~4x the suite time.
    sd1_model="registered",
    # live previews would download the SD1 Approx-NN model (reForge ships only vaeapprox-sdxl.pt;
    # modules/sd_vae_approx.py:53-59). The stock trainer's routes call sd_hijack.undo_optimizations(),
    # which reForge commented out (modules/sd_hijack.py:63-64; modules/api/api.py:812, :834), unless
    # "Use cross attention optimizations while training" is on.
    settings={"live_previews_enable": False, "training_xattention_optimizations": True},
    # <hypernet:...>: reForge loads them but never applies them (A1111's attention overrides are commented
    # out: modules/sd_hijack_optimizations.py:44-47, 186, ...); sdtrain's always-on script applies them
    # through the UNet patcher (lib_sdtrain/hosts/forge/generation.py)
    claims=frozenset({"sd1", "train_tab", "stock_trainer", "preprocess", "hypernetwork_prompt", "sd2",
                      "sd2_tiny_prompt", "sdxl"}),
    shutdown_signal="SIGTERM",
    model_stack="ldm_patched",
    full_run_only=LDM_PATCHED_SDXL_FULL_RUN_ONLY,
    # reForge builds the A1111 shell from the yaml and prints no "Creating model from config"; the yaml's
    # v-prediction is what it reports (modules_forge/forge_loader.py:510-511)
    model_log=r"LatentDiffusion: Running in v-prediction mode",
    # SDClipModel keeps its own identity `text_projection` (ldm_patched/modules/sd1_clip.py), which no SD2 file
    # fills (the OpenCLIP projection lands in `clip_h.transformer.text_projection`); SD2 never uses the
    # projected pooled output. reForge logs it for every SD2 file, as "clip missing: [...logit_scale]" for SD1
    known_log_lines=("WARNING:root:clip missing: ['clip_h.text_projection']",),
    cannot={
        "toyworld_sd1": "the detector takes only registered shapes (tiny SD1, SD2, SDXL); registering the toy world's own UNet/VAE sizes with it is not built yet",
        "toyworld_sdxl": "the detector takes only registered shapes (tiny SD1, SD2, SDXL); registering the toy world's own UNet/VAE sizes with it is not built yet",
        "stock_hypernetwork_trainer": "reForge's in-tree hypernetwork trainer trains through the attention that no longer "
                                      "applies hypernetworks (modules/sd_hijack_optimizations.py:44-47, 186, ...)",
        "inpainting": "the detector takes SD1.5 inpainting only at real shapes; registering the tiny inpainting model "
                      "as the tiny SD1 is not built yet",
    },
)

#: Forge (lllyasviel/stable-diffusion-webui-forge, dfdcbab6): its own backend (backend/, huggingface_guess),
#: gradio 4.40 / pydantic 2 / fastapi 0.104, no Train tab, training code removed. sdtrain's adapter:
#: lib_sdtrain/hosts/forge.
FORGE = HostSpec(
    name="forge",
    title="Forge dfdcbab6",
    # --always-cpu: Forge's own flag (backend/args.py); without it its memory manager asks CUDA for the
    # device. --skip-install: the built-in extensions' extra packages (mediapipe, onnxruntime...) stay
    # absent, nothing needs them at start-up. A1111's --no-half/--precision full are inert here; on the
    # CPU the UNet and VAE are fp32, and CLIP is stored fp16 unless --clip-in-fp32 (Forge's flag, so the
    # SDXL conditioning can be compared with the fp32 standalone reference).
    launch_args=("--skip-prepare-environment", "--skip-install", "--skip-version-check", "--use-cpu", "all",
                 "--always-cpu", "--clip-in-fp32", "--skip-torch-cuda-test", "--no-download-sd-model"),
    # huggingface_guess matches SD1.5 and SDXL only at their real shapes (repositories/huggingface_guess/
    # huggingface_guess/model_list.py, SD15/SDXL.unet_config). Its model list is open to extensions: a
    # test-only one registers the tiny SD1's and SDXL's shapes (forge_tiny_sdxl.py), and Forge builds
    # its own StableDiffusion / StableDiffusionXL engines from them. (A random SD1.5 at full size,
    # sd1_model="full", also works, at ~4x this host's suite time on the CPU.)
    sd1_model="registered",
    settings={"live_previews_enable": False},
    # `TI: a, b`, quoted when it holds a comma: an SDXL embedding is named once per text engine
    embedding_infotext=r'TI: "?(?:[^,\n"]+, )*{name}(?:[,"\n]|$)',
    # Forge builds the model from the state dict, not the yaml (backend/loader.py, split_state_dict)
    model_log=r"StateDict Keys: \{{'unet'",
    api_lists_skipped_embeddings=False,
    model_stack="forge backend",
    # the toy worlds: their shapes registered with the detector by a test-only extension (forge_toyworld.py)
    claims=frozenset({"sd1", "hypernetwork_prompt", "preprocess", "sdxl", "sd2", "inpainting", "toyworld_sd1",
                      "toyworld_sdxl"}),
    cannot={
        "train_tab": "Forge has no Train tab (modules/ui.py builds none; on_ui_train_tabs never fires): sdtrain's "
                     "top-level tab holds the same sub-tabs (checked by the same test)",
        "stock_hypernetwork_trainer": "Forge deleted its trainers (see stock_trainer)",
        "sd2_tiny_prompt": "Forge's SD2 text engine takes only 1024-wide embedding files (backend/diffusion_engine/"
                           "sd20.py: embedding_expected_shape=1024, whatever the model's width), so it skips the tiny "
                           "SD2's 64-wide files at prompt time; training on it (sdtrain registers the live vectors "
                           "itself) is checked, a real SD2's 1024-wide files are not affected",
        "stock_trainer": "Forge deleted its trainers (modules/textual_inversion and modules/hypernetworks keep only "
                         "loading code; /sdapi/v1/train/* are gone): there is no stock file to continue",
    },
)

#: Forge Classic (Haoming02/sd-webui-forge-classic, classic 1f95d717): the gradio-3 fork of the old Forge, an
#: A1111 front end (its objects: sd_hijack's embedding database, shared.state, processing) over
#: `ldm_patched`, like reForge; no Train tab, training and hypernetworks removed (no modules/hypernetworks,
#: no --hypernetwork-dir, no `<hypernet:...>`). sdtrain adapts by what it finds (lib_sdtrain/hosts/a1111/
#: capabilities.py): its own tab, its own --hypernetwork-dir and `<hypernet:...>`, clones where the UNet adds
#: into its residual in place.
FORGE_CLASSIC = HostSpec(
    name="forge-classic",
    title="Forge Classic 1f95d717",
    # Forge's line minus --precision full (Classic removed the flag and its parser refuses it); --always-cpu
    # and --clip-in-fp32 are ldm_patched's (ldm_patched/modules/args_parser.py:81, :68): without the latter
    # the CPU text encoder is fp16 (model_management.py:700-701).
    launch_args=("--skip-prepare-environment", "--skip-install", "--skip-version-check", "--use-cpu", "all",
                 "--always-cpu", "--clip-in-fp32", "--no-half", "--skip-torch-cuda-test", "--no-download-sd-model"),
    # the detector takes SD1.5 only at its real shapes; the tiny SD1 is registered with it by a test-only
    # extension, as for reForge (tests/webui/ldm_patched_tiny.py)
    sd1_model="registered",
    # live previews would download the SD1 Approx-NN model
    settings={"live_previews_enable": False},
    hypernetwork_pages=False,
    model_stack="ldm_patched",
    # SD2 here passes (SDTRAIN_WEBUI_FULL=1) and takes a server of its own; CI checks SD2 in reForge's ldm_patched
    full_run_only={**LDM_PATCHED_SDXL_FULL_RUN_ONLY, **dict.fromkeys(
        ("test_sd2_embedding_trains_lists_at_the_openclip_width_and_works_in_a_prompt",
         "test_sd2_embedding_works_in_a_prompt", "test_sd2_embedding_only_fits_its_own_width"),
        "reForge's SD2 tests (the same ldm_patched SD20 model class and the A1111 shell's OpenCLIP wrapper)")},
    # the A1111 shell built from the yaml prints nothing; ldm_patched's loader reports the model type the tiny
    # SD2's class gave (ldm_patched/modules/model_base.py:82)
    model_log=r"\nmodel_type V_PREDICTION\n",
    claims=frozenset({"sd1", "preprocess", "hypernetwork_prompt", "sd2", "sd2_tiny_prompt", "sdxl"}),
    cannot={
        "toyworld_sd1": "the detector takes only registered shapes (tiny SD1, SD2, SDXL); registering the toy world's own UNet/VAE sizes with it is not built yet",
        "toyworld_sdxl": "the detector takes only registered shapes (tiny SD1, SD2, SDXL); registering the toy world's own UNet/VAE sizes with it is not built yet",
        "train_tab": "Forge Classic has no Train tab (modules/ui.py never calls ui_train_tabs_callback): sdtrain's "
                     "top-level tab holds the same sub-tabs (checked by the same test)",
        "stock_trainer": "Forge Classic removed its trainers (modules/textual_inversion keeps loading code only; "
                         "Embedding.save raises 'Training is not supported'): there is no stock file to continue",
        "stock_hypernetwork_trainer": "Forge Classic removed hypernetworks entirely (no modules/hypernetworks)",
        "inpainting": "the detector takes SD1.5 inpainting only at real shapes; registering the tiny inpainting "
                      "model is not built yet",
    },
)

#: A webui sdtrain was never tried in (SDTRAIN_WEBUI_DIR=<its checkout> SDTRAIN_WEBUI_HOST=other, extra start
#: flags in SDTRAIN_WEBUI_ARGS, e.g. "--always-cpu" for an ldm_patched fork): the random SD1.5 at its real
#: shapes (every A1111-family detector takes it), the flags every A1111-family webui knows, and no claims
#: beyond SD1 training: what else it offers (Train tab, `<hypernet:...>`, hypernetwork pages) is what its
#: sdtrain probe says at GET /sdtrain/v1/host, and the tests that depend on it follow that answer.
OTHER = HostSpec(
    name="other",
    title="an untried webui (SDTRAIN_WEBUI_DIR)",
    launch_args=("--skip-prepare-environment", "--skip-version-check", "--use-cpu", "all", "--no-half",
                 "--skip-torch-cuda-test", "--no-download-sd-model", *os.environ.get("SDTRAIN_WEBUI_ARGS", "").split()),
    sd1_model="full",
    settings={"live_previews_enable": False},
    # A1111's hashed form or Forge's names-only form
    embedding_infotext=r'(?:TI hashes: "[^"]*{name}: [0-9a-f]{{12}}|TI: "?(?:[^,\n"]+, )*{name}(?:[,"\n]|$))',
    model_stack=None,
    claims=frozenset({"sd1", "preprocess", "hypernetwork_prompt", "train_tab"}),
    cannot=dict.fromkeys(("sd2", "sd2_tiny_prompt", "inpainting", "sdxl", "stock_trainer", "stock_hypernetwork_trainer",
                          "toyworld_sd1", "toyworld_sdxl"),
                         "not declared for an untried webui: add a HostSpec in tests/webui/webui_hosts.py once known"),
)

HOSTS = {spec.name: spec for spec in (A1111, REFORGE, FORGE, FORGE_CLASSIC, OTHER)}


#: the probe's name for each capability a test may ask a running server about
_PROBED = {"train_tab": "train_tab", "hypernetwork_prompt": "hypernet_prompt", "hypernetwork_pages": "hypernetwork_cards"}


def offers(server, capability: str) -> str | None:
    """None when the host under test offers `capability` (its spec says so; for an untried webui, its
    sdtrain probe at `server`), else why not."""
    host = selected()
    if host.model_stack is not None:
        if capability == "hypernetwork_pages":
            return None if host.hypernetwork_pages else f"{host.title} has no hypernetwork list or cards page"
        return host.verdict(capability)
    return probed(server, _PROBED[capability])


def probed(server, feature: str) -> str | None:
    """For an untried webui: None when its sdtrain probe says `feature` ("train_tab", or a key of the
    report's features) is available, else the probe's reason. Known hosts answer from their spec."""
    _, report = server.get("/sdtrain/v1/host")
    if feature == "train_tab":
        return None if report["train_tab"] else "the webui never called the Train-tab callback"
    item = report["features"][feature]
    return None if item["available"] else item["detail"]


def selected() -> HostSpec:
    name = os.environ.get("SDTRAIN_WEBUI_HOST", "a1111")
    if name not in HOSTS:
        raise KeyError(f"SDTRAIN_WEBUI_HOST={name!r} is not a known host ({', '.join(HOSTS)})")
    return HOSTS[name]
