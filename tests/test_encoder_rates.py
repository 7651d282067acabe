"""Per-encoder learning rates of SDXL embeddings (learn_rate_clip_l, learn_rate_clip_g) and the embedding-norm
limit (norm_limit), issue 13 item 6, on the tiny models through the standalone host: a rate of 0 freezes its
encoder exactly, a rate k times another moves its vectors exactly k times as far on the first SGD step,
each group follows its own schedule, the grouped optimizer state resumes (and a one-group state is regrouped);
the typical norm is the median row norm of the token table; the limit holds every vector's norm at the bound
and leaves vectors under it bit for bit; all of it is off by default."""

from __future__ import annotations

import math
import os

import pytest
import torch
from recorder import Recorder

from lib_sdtrain.core.data.samples import write_sample_dataset
from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.formats.embedding_io import SDTRAIN_STATE_KEY, load_embedding, load_optim
from lib_sdtrain.core.formats.torchfile import load_torch_file
from lib_sdtrain.core.options.config import CreateEmbeddingConfig, TrainEmbeddingConfig
from lib_sdtrain.core.tasks.textual_inversion import EmbeddingTraining, create_embedding, train_embedding
from lib_sdtrain.core.training.embedding_norm import typical_norm
from lib_sdtrain.core.training.optimizer_state import regrouped
from lib_sdtrain.core.training.resume import fingerprint
from lib_sdtrain.core.training.run import run_training
from lib_sdtrain.hosts.standalone.host import StandaloneHost


@pytest.fixture(scope="module")
def xl(tiny_sdxl):
    return StandaloneHost(tiny_sdxl)


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return StandaloneHost(tiny_sd1)


@pytest.fixture
def ws(tmp_path):
    data = write_sample_dataset(tmp_path / "data", count=4, size=64, seed=1)
    return {"data": str(data), "emb": str(tmp_path / "embeddings"), "log": str(tmp_path / "log")}


def make_embedding(host, ws, init_text="shape", n=2, name="e"):
    return create_embedding(host, CreateEmbeddingConfig.from_dict({
        "name": name, "num_vectors_per_token": n, "init_text": init_text, "embeddings_dir": ws["emb"]}))


def cfg_dict(ws, name="e", **kw):
    return {"embedding_name": name, "embeddings_dir": ws["emb"], "data_root": ws["data"], "log_directory": ws["log"],
            "training_width": 64, "training_height": 64, "steps": 4, "learn_rate": "0.05", "batch_size": 2,
            "template_filename": "subject_filewords.txt", "save_embedding_every": 0, "create_image_every": 0,
            "training_write_csv_every": 0, "seed": 3, "resume_point_minutes": 0, **kw}


def train(host, ws, control=None, **kw):
    return train_embedding(host, TrainEmbeddingConfig.from_dict(cfg_dict(ws, **kw)), control)


def vectors(path):
    return load_embedding(path).vectors


def recording_group_rates(host, cfg):
    """A run whose optimizer records its groups' rates at each step."""
    kind = EmbeddingTraining(host, cfg)
    seen: list[list[float]] = []
    setup = kind.setup

    def recording_setup(device, lr):
        params, optimizer = setup(device, lr)
        step = optimizer.step

        def recording_step(*a, **k):
            seen.append([g["lr"] for g in optimizer.param_groups])
            return step(*a, **k)

        optimizer.step = recording_step
        return params, optimizer

    kind.setup = recording_setup
    rec = Recorder()
    run_training(host, cfg, rec, kind)
    return seen, rec


# -- the options ------------------------------------------------------------------------------------------
def test_fields_are_off_by_default_validated_and_fingerprinted(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")

    def cfg(**kw):
        return TrainEmbeddingConfig.from_dict({"embedding_name": "e", "data_root": str(tmp_path), **kw})

    c = cfg()
    assert (c.learn_rate_clip_l, c.learn_rate_clip_g, c.norm_limit) == ("", "", 0.0)
    for kw, field in (({"learn_rate_clip_g": "fast"}, "learn_rate_clip_g"),
                      ({"learn_rate_clip_l": "0.01:x"}, "learn_rate_clip_l"),
                      ({"learn_rate_clip_l": "0.01:10, 0.002", "lr_scheduler": "cosine"}, "learn_rate_clip_l"),
                      ({"learn_rate_clip_g": "0.01", "train_encoders": "clip_l"}, "learn_rate_clip_g"),
                      ({"learn_rate_clip_l": "0.01", "train_encoders": "clip_g"}, "learn_rate_clip_l"),
                      ({"norm_limit": -1}, "norm_limit")):
        with pytest.raises(ConfigError) as e:
            cfg(**kw)
        assert e.value.field == field, kw
    assert cfg(learn_rate_clip_g="0.01", train_encoders="clip_g").learn_rate_clip_g == "0.01"
    base = fingerprint(cfg())
    assert len({base, fingerprint(cfg(learn_rate_clip_l="0.01")), fingerprint(cfg(learn_rate_clip_g="0.01")),
                fingerprint(cfg(norm_limit=1.5))}) == 4


def test_a_rate_on_a_non_sdxl_embedding_is_refused_by_name_before_the_model_is_used(sd1, ws, monkeypatch):
    make_embedding(sd1, ws)

    def no_session(*a, **k):
        raise AssertionError("the GPU session was taken")

    monkeypatch.setattr(sd1, "gpu_session", no_session)
    for field in ("learn_rate_clip_l", "learn_rate_clip_g"):
        with pytest.raises(ConfigError) as e:
            train(sd1, ws, **{field: "0.01"})
        assert e.value.field == field and "SDXL" in str(e.value)


# -- per-encoder rates on SDXL ----------------------------------------------------------------------------
def test_rate_zero_freezes_its_encoder_exactly_as_training_the_other_alone(xl, tmp_path):
    runs = {}
    for name, kw in (("zero", {"learn_rate_clip_g": "0"}), ("alone", {"train_encoders": "clip_l"})):
        ws = {"data": str(write_sample_dataset(tmp_path / name / "data", count=4, size=64, seed=1)),
              "emb": str(tmp_path / name / "emb"), "log": str(tmp_path / name / "log")}
        start = vectors(make_embedding(xl, ws))
        runs[name] = (start, vectors(train(xl, ws, **kw).embedding_file))
    start, zero = runs["zero"]
    assert torch.equal(zero["clip_g"], start["clip_g"])
    assert not torch.equal(zero["clip_l"], start["clip_l"])
    # clip_l sees the gradients it sees when trained alone: the same vectors, bit for bit
    assert torch.equal(zero["clip_l"], runs["alone"][1]["clip_l"])


def test_first_sgd_step_moves_each_encoder_by_its_own_rate(xl, tmp_path):
    """From zero vectors one plain-SGD step leaves -rate·gradient, exactly (powers of two: no rounding);
    the gradient is the same in both runs, so the rates' ratios show bit for bit."""
    out = {}
    for name, kw in (("base", {}), ("own", {"learn_rate_clip_l": "0.125", "learn_rate_clip_g": "0.25"})):
        ws = {"data": str(write_sample_dataset(tmp_path / name / "data", count=4, size=64, seed=1)),
              "emb": str(tmp_path / name / "emb"), "log": str(tmp_path / name / "log")}
        make_embedding(xl, ws, init_text="")
        out[name] = vectors(train(xl, ws, steps=1, learn_rate="0.0625", optimizer_name="SGD", momentum=0.0,
                                  **kw).embedding_file)
    base, own = out["base"], out["own"]
    assert base["clip_l"].abs().sum() > 0 and base["clip_g"].abs().sum() > 0
    assert torch.equal(own["clip_l"], 2 * base["clip_l"])
    assert torch.equal(own["clip_g"], 4 * base["clip_g"])


def test_each_group_follows_its_own_schedule(xl, ws):
    make_embedding(xl, ws)
    cfg = TrainEmbeddingConfig.from_dict(cfg_dict(ws, learn_rate="0.01", learn_rate_clip_l="0.02:2, 0.005"))
    seen, rec = recording_group_rates(xl, cfg)
    # the groups are the trained encoders in order: clip_g (the Embedding Learning rate), clip_l (its own)
    assert seen == [[0.01, 0.02], [0.01, 0.02], [0.01, 0.005], [0.01, 0.005]]
    assert [e["lr"] for e in rec.of("step")] == [0.01] * 4  # the CSV and progress show learn_rate's rate
    # cosine with warm-up: the same schedule type, warm-up and final rate for each
    make_embedding(xl, ws, name="c")
    cfg = TrainEmbeddingConfig.from_dict(cfg_dict(ws, name="c", learn_rate="0.01", learn_rate_clip_g="0.04",
                                                  lr_scheduler="cosine", lr_warmup_steps=2, lr_min=0.001))
    seen, _ = recording_group_rates(xl, cfg)
    want_g = [0.0, 0.02, 0.04, 0.001 + 0.039 * 0.5]
    want_l = [0.0, 0.005, 0.01, 0.001 + 0.009 * 0.5]
    assert [g for g, _ in seen] == pytest.approx(want_g, abs=1e-12)
    assert [cl for _, cl in seen] == pytest.approx(want_l, abs=1e-12)


def test_a_stopped_grouped_run_resumes_bit_identical(xl, tmp_path):
    kw = {"steps": 6, "learn_rate_clip_l": "0.02:3, 0.01", "learn_rate_clip_g": "0.08", "save_format": "safetensors"}
    runs = {}
    for name in ("ref", "run"):
        ws = {"data": str(write_sample_dataset(tmp_path / name / "data", count=4, size=64, seed=1)),
              "emb": str(tmp_path / name / "emb"), "log": str(tmp_path / name / "log")}
        make_embedding(xl, ws)
        runs[name] = ws
    ref = train(xl, runs["ref"], **kw)
    first = train(xl, runs["run"], Recorder(stop_at=3), **kw)
    point = load_torch_file(first.embedding_file + ".resume")
    assert first.stopped and first.step == 3 and len(point["optimizer"]["param_groups"]) == 2
    torch.manual_seed(999)
    second = train(xl, runs["run"], **kw)
    assert second.step == 6 and "(resumed from step 3)" in second.message
    want, got = vectors(ref.embedding_file), vectors(second.embedding_file)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_the_optim_keeps_two_groups_and_a_one_group_state_is_regrouped(xl, ws):
    path = make_embedding(xl, ws)
    train(xl, ws, steps=2)  # one group: the host's AdamW shape
    saved = load_optim(path, load_embedding(path).checksum())
    assert len(saved["optimizer_state_dict"]["param_groups"]) == 1
    assert "optimizer_state_dict" in load_torch_file(path + ".optim")
    rec = Recorder()
    train(xl, ws, rec, steps=4, learn_rate_clip_g="0.02")
    assert any(e["text"].startswith("resumed optimizer state") for e in rec.of("log")), rec.of("log")
    raw = load_torch_file(path + ".optim")
    assert "optimizer_state_dict" not in raw and SDTRAIN_STATE_KEY in raw  # the host's one-group AdamW cannot take it
    state = raw[SDTRAIN_STATE_KEY]
    assert len(state["param_groups"]) == 2
    assert [int(state["state"][i]["step"]) for i in (0, 1)] == [4, 4]  # AdamW's count went on from 2
    # and back to one group: the two-group state is laid out as one
    rec = Recorder()
    train(xl, ws, rec, steps=5)
    assert any(e["text"].startswith("resumed optimizer state") for e in rec.of("log"))
    state = load_optim(path, load_embedding(path).checksum())["optimizer_state_dict"]
    assert len(state["param_groups"]) == 1 and int(state["state"][1]["step"]) == 5


def test_regrouped_leaves_what_does_not_fit_alone():
    a, b = torch.zeros(2), torch.zeros(3)
    two = torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1)
    one = torch.optim.AdamW([a, b], lr=0.1).state_dict()
    laid = regrouped(one, two)
    assert [g["params"] for g in laid["param_groups"]] == [[0], [1]]
    three = torch.optim.AdamW([torch.zeros(1), torch.zeros(1), torch.zeros(1)], lr=0.1).state_dict()
    assert regrouped(three, two) is three  # other tensors: restore_optimizer says why


# -- the norm limit ---------------------------------------------------------------------------------------
def test_typical_norm_is_the_median_row_norm_of_each_token_table(sd1, xl, tiny_sd1, tiny_sdxl):
    for host in (sd1, xl):
        norms = host.token_embedding_norms()
        assert set(norms) == {te.key for te in host.describe().text_encoders}
        for te in host.texts:
            rows = sorted(float(r.norm()) for r in te.token_embedding.weight.detach().float())
            assert norms[te.key] == pytest.approx(rows[(len(rows) - 1) // 2], rel=1e-6)
            assert norms[te.key] > 0
    table = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 2.0]])
    assert typical_norm(table) == 2.0  # norms 5, 1, 10, 2: the lower middle


def max_row_norm(v):
    return float(v.norm(dim=-1).max())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_limit_holds_vectors_at_the_bound_where_they_would_overcook(family, sd1, xl, tmp_path):
    host = sd1 if family == "sd1" else xl
    typical = host.token_embedding_norms()
    out = {}
    for name, kw in (("off", {}), ("on", {"norm_limit": 1.5})):
        ws = {"data": str(write_sample_dataset(tmp_path / name / "data", count=4, size=64, seed=1)),
              "emb": str(tmp_path / name / "emb"), "log": str(tmp_path / name / "log")}
        make_embedding(host, ws)
        rec = Recorder()
        result = train(host, ws, rec, learn_rate="3", save_embedding_every=1, **kw)
        saves = [vectors(os.path.join(result.log_dir, "embeddings", f"e-{k}.pt")) for k in range(1, 5)]
        out[name] = (vectors(result.embedding_file), saves, [e["text"] for e in rec.of("log")])
    for key, norm in typical.items():
        bound = 1.5 * norm
        assert max_row_norm(out["off"][0][key]) > 2 * bound  # the rate overcooks it
        for v in [out["on"][0], *out["on"][1]]:  # the final file and every step's save
            assert max_row_norm(v[key]) <= bound * (1 + 1e-5)
        assert max_row_norm(out["on"][0][key]) == pytest.approx(bound, rel=1e-5)  # pushed onto it
    logs = out["on"][2]
    assert any(t.startswith("typical token-embedding norm:") for t in logs), logs
    assert any(t.startswith("largest vector norm at step 4:") and "1.50×" in t for t in logs), logs
    assert not any(t.startswith("typical token-embedding norm:") for t in out["off"][2])


def test_vectors_under_the_limit_train_bit_for_bit_as_without_it(sd1, tmp_path):
    out = {}
    for name, kw in (("off", {}), ("loose", {"norm_limit": 50.0}), ("ema", {"norm_limit": 50.0, "ema_decay": 0.5})):
        ws = {"data": str(write_sample_dataset(tmp_path / name / "data", count=4, size=64, seed=1)),
              "emb": str(tmp_path / name / "emb"), "log": str(tmp_path / name / "log")}
        make_embedding(sd1, ws)
        out[name] = vectors(train(sd1, ws, **kw).embedding_file)["*"]
    assert torch.equal(out["off"], out["loose"]) and torch.equal(out["off"], out["ema"])
    assert max_row_norm(out["off"]) < 50.0 * sd1.token_embedding_norms()["*"]


def test_the_ema_averages_the_limited_vectors(sd1, ws):
    path = make_embedding(sd1, ws)
    avg = vectors(path)["*"].clone()  # the EMA begins with the vectors the run starts from
    bound = 1.5 * sd1.token_embedding_norms()["*"]
    assert max_row_norm(avg) < bound
    result = train(sd1, ws, learn_rate="3", norm_limit=1.5, ema_decay=0.5, ema_for_output=True,
                   save_embedding_every=1)
    for k in range(1, 5):  # the intermediate saves hold the trained (limited) vectors
        theta = vectors(os.path.join(result.log_dir, "embeddings", f"e-{k}.pt"))["*"]
        assert max_row_norm(theta) == pytest.approx(bound, rel=1e-5)
        avg.mul_(0.5).add_(theta, alpha=0.5)
    assert torch.equal(vectors(result.embedding_file)["*"], avg)


def test_a_default_run_keeps_one_group_and_the_host_loadable_state(sd1, ws):
    path = make_embedding(sd1, ws)
    rec = Recorder()
    train(sd1, ws, rec, steps=2)
    raw = load_torch_file(path + ".optim")
    assert len(raw["optimizer_state_dict"]["param_groups"]) == 1
    logs = [e["text"] for e in rec.of("log")]
    assert not any(t.startswith("typical token-embedding norm") for t in logs)
    summary = [t for t in logs if t.startswith("largest vector norm at step 2:")]
    assert len(summary) == 1 and "×" not in summary[0]  # the typical norm is not asked for by default
    assert math.isfinite(float(summary[0].split("* ")[1]))


def test_the_options_are_in_the_cli_help_the_api_schema_and_the_tab(tiny_sd1, capsys):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtrain.api.routes import ApiOptions, mount
    from lib_sdtrain.cli import build_parser
    from lib_sdtrain.core.jobs.service import JobService
    from lib_sdtrain.core.tasks.registry import job_runners
    from lib_sdtrain.ui.train_tabs import EMBEDDING

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-embedding", "--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--learn-rate-clip-l", "--learn-rate-clip-g", "--norm-limit"))
    app = FastAPI()
    mount(app, JobService(lambda: StandaloneHost(tiny_sd1), job_runners()), ApiOptions())
    schema = TestClient(app).get("/sdtrain/v1/schema").json()["train_embedding"]
    props = schema["properties"]
    assert (props["learn_rate_clip_l"]["default"], props["learn_rate_clip_g"]["default"]) == ("", "")
    assert props["norm_limit"]["default"] == 0.0
    sections = dict(EMBEDDING.sections)
    assert sections["SDXL"] == ("train_encoders", "learn_rate_clip_l", "learn_rate_clip_g")
    assert sections["Vector norm"] == ("norm_limit",)
