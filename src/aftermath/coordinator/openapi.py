"""The coordinator's OpenAPI 3 description (`GET /openapi.json`), built from the app's own router.

Every route the app serves is listed (so the description cannot drift from the routes: a route without an entry
in ROUTES still appears, with a generic description); JSON request bodies and answers carry the JSON schema of
their model in aftermath.round.protocol, the one definition the service and its clients use. The fuzz tests
generate malformed input from this document.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from aftermath.round import protocol

ERROR = {"$ref": "#/components/schemas/Error"}

# (method, path) -> summary, request and answer model names (aftermath.round.protocol), session needed, body kind
ROUTES: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/health"): {"summary": "liveness, phase and step", "answer": "HealthAnswer"},
    ("GET", "/openapi.json"): {"summary": "this description"},
    ("GET", "/run"): {"summary": "the run config (without the token), the model config and its schema hash",
                      "answer": "RunInfo"},
    ("POST", "/join"): {"summary": "join the run with the run token, a tier or spec and an ed25519 public key",
                        "model": "JoinRequest", "answer": "JoinAnswer"},
    ("GET", "/state"): {"summary": "the run's state; with after=V waits up to wait=S s for a newer version",
                        "query": {"after": "integer", "wait": "number"}, "answer": "StateSnapshot"},
    ("GET", "/view"): {"summary": "the calling client's own view (the same size whatever the number of clients); "
                                  "with after=V waits up to wait=S s for a newer view version",
                       "query": {"after": "integer", "wait": "number"}, "answer": "ClientView", "session": True},
    ("GET", "/rounds/{step}"): {"summary": "a round's whole accepted set, with the ranges and keys to verify it",
                                "answer": "RoundDetail", "session": True},
    ("POST", "/witness"): {"summary": "a witness's verdict on a round's published update", "model": "WitnessRequest",
                           "answer": "OkAnswer", "session": True},
    ("GET", "/ws"): {"summary": "WebSocket: the state pushed on every change"},
    ("POST", "/heartbeat"): {"summary": "keep the session alive, with stats", "model": "HeartbeatRequest",
                             "answer": "HeartbeatAnswer", "session": True},
    ("POST", "/ready"): {"summary": "the member holds the current model", "model": "ReadyRequest", "answer": "OkAnswer",
                        "session": True},
    ("PUT", "/blobs/{sha256}"): {"summary": "upload a payload blob (hash checked, size capped)", "session": True,
                                 "binary": True},
    ("GET", "/blobs/{sha256}"): {"summary": "download a payload blob", "session": True},
    ("POST", "/commit"): {"summary": "commit a signed result for the client's assigned batch",
                          "model": "CommitRequest", "answer": "OkAnswer", "session": True},
    ("POST", "/applied"): {"summary": "the member applied the round's accepted set", "model": "AppliedRequest",
                           "answer": "OkAnswer", "session": True},
    ("POST", "/hash"): {"summary": "report the replica hash at an epoch end (answer says whether to resync)",
                        "model": "HashRequest", "answer": "HashAnswer", "session": True},
    ("GET", "/checkpoint"): {"summary": "the current checkpoint: epoch, step, manifest", "answer": "CheckpointAnswer"},
    ("GET", "/checkpoint/files/{path}"): {"summary": "one file of the current checkpoint"},
    ("GET", "/summary"): {"summary": "summary.json once the run has finished", "answer": "RunSummary"},
}


def _path_of(resource: web.AbstractResource) -> str:
    info = resource.get_info()
    if "path" in info:
        return info["path"]
    if "formatter" in info:  # "{path:.+}" -> "{path}"
        return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", info["formatter"])
    if "prefix" in info:  # a static directory
        return info["prefix"].rstrip("/") + "/{filename}"
    return str(resource.canonical)


def route_table(app: web.Application) -> list[tuple[str, str]]:
    """(method, OpenAPI path) of every route the app serves (HEAD, added for each GET, is left out)."""
    seen = []
    for route in app.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        item = (route.method, _path_of(route.resource))
        if item not in seen:
            seen.append(item)
    return seen


def _schema(model_name: str, mode: str = "validation") -> dict[str, Any]:
    model = getattr(protocol, model_name)
    return model.model_json_schema(by_alias=True, mode=mode, ref_template="#/components/schemas/{model}")


def _inline_defs(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """Move a schema's `$defs` (nested models) into the document's components, where its $refs point."""
    components.update(schema.pop("$defs", {}))
    return schema


def openapi_document(app: web.Application, run_id: str = "") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    components: dict[str, Any] = {"Error": {"type": "object", "required": ["error"],
                                            "properties": {"error": {"type": "string"}}}}
    for method, path in route_table(app):
        meta = ROUTES.get((method, path), {"summary": _generic_summary(method, path)})
        op: dict[str, Any] = {"summary": meta["summary"], "responses": {
            "200": {"description": "success"} if "answer" not in meta else {
                "description": "success", "content": {"application/json": {
                    "schema": _inline_defs(_schema(meta["answer"], "serialization"), components)}}},
            "4XX": {"description": "bad input, refused or unknown (JSON error)",
                    "content": {"application/json": {"schema": ERROR}}},
            "429": {"description": "rate limited: retry after the Retry-After header",
                    "content": {"application/json": {"schema": ERROR}}}}}
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"\{(\w+)\}", path)]
        params += [{"name": name, "in": "query", "required": False, "schema": {"type": kind}}
                   for name, kind in meta.get("query", {}).items()]
        if params:
            op["parameters"] = params
        if meta.get("session"):
            op["security"] = [{"session": []}]
        if "model" in meta:
            schema = _inline_defs(_schema(meta["model"]), components)
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        elif meta.get("binary"):
            op["requestBody"] = {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Aftermath coordinator", "version": "1", "description": f"run {run_id}".strip()},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"session": {"type": "http", "scheme": "bearer",
                                            "description": "the session token POST /join returned"}},
        },
    }


def _generic_summary(method: str, path: str) -> str:
    if path.startswith("/data"):
        return "token batches of the run's data (aftermath.data.server)"
    if path.startswith("/api/") or path in ("/", "/dashboard") or path.startswith("/web"):
        return "the dashboard (aftermath.dashboard)"
    return f"{method} {path}"
