"""sdtrain inside a real webui (the host is a parameter: see conftest.py and webui_hosts.py)."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from webui_hosts import offers, selected

from lib_sdtrain.core.formats.embedding_io import load_embedding

HOST = selected()
#: a folder shared by the webuis one CI run starts, one after another (tools/test.sh sets it): each
#: leaves the files trained in it there and loads those the others left
EXCHANGE = os.environ.get("SDTRAIN_EXCHANGE_DIR", "")
#: training steps of the longer runs: fewer on a host that needs a full-size model (a step there is
#: ~20x a tiny model's on the CPU); every check below holds for any number
STEPS = 12 if HOST.sd1_model == "full" else 30


def exchange_out(path: Path, kind: str, tag: str) -> None:
    """Leave `path` for the webuis that run after this one, as `<host>_<tag>` (its name there)."""
    if EXCHANGE:
        (Path(EXCHANGE) / kind).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(EXCHANGE) / kind / f"{HOST.name}_{tag}{path.suffix}")

pytestmark = pytest.mark.webui


def train_body(name: str, data, **kw) -> dict:
    """Only some of the host's fields: sdtrain fills the rest with the host UI's defaults. The log
    folder is relative: requests write inside the webui's data directory (core.options.places)."""
    log_dir = "ti_log"
    return {"embedding_name": name, "data_root": str(data), "steps": STEPS, "training_width": 64,
            "log_directory": log_dir,
            "training_height": 64, "learn_rate": "0.01", "template_filename": "subject_filewords.txt",
            "create_image_every": 0, "save_embedding_every": 10, "preview_steps": 4, **kw}


def test_starts_cleanly_with_the_sub_tabs(webui):
    """In the host's Train tab where it has one (on_ui_train_tabs), else in sdtrain's own top-level tab
    (Forge), every sub-tab, preprocess included, with its controls; no sdtrain error in the log."""
    log = webui.log_text()
    bad = [ln for ln in log.splitlines() if "sdtrain" in ln.lower() and re.search(r"error|warn|traceback", ln, re.I)]
    assert bad == [], bad
    status, config = webui.get("/config")
    assert status == 200
    by_id = {c["id"]: c for c in config["components"]}
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    for label in ("Textual inversion", "Hypernetwork", "Preprocess images", "Jobs"):
        assert f"{label} (sdtrain)" in tabs

    def ancestors_labels(node, target, path=()):
        label = by_id.get(node["id"], {}).get("props", {}).get("label")
        path = (*path, label) if by_id.get(node["id"], {}).get("type") == "tabitem" else path
        if by_id.get(node["id"], {}).get("props", {}).get("label") == target:
            return path
        for child in node.get("children", []):
            found = ancestors_labels(child, target, path)
            if found:
                return found
        return None

    where = ancestors_labels(config["layout"], "Textual inversion (sdtrain)")
    assert where is not None and where[0] == ("Train" if offers(webui, "train_tab") is None else "Train (sdtrain)"), where
    ids = {c["props"].get("elem_id") for c in config["components"]}
    for kind in ("embedding", "hypernetwork"):
        assert {f"sdtrain_train_{kind}_{x}" for x in ("button", "stop", "loss_chart", "lr_chart", "previews", "status")} <= ids
        assert f"sdtrain_create_{kind}_button" in ids
    assert {"sdtrain_jobs_table", "sdtrain_jobs_open", "sdtrain_jobs_stop"} <= ids


def test_host_probe_says_what_this_webui_offers(webui):
    """The start-up probe (lib_sdtrain/hosts/a1111/capabilities.py) finds this webui's model code, whether it
    called the Train-tab callback, where hypernetworks live and whether `<hypernet:...>` works: one log line,
    the same at GET /sdtrain/v1/host, and a note in the tab naming each feature that is not available."""
    lines = [ln for ln in webui.log_text().splitlines() if ln.startswith("[sdtrain] host: ")]
    assert len(lines) == 1, lines
    status, report = webui.get("/sdtrain/v1/host")
    assert status == 200, report
    assert f"model {report['model_stack']};" in lines[0] and report["model_stack"] in ("ldm/sgm", "ldm_patched",
                                                                                     "forge backend")
    assert report["hypernetwork_dir"] == str(webui.hypernetworks), report
    print(f"\n{HOST.name}: {lines[0]}")
    if HOST.model_stack is not None:  # a known host: the probe finds what its spec says
        assert report["model_stack"] == HOST.model_stack, report
        assert report["train_tab"] is (HOST.verdict("train_tab") is None), report
        assert report["features"]["hypernet_prompt"]["available"] is (HOST.verdict("hypernetwork_prompt") is None)
        assert ("sdtrain's --hypernetwork-dir" in report["hypernetwork_dir_source"]) is (not HOST.hypernetwork_pages)
    _, config = webui.get("/config")
    notes = [c["props"].get("value", "") for c in config["components"] if c["props"].get("elem_id") == "sdtrain_host_note"]
    if report["unavailable"]:
        assert len(notes) == 1 and all(html.escape(why) in notes[0] for why in report["unavailable"].values()), notes
        assert "Not available in this webui" in notes[0], notes
    else:
        assert notes == [], notes


def test_create_and_train_through_the_host_routes(webui, webui_assets):
    status, out = webui.post("/sdapi/v1/create/embedding", {"name": "ctti", "num_vectors_per_token": 2,
                                                            "init_text": "shape"})
    assert status == 200 and out["info"] == f"create embedding filename: {webui.embeddings / 'ctti.pt'}"
    log_dir = webui.dir / "ti_log"
    status, out = webui.post("/sdapi/v1/train/embedding", {
        "id_task": "task(x)", **train_body("ctti", webui_assets["data"], log_directory=str(log_dir))})
    assert status == 200 and out["info"] == f"train embedding complete: filename: {webui.embeddings / 'ctti.pt'} error: None"
    assert load_embedding(webui.embeddings / "ctti.pt").step == STEPS
    csvs = list(log_dir.rglob("textual_inversion_loss.csv"))
    assert len(csvs) == 1 and csvs[0].read_text().splitlines()[-1].startswith(f"{STEPS},")
    # listed with its step at once, and usable in a prompt, with its hash in the infotext
    _, listed = webui.get("/sdapi/v1/embeddings")
    assert listed["loaded"]["ctti"]["step"] == STEPS and listed["loaded"]["ctti"]["vectors"] == 2
    _, info = webui.txt2img("a photo of ctti")
    assert HOST.names_embedding(info, "ctti"), info
    # a bad field is a 422 naming it
    status, out = webui.post("/sdapi/v1/train/embedding", train_body("ctti", webui_assets["data"], batch_size=0))
    assert status == 422 and out["detail"][0]["loc"] == ["body", "batch_size"]


def test_requests_write_only_inside_the_webuis_folders(webui, webui_assets, tmp_path):
    """A request may not name the webui's own folders, nor write logs or preprocess output outside its
    data, embeddings and hypernetworks folders (links followed): 422 naming the field, nothing created."""
    outside = tmp_path / "outside"
    (webui.dir / "link-out").symlink_to(tmp_path, target_is_directory=True)
    cases = [("/sdapi/v1/train/embedding", train_body("x", webui_assets["data"], log_directory=str(outside)),
              "log_directory"),
             ("/sdapi/v1/train/embedding", train_body("x", webui_assets["data"], log_directory="link-out/logs"),
              "log_directory"),
             ("/sdapi/v1/create/embedding", {"name": "x", "embeddings_dir": str(outside)}, "embeddings_dir"),
             ("/sdapi/v1/preprocess", {"process_src": str(webui_assets["data"]), "process_dst": str(outside)},
              "process_dst")]
    for path, body, field in cases:
        status, out = webui.post(path, body)
        assert status == 422 and out["detail"][0]["loc"] == ["body", field], (path, out)
    assert not outside.exists() and list(tmp_path.iterdir()) == []


def test_fuzz_sdtrain_routes_from_the_webuis_own_openapi(webui):
    """The fuzz test of tests/test_fuzz_api.py once more, against the running webui's /openapi.json:
    sdtrain's routes as the host publishes them, a few cases each; no server error, every answer as
    documented, nothing written outside the webui's folders."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in tools/requirements-dev.txt")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(webui.url + "/openapi.json").include(
        path_regex=r"^/sdtrain/v1/|^/sdapi/v1/(create|train)/|^/sdapi/v1/preprocess$")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    outside = sorted(p.name for p in webui.dir.parent.iterdir())
    answers: list[int] = []
    for operation in operations:
        @settings(max_examples=8, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            response = case.call()
            answers.append(response.status_code)
            case.validate_response(response, checks=checks)

        run()
    assert answers and all(code < 500 for code in answers)
    assert sorted(p.name for p in webui.dir.parent.iterdir()) == outside


def test_job_routes_poll_to_done(webui, webui_assets):
    status, out = webui.post("/sdtrain/v1/jobs", {"kind": "create_embedding", "config": {"name": "jobti"}})
    assert status == 202
    assert webui.wait_job(out["id"])["state"] == "done"
    t0 = time.time()
    status, out = webui.post("/sdtrain/v1/jobs", {"kind": "train_embedding",
                                                  "config": train_body("jobti", webui_assets["data"])})
    assert status == 202 and time.time() - t0 < 5
    job = webui.wait_job(out["id"])
    assert job["state"] == "done" and job["step"] == STEPS and len(job["loss_history"]) == STEPS
    _, listed = webui.get("/sdapi/v1/embeddings")
    assert listed["loaded"]["jobti"]["step"] == STEPS


def test_interrupt_stops_within_a_step_and_keeps_a_loadable_file(webui, webui_assets):
    webui.wait_job(webui.post("/sdtrain/v1/jobs", {"kind": "create_embedding", "config": {"name": "intti"}})[1]["id"])
    job = webui.interrupt_training(train_body("intti", webui_assets["data"], steps=100000))
    saved = load_embedding(webui.embeddings / "intti.pt")
    assert saved.step == job["step"] and torch.isfinite(saved.vectors["*"]).all()


def test_model_untouched_and_generation_waits_for_the_job(webui, webui_assets):
    before, _ = webui.txt2img("a red circle", seed=11)
    _, digest = webui.get("/sdtrain-test/model-digest")
    webui.wait_job(webui.post("/sdtrain/v1/jobs", {"kind": "create_embedding", "config": {"name": "lockti"}})[1]["id"])
    _, out = webui.post("/sdtrain/v1/jobs", {"kind": "train_embedding",
                                             "config": train_body("lockti", webui_assets["data"], steps=60)})
    deadline = time.time() + 120
    while webui.get(f"/sdtrain/v1/jobs/{out['id']}")[1]["step"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    done_at = {}

    def generate():
        done_at["image"], _ = webui.txt2img("a red circle", seed=11)
        done_at["t"] = time.time()

    t = threading.Thread(target=generate)
    t.start()
    job = webui.wait_job(out["id"])
    finished = time.time()
    t.join(120)
    assert job["state"] == "done"
    assert done_at["t"] >= finished - 1.0  # the txt2img waited for the job's lock
    assert list(done_at["image"].getdata()) == list(before.getdata())  # same weights, same image
    # every tensor of the host's model bit-identical, with its requires_grad and inference flags
    assert webui.get("/sdtrain-test/model-digest")[1] == digest


@pytest.mark.needs("stock_trainer")
@pytest.mark.parametrize("kind", ["ti", "hn"])
def test_loss_and_gradients_equal_the_in_tree_trainers(webui, kind):
    """The objective itself, not a file or a route: on one picture, text, noise and timestep, sdtrain's loss
    and the gradient of what it trains equal what the host's in-tree trainer computes (its dataset's
    latent, its own embedding or `Hypernetwork` object, ldm's `p_losses`) — computed inside the webui by
    the test-only extension tests/webui/objective_shim.py. A timestep scaled, a wrong target or latent
    scale, a hypernetwork applied elsewhere than the host applies it: each changes the loss or the
    gradient at some t."""
    name = f"objective{kind}"
    if kind == "ti":
        status, out = webui.post("/sdapi/v1/create/embedding", {"name": name, "num_vectors_per_token": 2,
                                                               "init_text": "red circle"})
    else:
        status, out = webui.post("/sdapi/v1/create/hypernetwork", {"name": name, "enable_sizes": ["768"],
                                                                   "layer_structure": [1, 2, 1]})
    assert status == 200, out
    status, rows = webui.post("/sdtrain-test/objective", {"kind": kind, "name": name, "text": f"{name}, red circle",
                                                           "t": [3, 250, 600, 999]})
    if status == 501:  # the model is not ldm's LatentDiffusion (reForge keeps a trainer over its own backend)
        pytest.skip(f"{HOST.title}: {rows.get('detail', rows)}")
    assert status == 200, rows
    for row in rows:
        assert row["counts"][0] == row["counts"][1] == (1 if kind == "ti" else 8), row
        assert row["loss_sdtrain"] == pytest.approx(row["loss_in_tree"], rel=1e-5, abs=1e-7), row
        for g in row["grads"]:
            assert g["max_abs"] > 0, row  # the in-tree gradient reaches the tensor
            assert g["max_abs_diff"] <= 1e-4 * g["max_abs"] + 1e-9, row


@pytest.mark.needs("stock_trainer")
def test_stock_embedding_continued_by_sdtrain_and_back(stock_webui, webui_assets):
    s = stock_webui
    stock_body = {"id_task": "task(s)", "embedding_name": "swap", "learn_rate": "0.005", "batch_size": 1,
                  "gradient_step": 1, "data_root": str(webui_assets["data"]), "log_directory": str(s.dir / "stock_log"),
                  "training_width": 64, "training_height": 64, "varsize": False, "steps": 5,
                  "clip_grad_mode": "disabled", "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0,
                  "latent_sampling_method": "once", "use_weight": False, "create_image_every": 0,
                  "save_embedding_every": 5, "template_filename": "subject_filewords.txt",
                  "save_image_with_stored_embedding": False, "preview_from_txt2img": False, "preview_prompt": "",
                  "preview_negative_prompt": "", "preview_steps": 4, "preview_sampler_name": "Euler",
                  "preview_cfg_scale": 7.0, "preview_seed": -1, "preview_width": 64, "preview_height": 64}
    # the host's own routes: create and train 5 steps with the stock trainer
    status, out = s.post("/sdapi/v1/create/embedding", {"name": "swap", "num_vectors_per_token": 1,
                                                        "overwrite_old": False, "init_text": "*"})
    assert status == 200 and "swap.pt" in out["info"], out
    status, out = s.post("/sdapi/v1/train/embedding", stock_body)
    assert "error: None" in out["info"], out
    assert load_embedding(s.embeddings / "swap.pt").step == 5
    # sdtrain continues the stock file from step 5
    _, out = s.post("/sdtrain/v1/jobs", {"kind": "train_embedding", "config": train_body("swap", webui_assets["data"], steps=12)})
    job = s.wait_job(out["id"])
    assert job["state"] == "done" and [h[0] for h in job["loss_history"]] == list(range(6, 13))
    assert load_embedding(s.embeddings / "swap.pt").step == 12
    # and the stock trainer continues sdtrain's file from step 12
    status, out = s.post("/sdapi/v1/train/embedding", {**stock_body, "steps": 16})
    assert "error: None" in out["info"], out
    assert load_embedding(s.embeddings / "swap.pt").step == 16
    exchange_out(s.embeddings / "swap.pt", "embeddings", "stock_swap")  # last written by the host's trainer


def test_gradient_checkpointing_trains_the_same(webui, webui_assets):
    """With the option on, the host's UNet blocks run checkpointed (the adapter refuses a UNet whose
    blocks it does not know, so this cannot pass as a silent no-op) and the losses are the same."""
    losses = {}
    for on in (False, True):
        name = f"ckpt{int(on)}"
        assert webui.wait_job(webui.post("/sdtrain/v1/jobs", {"kind": "create_embedding", "config": {
            "name": name, "init_text": "shape"}})[1]["id"])["state"] == "done"
        _, out = webui.post("/sdtrain/v1/jobs", {"kind": "train_embedding", "config": train_body(
            name, webui_assets["data"], steps=4, seed=9, gradient_checkpointing=on,
            save_embedding_every=0, log_directory=str(webui.dir / f"{name}_log"))})
        job = webui.wait_job(out["id"])
        assert job["state"] == "done", job
        losses[on] = [h[1] for h in job["loss_history"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5) and len(losses[True]) == 4


def test_hypernetwork_trains_its_modules_only(webui, webui_assets):
    """On every host, whether or not its attention applies hypernetworks itself (reForge does not:
    sdtrain attaches them there): the modules move, the model does not."""
    from lib_sdtrain.core.hypernetwork.network import load_hypernetwork

    before, _ = webui.txt2img("a red circle", seed=5)
    status, out = webui.post("/sdapi/v1/create/hypernetwork", {"name": "onlyhn", "enable_sizes": ["768"]})
    assert status == 200, out
    created = load_hypernetwork(webui.hypernetworks / "onlyhn.pt")
    status, out = webui.post("/sdtrain/v1/jobs", {"kind": "train_hypernetwork", "config": {
        "hypernetwork_name": "onlyhn", "data_root": str(webui_assets["data"]), "steps": 6, "training_width": 64,
        "training_height": 64, "learn_rate": "0.001", "create_image_every": 0, "save_hypernetwork_every": 0,
        "log_directory": str(webui.dir / "onlyhn_log")}})
    assert status == 202, out
    job = webui.wait_job(out["id"])
    assert job["state"] == "done" and job["step"] == 6, job
    trained = load_hypernetwork(webui.hypernetworks / "onlyhn.pt")
    moved = [not torch.equal(a, b) for a, b in zip(created.trainable_params(), trained.trainable_params())]
    assert moved and all(moved)
    after, _ = webui.txt2img("a red circle", seed=5)
    assert list(after.getdata()) == list(before.getdata())


@pytest.mark.needs("hypernetwork_prompt")
def test_hypernetwork_create_train_and_use_in_a_prompt(webui, webui_assets):
    if offers(webui, "hypernetwork_prompt"):  # an untried webui whose probe says it cannot
        pytest.skip(f"the webui's sdtrain probe: <hypernet:...> {offers(webui, 'hypernetwork_prompt')}")
    status, out = webui.post("/sdapi/v1/create/hypernetwork", {"name": "cthn", "enable_sizes": ["768", "320"],
                                                               "layer_structure": "1, 2, 1"})
    assert status == 200 and out["info"] == f"create hypernetwork filename: {webui.hypernetworks / 'cthn.pt'}"
    body = {"hypernetwork_name": "cthn", "data_root": str(webui_assets["data"]), "steps": STEPS, "training_width": 64,
            "training_height": 64, "learn_rate": "0.0001", "create_image_every": STEPS // 2,
            "save_hypernetwork_every": STEPS // 2,
            "preview_steps": 4, "log_directory": str(webui.dir / "hn_log")}
    status, out = webui.post("/sdapi/v1/train/hypernetwork", body)
    assert out["info"] == f"train hypernetwork complete: filename: {webui.hypernetworks / 'cthn.pt'} error: None"
    if offers(webui, "hypernetwork_pages") is None:
        _, listed = webui.get("/sdapi/v1/hypernetworks")
        assert "cthn" in [h["name"] for h in listed]
        # a card on the Hypernetworks extra-networks page (Forge stopped registering the page: sdtrain does)
        status, card = webui.get("/sd_extra_networks/get-single-card?page=hypernetworks&tabname=txt2img&name=cthn")
        assert status == 200 and "hypernet:cthn:" in card["html"], card
    else:  # the webui removed hypernetworks: sdtrain lists the folder, and says the cards page is missing
        _, listed = webui.post("/sdtrain/v1/refresh")
        assert "cthn" in listed["hypernetworks"], listed
        _, report = webui.get("/sdtrain/v1/host")
        assert "hypernetwork_cards" in report["unavailable"], report
    plain, _ = webui.txt2img("a red circle", seed=3)
    with_hn, info = webui.txt2img("a red circle <hypernet:cthn:1>", seed=3)
    zero, _ = webui.txt2img("a red circle <hypernet:cthn:0>", seed=3)
    assert list(with_hn.getdata()) != list(plain.getdata())
    assert list(zero.getdata()) == list(plain.getdata())
    assert "cthn" in info


@pytest.mark.needs("stock_hypernetwork_trainer", "hypernetwork_prompt")
def test_stock_hypernetwork_continued_by_sdtrain_and_back(stock_webui, webui_assets):
    s = stock_webui
    stock_body = {"id_task": "task(h)", "hypernetwork_name": "hswap", "learn_rate": "0.00001", "batch_size": 1,
                  "gradient_step": 1, "data_root": str(webui_assets["data"]), "log_directory": str(s.dir / "hlog"),
                  "training_width": 64, "training_height": 64, "varsize": False, "steps": 4,
                  "clip_grad_mode": "disabled", "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0,
                  "latent_sampling_method": "once", "use_weight": False, "create_image_every": 0,
                  "save_hypernetwork_every": 4, "template_filename": "hypernetwork.txt",
                  "preview_from_txt2img": False, "preview_prompt": "", "preview_negative_prompt": "",
                  "preview_steps": 4, "preview_sampler_name": "Euler", "preview_cfg_scale": 7.0, "preview_seed": -1,
                  "preview_width": 64, "preview_height": 64}
    status, out = s.post("/sdapi/v1/create/hypernetwork", {
        "name": "hswap", "enable_sizes": ["768"], "overwrite_old": False, "layer_structure": [1, 2, 1],
        "activation_func": "relu", "weight_init": "Normal", "add_layer_norm": True, "use_dropout": False})
    assert status == 200, out
    status, out = s.post("/sdapi/v1/train/hypernetwork", stock_body)
    assert "error: None" in out["info"], out
    from lib_sdtrain.core.hypernetwork.network import load_hypernetwork

    assert load_hypernetwork(s.hypernetworks / "hswap.pt").step == 4
    _, out = s.post("/sdtrain/v1/jobs", {"kind": "train_hypernetwork", "config": {
        "hypernetwork_name": "hswap", "data_root": str(webui_assets["data"]), "steps": 9, "training_width": 64,
        "training_height": 64, "create_image_every": 0, "save_hypernetwork_every": 0,
        "log_directory": str(s.dir / "hlog2")}})
    job = s.wait_job(out["id"])
    assert job["state"] == "done" and [h[0] for h in job["loss_history"]] == list(range(5, 10)), job
    continued = load_hypernetwork(s.hypernetworks / "hswap.pt")
    assert continued.step == 9 and continued.activation_func == "relu" and continued.add_layer_norm
    status, out = s.post("/sdapi/v1/train/hypernetwork", {**stock_body, "steps": 12})
    assert "error: None" in out["info"], out
    assert load_hypernetwork(s.hypernetworks / "hswap.pt").step == 12
    exchange_out(s.hypernetworks / "hswap.pt", "hypernetworks", "stock_hswap")


@pytest.mark.needs("preprocess")
def test_preprocess_mixed_images_then_train_on_them(webui):
    src = webui.dir / "photos"
    src.mkdir()
    Image.new("RGB", (160, 96), (200, 40, 40)).save(src / "wide-red.jpg")
    Image.new("RGBA", (80, 120), (20, 160, 40, 100)).save(src / "tall-green.png")
    Image.new("CMYK", (90, 90), (0, 120, 120, 0)).save(src / "cmyk.jpg")
    Image.new("P", (70, 70), 3).save(src / "palette.png")
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (src / "wide-red.txt").write_text("red box, studio")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    dst = webui.dir / "prepared"
    status, out = webui.post("/sdapi/v1/preprocess", {"process_src": str(src), "process_dst": str(dst),
                                                      "process_width": 64, "process_height": 64,
                                                      "preprocess_txt_action": "copy", "process_flip": True})
    assert status == 200 and out == {"info": "preprocess complete"}
    images = sorted(dst.glob("*.png"))
    assert len(images) == 10 and all(Image.open(p).size == (64, 64) and Image.open(p).mode == "RGB" for p in images)
    assert any(p.read_text() == "red box, studio" for p in dst.glob("*.txt"))
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    status, config = webui.get("/config")
    assert "Preprocess images (sdtrain)" in [c["props"].get("label") for c in config["components"]]
    # ... and the prepared set trains
    webui.wait_job(webui.post("/sdtrain/v1/jobs", {"kind": "create_embedding", "config": {"name": "prepti"}})[1]["id"])
    _, out = webui.post("/sdtrain/v1/jobs", {"kind": "train_embedding", "config": {
        "embedding_name": "prepti", "data_root": str(dst), "steps": 10, "training_width": 64, "training_height": 64,
        "create_image_every": 0, "save_embedding_every": 0, "template_filename": "subject_filewords.txt",
        "log_directory": str(webui.dir / "prep_log")}})
    job = webui.wait_job(out["id"])
    assert job["state"] == "done" and job["step"] == 10


@pytest.mark.skipif(not EXCHANGE, reason="SDTRAIN_EXCHANGE_DIR is not set (tools/test.sh sets it to swap files "
                                          "between the webuis it runs)")
def test_files_swap_between_webuis(webui, webui_assets):
    """Files written here (by sdtrain) go to the exchange folder; every file the other webuis left there
    (sdtrain's and their stock trainers') is listed here after /sdtrain/v1/refresh and works in a prompt:
    an embedding is named in the infotext, a hypernetwork changes the image."""
    ex = Path(EXCHANGE)
    for job in ({"kind": "create_embedding", "config": {"name": "xti", "init_text": "shape"}},
                {"kind": "train_embedding", "config": train_body("xti", webui_assets["data"], steps=4,
                                                                  save_embedding_every=0)},
                {"kind": "create_hypernetwork", "config": {"name": "xhn", "enable_sizes": ["768"]}},
                {"kind": "train_hypernetwork", "config": {
                    "hypernetwork_name": "xhn", "data_root": str(webui_assets["data"]), "steps": 2,
                    "training_width": 64, "training_height": 64, "create_image_every": 0,
                    "save_hypernetwork_every": 0, "log_directory": str(webui.dir / "xhn_log")}}):
        assert webui.wait_job(webui.post("/sdtrain/v1/jobs", job)[1]["id"])["state"] == "done", job
    exchange_out(webui.embeddings / "xti.pt", "embeddings", "sdtrain_xti")
    exchange_out(webui.hypernetworks / "xhn.pt", "hypernetworks", "sdtrain_xhn")
    # every sdtrain file of the other webuis, and the files A1111's own trainer wrote (reForge's stock
    # trainer writes torch 2.13's zip records, which A1111's safe-unpickle check refuses in any file)
    theirs = {kind: sorted(f for f in (ex / kind).glob("*") if not f.name.startswith(f"{HOST.name}_")
                           and ("_sdtrain_" in f.name or f.name.startswith("a1111_stock_")))
              for kind in ("embeddings", "hypernetworks")}
    for f in theirs["embeddings"]:
        shutil.copy2(f, webui.embeddings / f.name)
    for f in theirs["hypernetworks"]:
        shutil.copy2(f, webui.hypernetworks / f.name)
    status, listed = webui.post("/sdtrain/v1/refresh")
    assert status == 200
    assert {f.stem for f in theirs["embeddings"]} <= set(listed["embeddings"]), listed
    assert {f.stem for f in theirs["hypernetworks"]} <= set(listed["hypernetworks"]), listed
    for f in theirs["embeddings"]:
        _, info = webui.txt2img(f"a photo of {f.stem}")
        assert HOST.names_embedding(info, f.stem), (f.name, info)
    if offers(webui, "hypernetwork_prompt") is None:
        plain, _ = webui.txt2img("a red circle", seed=3)
        for f in theirs["hypernetworks"]:
            with_hn, _ = webui.txt2img(f"a red circle <hypernet:{f.stem}:1>", seed=3)
            assert list(with_hn.getdata()) != list(plain.getdata()), f.name
    print(f"{HOST.name}: loaded from other webuis: {[f.name for fs in theirs.values() for f in fs]}")


def test_reload_ui_keeps_one_service_and_re_adds_everything(webui):
    """Settings → Reload UI re-runs scripts/ and builds a new app: the job service (and its one
    worker) survives, routes and tabs come back once, and nothing errors."""
    _, before = webui.get("/sdtrain/v1/jobs")
    assert before, "earlier tests ran jobs"
    _, config = webui.get("/config")
    ids = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
    # a target is a component id (gradio 3) or [id, event] (gradio 4)
    reload_fn = next(i for i, d in enumerate(config["dependencies"])
                     if any(ids.get(t[0] if isinstance(t, list) else t) == "settings_restart_gradio"
                            for t in d["targets"]))
    marker = len(webui.log_text())
    status, _ = webui.post("/run/predict", {"fn_index": reload_fn, "data": [], "session_hash": "sdtrain-test"})
    assert status == 200
    deadline = time.time() + 120
    while "Startup time:" not in webui.log_text()[marker:] and time.time() < deadline:
        time.sleep(0.5)
    assert "Startup time:" in webui.log_text()[marker:]
    _, after = webui.get("/sdtrain/v1/jobs")
    assert [j["id"] for j in after] == [j["id"] for j in before]  # the same service
    status, out = webui.post("/sdtrain/v1/jobs", {"kind": "create_embedding", "config": {"name": "afterreload"}})
    assert status == 202 and webui.wait_job(out["id"])["state"] == "done"
    _, config = webui.get("/config")
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert tabs.count("Textual inversion (sdtrain)") == 1
    new_log = webui.log_text()[marker:]
    assert not [ln for ln in new_log.splitlines() if "sdtrain" in ln.lower() and re.search(r"error|traceback", ln, re.I)]


def api_doc_examples(text: str) -> list[tuple[str, list[str]]]:
    """The ```bash blocks of docs/api.md in order, each with the `<!-- expect: REGEX -->` lines after it
    (up to the next block): what its output must contain."""
    out: list[tuple[str, list[str]]] = []
    for part in re.split(r"^```bash\n", text, flags=re.M)[1:]:
        code, _, rest = part.partition("\n```")
        out.append((code, re.findall(r"^<!-- expect: (.*) -->$", rest.split("```bash")[0], flags=re.M)))
    return out


def test_the_curl_examples_in_docs_api_md_run(webui, webui_assets):
    """docs/api.md's examples, as written, in one shell one after another (as a reader would paste them),
    against this webui with a small picture size and few steps; each block's output holds what the page
    says it answers."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "api.md"
    blocks = api_doc_examples(doc.read_text(encoding="utf-8"))
    assert len(blocks) >= 10 and sum(len(e) for _, e in blocks) >= 12, "docs/api.md lost its examples"
    script = "set -eo pipefail\n" + "".join(f"{code}\necho '@@ block {i} @@'\n" for i, (code, _) in enumerate(blocks))
    env = {**os.environ, "WEBUI": webui.url, "PICS": str(webui_assets["data"]), "SIZE": "64", "STEPS": "4"}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    outputs = re.split(r"^@@ block \d+ @@\n", done.stdout, flags=re.M)
    assert done.returncode == 0 and len(outputs) == len(blocks) + 1, (done.stdout[-3000:], done.stderr[-3000:])
    for i, ((code, expected), output) in enumerate(zip(blocks, outputs)):
        for pattern in expected:
            if pattern.startswith("TI hashes") and HOST.name != "a1111":  # each webui words its infotext
                assert HOST.names_embedding(output, "myconcept"), (i, code, output)
                continue
            assert re.search(pattern, output, flags=re.M), (i, code, pattern, output)


#: CI's guard on the per-step time inside the webui (issue 21): sdtrain's step may cost at most this many
#: times the in-tree trainer's, measured side by side in this run (tests/webui/host_timing.py; the full
#: benchmark is bench/host_step.py). Checked on the webui process's CPU time, which other work on the
#: machine barely moves, and on wall time, which also sees a step that waits (a sleep, a lock, polling)
#: but moves with the load: hence its wider margin. sdtrain measured 0.7-0.85x on both (README); single
#: rounds of 16 steps reached 1.07, so the median of three gets a 10 % margin over "never slower".
MAX_CPU_RATIO = 1.10
MAX_WALL_RATIO = 1.25


@pytest.mark.needs("stock_trainer")
@pytest.mark.parametrize("kind", ["ti", "hn"])
def test_step_time_not_above_the_in_tree_trainers(stock_webui, webui, webui_assets, kind):
    """The same body through the host's route, to the in-tree trainer (stock_webui) and to sdtrain
    (webui), alternating over three rounds; per step = (a long request - a short one) / the steps
    between. Fails when the median ratio exceeds the limit."""
    from host_timing import Variant, compare

    if HOST.name != "a1111":
        pytest.skip("the step-time guard runs in A1111 only, to keep CI short (bench/host_step.py measures "
                    "any host on request)")
    short, long = (4, 20) if kind == "ti" else (3, 11)
    started = time.time()
    c = compare(stock_webui, webui, Variant(kind), webui_assets["data"], rounds=3, short=short, long=long)
    print(f"\n{c.row()}  ({time.time() - started:.0f} s)")
    assert c.cpu_ratio <= MAX_CPU_RATIO, f"sdtrain's step costs more CPU than the in-tree trainer's: {c.row()}"
    assert c.ratio <= MAX_WALL_RATIO, f"sdtrain's step takes longer than the in-tree trainer's: {c.row()}"
