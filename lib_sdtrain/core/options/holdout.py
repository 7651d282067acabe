"""Core: which images a validation split holds out — a pure function of their names.

Each image belongs to a group (its key); the groups are ranked by the SHA-256 of their key and the
first `round(fraction × groups)` (at least one) are held out. The choice depends on nothing but the
names: the same on every run, resume and seed, and adding an image moves no other across. Training
reads a preprocessed folder's files `NNNNN-k-name.png` (flipped copies, tiles and crops of one
source picture share the NNNNN) as one group, so the copies of one picture stay on the same side.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from typing import Any

from lib_sdtrain.core.errors import ConfigError

__all__ = ["FINAL_FILES", "check_validation_options", "group_key", "held_out", "holdout_count"]

#: the preprocess job's output names: `{source index:05}-{variant}-{source stem}`
_PREPROCESSED = re.compile(r"^(\d{5})-\d+-")


def group_key(relative_path: str) -> str:
    """The group of a file inside a dataset folder (a path relative to it, `/`-separated): its
    folder and the preprocess source index of a preprocessed name, else the path itself."""
    folder, _, name = relative_path.rpartition("/")
    m = _PREPROCESSED.match(name)
    return f"{folder}/{m.group(1)}" if m else relative_path


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def holdout_count(groups: int, fraction: float, field: str = "validation_split") -> int:
    """How many of `groups` a split of `fraction` holds out: at least one, and at least one left."""
    n = max(1, round(groups * fraction))
    if n >= groups:
        raise ConfigError(field, f"{fraction} of {groups} image group(s) leaves nothing to train on; "
                                 "a validation split needs at least two images (pictures) in the dataset")
    return n


def held_out(keys: Iterable[str], fraction: float, field: str = "validation_split") -> set[str]:
    """The keys (groups) a split of `fraction` holds out."""
    unique = sorted(set(keys), key=lambda k: (_rank(k), k))
    return set(unique[: holdout_count(len(unique), fraction, field)])


#: what the final file of a run holds (`final_file`)
FINAL_FILES = ("last", "best")


def check_validation_options(cfg: Any) -> None:
    """The held-out set, early stopping and the best step's file, each error naming its field."""

    def need(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ConfigError(name, message)

    need(0.0 <= cfg.validation_split < 1.0, "validation_split",
         f"must be 0 (off) or a fraction below 1, got {cfg.validation_split}")
    need(cfg.early_stop_patience >= 0, "early_stop_patience", "must be 0 (off) or a positive integer")
    need(cfg.early_stop_min_delta >= 0, "early_stop_min_delta", f"must be 0 or more, got {cfg.early_stop_min_delta}")
    need(cfg.validation_images >= 1, "validation_images", "must be at least 1")
    if cfg.validation_dir:
        need(not cfg.validation_split, "validation_dir",
             "is given together with validation_split; hold images out by one of them")
        need(os.path.isdir(cfg.validation_dir), "validation_dir", f"no such folder: {cfg.validation_dir}")
        val, data = os.path.realpath(cfg.validation_dir), os.path.realpath(cfg.data_root)
        need(val != data, "validation_dir", "is the dataset directory itself; its images would be trained on")
        need(not (cfg.folder_repeats and os.path.dirname(val) == data), "validation_dir",
             "is a subfolder of the dataset directory, which folder_repeats trains on")
    uses = [(cfg.validation_split > 0, "validation_split"), (bool(cfg.validation_dir), "validation_dir"),
            (cfg.early_stop_patience > 0, "early_stop_patience"), (cfg.final_file == "best", "final_file")]
    for used, name in uses:
        need(not used or cfg.validation_every > 0, "validation_every",
             f"is 0 (off), and {name} needs the validation loss: measure it every N steps")
    if cfg.final_file == "best" and cfg.ema_decay > 0:
        need(cfg.ema_for_output == cfg.ema_for_previews, "final_file",
             "best with EMA needs ema_for_output and ema_for_previews alike: the file holds the tensors "
             "whose validation loss was best")
