"""Core: the dataset as the training loop sees it — cached latents, batches on the device, validation set."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lib_sdtrain.core.data.buckets import resolve_step
from lib_sdtrain.core.data.dataset import DatasetOptions, TrainDataset
from lib_sdtrain.core.data.holdout import split_dataset
from lib_sdtrain.core.port import ImageSize, NoiseSchedule, TrainingHost
from lib_sdtrain.core.training.distributed import SINGLE, DataParallel
from lib_sdtrain.core.training.loop import Batch, autocast_context, diffusion_loss


@dataclass
class TrainingData:
    dataset: TrainDataset
    validation_count: int
    #: held-out validation images (validation_split / validation_dir), never in a batch; None: the
    #: validation set is the first `validation_count` training images
    holdout: TrainDataset | None = None
    #: fixed (latent, prompt, weight, size) for the validation loss, filled by `encode`
    validation_set: list[tuple[torch.Tensor, str, torch.Tensor | None, ImageSize]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(str(p), r) for p, r in self.dataset.skipped]

    @property
    def notes(self) -> list[str]:
        """Lines for the run's log about how the images were read (the buckets, when on)."""
        note = self.dataset.bucket_note()
        return [note] if note else []

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset.steps_per_epoch

    @property
    def gradient_step(self) -> int:
        return self.dataset.gradient_step

    def encode(self, host: TrainingHost) -> None:
        """Encode every image once through the host's VAE (the latent sampling method decides
        what is kept), then freeze the validation set: the same latents and prompts every time."""
        device = host.describe().device
        self.dataset.cache_latents(lambda px: host.encode_images(px.to(device)))
        ds = self.dataset
        count = min(self.validation_count, len(ds.images))
        if self.holdout is not None:  # every held-out image, encoded after the training ones
            ds = self.holdout
            ds.cache_latents(lambda px: host.encode_images(px.to(device)))
            count = len(ds.images)
        for item in range(count):
            latent = ds.latent(item)
            weight = ds.weight_map(item, tuple(latent.shape[-2:])) if ds.opts.use_weight else None
            self.validation_set.append((latent.clone(), ds.text(item), weight, ds.image_size(item)))

    @property
    def validation_paths(self) -> list[str]:
        """The images of the validation set."""
        if self.holdout is not None:
            return [str(rec.path) for rec in self.holdout.images]
        return [str(rec.path) for rec in self.dataset.images[: self.validation_count]]

    def batches(self, device: torch.device) -> Iterator[Batch]:
        """One epoch of micro-batches, exactly those the host's loop would train on."""
        for items in self.dataset.epoch():
            b = self.dataset.batch(items)
            weight = b.weights.to(device) if b.weights is not None else None
            yield Batch(latents=b.latents.to(device), prompts=b.texts, weight=weight, sizes=b.sizes)


def prepare_training_data(
    cfg, *, placeholder: str, seed: int, validation_count: int = 4, require_name: bool = True,
    family: str | None = None,
) -> TrainingData:
    """Read and check the images and the template (no model work): errors name the file.
    `require_name`: the template must hold [name] (textual inversion; hypernetworks need none).
    `family` (the model's, "sd1"/"sd2"/"sdxl") decides the bucket step the UNet can take."""
    opts = DatasetOptions(
        data_root=cfg.data_root,
        width=cfg.training_width,
        height=cfg.training_height,
        placeholder_token=placeholder,
        template_file=cfg.template_path(),
        batch_size=cfg.batch_size,
        gradient_step=cfg.gradient_step,
        shuffle_tags=cfg.shuffle_tags,
        tag_drop_out=cfg.tag_drop_out,
        varsize=cfg.varsize,
        use_weight=cfg.use_weight,
        flip_p=cfg.flip_p,
        crop=cfg.crop,
        filename_word_regex=cfg.dataset_filename_word_regex,
        filename_join_string=cfg.dataset_filename_join_string,
        require_name_in_template=require_name,
        latent_sampling_method=cfg.latent_sampling_method,
        seed=seed,
        keep_tokens=cfg.keep_tokens,
        caption_dropout_rate=cfg.caption_dropout_rate,
        folder_repeats=cfg.folder_repeats,
        bucketing=cfg.bucketing,
        bucket_step=resolve_step(cfg.bucket_step, family) if cfg.bucketing else 64,
        bucket_max_aspect=cfg.bucket_max_aspect,
        bucket_upscale=cfg.bucket_upscale,
    )
    train, holdout = split_dataset(opts, split=getattr(cfg, "validation_split", 0.0),
                                   validation_dir=getattr(cfg, "validation_dir", ""))
    return TrainingData(train, validation_count, holdout)


@torch.no_grad()
def validation_loss(
    host: TrainingHost,
    schedule: NoiseSchedule,
    data: TrainingData,
    seed: int,
    autocast_dtype: torch.dtype | None = None,
    parallel: DataParallel | None = None,
) -> float:
    """Loss on fixed latents, prompts, timesteps and noise: a far steadier progress signal than the
    training loss, whose timestep and noise are drawn anew each step. Timesteps are spread evenly
    over the schedule so every noise level counts. It is always the plain MSE over the whole schedule
    without noise offset, whatever the run's loss options, so curves compare across settings.
    `parallel`: each process computes every world-th image and the sum is shared, so every process
    gets the same value (decisions on it agree)."""
    dp = parallel or SINGLE
    info = host.describe()
    g = torch.Generator().manual_seed(seed + 7919)
    total, n = 0.0, 0
    repeats = 4
    for i, (latent, prompt, weight, size) in enumerate(data.validation_set):
        x0 = latent.unsqueeze(0).expand(repeats, *latent.shape).to(info.device)
        t = torch.linspace(0, schedule.num_timesteps - 1, repeats + 2)[1:-1].round().long()
        noise = torch.randn(x0.shape, generator=g)
        if dp.active and i % dp.world != dp.rank:  # another process' image (its noise drawn all the same)
            continue
        w = weight.unsqueeze(0).expand(repeats, *weight.shape) if weight is not None else None
        with autocast_context(info.device, autocast_dtype):
            cond = host.encode_text([prompt] * repeats, [size] * repeats)
            loss = diffusion_loss(host, schedule, x0, cond, weight=w, t=t, noise=noise)
        total += float(loss)
        n += 1
    if dp.active:
        total, n = dp.sum(total), len(data.validation_set)
    return total / max(1, n)
