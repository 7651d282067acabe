"""Core: the one port through which training code talks to a host (webui or standalone model).

A host adapter implements `TrainingHost`. The core passes plain tensors and dataclasses across it,
never host objects, and every method that changes host state is a context manager, so leaving the
`with` block restores the host exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from PIL import Image

Family = Literal["sd1", "sd2", "sdxl"]
Prediction = Literal["eps", "v"]


class Hypernetwork(Protocol):
    """What a host needs of a hypernetwork to apply it (core.hypernetwork.network.Hypernetwork is one):
    its name and, per attention input width, the modules for the K and the V input — the webui's own
    `layers` shape, so the webui can run the objects as they are."""

    name: str
    layers: dict[int, tuple[torch.nn.Module, torch.nn.Module]]


@dataclass(frozen=True)
class TextEncoderInfo:
    """One text encoder whose token embeddings an embedding extends."""

    key: str  # "*" for SD1/SD2, "clip_l"/"clip_g" for SDXL (matches Embedding.vectors keys)
    width: int  # token-embedding width: 768 (SD1, clip_l), 1024 (SD2), 1280 (clip_g)


@dataclass(frozen=True)
class ModelInfo:
    family: Family
    checkpoint_name: str  # shown to users and written into files (A1111: model_name)
    checkpoint_hash: str  # short hash (A1111: shorthash), "" if unknown
    text_encoders: tuple[TextEncoderInfo, ...]
    device: torch.device
    #: dtype for autocast on the host's device, or None to run in float32.
    autocast_dtype: torch.dtype | None = None
    latent_downscale: int = 8

    @property
    def context_width(self) -> int:
        """Width of the cross-attention context: the text encoders' outputs side by side
        (SD1 768, SD2 1024, SDXL 768 + 1280 = 2048)."""
        return sum(te.width for te in self.text_encoders)


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete diffusion schedule the model was trained with."""

    alphas_cumprod: torch.Tensor  # [T] float32 on CPU
    prediction: Prediction  # what the model predicts: noise ("eps") or velocity ("v")

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


@dataclass(frozen=True)
class LatentDist:
    """A batch of encoded images as a diagonal Gaussian, already in the diffusion model's latent scale.

    `sample() = mean + std * noise`. The A1111 latent sampling methods map onto it: "once" samples
    once and keeps the sample, "deterministic" uses `mean`, "random" samples at every use.
    """

    mean: torch.Tensor  # [B, C, h, w]
    std: torch.Tensor  # [B, C, h, w]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device="cpu", dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    @classmethod
    def from_moments(cls, moments: torch.Tensor, scale: float, device: torch.device | str) -> LatentDist:
        """The posterior as ldm's and sgm's AutoencoderKL define it, from its `quant_conv` output
        `[B, 2C, h, w]` (mean and log-variance, the latter clamped to [-30, 20]), in float32 on
        `device`, times the model's latent scale. Hosts use it where the model's own encode hands
        back only a sample (sgm, reForge)."""
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return cls(mean=(mean * scale).to(device), std=(std * scale).to(device))


@dataclass(frozen=True)
class ImageSize:
    """SDXL's size conditioning for one training image, as SDXL was trained: the source image's
    size, where the crop starts in the source once resized (after any flip), and the size trained at.
    Pairs are (height, width) and (top, left), the order of sgm's batch keys."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    @classmethod
    def plain(cls, height: int, width: int) -> ImageSize:
        """A picture made at its own size: no crop (what a preview or txt2img asks for)."""
        return cls((height, width), (0, 0), (height, width))


@dataclass(frozen=True)
class SessionOptions:
    """Host switches a training job may set; the host adapter decides what they mean for it."""

    gradient_checkpointing: bool = False
    attention_optimization: bool = True  # keep the host's cross-attention optimization on
    unload_vae: bool = False  # move the VAE off the GPU while training (latents are cached)


class Session(Protocol):
    """Handed out by `TrainingHost.gpu_session`: progress out, interrupts in."""

    def report(self, step: int, total: int, text: str) -> None: ...

    def interrupted(self) -> bool: ...


@dataclass
class PreviewRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler_name: str = "Euler a"
    cfg_scale: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    #: Host-specific extras (e.g. "from_txt2img": True asks the webui to use its txt2img tab values).
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TrainingHost(Protocol):
    def describe(self) -> ModelInfo:
        """What model is loaded: family, name, text encoders, device."""

    def noise_schedule(self) -> NoiseSchedule: ...

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        """Pixels `[B, 3, H, W]` in [-1, 1] → latent distribution (no gradients)."""

    def encode_text(self, prompts: list[str], sizes: list[ImageSize] | None = None) -> Any:
        """Prompts → conditioning for `predict`. Embeddings made active by `use_embedding`
        are spliced in wherever their name occurs, and gradients flow back into their vectors.
        `sizes` (one per prompt) is the size conditioning of models that take one (SDXL); others
        ignore it. None means each picture at the latent's size, uncropped."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The denoiser's output for noisy latents `x_t` at integer timesteps `t` (eps or v, as
        `noise_schedule().prediction` says). Inpainting models get their concat conditioning here."""

    def initial_vectors(self, init_text: str, n_vectors: int) -> dict[str, torch.Tensor]:
        """Token embeddings of `init_text` spread over `n_vectors` rows, per text encoder
        (A1111 `create_embedding`; empty text gives zeros)."""

    def token_embedding_norms(self) -> dict[str, float]:
        """Per text encoder (keyed like `initial_vectors`), the typical norm of its token embeddings:
        the median L2 norm of the rows of its token-embedding table (core.training.embedding_norm.typical_norm)."""

    def use_embedding(self, name: str, vectors: dict[str, torch.Tensor]) -> AbstractContextManager[None]:
        """Make `name` in prompts resolve to `vectors` (the live tensors, which may require grad)."""

    def use_hypernetwork(self, hypernetworks: list[Hypernetwork]) -> AbstractContextManager[None]:
        """Apply exactly these hypernetworks (in order, instead of any the host had loaded) in every
        attention layer while inside, as the host's `apply_hypernetworks` does: the input of `to_k`
        through each one's K module for the context's width, that of `to_v` through its V module
        (self- and cross-attention alike). The modules are used live (train/eval mode, multiplier,
        gradients); the caller puts them on the device. `core.hypernetwork_attach` does this for
        models that do not apply hypernetworks themselves; the webui's `shared.loaded_hypernetworks`
        takes these objects as they are (their `layers` has the host's shape)."""

    def gpu_session(self, label: str, options: SessionOptions) -> AbstractContextManager[Session]:
        """Exclusive use of the model for a job: take the host's GPU lock, freeze every model
        weight (requires_grad False, restored on exit), apply `options`, expose progress and interrupt."""

    def captioners(self) -> dict[str, Callable[[Image.Image], str]]:
        """Image captioners the host can run now, by name ("blip", "deepbooru"); only those whose
        models are loaded or on disk (nothing is downloaded). Empty when there are none."""

    def render_preview(self, request: PreviewRequest) -> Image.Image | None:
        """One preview image with the current state (active embeddings included), or None."""
