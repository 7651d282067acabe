"""Core: how much a file may make sdtrain load — checked before anything is read into memory.

Files sdtrain reads come from users, downloads and HTTP callers. A file that *claims* more than these
bounds is refused with a message naming it, from its header alone: a torch zip's entry sizes, a
.safetensors header's byte ranges, an image's pixel count. (PIL's own guard only warns below twice
its limit; its text-chunk limits, MAX_TEXT_CHUNK and MAX_TEXT_MEMORY, stay as PIL sets them.)
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator

from PIL import Image

from lib_sdtrain.core.errors import FormatError

#: tensor bytes one embedding, hypernetwork or .optim file may hold (the largest SDXL hypernetwork with
#: a 1, 2, 2, 1 structure on every size is ~0.7 GB in float32)
MAX_TENSOR_BYTES = 2 * 1024**3
#: pixels of one image (a training picture, a preprocess source, an embedding carrier): 120 MP, 360 MB as RGB
MAX_IMAGE_PIXELS = 120_000_000
#: a .safetensors header (the format's own limit is 100 MB)
MAX_SAFETENSORS_HEADER = 100 * 1024**2


def _size(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB" if n >= 1024**2 else f"{n} bytes"


def check_torch_file(path: str) -> None:
    """A torch file (zip or legacy pickle) that would unpack to more than MAX_TENSOR_BYTES is refused."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                claimed = sum(info.file_size for info in zf.infolist())
        except (zipfile.BadZipFile, OSError) as exc:
            raise FormatError(path, f"not a readable torch file ({exc})") from None
    else:
        claimed = os.path.getsize(path)
    if claimed > MAX_TENSOR_BYTES:
        raise FormatError(path, f"unpacks to {_size(claimed)}; sdtrain loads at most {_size(MAX_TENSOR_BYTES)} "
                                "from an embedding, hypernetwork or optimizer file")


def check_safetensors(path: str, keys: Iterable[str] | None = None) -> None:
    """The byte ranges a .safetensors header gives `keys` (all tensors when None) must fit the bound
    and the file; checked from the header alone."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_SAFETENSORS_HEADER:
                raise FormatError(path, f"its header claims {_size(length)} (at most {_size(MAX_SAFETENSORS_HEADER)})")
            header = json.loads(f.read(length))
    except FormatError:
        raise
    except Exception as exc:  # short file, bad JSON, bad UTF-8
        raise FormatError(path, f"not a readable .safetensors file ({exc})") from None
    wanted = set(keys) if keys is not None else None
    claimed = 0
    for name, entry in header.items():
        if name == "__metadata__" or (wanted is not None and name not in wanted):
            continue
        try:
            start, end = (int(x) for x in entry["data_offsets"])
        except Exception:
            raise FormatError(path, f"tensor {name!r} has no valid data_offsets in its header") from None
        claimed += max(0, end - start)
    if claimed > MAX_TENSOR_BYTES:
        raise FormatError(path, f"claims {_size(claimed)} of tensors; sdtrain loads at most {_size(MAX_TENSOR_BYTES)}")


@contextlib.contextmanager
def open_image(path: str | os.PathLike[str]) -> Iterator[Image.Image]:
    """`Image.open`, refusing (FormatError naming the file) a picture of more than MAX_IMAGE_PIXELS
    before its pixels are decoded."""
    p = os.fspath(path)
    try:
        with warnings.catch_warnings():  # PIL's warning band: the bound below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
    except Image.DecompressionBombError as exc:
        raise FormatError(p, f"refused: {exc}") from None
    with im:
        width, height = im.size
        if width * height > MAX_IMAGE_PIXELS:
            raise FormatError(p, f"{width}x{height} is {width * height:,} pixels; sdtrain opens at most "
                                 f"{MAX_IMAGE_PIXELS:,} (a decompression bomb?)")
        yield im
