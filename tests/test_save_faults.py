"""A save that fails mid-run — disk full, a read-only folder, a locked file — keeps the file that was
there intact (writes are atomic: temporary file, then rename), leaves no temporary file behind, and
ends the run with an error naming the path and the reason. The faults are injected at the file-system
calls the atomic writer makes (these tests run as root, for whom a chmod'ed folder is still writable)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from test_textual_inversion import make, train_cfg, workspace  # noqa: F401 — the fixture

from lib_sdtrain.core.errors import SdtrainError
from lib_sdtrain.core.formats import fsutil
from lib_sdtrain.core.formats.embedding_io import load_embedding
from lib_sdtrain.core.tasks.textual_inversion import train_embedding
from lib_sdtrain.hosts.standalone.host import StandaloneHost

FAULTS = {
    "disk full": ("replace", OSError(errno.ENOSPC, "No space left on device")),
    "read-only folder": ("open", OSError(errno.EROFS, "Read-only file system")),
    "locked file": ("replace", PermissionError(errno.EACCES, "Permission denied")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failing_save_keeps_the_previous_file_and_names_the_path(tiny_sd1, workspace, monkeypatch, fault):  # noqa: F811
    host = StandaloneHost(tiny_sd1)
    make(host, workspace)
    target = os.path.join(workspace["emb"], "tester.pt")
    before = Path(target).read_bytes()
    call, error = FAULTS[fault]
    real = {"replace": os.replace, "open": os.open}[call]

    def failing(path, *args, **kwargs):  # only writes into the embeddings folder fail
        if os.path.dirname(os.path.abspath(os.fspath(path))) == os.path.abspath(workspace["emb"]):
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fsutil.os, call, failing)
    with pytest.raises(SdtrainError) as e:
        train_embedding(host, train_cfg(workspace, steps=3))
    message = str(e.value)
    assert target in message and error.strerror in message and "unchanged" in message, message
    monkeypatch.undo()
    assert Path(target).read_bytes() == before
    assert load_embedding(target).step in (None, 0)
    assert sorted(os.listdir(workspace["emb"])) == ["tester.pt"]  # no temporary file left
