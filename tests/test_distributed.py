"""More than one process (issue 13): `torchrun -m lib_sdtrain train-…` trains data-parallel. Two gloo
processes on the CPU, each training its half of every batch, end with the tensors one process gets
from the combined batch (float rounding apart), and only rank 0 writes: the same files as the single
run, the loss CSV not doubled, rank 1 silent."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_sdtrain.__main__ import _checkpoint, _tiny
from lib_sdtrain.cli import HostFactories, main
from lib_sdtrain.cli.progress import PROGRESS_ENV
from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.hypernetwork.network import load_hypernetwork, load_hypernetwork_optim
from lib_sdtrain.core.training.distributed import SINGLE, DataParallel, from_environment
from lib_sdtrain.hosts.standalone.tiny import save_tiny_checkpoint, write_tiny_yaml

REPO = Path(__file__).resolve().parents[1]
REAL = HostFactories(checkpoint=_checkpoint, tiny=_tiny)  # as `python -m lib_sdtrain` wires them
#: what two processes may differ by from one (measured: below 5e-7 on these runs)
ATOL = 1e-6
#: the same for a hypernetwork under AdamW, whose step lr·m/√v carries the rounding of gradients that
#: are near-cancelling sums much further than SGD's lr·g (measured: 5.2e-6 at lr 0.001)
ADAM_ATOL = 2e-5

TRAIN = {"training_width": 64, "training_height": 64, "batch_size": 2, "steps": 4, "seed": 7,
         "template_filename": "subject_filewords.txt", "log_directory": "log", "training_write_csv_every": 1,
         "validation_every": 2, "create_image_every": 2, "preview_steps": 2}


@pytest.fixture(scope="module")
def model_files(tiny_sd1, tiny_sd1_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    ckpt = save_tiny_checkpoint(tiny_sd1, folder / "tinymodel.safetensors")
    yaml = write_tiny_yaml(folder / "tinymodel.yaml", clip_dir=tiny_sd1_dir / "clip")
    return str(ckpt), str(yaml)


@pytest.fixture
def data(tmp_path):
    return str(write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1))


def flags(config: dict) -> list[str]:
    return [x for k, v in config.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def two_processes(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, dict[int, str]]:
    """`torchrun --nproc-per-node 2 -m lib_sdtrain ARGS` on the CPU (gloo); each rank's standard output."""
    logs = cwd.parent / f"{cwd.name}-torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", PROGRESS_ENV: "lines",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--log-dir", str(logs), "--redirects", "1", "-m", "lib_sdtrain", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    return proc, out


def files(root: Path) -> dict[str, bytes]:
    """Every file in the folders under `root` (the job files beside them aside) by relative path, the
    date and times masked."""
    found = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.parent != root:
            name = re.sub(r"^log/\d{4}-\d{2}-\d{2}/", "log/DATE/", p.relative_to(root).as_posix())
            found[re.sub(r"settings-[\d-]+\.json$", "settings-TIME.json", name)] = p.read_bytes()
    return found


def csv_rows(text: bytes) -> list[list[str]]:
    return [line.split(",") for line in text.decode().splitlines()]


def validation(out: str) -> list[tuple[int, float]]:
    return [(int(m[1]), float(m[2])) for m in re.finditer(r"validation loss at step (\d+): ([\d.]+)", out)]


def check_same_outputs(one: Path, two: Path, ranks: dict[int, str], log: str, printed: str) -> None:
    """The same files; one row per step in the CSV; the same validation losses (`printed`: the single
    run's output); rank 1 printed nothing."""
    a, b = files(one), files(two)
    assert sorted(a) == sorted(b)  # nothing missing, nothing extra (no temporary, no resume point left)
    assert f"log/DATE/{log}/settings-TIME.json" in b
    assert not any(".tmp" in n or n.endswith(".resume") for n in b)
    csv = next(n for n in b if n.endswith("_loss.csv"))
    rows_a, rows_b = csv_rows(a[csv]), csv_rows(b[csv])
    assert [r[:3] for r in rows_b] == [r[:3] for r in rows_a]
    assert len(rows_b) == 1 + TRAIN["steps"]  # not doubled: one process appended
    for ra, rb in zip(rows_a[1:], rows_b[1:]):  # the loss reported is the mean over the processes
        assert float(rb[3]) == pytest.approx(float(ra[3]), abs=1e-5)
    assert "wrote" in ranks[0] and "done:" in ranks[0]
    want, got = validation(printed), validation(ranks[0])
    assert [s for s, _ in got] == [s for s, _ in want] == [0, 2, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-5)  # 5 decimals printed
    assert ranks[1].strip() == ""  # rank 1 trains and prints nothing


def two_folders_with_an_embedding(ckpt: str, tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """`one` (the working directory now) and `two`, each with the same 2-vector embedding emb/e.pt."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    monkeypatch.chdir(one)
    assert main(["create-embedding", "--ckpt", ckpt, "--name", "e", "--num-vectors-per-token", "2",
                 "--init-text", "shape", "--embeddings-dir", "emb"], REAL) == 0
    shutil.copytree(one, two)
    return one, two


def most(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("gradient_step", [1, 2])
def test_two_processes_train_an_embedding_as_one_with_the_combined_batch(model_files, data, tmp_path,
                                                                          monkeypatch, capsys, gradient_step):
    """AdamW, the default (its step does not see the gradient's scale: the hypernetwork's SGD run shows
    that the average is a mean), with and without gradient accumulation."""
    ckpt, _ = model_files
    one, two = two_folders_with_an_embedding(ckpt, tmp_path, monkeypatch)
    start = load_embedding(one / "emb" / "e.pt").vectors["*"]
    config = {"embedding_name": "e", "embeddings_dir": "emb", "data_root": data, "learn_rate": 0.01,
              "save_embedding_every": 2, "gradient_step": gradient_step, **TRAIN}
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    capsys.readouterr()
    assert main(["train-embedding", "--ckpt", ckpt, *flags(config)], REAL) == 0
    proc, ranks = two_processes(["train-embedding", "--ckpt", ckpt, *flags(config)], two)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_same_outputs(one, two, ranks, "e", capsys.readouterr().out)
    diffs = {}
    for name in ("emb/e.pt", "log/*/e/embeddings/e-2.pt"):
        path = next(one.glob(name))
        a, b = load_embedding(path), load_embedding(two / path.relative_to(one))
        assert a.step == b.step
        diffs[name] = most(a.vectors["*"], b.vectors["*"])
        assert torch.allclose(a.vectors["*"], b.vectors["*"], rtol=0, atol=ATOL), diffs
    moved = most(load_embedding(one / "emb" / "e.pt").vectors["*"], start)
    assert moved > 1000 * ATOL  # it trained: tensors that differ are caught
    print(f"gradient_step {gradient_step}: moved {moved:.3g}, max difference {diffs}")


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_two_processes_train_a_hypernetwork_as_one_with_the_combined_batch(model_files, data, tmp_path,
                                                                           monkeypatch, capsys, optimizer):
    """Through `run job.json`, with gradient accumulation. SGD's step is linear in the gradient (a wrong
    average would show): every tensor is compared. AdamW divides each gradient by its running RMS: the key module's biases, whose gradient
    is zero in theory (a shift of every key leaves the attention's softmax unchanged) and float noise
    of ~1e-12 in practice, then take steps of the learning rate's size in the noise's direction, which
    any other order of summing (threads, a GPU, the batch split) changes; those two are left out (the
    gradient they saw is shown to be noise) and every other tensor is compared."""
    ckpt, _ = model_files
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    monkeypatch.chdir(one)
    (one / "create.json").write_text(json.dumps({"kind": "create_hypernetwork", "config": {
        "name": "hn", "enable_sizes": [64], "seed": 3, "hypernetwork_dir": "hn"}}))
    assert main(["run", "create.json"], REAL) == 0
    shutil.copytree(one, two)
    start = [p.detach().clone() for p in load_hypernetwork(one / "hn" / "hn.pt").trainable_params()]
    body = {"kind": "train_hypernetwork", "config": {
        "hypernetwork_name": "hn", "hypernetwork_dir": "hn", "data_root": data, "optimizer_name": optimizer,
        "learn_rate": 0.1 if optimizer == "SGD" else 0.001, "save_hypernetwork_every": 2, "gradient_step": 2,
        **TRAIN}}
    for folder in (one, two):
        (folder / "job.json").write_text(json.dumps(body))
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    capsys.readouterr()
    assert main(["run", "job.json", "--ckpt", ckpt], REAL) == 0
    proc, ranks = two_processes(["run", "job.json", "--ckpt", ckpt], two)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_same_outputs(one, two, ranks, "hn", capsys.readouterr().out)
    trained = [0, 2, 4, 5, 6, 7]  # all but the key module's biases (1, 3)
    compared, atol = (list(range(len(start))), ATOL) if optimizer == "SGD" else (trained, ADAM_ATOL)
    if optimizer == "AdamW":  # the gradient the key module's biases saw is noise
        state = load_hypernetwork_optim(one / "hn" / "hn.pt")["optimizer_state_dict"]["state"]
        rms = [float(state[i]["exp_avg_sq"].max().sqrt()) for i in range(len(start))]
        assert max(rms[1], rms[3]) < 1e-10 < 1e-7 < min(rms[i] for i in trained), rms
    diffs = {}
    for name in ("hn/hn.pt", "log/*/hn/hypernetworks/hn-2.pt"):
        path = next(one.glob(name))
        a, b = load_hypernetwork(path), load_hypernetwork(two / path.relative_to(one))
        assert a.step == b.step
        pa, pb = a.trainable_params(), b.trainable_params()
        diffs[name] = max(most(pa[i], pb[i]) for i in compared)
        assert all(torch.allclose(pa[i], pb[i], rtol=0, atol=atol) for i in compared), diffs
    final = load_hypernetwork(one / "hn" / "hn.pt").trainable_params()
    moved = min(most(final[i], start[i]) for i in trained)
    assert moved > 50 * atol, moved  # every tensor trained: a difference would be caught
    print(f"hypernetwork, {optimizer}: each tensor moved at least {moved:.3g}, max difference {diffs}")


def test_a_batch_that_does_not_split_is_refused_before_any_model_work(model_files, data, tmp_path):
    ckpt, _ = model_files
    config = {"embedding_name": "e", "embeddings_dir": "emb", "data_root": data, **TRAIN, "batch_size": 3}
    proc, _ = two_processes(["train-embedding", "--ckpt", ckpt, *flags(config)], tmp_path)
    assert proc.returncode != 0
    assert "batch_size: is the combined batch of all 2 processes and must be a multiple of 2, got 3" in proc.stderr
    assert not (tmp_path / "log").exists()


def test_one_process_is_left_alone(monkeypatch):
    """Without torchrun (or with one process) nothing is split, averaged or exchanged."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert from_environment() is None
    assert from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert env is not None and (env.world, env.rank, env.local_rank) == (4, 3, 1)
    rows = torch.arange(8)
    assert SINGLE.shard(rows) is rows and SINGLE.mean(2.5) == 2.5 and SINGLE.any(True)
    assert DataParallel(world=4, rank=2).shard(rows).tolist() == [4, 5]
    assert DataParallel(world=4, rank=3).shard(list("abcdefgh")) == ["g", "h"]
    SINGLE.check_batch(3)


def test_two_processes_stop_early_at_the_same_evaluation_and_save_the_same_best_step(model_files, data, tmp_path,
                                                                                     monkeypatch, capsys):
    """Early stopping and the best-step pick decide on the validation loss, which every rank must see the
    same (else one rank stops and the other waits forever): two processes stop where one process stops,
    keep the same best step, and write that step's tensors. A held-out split makes the validation images."""
    ckpt, _ = model_files
    one, two = two_folders_with_an_embedding(ckpt, tmp_path, monkeypatch)
    config = {"embedding_name": "e", "embeddings_dir": "emb", "data_root": data, "learn_rate": 0.5,
              **TRAIN, "steps": 40, "validation_every": 1, "create_image_every": 0, "save_embedding_every": 0,
              "validation_split": 0.25, "early_stop_patience": 2, "final_file": "best"}
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    capsys.readouterr()
    assert main(["train-embedding", "--ckpt", ckpt, *flags(config)], REAL) == 0
    printed = capsys.readouterr().out
    proc, ranks = two_processes(["train-embedding", "--ckpt", ckpt, *flags(config)], two)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    want, got = validation(printed), validation(ranks[0])
    assert len(want) < 1 + config["steps"]  # it did stop early
    assert [s for s, _ in got] == [s for s, _ in want]  # the same evaluations: stopped at the same one
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-5)
    a, b = load_embedding(one / "emb" / "e.pt"), load_embedding(two / "emb" / "e.pt")
    best = min(want, key=lambda sv: sv[1])[0]
    assert best > 0 and a.step == b.step == best  # a trained step, not the start
    assert torch.allclose(a.vectors["*"], b.vectors["*"], rtol=0, atol=ATOL)
    assert ranks[1].strip() == ""
