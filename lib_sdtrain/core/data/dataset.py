"""Core: the training image set (A1111's PersonalizedBase + GroupedBatchSampler, without a model inside).

`TrainDataset.from_options(opts)` reads the template and the images, fails early with a
`DatasetError` on unusable data, and makes captions and batches with its own seeded RNG. It never
encodes anything itself: the trainer calls `cache_latents(host.encode_images)` (or `set_latent`)
to fill one latent slot per image, which `batch()` then reads according to the latent sampling method.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lib_sdtrain.core.data.imageset import (
    CROPS,
    LATENT_SAMPLING_METHODS,
    Crop,
    DatasetOptions,
    ImageRecord,
    ImageSet,
    LatentSampling,
    filename_caption,
    load_images,
    read_template,
    resolve_seed,
)
from lib_sdtrain.core.errors import DatasetError
from lib_sdtrain.core.port import ImageSize, LatentDist

__all__ = [
    "CROPS",
    "LATENT_SAMPLING_METHODS",
    "Batch",
    "Crop",
    "DatasetOptions",
    "GroupedBatchSampler",
    "ImageRecord",
    "ImageSet",
    "LatentSampling",
    "TrainDataset",
    "filename_caption",
    "load_images",
    "read_template",
]

log = logging.getLogger(__name__)
_BICUBIC = Image.Resampling.BICUBIC


class GroupedBatchSampler:
    """The host's GroupedBatchSampler (dataset.py:175-206) on an owned RNG.

    `len = n // batch_size`. Each epoch: every size group is shuffled (in place, so the order carries
    over between epochs, as in the host), cut into full batches, and `n_rand_batches` extra batches are
    drawn with replacement from a group picked by its left-over share; then all batches are shuffled.
    Quirk kept: an epoch can yield more batches than `len` (the train loop caps it).
    """

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, rng: random.Random):
        self.groups = [list(g) for g in groups]
        self.batch_size = b = batch_size
        self.rng = rng
        n = sum(len(g) for g in self.groups)
        self.len = n_batch = n // b
        expected = [len(g) / n * n_batch * b for g in self.groups]
        self.n_rand_batches = nrb = n_batch - sum(int(e) // b for e in expected)
        self.probs = [e % b / nrb / b if nrb > 0 else 0 for e in expected]

    def __len__(self) -> int:
        return self.len

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for g in self.groups:
            self.rng.shuffle(g)
        batches = [g[i * b : (i + 1) * b] for g in self.groups for i in range(len(g) // b)]
        for _ in range(self.n_rand_batches):
            group = self.rng.choices(self.groups, self.probs)[0]
            batches.append(self.rng.choices(group, k=b))
        self.rng.shuffle(batches)
        yield from batches


@dataclass
class Batch:
    items: list[int]
    texts: list[str]
    latents: torch.Tensor  # [B, C, h, w] float32 on CPU
    weights: torch.Tensor | None  # [B, C, h, w] when use_weight
    flipped: list[bool]
    sizes: list[ImageSize]  # SDXL's size conditioning of each item


class TrainDataset:
    """Items (images × repeats), captions, batches and latent slots for one training run."""

    def __init__(self, image_set: ImageSet, template_lines: Sequence[str], opts: DatasetOptions):
        opts.validate()
        if not image_set.images:
            raise DatasetError(f"No usable images found in {opts.data_root}.")
        self.opts = opts
        self.images = image_set.images
        self.skipped = image_set.skipped
        self.lines = list(template_lines)
        self.rng = random.Random(resolve_seed(opts.seed))
        self.generator = torch.Generator().manual_seed(self.rng.getrandbits(63))
        self.latent_sampling_method: LatentSampling = opts.latent_sampling_method
        # pass k lists every image still repeated k+1 times: with one count for all, the host's order
        counts = [opts.repeats * rec.repeats for rec in self.images]
        self.item_image = [i for k in range(max(counts)) for i, c in enumerate(counts) if k < c]
        n = len(self.item_image)
        # host dataset.py:136-137: both clamped so that one optimizer step fits in an epoch
        self.batch_size = min(opts.batch_size, n)
        self.gradient_step = min(opts.gradient_step, n // self.batch_size)
        groups: dict[tuple[int, int], list[int]] = {}
        for item, img in enumerate(self.item_image):
            groups.setdefault(self.images[img].size, []).append(item)
        if len(groups) > 1:
            log.info("Buckets: %s", ", ".join(f"{w}x{h}: {len(v)}" for (w, h), v in sorted(groups.items())))
        self.sampler = GroupedBatchSampler(list(groups.values()), self.batch_size, self.rng)
        # host dataset.py:126-127: without shuffle/dropout each item's prompt is drawn once, at load.
        self.texts_fixed = not (opts.tag_drop_out != 0 or opts.shuffle_tags or opts.caption_dropout_rate != 0)
        self._texts = (
            [self.create_text(self.images[i].filename_text) for i in self.item_image]
            if self.texts_fixed
            else None
        )
        self._slots: dict[tuple[int, bool], torch.Tensor | LatentDist] = {}
        self._weights: dict[tuple[int, int, int], torch.Tensor] = {}

    @classmethod
    def from_options(cls, opts: DatasetOptions) -> TrainDataset:
        """Validate options and template (cheap) before reading the images."""
        opts.validate()
        lines = read_template(opts.template_file, opts.require_name_in_template)
        return cls(load_images(opts), lines, opts)

    def bucket_note(self) -> str:
        """One line on the aspect-ratio buckets (empty without them): images per training size."""
        plan = self.opts.buckets()
        if plan is None:
            return ""
        counts: dict[tuple[int, int], int] = {}
        for rec in self.images:
            counts[rec.size] = counts.get(rec.size, 0) + 1
        sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return (f"aspect-ratio buckets (area {plan.width}x{plan.height}, step {plan.step} px, {len(plan.sizes)} "
                f"sizes): {len(self.images)} images in {len(counts)} buckets: {sizes}")

    # -- sizes (host textual_inversion.py:495-499) --
    def __len__(self) -> int:
        return len(self.item_image)

    @property
    def steps_per_epoch(self) -> int:
        return len(self) // self.batch_size // self.gradient_step

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches trained per epoch: the host's `max_steps_per_epoch` (drop-last for accumulation)."""
        per = len(self) // self.batch_size
        return per - per % self.gradient_step

    # -- captions --
    def create_text(self, filename_text: str) -> str:
        """Host `create_text` (dataset.py:152-161) on the dataset's RNG, plus kohya's caption options:
        with `caption_dropout_rate` the [filewords] part is empty that often (the bare template);
        the first `keep_tokens` tags stay first and are never dropped. Both off draw as the host."""
        text = self.rng.choice(self.lines)
        if self.opts.caption_dropout_rate != 0 and self.rng.random() < self.opts.caption_dropout_rate:
            return text.replace("[filewords]", "").replace("[name]", self.opts.placeholder_token)
        tags = filename_text.split(",")
        kept, tags = tags[: self.opts.keep_tokens], tags[self.opts.keep_tokens :]
        if self.opts.tag_drop_out != 0:
            tags = [t for t in tags if self.rng.random() > self.opts.tag_drop_out]
        if self.opts.shuffle_tags:
            self.rng.shuffle(tags)
        text = text.replace("[filewords]", ",".join(kept + tags))
        return text.replace("[name]", self.opts.placeholder_token)

    def text(self, item: int) -> str:
        if self._texts is not None:
            return self._texts[item]
        return self.create_text(self.images[self.item_image[item]].filename_text)

    # -- batches --
    def epoch(self) -> Iterator[list[int]]:
        """Item-index batches of one epoch, exactly those the host's loop trains on."""
        for j, batch in enumerate(self.sampler):
            if j == self.batches_per_epoch:
                return
            yield batch

    def batch(self, items: Sequence[int]) -> Batch:
        texts, latents, weights, flips, sizes = [], [], [], [], []
        for item in items:
            img = self.item_image[item]
            texts.append(self.text(item))
            flip = self.opts.flip_p > 0 and self.rng.random() < self.opts.flip_p
            flips.append(flip)
            sizes.append(self.image_size(img, flip))
            lat = self.latent(img, flip)
            latents.append(lat)
            if self.opts.use_weight:
                w = self.weight_map(img, (lat.shape[-2], lat.shape[-1]))
                weights.append((w.flip(-1) if flip else w).expand(lat.shape))
        return Batch(
            items=list(items),
            texts=texts,
            latents=torch.stack(latents),
            weights=torch.stack(weights) if weights else None,
            flipped=flips,
            sizes=sizes,
        )

    def image_size(self, image: int, flipped: bool = False) -> ImageSize:
        """SDXL's size conditioning of one image as trained (mirrored or not)."""
        return ImageSize(*self.images[image].geometry(flipped))

    # -- pixels, weights, latents --
    def pixels(self, image: int, flipped: bool = False) -> torch.Tensor:
        """Float `[3, H, W]` in [-1, 1] (host: `npimage / 127.5 - 1`)."""
        rgb = self.images[image].rgb
        if rgb is None:
            raise DatasetError(f"Pixels of {self.images[image].path} were released after caching latents.")
        x = rgb.to(torch.float32) / 127.5 - 1.0
        return x.flip(-1) if flipped else x

    def weight_map(self, image: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Loss weight `[h, w]` (default: pixel size / latent_downscale): alpha with min 0 and mean 1
        (host dataset.py:106-114). Ones for images without alpha, and for uniform alpha, where the
        host divides 0 by 0 and trains on NaN. Deviation: the host resizes alpha to (h, w) as PIL
        (width, height), i.e. transposed, then reshapes; correct only for square images. We don't."""
        rec = self.images[image]
        if size is None:
            size = (rec.size[1] // self.opts.latent_downscale, rec.size[0] // self.opts.latent_downscale)
        key = (image, *size)
        if key not in self._weights:
            w = torch.ones(size)
            if rec.alpha is not None:
                a = Image.fromarray(rec.alpha).resize((size[1], size[0]), _BICUBIC)
                t = torch.from_numpy(np.asarray(a, dtype=np.float32).copy())
                t -= t.min()
                mean = float(t.mean())
                if mean > 0 and torch.isfinite(t).all():
                    w = t / mean
            self._weights[key] = w
        return self._weights[key]

    def set_latent(self, image: int, dist: LatentDist, flipped: bool = False) -> None:
        """Fill an image's slot from its encoding (`[1, C, h, w]` or `[C, h, w]`), kept on CPU as float32:
        "once" keeps one sample, "deterministic" keeps the mean, "random" keeps the distribution."""
        mean, std = dist.mean.detach(), dist.std.detach()
        if mean.dim() == 4:
            if mean.shape[0] != 1:
                raise ValueError(f"set_latent takes one image, got a batch of {mean.shape[0]}")
            mean, std = mean[0], std[0]
        mean = mean.to("cpu", torch.float32)
        std = torch.as_tensor(std).to("cpu", torch.float32).expand_as(mean)
        d = LatentDist(mean, std)
        if self.latent_sampling_method == "random":
            self._slots[(image, flipped)] = d
        elif self.latent_sampling_method == "deterministic":
            self._slots[(image, flipped)] = mean
        else:
            self._slots[(image, flipped)] = d.sample(self.generator)

    def latent(self, image: int, flipped: bool = False) -> torch.Tensor:
        """`[C, h, w]`: the cached tensor, or a fresh sample for "random"."""
        slot = self._slots.get((image, flipped))
        if slot is None:
            which = " (flipped)" if flipped else ""
            raise DatasetError(
                f"No latent cached for {self.images[image].path}{which}; call cache_latents first."
            )
        return slot.sample(self.generator) if isinstance(slot, LatentDist) else slot

    def cache_latents(
        self,
        encode: Callable[[torch.Tensor], LatentDist],
        progress: Callable[[int, int], None] | None = None,
        keep_pixels: bool = False,
    ) -> None:
        """Encode every image one at a time (as the host; sizes may differ) through `encode`, usually
        `TrainingHost.encode_images`; with flip_p > 0 the mirrored image too. `progress(done, total)`
        may raise to abort. Pixels are released afterwards unless `keep_pixels`."""
        variants = (False, True) if self.opts.flip_p > 0 else (False,)
        total, done = len(self.images) * len(variants), 0
        with torch.no_grad():
            for i in range(len(self.images)):
                for flipped in variants:
                    self.set_latent(i, encode(self.pixels(i, flipped).unsqueeze(0)), flipped)
                    done += 1
                    if progress is not None:
                        progress(done, total)
        if not keep_pixels:
            self.release_pixels()

    def release_pixels(self) -> None:
        for rec in self.images:
            rec.rgb = None
