"""Core: where a request may make sdtrain write (and which folders it may not name at all).

A job config names two kinds of folders. The *host's* folders (embeddings, hypernetworks, prompt
templates) come from the webui's command line and settings; a request may not name them. The
folders a job *writes into* (the log directory, a preprocess destination) are request fields, and
must lie inside the webui's own folders — its data directory, embeddings and hypernetworks folders —
once every link is followed; a relative path is taken from the data directory. The webui's owner can
lift the rule (Settings → sdtrain); sdtrain's CLI and standalone API have no rule to apply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lib_sdtrain.core.errors import ConfigError


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # another drive
        return False


@dataclass(frozen=True)
class WritePolicy:
    """The folders requests may write in. `roots[0]` is where relative paths start."""

    roots: tuple[str, ...]
    #: what to tell a user whose request was refused (how the owner lifts the rule)
    hint: str = ""

    @staticmethod
    def refuse_host_folders(cls: type, request: dict[str, Any]) -> None:
        """A ConfigError naming the first of the host's folders the request itself sets."""
        for name in getattr(cls, "HOST_FOLDERS", ()):
            if name in request:
                raise ConfigError(name, "is the webui's own folder (its command line sets it), not a request field")

    def confine(self, cls: type, data: dict[str, Any]) -> dict[str, Any]:
        """`data` (a request over the host's defaults) for a `cls` config, with every write folder
        made absolute (a relative one taken from `roots[0]`); a ConfigError naming the field when one
        lies outside the roots once its links are followed."""
        out = dict(data)
        real_roots = [os.path.realpath(r) for r in self.roots]
        for name in getattr(cls, "WRITE_FOLDERS", ()):
            value = out.get(name, _default(cls, name))
            if not isinstance(value, str) or not value.strip():
                continue  # empty: the config's own validation names it
            if "\0" in value:
                raise ConfigError(name, "contains a NUL character")
            path = os.path.join(self.roots[0], os.path.expanduser(value))  # an absolute value stays itself
            real = os.path.realpath(path)  # every link followed, `..` resolved
            if not any(_inside(real, root) for root in real_roots):
                raise ConfigError(name, f"{value!r} is outside the webui's folders ({', '.join(self.roots)})"
                                        + (f"; {self.hint}" if self.hint else ""))
            out[name] = os.path.normpath(path)
        return out


def _default(cls: type, name: str) -> Any:
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default if f.default is not dataclasses.MISSING else None
    return None
