"""The command line does what the tab and the API do: every job kind, `run job.json` with the body of
POST /sdtrain/v1/jobs (same files, same errors), the progress bar, and `--webui` lookups."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_sdtrain.__main__ import _checkpoint, _tiny
from lib_sdtrain.api.routes import ApiOptions, mount
from lib_sdtrain.cli import HostFactories, main
from lib_sdtrain.cli.progress import PROGRESS_ENV, ProgressPrinter
from lib_sdtrain.cli.webui_folder import WebuiFolder
from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.hypernetwork.network import load_hypernetwork
from lib_sdtrain.core.jobs.service import Event, JobService
from lib_sdtrain.core.tasks.registry import job_runners
from lib_sdtrain.hosts.standalone.host import StandaloneHost
from lib_sdtrain.hosts.standalone.tiny import save_tiny_checkpoint, write_tiny_yaml

TRAIN_SMALL = {"training_width": 64, "training_height": 64, "batch_size": 2, "create_image_every": 0,
               "template_filename": "subject_filewords.txt", "save_training_settings_to_txt": False}


@pytest.fixture(autouse=True)
def _progress_not_forced(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)


@pytest.fixture(scope="module")
def model_files(tiny_sd1, tiny_sd1_dir, tmp_path_factory):
    """The tiny SD1 as a webui checkpoint with its yaml beside it (the yaml names the local CLIP folder)."""
    folder = tmp_path_factory.mktemp("ckpt")
    ckpt = save_tiny_checkpoint(tiny_sd1, folder / "tinymodel.safetensors")
    yaml = write_tiny_yaml(folder / "tinymodel.yaml", clip_dir=tiny_sd1_dir / "clip")
    return ckpt, yaml


@pytest.fixture
def data(tmp_path):
    return str(write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1))


devices: list = []  # the device each checkpoint load was asked for


def in_process(tiny_sd1, calls=None):
    """Hosts over the session's tiny model; `calls` records what the checkpoint factory was asked."""
    def checkpoint(ckpt, yaml, clip_dir, webui, device=None):
        if calls is None:
            pytest.fail("this command must not load a model")
        calls.append((ckpt, yaml, clip_dir, webui))
        devices.append(device)
        return StandaloneHost(tiny_sd1)

    return HostFactories(checkpoint=checkpoint, tiny=_tiny)


REAL = HostFactories(checkpoint=_checkpoint, tiny=_tiny)  # as `python -m lib_sdtrain` wires them


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path (the log folder's date as DATE: a run may cross midnight)."""
    return {re.sub(r"^log/\d{4}-\d{2}-\d{2}/", "log/DATE/", p.relative_to(root).as_posix()): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def api_run(host, bodies, cwd: Path, monkeypatch) -> None:
    """Each body posted to POST /sdtrain/v1/jobs of an app over `host` (relative folders from `cwd`),
    one after the other, each to its end."""
    monkeypatch.chdir(cwd)
    service = JobService(lambda: host, job_runners())
    app = FastAPI()
    mount(app, service, ApiOptions())
    client = TestClient(app)
    try:
        for body in bodies:
            r = client.post("/sdtrain/v1/jobs", json=body)
            assert r.status_code == 202, r.json()
            deadline = time.time() + 60
            while (job := client.get(f"/sdtrain/v1/jobs/{r.json()['id']}").json())["state"] in ("queued", "running"):
                assert time.time() < deadline
                time.sleep(0.02)
            assert job["state"] == "done", job
    finally:
        service.shutdown()


def cli_run(bodies, cwd: Path, monkeypatch, hosts, *extra: str) -> None:
    """The same bodies as job files through `python -m lib_sdtrain run job.json`."""
    monkeypatch.chdir(cwd)
    for i, body in enumerate(bodies):
        job = cwd.parent / f"{cwd.name}-job{i}.json"
        job.write_text(json.dumps(body), encoding="utf-8")
        assert main(["run", str(job), *extra], hosts) == 0


def test_run_job_file_writes_the_bytes_the_api_job_writes(model_files, data, tmp_path, monkeypatch):
    """Create + train an embedding from the same JSON through the API and through `run` over the
    checkpoint loaded the real way (file + yaml): the same files, byte for byte."""
    ckpt, yaml = model_files
    bodies = [
        {"kind": "create_embedding", "config": {"name": "same", "num_vectors_per_token": 2, "init_text": "shape",
                                                "embeddings_dir": "embeddings"}},
        {"kind": "train_embedding", "config": {"embedding_name": "same", "embeddings_dir": "embeddings",
                                               "data_root": data, "log_directory": "log", "steps": 4,
                                               "learn_rate": 0.01, "save_embedding_every": 2, "seed": 7,
                                               **TRAIN_SMALL}},
    ]
    (tmp_path / "api").mkdir()
    (tmp_path / "cli").mkdir()
    api_run(StandaloneHost.load_checkpoint(ckpt, yaml), bodies, tmp_path / "api", monkeypatch)
    cli_run(bodies, tmp_path / "cli", monkeypatch, REAL, "--ckpt", str(ckpt), "--yaml", str(yaml))
    api, cli = tree(tmp_path / "api"), tree(tmp_path / "cli")
    assert sorted(api) == sorted(cli) and "embeddings/same.pt" in cli
    assert any(name.endswith("same-2.pt") for name in cli)  # the intermediate save, in the log folder
    assert api == cli
    emb = load_embedding(tmp_path / "cli" / "embeddings" / "same.pt")
    assert emb.step == 4 and emb.sd_checkpoint_name == "tinymodel"


def test_run_job_file_hypernetwork_same_bytes_as_the_api(tiny_sd1, model_files, data, tmp_path, monkeypatch):
    bodies = [
        {"kind": "create_hypernetwork", "config": {"name": "hn", "enable_sizes": [64], "seed": 3,
                                                   "hypernetwork_dir": "hypernetworks"}},
        {"kind": "train_hypernetwork", "config": {"hypernetwork_name": "hn", "hypernetwork_dir": "hypernetworks",
                                                  "data_root": data, "log_directory": "log", "steps": 3,
                                                  "learn_rate": 0.001, "save_hypernetwork_every": 0, "seed": 5,
                                                  **TRAIN_SMALL}},
    ]
    (tmp_path / "api").mkdir()
    (tmp_path / "cli").mkdir()
    api_run(StandaloneHost(tiny_sd1), bodies, tmp_path / "api", monkeypatch)
    calls = []
    cli_run(bodies, tmp_path / "cli", monkeypatch, in_process(tiny_sd1, calls), "--ckpt", str(model_files[0]))
    assert len(calls) == 1  # for the training; creating a hypernetwork loads no model
    api, cli = tree(tmp_path / "api"), tree(tmp_path / "cli")
    assert "hypernetworks/hn.pt" in cli and "hypernetworks/hn.pt.optim" in cli
    assert api == cli
    assert load_hypernetwork(tmp_path / "cli" / "hypernetworks" / "hn.pt").step == 3


def test_hypernetwork_and_preprocess_commands(tiny_sd1, model_files, data, tmp_path, capsys):
    """create-hypernetwork and preprocess load no model; train-hypernetwork takes the flags."""
    from PIL import Image

    hn_dir = str(tmp_path / "hn")
    no_model = in_process(tiny_sd1)
    assert main(["create-hypernetwork", "--name", "flags", "--enable-sizes", "64", "--layer-structure", "1, 2, 1",
                 "--hypernetwork-dir", hn_dir, "--seed", "1"], no_model) == 0
    calls = []
    assert main(["train-hypernetwork", "--ckpt", str(model_files[0]), "--hypernetwork-name", "flags",
                 "--hypernetwork-dir", hn_dir, "--data-root", data, "--log-directory", str(tmp_path / "log"),
                 "--steps", "2", "--training-width", "64", "--training-height", "64", "--create-image-every", "0",
                 "--save-hypernetwork-every", "0", "--template-filename", "subject_filewords.txt",
                 "--learn-rate", "0.001", "--progress", "lines"], in_process(tiny_sd1, calls)) == 0
    assert calls == [(str(model_files[0]), str(model_files[1]), None, None)]  # the yaml beside it
    assert load_hypernetwork(os.path.join(hn_dir, "flags.pt")).step == 2

    src = tmp_path / "raw"
    src.mkdir()
    Image.new("RGB", (120, 80), (200, 10, 10)).save(src / "wide.png")
    capsys.readouterr()
    args = ["preprocess", "--process-src", str(src), "--process-width", "64", "--process-height", "64"]
    assert main([*args, "--process-dst", str(tmp_path / "cap"), "--process-caption"], no_model) == 2
    assert "error: process_caption: " in capsys.readouterr().err and not (tmp_path / "cap").exists()
    assert main([*args, "--process-dst", str(tmp_path / "out"), "--process-flip"], no_model) == 0
    out = sorted((tmp_path / "out").glob("*.png"))
    assert len(out) == 2 and all(Image.open(p).size == (64, 64) for p in out)
    assert "done: " in capsys.readouterr().out


def _api_error(body_text: str) -> tuple[str, str]:
    """The 422 the API answers for this body: (field, message)."""
    service = JobService(lambda: pytest.fail("no model for a bad request"), job_runners())
    app = FastAPI()
    mount(app, service, ApiOptions())
    r = TestClient(app).post("/sdtrain/v1/jobs", content=body_text, headers={"content-type": "application/json"})
    service.shutdown()
    assert r.status_code == 422, r.json()
    detail = r.json()["detail"][0]
    return detail["loc"][1], detail["msg"]


@pytest.mark.parametrize("body, field", [
    ("not json", "body"),
    ("[1, 2]", "body"),
    ('{"kind": "bake_cake", "config": {}}', "kind"),
    ('{"config": {}}', "kind"),
    ('{"kind": "create_embedding", "config": {"name": "e"}, "priority": 1}', "priority"),
    ('{"kind": "create_embedding", "config": [1]}', "config"),
    ('{"kind": "create_embedding", "config": {"name": "e", "nope": 1}}', "nope"),
    ('{"kind": "create_embedding", "config": {"name": "e", "num_vectors_per_token": 0}}', "num_vectors_per_token"),
    ('{"kind": "train_embedding", "config": {"embedding_name": "e", "data_root": "DATA", "batch_size": "two"}}',
     "batch_size"),
    ('{"kind": "preprocess", "config": {"process_src": "DATA", "process_dst": "DATA"}}', "process_dst"),
])
def test_run_refuses_bad_input_with_exit_2_naming_the_field_as_the_api(body, field, data, tiny_sd1, tmp_path,
                                                                       capsys):
    body = body.replace("DATA", data)
    job = tmp_path / "job.json"
    job.write_text(body, encoding="utf-8")
    assert main(["run", str(job), "--ckpt", "model.safetensors"], in_process(tiny_sd1)) == 2  # no model loaded
    api_field, api_message = _api_error(body)
    assert api_field == field
    assert capsys.readouterr().err.strip() == f"error: {field}: {api_message}"


def test_run_refuses_missing_files_and_models(tiny_sd1, tmp_path, capsys):
    hosts = in_process(tiny_sd1)
    assert main(["run", str(tmp_path / "absent.json")], hosts) == 2
    assert "cannot read" in capsys.readouterr().err
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"kind": "create_embedding", "config": {"name": "e"}}), encoding="utf-8")
    assert main(["run", str(job)], hosts) == 2  # the kind needs a model and none was given
    assert "needs a model: give --ckpt" in capsys.readouterr().err
    assert main(["run", str(job), "--ckpt", str(tmp_path / "absent.safetensors")], hosts) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["create-embedding", "--ckpt", "x", "--config", str(job)], hosts) == 2  # a job body is no config
    assert "error: kind: unknown field" in capsys.readouterr().err


def test_device_flag_picks_where_the_model_loads_and_refuses_what_torch_cannot_use(tiny_sd1, model_files, tmp_path,
                                                                                  capsys, monkeypatch):
    """--device: the model is loaded there; without it, cuda when torch sees one, else the CPU; a device
    that does not exist here is exit 2 naming the flag, before any model is loaded."""
    import torch

    ckpt, _ = model_files
    calls: list = []
    hosts = in_process(tiny_sd1, calls)
    monkeypatch.chdir(tmp_path)
    create = ["create-embedding", "--ckpt", str(ckpt), "--embeddings-dir", "emb", "--overwrite-old"]
    devices.clear()
    assert main([*create, "--name", "a"], hosts) == 0
    assert main([*create, "--name", "b", "--device", "cpu"], hosts) == 0
    assert devices == [torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.device("cpu")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bad, says in (("cuda", "this torch sees no CUDA device"), ("cuda:0", "this torch sees no CUDA device"),
                      ("gpu7", "not a device torch knows")):
        assert main([*create, "--name", "c", "--device", bad], hosts) == 2
        assert f"--device {bad}: {says}" in capsys.readouterr().err
    assert len(calls) == 2  # the refused ones loaded nothing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([*create, "--name", "c", "--device", "cuda:1"], hosts) == 2
    assert "there are 1 CUDA devices" in capsys.readouterr().err


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train_argv(ckpt, name, data, tmp_path, steps):
    return ["train-embedding", "--ckpt", str(ckpt), "--embedding-name", name, "--embeddings-dir",
            str(tmp_path / "e"), "--data-root", data, "--log-directory", str(tmp_path / "log"), "--steps", str(steps),
            "--training-width", "64", "--training-height", "64", "--create-image-every", "0",
            "--save-embedding-every", "0", "--template-filename", "subject_filewords.txt"]


def test_progress_bar_on_a_terminal_plain_lines_elsewhere(tiny_sd1, model_files, data, tmp_path, monkeypatch):
    hosts = in_process(tiny_sd1, [])
    ckpt = model_files[0]
    for name in ("bar", "lines", "file"):
        assert main(["create-embedding", "--ckpt", str(ckpt), "--name", name, "--embeddings-dir",
                     str(tmp_path / "e")], hosts) == 0
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stdout", tty)
    assert main(_train_argv(ckpt, "bar", data, tmp_path, steps=5), hosts) == 0
    out = tty.getvalue()
    bars = [seg for seg in out.split("\r") if seg.startswith("[")]
    assert len(bars) >= 2  # drawn, then redrawn in place
    assert all(w in bars[-1] for w in ("5/5", "loss ", "lr ", "it/s", "ETA"))
    assert re.search(r"\r\[#+\] 5/5 [^\r\n]*\n", out)  # the finished bar ends with a newline
    assert ", lr " not in out and out.endswith("\n")  # no plain step lines

    for form in ("lines", "file"):  # the same terminal told to print lines; a file (no TTY)
        stream = FakeTTY() if form == "lines" else io.StringIO()
        monkeypatch.setattr(sys, "stdout", stream)
        if form == "lines":
            monkeypatch.setenv(PROGRESS_ENV, "lines")
        assert main(_train_argv(ckpt, form, data, tmp_path, steps=2), hosts) == 0
        text = stream.getvalue()
        assert "\r" not in text and "step 2/2" in text and text.endswith("\n")
        monkeypatch.delenv(PROGRESS_ENV, raising=False)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    assert main([*_train_argv(ckpt, "file", data, tmp_path, steps=3), "--progress", "bar"], hosts) == 0
    assert "\r[" in stream.getvalue()  # the flag forces the bar into a file


def test_progress_printer_redraws_in_place_and_prints_messages_above_the_bar():
    tty = io.StringIO()
    p = ProgressPrinter(tty, bar=True, width=100, redraw=0.125)
    for i in range(1, 11):  # a step every 1/16 s: redrawn every 1/8 s, and at the last step
        p.event(Event("step", {"step": i, "total": 10, "loss": 0.5 / i, "lr": 0.005, "text": ""}, time=100 + i / 16))
        if i == 4:
            p.event(Event("file", {"path": "/x/emb.pt"}, time=100.3))
    p.close()
    out = tty.getvalue()
    assert out.count("\r[") == 5 + 1 + 1  # steps 1, 3, 5, 7, 9; the last; the bar again under the message
    assert "\r  wrote /x/emb.pt\n" in out and out.endswith("\n") and out.count("\n") == 2
    assert "10/10  loss 0.05000  lr 0.005  16.00 it/s  ETA 0:00" in out
    assert all(len(line) < 100 for line in out.replace("\r", "\n").split("\n"))
    plain = io.StringIO()
    p = ProgressPrinter(plain, bar=False)
    for i in (1, 2, 3):
        p.event(Event("step", {"step": i, "total": 3, "loss": 1.0, "lr": 0.1, "text": f"step {i}/3"}, time=i * 0.1))
    p.close()
    assert plain.getvalue() == "  step 1/3\n  step 3/3\n"  # at most a line a second, and the last one


@pytest.fixture
def webui(model_files, tmp_path):
    """A webui folder as A1111 lays it out, the checkpoint in a subfolder with its yaml beside it."""
    ckpt, yaml = model_files
    root = tmp_path / "webui"
    models = root / "models" / "Stable-diffusion"
    (models / "sub").mkdir(parents=True)
    shutil.copy(ckpt, models / "sub" / "tinymodel.safetensors")
    shutil.copy(yaml, models / "sub" / "tinymodel.yaml")
    (models / "other.ckpt").write_bytes(b"never loaded")
    (models / "tinymodel.vae.safetensors").write_bytes(b"a VAE, not a checkpoint")
    return root


def test_webui_finds_the_checkpoint_by_name_and_its_folders(webui, tiny_sd1, tmp_path, capsys):
    found = webui / "models" / "Stable-diffusion" / "sub" / "tinymodel.safetensors"
    folder = WebuiFolder(webui)
    for name in ("tinymodel", "tinymodel.safetensors", "sub/tinymodel", "sub/tinymodel.safetensors",
                 "tinymodel.safetensors [0123abcdef]"):
        assert folder.find_checkpoint(name) == found
    with pytest.raises(SdtrainError, match=r"no checkpoint 'nothing' in .*; found: other.ckpt, sub/tinymodel"):
        folder.find_checkpoint("nothing")

    # the real load: the name resolves, the yaml beside it is used, embeddings go to <webui>/embeddings
    assert main(["create-embedding", "--webui", str(webui), "--ckpt", "tinymodel", "--name", "w1",
                 "--init-text", "shape"], REAL) == 0
    assert load_embedding(webui / "embeddings" / "w1.pt").n_vectors == 1
    assert f"checkpoint: {found} (config {found.with_suffix('.yaml')})" in capsys.readouterr().out

    calls = []
    hosts = in_process(tiny_sd1, calls)
    assert main(["create-embedding", "--webui", str(webui), "--ckpt", "sub/tinymodel.safetensors", "--name", "w2",
                 "--embeddings-dir", str(tmp_path / "mine"), "--yaml", str(tmp_path / "given.yaml")], hosts) == 0
    assert calls[-1] == (str(found), str(tmp_path / "given.yaml"), None, str(webui))  # a flag wins
    assert (tmp_path / "mine" / "w2.pt").is_file() and not (webui / "embeddings" / "w2.pt").exists()
    assert main(["create-embedding", "--webui", str(webui), "--ckpt", str(found), "--name", "w3"], hosts) == 0
    assert calls[-1][0] == str(found) and (webui / "embeddings" / "w3.pt").is_file()  # a full path still works
    job = tmp_path / "hn.json"
    job.write_text(json.dumps({"kind": "create_hypernetwork", "config": {"name": "whn", "enable_sizes": [64]}}))
    assert main(["run", str(job), "--webui", str(webui)], in_process(tiny_sd1)) == 0
    assert load_hypernetwork(webui / "models" / "hypernetworks" / "whn.pt").name == "whn"

    capsys.readouterr()
    assert main(["create-embedding", "--webui", str(webui), "--ckpt", "nothing", "--name", "w4"], hosts) == 2
    err = capsys.readouterr().err
    assert "no checkpoint 'nothing'" in err and "other.ckpt, sub/tinymodel.safetensors" in err and ".vae" not in err
    (webui / "models" / "Stable-diffusion" / "sub2").mkdir()
    (webui / "models" / "Stable-diffusion" / "sub2" / "tinymodel.ckpt").write_bytes(b"a second one")
    assert main(["create-embedding", "--webui", str(webui), "--ckpt", "tinymodel", "--name", "w4"], hosts) == 2
    err = capsys.readouterr().err
    assert "matches 2 files" in err and "sub/tinymodel.safetensors, sub2/tinymodel.ckpt" in err
    assert len(calls) == 2  # neither error loaded a model
    assert main(["create-embedding", "--webui", str(tmp_path / "nowhere"), "--ckpt", "x", "--name", "w4"], hosts) == 2
    assert "no such folder" in capsys.readouterr().err
