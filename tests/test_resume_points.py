"""Resume points in process (the SIGKILL test is tests/test_crash_resume.py): a hypernetwork with
dropout (torch's global generator) stopped and resumed ends bit-identical to an uninterrupted run; a
run with other training settings does not take another run's point; `resume_interrupted` off starts
from the file and drops the point; temporary files a killed save left are removed at the next start."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from recorder import Recorder

from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.hypernetwork.network import load_hypernetwork
from lib_sdtrain.core.options.config import CreateHypernetworkConfig, TrainHypernetworkConfig
from lib_sdtrain.core.tasks.hypernetwork import create_hypernetwork, train_hypernetwork
from lib_sdtrain.hosts.standalone.host import StandaloneHost


def workspace(root: Path, data: Path) -> dict:
    hn = root / "hypernetworks"
    create_hypernetwork(None, CreateHypernetworkConfig.from_dict({
        "name": "drop", "enable_sizes": [64, 32], "layer_structure": "1, 2, 1", "use_dropout": True,
        "dropout_structure": "0, 0.3, 0", "hypernetwork_dir": str(hn), "seed": 0}))
    return {"hypernetwork_name": "drop", "hypernetwork_dir": str(hn), "data_root": str(data),
            "log_directory": str(root / "log"), "training_width": 64, "training_height": 64, "steps": 8,
            "learn_rate": "0.002", "batch_size": 2, "save_hypernetwork_every": 0, "create_image_every": 0,
            "seed": 3, "flip_p": 0.5, "resume_point_minutes": 0}


def trained(path: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in load_hypernetwork(path).trainable_params()]


def test_a_stopped_hypernetwork_with_dropout_resumes_bit_identical(tiny_sd1, tmp_path):
    host = StandaloneHost(tiny_sd1)
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    ref, run = workspace(tmp_path / "ref", data), workspace(tmp_path / "run", data)
    torch.manual_seed(0)
    train_hypernetwork(host, TrainHypernetworkConfig.from_dict(ref))
    torch.manual_seed(0)  # the same global generator at the start of both runs: dropout draws from it
    first = train_hypernetwork(host, TrainHypernetworkConfig.from_dict(run), Recorder(stop_at=3))
    point = os.path.join(run["hypernetwork_dir"], "drop.pt.resume")
    assert first.stopped and first.step == 3 and os.path.isfile(point)
    torch.manual_seed(12345)  # whatever the process did meanwhile
    rec = Recorder()
    second = train_hypernetwork(host, TrainHypernetworkConfig.from_dict(run), rec)
    assert second.step == 8 and "(resumed from step 3)" in second.message
    assert any(e["text"].startswith("resumed from step 3") for e in rec.of("log"))
    expected, got = trained(os.path.join(ref["hypernetwork_dir"], "drop.pt")), trained(
        os.path.join(run["hypernetwork_dir"], "drop.pt"))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert not os.path.exists(point)  # finished: no resume point left


def test_other_settings_or_a_fresh_start_do_not_take_the_point(tiny_sd1, tmp_path):
    host = StandaloneHost(tiny_sd1)
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    run = workspace(tmp_path / "run", data)
    folder = Path(run["hypernetwork_dir"])
    train_hypernetwork(host, TrainHypernetworkConfig.from_dict(run), Recorder(stop_at=2))
    kept = (folder / "drop.pt.resume").read_bytes()
    # a save killed mid-write leaves a temporary file: the next start removes it
    (folder / ".drop.pt.0123456789ab.tmp").write_bytes(b"half a file")
    rec = Recorder(stop_at=3)
    train_hypernetwork(host, TrainHypernetworkConfig.from_dict({**run, "learn_rate": "0.001"}), rec)
    logs = [e["text"] for e in rec.of("log")]
    assert any("made with other training settings" in t for t in logs), logs
    assert any("left by a save that was cut short" in t for t in logs), logs
    assert not (folder / ".drop.pt.0123456789ab.tmp").exists()
    assert (folder / "drop.pt.resume").read_bytes() != kept  # the stopped run keeps its own point
    rec = Recorder()
    fresh = train_hypernetwork(host, TrainHypernetworkConfig.from_dict({**run, "resume_interrupted": False}), rec)
    assert fresh.step == 8 and "resumed from step" not in fresh.message
    assert not (folder / "drop.pt.resume").exists()
    shutil.rmtree(tmp_path / "run")


def test_settings_at_their_default_leave_the_fingerprint_alone(tmp_path):
    """A setting left at its default is not part of the fingerprint: naming it explicitly changes nothing,
    and neither does an sdtrain update that adds a setting (at a default keeping the old behaviour), so
    the resume points written before the update still resume. A changed setting does count."""
    import dataclasses

    from lib_sdtrain.core.options.config import TrainEmbeddingConfig
    from lib_sdtrain.core.training.resume import fingerprint

    data = write_sample_dataset(tmp_path / "data", count=2, size=64)
    fields = {"embedding_name": "x", "data_root": str(data), "learn_rate": "0.01", "seed": 3}
    base = TrainEmbeddingConfig.from_dict(fields)
    named = TrainEmbeddingConfig.from_dict({**fields, "loss_type": "mse", "noise_offset": 0.0, "optimizer_name": "AdamW"})
    assert fingerprint(named) == fingerprint(base)
    later = dataclasses.make_dataclass("Later", [("a_new_option", float, dataclasses.field(default=0.0))],
                                       bases=(TrainEmbeddingConfig,))
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    assert fingerprint(later(**values)) == fingerprint(base)
    assert fingerprint(later(**values, a_new_option=0.5)) != fingerprint(base)
    assert fingerprint(TrainEmbeddingConfig.from_dict({**fields, "noise_offset": 0.05})) != fingerprint(base)
