"""Hostile files are refused with a message naming them, from their headers, before their contents are
loaded (core.formats.limits), and never crash a run: oversized torch zips (a zip bomb among them),
.safetensors headers claiming more than the bound or than the file holds, decompression-bomb images as
embedding carriers, training pictures and preprocess sources, NaN/Inf and wrong-shape embeddings, and
optimizer states that do not fit the tensors being trained."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib

import pytest
import torch
from PIL import Image

from lib_sdtrain.core.errors import FormatError
from lib_sdtrain.core.formats import limits
from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.formats.torchfile import load_torch_file
from lib_sdtrain.core.training.optimizer_state import restore_optimizer


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` grey pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_torch_zip_bomb_is_refused_from_its_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_TENSOR_BYTES", 1024**2)
    buf = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(4, 8)}, "name": "x"}, buf)
    # the same archive with one entry deflated to a few KB that unpacks to 8 MB
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("archive/data/99", b"\0" * (8 * 1024**2), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 64 * 1024
    with pytest.raises(FormatError, match=r"bomb\.pt: unpacks to 8 MiB; sdtrain loads at most 1 MiB"):
        load_torch_file(bomb)
    with pytest.raises(FormatError, match="unpacks to"):
        load_embedding(bomb)
    big = tmp_path / "big.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1024, 512)}}, big)  # 2 MiB of real tensor
    with pytest.raises(FormatError, match=r"big\.pt: unpacks to 2 MiB"):
        load_embedding(big)


def test_safetensors_headers_claiming_too_much_are_refused(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    lying = tmp_path / "lying.safetensors"  # claims 4 TB of float32 in a 100-byte file
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [1000000, 1000000],
                                        "data_offsets": [0, 4 * 10**12]}}).encode()
    lying.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(FormatError, match=r"lying\.safetensors"):
        load_embedding(lying)
    huge_header = tmp_path / "header.safetensors"
    huge_header.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(FormatError, match="header claims"):
        limits.check_safetensors(str(huge_header))
    monkeypatch.setattr(limits, "MAX_TENSOR_BYTES", 1024**2)
    real = tmp_path / "real.safetensors"
    save_file({"emb_params": torch.zeros(1024, 512)}, str(real))
    with pytest.raises(FormatError, match=r"real\.safetensors: claims 2 MiB of tensors"):
        load_embedding(real)


def test_decompression_bomb_images_are_refused_wherever_sdtrain_opens_images(tmp_path, monkeypatch):
    from lib_sdtrain.core.preprocess.operations import load_image

    giant = tmp_path / "giant.png"
    giant.write_bytes(crafted_png(50_000, 50_000))  # 2.5 G pixels in 100 bytes: PIL's own guard trips
    over = tmp_path / "over.png"
    over.write_bytes(crafted_png(11_000, 11_000))  # 121 M pixels: only sdtrain's bound
    for path, why in ((giant, "refused: Image size"), (over, "is 121,000,000 pixels; sdtrain opens at most")):
        with pytest.raises(FormatError, match=why):
            load_embedding(path)  # as an embedding carrier
        with pytest.raises(FormatError, match=why):
            load_image(path)  # as a preprocess source
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 50_000)
    webp = tmp_path / "big.webp"
    Image.new("RGB", (300, 300), (9, 9, 9)).save(webp)
    with pytest.raises(FormatError, match=r"big\.webp: 300x300 is 90,000 pixels"):
        load_embedding(webp)


def test_a_bomb_among_training_pictures_is_skipped_naming_it(tmp_path):
    from lib_sdtrain.core.data.imageset import DatasetOptions, load_images
    from lib_sdtrain.core.data.samples import write_sample_dataset

    data = write_sample_dataset(tmp_path / "data", count=2, size=64, seed=1)
    (data / "zz-bomb.png").write_bytes(crafted_png(11_000, 11_000))
    template = tmp_path / "t.txt"
    template.write_text("a photo of [name]\n")
    images = load_images(DatasetOptions(data_root=data, width=64, height=64, placeholder_token="x",
                                        template_file=template))
    assert len(images.images) == 2  # the rest trains
    assert [(p.rsplit("/", 1)[-1], "sdtrain opens at most" in why) for p, why in images.skipped] == [
        ("zz-bomb.png", True)]


@pytest.mark.parametrize("bad, why", [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite")])
def test_nan_and_inf_embeddings_are_refused(tmp_path, bad, why):
    vec = torch.zeros(2, 8)
    vec[1, 3] = bad
    path = tmp_path / "bad.pt"
    torch.save({"string_to_param": {"*": vec}, "name": "bad"}, path)
    with pytest.raises(FormatError, match=rf"bad\.pt: .*{why}"):
        load_embedding(path)


def test_wrong_shape_embeddings_are_refused(tmp_path):
    path = tmp_path / "cube.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 3, 4)}}, path)
    with pytest.raises(FormatError, match=r"cube\.pt: .*shape \(2, 3, 4\); expected \[vectors, width\]"):
        load_embedding(path)


def test_optimizer_states_that_do_not_fit_are_not_used():
    params = [torch.nn.Parameter(torch.zeros(2, 8))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    before = optimizer.state_dict()
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 8))], lr=0.1)
    other.param_groups[0]["params"][0].grad = torch.ones(3, 8)
    other.step()
    why = restore_optimizer(optimizer, other.state_dict())
    assert "shape (3, 8), the parameter (2, 8)" in why
    assert optimizer.state_dict() == before  # untouched
    fitting = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 8))], lr=0.1)
    fitting.param_groups[0]["params"][0].grad = torch.ones(2, 8)
    fitting.step()
    state = fitting.state_dict()
    state["state"][0]["exp_avg"] = torch.full((2, 8), float("nan"))
    assert "NaN" in restore_optimizer(optimizer, state)
    state["state"][0]["exp_avg"] = torch.zeros(2, 8)
    assert restore_optimizer(optimizer, state) is None and params[0] in optimizer.state
    assert "parameter 5" in restore_optimizer(optimizer, {"state": {5: {}}, "param_groups": before["param_groups"]})
