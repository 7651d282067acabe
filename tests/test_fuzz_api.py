"""Schema-driven fuzzing of sdtrain's HTTP routes (schemathesis, in process, fixed seed, bounded).

The app's own OpenAPI document drives the cases: request bodies of every shape (wrong JSON types,
huge numbers, unicode and control characters, empty bodies), unknown job ids. Every answer must be a
documented status with a documented body and never a server error, and no file may appear outside
the test's folders (the requests run under the webui's write rule: core.options.places)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in tools/requirements-dev.txt")
from fastapi import FastAPI  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from lib_sdtrain.api.routes import ApiOptions, mount  # noqa: E402
from lib_sdtrain.core.jobs.service import JobService  # noqa: E402
from lib_sdtrain.core.options.places import WritePolicy  # noqa: E402
from lib_sdtrain.core.tasks.registry import job_runners  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class _NoModel:
    """A host with no model loaded: every job that reaches it fails at once (the fuzz is about the
    HTTP layer; the create/train routes still run their jobs to an answer)."""

    def __getattr__(self, name):
        from lib_sdtrain.core.errors import SdtrainError

        raise SdtrainError("no model (fuzz test)")


def _app(root: Path) -> tuple[FastAPI, JobService]:
    data, emb, hn = root / "data", root / "embeddings", root / "hypernetworks"
    for d in (data, emb, hn):
        d.mkdir(parents=True, exist_ok=True)
    service = JobService(lambda: _NoModel(), job_runners())

    def defaults(kind):
        return ({"hypernetwork_dir": str(hn)} if "hypernetwork" in kind else {"embeddings_dir": str(emb)})

    app = FastAPI()
    mount(app, service, ApiOptions(defaults=defaults, write_policy=lambda: WritePolicy((str(data), str(emb), str(hn))),
                                   refresh=lambda: {"embeddings": [], "hypernetworks": []}))
    return app, service


def _tree(*folders: Path) -> set[str]:
    out = set()
    for folder in folders:
        for base, _dirs, files in os.walk(folder):
            if any(part in base for part in (".git", "__pycache__", ".pytest_cache", ".hypothesis")):  # tools' caches
                continue
            out.update(os.path.join(base, f) for f in files)
    return out


# the webui's folders sit inside a private folder, so anything written beside them shows (the shared
# /tmp is busy with other processes' files)
_root = Path(tempfile.mkdtemp(prefix="sdtrain-fuzz-")) / "webui"
APP, SERVICE = _app(_root)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
CASES: list[int] = []


@pytest.fixture(scope="module", autouse=True)
def _outside_untouched():
    watched = (REPO, _root.parent)
    before = _tree(REPO)
    parent_before = set(os.listdir(_root.parent))
    yield
    SERVICE.shutdown()
    counts = {code: CASES.count(code) for code in sorted(set(CASES))}
    print(f"\nsdtrain fuzz: {len(CASES)} cases, answers by status: {counts}")
    assert _tree(REPO) - before == set(), "files appeared in the repository"
    assert set(os.listdir(_root.parent)) - parent_before == set(), f"entries appeared beside {_root} in {watched[1]}"


@SCHEMA.parametrize()
@settings(max_examples=25, derandomize=True, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_every_route_answers_as_documented(case):
    response = case.call()
    CASES.append(response.status_code)
    # no 5xx; a documented status, content type and body. (Not "schema-valid data is accepted": a
    # request can be well-formed and still name a dataset folder that does not exist.)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                             content_type_conformance, response_schema_conformance])
