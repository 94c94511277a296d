"""collector/web/openapi.json describes the HTTP port exactly as it answers.

The document is checked structurally (OpenAPI 3.1 as far as is cheap: every $ref resolves, every
operation has responses, every path parameter is declared, every schema is a valid Draft 2020-12
schema). Then live collectors (a TCP device sending readings, commands that get acked, fail and
expire, a kick, config pushes, a stand-in serving a recording, access control, the connection
limits and the error cases) answer requests, and every answer is validated against the response
the document gives for its path, method and status: its JSON against the schema, with the
Draft 2020-12 validator resolving `#/components/...` against the document, its content type and
its required headers. In the end every documented operation must have succeeded, every documented
status must have come up, and every error code of the `ErrorCode` enum must have been seen.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

import trio
import trio_websocket
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from trio_websocket import open_websocket_url

from collector.device.client import open_device
from collector.servers.http import path_route
from collector.tools.playback import Playback
from collector.wire.recording import ReadingsRecord

from .helpers import EPOCH, SECRETS, http, start_collector

DOC_BYTES = (resources.files("collector") / "web" / "openapi.json").read_bytes()
DOC = json.loads(DOC_BYTES)
BASE = "urn:trio-collector:openapi"  # the document as a resource, so refs into it resolve
REGISTRY = Registry().with_resource(
    BASE, Resource.from_contents(DOC, default_specification=DRAFT202012)
)
OPERATIONS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
CODES = set(DOC["components"]["schemas"]["ErrorCode"]["enum"])
#: what any route may answer to a method it does not take (the document's info says so)
OTHER_METHOD = {401: "Unauthorized", 403: "Forbidden"}

ROUTES = {
    "/": {"get"},
    "/static/{file}": {"get"},
    "/static/{dir}/{file}": {"get"},
    "/healthz": {"get"},
    "/metrics": {"get"},
    "/stream": {"get"},
    "/api/openapi.json": {"get"},
    "/api/devices": {"get", "post"},
    "/api/devices/{id}": {"get", "delete"},
    "/api/devices/{id}/commands": {"post"},
    "/api/devices/{id}/kick": {"post"},
    "/api/devices/{id}/rotate": {"post"},
    "/api/commands/{id}": {"get"},
    "/api/config": {"post"},
    "/api/replay": {"get", "post"},
    "/api/outputs": {"get"},
    "/api/alarms": {"get"},
    "/api/alarms/{id}/ack": {"post"},
    "/api/meta": {"get"},
    "/api/history": {"get"},
    "/api/status": {"get"},
}


# -- the document --------------------------------------------------------------------------------


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def lookup(ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: only refs into this document"
    node = DOC
    for part in ref[2:].split("/"):
        node = node[_unescape(part)]
    return node


def follow(node: Any, at: str) -> tuple[Any, str]:
    """The node (through $refs) and its JSON pointer in the document."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        assert node["$ref"] not in seen, f"a $ref cycle at {at}"
        seen.add(node["$ref"])
        at, node = node["$ref"][1:], lookup(node["$ref"])
    return node, at


def refs(node: Any):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


@functools.cache
def _validator(at: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{BASE}#{at}"}, registry=REGISTRY)


def validate(instance: Any, at: str, what: str = "") -> None:
    errors = list(_validator(at).iter_errors(instance))
    assert not errors, f"{what} does not match {at}: " + "; ".join(
        f"at {list(e.absolute_path)}: {e.message[:300]}" for e in errors[:5]
    )


def template_of(path: str) -> str | None:
    segments = path.split("?")[0].split("/")
    found = [
        t
        for t in DOC["paths"]
        if len(ts := t.split("/")) == len(segments)
        and all((a.startswith("{") and b) or a == b for a, b in zip(ts, segments, strict=True))
    ]
    assert len(found) <= 1, f"{path} matches {found}"
    return found[0] if found else None


def test_the_document_is_openapi_3_1():
    assert re.fullmatch(r"3\.1\.\d+", DOC["openapi"])
    assert DOC["info"]["title"] and DOC["info"]["version"]
    assert set(DOC) <= {
        "openapi",
        "info",
        "jsonSchemaDialect",
        "servers",
        "paths",
        "webhooks",
        "components",
        "security",
        "tags",
        "externalDocs",
    }
    all_refs = set(refs(DOC))
    for ref in all_refs:
        try:
            lookup(ref)
        except (KeyError, IndexError, TypeError):
            raise AssertionError(f"{ref} does not resolve") from None
    components = DOC["components"]
    for kind in ("schemas", "responses", "parameters"):  # nothing described and never used
        for name in components[kind]:
            assert f"#/components/{kind}/{name}" in all_refs, f"{kind}/{name} is never used"
    for name, schema in components["schemas"].items():
        Draft202012Validator.check_schema(schema)
        assert schema.get("title", name) == name
    enum = components["schemas"]["ErrorCode"]["enum"]
    assert len(enum) == len(set(enum))
    schemes = components["securitySchemes"]
    for scheme in schemes.values():
        assert scheme["description"]
        assert scheme["type"] != "http" or scheme["scheme"] == "bearer"
        assert scheme["type"] != "apiKey" or scheme["in"] in ("query", "header", "cookie")
    tags = {t["name"] for t in DOC["tags"]}
    op_ids = []
    for template, item in DOC["paths"].items():
        assert template.startswith("/")
        names = set(re.findall(r"\{([^}]+)\}", template))
        ops = {m: op for m, op in item.items() if m in OPERATIONS}
        assert ops and set(item) <= {*OPERATIONS, "parameters", "summary", "description"}
        for method, op in ops.items():
            where = f"{method.upper()} {template}"
            op_ids.append(op["operationId"])
            assert op["summary"] and set(op["tags"]) <= tags, where
            for requirement in op.get("security", DOC["security"]):
                assert set(requirement) <= set(schemes), where
            params = [
                follow(p, "")[0] for p in (*item.get("parameters", ()), *op.get("parameters", ()))
            ]
            for p in params:
                assert p["in"] in ("path", "query", "header", "cookie") and "schema" in p, where
                Draft202012Validator.check_schema(p["schema"])
            in_path = [p for p in params if p["in"] == "path"]
            assert {p["name"] for p in in_path} == names and all(p["required"] for p in in_path)
            if "requestBody" in op:
                for media in follow(op["requestBody"], "")[0]["content"].values():
                    Draft202012Validator.check_schema(media["schema"])
            assert op["responses"], f"{where} has no responses"
            for key, response in op["responses"].items():
                assert re.fullmatch(r"[1-5][0-9][0-9]|[1-5]XX|default", key), where
                response, _ = follow(response, "")
                assert response["description"], f"{where} {key}"
                for media in response.get("content", {}).values():
                    Draft202012Validator.check_schema(media["schema"])
                for header in response.get("headers", {}).values():
                    Draft202012Validator.check_schema(header["schema"])
    assert len(op_ids) == len(set(op_ids))


def test_the_document_lists_exactly_the_routes_the_server_answers():
    assert {t: {m for m in item if m in OPERATIONS} for t, item in DOC["paths"].items()} == ROUTES
    # path_route (the route label in collector_http_requests_total) knows the same API routes
    labels = {t: path_route(re.sub(r"\{[^}]+\}", "x", t)) for t in ROUTES}
    assert {t for t, label in labels.items() if label != "other"} == {
        t for t in ROUTES if t.startswith("/api/") or t == "/metrics"
    }
    assert all(label in ("other", t[1:]) for t, label in labels.items())
    known = next((c for c in path_route.__code__.co_consts if isinstance(c, frozenset)), None)
    if known is not None:  # the set literal in path_route, as CPython compiles it
        assert {"/" + r for r in known} == {t for t, label in labels.items() if label != "other"}


# -- checking answers ----------------------------------------------------------------------------


class Answers:
    """Validates answers against the document, and remembers what it saw."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, int]] = set()  # (template, operation, status)
        self.codes: set[str] = set()

    def check(
        self,
        method: str,
        path: str,
        status: int,
        headers: dict[str, str],
        body: bytes,
        sent: Any = None,
    ) -> Any:
        """Validate one answer; returns its JSON (the body if it is not JSON, None if empty)."""
        where = f"{method} {path} -> {status}"
        headers = {k.lower(): v for k, v in headers.items()}
        template = template_of(path)
        if template is None:  # no route: 404 not_found, or 401 first with tokens configured
            assert status in (401, 404), where
            data = json.loads(body)
            validate(data, "/components/schemas/Error", where)
            self.codes.add(data["error"]["code"])
            return data
        item = DOC["paths"][template]
        op = "get" if method == "HEAD" else method.lower()
        if op in item:
            responses = item[op]["responses"]
            at = pointer("paths", template, op, "responses")
            key = str(status) if str(status) in responses else "default"
            assert key in responses, f"{where}: not documented"
            assert key != "default" or status in (431, 501), f"{where}: not documented"
            response, at = follow(responses[key], at + pointer(key))
        else:  # a method the route does not take
            if status in OTHER_METHOD:
                response, at = follow(
                    {"$ref": f"#/components/responses/{OTHER_METHOD[status]}"}, ""
                )
            else:  # 405 (426 on /stream), as its documented operations say
                ops = [m for m in item if m in OPERATIONS and str(status) in item[m]["responses"]]
                assert ops, f"{where}: not documented"
                key = pointer("paths", template, ops[0], "responses", str(status))
                response, at = follow(item[ops[0]]["responses"][str(status)], key)
        self.seen.add((template, op, status))
        for name, header in response.get("headers", {}).items():
            header, header_at = follow(header, at + pointer("headers", name))
            if header.get("required"):
                assert name.lower() in headers, f"{where}: no {name} header"
            if name.lower() in headers:
                validate(headers[name.lower()], header_at + "/schema", f"{where} {name}")
        content = response.get("content")
        if method == "HEAD" or content is None:
            assert body == b"", f"{where}: a body where the document has none"
            return None
        ctype = headers["content-type"].split(";")[0].strip()
        media = next((m for m in (ctype, ctype.split("/")[0] + "/*", "*/*") if m in content), None)
        assert media is not None, f"{where}: {ctype} is not documented"
        if ctype != "application/json":
            return body
        data = json.loads(body)
        validate(data, at + pointer("content", media, "schema"), where)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            self.codes.add(data["error"]["code"])
        if 200 <= status < 300 and isinstance(sent, dict) and "requestBody" in item.get(op, {}):
            _, request_at = follow(
                item[op]["requestBody"], pointer("paths", template, op, "requestBody")
            )
            validate(sent, request_at + pointer("content", "application/json", "schema"), where)
        return data

    async def call(
        self, collector, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, dict[str, str], Any]:
        status, headers, raw = await http(collector, method, path, body, token)
        return status, headers, self.check(method, path, status, headers, raw, body)

    async def expect(
        self, collector, method: str, path: str, status: int, code: str | None = None, **kw: Any
    ) -> Any:
        got, headers, data = await self.call(collector, method, path, **kw)
        assert got == status, f"{method} {path}: {got} {data!r}, not {status}"
        if code is not None:
            assert data["error"]["code"] == code, f"{method} {path}: {data}"
        return data, headers

    async def raw(self, collector, method: str, path: str, data: bytes) -> tuple[int, Any]:
        """Send bytes as they are (a request h11 would not let a client send); read to EOF."""
        stream = await trio.open_tcp_stream("127.0.0.1", collector.http_address[1])
        got = b""
        async with stream:
            await stream.send_all(data)
            try:
                while chunk := await stream.receive_some(65536):
                    got += chunk
            except trio.BrokenResourceError:
                pass
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
        }
        body = body[: int(headers["content-length"])]
        return status, self.check(method, path, status, headers, body)

    async def websocket_refused(self, collector, token: str | None = None) -> tuple[int, Any]:
        query = f"?token={token}" if token else ""
        try:
            async with open_websocket_url(
                f"ws://127.0.0.1:{collector.http_address[1]}/stream{query}"
            ):
                pass
        except trio_websocket.ConnectionRejected as exc:
            headers = {k.decode(): v.decode() for k, v in exc.headers}
            return exc.status_code, self.check("GET", "/stream", exc.status_code, headers, exc.body)
        raise AssertionError("the handshake was not refused")


async def next_of(ws, kind: str) -> dict[str, Any]:
    for _ in range(200):
        msg = json.loads(await ws.get_message())
        if msg["type"] == kind:
            return msg
    raise AssertionError(f"no {kind}")


async def snapshot_devices(answers: Answers, collector, token: str | None = None) -> list[dict]:
    """Open the stream, subscribe, and validate the snapshot's devices as Device objects."""
    query = f"?token={token}" if token else ""
    async with open_websocket_url(
        f"ws://127.0.0.1:{collector.http_address[1]}/stream{query}"
    ) as ws:
        answers.check("GET", "/stream", 101, {}, b"")
        await ws.send_message(json.dumps({"type": "subscribe", "history": 5}))
        devices: list[dict] = []
        while True:
            part = await next_of(ws, "snapshot")
            devices += part["devices"]
            if part["part"] == part["parts"]:
                break
    for d in devices:
        validate(d, "/components/schemas/Device", f"snapshot device {d['id']}")
        assert "history" in d  # asked for: always there
    return devices


# -- the collectors ------------------------------------------------------------------------------


async def a_live_collector(answers: Answers, monkeypatch, tmp_path) -> None:
    async with trio.open_nursery() as nursery:
        collector, _ = await start_collector(
            nursery, http_port=0, command_queue=1, max_config_rules=1
        )
        expect = functools.partial(answers.expect, collector)

        async def handler(name, args):
            if name == "fail":
                raise RuntimeError("no such valve")
            return {"did": name, **args}

        async with open_device(
            "127.0.0.1",
            "dev-1",
            SECRETS["dev-1"],
            tcp_port=collector.tcp_address[1],
            on_command=handler,
        ) as dev:
            await dev.send_readings({"temperature": 21.5, "count": 3, "door": True, "mode": "eco"})
            await trio.sleep(0.1)

            listing, _ = await expect("GET", "/api/devices", 200)
            by_id = {d["id"]: d for d in listing["devices"]}
            assert list(by_id) == sorted(SECRETS)
            d1, d2 = by_id["dev-1"], by_id["dev-2"]
            assert d1["online"] and d1["transport"] == "tcp" and d1["sessions"] == 1
            assert d1["values"]["mode"][1] == "eco" and d1["values"]["door"][1] is True
            assert (d2["online"], d2["address"], d2["sessions"], d2["values"]) == (
                False,
                None,
                0,
                {},
            )
            assert not any("history" in d for d in listing["devices"])
            await expect("HEAD", "/api/devices", 200)

            detail, _ = await expect("GET", "/api/devices/dev-1?history=5", 200)
            assert detail["history"]["door"][1] == [1.0] and "mode" not in detail["history"]
            assert detail["history"]["count"] == [[detail["values"]["count"][0]], [3.0]]
            assert detail["session_history"] == []
            detail, _ = await expect("GET", "/api/devices/dev-2?history=3", 200)
            assert detail["history"] == {} and detail["session_history"] == []
            for query in ("", "?history=0", "?history=-3"):
                detail, _ = await expect("GET", f"/api/devices/dev-2{query}", 200)
                assert "history" not in detail

            # commands: acked, failed, expired, and refused
            cmd, _ = await expect(
                "POST",
                "/api/devices/dev-1/commands",
                202,
                body={"name": "open", "args": {"valve": 2}, "timeout": 5, "expires_in": 60},
            )
            assert cmd["state"] == "queued" and cmd["transport"] is None
            await collector.commands.get(cmd["id"]).done.wait()
            done, _ = await expect("GET", f"/api/commands/{cmd['id']}", 200)
            assert (done["state"], done["result"], done["transport"], done["attempts"]) == (
                "acked",
                {"did": "open", "valve": 2},
                "tcp",
                1,
            )
            failing, _ = await expect(
                "POST", "/api/devices/dev-1/commands", 202, body={"name": "fail"}
            )
            await collector.commands.get(failing["id"]).done.wait()
            failed, _ = await expect("GET", f"/api/commands/{failing['id']}", 200)
            assert failed["state"] == "failed" and "no such valve" in failed["error"]
            later, _ = await expect(
                "POST",
                "/api/devices/dev-2/commands",
                202,
                body={"name": "later", "args": {}, "expires_in": 1, "timeout": None},
            )
            await expect("POST", "/api/devices/dev-3/commands", 202, body={"name": "a"})
            await expect(
                "POST", "/api/devices/dev-3/commands", 409, "queue_full", body={"name": "b"}
            )
            await expect(
                "POST",
                "/api/devices/dev-4/commands",
                413,
                "too_large",
                body={"name": "x", "args": {"blob": "x" * 3000}},
            )
            for body in ({"args": {}}, {"name": "x", "timeout": -1}, {"name": ""}):
                await expect("POST", "/api/devices/dev-4/commands", 400, "bad_command", body=body)
            for body in (b"{not json", b"[1]", b'{"name": NaN}'):
                await expect("POST", "/api/devices/dev-4/commands", 400, "bad_json", body=body)
            await expect(
                "POST", "/api/devices/nobody/commands", 404, "unknown_device", body={"name": "x"}
            )

            # configuration
            pushed, _ = await expect(
                "POST", "/api/config", 200, body={"match": "dev-*", "config": {"interval": 5}}
            )
            assert pushed == {"match": "dev-*", "sent_to": ["dev-1"], "failed": {}}
            await expect(
                "POST", "/api/config", 409, "too_many_rules", body={"match": "x-*", "config": {}}
            )
            await expect(
                "POST",
                "/api/config",
                413,
                "config_too_large",
                body={"match": "dev-*", "config": {"x": "y" * 2000}},
            )
            await expect("POST", "/api/config", 400, "bad_config", body={"match": 3})
            await expect("POST", "/api/config", 400, "bad_json", body=b"{")
            await expect("POST", "/api/config", 413, "too_large", body=b"x" * 70_000)

            devices = await snapshot_devices(answers, collector)
            assert next(d for d in devices if d["id"] == "dev-1")["history"]["temperature"][1] == [
                21.5
            ]

            kicked, _ = await expect("POST", "/api/devices/dev-1/kick", 200)
            assert kicked == {"device": "dev-1", "kicked": True}
            await dev.ended.wait()

        await trio.sleep(1.5)  # past the queued command's expires_in
        expired, _ = await expect("GET", f"/api/commands/{later['id']}", 200)
        assert (expired["state"], expired["transport"], expired["attempts"]) == ("expired", None, 0)
        await expect("POST", "/api/devices/dev-1/kick", 409, "not_online")
        detail, _ = await expect("GET", "/api/devices/dev-1", 200)
        assert (detail["online"], detail["reason"], detail["transport"]) == (False, "kicked", None)
        assert detail["session_id"] is None and detail["address"] is not None  # kept
        assert [s["reason"] for s in detail["session_history"]] == ["kicked"]
        assert [c["id"] for c in detail["commands"]] == [cmd["id"], failing["id"]]

        # devices added, given a new secret and removed while running
        added, _ = await expect("POST", "/api/devices", 201, body={"id": "new-1"})
        assert added["id"] == "new-1" and collector.devices["new-1"] == added["secret"]
        await expect("POST", "/api/devices", 409, "exists", body={"id": "new-1"})
        for body in ({"id": "no spaces"}, {"id": ""}, {"name": "new-2"}, {"id": 7}):
            await expect("POST", "/api/devices", 400, "bad_device", body=body)
        await expect("POST", "/api/devices", 400, "bad_json", body=b"[]")
        rotated, _ = await expect("POST", "/api/devices/new-1/rotate", 200)
        assert rotated["secret"] not in ("", added["secret"])
        monkeypatch.setattr(collector, "devices_file", tmp_path)  # a folder: cannot be written
        await expect("POST", "/api/devices", 500, "save_failed", body={"id": "new-2"})
        await expect("POST", "/api/devices/new-1/rotate", 500, "save_failed")
        await expect("DELETE", "/api/devices/new-1", 500, "save_failed")
        assert "new-2" not in collector.devices and collector.devices["new-1"] == rotated["secret"]
        monkeypatch.undo()
        removed, _ = await expect("DELETE", "/api/devices/new-1", 200)
        assert removed == {"id": "new-1", "removed": True, "session_ended": False}
        await expect("DELETE", "/api/devices/new-1", 404, "unknown_device")
        await expect("POST", "/api/devices/new-1/rotate", 404, "unknown_device")

        # unknown things
        await expect("GET", "/api/devices/nobody", 404, "unknown_device")
        await expect("POST", "/api/devices/nobody/kick", 404, "unknown_device")
        await expect("GET", "/api/commands/c999999", 404, "unknown_command")
        await expect("GET", "/nowhere", 404, "not_found")
        await expect("GET", "/api/devices/dev-1?history=x", 400, "bad_parameter")

        # methods
        for method, path, allow in [
            ("DELETE", "/api/devices", "GET, HEAD, POST"),
            ("POST", "/api/devices/dev-1", "GET, HEAD, DELETE"),
            ("GET", "/api/devices/dev-1/commands", "POST"),
            ("GET", "/api/devices/dev-1/kick", "POST"),
            ("GET", "/api/devices/dev-1/rotate", "POST"),
            ("PUT", "/api/commands/c000001", "GET, HEAD"),
            ("GET", "/api/config", "POST"),
            ("POST", "/healthz", "GET, HEAD"),
            ("PUT", "/metrics", "GET, HEAD"),
            ("POST", "/", "GET, HEAD"),
            ("POST", "/static/app.js", "GET, HEAD"),
            ("DELETE", "/api/openapi.json", "GET, HEAD"),
            ("POST", "/api/outputs", "GET, HEAD"),
        ]:
            _, headers = await expect(method, path, 405, "method_not_allowed")
            assert headers["allow"] == allow, (method, path)
        for method in ("GET", "POST", "DELETE"):  # not a stand-in: no replay, whatever the method
            await expect(method, "/api/replay", 404, "not_replaying", body={"action": "pause"})

        # the rest of the routes
        for method in ("GET", "HEAD", "POST"):  # no 405 here: whatever the method
            _, headers = await expect(method, "/stream", 426)
            assert headers["upgrade"] == "websocket"
        assert "upgrade_required" in answers.codes
        status, _ = await answers.raw(
            collector,
            "GET",
            "/api/devices",
            b"GET /api/devices HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n",
        )
        assert status == 400 and "bad_upgrade" in answers.codes
        body, headers = await expect("GET", "/metrics", 200)
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert b"collector_http_requests_total" in body
        await expect("HEAD", "/metrics", 200)
        body, headers = await expect("GET", "/", 200)
        assert (
            headers["content-type"] == "text/html; charset=utf-8"
            and headers["cache-control"] == "no-cache"
        )
        await expect("GET", "/static/app.js", 200)
        await expect("GET", "/static/style.css", 200)
        await expect("GET", "/static/vendor/uPlot.min.css", 200)
        await expect("HEAD", "/static/vendor/uPlot.iife.min.js", 200)
        await expect("GET", "/static/nothing.js", 404, "not_found")
        await expect("GET", "/static/vendor/nothing.js", 404, "not_found")
        await expect("GET", "/static/a/b/c.js", 404, "not_found")
        served, headers = await expect("GET", "/api/openapi.json", 200)
        assert served == DOC and headers["cache-control"] == "no-store"
        assert (await http(collector, "GET", "/api/openapi.json"))[2] == DOC_BYTES
        await expect("HEAD", "/api/openapi.json", 200)
        health, _ = await expect("GET", "/healthz", 200)
        assert health["status"] == "ok" and health["devices_known"] == len(SECRETS)
        fields = "&".join(f"f{i}=1" for i in range(40))
        await expect("GET", f"/healthz?{fields}", 400, "bad_request")

        def broken(*args):
            raise RuntimeError("a bug")

        monkeypatch.setattr(collector.hub, "device_summary", broken)
        await expect("GET", "/api/devices", 500, "internal_error")
        monkeypatch.undo()
        nursery.cancel_scope.cancel()


async def a_collector_with_outputs(answers: Answers) -> None:
    """No outputs: an empty list; one whose database does not answer: retrying."""
    from collector.outputs.config import OutputConfig

    async with trio.open_nursery() as nursery:
        collector, _ = await start_collector(nursery, http_port=0)
        expect = functools.partial(answers.expect, collector)
        assert (await expect("GET", "/api/outputs", 200))[0]["outputs"] == []
        await expect("HEAD", "/api/outputs", 200)
        await collector.shutdown()
    down = OutputConfig("db", url="http://127.0.0.1:9", retry_max=1.0, timeout=1.0)
    async with trio.open_nursery() as nursery:
        collector, _ = await start_collector(nursery, http_port=0, outputs=(down,))
        expect = functools.partial(answers.expect, collector)
        async with open_device(
            "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
        ) as dev:
            await dev.send_readings({"temperature": 21.5})
            await trio.sleep(5)
        listing, _ = await expect("GET", "/api/outputs", 200)
        (out,) = listing["outputs"]
        assert (out["state"], out["source"], out["checkpoint"]) == ("retrying", "memory", None)
        assert out["retries"] >= 1 and out["acknowledged"] == 0
        health, _ = await expect("GET", "/healthz", 200)
        assert health["outputs"] == {"db": "retrying"}
        await collector.shutdown()


async def a_collector_with_tokens(answers: Answers) -> None:
    async with trio.open_nursery() as nursery:
        collector, _ = await start_collector(
            nursery, http_port=0, read_tokens=("r-token",), command_tokens=("c-token",)
        )
        expect = functools.partial(answers.expect, collector)
        for path in ("/api/devices", "/api/devices/dev-1", "/metrics", "/stream", "/nowhere"):
            _, headers = await expect("GET", path, 401, "unauthorized")
            assert headers["www-authenticate"] == "Bearer"
        await expect("GET", "/api/commands/c000001", 401, "unauthorized", token="wrong")
        await expect("GET", "/api/replay", 401, "unauthorized")
        await expect("GET", "/api/outputs", 401, "unauthorized")
        await expect("POST", "/api/config", 401, "unauthorized", body={"match": "*", "config": {}})
        await expect("GET", "/api/devices?token=r-token", 200)
        await expect("GET", "/metrics", 200, token="r-token")
        await expect("GET", "/api/devices/dev-1?token=c-token", 200)
        for method, path in [
            ("POST", "/api/devices/dev-1/commands"),
            ("POST", "/api/devices/dev-1/kick"),
            ("POST", "/api/config"),
            ("POST", "/api/devices"),
            ("DELETE", "/api/devices/dev-1"),
            ("POST", "/api/devices/dev-1/rotate"),
            ("DELETE", "/api/devices"),  # a route without DELETE: the token check comes first
            ("POST", "/stream"),
        ]:
            await expect(method, path, 403, "forbidden", token="r-token", body={"name": "x"})
        assert "dev-1" in collector.devices
        await expect("POST", "/api/devices/dev-1/commands?token=c-token", 202, body={"name": "x"})
        await expect("POST", "/stream", 426, "upgrade_required", token="c-token")
        await expect("GET", "/stream", 426, "upgrade_required", token="r-token")
        for path in ("/", "/static/app.js", "/healthz", "/api/openapi.json"):  # always open
            await expect("GET", path, 200)
        status, body = await answers.websocket_refused(collector, "wrong")
        assert status == 401 and body["error"]["code"] == "unauthorized"
        status, _ = await answers.websocket_refused(collector)
        assert status == 401
        devices = await snapshot_devices(answers, collector, token="r-token")
        assert len(devices) == len(SECRETS)
        nursery.cancel_scope.cancel()


async def a_stand_in_collector(answers: Answers) -> None:
    records = [
        ReadingsRecord(EPOCH + i, "rep-1", i, 0, (("t", float(i)), ("on", i % 2 == 0)))
        for i in range(60)
    ]
    playback = Playback(records, speed=1.0)
    async with trio.open_nursery() as nursery:
        stand_in, _ = await start_collector(
            nursery,
            devices=dict.fromkeys(playback.device_ids, ""),
            http_port=0,
            ingest=False,
            wall=playback.now,
        )
        playback.attach(stand_in)
        nursery.start_soon(playback.run, stand_in)
        await trio.sleep(5.5)
        expect = functools.partial(answers.expect, stand_in)
        state, _ = await expect("GET", "/api/replay", 200)
        assert state["mode"] == "replay" and not state["paused"] and state["index"] > 0
        await expect("HEAD", "/api/replay", 200)
        state, _ = await expect("POST", "/api/replay", 200, body={"action": "pause"})
        assert state["paused"]
        state, _ = await expect(
            "POST", "/api/replay", 200, body={"action": "seek", "position": EPOCH + 30}
        )
        assert state["position"] == EPOCH + 30
        await expect("POST", "/api/replay", 200, body={"action": "speed", "speed": 10})
        state, _ = await expect("POST", "/api/replay", 200, body={"action": "resume"})
        assert state["speed"] == 10 and not state["paused"]
        for body in ({"action": "fly"}, {"action": "speed", "speed": -1}, {"action": "seek"}):
            await expect("POST", "/api/replay", 400, "bad_action", body=body)
        await expect("POST", "/api/replay", 400, "bad_json", body=b"[]")
        _, headers = await expect("DELETE", "/api/replay", 405, "method_not_allowed")
        assert headers["allow"] == "GET, HEAD, POST"
        await expect("POST", "/api/devices/rep-1/commands", 409, "replay_mode", body={"name": "x"})
        listing, _ = await expect("GET", "/api/devices", 200)
        (device,) = listing["devices"]
        assert device["sessions"] == 0 and device["values"]["on"][1] in (True, False)
        detail, _ = await expect("GET", "/api/devices/rep-1?history=300", 200)
        assert detail["session_history"] == [] and len(detail["history"]["t"][0]) >= 30
        await expect("POST", "/api/devices/rep-1/kick", 409, "not_online")
        await expect("POST", "/api/devices", 409, "read_only", body={"id": "rep-2"})
        await expect("POST", "/api/devices/rep-1/rotate", 409, "read_only")
        await expect("DELETE", "/api/devices/rep-1", 409, "read_only")
        await snapshot_devices(answers, stand_in)
        nursery.cancel_scope.cancel()


async def a_collector_with_alarms(answers: Answers, tmp_path) -> None:
    """Alarms, metric metadata and history: on a collector without rules, then with a rule,
    units and a recording."""
    from collector.config import MetricMeta
    from collector.core.alarms import parse_rules

    async with trio.open_nursery() as nursery:
        plain, _ = await start_collector(nursery, http_port=0)
        expect = functools.partial(answers.expect, plain)
        listing, _ = await expect("GET", "/api/alarms", 200)
        assert listing["counts"] is None and listing["rules"] == []
        status, _ = await expect("GET", "/api/status", 200)
        assert status["recording"] is None and status["alarms"] is None
        await expect("POST", "/api/alarms/a1/ack", 404, "unknown_alarm")
        await expect("GET", "/api/history?metric=t&source=recording", 409, "not_recording")
        await plain.shutdown()

        collector, _ = await start_collector(
            nursery,
            http_port=0,
            record_dir=str(tmp_path / "alarms-rec"),
            record_flush_interval=0.05,
            stream_history=3,
            alarms=parse_rules({"hot": {"metric": "temp*", "above": 30.0}}),
            metrics_meta=(MetricMeta("temp*", "°C", "air temperature"),),
        )
        expect = functools.partial(answers.expect, collector)
        async with open_device(
            "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
        ) as dev:
            t0 = collector.wall()
            for v in (35.0, 36.0, 20.0, 21.0, 22.0):
                await dev.send_readings({"temperature": v})
                await trio.sleep(0.1)
            await trio.sleep(0.5)
        status, _ = await expect("GET", "/api/status", 200)
        assert status["ingest"]["readings"] == 5 and status["alarms"]["raised_total"] == {"hot": 1}
        assert status["recording"]["records"] >= 1 and status["sessions"]["known"] == len(SECRETS)
        meta, _ = await expect("GET", "/api/meta", 200)
        assert meta["metrics"][0]["unit"] == "°C" and meta["recording"] is True
        listing, _ = await expect("GET", "/api/alarms?recent=1", 200)
        (alarm,) = listing["alarms"]
        assert (alarm["state"], alarm["value"], alarm["last_value"]) == ("cleared", 35.0, 22.0)
        await expect("POST", f"/api/alarms/{alarm['id']}/ack", 400, "bad_ack", body={"by": 5})
        await expect("POST", f"/api/alarms/{alarm['id']}/ack", 400, "bad_json", body=b"[1")
        acked, _ = await expect("POST", f"/api/alarms/{alarm['id']}/ack", 200, body={"by": "x"})
        assert acked["acknowledged_by"] == "x"
        await expect("POST", f"/api/alarms/{alarm['id']}/ack", 404, "unknown_alarm")
        async with open_device(
            "127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=collector.tcp_address[1]
        ) as dev:
            await dev.send_readings({"temperature": 40.0})
            await trio.sleep(0.2)
        (active,) = (await expect("GET", "/api/alarms", 200))[0]["alarms"]
        await expect("POST", f"/api/alarms/{active['id']}/ack", 200)  # no body at all
        await expect("POST", f"/api/alarms/{active['id']}/ack", 409, "already_acknowledged")
        await expect("HEAD", "/api/alarms", 200)
        await expect("GET", "/api/history?metric=t&buckets=0", 400, "bad_history")
        url = f"/api/history?metric=temperature&devices=dev-1&from={t0 - 1}&buckets=10&per_device=1"
        found, _ = await expect("GET", url, 200)
        assert found["source"] == "recording" and sum(found["aggregate"]["count"]) == 5
        assert max(found["series"]["dev-1"]["max"]) == 36.0
        found, _ = await expect("GET", url + "&source=memory", 200)
        assert sum(found["aggregate"]["count"]) == 3
        limiter = collector.http.work_limiter
        holders = [object() for _ in range(int(limiter.total_tokens))]
        for h in holders:
            await limiter.acquire_on_behalf_of(h)
        await expect("GET", url, 503, "busy")
        for h in holders:
            limiter.release_on_behalf_of(h)
        await collector.shutdown()


async def collectors_at_their_limits(answers: Answers) -> None:
    async with trio.open_nursery() as nursery:
        collector, _ = await start_collector(nursery, http_port=0, http_max_per_client=1)
        expect = functools.partial(answers.expect, collector)
        # a connection over the per-client limit: refused before its request is read
        held = await trio.open_tcp_stream("127.0.0.1", collector.http_address[1])
        await trio.sleep(0.1)
        await expect("GET", "/healthz", 503, "too_many_connections")
        await held.aclose()
        await trio.sleep(0.5)
        # a request head that never ends
        status, body = await answers.raw(
            collector, "GET", "/api/devices", b"GET /api/devices HTTP/1.1\r\nHost: x\r\n"
        )
        assert (status, body["error"]["code"]) == (408, "request_timeout")
        await trio.sleep(1.5)  # the timed-out connection lingers for a second
        # what the HTTP parser refuses: a head over 16 KiB, a transfer coding it does not do
        status, _ = await answers.raw(
            collector,
            "GET",
            "/api/devices",
            b"GET /api/devices HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000,  # no end yet
        )
        assert status == 431
        await trio.sleep(1.5)
        status, _ = await answers.raw(
            collector,
            "POST",
            "/api/config",
            b"POST /api/config HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        )
        assert status == 501
        await trio.sleep(1.5)
        status, _ = await answers.raw(
            collector,
            "GET",
            "/api/devices",
            b"GET ftp://x/api/devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert status == 400
        await trio.sleep(0.5)
        # shutting down, as Collector.shutdown() begins it
        collector.commands.stop_accepting()
        await expect(
            "POST", "/api/devices/dev-1/commands", 503, "shutting_down", body={"name": "x"}
        )
        collector.accepting = False
        health, _ = await expect("GET", "/healthz", 503)
        assert health["status"] == "stopping"

        # a full stream
        full, _ = await start_collector(nursery, http_port=0, stream_max_subscribers=1)
        async with open_websocket_url(f"ws://127.0.0.1:{full.http_address[1]}/stream"):
            status, body = await answers.websocket_refused(full)
        assert (status, body["error"]["code"]) == (503, "unavailable")
        nursery.cancel_scope.cancel()


async def test_every_answer_matches_the_document(nursery, autojump_clock, monkeypatch, tmp_path):
    answers = Answers()
    await a_live_collector(answers, monkeypatch, tmp_path)
    await a_collector_with_tokens(answers)
    await a_stand_in_collector(answers)
    await a_collector_with_outputs(answers)
    await a_collector_with_alarms(answers, tmp_path)
    await collectors_at_their_limits(answers)

    documented = {(t, m) for t, item in DOC["paths"].items() for m in item if m in OPERATIONS}
    succeeded = {(t, m) for t, m, s in answers.seen if s < 300}
    assert succeeded == documented, f"never answered: {documented - succeeded}"
    statuses = {
        key
        for item in DOC["paths"].values()
        for m, op in item.items()
        if m in OPERATIONS
        for key in op["responses"]
    }
    assert statuses - {"default"} <= {str(s) for _, _, s in answers.seen}
    assert answers.codes == CODES, f"never seen: {CODES - answers.codes}"
