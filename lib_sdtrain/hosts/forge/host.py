"""Host(Forge): the TrainingHost port over lllyasviel's Forge backend (dfdcbab6; `backend/`).

Forge replaced A1111's ldm model and hijack with its own: the model is a `ForgeDiffusionEngine`
whose parts are patchers (`forge_objects`: UNet, CLIP, VAE), one text-processing engine per text
encoder each with its own embedding database, a memory manager that moves patchers on and off the
GPU, and weights loaded under `torch.inference_mode()`. This adapter trains through those objects
as they are (docs/dev/forge-adapter-notes.md has the host facts with file:line):

- text: each engine is called directly (the model's `get_learned_conditioning` is inference-mode),
  with the live vectors registered in every engine's database, so Forge's own splice puts them in;
- noise prediction: the UNet module itself with the casts of `KModel.apply_model`, on integer
  timesteps, SDXL's `y` vector built per image;
- weights: storage aliases instead of inference tensors, and out-of-place residuals (trainable.py),
  both undone on exit; model weights are never copied;
- session: the GPU lock, the model loaded the way Forge loads it (`forge_model_reload`,
  `load_models_gpu`), `shared.state` for progress and Interrupt.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.formats.embedding import SINGLE, spread_rows
from lib_sdtrain.core.hypernetwork.attach import attach_hypernetworks
from lib_sdtrain.core.port import (
    ImageSize,
    LatentDist,
    ModelInfo,
    NoiseSchedule,
    SessionOptions,
    TextEncoderInfo,
)
from lib_sdtrain.core.training.embedding_norm import typical_norm
from lib_sdtrain.hosts.a1111 import checkpointing
from lib_sdtrain.hosts.a1111.host import A1111Host, A1111Session, clear_cond_caches, gpu_lock, holds_gpu_lock
from lib_sdtrain.hosts.forge.trainable import Aliases, out_of_place_residuals

#: `active` in the thread that runs a job's GPU session (it holds the GPU lock)
_SESSION = threading.local()
#: the engine classes sdtrain trains on, by family (backend/diffusion_engine/*.py)
FAMILIES = {"StableDiffusion": "sd1", "StableDiffusion2": "sd2", "StableDiffusionXL": "sdxl"}


def engines(m) -> list[tuple[str, Any]]:
    """(Embedding.vectors key, text-processing engine) of the loaded model: SD1/SD2 one ("*"), SDXL two."""
    if hasattr(m, "text_processing_engine_l"):
        return [("clip_l", m.text_processing_engine_l), ("clip_g", m.text_processing_engine_g)]
    return [(SINGLE, m.text_processing_engine)]


def _token_weight(engine) -> torch.Tensor:
    """The token-embedding table under Forge's TI wrapper (CLIPEmbeddingForTextualInversion)."""
    emb = engine.text_encoder.transformer.text_model.embeddings.token_embedding
    return getattr(emb, "wrapped", emb).weight


class ForgeHost(A1111Host):
    """Implements `lib_sdtrain.core.port.TrainingHost` over Forge's loaded model. Captioners come
    from the A1111 adapter: Forge kept modules/interrogate.py and deepbooru.py as they were."""

    def __init__(self) -> None:
        super().__init__()
        self._aliases: Aliases | None = None
        self._trainable_text = False

    # -- the model -------------------------------------------------------------------------------
    @staticmethod
    def model():
        """The model a job trains: the checkpoint selected now. Forge loads a newly selected checkpoint
        only when the next generation starts (an options change, the UI's list or the API's, just sets
        its loading parameters), so until then `shared.sd_model` is the previous one; outside a job's
        session it is loaded here, under the GPU lock as processing does (a job started right after a
        switch described the previous model and trained the new one: an SDXL hypernetwork was told the
        model's text width is 768). Inside the session the loaded model stays (the session holds the lock)."""
        from modules import shared

        if not getattr(_SESSION, "active", False) and ForgeHost._selection_not_loaded():
            if holds_gpu_lock():  # a create job runs under the lock (runtime._wrapped_runners)
                ForgeHost._ensure_model_loaded()
            else:
                with gpu_lock():
                    ForgeHost._ensure_model_loaded()
        m = shared.sd_model
        name = type(m).__name__
        if m is None or not hasattr(m, "forge_objects"):
            raise SdtrainError("no checkpoint is loaded in Forge (pick one in the checkpoint list)")
        if name == "StableDiffusionXLRefiner":
            raise SdtrainError("the loaded SDXL checkpoint is a refiner (one text encoder); train on an SDXL base model")
        if name not in FAMILIES:
            raise SdtrainError(f"sdtrain trains SD1, SD2 and SDXL checkpoints; Forge has a {name} loaded")
        return m

    @staticmethod
    def _objects(m):
        """The patchers without LoRA: processing resets `forge_objects` to a LoRA-merged copy of these."""
        return m.forge_objects_original

    def describe(self) -> ModelInfo:
        m = self.model()
        unet = self._objects(m).unet
        family = FAMILIES[type(m).__name__]
        encoders = tuple(TextEncoderInfo(key, int(_token_weight(engine).shape[1])) for key, engine in engines(m))
        cd = unet.model.computation_dtype
        device = torch.device(unet.load_device)
        info = getattr(m, "sd_checkpoint_info", None)
        return ModelInfo(
            family=family,
            checkpoint_name=getattr(info, "model_name", "") or "",
            checkpoint_hash=getattr(m, "sd_model_hash", "") or "",
            text_encoders=encoders,
            device=device,
            autocast_dtype=cd if device.type == "cuda" and cd != torch.float32 else None,
            latent_downscale=int(getattr(self._objects(m).vae, "downscale_ratio", 8)),
        )

    def noise_schedule(self) -> NoiseSchedule:
        predictor = self._objects(self.model()).unet.model.predictor
        kind = getattr(predictor, "prediction_type", "eps")
        if kind not in ("eps", "epsilon", "v_prediction", "v"):
            raise SdtrainError(f"the loaded model predicts {kind!r}; sdtrain trains eps- and v-prediction models")
        alphas = predictor.alphas_cumprod.detach().to("cpu", torch.float32).clone()
        return NoiseSchedule(alphas, "v" if kind.startswith("v") else "eps")

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        from backend import memory_management

        vae = self._objects(self.model()).vae
        memory_management.load_models_gpu([vae.patcher], memory_required=vae.memory_used_encode(
            pixels.shape, vae.vae_dtype))
        model = vae.first_stage_model
        with torch.no_grad():
            mean, std = model.encode(pixels.to(vae.device, vae.vae_dtype), regulation=lambda d: (d.mean, d.std))
        scale, shift = float(model.scaling_factor), float(getattr(model, "shift_factor", 0.0) or 0.0)
        device = self.describe().device
        return LatentDist(((mean.float() - shift) * scale).to(device), (std.float() * scale).to(device))

    # -- text ------------------------------------------------------------------------------------
    def _text_ready(self, m) -> None:
        """The CLIP patcher on its device (as get_learned_conditioning loads it), its tensors usable
        by autograd, Forge's clip-skip setting applied (processing does the same per generation)."""
        from backend import memory_management
        from modules import shared

        clip = self._objects(m).clip
        if not any(lm.model is clip.patcher for lm in memory_management.current_loaded_models):
            memory_management.load_model_gpu(clip.patcher)
        if self._aliases is not None:
            self._aliases.make_usable([clip.cond_stage_model])
        m.set_clip_skip(int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1))

    @contextlib.contextmanager
    def _quiet_engines(self) -> Iterator[None]:
        """Each engine call prints a line per used embedding and appends to the infotext's "TI" entry
        (backend/text_processing/classic_engine.py); neither may pile up over a training run."""
        from backend.text_processing import classic_engine

        saved = dict(classic_engine.last_extra_generation_params)
        had_print = "print" in classic_engine.__dict__
        old_print = classic_engine.__dict__.get("print")
        classic_engine.print = lambda *a, **k: None
        try:
            yield
        finally:
            classic_engine.last_extra_generation_params.clear()
            classic_engine.last_extra_generation_params.update(saved)
            if had_print:
                classic_engine.print = old_print
            else:
                del classic_engine.print

    def encode_text(self, prompts: list[str], sizes: list[ImageSize] | None = None) -> Any:
        m = self.model()
        self._text_ready(m)
        grad = torch.is_grad_enabled() and self._trainable_text
        with self._quiet_engines(), torch.set_grad_enabled(grad):
            if not hasattr(m, "text_processing_engine_l"):
                return m.text_processing_engine(list(prompts))
            # SDXL: StableDiffusionXL.get_learned_conditioning's batch, with each image's own size
            # conditioning (the host uses one width/height and the crop settings for all rows)
            cond_l = m.text_processing_engine_l(list(prompts))
            cond_g, pooled = m.text_processing_engine_g(list(prompts))
            if sizes is None:
                sizes = [ImageSize.plain(1024, 1024)] * len(prompts)
            values = torch.tensor([[*s.original_size, *s.crop_top_left, *s.target_size] for s in sizes],
                                  dtype=torch.float32)
            flat = m.embedder(values.flatten()).reshape(len(prompts), -1).to(pooled)
            return {"crossattn": torch.cat([cond_l, cond_g], dim=2), "vector": torch.cat([pooled, flat], dim=1)}

    def initial_vectors(self, init_text: str, n_vectors: int) -> dict[str, torch.Tensor]:
        """The rows of `init_text`'s tokens in each encoder's token table, spread as A1111's
        create_embedding does (Forge removed its own)."""
        m = self.model()
        out = {}
        for key, engine in engines(m):
            weight = _token_weight(engine)
            ids = engine.tokenizer(init_text or "*", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                rows = weight[torch.tensor(ids, dtype=torch.long, device=weight.device)].detach().float().cpu().clone()
            out[key] = spread_rows(rows if init_text else None, n_vectors, int(weight.shape[1]))
        return out

    def token_embedding_norms(self) -> dict[str, float]:
        return {key: typical_norm(_token_weight(engine)) for key, engine in engines(self.model())}

    # -- noise prediction ------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        m = self.model()
        unet = self._objects(m).unet
        if self._aliases is not None:
            self._aliases.make_usable([unet.model])
        km = unet.model
        cd = km.computation_dtype
        device = torch.device(unet.load_device)
        sdxl = isinstance(cond, dict)
        context = cond["crossattn"] if sdxl else cond
        x = x_t.to(device)
        if km.diffusion_model.in_channels > 4:  # inpainting: mask + masked-image latent, as on A1111
            x = torch.cat([x, self._inpaint_conditioning(x)], dim=1)
        extra = {"y": cond["vector"].to(device, cd)} if sdxl else {}
        transformer_options: dict[str, Any] = {}  # fresh: the UNet writes into it
        return km.diffusion_model(x.to(cd), t.to(device).float().reshape(-1), context=context.to(device, cd),
                                  control=None, transformer_options=transformer_options, **extra).float()

    # -- reversible state ------------------------------------------------------------------------
    @contextlib.contextmanager
    def use_embedding(self, name: str, vectors: dict[str, torch.Tensor]) -> Iterator[None]:
        """Register the live vectors in every engine's database (an SDXL embedding in both, as Forge's
        loader does), so Forge's own splice puts them in; the previous entries come back on exit."""
        from backend.text_processing.textual_inversion import Embedding

        m = self.model()
        sdxl = hasattr(m, "text_processing_engine_l")
        vec: Any = dict(vectors) if sdxl else vectors[SINGLE]
        emb = Embedding(vec, name)
        emb.vectors = int(next(iter(vectors.values())).shape[0])
        emb.shape = sum(int(v.shape[1]) for v in vectors.values())
        dbs = [engine.embeddings for _, engine in engines(m)]
        previous = [db.word_embeddings.get(name) for db in dbs]
        for db in dbs:
            db.register_embedding_by_name(emb, name)
        clear_cond_caches()
        self._trainable_text = True
        try:
            yield
        finally:
            self._trainable_text = False
            for db, old in zip(dbs, previous):
                db.register_embedding_by_name(old, name)
            clear_cond_caches()

    @contextlib.contextmanager
    def use_hypernetwork(self, hypernetworks: list[Any]) -> Iterator[None]:
        """Forge's UNet never reads `shared.loaded_hypernetworks`: hook the modules onto its attention
        layers' to_k/to_v (the UNet module is shared by every clone of its patcher, so previews get
        them too), and keep the prompt's `<hypernet:...>` out while inside."""
        from modules import shared

        previous = list(getattr(shared, "loaded_hypernetworks", []))
        unet = self._objects(self.model()).unet.model.diffusion_model
        shared.loaded_hypernetworks = []
        self._hypernetworks = list(hypernetworks)
        clear_cond_caches()
        try:
            with attach_hypernetworks(unet, list(hypernetworks)):
                yield
        finally:
            shared.loaded_hypernetworks = previous
            self._hypernetworks = []

    @staticmethod
    def _selection_not_loaded() -> bool:
        from modules import sd_models

        data = sd_models.model_data
        return str(data.forge_loading_parameters) != data.forge_hash or not hasattr(data.sd_model, "forge_objects")

    @staticmethod
    def _ensure_model_loaded() -> None:
        """Forge loads the checkpoint on first use (a `FakeInitialModel` stands in until then), and
        under --nowebui never sets its loading parameters; load it the way processing does."""
        from modules import sd_models

        if ForgeHost._selection_not_loaded():
            if not sd_models.model_data.forge_loading_parameters:
                from modules_forge import main_entry

                main_entry.refresh_model_loading_parameters()
            sd_models.forge_model_reload()

    @contextlib.contextmanager
    def gpu_session(self, label: str, options: SessionOptions) -> Iterator[A1111Session]:
        import backend.attention
        import backend.nn.unet as forge_unet
        from backend import memory_management
        from modules import call_queue, shared

        with call_queue.queue_lock:  # generation requests wait for the job, and the job for them
            self._ensure_model_loaded()
            m = self.model()
            objects = self._objects(m)
            unet = objects.unet.model.diffusion_model
            shared.state.begin(job=f"sdtrain-{label}")
            shared.state.textinfo = f"sdtrain: {label}"
            memory_management.load_models_gpu([objects.unet, objects.clip.patcher])
            hypernetworks = list(getattr(shared, "loaded_hypernetworks", []))
            attention = forge_unet.attention_function
            self._aliases = Aliases()
            _SESSION.active = True
            try:
                self._aliases.make_usable([objects.unet.model, objects.clip.cond_stage_model])
                shared.loaded_hypernetworks = []  # the prompt's <hypernet:...> must not leak into TI
                if not options.attention_optimization:
                    forge_unet.attention_function = backend.attention.attention_basic
                with out_of_place_residuals(unet, forge_unet.BasicTransformerBlock), checkpointing.enabled(
                        options.gradient_checkpointing, unet, classes=[forge_unet.BasicTransformerBlock, forge_unet.ResBlock],
                        clone_input=True):
                    yield A1111Session(label)
            finally:
                _SESSION.active = False
                forge_unet.attention_function = attention
                self._aliases.restore()
                self._aliases = None
                shared.loaded_hypernetworks = hypernetworks
                self._inpaint_cache = {}
                clear_cond_caches()
                shared.state.interrupted = False
                shared.state.end()

    def render_preview(self, request):
        """A txt2img through Forge's processing, unless the user picked another checkpoint meanwhile
        (the preview would load it); afterwards the tensors it may have reloaded are made usable again."""
        from modules import sd_models

        if str(sd_models.model_data.forge_loading_parameters) != sd_models.model_data.forge_hash:
            return None
        saved = self._objects(self.model())
        clear_cond_caches()
        try:
            image = super().render_preview(request)
        finally:
            clear_cond_caches()
        if self._aliases is not None:
            self._aliases.make_usable([saved.unet.model, saved.clip.cond_stage_model])
        return image
