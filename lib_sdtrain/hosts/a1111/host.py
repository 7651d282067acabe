"""Host(A1111): the TrainingHost port over the webui's loaded checkpoint and its hijack.

Everything goes through the webui's own objects — `shared.sd_model`, the hijacked text encoder
and `sd_hijack.model_hijack.embedding_db` (so a trained embedding is spliced by the host's own
code), `shared.state` (progress bar, /sdapi/v1/progress, Interrupt), `call_queue.queue_lock`
(generation waits for a job), `processing` (previews). Every change is undone on exit.
"""

from __future__ import annotations

import contextlib
import html
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.formats.embedding import SINGLE, spread_rows
from lib_sdtrain.core.hypernetwork.attach import attach_hypernetworks
from lib_sdtrain.core.port import (
    ImageSize,
    LatentDist,
    ModelInfo,
    NoiseSchedule,
    PreviewRequest,
    SessionOptions,
    TextEncoderInfo,
)
from lib_sdtrain.core.training.embedding_norm import typical_norm
from lib_sdtrain.hosts.a1111 import checkpointing

log = logging.getLogger(__name__)


def _modules():
    """The webui's modules, imported on use (this file is importable outside a webui for linting)."""
    from modules import call_queue, devices, processing, sd_hijack, shared
    from modules.textual_inversion import textual_inversion

    return call_queue, devices, processing, sd_hijack, shared, textual_inversion


_GPU_LOCK = threading.local()


@contextlib.contextmanager
def gpu_lock() -> Iterator[None]:
    """The webui's GPU lock (`call_queue.queue_lock`, not reentrant), marked held in this thread so
    that code under it knows not to take it again (holds_gpu_lock)."""
    from modules import call_queue

    with call_queue.queue_lock:
        _GPU_LOCK.held = True
        try:
            yield
        finally:
            _GPU_LOCK.held = False


def holds_gpu_lock() -> bool:
    return getattr(_GPU_LOCK, "held", False)


def clear_cond_caches() -> None:
    """The host caches prompt conditionings across generations (opts.persistent_cond_cache); a
    trained embedding changes what a prompt means, so the cache must go (A1111 issue #11993). Forge's
    entries have a third slot (infotext parameters): the length stays as the host made it."""
    from modules import processing

    cls = processing.StableDiffusionProcessing
    cls.cached_c = [None] * max(2, len(getattr(cls, "cached_c", None) or ()))
    cls.cached_uc = [None] * max(2, len(getattr(cls, "cached_uc", None) or ()))


def captioner_status() -> dict[str, str]:
    """For each captioner, "" when its model files are on disk, else what is missing."""
    import importlib.util
    import os

    from modules import paths, shared

    def has(folder: str, ext: str) -> bool:
        return os.path.isdir(folder) and any(f.endswith(ext) for f in os.listdir(folder))

    blip_dir = os.path.join(paths.models_path, "BLIP")
    clip_dir = getattr(shared.cmd_opts, "clip_models_path", None) or os.path.expanduser("~/.cache/clip")
    # webuis that removed the interrogators (Forge Classic: no modules/interrogate.py, modules/deepbooru.py)
    status = {name: "" if importlib.util.find_spec(f"modules.{module}") else f"this webui has no {module}.py"
              for name, module in (("blip", "interrogate"), ("deepbooru", "deepbooru"))}
    if status["blip"]:
        pass  # no interrogator: model files would not help
    elif not has(blip_dir, ".pth"):
        status["blip"] = f"no BLIP model in {blip_dir}"
    elif not os.path.isfile(os.path.join(clip_dir, "ViT-L-14.pt")):
        status["blip"] = f"no CLIP ViT-L/14 model in {clip_dir}"
    deepbooru_dir = os.path.join(paths.models_path, "torch_deepdanbooru")
    if not status["deepbooru"] and not has(deepbooru_dir, ".pt"):
        status["deepbooru"] = f"no DeepBooru model in {deepbooru_dir}"
    return status


def _sdxl_text_wrappers(m) -> list[tuple[str, Any]]:
    """SDXL's hijacked text embedders as (Embedding.vectors key, wrapper): the key is the one the
    host's EmbeddingsWithFixes reads from a dict `vec` (its `textual_inversion_key`: clip_l, clip_g)."""
    out = []
    for embedder in m.conditioner.embedders:
        if not hasattr(embedder, "encode_embedding_init_text"):
            continue  # the size embedders
        key = next((mod.textual_inversion_key for mod in embedder.modules()
                    if hasattr(mod, "textual_inversion_key")), None)
        if key is not None:
            out.append((key, embedder))
    return out


def _token_table(text_model: torch.nn.Module) -> torch.Tensor:
    """The token-embedding weight under the host's splice (EmbeddingsWithFixes.wrapped, or a
    TextualInversionEmbeddings table itself)."""
    for mod in text_model.modules():
        if hasattr(mod, "textual_inversion_key"):
            table = getattr(mod, "wrapped", mod)
            if isinstance(getattr(table, "weight", None), torch.Tensor):
                return table.weight
    raise SdtrainError(f"found no token-embedding table in {type(text_model).__name__}")


@contextlib.contextmanager
def _trainable_conditioner(m) -> Iterator[None]:
    """sgm's GeneralConditioner runs every embedder not marked trainable under no_grad, which would
    cut the live vectors off from the loss; mark the two text wrappers trainable while inside (their
    weights stay frozen). ucg_rate 0, as the host's own get_learned_conditioning sets it."""
    saved = [(e, getattr(e, "is_trainable", False), getattr(e, "ucg_rate", None)) for e in m.conditioner.embedders]
    try:
        for e, _, _ in saved:
            e.ucg_rate = 0.0
        for _, e in _sdxl_text_wrappers(m):
            e.is_trainable = True
        yield
    finally:
        for e, trainable, ucg in saved:
            e.is_trainable = trainable
            if ucg is None:
                e.__dict__.pop("ucg_rate", None)
            else:
                e.ucg_rate = ucg


_MISSING = object()


@contextlib.contextmanager
def _loaded_hypernetworks(value: list) -> Iterator[None]:
    """`shared.loaded_hypernetworks` = value while inside, as it was afterwards; on a webui without the
    attribute (Forge Classic removed hypernetworks) nothing is added to its module."""
    from modules import shared

    previous = shared.__dict__.get("loaded_hypernetworks", _MISSING)
    if previous is _MISSING:
        yield
        return
    shared.loaded_hypernetworks = value
    try:
        yield
    finally:
        shared.loaded_hypernetworks = previous


@contextlib.contextmanager
def residuals_usable_by_autograd(unet: torch.nn.Module) -> Iterator[bool]:
    """Probe the UNet's transformer blocks under autograd (one small forward and backward); where they
    add attention outputs into the residual in place after a LayerNorm saved it (Forge Classic's
    ldm_patched BasicTransformerBlock: `x += n`), hand norm1/norm2 a clone while inside, and check
    again. Yields whether clones were needed. An UNet that still fails is refused with what to report."""
    from lib_sdtrain.hosts.a1111 import capabilities
    from lib_sdtrain.hosts.forge.trainable import (
        out_of_place_residuals,
        residual_in_place,
        transformer_blocks,
    )

    blocks = transformer_blocks(unet)
    if not blocks:
        yield False
        return
    cls = type(blocks[0])
    name = f"{cls.__module__}.{cls.__qualname__}"
    verdict = residual_in_place(blocks[0])
    if not verdict:
        capabilities.record_autograd(f"{name}: out-of-place residuals, nothing to do" if verdict is False else
                                     f"{name}: could not be probed (unknown block signature); trained as it is")
        yield False
        return
    with out_of_place_residuals(unet, cls):
        if residual_in_place(blocks[0]):
            raise SdtrainError(f"this webui's UNet ({name}) modifies tensors autograd needs in place, beyond the "
                               "LayerNorm inputs sdtrain can protect: training cannot backpropagate through it")
        capabilities.record_autograd(f"{name}: adds into its residual in place; sdtrain hands norm1/norm2 a clone "
                                     "while training")
        yield True


@contextlib.contextmanager
def checkpointing_built_in_off(unet: torch.nn.Module) -> Iterator[None]:
    """The checkpointing the webui built the UNet with (ldm's `use_checkpoint`, on in A1111 before v1.10)
    off while training: its backward needs the frozen weights to require grad. Noted in the probe's answer."""
    from lib_sdtrain.hosts.a1111 import capabilities

    with checkpointing.own_checkpointing_off(unet) as blocks:
        if blocks:
            capabilities.record_checkpointing(
                f"the webui built {blocks} UNet blocks with the model code's own (reentrant) checkpointing, which "
                "cannot backpropagate past frozen weights: off while training (sdtrain's gradient checkpointing "
                "option replaces it)")
        yield


def is_sd2(m) -> bool:
    """SD2 (OpenCLIP text encoder): the webui's flag, or what its text encoder is. reForge sets `is_sd2`
    from `hasattr(cond_stage_model, "model")` on the hijack wrapper, which has no `model`
    (modules_forge/forge_loader.py:523), so a real SD2 reads as SD1 there; the wrapped embedder says it."""
    if getattr(m, "is_sd2", False):
        return True
    cond = getattr(m, "cond_stage_model", None)
    return type(getattr(cond, "wrapped", cond)).__name__ == "FrozenOpenCLIPEmbedder"


def host_applies_hypernetworks(unet: torch.nn.Module) -> bool:
    """Whether the host's attention forward applies `shared.loaded_hypernetworks`: A1111 replaces the
    forward of ldm's and sgm's CrossAttention with its own (modules.sd_hijack_optimizations, or
    modules.hypernetworks.hypernetwork when optimizations are off), each of which applies them."""
    for module in unet.modules():
        if hasattr(module, "to_k") and hasattr(module, "to_v"):
            return getattr(type(module).forward, "__module__", "").startswith("modules.")
    return False


class A1111Session:
    def __init__(self, label: str):
        self.label = label

    def report(self, step: int, total: int, text: str) -> None:
        from modules import shared

        shared.state.job_count = total
        shared.state.job_no = step
        shared.state.textinfo = f"<p>sdtrain {html.escape(self.label)}: {html.escape(text)}</p>"

    def interrupted(self) -> bool:
        from modules import shared

        return bool(shared.state.interrupted)


class A1111Host:
    """Implements `lib_sdtrain.core.port.TrainingHost` over whatever checkpoint the webui has loaded."""

    def __init__(self) -> None:
        self._inpaint_cache: dict[tuple, torch.Tensor] = {}
        self._hypernetworks: list[Any] = []

    # -- the model -------------------------------------------------------------------------------
    @staticmethod
    def model():
        from modules import shared

        m = shared.sd_model
        if m is None:
            raise SdtrainError("no checkpoint is loaded in the webui")
        if getattr(m, "is_sd3", False):
            raise SdtrainError("training on SD3 checkpoints is not supported; load an SD1.x, SD2.x or SDXL checkpoint")
        if getattr(m, "is_sdxl", False):
            if len(_sdxl_text_wrappers(m)) != 2:
                raise SdtrainError("the loaded SDXL checkpoint is a refiner (one text encoder); train on an SDXL base model")
            if getattr(m, "is_sdxl_inpaint", False):
                raise SdtrainError("training on SDXL inpainting checkpoints is not supported yet")
        if not hasattr(m, "apply_model") or not hasattr(m, "cond_stage_model"):
            raise SdtrainError("the loaded model is not an ldm LatentDiffusion or sgm DiffusionEngine; this webui is not supported")
        return m

    def describe(self) -> ModelInfo:
        _, devices, _, _, shared, _ = _modules()
        m = self.model()
        info = getattr(m, "sd_checkpoint_info", None)
        if getattr(m, "is_sdxl", False):
            family = "sdxl"
            encoders = tuple(TextEncoderInfo(key, int(w.encode_embedding_init_text(",", 1).shape[1]))
                             for key, w in _sdxl_text_wrappers(m))
        else:
            family = "sd2" if is_sd2(m) else "sd1"
            encoders = (TextEncoderInfo(SINGLE, int(m.cond_stage_model.encode_embedding_init_text(",", 1).shape[1])),)
        autocast = None
        if devices.device.type == "cuda" and devices.dtype != torch.float32 and not shared.cmd_opts.no_half:
            autocast = devices.dtype
        return ModelInfo(
            family=family,
            checkpoint_name=getattr(info, "model_name", "") or "",
            checkpoint_hash=(info.calculate_shorthash() or "") if info is not None else "",
            text_encoders=encoders,
            device=devices.device,
            autocast_dtype=autocast,
        )

    def noise_schedule(self) -> NoiseSchedule:
        m = self.model()
        alphas = m.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        return NoiseSchedule(alphas, "v" if getattr(m, "parameterization", "eps") == "v" else "eps")

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        _, devices, _, _, _, _ = _modules()
        m = self.model()
        scale = float(m.scale_factor)
        if not getattr(m, "is_sdxl", False) and not hasattr(m, "forge_objects"):
            with torch.no_grad(), devices.autocast():  # ldm: the posterior itself
                dist = m.encode_first_stage(pixels.to(devices.device, devices.dtype_vae))
            return LatentDist(dist.mean.float() * scale, dist.std.float() * scale)
        # sgm's encode_first_stage (SDXL), like reForge's replacement of it, hands back one scaled
        # sample; the posterior as both AutoencoderKLs define it (encoder, quant_conv, log-variance
        # clamped to [-30, 20]), on the VAE's own device and dtype, without autocast
        vae = m.first_stage_model
        weight = next(vae.parameters())
        with torch.no_grad():
            moments = vae.quant_conv(vae.encoder(pixels.to(weight.device, weight.dtype)))
        return LatentDist.from_moments(moments, scale, devices.device)

    def encode_text(self, prompts: list[str], sizes: list[ImageSize] | None = None) -> Any:
        # the hijacked encoder tokenizes with the host's rules and splices every registered
        # embedding, ours included (modules/sd_hijack_clip.py, sd_hijack.EmbeddingsWithFixes)
        m = self.model()
        if not getattr(m, "is_sdxl", False):
            return m.cond_stage_model(prompts)
        # SDXL: the batch the host's get_learned_conditioning builds (modules/sd_models_xl.py), but
        # with each image's own size conditioning instead of one width/height for all
        _, devices, _, _, _, _ = _modules()
        if sizes is None:
            sizes = [ImageSize.plain(1024, 1024)] * len(prompts)

        def pairs(values: list[tuple[int, int]]) -> torch.Tensor:
            return torch.tensor(values, device=devices.device, dtype=devices.dtype)

        batch = {"txt": list(prompts),
                 "original_size_as_tuple": pairs([s.original_size for s in sizes]),
                 "crop_coords_top_left": pairs([s.crop_top_left for s in sizes]),
                 "target_size_as_tuple": pairs([s.target_size for s in sizes]),
                 "aesthetic_score": torch.full((len(prompts), 1), 6.0, device=devices.device, dtype=devices.dtype)}
        with _trainable_conditioner(m):
            return m.conditioner(batch, force_zero_embeddings=[])

    def _inpaint_conditioning(self, x_t: torch.Tensor) -> torch.Tensor:
        """What an inpainting UNet takes besides the noisy latents: the whole image masked, as the
        host's trainer and txt2img give it (processing.txt2img_image_conditioning): a mask channel of
        ones and the latent of a mid-grey image. The latent is the VAE's posterior *mean*, where the
        host draws a sample (get_first_stage_encoding) from torch's global RNG: that made a seeded
        run unrepeatable on inpainting models and moved the webui's RNG stream. Once per latent size."""
        key = (tuple(x_t.shape[2:]), x_t.dtype, x_t.device)
        if key not in self._inpaint_cache:
            grey = torch.zeros((1, 3, x_t.shape[-2] * 8, x_t.shape[-1] * 8))  # 0 is mid-grey in [-1, 1]
            latent = self.encode_images(grey).mean.to(x_t.device, x_t.dtype)
            self._inpaint_cache = {key: torch.nn.functional.pad(latent, (0, 0, 0, 0, 1, 0), value=1.0)}
        return self._inpaint_cache[key].expand(x_t.shape[0], -1, -1, -1)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        m = self.model()
        if getattr(m, "is_sdxl", False):  # DiffusionEngine.apply_model: the UNet on {crossattn, vector}
            return m.apply_model(x_t, t, cond).float()
        if m.model.conditioning_key in {"hybrid", "concat"}:  # inpainting checkpoints
            cond = {"c_concat": [self._inpaint_conditioning(x_t)], "c_crossattn": [cond]}
        return m.apply_model(x_t, t, cond).float()

    def initial_vectors(self, init_text: str, n_vectors: int) -> dict[str, torch.Tensor]:
        """The host's create_embedding (modules/textual_inversion/textual_inversion.py)."""
        _, devices, _, _, _, _ = _modules()
        m = self.model()
        if getattr(m, "is_sdxl", False):
            # per encoder, the same spread; the host's own create_embedding fails on SDXL
            # (it calls the conditioner with a list), so there is no host rule to follow beyond it
            with torch.no_grad(), devices.autocast():
                m.get_learned_conditioning([""])  # moves the encoders to the GPU under --medvram
                embedded = {key: w.encode_embedding_init_text(init_text or "*", n_vectors)
                            for key, w in _sdxl_text_wrappers(m)}
        else:
            cond_model = m.cond_stage_model
            with torch.no_grad(), devices.autocast():
                cond_model([""])  # moves the text encoder to the GPU under --medvram/--lowvram
                embedded = {SINGLE: cond_model.encode_embedding_init_text(init_text or "*", n_vectors)}
        return {key: spread_rows(rows if init_text else None, n_vectors, int(rows.shape[1]))
                for key, rows in embedded.items()}

    def token_embedding_norms(self) -> dict[str, float]:
        """The median row norm of each text encoder's token-embedding table: the table the host's
        EmbeddingsWithFixes wraps (the module carrying `textual_inversion_key`)."""
        m = self.model()
        if getattr(m, "is_sdxl", False):
            return {key: typical_norm(_token_table(w)) for key, w in _sdxl_text_wrappers(m)}
        return {SINGLE: typical_norm(_token_table(m.cond_stage_model))}

    # -- reversible state ------------------------------------------------------------------------
    @contextlib.contextmanager
    def use_embedding(self, name: str, vectors: dict[str, torch.Tensor]) -> Iterator[None]:
        """Register the live vectors in the host's embedding database under `name`; the entry it
        had before (if any) comes back on exit."""
        _, _, _, sd_hijack, _, ti = _modules()
        m = self.model()
        db = sd_hijack.model_hijack.embedding_db
        if getattr(m, "is_sdxl", False):  # the host's SDXL form: vec = {"clip_l": ..., "clip_g": ...}
            vec: Any = dict(vectors)
            emb = ti.Embedding(vec, name)
            emb.vectors = int(vectors["clip_l"].shape[0])
            emb.shape = sum(int(v.shape[1]) for v in vectors.values())
        else:
            vec = vectors[SINGLE]
            emb = ti.Embedding(vec, name)
            emb.vectors, emb.shape = int(vec.shape[0]), int(vec.shape[1])
        previous = db.word_embeddings.get(name)
        db.register_embedding_by_name(emb, m, name)
        clear_cond_caches()
        try:
            yield
        finally:
            db.register_embedding_by_name(previous, m, name)
            clear_cond_caches()

    @contextlib.contextmanager
    def use_hypernetwork(self, hypernetworks: list[Any]) -> Iterator[None]:
        """Make exactly these hypernetworks active through the host's own mechanism:
        `shared.loaded_hypernetworks`, which every attention forward of the host applies
        (modules/hypernetworks/hypernetwork.py, apply_hypernetworks). Our objects have the host's
        `layers` shape ({context width: (k module, v module)}), so the host runs them as they are.
        Where the host's attention does not apply them (reForge: its UNet is ldm_patched's and its
        calls to apply_hypernetworks are commented out), they are attached by hooks instead
        (core.hypernetwork.attach), for training and previews alike."""
        unet = self.model().model.diffusion_model
        by_host = host_applies_hypernetworks(unet)
        attach = contextlib.nullcontext() if by_host else attach_hypernetworks(unet, list(hypernetworks))
        self._hypernetworks = list(hypernetworks)
        clear_cond_caches()
        try:
            with _loaded_hypernetworks(list(hypernetworks) if by_host else []), attach:
                yield
        finally:
            self._hypernetworks = []

    @contextlib.contextmanager
    def gpu_session(self, label: str, options: SessionOptions) -> Iterator[A1111Session]:
        call_queue, _, _, sd_hijack, shared, _ = _modules()
        with call_queue.queue_lock:  # generation requests wait for the job, and the job for them
            m = self.model()
            shared.state.begin(job=f"sdtrain-{label}")
            shared.state.textinfo = f"sdtrain: {label}"
            flags = [(p, p.requires_grad) for p in m.parameters()]
            # reForge has no undo_optimizations (its sd_hijack keeps the attention as it is)
            undo_attention = not options.attention_optimization and hasattr(sd_hijack, "undo_optimizations")
            try:
                # the host computes UNet and CLIP weight gradients it never uses; we freeze them
                for p, _ in flags:
                    p.requires_grad_(False)
                if undo_attention:
                    sd_hijack.undo_optimizations()
                unet = m.model.diffusion_model
                # the prompt's <hypernet:...> must not leak into TI
                with _loaded_hypernetworks([]), checkpointing_built_in_off(unet), \
                        residuals_usable_by_autograd(unet) as cloned, \
                        checkpointing.enabled(options.gradient_checkpointing, unet, clone_input=cloned):
                    yield A1111Session(label)
            finally:
                if undo_attention:
                    sd_hijack.apply_optimizations()
                for p, flag in flags:
                    p.requires_grad_(flag)
                self._inpaint_cache = {}
                clear_cond_caches()
                shared.state.interrupted = False
                shared.state.end()

    def captioners(self) -> dict[str, Any]:
        """BLIP and DeepBooru through the host's interrogators, each only when its model files are on
        disk: the host would otherwise download them mid-run (modules/interrogate.py, deepbooru.py)."""
        _, _, _, _, shared, _ = _modules()
        out: dict[str, Any] = {}
        if not captioner_status()["blip"]:
            def blip(image: Image.Image) -> str:
                shared.interrogator.load()
                try:
                    return shared.interrogator.generate_caption(image.convert("RGB"))
                finally:
                    shared.interrogator.send_blip_to_ram()

            out["blip"] = blip
        if not captioner_status()["deepbooru"]:
            from modules import deepbooru

            def tags(image: Image.Image) -> str:
                deepbooru.model.start()
                try:
                    return deepbooru.model.tag_multi(image.convert("RGB"))
                finally:
                    deepbooru.model.stop()

            out["deepbooru"] = tags
        return out

    def render_preview(self, request: PreviewRequest) -> Image.Image | None:
        """A txt2img through the host's own processing, with the live embedding in place."""
        _, _, processing, _, shared, _ = _modules()
        m = self.model()
        saved = {k: getattr(shared.state, k) for k in ("job", "job_count", "job_no", "textinfo",
                                                       "sampling_step", "sampling_steps")}
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=m,
            do_not_save_grid=True,
            do_not_save_samples=True,
            do_not_reload_embeddings=True,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            steps=request.steps,
            sampler_name=request.sampler_name,
            cfg_scale=request.cfg_scale,
            seed=request.seed,
            width=request.width,
            height=request.height,
        )
        # no script runs in a preview, but reForge's processing reads p.scripts.alwayson_scripts
        # unconditionally (modules/processing.py, process_images_inner): an empty runner, not None
        from modules import scripts

        p.scripts, p.script_args = scripts.ScriptRunner(), []
        if self._hypernetworks:
            # the host's <hypernet:...> handler would replace loaded_hypernetworks at activation
            # (the host's own hypernetwork trainer disables extra networks for previews too)
            p.disable_extra_networks = True
        clear_cond_caches()
        try:
            with contextlib.closing(p), torch.no_grad():
                processed = processing.process_images(p)
        finally:
            for k, v in saved.items():
                setattr(shared.state, k, v)
            clear_cond_caches()
        image = processed.images[0] if processed.images else None
        if image is not None:
            shared.state.assign_current_image(image)
        return image
