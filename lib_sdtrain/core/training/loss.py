"""Core: the loss options of a training run — loss type (MSE, L1, pseudo-Huber), min-SNR-γ weighting,
noise offset and a timestep range — as pure functions `diffusion_loss` calls.

Every option is off by default, and then `diffusion_loss` computes exactly what the host's trainer
does (ldm's `p_losses` with l2 loss: t ~ U[0, T), plain Gaussian noise, the mean squared error): the
same operations and the same random draws, so a default run is bit-identical to one without options.
The formulas are kohya's sd-scripts' (library/train_util.py, custom_train_functions.py):

- loss per element, d = prediction - target:
  ``mse`` d², ``l1`` |d|, ``huber`` 2c·(√(d² + c²) - c), ``smooth_l1`` 2·(√(d² + c²) - c)
  with c = `huber_c` (pseudo-Huber: ≈ d² for |d| ≪ c, ≈ 2c·|d| for |d| ≫ c; ``smooth_l1`` is the same
  curve divided by c);
- min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"), with
  SNR(t) = ā_t / (1 - ā_t): the loss of each sample (its mean over channels and pixels) times
  min(SNR(t), γ) / SNR(t) for noise (eps) prediction and min(SNR(t), γ) / (SNR(t) + 1) for velocity (v)
  prediction, then the mean over the batch;
- noise offset: ε = randn(B, C, h, w) + offset·randn(B, C, 1, 1) (one shift per sample and channel,
  drawn after the noise from the same generator);
- timestep range: t ~ U[timestep_min, timestep_max) (the upper bound excluded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.options.config import LOSS_TYPES
from lib_sdtrain.core.port import NoiseSchedule


@dataclass(frozen=True)
class LossOptions:
    """What the training loss is. The defaults are the host's loss (see the module docstring)."""

    loss_type: str = "mse"
    huber_c: float = 0.1
    min_snr_gamma: float = 0.0  # 0: off
    noise_offset: float = 0.0  # 0: off
    timestep_min: int = 0
    timestep_max: int | None = None  # excluded; None: the schedule's end

    @classmethod
    def from_config(cls, cfg: Any, schedule: NoiseSchedule) -> LossOptions:
        """A training config's loss fields, checked against the model's schedule (errors name the field)."""
        top = int(cfg.timestep_max)
        if top > schedule.num_timesteps:
            raise ConfigError("timestep_max", f"must be at most the model's {schedule.num_timesteps} timesteps, "
                                              f"got {top}")
        return cls(loss_type=cfg.loss_type, huber_c=float(cfg.huber_c), min_snr_gamma=float(cfg.min_snr_gamma),
                   noise_offset=float(cfg.noise_offset), timestep_min=int(cfg.timestep_min), timestep_max=top)


#: the host's loss
PLAIN = LossOptions()


def sample_timesteps(batch: int, schedule: NoiseSchedule, options: LossOptions,
                     generator: torch.Generator | None) -> torch.Tensor:
    """`batch` timesteps, uniform over [timestep_min, timestep_max) (by default [0, T): the host's draw)."""
    top = schedule.num_timesteps if options.timestep_max is None else options.timestep_max
    return torch.randint(options.timestep_min, top, (batch,), generator=generator)


def sample_noise(shape: torch.Size | tuple[int, ...], options: LossOptions,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise of `shape` [B, C, h, w] (float32, CPU), plus `noise_offset`·randn(B, C, 1, 1) when set
    (drawn second, so the first draw is the host's noise)."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if options.noise_offset:
        shift = torch.randn((shape[0], shape[1], 1, 1), generator=generator, dtype=torch.float32)
        noise = noise + options.noise_offset * shift
    return noise


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ā_t / (1 - ā_t), in float64 (on the CPU)."""
    a = alphas_cumprod.detach().to("cpu", torch.float64)[t.to("cpu")]
    return a / (1 - a)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """The min-SNR-γ weight per sample: min(SNR, γ)/SNR (eps; written min(1, γ/SNR), which is 1 at
    SNR = 0 instead of 0/0) or min(SNR, γ)/(SNR + 1) (v)."""
    if prediction == "v":
        return torch.minimum(snr_t, torch.full_like(snr_t, gamma)) / (snr_t + 1)
    return torch.clamp(gamma / snr_t, max=1.0)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "mse",
                     huber_c: float = 0.1) -> torch.Tensor:
    """The loss per element (no reduction); the formulas are in the module docstring."""
    if loss_type == "mse":
        return (pred - target) ** 2
    if loss_type == "l1":
        return (pred - target).abs()
    if loss_type == "huber":
        return 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    if loss_type == "smooth_l1":
        return 2 * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    raise ValueError(f"unknown loss type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")


def reduce_loss(err: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, options: LossOptions) -> torch.Tensor:
    """The batch loss from the per-element loss `err` [B, ...]: its mean (the host's), or with min-SNR-γ
    the mean over the batch of each sample's mean times its weight."""
    if not options.min_snr_gamma:
        return err.mean()
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    w = min_snr_weight(snr(schedule.alphas_cumprod, t), options.min_snr_gamma, schedule.prediction)
    return (per_sample * w.to(per_sample.device, per_sample.dtype)).mean()
