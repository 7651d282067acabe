"""Core: the training set and its held-out validation images.

`split_dataset` reads the dataset folder once and cuts it in two: the images a validation split
holds out (core.options.holdout chooses them from their names) never reach the `TrainDataset`, so no
batch can contain them; or it reads a separate validation folder. The held-out images get a
`TrainDataset` of their own, only for their latents and prompts: no flips, no tag shuffling or
dropout, its own random generators (the training set's draws are not touched).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lib_sdtrain.core.data.dataset import TrainDataset
from lib_sdtrain.core.data.imageset import DatasetOptions, ImageSet, load_images, read_template
from lib_sdtrain.core.errors import DatasetError
from lib_sdtrain.core.options.holdout import group_key, held_out

__all__ = ["relative_name", "split_dataset"]


def relative_name(path: Path | str, root: Path | str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _validation_options(opts: DatasetOptions, root: str | os.PathLike[str]) -> DatasetOptions:
    """The held-out images as the validation loss takes them: each once, as it is, one fixed prompt."""
    return dataclasses.replace(opts, data_root=root, flip_p=0.0, shuffle_tags=False, tag_drop_out=0.0,
                               caption_dropout_rate=0.0, repeats=1)


def split_dataset(
    opts: DatasetOptions, *, split: float = 0.0, validation_dir: str = ""
) -> tuple[TrainDataset, TrainDataset | None]:
    """(training set, held-out set or None). Without a split or folder: `TrainDataset.from_options`."""
    if not split and not validation_dir:
        return TrainDataset.from_options(opts), None
    opts.validate()
    lines = read_template(opts.template_file, opts.require_name_in_template)
    images = load_images(opts)
    if validation_dir:
        try:
            val = load_images(_validation_options(opts, validation_dir))
        except DatasetError as e:
            raise DatasetError(f"validation_dir: {e}") from None
        train = images
    else:
        keys = {id(rec): group_key(relative_name(rec.path, opts.data_root)) for rec in images.images}
        out = held_out(keys.values(), split)
        train = ImageSet([r for r in images.images if keys[id(r)] not in out], images.skipped)
        val = ImageSet([r for r in images.images if keys[id(r)] in out], [])
    val_opts = _validation_options(opts, validation_dir or opts.data_root)
    return TrainDataset(train, lines, opts), TrainDataset(val, lines, val_opts)
