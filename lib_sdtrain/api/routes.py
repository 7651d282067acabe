"""API: HTTP routes over the job service — the host's /sdapi training routes and sdtrain's job routes.

Request bodies are validated by the core config dataclasses (not pydantic), so the same rules and
messages apply to the UI, the CLI and HTTP, and the code runs on pydantic 1 (A1111) and 2 (Forge).
Schemas for /docs are generated from the same dataclasses.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from lib_sdtrain import version
from lib_sdtrain.core.errors import ConfigError, SdtrainError
from lib_sdtrain.core.jobs.service import DONE, FINISHED_STATES, RESUMABLE_STATES, Job, JobService
from lib_sdtrain.core.options.config import ConfigBase
from lib_sdtrain.core.options.places import WritePolicy
from lib_sdtrain.core.tasks.registry import HOST_ONLY_FIELDS, job_config_types, job_request, json_object

_JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array"}


def config_schema(cls: type[ConfigBase], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """JSON schema of a job config: every field optional, with its default and label (`exclude`:
    fields a request may not set here)."""
    props = {}
    for f in cls.describe():
        if f["name"] in exclude:
            continue
        prop: dict[str, Any] = {"title": f["label"], "type": _JSON_TYPES.get(f["type"], "string")}
        if f["type"] == "str":
            prop["type"] = ["string", "number"] if f["name"] in ("learn_rate", "clip_grad_value") else "string"
        if f["default"] is not None and not callable(f["default"]):
            prop["default"] = f["default"]
        if f.get("help"):
            prop["description"] = f["help"]
        if f.get("choices"):
            prop["enum"] = list(f["choices"])
        props[f["name"]] = prop
    return {"title": cls.__name__, "type": "object", "properties": props, "additionalProperties": False}


def _body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}


_FIELD_ERROR = {"type": "object", "required": ["detail"], "properties": {"detail": {
    "type": "array", "items": {"type": "object", "required": ["loc", "msg", "type"], "properties": {
        "loc": {"type": "array", "items": {"type": "string"}}, "msg": {"type": "string"},
        "type": {"type": "string"}}}}}}
_MESSAGE = {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}
_INFO = {"type": "object", "required": ["info"], "properties": {"info": {"type": "string"}}}


def _answers(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error answers a route gives: 422 names the bad field (the shape
    FastAPI's own validation uses), 404 an unknown job, 401 a missing or wrong --api-auth login."""
    doc = {422: ("a field (or the body) is invalid: `loc` names it", _FIELD_ERROR),
           404: ("no such job", _MESSAGE), 409: ("the job has already finished", _MESSAGE), 401: ("not logged in (the webui's --api-auth)", _MESSAGE)}
    return {code: {"description": doc[code][0], "content": {"application/json": {"schema": doc[code][1]}}}
            for code in codes}


def config_error_response(e: ConfigError) -> JSONResponse:
    """422 in FastAPI's own validation-error shape, naming the field."""
    return JSONResponse(status_code=422, content={"detail": [
        {"loc": ["body", e.field], "msg": e.message, "type": "value_error"}]})


async def _json_body(request: Request) -> dict[str, Any]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise ConfigError("body", f"must be sent as application/json, not {kind}")
    return json_object(await request.body())


def basic_auth(credentials: dict[str, str]) -> Callable[..., bool]:
    """The host's --api-auth check (HTTP Basic against user:password pairs)."""

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:  # noqa: B008 — FastAPI idiom
        expected = credentials.get(given.username)
        if expected is not None and secrets.compare_digest(given.password, expected):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return check


@dataclass
class ApiOptions:
    #: host folder/setting values merged under each request (e.g. embeddings_dir), per job kind
    defaults: Callable[[str], dict[str, Any]] = lambda kind: {}
    #: HTTP Basic users, as the host's --api-auth; None = open
    credentials: dict[str, str] | None = None
    #: serve the host's /sdapi/v1/{create,train}/embedding routes
    host_routes: bool = True
    #: where requests may write (None: anywhere, as sdtrain's own CLI/standalone API); read per request
    write_policy: Callable[[], WritePolicy | None] = lambda: None
    #: reload the host's embedding and hypernetwork lists from disk (every list the host keeps);
    #: returns what is listed now. None: no /sdtrain/v1/refresh route
    refresh: Callable[[], dict[str, list[str]]] | None = None
    #: what the host offers sdtrain (its start-up probe: which features work here, and why not); None:
    #: no /sdtrain/v1/host route
    host_report: Callable[[], dict[str, Any]] | None = None


def replace_routes(app: FastAPI, routes: list[tuple[str, str]]) -> int:
    """Drop the app's existing routes for these (path, method) pairs. Starlette tries routes in
    registration order and the first full match wins, so a later route with the same path and
    method would never be reached."""
    wanted = {(p, m.upper()) for p, m in routes}
    keep, dropped = [], 0
    for r in app.router.routes:
        methods = getattr(r, "methods", None) or set()
        if any((getattr(r, "path", None), m) in wanted for m in methods):
            dropped += 1
            continue
        keep.append(r)
    app.router.routes[:] = keep
    return dropped


#: The host's training routes sdtrain serves: /sdapi/v1/create/embedding, ... (kind "create_embedding" ...).
HOST_ROUTES = ("create_embedding", "train_embedding", "create_hypernetwork", "train_hypernetwork")


def _host_route(service: JobService, options: ApiOptions, kind: str):
    """A blocking handler with the host's request fields and response text (modules/api/api.py).
    Unlike the host, every field is optional, create/hypernetwork returns the file name, and
    train/hypernetwork says "hypernetwork"."""
    verb, _, noun = kind.partition("_")

    async def endpoint(request: Request):
        cfg = _config(kind, await _json_body(request), options)
        job = await _run_blocking(service, kind, cfg)
        if verb == "create":
            if job.state != DONE:
                return {"info": f"create {noun} error: {job.error}"}
            return {"info": f"create {noun} filename: {job.result}"}
        if kind == "preprocess":  # the route of A1111 <= 1.6 (modules/api/api.py, preprocess)
            return {"info": "preprocess complete" if job.state == DONE else f"preprocess error: {job.error}"}
        filename = getattr(job.result, "file", "") if job.result is not None else ""
        return {"info": f"train {noun} complete: filename: {filename} error: {job.error}"}

    endpoint.__name__ = kind
    endpoint.__doc__ = (
        "Prepare a training set: the request fields of A1111 <= 1.6's /sdapi/v1/preprocess (blocks until done)."
        if kind == "preprocess" else
        f"{verb.capitalize()} a {noun} with the host's request fields (all optional; host UI defaults).")
    return endpoint


def _config(kind: str, body: dict[str, Any], options: ApiOptions) -> ConfigBase:
    cls = job_config_types()[kind]
    body = {k: v for k, v in body.items() if k not in HOST_ONLY_FIELDS}
    policy = options.write_policy()
    if policy is None:
        return cls.from_dict(cls.merge_defaults(options.defaults(kind), body))
    policy.refuse_host_folders(cls, body)
    return cls.from_dict(policy.confine(cls, cls.merge_defaults(options.defaults(kind), body)))


def make_router(service: JobService, options: ApiOptions | None = None) -> APIRouter:
    options = options or ApiOptions()
    deps = [Depends(basic_auth(options.credentials))] if options.credentials else []
    auth = (401,) if options.credentials else ()
    router = APIRouter(dependencies=deps)
    types = job_config_types()
    confined = options.write_policy() is not None

    def request_schema(kind: str) -> dict[str, Any]:  # the host's folders are no request fields where confined
        return config_schema(types[kind], types[kind].HOST_FOLDERS if confined else ())

    def handle(fn):
        async def endpoint(request: Request):
            try:
                return await fn(request)
            except ConfigError as e:
                return config_error_response(e)

        endpoint.__name__ = fn.__name__
        endpoint.__doc__ = fn.__doc__
        return endpoint

    if options.host_routes:
        for kind in (*HOST_ROUTES, "preprocess"):
            router.add_api_route(f"/sdapi/v1/{kind.replace('_', '/', 1)}", handle(_host_route(service, options, kind)),
                                 methods=["POST"], openapi_extra=_body_doc(request_schema(kind)),
                                 responses={200: {"description": "the host's answer", "content": {
                                     "application/json": {"schema": _INFO}}}, **_answers(422, *auth)})

    async def submit_job(request: Request):
        """Queue a job: {"kind": one of the job kinds, "config": {...}}. Answers 202 with the job id at once."""
        kind, config = job_request(await _json_body(request))  # the CLI's `run job.json` checks the same
        job = service.submit(kind, _config(kind, config, options))
        return JSONResponse(status_code=202, content={"id": job.id, "state": job.state})

    def list_jobs():
        """Every job of this session, oldest first, without loss history."""
        return [j.to_dict(history=False) for j in service.list()]

    def get_job(job_id: str):
        """One job: state, step, loss history, validation losses, previews, files, error."""
        return _job_or_404(service, job_id).to_dict()

    def stop_job(job_id: str):
        """Ask a job to stop: a running one saves and ends within one step; a queued one never starts.
        A job that has already finished answers 409."""
        job = _job_or_404(service, job_id)
        if job.state in FINISHED_STATES:
            raise HTTPException(status_code=409, detail=f"job {job_id} has already finished ({job.state})")
        return service.stop(job_id).to_dict(history=False)

    def resume_job(job_id: str):
        """Submit a stopped, failed or interrupted job (one the webui's end cut short) again with its
        settings: a training continues from its resume point. 202 with the new job's id."""
        job = _job_or_404(service, job_id)
        if job.state not in RESUMABLE_STATES:
            raise HTTPException(status_code=409, detail=f"job {job_id} is {job.state}; only a stopped, failed "
                                                        "or interrupted job is resumed")
        new = service.resume(job_id)
        return JSONResponse(status_code=202, content={"id": new.id, "state": new.state})

    def schema():
        """JSON schemas of every job kind's config, and sdtrain's version (`version`)."""
        return {"version": version(), **{kind: config_schema(cls) for kind, cls in types.items()}}

    job_schema = {"type": "object", "required": ["kind"], "properties": {
        "kind": {"type": "string", "enum": sorted(types)}, "config": {"type": "object"}}}
    router.add_api_route("/sdtrain/v1/jobs", handle(submit_job), methods=["POST"], status_code=202,
                         openapi_extra=_body_doc(job_schema), responses=_answers(422, *auth))
    router.add_api_route("/sdtrain/v1/jobs", list_jobs, methods=["GET"], responses=_answers(*auth))
    router.add_api_route("/sdtrain/v1/jobs/{job_id}", get_job, methods=["GET"], responses=_answers(404, *auth))
    router.add_api_route("/sdtrain/v1/jobs/{job_id}/stop", stop_job, methods=["POST"],
                         responses=_answers(404, 409, *auth))
    router.add_api_route("/sdtrain/v1/jobs/{job_id}/resume", resume_job, methods=["POST"], status_code=202,
                         responses=_answers(404, 409, *auth))
    router.add_api_route("/sdtrain/v1/schema", schema, methods=["GET"], responses=_answers(*auth))
    if options.refresh is not None:
        refresh = options.refresh

        def refresh_lists():
            """Reload the webui's embeddings and hypernetworks from their folders — every list the host
            keeps (Forge: its text engines' too, which its own refresh leaves stale) — and answer the names."""
            return refresh()

        router.add_api_route("/sdtrain/v1/refresh", refresh_lists, methods=["POST"], responses=_answers(*auth))
    if options.host_report is not None:
        host_report = options.host_report

        def host():
            """What this webui offers sdtrain, as probed at start-up: its model stack, folders, which
            features are available here and, for each one that is not, why."""
            return host_report()

        router.add_api_route("/sdtrain/v1/host", host, methods=["GET"], responses=_answers(*auth))
    return router


def _job_or_404(service: JobService, job_id: str) -> Job:
    job = service.get(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    return job


async def _run_blocking(service: JobService, kind: str, cfg: ConfigBase) -> Job:
    """Submit and wait without holding the event loop (the host's routes are sync and block a
    threadpool worker; ours await in one)."""
    import anyio

    job = service.submit(kind, cfg)
    while not job.wait(0):
        await anyio.to_thread.run_sync(job.wait, 1.0)
    assert job.state in FINISHED_STATES
    return job


def mount(app: FastAPI, service: JobService, options: ApiOptions | None = None) -> None:
    """Add sdtrain's routes to a running app, replacing the host's training routes where it has them."""
    options = options or ApiOptions()
    if options.host_routes:
        replace_routes(app, [(f"/sdapi/v1/{kind.replace('_', '/', 1)}", "POST") for kind in HOST_ROUTES])
    app.include_router(make_router(service, options))


__all__ = ["HOST_ONLY_FIELDS", "ApiOptions", "SdtrainError", "config_schema", "make_router", "mount", "replace_routes"]
