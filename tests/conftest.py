"""Shared test fixtures: tiny real-architecture models built offline in a temp dir, once per session."""

from __future__ import annotations

import os

# Nothing in the tests may reach a model hub; make any accidental attempt fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# One thread per process: OpenMP spin-waiting makes multi-threaded CPU steps 10-100x slower under load.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    from lib_sdtrain.hosts.standalone.tokenizer import write_clip_tokenizer

    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_sd1")


@pytest.fixture(scope="session")
def tiny_sd1(tiny_sd1_dir):
    """A tiny SD1 LatentDiffusion (eps), CLIP width 64, 2 heads; its CLIP folder is `tiny_sd1_dir/clip`.
    Shared by the whole session: tests must leave its weights and flags as they found them."""
    from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd1

    return build_tiny_sd1(tiny_sd1_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_v(tmp_path_factory):
    from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd1

    return build_tiny_sd1(tmp_path_factory.mktemp("tiny_sd1_v"), seed=1, prediction="v")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    from lib_sdtrain.hosts.standalone.tiny import build_tiny_sd2

    return build_tiny_sd2(tmp_path_factory.mktemp("tiny_sd2"), seed=2)


#: Where the tests find SDXL's `sgm` code: SDTRAIN_SGM_DIR (a generative-models checkout), or the
#: A1111 source archive beside this checkout (../shared/hosts), from which it is unpacked.
HOSTS_DIR = os.environ.get("SDTRAIN_HOSTS_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "hosts")
A1111_ARCHIVE = "a1111-v1.10.1-src.tar.gz"
SGM_MEMBER = "stable-diffusion-webui/repositories/generative-models/"


@pytest.fixture(scope="session")
def sgm_dir(tmp_path_factory):
    """A folder holding the `sgm` package, put on sys.path (skips, saying why, without one)."""
    import tarfile

    from lib_sdtrain.hosts.standalone.sgm_source import ensure_sgm

    folder = os.environ.get("SDTRAIN_SGM_DIR")
    if not folder:
        archive = os.path.join(HOSTS_DIR, A1111_ARCHIVE)
        if not os.path.isfile(archive):
            pytest.skip(f"SDXL needs sgm: set SDTRAIN_SGM_DIR, or put {A1111_ARCHIVE} in {HOSTS_DIR}")
        out = tmp_path_factory.mktemp("sgm")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(SGM_MEMBER + "sgm/")
                       or m.name.startswith(SGM_MEMBER + "configs/")]
            tar.extractall(out, members=members, filter="data")
        folder = str(out / SGM_MEMBER)
    os.environ["SDTRAIN_SGM_DIR"] = folder
    ensure_sgm()
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl(sgm_dir, tiny_sdxl_dir):
    """A tiny SDXL DiffusionEngine from the real sgm code (eps): CLIP-L 768 and CLIP-G 1280 wide, two
    layers each; toy UNet and VAE. Shared by the session: tests leave weights and flags as they were."""
    from lib_sdtrain.hosts.standalone.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tiny_sdxl_dir, seed=0)


@pytest.fixture
def data_dir(tmp_path):
    """A dataset folder with one file (the config tests check paths, not pictures)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.png").write_bytes(b"not checked here")
    return str(d)
