"""Core: embeddings stored in images — A1111's PNG text chunk and its pixel-encoded side blocks.

Compatible with modules/textual_inversion/image_embedding.py (A1111 v1.10): the same JSON tensor
encoding (`{"TORCHTENSOR": nested list}`), base64 text chunk `sd-ti-embedding`, and the same
zlib + nibble + LCG-xor + dot-pattern layout, so the host reads what we write and vice versa.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import zlib
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lib_sdtrain.core.formats.limits import open_image

#: PNG text key the host looks for (textual_inversion.py `load_from_file`).
TEXT_CHUNK_KEY = "sd-ti-embedding"
_TENSOR_TAG = "TORCHTENSOR"
#: Refuse payloads that inflate beyond this (an SDXL 75-vector embedding is ~5 MB of JSON).
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024

# The host's `lcg()` generator: Numerical Recipes constants, seed 0, each state taken % 255.
_LCG_A, _LCG_C, _LCG_MASK = 1664525, 1013904223, 0xFFFFFFFF
_LCG_BLOCK = 4096
# Side blocks are 3 values deep per pixel (RGB), as `d = 3` in the host.
_DEPTH = 3


# --- JSON tensor encoding ---------------------------------------------------------------------


class _TensorEncoder(json.JSONEncoder):
    def default(self, o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return {_TENSOR_TAG: o.detach().cpu().numpy().tolist()}
        return super().default(o)


def _tensor_hook(obj: dict) -> Any:
    if _TENSOR_TAG in obj:
        # float64, as the host's EmbeddingDecoder makes it; callers cast to float32.
        return torch.from_numpy(np.array(obj[_TENSOR_TAG], dtype=np.float64))
    return obj


def data_to_json(data: dict) -> bytes:
    """Core: the host's JSON for an embedding dict (default separators, tensors as nested lists)."""
    return json.dumps(data, cls=_TensorEncoder).encode()


def data_from_json(raw: bytes | str) -> dict:
    """Core: parse the host's JSON encoding back to a dict with float64 tensors (ValueError if bad)."""
    data = json.loads(raw, object_hook=_tensor_hook)
    if not isinstance(data, dict):
        raise ValueError(f"embedded data is a {type(data).__name__}, not a dict")
    return data


# --- text chunk -------------------------------------------------------------------------------


def encode_text_chunk(data: dict) -> str:
    """Core: the `sd-ti-embedding` text value: base64 of the JSON encoding."""
    return base64.b64encode(data_to_json(data)).decode("ascii")


def decode_text_chunk(image: Image.Image) -> dict | None:
    """Core: the dict in the image's `sd-ti-embedding` text chunk; None if there is none.

    Raises ValueError when the chunk exists but is not valid base64 JSON.
    """
    text = getattr(image, "text", None)  # PNG only; WebP & co. have no .text (as in the host)
    if not text or TEXT_CHUNK_KEY not in text:
        return None
    try:
        raw = base64.b64decode(text[TEXT_CHUNK_KEY])
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the '{TEXT_CHUNK_KEY}' text chunk is not base64 ({exc})") from None
    return data_from_json(raw)


# --- pixel encoding ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _lcg_jump_tables() -> tuple[np.ndarray, np.ndarray]:
    """mult[j], add[j] such that state_{t+j+1} = mult[j] * state_t + add[j]  (mod 2**32)."""
    mult = np.empty(_LCG_BLOCK, np.uint64)
    add = np.empty(_LCG_BLOCK, np.uint64)
    m, c = 1, 0
    for j in range(_LCG_BLOCK):
        m, c = (m * _LCG_A) & _LCG_MASK, (c * _LCG_A + _LCG_C) & _LCG_MASK
        mult[j], add[j] = m, c
    return mult, add


def lcg_stream(n: int) -> np.ndarray:
    """Core: the first `n` values of the host's `lcg()` stream, as uint8, vectorized by blocks.

    Products stay below 2**64 (both factors < 2**32), so uint64 arithmetic is exact.
    """
    mult, add = _lcg_jump_tables()
    out = np.empty(n, np.uint8)
    state = np.uint64(0)
    for start in range(0, n, _LCG_BLOCK):
        states = (mult * state + add) & np.uint64(_LCG_MASK)
        k = min(_LCG_BLOCK, n - start)
        out[start : start + k] = (states[:k] % np.uint64(255)).astype(np.uint8)
        state = states[-1]
    return out


def _xor_nibbles(block: np.ndarray) -> np.ndarray:
    """The host's `xor_block`: xor the low nibble with the LCG stream (its own inverse)."""
    noise = lcg_stream(block.size).reshape(block.shape) & 0x0F
    return np.bitwise_xor(block.astype(np.uint8), noise)


def _dot_pattern(height: int, width: int, sequence: np.ndarray) -> np.ndarray:
    """The host's `style_block` foreground: staggered 6px dots shaded by `sequence`, high nibble only."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    shades = [int(v) for v in sequence] or [0]
    i = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            dx = 4 if row % 2 == 0 else 0
            shade = shades[i % len(shades)]
            i += 1
            draw.ellipse((x + dx, y, x + dx + 6, y + 6), fill=(shade, shade, shade))
    return np.asarray(canvas, dtype=np.uint8) & 0xF0


def _edge_sequence(data: dict) -> np.ndarray:
    """Dot shades from the first vector (first 1024 values, |v| / max|v| * 255), as the host.

    The host takes `data['string_to_param']`'s tensor; for SDXL dicts we take the first tensor.
    All-zero vectors (the host would divide by zero) give black dots.
    """
    params = data.get("string_to_param", data)
    tensor = next(v for v in params.values() if isinstance(v, torch.Tensor))
    values = tensor.detach().cpu().double()
    row = values[0] if values.ndim > 1 else values
    first = np.abs(np.nan_to_num(row.reshape(-1)[:1024].numpy()))
    peak = float(first.max()) if first.size else 0.0
    if peak <= 0:
        return np.zeros(max(first.size, 1), np.uint8)
    return (first / peak * 255).astype(np.uint8)


def _padded_size(n: int, height: int) -> int:
    """The host's padding: up past a multiple of height, then up past a multiple of height*3."""
    size = n + (height - n % height)
    return size + (height * _DEPTH - size % (height * _DEPTH))


def encode_pixel_data(image: Image.Image, data: dict) -> Image.Image:
    """Core: the host's `insert_image_data_embed`: [low nibbles | black | image | black | high nibbles].

    The zlib'd JSON is split into nibbles, each side block gets the dot styling in its high
    nibble and the LCG xor in its low one. Returns a new RGB image.
    """
    payload = np.frombuffer(zlib.compress(data_to_json(data), level=9), np.uint8)
    height = image.size[1]
    size = _padded_size(payload.shape[0], height)
    low = np.resize(payload & 0x0F, size).reshape((height, -1, _DEPTH))
    high = np.resize(payload >> 4, size).reshape((height, -1, _DEPTH))
    shades = _edge_sequence(data)
    low = _xor_nibbles(low ^ _dot_pattern(low.shape[0], low.shape[1], shades))
    high = _xor_nibbles(high ^ _dot_pattern(high.shape[0], high.shape[1], shades[::-1]))
    side = low.shape[1]
    out = Image.new("RGB", (image.size[0] + 2 * side + 2, height), (0, 0, 0))
    out.paste(Image.fromarray(low, mode="RGB"), (0, 0))
    out.paste(image.convert("RGB"), (side + 1, 0))
    out.paste(Image.fromarray(high, mode="RGB"), (side + 1 + image.size[0] + 1, 0))
    return out


def _crop_black(arr: np.ndarray) -> np.ndarray:
    """The host's `crop_black`: keep the bounding box of pixels with every channel > 0."""
    mask = (arr > 0).all(axis=2)
    cols, rows = mask.any(axis=0), mask.any(axis=1)
    c0, c1 = int(cols.argmax()), cols.shape[0] - int(cols[::-1].argmax())
    r0, r1 = int(rows.argmax()), rows.shape[0] - int(rows[::-1].argmax())
    return arr[r0:r1, c0:c1]


def pixel_payload(image: Image.Image) -> bytes | None:
    """Core: the host's `extract_image_data_embed` up to the zlib stream; None if no side blocks."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    nibbles = _crop_black(arr) & 0x0F
    black = np.flatnonzero(nibbles.sum(axis=(0, 2), dtype=np.int64) == 0)
    if black.shape[0] < 2:
        return None
    lower = nibbles[:, : black.min(), :]
    upper = nibbles[:, black.max() + 1 :, :]
    if lower.shape != upper.shape or lower.size == 0:
        return None
    return ((_xor_nibbles(upper) << 4) | _xor_nibbles(lower)).astype(np.uint8).tobytes()


def _inflate(blob: bytes) -> bytes | None:
    """zlib-decompress the stream at the start of `blob` (padding after it ignored, as zlib does)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(blob, MAX_PAYLOAD_BYTES)
    except zlib.error:
        return None
    if inflater.unconsumed_tail:
        raise ValueError(f"pixel-encoded data inflates beyond {MAX_PAYLOAD_BYTES} bytes")
    return out if inflater.eof else None


def decode_pixel_data(image: Image.Image) -> dict | None:
    """Core: the dict encoded in the image's side blocks; None if the image carries none.

    Raises ValueError when a valid zlib stream is found but its JSON is not an embedding dict.
    """
    blob = pixel_payload(image)
    if blob is None:
        return None
    raw = _inflate(blob)
    return None if raw is None else data_from_json(raw)


def read_embedding_image(path_or_image: str | os.PathLike[str] | Image.Image) -> dict | None:
    """Core: the embedding dict an image carries (text chunk first, then pixels), or None.

    Order as the host's `load_from_file`: the `sd-ti-embedding` chunk wins when present.
    Raises ValueError when embedded data is present but broken, OSError if it can't be opened.
    """
    if isinstance(path_or_image, Image.Image):
        return _read_open_image(path_or_image)
    with open_image(path_or_image) as image:
        image.load()
        return _read_open_image(image)


def _read_open_image(image: Image.Image) -> dict | None:
    data = decode_text_chunk(image)
    return data if data is not None else decode_pixel_data(image)


# --- caption ------------------------------------------------------------------------------------


def _printable(text: str) -> str:
    # PIL's built-in bitmap font only has Latin-1 glyphs.
    return text.encode("latin-1", "replace").decode("latin-1")


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    left, _top, right, _bottom = draw.textbbox((0, 0), text, font=font)
    return right - left


def caption_image(
    image: Image.Image, title: str, footer_left: str = "", footer_mid: str = "", footer_right: str = ""
) -> Image.Image:
    """Core: a plain take on the host's `caption_image_overlay`: title on top, three footers below.

    Drawn with PIL's default font on translucent bands, scaled up (nearest) for large images.
    """
    base = image.convert("RGBA")
    width, height = base.size
    scale = max(1, min(width, height) // 200)
    sw, sh = max(1, width // scale), max(1, height // scale)
    layer = Image.new("RGBA", (sw, sh), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default()
    pad = 3
    _l, top, _r, bottom = draw.textbbox((0, 0), "Ag<>[]", font=font)
    band = bottom - top + 2 * pad
    white = (255, 255, 255, 230)
    if title:
        draw.rectangle((0, 0, sw, band), fill=(0, 0, 0, 140))
        draw.text((pad, pad - top), _printable(title), font=font, fill=white)
    footers = [_printable(t) for t in (footer_left, footer_mid, footer_right)]
    if any(footers):
        y = sh - band
        draw.rectangle((0, y, sw, sh), fill=(0, 0, 0, 140))
        left, mid, right = footers
        draw.text((pad, y + pad - top), left, font=font, fill=white)
        draw.text(((sw - _text_width(draw, mid, font)) // 2, y + pad - top), mid, font=font, fill=white)
        draw.text((sw - pad - _text_width(draw, right, font), y + pad - top), right, font=font, fill=white)
    layer = layer.resize((width, height), Image.NEAREST)
    return Image.alpha_composite(base, layer).convert("RGB")
