"""The HTTP contract of shared/API.md, driven through `create_app(config)` in-process.

Every route under every auth scheme, every error status with the contract's error body,
long polls (wake-up and time-out), submit_blocking end to end, scheduling over HTTP
(tiers, capacity, restartable tasks) and the static console's path checks.
"""
import asyncio
import base64
import dataclasses
import json
import os
import time
from urllib.parse import quote

import jwt
import pytest

from offloadmq import Config, Hub, create_app

AGENT_KEY, CLIENT_KEY, MGMT = "ak-test", "ck-test", "mt-test"
SECRET = "jwt-secret-for-tests-" + "0123456789abcdef" * 4  # 64+ bytes, so HS512 forging is quiet
CLIENT = {"X-API-Key": CLIENT_KEY}
MGMT_H = {"X-Mgmt-Token": MGMT}
ERROR_TYPES = {400: "bad_request", 401: "authentication_error", 403: "authorization_error",
               404: "not_found", 409: "conflict", 413: "payload_too_large",
               503: "scheduling_impossible", 504: "timeout"}


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture
def config(tmp_path):
    return Config(data_path=tmp_path / "data", jwt_secret=SECRET, agent_api_keys=(AGENT_KEY,),
                  client_api_keys=(CLIENT_KEY,), mgmt_token=MGMT, fsync="no")


@pytest.fixture
def make_client(aiohttp_client, config):
    """A test client for a config variant (`max_body_bytes=…`) and an optional fake clock."""
    async def factory(clock=None, **changes):
        cfg = dataclasses.replace(config, **changes)
        hub = Hub(cfg, clock) if clock else None
        return await aiohttp_client(create_app(cfg, hub))
    return factory


@pytest.fixture
async def cli(make_client):
    return await make_client()


async def call(cli, method, path, status=200, **kw):
    """Send a request, check its status, return the parsed JSON body."""
    resp = await cli.request(method, path, **kw)
    text = await resp.text()
    assert resp.status == status, f"{method} {path}: {resp.status} {text}"
    return json.loads(text) if text else None


async def fails(cli, method, path, status, **kw):
    """Send a request that must fail with the contract's error body; return that body."""
    body = await call(cli, method, path, status, **kw)
    assert set(body["error"]) == {"type", "message", "status"}, body
    assert body["error"]["type"] == ERROR_TYPES[status], body
    assert body["error"]["status"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


class AgentHandle:
    def __init__(self, uid, key, token):
        self.uid, self.key, self.token = uid, key, token
        self.h = {"Authorization": f"Bearer {token}"}


async def agent(cli, caps=("echo",), tier=0, capacity=1, **extra):
    reg = await call(cli, "POST", "/agent/register", json={
        "capabilities": list(caps), "tier": tier, "capacity": capacity,
        "systemInfo": {"os": "linux", "client": "test", "runtime": "py", "cpuArch": "x86_64",
                       "totalMemoryMb": 1024, "gpu": None},
        "apiKey": AGENT_KEY, **extra})
    auth = await call(cli, "POST", "/agent/auth", json={"agentId": reg["agentId"], "key": reg["key"]})
    return AgentHandle(reg["agentId"], reg["key"], auth["token"])


async def submit(cli, cap="echo", status=201, headers=CLIENT, **fields):
    body = await call(cli, "POST", "/api/task/submit", status, headers=headers,
                      json={"capability": cap, **fields})
    return body["id"]


def tp(tid):
    """The `{cap}/{id}` path tail of a task, its capability percent-encoded."""
    return f"{quote(tid['cap'], safe='')}/{tid['id']}"


async def poll(cli, ag, wait=0, urgent=False):
    route = "poll_urgent" if urgent else "poll"
    return await call(cli, "GET", f"/private/agent/task/{route}?wait={wait}", headers=ag.h)


async def take(cli, ag, tid, status=200):
    return await call(cli, "POST", f"/private/agent/take/{tp(tid)}", status, headers=ag.h)


async def progress(cli, ag, tid, status=200, **fields):
    return await call(cli, "POST", f"/private/agent/task/progress/{tp(tid)}", status, headers=ag.h,
                      json={"id": tid["id"], **fields})


async def resolve(cli, ag, tid, outcome=None, output=None, status=200):
    outcome = outcome if outcome is not None else {"success": 1.5}
    return await call(cli, "POST", f"/private/agent/task/resolve/{tp(tid)}", status, headers=ag.h,
                      json={"id": tid["id"], "capability": tid["cap"], "status": outcome,
                            "output": output})


async def client_poll(cli, tid, headers=CLIENT, query=""):
    return await call(cli, "GET", f"/api/task/poll/{tp(tid)}{query}", headers=headers)


async def run_task(cli, ag, tid, output="done"):
    """Poll, take, progress and resolve one task as an agent would."""
    got = await poll(cli, ag)
    assert got["id"] == tid
    await take(cli, ag, tid)
    await progress(cli, ag, tid, stage="working", logUpdate="line\n")
    await resolve(cli, ag, tid, output=output)


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# ---------------------------------------------------------------- open routes

async def test_health_and_api_ping_share_the_health_shape(cli):
    for path in ("/health", "/api/ping"):
        body = await call(cli, "GET", path)
        assert set(body) >= {"status", "cached_agents", "cached_tokens", "timestamp"}
        assert body["status"] == "healthy"
        assert body["timestamp"].endswith("Z") and len(body["timestamp"]) == 24
    ag = await agent(cli)
    body = await call(cli, "GET", "/private/agent/ping", headers=ag.h)
    assert body["cached_agents"] == 1 and body["cached_tokens"] == 1


async def test_stats_counts_agents_and_tasks_by_queue_and_status(cli):
    await agent(cli)
    await submit(cli)
    await submit(cli, urgent=True, status=202)
    stats = await call(cli, "GET", "/stats")
    assert stats["agents"] == {"all": 1, "online": 1}
    assert stats["tasks"] == {"urgent": {"pending": 1}, "regular": {"pending": 1}}
    assert stats["queues"] == {"echo": 2}
    assert {"journal", "uptimeSecs", "version"} <= set(stats)


async def test_console_is_served_at_root(cli):
    resp = await cli.get("/")
    assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
    assert "OffloadMQ" in await resp.text()


@pytest.mark.parametrize("path", ["/../offloadmq.py", "/%2e%2e/offloadmq.py",
                                  "/js/..%2f..%2foffloadmq.py", "/%2Fetc%2Fpasswd", "/nope.html",
                                  "/js", "/a%00b.html", "/" + "n" * 300])
async def test_static_refuses_traversal_and_unknown_files(cli, path):
    await fails(cli, "GET", path, 404)


async def test_static_refuses_a_symlink_leading_out(make_client, tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<h1>console</h1>")
    (tmp_path / "secret.txt").write_text("top secret")
    os.symlink(tmp_path / "secret.txt", static / "leak.txt")
    cli = await make_client(static_path=static)
    assert "console" in await (await cli.get("/")).text()
    await fails(cli, "GET", "/leak.txt", 404)


async def test_unknown_method_gets_an_error_body(cli):
    body = await call(cli, "POST", "/health", 405)
    assert body["error"]["status"] == 405


# ---------------------------------------------------------------- client auth

async def test_submit_accepts_header_key_body_key_and_mgmt_token(cli):
    for headers, extra in ((CLIENT, {}), ({}, {"apiKey": CLIENT_KEY}), (MGMT_H, {}),
                           ({"Authorization": f"Bearer {CLIENT_KEY}"}, {})):  # Bearer: extension
        body = await call(cli, "POST", "/api/task/submit", 201, headers=headers,
                          json={"capability": "echo", "payload": {"x": 1}, **extra})
        assert set(body) >= {"id", "capability", "status", "message"}
        assert body["capability"] == "echo" and body["status"] == "pending"
        assert body["message"] == "Added to tasks queue"
        assert body["id"]["cap"] == "echo" and len(body["id"]["id"]) == 26


@pytest.mark.parametrize("headers,extra", [
    ({}, {}),
    ({"X-API-Key": "nope"}, {}),
    ({}, {"apiKey": "nope"}),
    ({}, {"apiKey": 42}),
    ({"X-Mgmt-Token": "wrong"}, {}),
    ({"X-API-Key": ""}, {}),
    ({"Authorization": "Bearer nope"}, {}),
    ({"X-Mgmt-Token": "wrong", "X-API-Key": CLIENT_KEY}, {}),
])
async def test_client_routes_refuse_bad_credentials(cli, headers, extra):
    await fails(cli, "POST", "/api/task/submit", 401, headers=headers,
                json={"capability": "echo", **extra})
    await fails(cli, "GET", "/api/capabilities/online", 401, headers=headers)


async def test_ids_order_by_creation(cli):
    ids = [(await submit(cli))["id"] for _ in range(5)]
    assert ids == sorted(ids)


async def test_key_patterns_limit_capabilities(cli):
    await call(cli, "POST", "/management/client_api_keys/update", headers=MGMT_H,
               json={"key": "ck-llm", "capabilities": ["llm.*", "debug.echo"]})
    h = {"X-API-Key": "ck-llm"}
    await submit(cli, "llm.chat", headers=h)
    await submit(cli, "debug.echo", headers=h)
    for cap in ("vision", "llm", "debug.echo2"):
        await fails(cli, "POST", "/api/task/submit", 403, headers=h, json={"capability": cap})
    await agent(cli, caps=("llm.chat", "vision"))
    assert await call(cli, "GET", "/api/capabilities/online", headers=h) == ["llm.chat"]
    assert await call(cli, "POST", "/api/capabilities/online", headers=CLIENT) == ["llm.chat", "vision"]
    assert await call(cli, "POST", "/api/capabilities/online", json={"apiKey": CLIENT_KEY}) \
        == ["llm.chat", "vision"]


# ---------------------------------------------------------------- client: submit errors

@pytest.mark.parametrize("body", [
    {},
    {"capability": ""},
    {"capability": 42},
    {"capability": "x" * 257},
    {"capability": "echo", "urgent": "yes"},
    {"capability": "echo", "restartable": 1},
    {"capability": "echo", "fetchFiles": "a.txt"},
    {"capability": "echo", "fetchFiles": [{"get": "https://x"}]},
    {"capability": "echo", "artifacts": [{"path": "a", "customHeader": "x"}]},
])
async def test_submit_rejects_wrong_types_and_missing_fields(cli, body):
    await fails(cli, "POST", "/api/task/submit", 400, headers=CLIENT, json=body)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"echo"', b""])
async def test_submit_rejects_malformed_json(cli, raw):
    await fails(cli, "POST", "/api/task/submit", 400, data=raw,
                headers={**CLIENT, "Content-Type": "application/json"})


async def test_capability_of_256_characters_is_accepted(cli):
    await submit(cli, "c" * 256)


async def test_body_over_the_limit_is_413(make_client):
    cli = await make_client(max_body_bytes=1024)
    await fails(cli, "POST", "/api/task/submit", 413, headers=CLIENT,
                json={"capability": "echo", "payload": "x" * 2000})
    await fails(cli, "POST", "/agent/register", 413, json={"capabilities": ["x" * 2000]})
    await submit(cli, payload="x" * 500)


async def test_submit_keeps_file_references_and_payload(cli):
    ag = await agent(cli)
    refs = [{"path": "in/a.txt", "get": "https://example.com/a", "customHeader": {"X": "1"}}]
    tid = await submit(cli, payload={"deep": [1, None, "x"]}, fetchFiles=refs,
                       artifacts=[{"path": "out.txt"}])
    got = await poll(cli, ag)
    assert got["data"] == {"capability": "echo", "urgent": False, "restartable": False,
                           "payload": {"deep": [1, None, "x"]}, "fetchFiles": refs,
                           "artifacts": [{"path": "out.txt"}]}
    assert got["id"] == tid and got["createdAt"].endswith("Z")


# ---------------------------------------------------------------- client: urgent, blocking

async def test_urgent_without_a_serving_agent_is_503(cli):
    await fails(cli, "POST", "/api/task/submit", 503, headers=CLIENT,
                json={"capability": "echo", "urgent": True})
    await agent(cli, caps=("other",))
    await fails(cli, "POST", "/api/task/submit", 503, headers=CLIENT,
                json={"capability": "echo", "urgent": True})
    await agent(cli)
    body = await call(cli, "POST", "/api/task/submit", 202, headers=CLIENT,
                      json={"capability": "echo", "urgent": True})
    assert body["status"] == "pending"


async def test_submit_blocking_requires_urgent_and_a_serving_agent(cli):
    await fails(cli, "POST", "/api/task/submit_blocking", 400, headers=CLIENT,
                json={"capability": "echo"})
    await fails(cli, "POST", "/api/task/submit_blocking", 400, headers=CLIENT,
                json={"capability": "echo", "urgent": False})
    await fails(cli, "POST", "/api/task/submit_blocking", 503, headers=CLIENT,
                json={"capability": "echo", "urgent": True})
    await fails(cli, "POST", "/api/task/submit_blocking", 401,
                json={"capability": "echo", "urgent": True})


async def test_submit_blocking_end_to_end(cli):
    ag = await agent(cli, caps=("debug.echo",))

    async def scripted_agent():
        task = await poll(cli, ag, wait=5)
        tid = task["id"]
        assert task["data"]["payload"] == {"say": "hi"}
        await take(cli, ag, tid)
        await progress(cli, ag, tid, stage="echoing", logUpdate="hello ")
        await progress(cli, ag, tid, stage="None", logUpdate="world\n")
        await resolve(cli, ag, tid, {"success": 0.1}, {"said": "hi"})

    worker = asyncio.create_task(scripted_agent())
    result = await call(cli, "POST", "/api/task/submit_blocking", json={
        "capability": "debug.echo", "urgent": True, "payload": {"say": "hi"}, "apiKey": CLIENT_KEY})
    await worker
    assert result["data"]["capability"] == "debug.echo"
    assert result["data"]["urgent"] is True
    assert result["status"] == "completed"
    assert result["result"] == {"said": "hi"}
    assert result["log"] == "hello world\n"
    assert result["stage"] == "echoing"
    assert result["agentId"] == ag.uid
    assert [h["description"] for h in result["history"]][0] == "submitted"
    assert result["history"][-1]["description"] == "completed"
    assert set(result) >= {"id", "data", "agentId", "status", "history", "createdAt",
                           "assignedAt", "result", "log", "stage"}
    assert "apiKey" not in result["data"]


async def test_submit_blocking_reports_a_failure_with_200(cli):
    ag = await agent(cli)

    async def failing_agent():
        task = await poll(cli, ag, wait=5)
        await take(cli, ag, task["id"])
        await resolve(cli, ag, task["id"], {"failure": ["boom", 0.2]}, {"err": "boom"})

    worker = asyncio.create_task(failing_agent())
    result = await call(cli, "POST", "/api/task/submit_blocking", headers=CLIENT,
                        json={"capability": "echo", "urgent": True})
    await worker
    assert result["status"] == "failed" and result["result"] == {"err": "boom"}
    assert "boom" in result["history"][-1]["description"]


async def test_submit_blocking_past_the_hold_limit_is_504_and_stays_pollable(make_client):
    cli = await make_client(blocking_hold_s=0.3)
    ag = await agent(cli)

    async def slow_agent():
        task = await poll(cli, ag, wait=5)
        await take(cli, ag, task["id"])
        return task["id"]

    worker = asyncio.create_task(slow_agent())
    started = time.perf_counter()
    body = await fails(cli, "POST", "/api/task/submit_blocking", 504, headers=CLIENT,
                       json={"capability": "echo", "urgent": True})
    assert 0.25 < time.perf_counter() - started < 2
    tid = await worker
    assert body["id"] == tid
    assert (await client_poll(cli, tid))["status"] == "assigned"
    await resolve(cli, ag, tid, output=7)
    assert (await client_poll(cli, tid))["output"] == 7


async def test_urgent_task_nobody_takes_expires_and_blocking_answers_503(make_client):
    now = [time.time()]
    cli = await make_client(clock=lambda: now[0])
    await agent(cli)
    blocking = asyncio.create_task(call(cli, "POST", "/api/task/submit_blocking", 503,
                                        headers=CLIENT, json={"capability": "echo", "urgent": True}))
    await asyncio.sleep(0.1)
    now[0] += 61  # the hub's once-a-second round expires it
    body = await asyncio.wait_for(blocking, 3)
    assert body["error"]["type"] == "scheduling_impossible"
    assert (await client_poll(cli, body["id"]))["status"] == "failed"
    listing = await call(cli, "GET", "/management/tasks/list", headers=MGMT_H)
    [expired] = listing["urgent"]["assigned"]
    assert "expired" in expired["history"][-1]["description"]


async def test_tasks_reset_during_submit_blocking_is_404(cli):
    await agent(cli)
    blocking = asyncio.create_task(call(cli, "POST", "/api/task/submit_blocking", 404,
                                        headers=CLIENT, json={"capability": "echo", "urgent": True}))
    await asyncio.sleep(0.1)
    await call(cli, "POST", "/management/tasks/reset", headers=MGMT_H)
    body = await asyncio.wait_for(blocking, 2)
    assert body["error"]["type"] == "not_found" and "id" in body


# ---------------------------------------------------------------- client: poll

async def test_client_poll_shape_and_auth_schemes(cli):
    tid = await submit(cli)
    for method, headers, kw in (("GET", CLIENT, {}), ("POST", CLIENT, {}),
                                ("POST", {}, {"json": {"apiKey": CLIENT_KEY}}),
                                ("GET", MGMT_H, {})):
        body = await call(cli, method, f"/api/task/poll/{tp(tid)}", headers=headers, **kw)
        assert body["id"] == tid and body["status"] == "pending" and body["log"] == ""
        assert body["createdAt"].endswith("Z")
        assert "output" not in body and "stage" not in body


async def test_client_poll_unknown_task_or_other_key_is_404(cli):
    tid = await submit(cli)
    await fails(cli, "GET", f"/api/task/poll/echo/01ARZ3NDEKTSV4RRFFQ69G5FAV", 404, headers=CLIENT)
    await fails(cli, "GET", f"/api/task/poll/other/{tid['id']}", 404, headers=CLIENT)
    await call(cli, "POST", "/management/client_api_keys/update", headers=MGMT_H,
               json={"key": "ck-other", "capabilities": ["*"]})
    await fails(cli, "GET", f"/api/task/poll/{tp(tid)}", 404, headers={"X-API-Key": "ck-other"})
    await fails(cli, "GET", f"/api/task/poll/{tp(tid)}", 401)


@pytest.mark.parametrize("wait", ["abc", "-1", "61", "nan", "inf", ""])
async def test_bad_wait_is_400(cli, wait):
    tid = await submit(cli)
    ag = await agent(cli)
    await fails(cli, "GET", f"/api/task/poll/{tp(tid)}?wait={wait}", 400, headers=CLIENT)
    await fails(cli, "GET", f"/private/agent/task/poll?wait={wait}", 400, headers=ag.h)


async def test_bad_percent_encoding_in_the_capability_is_400(cli):
    ag = await agent(cli)
    await fails(cli, "GET", "/api/task/poll/ec%ffho/01ARZ3NDEKTSV4RRFFQ69G5FAV", 400, headers=CLIENT)
    await fails(cli, "POST", "/private/agent/take/ec%ffho/01ARZ3NDEKTSV4RRFFQ69G5FAV", 400,
                headers=ag.h)


async def test_client_poll_wait_returns_as_soon_as_the_task_ends(cli):
    ag = await agent(cli)
    tid = await submit(cli)
    await take(cli, ag, tid)
    waiting = asyncio.create_task(client_poll(cli, tid, query="?wait=10"))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await resolve(cli, ag, tid, output="ok")
    ended = time.perf_counter()
    body = await asyncio.wait_for(waiting, 2)
    assert time.perf_counter() - ended < 0.2
    assert body["status"] == "completed" and body["output"] == "ok"


async def test_client_poll_wait_times_out_with_the_current_status(cli):
    tid = await submit(cli)
    started = time.perf_counter()
    body = await client_poll(cli, tid, query="?wait=0.3")
    assert 0.25 < time.perf_counter() - started < 1.5
    assert body["status"] == "pending"


# ---------------------------------------------------------------- agent: register, auth, tokens

async def test_register_and_auth_shapes(cli):
    reg = await call(cli, "POST", "/agent/register", json={
        "capabilities": ["echo"], "tier": 5, "capacity": 2, "systemInfo": {}, "apiKey": AGENT_KEY})
    assert set(reg) >= {"agentId", "key", "message"} and reg["message"] == "Registered"
    assert len(reg["agentId"]) == 26
    auth = await call(cli, "POST", "/agent/auth", json={"agentId": reg["agentId"], "key": reg["key"]})
    assert set(auth) >= {"token", "expiresIn"} and auth["expiresIn"] == 7 * 24 * 3600
    header = json.loads(base64.urlsafe_b64decode(auth["token"].split(".")[0] + "=="))
    assert header["alg"] == "HS256"
    claims = jwt.decode(auth["token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == reg["agentId"] and claims["exp"] - claims["iat"] == 7 * 24 * 3600


@pytest.mark.parametrize("extra,status", [
    ({"apiKey": "wrong"}, 401),
    ({"apiKey": None}, 401),
    ({"apiKey": AGENT_KEY, "capabilities": "echo"}, 400),
    ({"apiKey": AGENT_KEY, "capabilities": [""]}, 400),
    ({"apiKey": AGENT_KEY, "capabilities": [7]}, 400),
    ({"apiKey": AGENT_KEY, "tier": 256}, 400),
    ({"apiKey": AGENT_KEY, "tier": "high"}, 400),
    ({"apiKey": AGENT_KEY, "capacity": 0}, 400),
    ({"apiKey": AGENT_KEY, "capacity": True}, 400),
    ({"apiKey": AGENT_KEY, "systemInfo": "linux"}, 400),
])
async def test_register_errors(cli, extra, status):
    body = {"capabilities": ["echo"], "tier": 0, "capacity": 1, "systemInfo": {}, **extra}
    await fails(cli, "POST", "/agent/register", status, json=body)


async def test_register_and_auth_reject_malformed_json(cli):
    for path in ("/agent/register", "/agent/auth", "/management/client_api_keys/update"):
        await fails(cli, "POST", path, 400, data=b"{oops",
                    headers={"Content-Type": "application/json", **MGMT_H})


async def test_auth_errors_share_one_message(cli):
    ag = await agent(cli)
    wrong_key = await fails(cli, "POST", "/agent/auth", 401, json={"agentId": ag.uid, "key": "x"})
    unknown = await fails(cli, "POST", "/agent/auth", 401,
                          json={"agentId": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "key": ag.key})
    assert wrong_key["error"]["message"] == unknown["error"]["message"]
    await fails(cli, "POST", "/agent/auth", 400, json={"agentId": ag.uid})
    await fails(cli, "POST", "/agent/auth", 400, json={"agentId": 1, "key": "x"})


def forged_tokens(uid):
    now = int(time.time())
    claims = {"sub": uid, "iat": now, "exp": now + 3600}
    none_token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."
    return {
        "garbage": "not-a-jwt",
        "wrong secret": jwt.encode(claims, "another-secret-of-enough-length-xx", algorithm="HS256"),
        "expired": jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, SECRET, algorithm="HS256"),
        "alg none": none_token,
        "HS512": jwt.encode(claims, SECRET, algorithm="HS512"),
        "no exp": jwt.encode({"sub": uid, "iat": now}, SECRET, algorithm="HS256"),
        "no sub": jwt.encode({"iat": now, "exp": now + 3600}, SECRET, algorithm="HS256"),
        "unknown agent": jwt.encode({**claims, "sub": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}, SECRET,
                                    algorithm="HS256"),
    }


async def test_agent_routes_refuse_bad_tokens(cli):
    ag = await agent(cli)
    routes = [("GET", "/private/agent/ping"), ("GET", "/private/agent/task/poll?wait=0"),
              ("GET", "/private/agent/task/poll_urgent?wait=0"),
              ("POST", "/private/agent/info/update"), ("POST", "/private/agent/take/echo/X"),
              ("POST", "/private/agent/task/progress/echo/X"),
              ("POST", "/private/agent/task/resolve/echo/X")]
    headers = [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}]
    headers += [{"Authorization": f"Bearer {t}"} for t in forged_tokens(ag.uid).values()]
    for method, path in routes:
        for h in headers:
            await fails(cli, method, path, 401, headers=h)
    await call(cli, "GET", "/private/agent/ping", headers=ag.h)  # the real one still works


async def test_a_hand_made_hs256_token_with_the_secret_works(cli):
    ag = await agent(cli)
    now = int(time.time())
    token = jwt.encode({"sub": ag.uid, "iat": now, "exp": now + 60}, SECRET, algorithm="HS256")
    await call(cli, "GET", "/private/agent/ping", headers={"Authorization": f"Bearer {token}"})


async def test_deleted_agents_token_stops_working(cli):
    ag = await agent(cli)
    await call(cli, "GET", "/private/agent/ping", headers=ag.h)  # now cached
    assert await call(cli, "POST", f"/management/agents/delete/{ag.uid}", headers=MGMT_H) \
        == "Agent deleted"
    await fails(cli, "GET", "/private/agent/ping", 401, headers=ag.h)
    await fails(cli, "POST", "/agent/auth", 401, json={"agentId": ag.uid, "key": ag.key})


async def test_info_update_changes_what_the_agent_serves(cli):
    ag = await agent(cli, caps=("echo",))
    body = await call(cli, "POST", "/private/agent/info/update", headers=ag.h, json={
        "capabilities": ["vision[gpu;cuda12]"], "tier": 3, "capacity": 4, "systemInfo": {"os": "x"}})
    assert body == {"agentId": ag.uid, "key": ag.key, "message": "Updated"}
    assert await call(cli, "GET", "/management/capabilities/list/online", headers=MGMT_H) == ["vision"]
    [listed] = await call(cli, "GET", "/management/agents/list", headers=MGMT_H)
    assert listed["capabilities"] == ["vision[gpu;cuda12]"] and listed["tier"] == 3
    assert listed["capacity"] == 4 and listed["systemInfo"] == {"os": "x"}
    await fails(cli, "POST", "/private/agent/info/update", 400, headers=ag.h,
                json={"capabilities": ["echo"], "capacity": -1})
    await fails(cli, "POST", "/private/agent/info/update", 400, headers=ag.h, data=b"{")


# ---------------------------------------------------------------- agent: poll, long poll

async def test_poll_hands_urgent_first_then_oldest_first(cli):
    ag = await agent(cli, capacity=10)
    first = await submit(cli)
    second = await submit(cli)
    urgent = await submit(cli, urgent=True, status=202)
    order = [(await poll(cli, ag))["id"] for _ in range(3)]
    assert order == [urgent, first, second]
    assert await poll(cli, ag) is None


async def test_poll_urgent_returns_only_urgent_tasks(cli):
    ag = await agent(cli, capacity=10)
    await submit(cli)
    assert await poll(cli, ag, urgent=True) is None
    urgent = await submit(cli, urgent=True, status=202)
    got = await call(cli, "POST", "/private/agent/task/poll_urgent?wait=0", headers=ag.h)
    assert got["id"] == urgent and got["data"]["urgent"] is True
    assert await poll(cli, ag, urgent=True) is None


async def test_long_poll_wakes_within_50ms_of_a_submit(make_client):
    # The default fsync policy (`always`): the submit is on disk before the poller wakes.
    # Best of three, so one scheduler hiccup on a loaded CI box does not fail the build.
    cli = await make_client(fsync="always")
    ag = await agent(cli, capacity=3)
    times = []
    for _ in range(3):
        waiting = asyncio.create_task(poll(cli, ag, wait=10))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        submitted = time.perf_counter()
        tid = await submit(cli)
        got = await asyncio.wait_for(waiting, 2)
        times.append(time.perf_counter() - submitted)
        assert got["id"] == tid
        if times[-1] < 0.05:
            break
    assert min(times) < 0.05, f"woke after {[round(t * 1000, 1) for t in times]} ms"


async def test_long_poll_times_out_with_null(cli):
    ag = await agent(cli)
    started = time.perf_counter()
    assert await poll(cli, ag, wait=0.3) is None
    assert 0.28 < time.perf_counter() - started < 1.5


async def test_long_poll_wakes_only_agents_that_serve_the_task(cli):
    echo, other = await agent(cli, caps=("echo",)), await agent(cli, caps=("other",))
    waiting_other = asyncio.create_task(poll(cli, other, wait=0.5))
    waiting_echo = asyncio.create_task(poll(cli, echo, wait=5))
    await asyncio.sleep(0.1)
    tid = await submit(cli)
    assert (await waiting_echo)["id"] == tid
    assert await waiting_other is None


async def test_two_waiting_agents_one_task_exactly_one_gets_it(cli):
    a, b = await agent(cli), await agent(cli)
    waits = [asyncio.create_task(poll(cli, ag, wait=0.5)) for ag in (a, b)]
    await asyncio.sleep(0.1)
    tid = await submit(cli)
    got = await asyncio.gather(*waits)
    assert [g["id"] for g in got if g] == [tid]


async def test_a_poller_that_disconnects_leaves_the_task_for_others(cli):
    a, b = await agent(cli), await agent(cli)
    reader, writer = await asyncio.open_connection(cli.host, cli.port)
    writer.write(f"GET /private/agent/task/poll?wait=10 HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {a.token}\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.sleep(0.3)  # the server notices the closed connection
    tid = await submit(cli)
    await asyncio.sleep(0.05)
    assert (await poll(cli, b))["id"] == tid
    assert (await take(cli, b, tid))["agentId"] == b.uid
    [listed] = [x for x in await call(cli, "GET", "/management/agents/list", headers=MGMT_H)
                if x["uid"] == a.uid]
    assert listed["online"] is True


async def test_deleting_a_long_polling_agent_ends_its_poll_with_401(cli):
    ag = await agent(cli)
    waiting = asyncio.create_task(cli.get("/private/agent/task/poll?wait=10", headers=ag.h))
    await asyncio.sleep(0.1)
    await call(cli, "POST", f"/management/agents/delete/{ag.uid}", headers=MGMT_H)
    resp = await asyncio.wait_for(waiting, 2)
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "authentication_error"


async def test_agent_at_capacity_gets_nothing_from_poll(cli):
    ag = await agent(cli, capacity=1)
    first, _ = await submit(cli), await submit(cli)
    await run_task_take_only(cli, ag, first)
    assert await poll(cli, ag) is None
    await resolve(cli, ag, first)
    assert await poll(cli, ag) is not None


async def run_task_take_only(cli, ag, tid):
    assert (await poll(cli, ag))["id"] == tid
    return await take(cli, ag, tid)


# ---------------------------------------------------------------- agent: take, progress, resolve

async def test_take_returns_the_assigned_task(cli):
    ag = await agent(cli)
    tid = await submit(cli, payload=[1, 2])
    body = await run_task_take_only(cli, ag, tid)
    assert set(body) >= {"id", "data", "agentId", "status", "history", "createdAt",
                         "assignedAt", "result", "log", "stage"}
    assert body["id"] == tid and body["agentId"] == ag.uid and body["status"] == "assigned"
    assert body["data"]["payload"] == [1, 2] and body["result"] is None and body["log"] == ""
    described = [h["description"] for h in body["history"]]
    assert described[0] == "submitted" and f"assigned to agent {ag.uid}" in described[1]
    assert len(described) == 2 and body["history"][1]["timestamp"].endswith("Z")
    assert (await client_poll(cli, tid))["status"] == "assigned"


async def test_take_without_poll_works(cli):
    ag = await agent(cli)
    tid = await submit(cli)
    assert (await take(cli, ag, tid))["status"] == "assigned"


async def test_take_errors(cli):
    a, b = await agent(cli), await agent(cli)
    stranger = await agent(cli, caps=("other",))
    tid = await submit(cli)
    await fails(cli, "POST", f"/private/agent/take/{tp(tid)}", 403, headers=stranger.h)
    await fails(cli, "POST", "/private/agent/take/echo/01ARZ3NDEKTSV4RRFFQ69G5FAV", 404, headers=a.h)
    await take(cli, a, tid)
    await fails(cli, "POST", f"/private/agent/take/{tp(tid)}", 409, headers=b.h)  # taken by a
    await fails(cli, "POST", f"/private/agent/take/{tp(tid)}", 409, headers=a.h)  # even by a
    second = await submit(cli)
    await fails(cli, "POST", f"/private/agent/take/{tp(second)}", 409, headers=a.h)  # capacity


async def test_a_task_offered_to_one_agent_is_not_taken_by_another(cli):
    a, b = await agent(cli), await agent(cli)
    tid = await submit(cli)
    assert (await poll(cli, a))["id"] == tid
    assert await poll(cli, b) is None
    await fails(cli, "POST", f"/private/agent/take/{tp(tid)}", 409, headers=b.h)
    await take(cli, a, tid)


async def test_progress_moves_to_running_and_appends_the_log(cli):
    ag = await agent(cli)
    tid = await submit(cli)
    await take(cli, ag, tid)
    assert await progress(cli, ag, tid, stage="download", logUpdate="a\n") \
        == {"message": "task update confirmed"}
    await progress(cli, ag, tid, stage="None", logUpdate="None")
    await call(cli, "POST", f"/private/agent/task/progress/{tp(tid)}", headers=ag.h,
               json={"id": tid, "logUpdate": "b\n"})  # the id may be the whole task id
    status = await client_poll(cli, tid)
    assert status["status"] == "running" and status["stage"] == "download"
    assert status["log"] == "a\nb\n"


async def test_progress_and_resolve_errors(cli):
    a, b = await agent(cli), await agent(cli)
    tid = await submit(cli)
    await take(cli, a, tid)
    for route in ("progress", "resolve"):
        path = f"/private/agent/task/{route}/{tp(tid)}"
        body = {"id": tid["id"], "capability": "echo", "status": {"success": 1}}
        await fails(cli, "POST", path, 400, headers=a.h, json={**body, "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
        await fails(cli, "POST", path, 400, headers=a.h, json={**body, "id": {"cap": "x", "id": tid["id"]}})
        await fails(cli, "POST", path, 400, headers=a.h, json={k: v for k, v in body.items() if k != "id"})
        await fails(cli, "POST", path, 400, headers=a.h, data=b"{bad")
        await fails(cli, "POST", path, 400, headers=a.h, json=[1])
        await fails(cli, "POST", path, 403, headers=b.h, json=body)
        await fails(cli, "POST", f"/private/agent/task/{route}/echo/01ARZ3NDEKTSV4RRFFQ69G5FAV", 404,
                    headers=a.h, json={**body, "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
    await fails(cli, "POST", f"/private/agent/task/progress/{tp(tid)}", 400, headers=a.h,
                json={"id": tid["id"], "stage": 5})
    for bad in ({"won": 1}, "maybe", {"success": 1, "failure": ["x", 1]}, None):
        await fails(cli, "POST", f"/private/agent/task/resolve/{tp(tid)}", 400, headers=a.h,
                    json={"id": tid["id"], "status": bad})
    await resolve(cli, a, tid)
    await progress(cli, a, tid, status=409)
    await resolve(cli, a, tid, status=409)
    await fails(cli, "POST", f"/private/agent/task/resolve/{tp(tid)}", 409, headers=a.h,
                json={"id": tid["id"], "status": {"success": 1}})


async def test_progress_on_a_pending_task_is_403(cli):
    ag = await agent(cli)
    tid = await submit(cli)
    await fails(cli, "POST", f"/private/agent/task/progress/{tp(tid)}", 403, headers=ag.h,
                json={"id": tid["id"]})


@pytest.mark.parametrize("outcome,restartable,expected", [
    ({"success": 2.0}, False, "completed"),
    ({"failure": ["boom", 1.0]}, False, "failed"),
    ({"notExecuted": "no gpu"}, False, "failed"),
    ({"failure": ["boom", 1.0]}, True, "pending"),
    ({"notExecuted": "no gpu"}, True, "pending"),
])
async def test_resolve_outcomes(cli, outcome, restartable, expected):
    ag = await agent(cli)
    tid = await submit(cli, restartable=restartable, retryDelaySecs=0)
    await take(cli, ag, tid)
    assert await resolve(cli, ag, tid, outcome, {"out": 1}) == {"message": "task report confirmed"}
    status = await client_poll(cli, tid)
    assert status["status"] == expected
    if expected == "completed":
        assert status["output"] == {"out": 1}


async def test_restartable_failure_goes_to_another_agent(cli):
    a, b = await agent(cli), await agent(cli)
    tid = await submit(cli, restartable=True, retryDelaySecs=0)
    await take(cli, a, tid)
    await resolve(cli, a, tid, {"failure": ["oom", 3.0]})
    got = await poll(cli, b, wait=3)
    assert got["id"] == tid
    body = await take(cli, b, tid)
    assert body["agentId"] == b.uid
    assert any("oom" in h["description"] for h in body["history"])
    await progress(cli, a, tid, status=403)  # the first agent lost it


async def test_restartable_task_fails_once_its_retries_run_out(cli):
    # maxRetries (an extension) is 2 here, which is also the original's three runs in all.
    ag = await agent(cli)
    tid = await submit(cli, restartable=True, retryDelaySecs=0, maxRetries=2)
    for _ in range(3):
        assert (await poll(cli, ag, wait=3))["id"] == tid
        await take(cli, ag, tid)
        await resolve(cli, ag, tid, {"failure": ["flaky", 1]})
    assert (await client_poll(cli, tid))["status"] == "failed"


# ---------------------------------------------------------------- capabilities on the wire

async def test_capability_with_slashes_round_trips_as_percent_2f(cli):
    cap = "ollama/llama3:8b.q4"
    ag = await agent(cli, caps=(cap,))
    tid = await submit(cli, cap)
    assert tid["cap"] == cap
    assert "%2F" in tp(tid)
    await run_task(cli, ag, tid, output="slash ok")
    status = await client_poll(cli, tid)
    assert status["status"] == "completed" and status["output"] == "slash ok"
    assert (await call(cli, "GET", f"/api/task/poll/ollama%2fllama3:8b.q4/{tid['id']}",
                       headers=CLIENT))["id"] == tid


async def test_bracketed_attributes_serve_the_base_capability(cli):
    ag = await agent(cli, caps=("vision[gpu;cuda12]",))
    assert await call(cli, "GET", "/api/capabilities/online", headers=CLIENT) == ["vision"]
    tid = await submit(cli, "vision", urgent=True, status=202)
    await run_task(cli, ag, tid)
    assert (await client_poll(cli, tid))["status"] == "completed"


async def test_capability_with_a_percent_sign_is_addressable(cli):
    cap = "odd%41cap"
    ag = await agent(cli, caps=(cap,))
    tid = await submit(cli, cap)
    await run_task(cli, ag, tid)
    assert (await client_poll(cli, tid))["status"] == "completed"


# ---------------------------------------------------------------- scheduling over HTTP

async def test_tier_spill_over(cli):
    high = await agent(cli, tier=9, capacity=1)
    low = await agent(cli, tier=1, capacity=1)
    first, second = await submit(cli), await submit(cli)
    assert await poll(cli, low) is None  # the higher tier has room
    assert (await poll(cli, high))["id"] == first
    await take(cli, high, first)
    assert (await poll(cli, low))["id"] == second  # the higher tier is full: spill over
    await take(cli, low, second)


async def test_urgent_tasks_ignore_tiers(cli):
    await agent(cli, tier=9)
    low = await agent(cli, tier=0)
    tid = await submit(cli, urgent=True, status=202)
    assert (await poll(cli, low))["id"] == tid


async def test_deleted_agents_tasks_requeue_when_restartable_else_fail(cli):
    a, b = await agent(cli, capacity=2), await agent(cli)
    again, lost = await submit(cli, restartable=True, retryDelaySecs=0), await submit(cli)
    await take(cli, a, again)
    await take(cli, a, lost)
    await call(cli, "POST", f"/management/agents/delete/{a.uid}", headers=MGMT_H)
    assert (await client_poll(cli, again))["status"] == "pending"
    assert (await client_poll(cli, lost))["status"] == "failed"
    assert (await poll(cli, b))["id"] == again
    listing = await call(cli, "GET", "/management/tasks/list", headers=MGMT_H)
    [ended] = listing["regular"]["assigned"]
    assert "deleted" in ended["history"][-1]["description"]


async def test_agent_gone_offline_loses_its_tasks(make_client):
    now = [time.time()]
    cli = await make_client(clock=lambda: now[0])
    a = await agent(cli)
    tid = await submit(cli, restartable=True, retryDelaySecs=0)
    await take(cli, a, tid)
    now[0] += 121
    for _ in range(30):
        await asyncio.sleep(0.1)
        if (await client_poll(cli, tid))["status"] == "pending":
            break
    assert (await client_poll(cli, tid))["status"] == "pending"
    assert await call(cli, "GET", "/management/agents/list/online", headers=MGMT_H) == []
    [listed] = await call(cli, "GET", "/management/agents/list", headers=MGMT_H)
    assert listed["online"] is False


# ---------------------------------------------------------------- management

MGMT_ROUTES = [
    ("GET", "/management/capabilities/list/online"),
    ("GET", "/management/agents/list"),
    ("GET", "/management/agents/list/online"),
    ("POST", "/management/agents/delete/01ARZ3NDEKTSV4RRFFQ69G5FAV"),
    ("POST", "/management/agents/reset"),
    ("GET", "/management/tasks/list"),
    ("POST", "/management/tasks/reset"),
    ("GET", "/management/client_api_keys/list"),
    ("POST", "/management/client_api_keys/update"),
    ("POST", "/management/client_api_keys/revoke/ck-test"),
]


@pytest.mark.parametrize("headers", [{}, {"X-Mgmt-Token": "wrong"}, {"Authorization": "Bearer wrong"},
                                     {"X-API-Key": CLIENT_KEY}, {"Authorization": f"Basic {MGMT}"}])
async def test_management_refuses_bad_credentials(cli, headers):
    for method, path in MGMT_ROUTES:
        await fails(cli, method, path, 401, headers=headers)


async def test_management_accepts_both_header_schemes(cli):
    for headers in (MGMT_H, {"Authorization": f"Bearer {MGMT}"}):
        assert await call(cli, "GET", "/management/agents/list", headers=headers) == []


async def test_management_agent_routes(cli):
    ag = await agent(cli, caps=("echo", "vision[gpu]"), tier=2, capacity=3)
    assert await call(cli, "GET", "/management/capabilities/list/online", headers=MGMT_H) \
        == ["echo", "vision"]
    for path in ("/management/agents/list", "/management/agents/list/online"):
        [listed] = await call(cli, "GET", path, headers=MGMT_H)
        assert set(listed) >= {"uid", "uidShort", "registeredAt", "lastContact", "capabilities",
                               "tier", "capacity", "systemInfo", "online"}
        assert listed["uid"] == ag.uid and listed["uidShort"] == ag.uid[-6:]
        assert listed["online"] is True and ag.key not in json.dumps(listed)
    await fails(cli, "POST", "/management/agents/delete/01ARZ3NDEKTSV4RRFFQ69G5FAV", 404, headers=MGMT_H)
    await agent(cli)
    assert await call(cli, "POST", "/management/agents/reset", headers=MGMT_H) \
        == {"result": "Reset successful"}
    assert await call(cli, "GET", "/management/agents/list", headers=MGMT_H) == []
    await fails(cli, "GET", "/private/agent/ping", 401, headers=ag.h)


async def test_management_task_routes(cli):
    ag = await agent(cli, capacity=5)
    taken = await submit(cli)
    waiting = await submit(cli)
    urgent = await submit(cli, urgent=True, status=202)
    await take(cli, ag, taken)
    listing = await call(cli, "GET", "/management/tasks/list", headers=MGMT_H)
    assert set(listing) >= {"urgent", "regular"}
    assert [t["id"] for t in listing["regular"]["assigned"]] == [taken]
    assert [t["id"] for t in listing["regular"]["unassigned"]] == [waiting]
    assert [t["id"] for t in listing["urgent"]["unassigned"]] == [urgent]
    assert listing["urgent"]["assigned"] == []
    assert set(listing["regular"]["assigned"][0]) >= {"agentId", "status", "history"}
    assert await call(cli, "POST", "/management/tasks/reset", headers=MGMT_H) \
        == {"result": "Reset successful"}
    assert await call(cli, "GET", "/management/tasks/list", headers=MGMT_H) == {
        "urgent": {"assigned": [], "unassigned": []}, "regular": {"assigned": [], "unassigned": []}}
    await fails(cli, "GET", f"/api/task/poll/{tp(taken)}", 404, headers=CLIENT)
    assert await poll(cli, ag) is None


async def test_client_key_create_replace_revoke(cli):
    [predefined] = await call(cli, "GET", "/management/client_api_keys/list", headers=MGMT_H)
    assert predefined["key"] == CLIENT_KEY and predefined["isPredefined"] is True
    assert predefined["capabilities"] == ["*"] and predefined["isRevoked"] is False
    made = await call(cli, "POST", "/management/client_api_keys/update", headers=MGMT_H,
                      json={"key": "ck-new", "capabilities": ["llm.*"]})
    assert set(made) >= {"key", "capabilities", "isPredefined", "created", "isRevoked"}
    assert made == {**made, "key": "ck-new", "capabilities": ["llm.*"], "isPredefined": False,
                    "isRevoked": False}
    h = {"X-API-Key": "ck-new"}
    await fails(cli, "POST", "/api/task/submit", 403, headers=h, json={"capability": "echo"})
    replaced = await call(cli, "POST", "/management/client_api_keys/update",
                          headers={"Authorization": f"Bearer {MGMT}"},
                          json={"key": "ck-new", "capabilities": ["echo"]})
    assert replaced["capabilities"] == ["echo"] and replaced["created"] == made["created"]
    tid = await submit(cli, headers=h)
    assert len(await call(cli, "GET", "/management/client_api_keys/list", headers=MGMT_H)) == 2
    revoked = await call(cli, "POST", "/management/client_api_keys/revoke/ck-new", headers=MGMT_H)
    assert revoked["isRevoked"] is True and revoked["key"] == "ck-new"
    await fails(cli, "POST", "/api/task/submit", 401, headers=h, json={"capability": "echo"})
    await fails(cli, "GET", f"/api/task/poll/{tp(tid)}", 401, headers=h)
    await fails(cli, "POST", "/management/client_api_keys/revoke/ck-unknown", 404, headers=MGMT_H)
    # Updating a revoked key brings it back.
    await call(cli, "POST", "/management/client_api_keys/update", headers=MGMT_H,
               json={"key": "ck-new", "capabilities": ["echo"]})
    assert (await client_poll(cli, tid, headers=h))["id"] == tid


@pytest.mark.parametrize("body", [
    {"capabilities": ["*"]},
    {"key": "", "capabilities": ["*"]},
    {"key": 5, "capabilities": ["*"]},
    {"key": "k"},
    {"key": "k", "capabilities": "*"},
    {"key": "k", "capabilities": [1]},
    [],
])
async def test_client_key_update_rejects_bad_bodies(cli, body):
    await fails(cli, "POST", "/management/client_api_keys/update", 400, headers=MGMT_H, json=body)


async def test_client_key_never_reaches_agents_listings_or_logs(cli, caplog, tmp_path):
    secret = "ck-very-secret-value-123"
    await call(cli, "POST", "/management/client_api_keys/update", headers=MGMT_H,
               json={"key": secret, "capabilities": ["*"]})
    caplog.clear()
    caplog.set_level("DEBUG")
    ag = await agent(cli)
    body = await call(cli, "POST", "/api/task/submit", 201,
                      json={"capability": "echo", "apiKey": secret, "payload": {"p": 1}})
    tid = body["id"]
    seen = [await poll(cli, ag), await take(cli, ag, tid),
            await call(cli, "GET", "/management/tasks/list", headers=MGMT_H),
            await call(cli, "GET", "/stats"), await client_poll(cli, tid, headers={"X-API-Key": secret})]
    await progress(cli, ag, tid, logUpdate="x")
    await resolve(cli, ag, tid)
    seen.append(await call(cli, "GET", "/management/tasks/list", headers=MGMT_H))
    assert seen[0]["data"] == {"capability": "echo", "urgent": False, "restartable": False,
                               "payload": {"p": 1}, "fetchFiles": [], "artifacts": []}
    for view in seen:
        assert secret not in json.dumps(view)
        assert "apiKey" not in json.dumps(view)
    assert secret not in caplog.text
    # The journal keeps managed keys (they must survive a restart), never in task records.
    for _ in range(50):  # fsync "no": the journal writer catches up in the background
        tasks = [line for line in (tmp_path / "data" / "journal.jsonl").read_text().splitlines()
                 if '"op":"task.' in line]
        if len(tasks) == 4:
            break
        await asyncio.sleep(0.02)
    assert len(tasks) == 4 and not any(secret in line for line in tasks)


async def test_mgmt_token_on_client_routes_sees_every_task(cli):
    tid = await submit(cli)
    assert (await client_poll(cli, tid, headers=MGMT_H))["id"] == tid
    mine = await submit(cli, headers=MGMT_H)
    await fails(cli, "GET", f"/api/task/poll/{tp(mine)}", 404, headers=CLIENT)


# ---------------------------------------------------------------- what cannot be stored

def nested(levels):
    """A JSON array nested `levels` deep, as text: no Python recursion either way."""
    return "[" * levels + "]" * levels


def submission_text(payload_levels):
    return '{"capability": "echo", "payload": %s}' % nested(payload_levels)


@pytest.mark.parametrize("levels", [252, 1000])
async def test_a_payload_nested_too_deep_for_the_journal_is_refused_on_submit(cli, levels):
    body = await fails(cli, "POST", "/api/task/submit", 400, data=submission_text(levels),
                       headers={**CLIENT, "Content-Type": "application/json"})
    assert "nested" in body["error"]["message"]
    listing = await call(cli, "GET", "/management/tasks/list", headers=MGMT_H)
    assert listing["regular"]["unassigned"] == []


async def test_agent_output_and_system_info_nested_too_deep_are_refused(cli):
    ag = await agent(cli)
    tid = await submit(cli)
    await take(cli, ag, tid)
    resolve = '{"id": "%s", "status": {"success": 1}, "output": %s}' % (tid["id"], nested(252))
    await fails(cli, "POST", f"/private/agent/task/resolve/{tp(tid)}", 400, data=resolve,
                headers={**ag.h, "Content-Type": "application/json"})
    task = (await call(cli, "GET", "/management/tasks/list", headers=MGMT_H))["regular"]["assigned"][0]
    assert task["status"] == "assigned" and task["result"] is None
    register = ('{"capabilities": ["echo"], "apiKey": "%s", "systemInfo": {"x": %s}}'
                % (AGENT_KEY, nested(1000)))
    await fails(cli, "POST", "/agent/register", 400, data=register,
                headers={"Content-Type": "application/json"})
    await fails(cli, "POST", "/private/agent/info/update", 400, headers=ag.h,
                data='{"capabilities": ["echo"], "systemInfo": {"x": %s}}' % nested(252))


async def test_the_deepest_payload_accepted_is_listed_streamed_and_resolved(cli):
    from offloadmq import MAX_BODY_DEPTH
    ag = await agent(cli)
    payload = MAX_BODY_DEPTH - 1  # the body's own object is one level
    resp = await cli.post("/api/task/submit", data=submission_text(payload),
                          headers={**CLIENT, "Content-Type": "application/json"})
    assert resp.status == 201, await resp.text()
    tid = (await resp.json())["id"]
    await take(cli, ag, tid)
    resolve = '{"id": "%s", "status": {"success": 1}, "output": %s}' % (tid["id"], nested(payload))
    resp = await cli.post(f"/private/agent/task/resolve/{tp(tid)}", data=resolve,
                          headers={**ag.h, "Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    listing = await call(cli, "GET", "/management/tasks/list", headers=MGMT_H)
    assert listing["regular"]["assigned"][0]["status"] == "completed"
    resp = await cli.get(f"/api/task/events?task={tid['cap']}/{tid['id']}", headers=CLIENT)
    assert b"event: status" in await resp.content.readuntil(b"\n\n")
    resp.close()


# ---------------------------------------------------------------- idempotent retries

async def test_an_idempotent_retry_is_answered_only_once_the_first_submit_is_on_disk(tmp_path):
    """A retry that arrives while the first submit waits for its write gets its answer
    after that write: the id it is told is on disk (the real journal, fsync always)."""
    from offloadmq import parse_submission
    config = Config(data_path=tmp_path, jwt_secret=SECRET, client_api_keys=(CLIENT_KEY,))
    hub = Hub(config)
    await hub.start()
    journal_path = tmp_path / "journal.jsonl"
    data = parse_submission({"capability": "echo", "payload": 1})
    try:
        first = asyncio.ensure_future(hub.submit(data, "o", None, "key-1"))
        while not hub.journal.buffer:  # the first submit's record waits for the write
            await asyncio.sleep(0)

        async def retry():
            task, created = await hub.submit(data, "o", None, "key-1")
            return task, created, task.id.encode() in journal_path.read_bytes()

        task, created, on_disk = await retry()
        assert on_disk and not created
        assert (await first) == (task, True)
        # Later retries are answered from memory: that task is on disk already.
        assert (await hub.submit(data, "o", None, "key-1")) == (task, False)
    finally:
        await hub.release_waiters()
        await hub.stop()


# ---------------------------------------------------------------- heartbeats and what agents hold

async def test_heartbeat_secs_is_kept_shown_and_checked(cli):
    ag = await agent(cli, heartbeatSecs=8)
    agents = await call(cli, "GET", "/management/agents/list", headers=MGMT_H)
    assert agents[0]["heartbeatSecs"] == 8
    plain = await agent(cli)
    agents = {a["uid"]: a for a in await call(cli, "GET", "/management/agents/list", headers=MGMT_H)}
    assert agents[plain.uid]["heartbeatSecs"] is None and agents[ag.uid]["heartbeatSecs"] == 8
    for bad in (0, 61, "8", True):
        await fails(cli, "POST", "/agent/register", 400, json={
            "capabilities": ["echo"], "apiKey": AGENT_KEY, "heartbeatSecs": bad})
    await call(cli, "POST", "/private/agent/info/update", headers=ag.h,
               json={"capabilities": ["echo"], "heartbeatSecs": 2})
    agents = {a["uid"]: a for a in await call(cli, "GET", "/management/agents/list", headers=MGMT_H)}
    assert agents[ag.uid]["heartbeatSecs"] == 2


async def test_an_agent_missing_three_heartbeats_is_offline(make_client):
    clock = [time.time()]
    cli = await make_client(clock=lambda: clock[0])
    ag = await agent(cli, heartbeatSecs=5)
    clock[0] += 16
    online = await call(cli, "GET", "/management/agents/list/online", headers=MGMT_H)
    assert ag.uid not in {a["uid"] for a in online}


async def test_a_task_whose_take_answer_was_lost_goes_back_when_the_agent_pings_without_it(make_client):
    clock = [time.time()]
    cli = await make_client(clock=lambda: clock[0])
    ag = await agent(cli)
    tid = await submit(cli)
    # The take is journaled; its answer never reaches the agent.
    await call(cli, "GET", "/private/agent/task/poll?take=1&wait=0", headers=ag.h)
    answer = await call(cli, "POST", "/private/agent/ping", headers=ag.h, json={"holding": []})
    assert answer["released"] == [] and answer["status"] == "healthy"  # within the grace
    clock[0] += 6
    answer = await call(cli, "POST", "/private/agent/ping", headers=ag.h, json={"holding": []})
    assert answer["released"] == [tid]
    status = await call(cli, "GET", f"/api/task/poll/{tp(tid)}", headers=CLIENT)
    assert status["status"] == "pending"
    again = await call(cli, "GET", "/private/agent/task/poll?take=1&wait=0", headers=ag.h)
    assert again["id"] == tid and again["attempt"] == 1


async def test_a_started_task_its_agent_no_longer_holds_fails_unless_restartable(make_client):
    clock = [time.time()]
    cli = await make_client(clock=lambda: clock[0])
    ag = await agent(cli, capacity=2)
    held, lost = await submit(cli), await submit(cli)
    for tid in (held, lost):
        await take(cli, ag, tid)
        await progress(cli, ag, tid, stage="running")
    clock[0] += 10
    answer = await call(cli, "POST", "/private/agent/ping", headers=ag.h, json={"holding": [held]})
    assert answer["released"] == [lost]
    status = await call(cli, "GET", f"/api/task/poll/{tp(lost)}", headers=CLIENT)
    assert status["status"] == "failed" and f"agent {ag.uid} no longer holds it" in str(status["output"])
    status = await call(cli, "GET", f"/api/task/poll/{tp(held)}", headers=CLIENT)
    assert status["status"] == "running"


async def test_ping_without_holding_stays_a_contact_and_a_bad_holding_list_is_refused(cli):
    ag = await agent(cli)
    for method, kw in (("GET", {}), ("POST", {}), ("POST", {"json": {}})):
        answer = await call(cli, method, "/private/agent/ping", headers=ag.h, **kw)
        assert answer["status"] == "healthy" and "released" not in answer
    for bad in ({"holding": "x"}, {"holding": [{"cap": "echo"}]}, {"holding": [1]},
                {"holding": [{"cap": "echo", "id": str(i)} for i in range(10_001)]}, []):
        await fails(cli, "POST", "/private/agent/ping", 400, headers=ag.h, json=bad)
