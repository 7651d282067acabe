"""HTTP API over the job service and the standalone host (FastAPI TestClient, no webui)."""

from __future__ import annotations

import base64
import re
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_sdtrain import version
from lib_sdtrain.api.routes import ApiOptions, mount
from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.jobs.service import JobService
from lib_sdtrain.core.tasks.registry import job_runners
from lib_sdtrain.hosts.standalone.host import StandaloneHost


@pytest.fixture
def env(tiny_sd1, tmp_path):
    host = StandaloneHost(tiny_sd1)
    service = JobService(lambda: host, job_runners())
    data = write_sample_dataset(tmp_path / "data", count=4, size=64)
    def defaults(kind):
        out = ({"hypernetwork_dir": str(tmp_path / "hypernetworks")} if "hypernetwork" in kind
               else {"embeddings_dir": str(tmp_path / "embeddings")})
        return out if kind.startswith("create_") else {**out, "log_directory": str(tmp_path / "log")}

    app = FastAPI()
    hits = []

    @app.post("/sdapi/v1/train/embedding")
    def host_train(body: dict):  # the host's route, registered first as in the webui
        hits.append(body)
        return {"info": "host"}

    mount(app, service, ApiOptions(defaults=defaults))
    yield TestClient(app), str(data), tmp_path, hits
    service.shutdown()


def small_train(data, **kw):
    return {"embedding_name": "apiemb", "data_root": data, "steps": 6, "training_width": 64, "training_height": 64,
            "template_filename": "subject_filewords.txt", "create_image_every": 0, "save_embedding_every": 0,
            "learn_rate": 0.01, **kw}


def test_host_routes_create_and_train_like_the_host(env):
    client, data, _, hits = env
    r = client.post("/sdapi/v1/create/embedding", json={"name": "apiemb", "num_vectors_per_token": 2})
    assert r.status_code == 200
    info = r.json()["info"]
    assert info.startswith("create embedding filename: ") and info.endswith("apiemb.pt")
    path = info.split(": ", 1)[1]
    assert load_embedding(path).n_vectors == 2
    # only the host's request fields, id_task included, every other field defaulted
    r = client.post("/sdapi/v1/train/embedding", json={"id_task": "task(1)", **small_train(data)})
    assert r.status_code == 200 and hits == []  # sdtrain's handler answered, not the host's
    info = r.json()["info"]
    assert info == f"train embedding complete: filename: {path} error: None"
    assert load_embedding(path).step == 6


def test_bad_fields_get_422_naming_them(env):
    client, data, _, _ = env
    for body, field in (({"name": "e", "num_vectors_per_token": 0}, "num_vectors_per_token"),
                        ({"name": "e", "nope": 1}, "nope")):
        r = client.post("/sdapi/v1/create/embedding", json=body)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field]
    r = client.post("/sdapi/v1/train/embedding", json=small_train(data, batch_size="two"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "batch_size"]
    r = client.post("/sdtrain/v1/jobs", json={"kind": "bake_cake", "config": {}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "kind"]
    r = client.post("/sdtrain/v1/jobs", content=b"[1,2]", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_job_routes_answer_at_once_and_report_progress(env):
    client, data, _, _ = env
    client.post("/sdapi/v1/create/embedding", json={"name": "apiemb"})
    t0 = time.time()
    r = client.post("/sdtrain/v1/jobs", json={"kind": "train_embedding", "config": small_train(data, steps=40)})
    assert r.status_code == 202 and time.time() - t0 < 2.0
    job_id = r.json()["id"]
    deadline = time.time() + 60
    while time.time() < deadline:
        job = client.get(f"/sdtrain/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "stopped"):
            break
        time.sleep(0.1)
    assert job["state"] == "done", job
    assert job["step"] == 40 and len(job["loss_history"]) == 40
    assert any(f.endswith("apiemb.pt") for f in job["files"])
    listed = client.get("/sdtrain/v1/jobs").json()
    assert job_id in [j["id"] for j in listed] and all("loss_history" not in j for j in listed)
    assert client.get("/sdtrain/v1/jobs/nope").status_code == 404


def test_stop_a_running_job(env):
    client, data, _, _ = env
    client.post("/sdapi/v1/create/embedding", json={"name": "apiemb"})
    job_id = client.post("/sdtrain/v1/jobs", json={"kind": "train_embedding",
                                                   "config": small_train(data, steps=100000)}).json()["id"]
    deadline = time.time() + 60
    while client.get(f"/sdtrain/v1/jobs/{job_id}").json()["step"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert client.post(f"/sdtrain/v1/jobs/{job_id}/stop").status_code == 200
    while client.get(f"/sdtrain/v1/jobs/{job_id}").json()["state"] == "running" and time.time() < deadline:
        time.sleep(0.05)
    job = client.get(f"/sdtrain/v1/jobs/{job_id}").json()
    assert job["state"] == "stopped" and 2 <= job["step"] < 100000
    saved = load_embedding([f for f in job["files"] if f.endswith("apiemb.pt")][-1])
    assert saved.step == job["step"]


def test_schemas_are_in_openapi(env):
    client, *_ = env
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/sdapi/v1/train/embedding"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["learn_rate"]["default"] == "0.005"
    assert body["properties"]["clip_grad_mode"]["enum"] == ["disabled", "value", "norm"]
    assert "/sdtrain/v1/jobs/{job_id}/stop" in spec["paths"]
    schema = client.get("/sdtrain/v1/schema").json()
    assert set(schema) >= {"create_embedding", "train_embedding"}
    assert schema["version"] == version() and re.fullmatch(r"\d+\.\d+\.\d+", version())  # pyproject's


def test_api_auth_like_the_host(tiny_sd1):
    service = JobService(lambda: StandaloneHost(tiny_sd1), job_runners())
    app = FastAPI()
    mount(app, service, ApiOptions(credentials={"alice": "s3cret"}))
    client = TestClient(app)
    assert client.get("/sdtrain/v1/jobs").status_code == 401
    bad = base64.b64encode(b"alice:wrong").decode()
    assert client.get("/sdtrain/v1/jobs", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"alice:s3cret").decode()
    assert client.get("/sdtrain/v1/jobs", headers={"Authorization": f"Basic {good}"}).status_code == 200
    assert client.post("/sdapi/v1/create/embedding", json={"name": "x"}).status_code == 401
    service.shutdown()


def test_host_hypernetwork_routes(env):
    client, data, tmp, _ = env
    r = client.post("/sdapi/v1/create/hypernetwork", json={"name": "apihn", "enable_sizes": [64],
                                                           "layer_structure": "1, 2, 1"})
    assert r.status_code == 200
    path = str(tmp / "hypernetworks" / "apihn.pt")
    assert r.json()["info"] == f"create hypernetwork filename: {path}"  # the host answers "None"
    body = {"hypernetwork_name": "apihn", "data_root": data, "steps": 3, "training_width": 64,
            "training_height": 64, "create_image_every": 0, "save_hypernetwork_every": 0}
    r = client.post("/sdapi/v1/train/hypernetwork", json=body)
    assert r.json()["info"] == f"train hypernetwork complete: filename: {path} error: None"
    r = client.post("/sdapi/v1/create/hypernetwork", json={"name": "bad", "layer_structure": "2, 1"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "layer_structure"]


def test_preprocess_route_and_job(env):
    from PIL import Image

    client, _, tmp, _ = env
    src = tmp / "raw"
    src.mkdir()
    Image.new("RGB", (120, 80), (200, 10, 10)).save(src / "wide.png")
    Image.new("RGBA", (64, 64), (0, 90, 0, 128)).save(src / "alpha.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    r = client.post("/sdapi/v1/preprocess", json={"id_task": "task(p)", "process_src": str(src),
                                                  "process_dst": str(tmp / "prepared"), "process_width": 64,
                                                  "process_height": 64, "process_flip": True})
    assert r.status_code == 200 and r.json() == {"info": "preprocess complete"}
    out = sorted(p.name for p in (tmp / "prepared").glob("*.png"))
    assert len(out) == 4 and all(Image.open(tmp / "prepared" / n).size == (64, 64) for n in out)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    r = client.post("/sdapi/v1/preprocess", json={"process_src": str(src), "process_dst": str(src)})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "process_dst"]
    r = client.post("/sdapi/v1/preprocess", json={"process_src": str(src), "process_dst": str(tmp / "cap"),
                                                  "process_caption": True})
    assert r.status_code == 200 and "no captioner" in r.json()["info"]
    r = client.post("/sdtrain/v1/jobs", json={"kind": "preprocess", "config": {
        "process_src": str(src), "process_dst": str(tmp / "prepared2"), "process_width": 64, "process_height": 64}})
    assert r.status_code == 202
    job_id = r.json()["id"]
    for _ in range(200):
        job = client.get(f"/sdtrain/v1/jobs/{job_id}").json()
        if job["state"] != "queued" and job["state"] != "running":
            break
        time.sleep(0.05)
    assert job["state"] == "done" and (job["step"], job["total_steps"]) == (3, 3)
    assert len([f for f in job["files"] if f.endswith(".png")]) == 2


def test_refresh_route_reloads_the_host_lists_behind_auth(tiny_sd1):
    """POST /sdtrain/v1/refresh calls the host's refresh and answers its lists; it sits behind
    --api-auth like every route; without a refresh callable there is no route."""
    service = JobService(lambda: StandaloneHost(tiny_sd1), job_runners())
    calls = []

    def refresh():
        calls.append(1)
        return {"embeddings": ["a", "b"], "hypernetworks": ["h"]}

    app = FastAPI()
    mount(app, service, ApiOptions(credentials={"alice": "s3cret"}, refresh=refresh))
    client = TestClient(app)
    assert client.post("/sdtrain/v1/refresh").status_code == 401 and calls == []
    good = base64.b64encode(b"alice:s3cret").decode()
    out = client.post("/sdtrain/v1/refresh", headers={"Authorization": f"Basic {good}"})
    assert out.status_code == 200 and out.json() == {"embeddings": ["a", "b"], "hypernetworks": ["h"]} and calls == [1]
    bare = FastAPI()
    mount(bare, service, ApiOptions())
    assert TestClient(bare).post("/sdtrain/v1/refresh").status_code == 404
    service.shutdown()


def test_malformed_bodies_are_422_naming_what_is_wrong(env):
    client = env[0]
    cases = [("/sdtrain/v1/jobs", '{"kind": ["x"]}', "kind"), ("/sdtrain/v1/jobs", '{"kind": {"a": 1}}', "kind"),
             ("/sdtrain/v1/jobs", "[]", "body"), ("/sdapi/v1/create/embedding", "not json", "body"),
             ("/sdapi/v1/create/embedding", '{"name": {"a": 1}}', "name")]
    for path, raw, field in cases:
        out = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert out.status_code == 422 and out.json()["detail"][0]["loc"] == ["body", field], (raw, out.json())
    # a form post (curl -d without -H) is refused, as the webui's own routes refuse it
    out = client.post("/sdapi/v1/create/embedding", content='{"name": "x"}',
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert out.status_code == 422 and out.json()["detail"][0]["loc"] == ["body", "body"]
    assert client.get("/sdtrain/v1/jobs/nope").status_code == 404
    assert client.post("/sdtrain/v1/jobs/nope/stop").status_code == 404
    # stopping a job that has finished is a conflict, not a silent success
    job_id = client.post("/sdtrain/v1/jobs", json={"kind": "create_embedding", "config": {"name": "done1"}}).json()["id"]
    while client.get(f"/sdtrain/v1/jobs/{job_id}").json()["state"] not in ("done", "failed"):
        time.sleep(0.05)
    out = client.post(f"/sdtrain/v1/jobs/{job_id}/stop")
    assert out.status_code == 409 and "already finished" in out.json()["detail"]


def test_resume_route_submits_an_interrupted_job_again(tmp_path):
    from lib_sdtrain.core.jobs.service import INTERRUPTED
    from lib_sdtrain.core.options.config import CreateEmbeddingConfig

    service = JobService(lambda: None, {"create_embedding": (CreateEmbeddingConfig, lambda h, c, ctl: c.name)})
    app = FastAPI()
    mount(app, service, ApiOptions())
    client = TestClient(app)
    job = service.submit("create_embedding", {"name": "again"})
    job.wait(10)
    assert client.post(f"/sdtrain/v1/jobs/{job.id}/resume").status_code == 409  # it is done
    job.state = INTERRUPTED  # as a job the webui's end cut short is listed after the restart
    out = client.post(f"/sdtrain/v1/jobs/{job.id}/resume")
    assert out.status_code == 202 and out.json()["id"] != job.id
    new = service.get(out.json()["id"])
    assert new.wait(10) and new.config.name == "again" and new.state == "done"
    assert client.post("/sdtrain/v1/jobs/nope/resume").status_code == 404
    service.shutdown()


def test_every_training_option_is_in_the_schemas_and_the_cli_help_with_its_default(env, capsys):
    """Each training field (the host's and sdtrain's own options alike) is in sdtrain's schema and the host
    route's OpenAPI body with the config's default (the one that trains as the host does), and is a CLI flag.
    The webui's own folders are set by the webui (their defaults are its paths)."""
    import dataclasses
    import json

    from lib_sdtrain.cli import build_parser
    from lib_sdtrain.core.options.config import TrainEmbeddingConfig, TrainHypernetworkConfig

    client, *_ = env
    ours = client.get("/sdtrain/v1/schema").json()
    spec = client.get("/openapi.json").json()
    for cls, route in ((TrainEmbeddingConfig, "embedding"), (TrainHypernetworkConfig, "hypernetwork")):
        host_body = spec["paths"][f"/sdapi/v1/train/{route}"]["post"]["requestBody"]["content"]["application/json"]
        host_props = host_body["schema"]["properties"]
        props = ours[cls.kind]["properties"]
        with pytest.raises(SystemExit):
            build_parser().parse_args([cls.kind.replace("_", "-"), "--help"])
        help_text = capsys.readouterr().out
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')}" in help_text, f.name
            if f.name in cls.HOST_FOLDERS:  # the webui sets them (and a confined API refuses them)
                continue
            default = json.loads(json.dumps(f.default))  # tuples become lists, as in JSON
            assert props[f.name].get("default") == default, f.name
            assert host_props[f.name].get("default") == default, f.name
