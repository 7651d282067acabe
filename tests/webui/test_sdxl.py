"""SDXL inside a real webui (the host is a parameter: see conftest.py and webui_hosts.py).

The webui loads a tiny SDXL base (sgm DiffusionEngine from its own repositories/generative-models,
the hijacked CLIP-L and CLIP-G embedders) from the yaml next to the checkpoint. No webui trainer has
trained SDXL: the stock create_embedding answers HTTP 500 on it and the stock trainer dies. Here the
host's own routes create and train SDXL embeddings and hypernetworks, the host's EmbeddingDatabase
loads the files as SDXL embeddings, and txt2img uses them. What cannot be seen over HTTP (the size
conditioning, the pooled CLIP-G output, eps vs v) is pinned by the standalone host, which builds the
conditioning as sgm's GeneralConditioner does: the same job must give the same step losses.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from webui_hosts import offers, selected

from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.formats.torchfile import load_torch_file

pytestmark = [pytest.mark.webui, pytest.mark.needs("sdxl")]
HOST = selected()


def train_fields(name: str, data, log_dir, **kw) -> dict:
    return {"embedding_name": name, "data_root": str(data), "steps": 10, "training_width": 64,
            "training_height": 64, "learn_rate": "0.01", "template_filename": "subject_filewords.txt",
            "create_image_every": 10, "save_embedding_every": 5, "preview_steps": 4, "seed": 3,
            "log_directory": str(log_dir), **kw}


def test_sdxl_embedding_created_trained_listed_and_used_through_the_host_routes(sdxl_webui, sdxl_assets):
    s = sdxl_webui
    before, _ = s.txt2img("a red circle", seed=11)
    status, out = s.post("/sdapi/v1/create/embedding", {"name": "xlti", "num_vectors_per_token": 2,
                                                        "init_text": "shape"})
    assert status == 200 and out["info"] == f"create embedding filename: {s.embeddings / 'xlti.pt'}", out
    # the host's SDXL form: two tensors and nothing else (its loader calls .detach() on every value)
    raw = load_torch_file(s.embeddings / "xlti.pt")
    assert {k: tuple(v.shape) for k, v in raw.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    created = load_embedding(s.embeddings / "xlti.pt")
    # the host's own EmbeddingDatabase loaded it as an SDXL embedding (2048 = 768 + 1280), not skipped
    _, listed = s.get("/sdapi/v1/embeddings")
    assert listed["loaded"]["xlti"]["shape"] == 2048 and listed["loaded"]["xlti"]["vectors"] == 2, listed
    assert "xlti" not in listed["skipped"]

    status, out = s.post("/sdapi/v1/train/embedding", train_fields("xlti", sdxl_assets["data"], s.dir / "ti_log"))
    assert status == 200, out
    assert out["info"] == f"train embedding complete: filename: {s.embeddings / 'xlti.pt'} error: None", out
    trained = load_embedding(s.embeddings / "xlti.pt")
    for key in ("clip_l", "clip_g"):
        assert torch.isfinite(trained.vectors[key]).all()
        assert not torch.equal(trained.vectors[key], created.vectors[key]), key
    _, listed = s.get("/sdapi/v1/embeddings")
    assert listed["loaded"]["xlti"]["shape"] == 2048, listed
    # used in a prompt at once: the host's infotext names it with the file's hash
    _, info = s.txt2img("a photo of xlti")
    assert HOST.names_embedding(info, "xlti"), info
    # the model's weights are as they were: the same seed gives the same image
    after, _ = s.txt2img("a red circle", seed=11)
    assert list(after.getdata()) == list(before.getdata())


def created_safetensors(s, name: str) -> dict:
    """A 2-vector SDXL embedding created through the job route as .safetensors: its vectors."""
    _, out = s.post("/sdtrain/v1/jobs", {"kind": "create_embedding", "config": {
        "name": name, "num_vectors_per_token": 2, "init_text": "shape", "save_format": "safetensors"}})
    assert s.wait_job(out["id"])["state"] == "done"
    return load_embedding(s.embeddings / f"{name}.safetensors").vectors


def reshaped_data(s, sdxl_assets, folder: str, sizes) -> object:
    """The sample pictures resized one by one to `sizes` (cycled), with their captions."""
    out = s.dir / folder
    out.mkdir()
    pictures = sorted(p for p in sdxl_assets["data"].iterdir() if p.suffix == ".png")
    for i, src in enumerate(pictures):
        Image.open(src).resize(sizes[i % len(sizes)]).save(out / src.name)
    for src in sdxl_assets["data"].iterdir():
        if src.suffix != ".png":
            (out / src.name).write_bytes(src.read_bytes())
    return out


def trained_job(s, fields: dict) -> dict:
    status, out = s.post("/sdtrain/v1/jobs", {"kind": "train_embedding", "config": fields})
    assert status == 202, out
    job = s.wait_job(out["id"])
    assert job["state"] == "done" and job["step"] == fields["steps"], job
    assert all(math.isfinite(h[1]) for h in job["loss_history"])
    return job


def standalone_reference(s, sdxl_assets, job: dict, initial: dict, folder: str):
    """The webui job's run again on the standalone host (the same checkpoint and yaml, conditioning built
    as sgm's conditioner builds it), from the same initial vectors: its Job record."""
    from lib_sdtrain.core.formats.embedding import Embedding
    from lib_sdtrain.core.formats.embedding_io import save_embedding_safetensors
    from lib_sdtrain.core.jobs.service import Job
    from lib_sdtrain.core.options.config import TrainEmbeddingConfig
    from lib_sdtrain.core.tasks.textual_inversion import train_embedding
    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    name = job["config"]["embedding_name"]
    work = s.dir / folder
    (work / "emb").mkdir(parents=True)
    save_embedding_safetensors(Embedding(name=name, vectors=initial, step=0), work / "emb" / f"{name}.safetensors")
    ckpt = sdxl_assets["ckpt"]
    host = StandaloneHost.load_checkpoint(ckpt, ckpt.with_suffix(".yaml"))
    cfg = TrainEmbeddingConfig.from_dict({**job["config"], "embeddings_dir": str(work / "emb"),
                                          "log_directory": str(work / "log")})
    ref = Job(id="reference", kind="train_embedding", config=cfg)
    train_embedding(host, cfg, ref.control)
    return ref


def test_sdxl_job_matches_the_standalone_conditioning(sdxl_webui, sdxl_assets):
    """A .safetensors SDXL embedding through the job routes; the same run on the standalone host gives the
    same losses: the adapter fed the pooled CLIP-G output, the per-image size conditioning and the eps target."""
    s = sdxl_webui
    initial = created_safetensors(s, "xljob")
    # wide pictures, randomly cropped and flipped: every item has its own crop offset to condition on
    wide = reshaped_data(s, sdxl_assets, "wide_data", [(112, 64)])
    job = trained_job(s, train_fields("xljob", wide, s.dir / "job_log", save_format="safetensors", crop="random",
                                      flip_p=0.5, create_image_every=0, save_embedding_every=0))
    ref = standalone_reference(s, sdxl_assets, job, initial, "reference")
    assert [h[1] for h in job["loss_history"]] == pytest.approx([loss for _step, loss, _lr in ref.loss], rel=1e-4)


def test_sdxl_encoder_rate_and_norm_limit_in_the_webui(sdxl_webui, sdxl_assets):
    """learn_rate_clip_g 0 keeps the CLIP-G vectors as created while CLIP-L trains; norm_limit holds the
    CLIP-L vectors at limit × the webui host's typical norm (its token_embedding_norms, read from the table
    the host's splice wraps), which is the median row norm of the checkpoint's CLIP-L token table: the
    standalone host's, loaded from the same file."""
    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    s = sdxl_webui
    initial = created_safetensors(s, "xlnorm")
    trained_job(s, train_fields("xlnorm", sdxl_assets["data"], s.dir / "norm_log", save_format="safetensors",
                                steps=4, create_image_every=0, save_embedding_every=0, learn_rate="3",
                                learn_rate_clip_g="0", norm_limit=1.5))
    trained = load_embedding(s.embeddings / "xlnorm.safetensors").vectors
    assert torch.equal(trained["clip_g"], initial["clip_g"])
    assert not torch.equal(trained["clip_l"], initial["clip_l"])
    ckpt = sdxl_assets["ckpt"]
    typical = StandaloneHost.load_checkpoint(ckpt, ckpt.with_suffix(".yaml")).token_embedding_norms()
    top = float(trained["clip_l"].norm(dim=-1).max())
    assert top == pytest.approx(1.5 * typical["clip_l"], rel=1e-5)


def test_sdxl_buckets_and_a_held_out_split_match_the_standalone_host(sdxl_webui, sdxl_assets):
    """Pictures of three shapes in aspect-ratio buckets (32 px steps for SDXL), one picture held out for the
    validation loss: the webui adapter gets each bucket's size conditioning, and the job's training and
    validation losses equal the standalone host's."""
    s = sdxl_webui
    initial = created_safetensors(s, "xlbucket")
    mixed = reshaped_data(s, sdxl_assets, "mixed_data", [(112, 64), (64, 112), (112, 64), (64, 64)])
    job = trained_job(s, train_fields("xlbucket", mixed, s.dir / "bucket_log", save_format="safetensors",
                                      training_width=96, training_height=96, bucketing=True, bucket_upscale=True,
                                      validation_split=0.25, validation_every=5, create_image_every=0,
                                      save_embedding_every=0))
    ref = standalone_reference(s, sdxl_assets, job, initial, "bucket_reference")
    assert [h[1] for h in job["loss_history"]] == pytest.approx([loss for _step, loss, _lr in ref.loss], rel=1e-4)
    notes = [e.data.get("text", "") for e in ref.events if e.kind == "log"]
    buckets = next(n for n in notes if n.startswith("aspect-ratio buckets"))
    assert "3 images in 3 buckets" in buckets or "3 images in 2 buckets" in buckets, buckets  # one held out
    assert [v[0] for v in job["validation_history"]] == [0, 5, 10]
    assert [v[1] for v in job["validation_history"]] == pytest.approx([v[1] for v in ref.validation], rel=1e-4)


@pytest.mark.needs("hypernetwork_prompt")
def test_sdxl_hypernetwork_created_trained_and_applied_in_a_prompt(sdxl_webui, sdxl_assets):
    s = sdxl_webui
    status, out = s.post("/sdapi/v1/create/hypernetwork", {"name": "xlhn", "enable_sizes": ["2048", "64"],
                                                           "layer_structure": "1, 1"})
    assert status == 200 and out["info"] == f"create hypernetwork filename: {s.hypernetworks / 'xlhn.pt'}", out
    status, out = s.post("/sdapi/v1/train/hypernetwork", {
        "hypernetwork_name": "xlhn", "data_root": str(sdxl_assets["data"]), "steps": 10, "training_width": 64,
        "training_height": 64, "learn_rate": "0.001", "template_filename": "style_filewords.txt",
        "create_image_every": 0, "save_hypernetwork_every": 0, "log_directory": str(s.dir / "hn_log")})
    assert out["info"] == f"train hypernetwork complete: filename: {s.hypernetworks / 'xlhn.pt'} error: None", out
    if offers(s, "hypernetwork_pages") is None:
        _, listed = s.get("/sdapi/v1/hypernetworks")
        assert "xlhn" in [h["name"] for h in listed], listed
    else:  # the webui removed hypernetworks (Forge Classic): sdtrain lists the folder
        _, listed = s.post("/sdtrain/v1/refresh")
        assert "xlhn" in listed["hypernetworks"], listed
    plain, _ = s.txt2img("a red circle", seed=3)
    with_hn, info = s.txt2img("a red circle <hypernet:xlhn:1>", seed=3)
    zero, _ = s.txt2img("a red circle <hypernet:xlhn:0>", seed=3)
    assert list(with_hn.getdata()) != list(plain.getdata())
    assert list(zero.getdata()) == list(plain.getdata())
    assert "xlhn" in info, info


def test_sdxl_hypernetwork_job_matches_the_standalone_host(sdxl_webui, sdxl_assets):
    """An SDXL hypernetwork (cross-attention width 2048) trained through the job route gives the standalone
    host's losses from the same file and seed: the webui applies the modules where sgm's attention takes
    its context, in training as in generation."""
    import shutil

    from lib_sdtrain.core.jobs.service import Job
    from lib_sdtrain.core.options.config import TrainHypernetworkConfig
    from lib_sdtrain.core.tasks.hypernetwork import train_hypernetwork
    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    s = sdxl_webui
    status, out = s.post("/sdapi/v1/create/hypernetwork", {"name": "xlhnref", "enable_sizes": ["2048"], "seed": 4})
    assert status == 200 and out["info"].endswith("xlhnref.pt"), out
    ref_dir = s.dir / "hn_reference"
    ref_dir.mkdir()
    shutil.copy2(s.hypernetworks / "xlhnref.pt", ref_dir / "xlhnref.pt")
    config = {"hypernetwork_name": "xlhnref", "data_root": str(sdxl_assets["data"]), "steps": 6,
              "training_width": 64, "training_height": 64, "learn_rate": "0.001", "batch_size": 2,
              "template_filename": "style_filewords.txt", "create_image_every": 0, "save_hypernetwork_every": 0,
              "seed": 5}
    status, out = s.post("/sdtrain/v1/jobs", {"kind": "train_hypernetwork", "config": {
        **config, "log_directory": str(s.dir / "hnref_log")}})
    assert status == 202, out
    job = s.wait_job(out["id"])
    assert job["state"] == "done" and job["step"] == 6, job
    ckpt = sdxl_assets["ckpt"]
    host = StandaloneHost.load_checkpoint(ckpt, ckpt.with_suffix(".yaml"))
    cfg = TrainHypernetworkConfig.from_dict({**job["config"], "hypernetwork_dir": str(ref_dir),
                                             "log_directory": str(ref_dir / "log")})
    ref = Job(id="reference", kind="train_hypernetwork", config=cfg)
    train_hypernetwork(host, cfg, ref.control)
    assert [h[1] for h in job["loss_history"]] == pytest.approx([loss for _step, loss, _lr in ref.loss], rel=1e-4)


def test_sdxl_interrupt_stops_within_a_step_and_keeps_a_loadable_file(sdxl_webui, sdxl_assets):
    """The host's progress bar and Interrupt drive an SDXL job as they drive an SD1 one; the file saved
    at the stop holds both vector sets (and, as a .pt, its step in the .optim)."""
    from lib_sdtrain.core.formats.embedding_io import load_optim

    s = sdxl_webui
    assert s.wait_job(s.post("/sdtrain/v1/jobs", {"kind": "create_embedding", "config": {"name": "xlint"}})[1]["id"])[
        "state"] == "done"
    job = s.interrupt_training(train_fields("xlint", sdxl_assets["data"], s.dir / "int_log", steps=100000,
                                            create_image_every=0, save_embedding_every=0), after_step=2)
    saved = load_embedding(s.embeddings / "xlint.pt")
    assert saved.is_sdxl and all(torch.isfinite(v).all() for v in saved.vectors.values())
    assert load_optim(s.embeddings / "xlint.pt", saved.checksum())["step"] == job["step"]
