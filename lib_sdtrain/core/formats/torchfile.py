"""Core: torch pickle files — read only through weights_only, written so A1111's safe-check accepts them."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import zipfile
from typing import Any

import torch

from lib_sdtrain.core.errors import FormatError, SdtrainError
from lib_sdtrain.core.formats.fsutil import atomic_write_bytes
from lib_sdtrain.core.formats.limits import check_torch_file

#: The zip entry names every A1111 release's modules/safe.py (`check_zip_filenames`) lets through;
#: any other entry makes the stock webui refuse the file unless started with --disable-safe-unpickle.
#: v1.0.0-pre … v1.9.4 (and Forge Classic) allow only these three; v1.10.0 added `byteorder` and
#: `.data/serialization_id`, which we therefore never write (docs/files.md, "Which webui releases
#: load these files"; tests/test_release_loaders.py).
HOST_SAFE_ZIP_NAME = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")

#: Entries newer torch.save writes that some release's check rejects. torch.load copes without them:
#: no `.format_version` → storages are read record by record; no `.storage_alignment` → 64; no
#: `.data/serialization_id` → only its usage log lacks the id; no `byteorder` → read as little-endian
#: (torch from before that record reads native order: little on every machine the webuis run on).
_DROPPABLE_ENTRIES = (".format_version", ".storage_alignment", "serialization_id")
#: `byteorder` is dropped only when it says little-endian (what a reader assumes without it): a
#: big-endian machine keeps it, so the file stays correct (then only v1.10+ accept it).
_BYTEORDER = "byteorder"

#: Pickle globals that make up plain tensors and dicts (reported as harmless when torch refuses).
_PLAIN_GLOBAL = re.compile(
    r"^(collections\.OrderedDict|torch\._utils\._rebuild_(tensor_v2|parameter)"
    r"|torch\.\w*Storage|torch\.(u?int\d+|float\d*|bfloat16|half|double|long|int|bool))$"
)
_STRING_OPS = {
    "UNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}


def to_cpu(obj: Any) -> Any:
    """Core: a copy of nested dicts/lists/tuples with every tensor detached and moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def host_safe_zip(raw: bytes) -> bytes:
    """Core: rewrite a torch.save zip keeping only the entries every A1111 release's safe-check allows.

    Entries are copied in order, uncompressed (torch never compresses). An entry that is neither
    allowed nor a known-droppable one raises SdtrainError rather than writing a file the host
    would refuse or torch could no longer read.
    """
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            leaf = info.filename.rsplit("/", 1)[-1]
            keep_byteorder = leaf == _BYTEORDER and src.read(info) != b"little"
            if HOST_SAFE_ZIP_NAME.match(info.filename) or keep_byteorder:
                entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                dst.writestr(entry, src.read(info), compress_type=zipfile.ZIP_STORED)
            elif leaf not in _DROPPABLE_ENTRIES and leaf != _BYTEORDER:
                raise SdtrainError(
                    f"torch {torch.__version__} wrote an unexpected entry {info.filename!r}; "
                    "refusing to write a file A1111's safe-check would reject"
                )
    return out.getvalue()


#: torch's own loader. Inside A1111, `torch.load` is the webui's wrapper (modules/safe.py), which
#: runs its own pickle check on the stream first and leaves a file object at its end; our safety is
#: `weights_only=True`, so we call torch's loader directly.
_torch_load = torch.serialization.load


def torch_bytes(obj: Any) -> bytes:
    """Core: `torch.save(obj)` as bytes, filtered by `host_safe_zip` and checked to load back."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = host_safe_zip(buf.getvalue())
    try:
        _torch_load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a future torch needing the dropped entries must fail loudly here
        raise SdtrainError(
            f"torch {torch.__version__} cannot read its own filtered file back: {exc}"
        ) from exc
    return data


def save_torch_file(obj: Any, path: str | os.PathLike[str]) -> None:
    """Core: write `obj` like torch.save, host-safe-check compatible, atomically."""
    atomic_write_bytes(path, torch_bytes(obj))


def _weights_only_load(path: str) -> Any:
    # The host's RestrictedUnpickler allows ParameterDict (old torch 1.11 embeddings); allowlist
    # it too where this torch has the context manager (2.5+). Its __setstate__ only fills __dict__.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        return _torch_load(path, map_location="cpu", weights_only=True)
    with safe_globals([torch.nn.ParameterDict]):
        return _torch_load(path, map_location="cpu", weights_only=True)


def load_torch_file(path: str | os.PathLike[str]) -> Any:
    """Core: `torch.load(path, map_location="cpu", weights_only=True)`, never a full unpickle.

    Raises FormatError naming the file: "refused: ..." when the pickle holds anything but plain
    tensors/containers (nothing in it is executed), otherwise why it could not be read.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FormatError(p, "no such file")
    check_torch_file(p)  # nothing is unpacked beyond the stated bound
    try:
        return _weights_only_load(p)
    except pickle.UnpicklingError as exc:
        raise FormatError(p, _refusal_reason(p, exc)) from None
    except Exception as exc:
        raise FormatError(p, f"not a readable torch file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _refusal_reason(path: str, exc: BaseException) -> str:
    found = pickle_globals(path)
    if found is None:
        return "not a torch file (its pickle data is unreadable: corrupt or another format)"
    unusual = [g for g in found if not _PLAIN_GLOBAL.match(g)]
    detail = f" ({', '.join(unusual[:5])})" if unusual else f" (torch: {_torch_reason(exc)})"
    return (
        "refused: the file contains pickled code/objects that are not plain tensors"
        f"{detail}; sdtrain reads .pt/.bin only with torch.load(weights_only=True) and runs "
        "nothing from them. If you trust its source, convert it to .safetensors there."
    )


def _torch_reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Trying to load unsupported GLOBAL") or "Unsupported global" in line:
            return line[:200]
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1][:200]
    return lines[0][:200] if lines else type(exc).__name__


def pickle_globals(path: str | os.PathLike[str]) -> list[str] | None:
    """Core: the globals a torch file's pickle(s) reference, read statically (nothing is run).

    Handles the zip format (every `*/data.pkl`) and the legacy one (consecutive pickles).
    Returns None when the data is not parseable pickle at all.
    """
    p = os.fspath(path)
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                streams = [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
        else:
            with open(p, "rb") as f:
                streams = [f.read()]
        names: list[str] = []
        for blob in streams:
            names += _scan_pickles(blob)
    except Exception:  # diagnostics only: anything unparseable is "not pickle"
        return None
    return names if streams else None


def _scan_pickles(blob: bytes) -> list[str]:
    """Globals in the consecutive pickles at the start of `blob` (pickletools only parses).

    Raises ValueError if not even the first pickle parses; stops quietly at later non-pickle
    data (the legacy format's raw storage bytes follow its pickles).
    """
    stream = io.BytesIO(blob)
    names: list[str] = []
    complete = 0
    while stream.tell() < len(blob):
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in _STRING_OPS:
                    strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
        except (ValueError, EOFError):
            if not complete:
                raise
            break
        complete += 1
    return list(dict.fromkeys(names))
