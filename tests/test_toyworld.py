"""The toy world: its drawings and reader, its trained checkpoint's files, that it draws what its
captions say, and that sdtrain's textual inversion and hypernetworks learn concepts in it.

These are the tests that tell a trainer that learns from one that is subtly wrong: every threshold is
met by a correct trainer on every run (fixed seeds) and missed by a broken one (the sabotages in
bench/sabotage.py; tests below break the trainer on purpose, too).
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from lib_sdtrain.toyworld import concept, models
from lib_sdtrain.toyworld.reader import read
from lib_sdtrain.toyworld.world import ATTRIBUTES, COLORS, SHAPES, all_captions, draw, random_scene


def _accuracy(images, scenes):
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for im, s in zip(images, scenes):
        got = read(im).attributes()
        for a in ATTRIBUTES:
            hits[a] += got[a] == s.attributes()[a]
    return {a: h / len(scenes) for a, h in hits.items()}


# -- the world and its reader ------------------------------------------------------------------------
def test_world_is_deterministic_and_its_captions_name_the_drawing():
    a = [random_scene(random.Random(5)) for _ in range(3)]
    b = [random_scene(random.Random(5)) for _ in range(3)]
    assert a == b
    assert draw(a[0]).tobytes() == draw(b[0]).tobytes()
    s = random_scene(random.Random(1), shape="star", color="orange", size="small", background="dark")
    assert s.caption() == "star, orange, small, dark background"
    assert s.caption((True, False, False, True)) == "star, dark background"
    assert len(SHAPES) >= 4 and len(COLORS) >= 8
    caps = all_captions()
    assert caps[0] == "" and len(caps) == len(set(caps)) == 5 * 9 * 4 * 3
    with pytest.raises(ValueError, match="color must be one of"):
        random_scene(random.Random(0), color="mauve")


def test_reader_reads_fresh_drawings():
    rng = random.Random(2024)
    scenes = [random_scene(rng) for _ in range(400)]
    acc = _accuracy([draw(s) for s in scenes], scenes)
    assert min(acc.values()) >= 0.98, acc


def test_reader_reads_the_world_vae_reconstructions():
    from safetensors.torch import load_file

    from lib_sdtrain.toyworld.vae import build_vae, reconstruct

    vae = build_vae()
    vae.load_state_dict({k: v.float() for k, v in load_file(str(models.stored_file("vae.safetensors"))).items()})
    rng = random.Random(77)
    scenes = [random_scene(rng) for _ in range(160)]
    acc = _accuracy(reconstruct(vae.eval(), [draw(s) for s in scenes]), scenes)
    assert min(acc.values()) >= 0.95, acc


# -- the files ------------------------------------------------------------------------------------------
def test_a_missing_or_altered_world_file_names_it_and_how_to_rebuild(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    shutil.copytree(models.WEIGHTS, weights)
    monkeypatch.setattr(models, "WEIGHTS", weights)
    monkeypatch.setattr(models, "RECORD", weights / "record.json")
    assert models.stored_file("sd1-unet.safetensors").is_file()
    raw = bytearray((weights / "sd1-unet.safetensors").read_bytes())
    raw[-5] ^= 1
    (weights / "sd1-unet.safetensors").write_bytes(bytes(raw))
    with pytest.raises(models.ToyWorldFileError, match=r"sd1-unet.safetensors is altered.*toyworld train sd1`"):
        models.stored_file("sd1-unet.safetensors")
    (weights / "vae.safetensors").unlink()
    with pytest.raises(models.ToyWorldFileError, match=r"vae.safetensors is missing.*toyworld train vae`"):
        models.stored_file("vae.safetensors")


def test_the_repo_holds_at_most_25_mb_of_world():
    total = sum(p.stat().st_size for p in models.WEIGHTS.glob("*.safetensors"))
    assert total <= 25_000_000, total


def test_assembled_sd1_checkpoint_matches_its_record_and_loads(toy_sd1):
    files, host = toy_sd1
    assert models.sha256(files["ckpt"]) == models._read_record()["assembled"]["sd1"]
    assert files["yaml"].is_file()
    info = host.describe()
    assert info.family == "sd1" and info.latent_downscale == 8


# -- the world draws what it is told --------------------------------------------------------------
def test_sd1_world_draws_its_captions(toy_sd1):
    from lib_sdtrain.toyworld.sample import world_fidelity

    _, host = toy_sd1
    fid, _, _ = world_fidelity(host, n=64, seed=3)
    # shape and colour as the caption says: 78% here (seed 3; 84% at seed 0); colour, size and
    # background 97-100%. The goal is 90%: the shapes are the world's weak part (see README)
    assert fid.match >= 0.75, fid
    assert min(fid.per_attribute[a] for a in ("color", "size", "background")) >= 0.9, fid


# -- concepts learned ------------------------------------------------------------------------------
def test_ti_learns_a_concept_no_word_names(toy_sd1, tmp_path):
    _, host = toy_sd1
    data = concept.write_concept_set(tmp_path / "data", n=8, seed=0)
    emb, _ = concept.train_embedding(host, tmp_path, data, steps=150)
    want = dict(concept.CONCEPT)
    with host.use_embedding("toy-concept", emb.vectors):
        after = concept.matches(concept.concept_pictures(host, "toy-concept", n=32), want)
        light = concept.matches(concept.concept_pictures(host, "toy-concept, light background", n=32),
                                {**want, "background": "light"})
        dark = concept.matches(concept.concept_pictures(host, "toy-concept, dark background", n=32),
                               {**want, "background": "dark"})
    assert after >= 0.8, after
    assert min(light, dark) >= 0.7, (light, dark)


def test_before_training_the_prompt_does_not_show_the_concept(toy_sd1, tmp_path):
    _, host = toy_sd1
    init = host.initial_vectors("thing", 2)
    with host.use_embedding("toy-concept", init):
        before = concept.matches(concept.concept_pictures(host, "toy-concept", n=32), dict(concept.CONCEPT))
    assert before <= 0.2, before


def test_a_hypernetwork_learns_a_change_to_every_picture(toy_sd1, tmp_path):
    _, host = toy_sd1
    data = concept.write_style_set(tmp_path / "data", n=64, seed=0)
    hn, _ = concept.train_hypernetwork(host, tmp_path, data, steps=200)
    prompts, plain, styled, off = concept.style_pictures(host, hn)
    purple = {"color": concept.STYLE_COLOR}
    assert concept.matches(styled, purple) >= 0.8, concept.matches(styled, purple)
    assert concept.matches(plain, purple) <= 0.3
    # the prompt's other attributes stay: the shape still follows the caption
    shapes = sum(read(im).shape == s.shape for im, (_, s) in zip(styled, prompts)) / 32
    assert shapes >= 0.7, shapes
    # multiplier 0 is the world's own drawing
    assert all(a.tobytes() == b.tobytes() for a, b in zip(off, plain))


def test_sdxl_ti_learns_the_concept_on_both_encoders(toy_sdxl, tmp_path):
    _, host = toy_sdxl
    data = concept.write_concept_set(tmp_path / "data", n=8, seed=0)
    emb, _ = concept.train_embedding(host, tmp_path, data, steps=150)
    assert set(emb.vectors) == {"clip_l", "clip_g"}
    want = dict(concept.CONCEPT)
    with host.use_embedding("toy-concept", host.initial_vectors("thing", 2)):
        before = concept.matches(concept.concept_pictures(host, "toy-concept", n=32), want)
    with host.use_embedding("toy-concept", emb.vectors):
        after = concept.matches(concept.concept_pictures(host, "toy-concept", n=32), want)
    assert before <= 0.2 and after >= 0.8, (before, after)


def test_sdxl_world_draws_its_captions(toy_sdxl):
    from lib_sdtrain.toyworld.sample import world_fidelity

    _, host = toy_sdxl
    fid, _, _ = world_fidelity(host, n=64, seed=3)
    assert fid.match >= 0.8, fid  # 88 % measured (bench/toyworld.py, this call); squares drawn as circles are the main error
    assert min(fid.per_attribute[a] for a in ("color", "size", "background")) >= 0.9, fid


@pytest.fixture(scope="module")
def toy_sdxl(tmp_path_factory, sgm_dir):
    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    files = models.assemble("sdxl", tmp_path_factory.mktemp("toy_sdxl"))
    return files, StandaloneHost.load_checkpoint(files["ckpt"], files["yaml"], files["clip"])


@pytest.fixture(scope="module")
def toy_sd1(tmp_path_factory):
    from lib_sdtrain.hosts.standalone.host import StandaloneHost

    files = models.assemble("sd1", tmp_path_factory.mktemp("toy_sd1"))
    torch.manual_seed(0)
    return files, StandaloneHost.load_checkpoint(files["ckpt"], files["yaml"], files["clip"])
