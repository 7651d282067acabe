"""Core: filesystem helpers — atomic writes, safe file names, paths confined to a folder."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from lib_sdtrain.core.errors import SdtrainError

#: Characters besides `str.isalnum()` ones that A1111's `create_embedding` keeps in a name
#: (modules/textual_inversion/textual_inversion.py, "Remove illegal characters from name").
NAME_EXTRA_CHARS = "._- "


def _temp_sibling(path: Path) -> Path:
    """A fresh, not yet existing file name next to `path` (same folder, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _fsync(path: Path) -> None:
    """Flush a written file to disk where the platform allows it (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Core: yield a temporary path to write; on success it replaces `path` in one step.

    The temporary file sits in the destination folder. If the body raises, the temporary file is
    removed and `path` (old content or absence) is left untouched.
    """
    target = Path(path)
    tmp = _temp_sibling(target)
    # Create it empty first (mode 0o666 minus umask, like a plain open()) so writers that reopen
    # the path keep ordinary permissions rather than mkstemp's 0o600.
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    os.close(fd)
    try:
        yield str(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[str]:
    """Core: remove the temporary files that writes of `path` (and of its sidecars, `path` + suffix)
    left behind when the process was killed mid-write; returns what was removed."""
    import glob

    target = Path(path).resolve()
    removed = []
    for stale in glob.glob(os.path.join(glob.escape(str(target.parent)), f".{glob.escape(target.name)}*.tmp")):
        with contextlib.suppress(OSError):
            os.remove(stale)
            removed.append(stale)
    return removed


def atomic_write(path: str | os.PathLike[str], writer: Callable[[str], None]) -> None:
    """Core: call `writer(temp_path)` then move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Core: write `data` to `path` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, _write)


def safe_name(name: str) -> str:
    """Core: sanitize a user-given embedding name into a file-name stem.

    Keeps what A1111's `create_embedding` keeps (`isalnum()` characters and "._- "), then strips
    surrounding whitespace. Raises SdtrainError when nothing usable is left or the result is a
    relative-directory name ("." or "..").
    """
    cleaned = "".join(c for c in str(name) if c.isalnum() or c in NAME_EXTRA_CHARS).strip()
    if not cleaned:
        raise SdtrainError(f"name {name!r} has no usable characters (letters, digits, '._- ')")
    if cleaned in {".", ".."}:
        raise SdtrainError(f"name {name!r} is not a valid file name")
    return cleaned


def _has_parent_reference(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return any(part == ".." for part in parts)


def resolve_inside(folder: str | os.PathLike[str], name: str | os.PathLike[str]) -> Path:
    """Core: resolve `name` relative to `folder`, refusing anything that would land outside it.

    Refused: empty names, absolute paths (or drive-qualified ones), any `..` component, NUL bytes,
    and paths whose resolved location (following symlinks) leaves `folder`. Returns the resolved
    path, which may not exist yet.
    """
    text = os.fspath(name)
    if not text or "\0" in text:
        raise SdtrainError(f"invalid path {text!r}")
    candidate = Path(text)
    if candidate.is_absolute() or candidate.drive or candidate.root or text.startswith(("/", "\\")):
        raise SdtrainError(f"path {text!r} must be relative to {os.fspath(folder)!r}, not absolute")
    if _has_parent_reference(text):
        raise SdtrainError(f"path {text!r} may not contain '..'")
    base = Path(folder).resolve()
    resolved = (base / candidate).resolve()
    if resolved == base:
        raise SdtrainError(f"path {text!r} names the folder itself, not a file inside it")
    if base not in resolved.parents:
        raise SdtrainError(f"path {text!r} leaves the folder {str(base)!r} (through a link?)")
    return resolved
