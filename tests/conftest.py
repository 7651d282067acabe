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
