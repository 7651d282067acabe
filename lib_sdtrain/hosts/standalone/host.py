"""Host(standalone): the TrainingHost port over a bare ldm LatentDiffusion (SD1 or SD2), no webui involved.

Embeddings are spliced in by this module, not by A1111's hijack: prompts are tokenized, every occurrence of an
active embedding's name tokens becomes `n_vectors` placeholder positions, and a forward hook on the text
encoder's token-embedding layer swaps those rows for the live vectors while the encoder runs. The hook only
exists for the duration of `encode_text`, so the model's module tree and state dict never change. Hypernetworks
are applied the same way: pre-hooks on the attention layers' to_k/to_v while `use_hypernetwork` is active.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.formats.embedding import SINGLE, spread_rows
from lib_sdtrain.core.hypernetwork.attach import attach_hypernetworks
from lib_sdtrain.core.hypernetwork.network import Hypernetwork
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

log = logging.getLogger(__name__)
MAX_LENGTH = 77

#: UNet modules run under gradient checkpointing, one unit each (ldm's and sgm's class names)
CHECKPOINT_UNITS = ("ResBlock", "BasicTransformerBlock", "AttentionBlock")

#: progress(label, step, total, text), called on every `Session.report`.
ProgressFn = Callable[[str, int, int, str], None]


@dataclass
class _TextEncoder:
    """What the splice needs from one text encoder."""

    key: str  # the Embedding.vectors key it reads: "*" (SD1/SD2), "clip_l" / "clip_g" (SDXL)
    tokenize: Callable[[str], list[int]]  # text -> ids, no start/end tokens, no truncation
    bos: int
    eos: int
    pad: int
    token_embedding: torch.nn.Embedding
    #: [B, 77] ids -> ([B, 77, width] what the UNet gets, [B, dim] pooled output or None)
    run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    truncate_init: bool = False  # A1111's SD1 init tokenizes with max_length=n_vectors (truncating)


def _clip_l(cond_stage: torch.nn.Module, key: str) -> _TextEncoder:
    """ldm's or sgm's FrozenCLIPEmbedder (HF CLIPTextModel; `layer` "last" or "hidden" + `layer_idx`)."""
    tok = cond_stage.tokenizer

    def run_clip(ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        hidden = cond_stage.layer == "hidden"
        out = cond_stage.transformer(input_ids=ids, output_hidden_states=hidden)
        return (out.hidden_states[cond_stage.layer_idx] if hidden else out.last_hidden_state), None

    return _TextEncoder(
        key=key,
        tokenize=lambda text: tok(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"],
        bos=tok.bos_token_id,
        eos=tok.eos_token_id,
        pad=tok.pad_token_id,  # <|endoftext|>, as A1111 pads SD1 prompts
        token_embedding=cond_stage.transformer.text_model.embeddings.token_embedding,
        run=run_clip,
        truncate_init=key == SINGLE,
    )


def _open_clip(cond_stage: torch.nn.Module, key: str) -> _TextEncoder:
    """ldm's FrozenOpenCLIPEmbedder (SD2) or sgm's FrozenOpenCLIPEmbedder2 (SDXL's CLIP-G, which also
    gives the pooled output: the final-norm EOT token through the text projection)."""
    from open_clip.tokenizer import _tokenizer  # the tokenizer ldm's and sgm's own forwards use

    if type(cond_stage).__name__ == "FrozenOpenCLIPEmbedder2":
        if cond_stage.legacy:
            raise ValueError("a legacy FrozenOpenCLIPEmbedder2 (no pooled output) is not an SDXL base encoder")

        def run(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            out = cond_stage.encode_with_transformer(ids)
            return out[cond_stage.layer], (out["pooled"] if cond_stage.return_pooled else None)
    else:

        def run(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return cond_stage.encode_with_transformer(ids), None

    return _TextEncoder(
        key=key,
        tokenize=_tokenizer.encode,
        bos=_tokenizer.encoder["<start_of_text>"],
        eos=_tokenizer.encoder["<end_of_text>"],
        pad=0,  # open_clip pads with zeros
        token_embedding=cond_stage.model.token_embedding,
        run=run,
    )


def _text_side(model: torch.nn.Module) -> tuple[str, list[_TextEncoder], list[tuple[str, Any]]]:
    """(family, text encoders, SDXL's conditioner parts in order) of an ldm or sgm model.

    For SDXL the parts are ("text", encoder) and ("size", (batch key, embedder)), in the order the
    GeneralConditioner concatenates their outputs."""
    if hasattr(model, "conditioner"):  # sgm DiffusionEngine: SDXL
        encoders: list[_TextEncoder] = []
        parts: list[tuple[str, Any]] = []
        for embedder in model.conditioner.embedders:
            kind = type(embedder).__name__
            if kind == "FrozenCLIPEmbedder":
                enc = _clip_l(embedder, "clip_l")
            elif kind == "FrozenOpenCLIPEmbedder2":
                enc = _open_clip(embedder, "clip_g")
            elif kind == "ConcatTimestepEmbedderND":
                parts.append(("size", (embedder.input_key, embedder)))
                continue
            else:
                raise ValueError(f"unsupported SDXL conditioner part {kind} (the standalone host trains SDXL base models)")
            encoders.append(enc)
            parts.append(("text", enc))
        if sorted(e.key for e in encoders) != ["clip_g", "clip_l"]:
            raise ValueError("an SDXL base model has a CLIP-L and a CLIP-G text encoder (is this a refiner?)")
        return "sdxl", encoders, parts
    cond_stage = model.cond_stage_model
    kind = type(cond_stage).__name__
    if kind == "FrozenCLIPEmbedder":
        return "sd1", [_clip_l(cond_stage, SINGLE)], []
    if kind == "FrozenOpenCLIPEmbedder":
        return "sd2", [_open_clip(cond_stage, SINGLE)], []
    raise ValueError(f"unsupported text encoder {kind}: the standalone host handles SD1, SD2 and SDXL models")


class StandaloneSession:
    """The `Session` handed out by `gpu_session`: keeps the last report and answers interrupts."""

    def __init__(self, label: str, stop: threading.Event, progress: ProgressFn | None):
        self.label = label
        self.last: tuple[int, int, str] | None = None
        self._stop = stop
        self._progress = progress

    def report(self, step: int, total: int, text: str) -> None:
        self.last = (step, total, text)
        log.debug("%s: %d/%d %s", self.label, step, total, text)
        if self._progress is not None:
            self._progress(self.label, step, total, text)

    def interrupted(self) -> bool:
        return self._stop.is_set()


class StandaloneHost:
    """Implements `lib_sdtrain.core.port.TrainingHost` over an ldm `LatentDiffusion` (SD1/SD2) or an sgm
    `DiffusionEngine` (SDXL base). Both keep the UNet at `model.model.diffusion_model` and the VAE at
    `model.first_stage_model`; they differ in the text side (`_text_side`) and the schedule's form."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        checkpoint_name: str = "",
        checkpoint_hash: str | Callable[[], str] = "",
        progress: ProgressFn | None = None,
    ):
        self.model = model
        self.family, self.texts, self._xl_parts = _text_side(model)
        self.checkpoint_name = checkpoint_name
        self._hash = checkpoint_hash  # a callable is evaluated once, on first describe()
        self.progress = progress
        # Captured now, in float64, so a later half-precision cast cannot coarsen the schedule.
        self._alphas = self._schedule_of(model)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._embeddings: dict[str, dict[str, torch.Tensor]] = {}
        self._name_ids: dict[tuple[str, str], list[int]] = {}
        self._inpaint_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def load_checkpoint(
        cls,
        ckpt_path: str | Path,
        yaml_path: str | Path,
        clip_dir: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: ProgressFn | None = None,
        webui_dir: str | Path | None = None,
    ) -> StandaloneHost:
        """A host over a real (or tiny) SD1/SD2/SDXL checkpoint; see `loader.load_ldm_model` and
        `loader.load_sgm_model` for the rules. SDXL (told by the webui's own key test) needs `sgm`,
        taken from `webui_dir`'s repositories (or SDTRAIN_SGM_DIR); its yaml defaults to that webui's
        sd_xl_base.yaml."""
        from lib_sdtrain.hosts.standalone.loader import (
            file_shorthash,
            is_sdxl_checkpoint,
            load_ldm_model,
            load_sgm_model,
        )
        from lib_sdtrain.hosts.standalone.sgm_source import ensure_sgm

        if is_sdxl_checkpoint(ckpt_path):
            sgm_dir = ensure_sgm(webui_dir)
            if not yaml_path and sgm_dir is not None:
                yaml_path = sgm_dir / "configs" / "inference" / "sd_xl_base.yaml"
            if not yaml_path:
                raise SdtrainError(f"{ckpt_path} is an SDXL checkpoint: give its yaml (--yaml) or the webui (--webui)")
            model = load_sgm_model(ckpt_path, yaml_path, clip_dir, device=device, dtype=dtype)
        else:
            if not yaml_path and webui_dir:  # the webui's own default for SD1 checkpoints
                yaml_path = Path(webui_dir) / "configs" / "v1-inference.yaml"
            if not yaml_path:
                raise SdtrainError(f"{ckpt_path}: give the checkpoint's yaml (--yaml) or the webui (--webui)")
            model = load_ldm_model(ckpt_path, yaml_path, clip_dir, device=device, dtype=dtype)
        return cls(
            model,
            checkpoint_name=Path(ckpt_path).stem,
            checkpoint_hash=partial(file_shorthash, ckpt_path),
            progress=progress,
        )

    @staticmethod
    def _schedule_of(model: torch.nn.Module) -> torch.Tensor:
        """ᾱ_t in float64. sgm keeps σ_t = sqrt((1-ᾱ_t)/ᾱ_t) instead (its denoiser's table); the UNet
        sees exactly the DDPM x_t and integer t either way (sgm's c_in = 1/sqrt(1+σ²) = sqrt(ᾱ))."""
        if hasattr(model, "alphas_cumprod"):
            return model.alphas_cumprod.detach().to("cpu", torch.float64).clone()
        sigmas = model.denoiser.sigmas.detach().to("cpu", torch.float64)
        return 1.0 / (1.0 + sigmas**2)

    # -- model facts -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.model.parameters()).device

    def _unet_dtype(self) -> torch.dtype:
        return next(self.model.model.parameters()).dtype

    def describe(self) -> ModelInfo:
        if callable(self._hash):
            self._hash = self._hash()
        dtype = self._unet_dtype()
        return ModelInfo(
            family=self.family,  # type: ignore[arg-type]
            checkpoint_name=self.checkpoint_name,
            checkpoint_hash=self._hash,
            text_encoders=tuple(TextEncoderInfo(te.key, int(te.token_embedding.weight.shape[1])) for te in self.texts),
            device=self.device,
            # Half-precision weights need autocast around the trainer's float32 vectors (CUDA, and the
            # CPU too: its autocast takes fp16 and bf16, with norm layers kept in float32)
            autocast_dtype=dtype if dtype != torch.float32 else None,
            latent_downscale=self._downscale(),
        )

    def _downscale(self) -> int:
        levels = self.model.first_stage_model.encoder.num_resolutions  # ldm and sgm alike
        return 2 ** (int(levels) - 1)

    def _latent_channels(self) -> int:
        return int(self.model.model.diffusion_model.out_channels)

    def noise_schedule(self) -> NoiseSchedule:
        if hasattr(self.model, "parameterization"):
            v = self.model.parameterization == "v"
        else:  # sgm: the denoiser's scaling says it (VScaling: v-prediction), as the webui reads it
            v = type(self.model.denoiser.scaling).__name__ == "VScaling"
        prediction = "v" if v else "eps"
        return NoiseSchedule(alphas_cumprod=self._alphas.to(torch.float32), prediction=prediction)

    # -- images ----------------------------------------------------------------------------------
    def _vae_device(self) -> torch.device:
        return next(self.model.first_stage_model.parameters()).device

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        vae = self.model.first_stage_model
        x = pixels.to(self._vae_device(), next(vae.parameters()).dtype)
        # the posterior from the VAE itself: sgm's own encode_first_stage hands back one sample
        return LatentDist.from_moments(vae.quant_conv(vae.encoder(x)), float(self.model.scale_factor), self.device)

    # -- text --------------------------------------------------------------------------------------
    def _ids_of(self, te: _TextEncoder, name: str) -> list[int]:
        if (te.key, name) not in self._name_ids:
            self._name_ids[(te.key, name)] = list(te.tokenize(name))
        return self._name_ids[(te.key, name)]

    def _splice(self, te: _TextEncoder, prompt: str) -> tuple[list[int], list[tuple[int, str, int]]]:
        """Token ids (77) and the fixes (position, embedding name, vector index) for one prompt in one
        encoder's tokenization.

        Names are matched on token ids, longest name first, as A1111's embedding database does. Content
        beyond 75 tokens is cut (A1111 would open a second 77-token chunk instead), which can cut an
        embedding's tail too.
        """
        names = sorted(
            (n for n in self._embeddings if self._ids_of(te, n)), key=lambda n: len(self._ids_of(te, n)), reverse=True
        )
        ids = te.tokenize(prompt)
        content: list[int] = []
        fixes: list[tuple[int, str, int]] = []
        i = 0
        while i < len(ids):
            for name in names:
                seq = self._ids_of(te, name)
                if ids[i : i + len(seq)] == seq:
                    for k in range(self._embeddings[name][te.key].shape[0]):
                        fixes.append((1 + len(content), name, k))
                        content.append(0)  # placeholder id; the hook overwrites its row
                    i += len(seq)
                    break
            else:
                content.append(ids[i])
                i += 1
        content = content[: MAX_LENGTH - 2]
        fixes = [f for f in fixes if f[0] <= MAX_LENGTH - 2]
        tokens = [te.bos, *content, te.eos]
        return tokens + [te.pad] * (MAX_LENGTH - len(tokens)), fixes

    def _encode_with(self, te: _TextEncoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        spliced = [self._splice(te, p) for p in prompts]
        ids = torch.tensor([s[0] for s in spliced], dtype=torch.long, device=te.token_embedding.weight.device)
        fixes = [(b, pos, name, k) for b, (_, fx) in enumerate(spliced) for pos, name, k in fx]
        if not fixes:
            return te.run(ids)

        def swap_rows(_module: torch.nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
            rows = torch.stack([self._embeddings[name][te.key][k] for _, _, name, k in fixes]).to(
                out.device, out.dtype
            )
            b_idx = torch.tensor([f[0] for f in fixes], device=out.device)
            p_idx = torch.tensor([f[1] for f in fixes], device=out.device)
            # index_put on a fresh tensor + where: differentiable w.r.t. `rows`, leaves `out` untouched.
            filled = torch.zeros_like(out).index_put((b_idx, p_idx), rows)
            mask = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device)
            mask[b_idx, p_idx] = True
            return torch.where(mask.unsqueeze(-1), filled, out)

        handle = te.token_embedding.register_forward_hook(swap_rows)
        try:
            return te.run(ids)
        finally:
            handle.remove()

    def encode_text(self, prompts: list[str], sizes: list[ImageSize] | None = None) -> Any:
        """SD1/SD2: `[B, 77, width]`, the encoder's output in its dtype on the model device.
        SDXL: `{"crossattn": [B, 77, 2048], "vector": [B, 2816]}` as sgm's GeneralConditioner builds
        them — CLIP-L and CLIP-G hidden states side by side; CLIP-G's pooled output and the size
        conditioning (`sizes`, default 1024×1024 uncropped as the webui's) in the conditioner's order."""
        outs = {te.key: self._encode_with(te, prompts) for te in self.texts}
        if self.family != "sdxl":
            return outs[SINGLE][0]
        if sizes is None:
            sizes = [ImageSize.plain(1024, 1024)] * len(prompts)
        if len(sizes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sizes)} sizes")
        fields = {"original_size_as_tuple": [s.original_size for s in sizes],
                  "crop_coords_top_left": [s.crop_top_left for s in sizes],
                  "target_size_as_tuple": [s.target_size for s in sizes]}
        hidden, vector = [], []
        for kind, part in self._xl_parts:
            if kind == "text":
                z, pooled = outs[part.key]
                hidden.append(z)
                if pooled is not None:
                    vector.append(pooled)
            else:
                key, embedder = part
                device = self.texts[0].token_embedding.weight.device
                vector.append(embedder(torch.tensor(fields[key], dtype=torch.float32, device=device)))
        dtype = hidden[0].dtype
        return {"crossattn": torch.cat([h.to(dtype) for h in hidden], dim=2),
                "vector": torch.cat([v.to(dtype) for v in vector], dim=1)}

    @torch.no_grad()
    def initial_vectors(self, init_text: str, n_vectors: int) -> dict[str, torch.Tensor]:
        """Per encoder, the token embeddings of `init_text` spread over `n_vectors` rows. SD1 truncates
        the text to `n_vectors` tokens as A1111 does; SD2 and SDXL spread all of its tokens (the same
        tokens in both SDXL encoders, whose vocabularies are one BPE)."""
        out = {}
        for te in self.texts:
            weight = te.token_embedding.weight
            ids = te.tokenize(init_text) if init_text else []
            if te.truncate_init:
                ids = ids[:n_vectors]
            rows = weight[torch.tensor(ids, device=weight.device)] if ids else None
            out[te.key] = spread_rows(rows, n_vectors, int(weight.shape[1]))
        return out

    def token_embedding_norms(self) -> dict[str, float]:
        return {te.key: typical_norm(te.token_embedding.weight) for te in self.texts}

    @contextlib.contextmanager
    def use_embedding(self, name: str, vectors: dict[str, torch.Tensor]) -> Iterator[None]:
        need = {te.key: int(te.token_embedding.weight.shape[1]) for te in self.texts}
        ok = set(vectors) == set(need) and all(
            vectors[k].ndim == 2 and vectors[k].shape[1] == w and vectors[k].shape[0] == vectors[next(iter(need))].shape[0]
            for k, w in need.items()
        )
        if not ok:
            got = {k: tuple(v.shape) for k, v in vectors.items()}
            want = ", ".join(f"'{k}': [n, {w}]" for k, w in need.items())
            raise ValueError(f"embedding {name!r} has vectors {got}, this model needs {{{want}}}")
        previous = self._embeddings.get(name)
        self._embeddings[name] = dict(vectors)
        try:
            yield
        finally:
            if previous is None:
                self._embeddings.pop(name, None)
            else:
                self._embeddings[name] = previous

    @contextlib.contextmanager
    def use_hypernetwork(self, hypernetworks: list[Hypernetwork]) -> Iterator[None]:
        """ldm applies no hypernetworks itself: forward pre-hooks on every attention layer's
        to_k/to_v (core.hypernetwork_attach) for the duration; gone afterwards."""
        with attach_hypernetworks(self.model.model.diffusion_model, hypernetworks):
            yield

    # -- denoiser ---------------------------------------------------------------------------------
    def _inpaint_conditioning(self, x: torch.Tensor) -> torch.Tensor:
        """Inpainting UNets also take a mask and a masked image: give them "all masked" (mask 1, a
        mid-grey image, as A1111 does for txt2img), encoded once per latent size via the VAE mean."""
        key = (tuple(x.shape[2:]), x.device, x.dtype)
        if key not in self._inpaint_cache:
            f = self._downscale()
            grey = torch.zeros((1, 3, x.shape[2] * f, x.shape[3] * f))
            z = self.encode_images(grey).mean.to(x.device, x.dtype)
            self._inpaint_cache[key] = torch.nn.functional.pad(z, (0, 0, 0, 0, 1, 0), value=1.0)
        return self._inpaint_cache[key].expand(x.shape[0], -1, -1, -1)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """UNet output (float32) for `x_t` at integer `t`; `cond` is what `encode_text` returned."""
        dtype = self._unet_dtype()
        x = x_t.to(self.device, dtype)
        t = t.to(self.device).long()
        if self.family == "sdxl":  # sgm's OpenAIWrapper: context = crossattn, y = vector
            c = {k: v.to(self.device, dtype) for k, v in cond.items()}
            return self.model.model(x, t, c).float()
        c = cond.to(self.device, dtype)
        key = self.model.model.conditioning_key
        full: Any = c
        if key == "hybrid":
            full = {"c_concat": [self._inpaint_conditioning(x)], "c_crossattn": [c]}
        out = self.model.apply_model(x, t, full)
        return out.float()

    # -- jobs ----------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Ask the running job to stop (its `Session.interrupted()` turns True)."""
        self._stop.set()

    @contextlib.contextmanager
    def _modes_kept(self) -> Iterator[None]:
        """eval() for the duration; then every module's own training flag back (ldm pins some to eval)."""
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            yield
        finally:
            for m, flag in modes:
                m.training = flag

    def _checkpointing(self, enable: bool) -> Callable[[], None]:
        """Turn ldm's own checkpoint flags off (its CheckpointFunction asks autograd for gradients of
        frozen weights and fails) and, if `enable`, run each residual and transformer block under
        torch's non-reentrant checkpoint instead (the units the webui checkpoints; SDXL's deepest
        level stacks ten transformer blocks in one UNet block, so finer units keep far less in
        memory while one is recomputed). Returns the undo."""
        unet = self.model.model.diffusion_model
        undo: list[Callable[[], None]] = []
        for m in unet.modules():
            for attr in ("use_checkpoint", "checkpoint"):
                if isinstance(getattr(m, attr, None), bool):
                    undo.append(partial(setattr, m, attr, getattr(m, attr)))
                    setattr(m, attr, False)
        if enable:
            for block in [m for m in unet.modules() if type(m).__name__ in CHECKPOINT_UNITS]:
                bound = type(block).forward.__get__(block)
                block.forward = partial(torch_checkpoint, bound, use_reentrant=False)
                undo.append(partial(block.__dict__.pop, "forward", None))

        def restore() -> None:
            for u in reversed(undo):
                u()

        return restore

    @contextlib.contextmanager
    def gpu_session(self, label: str, options: SessionOptions) -> Iterator[StandaloneSession]:
        """Exclusive use of the model. Not re-entrant: a nested session on this host would deadlock.

        `gradient_checkpointing` maps to torch checkpointing of every UNet block; `unload_vae` moves the
        VAE to the CPU while the model is on a GPU (encode/preview still work, on the CPU side);
        `attention_optimization` has nothing to switch here (ldm's plain attention is used).
        """
        with self._lock:
            flags = [(p, p.requires_grad) for p in self.model.parameters()]
            vae = self.model.first_stage_model
            vae_device = self._vae_device()
            self._stop.clear()
            undo_ckpt = None
            try:
                for p, _ in flags:
                    p.requires_grad_(False)
                undo_ckpt = self._checkpointing(options.gradient_checkpointing)
                if options.unload_vae and vae_device.type != "cpu":
                    vae.to("cpu")
                with self._modes_kept():
                    yield StandaloneSession(label, self._stop, self.progress)
            finally:
                vae.to(vae_device)
                if undo_ckpt is not None:
                    undo_ckpt()
                for p, flag in flags:
                    p.requires_grad_(flag)
                self._stop.clear()

    def captioners(self) -> dict[str, Any]:
        """A bare model has no captioning models."""
        return {}

    @torch.no_grad()
    def render_preview(self, request: PreviewRequest) -> Image.Image:
        """DDIM (eta 0) with classifier-free guidance; `sampler_name` is ignored. Sides are rounded down to
        multiples of 8. A seed of -1 draws one from the OS, leaving torch's and Python's RNGs alone."""
        f = self._downscale()
        width, height = max(f, request.width // f * f), max(f, request.height // f * f)
        seed = request.seed if request.seed >= 0 else secrets.randbits(32)
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.randn((1, self._latent_channels(), height // f, width // f), generator=gen).to(self.device)
        steps = max(1, min(int(request.steps), len(self._alphas)))
        ts = torch.linspace(len(self._alphas) - 1, 0, steps).round().long().unique_consecutive()
        v_pred = self.noise_schedule().prediction == "v"
        half = self.describe().autocast_dtype
        amp = torch.autocast(self.device.type, dtype=half) if half else contextlib.nullcontext()
        with self._modes_kept(), amp:
            size = ImageSize.plain(height, width)
            cond = self.encode_text([request.negative_prompt, request.prompt], [size, size])
            for i, t in enumerate(ts.tolist()):
                a = float(self._alphas[t])
                a_prev = float(self._alphas[int(ts[i + 1])]) if i + 1 < len(ts) else 1.0
                out_u, out_c = self.predict(torch.cat([x, x]), torch.tensor([t, t]), cond).chunk(2)
                out = out_u + request.cfg_scale * (out_c - out_u)
                if v_pred:
                    eps = math.sqrt(a) * out + math.sqrt(1 - a) * x
                    x0 = math.sqrt(a) * x - math.sqrt(1 - a) * out
                else:
                    eps = out
                    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
                x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
            vae_dtype = next(self.model.first_stage_model.parameters()).dtype
            pixels = self.model.decode_first_stage(x.to(self._vae_device(), vae_dtype)).float()
        arr = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)  # uint8 [H, W, 3]: RGB
