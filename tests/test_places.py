"""Where requests may make sdtrain write (core.options.places), and the HTTP API applying it."""

from __future__ import annotations

import os

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_sdtrain.api.routes import ApiOptions, mount
from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.jobs.service import JobService
from lib_sdtrain.core.options.config import TrainEmbeddingConfig
from lib_sdtrain.core.options.places import WritePolicy
from lib_sdtrain.core.preprocess.operations import PreprocessConfig
from lib_sdtrain.core.tasks.registry import job_runners


@pytest.fixture
def folders(tmp_path):
    data, emb, hn, outside = (tmp_path / n for n in ("data", "embeddings", "hypernetworks", "outside"))
    for d in (data, emb, hn, outside):
        d.mkdir()
    (data / "link-out").symlink_to(outside, target_is_directory=True)
    return {"data": data, "embeddings": emb, "hypernetworks": hn, "outside": outside,
            "policy": WritePolicy((str(data), str(emb), str(hn)), hint="ask the owner")}


def test_write_folders_inside_the_roots_are_made_absolute(folders):
    policy, data = folders["policy"], folders["data"]
    out = policy.confine(TrainEmbeddingConfig, {"log_directory": "textual_inversion"})
    assert out["log_directory"] == str(data / "textual_inversion")
    assert policy.confine(TrainEmbeddingConfig, {})["log_directory"] == str(data / "textual_inversion")  # the default
    inside = str(folders["embeddings"] / "logs")
    assert policy.confine(TrainEmbeddingConfig, {"log_directory": inside})["log_directory"] == inside
    assert policy.confine(PreprocessConfig, {"process_dst": "prepared"})["process_dst"] == str(data / "prepared")


@pytest.mark.parametrize("value", ["/etc", "../outside", "logs/../../outside", "link-out", "link-out/deeper",
                                   "~/elsewhere"])
def test_write_folders_outside_are_refused_naming_the_field(folders, value):
    with pytest.raises(ConfigError) as e:
        folders["policy"].confine(TrainEmbeddingConfig, {"log_directory": value})
    assert e.value.field == "log_directory" and "outside the webui's folders" in str(e.value)
    assert "ask the owner" in str(e.value)
    with pytest.raises(ConfigError) as e:
        folders["policy"].confine(PreprocessConfig, {"process_dst": value})
    assert e.value.field == "process_dst"


def test_the_hosts_folders_are_not_request_fields():
    for field in ("embeddings_dir", "templates_dir"):
        with pytest.raises(ConfigError) as e:
            WritePolicy.refuse_host_folders(TrainEmbeddingConfig, {field: "/tmp"})
        assert e.value.field == field
    WritePolicy.refuse_host_folders(TrainEmbeddingConfig, {"log_directory": "x"})  # not a host folder


def test_the_api_refuses_and_creates_nothing_outside(folders, tiny_sd1, tmp_path):
    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    host = StandaloneHost(tiny_sd1)
    service = JobService(lambda: host, job_runners())
    app = FastAPI()

    def defaults(kind):
        return ({"hypernetwork_dir": str(folders["hypernetworks"])} if "hypernetwork" in kind
                else {"embeddings_dir": str(folders["embeddings"])})

    mount(app, service, ApiOptions(defaults=defaults, write_policy=lambda: folders["policy"]))
    client = TestClient(app)
    before = sorted(os.walk(tmp_path))
    cases = [
        ("/sdapi/v1/train/embedding", {"embedding_name": "x", "log_directory": str(folders["outside"])}, "log_directory"),
        ("/sdapi/v1/train/embedding", {"embedding_name": "x", "log_directory": "link-out"}, "log_directory"),
        ("/sdapi/v1/train/embedding", {"embedding_name": "x", "embeddings_dir": str(folders["outside"])},
         "embeddings_dir"),
        ("/sdapi/v1/create/embedding", {"name": "x", "embeddings_dir": str(folders["outside"])}, "embeddings_dir"),
        ("/sdapi/v1/create/hypernetwork", {"name": "x", "hypernetwork_dir": "/tmp"}, "hypernetwork_dir"),
        ("/sdapi/v1/preprocess", {"process_src": str(folders["outside"]), "process_dst": "../outside/p"},
         "process_dst"),
    ]
    for path, body, field in cases:
        out = client.post(path, json=body)
        assert out.status_code == 422 and out.json()["detail"][0]["loc"] == ["body", field], (path, out.json())
    out = client.post("/sdtrain/v1/jobs", json={"kind": "preprocess", "config": {
        "process_src": str(folders["outside"]), "process_dst": "/etc/sdtrain"}})
    assert out.status_code == 422 and out.json()["detail"][0]["loc"] == ["body", "process_dst"]
    assert sorted(os.walk(tmp_path)) == before  # nothing was created anywhere
    # inside the roots, the same request works
    out = client.post("/sdapi/v1/create/embedding", json={"name": "fine"})
    assert out.status_code == 200 and (folders["embeddings"] / "fine.pt").is_file()
    service.shutdown()
