"""Core: hypernetwork jobs — create one, train it (the host's create_hypernetwork and
train_hypernetwork, on the run scaffolding textual inversion uses: core/training_run.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lib_sdtrain.core.errors import ConfigError, SdtrainError
from lib_sdtrain.core.formats.fsutil import resolve_inside, safe_name
from lib_sdtrain.core.hypernetwork.network import (
    Hypernetwork,
    find_hypernetwork_file,
    load_hypernetwork,
    load_hypernetwork_optim,
    save_hypernetwork,
    save_hypernetwork_optim,
)
from lib_sdtrain.core.jobs.service import JobControl
from lib_sdtrain.core.options.config import CreateHypernetworkConfig, TrainHypernetworkConfig
from lib_sdtrain.core.port import ImageSize, ModelInfo, TrainingHost
from lib_sdtrain.core.training.optimizer_state import restore_optimizer
from lib_sdtrain.core.training.run import TrainingKind, TrainResult, run_training
from lib_sdtrain.core.training.watchdog import Subject

LOSS_CSV = "hypernetwork_loss.csv"

__all__ = ["HypernetworkTraining", "create_hypernetwork", "train_hypernetwork"]


# -- create -------------------------------------------------------------------------------------------------
def create_hypernetwork(
    host: TrainingHost | None, cfg: CreateHypernetworkConfig, control: JobControl | None = None
) -> str:
    """The host's create_hypernetwork: a fresh hypernetwork at step 0, written to
    `<hypernetwork_dir>/<name>.pt`. Needs no model (`host` is unused). Returns the path (the host
    returns None and shows "Created: None")."""
    name = safe_name(cfg.name)
    os.makedirs(cfg.hypernetwork_dir, exist_ok=True)
    path = str(resolve_inside(cfg.hypernetwork_dir, f"{name}.pt"))
    if os.path.exists(path) and not cfg.overwrite_old:
        raise SdtrainError(f"file {path} already exists (tick 'Overwrite Old Hypernetwork' to replace it)")
    hn = Hypernetwork(
        name=name,
        enable_sizes=list(cfg.enable_sizes),
        layer_structure=cfg.layer_structure_list(),
        activation_func=cfg.activation_func,
        weight_init=cfg.weight_init,
        add_layer_norm=cfg.add_layer_norm,
        use_dropout=cfg.use_dropout,
        dropout_structure=cfg.dropout_structure_list(),
        seed=cfg.seed if cfg.seed >= 0 else None,
    )
    _dry_run(hn)
    save_hypernetwork(hn, path)
    if control is not None:
        control.emit("file", path=path, what="hypernetwork")
    return path


def _dry_run(hn: Hypernetwork) -> None:
    """Some activations the host lists build but cannot run on a [batch, tokens, width] context
    (glu halves the width, softmax2d wants images): refuse them now, not at the first step."""
    for size, (k, _v) in hn.layers.items():
        try:
            with torch.no_grad():
                out = k(torch.zeros(1, 2, size))
        except Exception as e:  # any torch shape/arg error
            raise ConfigError(
                "activation_func", f"{hn.activation_func!r} does not work in a hypernetwork layer ({e})"
            ) from None
        if out.shape != (1, 2, size):
            raise ConfigError(
                "activation_func", f"{hn.activation_func!r} changes the width {size} to {out.shape[-1]}"
            )


# -- train --------------------------------------------------------------------------------------------------
class HypernetworkTraining(TrainingKind):
    """The hypernetwork part of a run (the host's train_hypernetwork): the modules trained in train
    mode with multiplier 1, in eval mode for previews; the optimizer chosen by name (the host's:
    AdamW with the learning rate only); `.pt` saves storing the base name."""

    noun = "hypernetwork"
    job_label = "train-hypernetwork"
    progress_label = "Training hypernetwork"
    log_subdir = "hypernetworks"
    loss_csv = LOSS_CSV
    require_name_in_template = False  # the hypernetwork acts on every prompt
    file_ext = "pt"

    def __init__(self, host: TrainingHost, cfg: TrainHypernetworkConfig):
        self.cfg = cfg
        self.name = cfg.hypernetwork_name
        self.info = host.describe()
        src = cfg.hypernetwork_file or find_hypernetwork_file(cfg.hypernetwork_dir, self.name)
        if not src:
            raise SdtrainError(
                f"no hypernetwork named {self.name!r} in {cfg.hypernetwork_dir}; create it first"
            )
        self.source = src
        self.hn = load_hypernetwork(src)
        self.initial_step = self.hn.step or 0
        # The host writes <hypernetwork_dir>/<name>.pt whatever folder the source came from; we write
        # back to the source, so a hypernetwork in a subfolder keeps being the one the host lists.
        self.out_file = src
        self.save_every = cfg.save_hypernetwork_every
        self.optimizer_choice = cfg.optimizer_choice()
        self.optimizer_name = cfg.optimizer_name

    def settings(self) -> dict[str, Any]:
        hn = self.hn
        return {
            "hypernetwork_name": self.cfg.hypernetwork_name,
            "save_hypernetwork_every": self.cfg.save_hypernetwork_every,
            "layer_structure": hn.layer_structure,
            "activation_func": hn.activation_func,
            "weight_init": hn.weight_init,
            "add_layer_norm": hn.add_layer_norm,
            "use_dropout": hn.use_dropout,
            "optimizer_name": self.optimizer_name,
        }

    def subject(self) -> Subject:
        return Subject("hypernetwork", "the hypernetwork's weights", "Hypernetwork Learning rate", (
            "it takes no part in the model's forward pass. Check that its layer sizes include this model's "
            "cross-attention width (see the log's note)."))

    def notes(self, info: ModelInfo) -> list[str]:
        width = info.context_width
        if width and width not in self.hn.layers:
            return [
                f"{self.name} has no module for this model's text width {width} (it has "
                f"{sorted(self.hn.layers)}): only self-attention layers of those widths are trained"
            ]
        return []

    def setup(self, device: torch.device, lr: float) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        self.hn.to(device).set_multiplier(1.0).train(True)
        params = self.hn.trainable_params()
        return params, self.optimizer_choice.build(params, lr)

    def resume(self, optimizer: torch.optim.Optimizer) -> str | None:
        # The host reads a matching .optim whatever save_optimizer_state says.
        saved = load_hypernetwork_optim(self.source)
        if saved is None:
            return None
        if saved["optimizer_name"] != self.optimizer_name:
            return (
                f"ignored {self.source}.optim: it holds {saved['optimizer_name']} state and this run "
                f"uses {self.optimizer_name}; starting {self.optimizer_name} afresh"
            )
        why = restore_optimizer(optimizer, saved["optimizer_state_dict"], keep=self.optimizer_choice.kwargs())
        if why is not None:
            return f"ignored {self.source}.optim: {why}"
        return f"resumed optimizer state from {self.source}.optim"

    def encoder(self, host: TrainingHost) -> Callable[[list[str], list[ImageSize] | None], Any]:
        def encode(prompts: list[str], sizes: list[ImageSize] | None = None) -> Any:
            with torch.no_grad():  # the text side is frozen and has nothing trainable
                return host.encode_text(prompts, sizes)

        return encode

    def active(self, host: TrainingHost):
        return host.use_hypernetwork([self.hn])

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        was_training = self.hn.training
        self.hn.eval()
        try:
            yield
        finally:
            self.hn.train(was_training)

    def intermediate(self, step: int) -> tuple[str, str]:
        return f"{self.name}-{step}", self.name  # the host's save_hypernetwork stores the base name

    def save(self, optimizer: torch.optim.Optimizer, step: int, path: str, stored_name: str) -> None:
        hn = self.hn
        hn.step = step
        hn.name = stored_name
        hn.sd_checkpoint = self.info.checkpoint_hash or None
        hn.sd_checkpoint_name = self.info.checkpoint_name or None
        hn.optimizer_name = self.optimizer_name
        save_hypernetwork(hn, path)
        if self.cfg.save_optimizer_state:
            # Paired by the sha256 of the file just written, which is what the host compares on
            # load. (The host hashes its *source* file here, so its intermediate .optim never match.)
            save_hypernetwork_optim(path, optimizer.state_dict(), self.optimizer_name,
                                    self.optimizer_choice.settings(optimizer))

    def finish(self) -> None:
        self.hn.eval()


def train_hypernetwork(
    host: TrainingHost, cfg: TrainHypernetworkConfig, control: JobControl | None = None
) -> TrainResult:
    return run_training(host, cfg, control, HypernetworkTraining(host, cfg))
