"""The HTTP contract of shared/API.md, driven through `create_app(config)` in-process.

Every route under every auth scheme, every error status with the contract's error body,
long polls (wake-up and time-out), submit_blocking end to end, scheduling over HTTP
(tiers, capacity, restartable tasks) and the static console's path checks; then the
extensions: claim-on-poll and resolve-with-next, lifecycle control (cancel, dead letters,
drain, limits), Server-Sent Events, Idempotency-Key, /metrics, what cannot be stored,
heartbeats and what agents hold.
"""
import asyncio
import base64
import gzip
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import jwt
import pytest

from conftest import (
    AGENT_KEY, CLIENT, CLIENT_KEY, JWT_SECRET as SECRET, MGMT as MGMT_H,
    MGMT_TOKEN as MGMT, api_config, call, fails, fill, http, new_agent, new_agent as agent, submit,
)
from openapi_spec_validator import validate
from yarl import URL

from offloadmq import (
    HUB, ROUTES, AuthThrottle, Config, Hub, create_app, openapi_document, openapi_path,
    warn_short_secrets,
)


@pytest.fixture(params=["journal", "postgres"])
def store_url(request):
    """Every test of this file that builds its app from `config` runs on both stores: the
    embedded journal and a fresh schema of a throwaway PostgreSQL."""
    if request.param == "journal":
        return ""
    return request.getfixturevalue("pg_url")


async def stored_lines(client) -> list[bytes]:
    """The records the app's store holds (each as the core encoded it), read the way a
    restart reads them: the journal file, or the PostgreSQL table through its own session."""
    store = client.server.app[HUB].journal
    if hasattr(store, "path"):
        return store.path.read_bytes().splitlines()
    import asyncpg
    conn = await asyncpg.connect(store.url)
    try:
        return [row[0] for row in await conn.fetch("SELECT record FROM offloadmq_records ORDER BY seq")]
    finally:
        await conn.close()


def tp(tid):
    """The `{cap}/{id}` path tail of a task, its capability percent-encoded."""
    return f"{quote(tid['cap'], safe='')}/{tid['id']}"


async def poll(client, ag, wait=0, urgent=False):
    route = "poll_urgent" if urgent else "poll"
    return await call(client, "GET", f"/private/agent/task/{route}?wait={wait}", headers=ag.h)


async def take(client, ag, tid, status=200):
    return await call(client, "POST", f"/private/agent/take/{tp(tid)}", status, headers=ag.h)


async def progress(client, ag, tid, status=200, **fields):
    return await call(client, "POST", f"/private/agent/task/progress/{tp(tid)}", status, headers=ag.h,
                      json={"id": tid["id"], **fields})


async def resolve(client, ag, tid, outcome=None, output=None, status=200):
    outcome = outcome if outcome is not None else {"success": 1.5}
    return await call(client, "POST", f"/private/agent/task/resolve/{tp(tid)}", status, headers=ag.h,
                      json={"id": tid["id"], "capability": tid["cap"], "status": outcome,
                            "output": output})


async def client_poll(client, tid, headers=CLIENT, query=""):
    return await call(client, "GET", f"/api/task/poll/{tp(tid)}{query}", headers=headers)


async def run_task(client, ag, tid, output="done"):
    """Poll, take, progress and resolve one task as an agent would."""
    got = await poll(client, ag)
    assert got["id"] == tid
    await take(client, ag, tid)
    await progress(client, ag, tid, stage="working", logUpdate="line\n")
    await resolve(client, ag, tid, output=output)


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# ---------------------------------------------------------------- open routes

async def test_health_and_api_ping_share_the_health_shape(client):
    for path in ("/health", "/api/ping"):
        body = await call(client, "GET", path)
        assert set(body) >= {"status", "cached_agents", "cached_tokens", "timestamp"}
        assert body["status"] == "healthy"
        assert body["timestamp"].endswith("Z") and len(body["timestamp"]) == 24
    ag = await agent(client)
    body = await call(client, "GET", "/private/agent/ping", headers=ag.h)
    assert body["cached_agents"] == 1 and body["cached_tokens"] == 1


async def test_ready_says_this_server_takes_the_writes(client):
    """On either store a lone server leads: ready (a load balancer may send it traffic)."""
    assert await call(client, "GET", "/health/ready") == {"ready": True, "role": "leader"}


async def test_stats_counts_agents_and_tasks_by_queue_and_status(client):
    await agent(client)
    await submit(client)
    await submit(client, urgent=True, status=202)
    stats = await call(client, "GET", "/stats")
    assert stats["agents"] == {"all": 1, "online": 1}
    assert stats["tasks"] == {"urgent": {"pending": 1}, "regular": {"pending": 1}}
    assert stats["queues"] == {"echo": 2}
    assert {"uptimeSecs", "version"} <= set(stats) and "journal" not in stats  # no paths for anyone
    internal = await call(client, "GET", "/stats", headers=MGMT_H)
    stored = internal["journal"]
    if "path" in stored:
        assert stored["path"].endswith("journal.jsonl")
    else:  # the PostgreSQL store, named without its password
        from urllib.parse import urlsplit
        password = urlsplit(client.server.app[HUB].journal.url).password
        assert stored["store"].startswith("postgresql://") and password not in json.dumps(internal)


async def test_console_is_served_at_root(client):
    resp = await client.get("/")
    assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
    assert "OffloadMQ" in await resp.text()


@pytest.mark.parametrize("path", ["/../offloadmq.py", "/%2e%2e/offloadmq.py",
                                  "/js/..%2f..%2foffloadmq.py", "/%2Fetc%2Fpasswd", "/nope.html",
                                  "/js", "/a%00b.html", "/" + "n" * 300])
async def test_static_refuses_traversal_and_unknown_files(client, path):
    await fails(client, "GET", path, 404)


async def test_static_refuses_a_symlink_leading_out(make_client, tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<h1>console</h1>")
    (tmp_path / "secret.txt").write_text("top secret")
    os.symlink(tmp_path / "secret.txt", static / "leak.txt")
    client = await make_client(static_path=static)
    assert "console" in await (await client.get("/")).text()
    await fails(client, "GET", "/leak.txt", 404)


async def test_unknown_method_gets_an_error_body(client):
    body = await call(client, "POST", "/health", 405)
    assert body["error"]["status"] == 405


# ---------------------------------------------------------------- client auth

async def test_submit_accepts_header_key_body_key_and_mgmt_token(client):
    for headers, extra in ((CLIENT, {}), ({}, {"apiKey": CLIENT_KEY}), (MGMT_H, {}),
                           ({"Authorization": f"Bearer {CLIENT_KEY}"}, {})):  # Bearer: extension
        body = await call(client, "POST", "/api/task/submit", 201, headers=headers,
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
async def test_client_routes_refuse_bad_credentials(client, headers, extra):
    await fails(client, "POST", "/api/task/submit", 401, headers=headers,
                json={"capability": "echo", **extra})
    await fails(client, "GET", "/api/capabilities/online", 401, headers=headers)


async def test_ids_order_by_creation(client):
    ids = [(await submit(client))["id"] for _ in range(5)]
    assert ids == sorted(ids)


async def test_key_patterns_limit_capabilities(client):
    await call(client, "POST", "/management/client_api_keys/update", headers=MGMT_H,
               json={"key": "ck-llm-0123456789abcdef", "capabilities": ["llm.*", "debug.echo"]})
    h = {"X-API-Key": "ck-llm-0123456789abcdef"}
    await submit(client, "llm.chat", headers=h)
    await submit(client, "debug.echo", headers=h)
    for cap in ("vision", "llm", "debug.echo2"):
        await fails(client, "POST", "/api/task/submit", 403, headers=h, json={"capability": cap})
    await agent(client, caps=("llm.chat", "vision"))
    assert await call(client, "GET", "/api/capabilities/online", headers=h) == ["llm.chat"]
    assert await call(client, "POST", "/api/capabilities/online", headers=CLIENT) == ["llm.chat", "vision"]
    assert await call(client, "POST", "/api/capabilities/online", json={"apiKey": CLIENT_KEY}) \
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
async def test_submit_rejects_wrong_types_and_missing_fields(client, body):
    await fails(client, "POST", "/api/task/submit", 400, headers=CLIENT, json=body)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"echo"', b""])
async def test_submit_rejects_malformed_json(client, raw):
    await fails(client, "POST", "/api/task/submit", 400, data=raw,
                headers={**CLIENT, "Content-Type": "application/json"})


async def test_capability_of_256_characters_is_accepted(client):
    await submit(client, "c" * 256)


async def test_body_over_the_limit_is_413(make_client):
    client = await make_client(max_body_bytes=1024)
    await fails(client, "POST", "/api/task/submit", 413, headers=CLIENT,
                json={"capability": "echo", "payload": "x" * 2000})
    await fails(client, "POST", "/agent/register", 413, json={"capabilities": ["x" * 2000]})
    await submit(client, payload="x" * 500)


async def test_submit_keeps_file_references_and_payload(client):
    ag = await agent(client)
    refs = [{"path": "in/a.txt", "get": "https://example.com/a", "customHeader": {"X": "1"}}]
    tid = await submit(client, payload={"deep": [1, None, "x"]}, fetchFiles=refs,
                       artifacts=[{"path": "out.txt"}])
    got = await poll(client, ag)
    assert got["data"] == {"capability": "echo", "urgent": False, "restartable": False,
                           "payload": {"deep": [1, None, "x"]}, "fetchFiles": refs,
                           "artifacts": [{"path": "out.txt"}]}
    assert got["id"] == tid and got["createdAt"].endswith("Z")


# ---------------------------------------------------------------- client: urgent, blocking

async def test_urgent_without_a_serving_agent_is_503(client):
    await fails(client, "POST", "/api/task/submit", 503, headers=CLIENT,
                json={"capability": "echo", "urgent": True})
    await agent(client, caps=("other",))
    await fails(client, "POST", "/api/task/submit", 503, headers=CLIENT,
                json={"capability": "echo", "urgent": True})
    await agent(client)
    body = await call(client, "POST", "/api/task/submit", 202, headers=CLIENT,
                      json={"capability": "echo", "urgent": True})
    assert body["status"] == "pending"


async def test_submit_blocking_requires_urgent_and_a_serving_agent(client):
    await fails(client, "POST", "/api/task/submit_blocking", 400, headers=CLIENT,
                json={"capability": "echo"})
    await fails(client, "POST", "/api/task/submit_blocking", 400, headers=CLIENT,
                json={"capability": "echo", "urgent": False})
    await fails(client, "POST", "/api/task/submit_blocking", 503, headers=CLIENT,
                json={"capability": "echo", "urgent": True})
    await fails(client, "POST", "/api/task/submit_blocking", 401,
                json={"capability": "echo", "urgent": True})


async def test_submit_blocking_end_to_end(client):
    ag = await agent(client, caps=("debug.echo",))

    async def scripted_agent():
        task = await poll(client, ag, wait=5)
        tid = task["id"]
        assert task["data"]["payload"] == {"say": "hi"}
        await take(client, ag, tid)
        await progress(client, ag, tid, stage="echoing", logUpdate="hello ")
        await progress(client, ag, tid, stage="None", logUpdate="world\n")
        await resolve(client, ag, tid, {"success": 0.1}, {"said": "hi"})

    worker = asyncio.create_task(scripted_agent())
    result = await call(client, "POST", "/api/task/submit_blocking", json={
        "capability": "debug.echo", "urgent": True, "payload": {"say": "hi"}, "apiKey": CLIENT_KEY})
    await worker
    assert result["data"]["capability"] == "debug.echo"
    assert result["data"]["urgent"] is True
    assert result["status"] == "completed"
    assert result["result"] == {"said": "hi"}
    assert result["log"] == "hello world\n"
    assert result["stage"] is None  # it ended: no longer "echoing"
    assert result["createdAt"] <= result["assignedAt"] <= result["endedAt"]
    assert result["agentId"] == ag.uid
    assert [h["description"] for h in result["history"]][0] == "submitted"
    assert result["history"][-1]["description"] == "completed"
    assert set(result) >= {"id", "data", "agentId", "status", "history", "createdAt",
                           "assignedAt", "result", "log", "stage"}
    assert "apiKey" not in result["data"]


async def test_an_ended_or_retried_task_has_no_stage_and_a_failure_keeps_it_in_history(client):
    ag = await agent(client, capacity=2)
    done, failed = await submit(client), await submit(client, restartable=True, maxRetries=1,
                                                      retryDelaySecs=0)
    for tid in (done, failed):
        await call(client, "GET", "/private/agent/task/poll?wait=0", headers=ag.h)
        await take(client, ag, tid)
        await progress(client, ag, tid, stage="running", logUpdate="x")
        assert (await call(client, "GET", f"/api/task/poll/{tp(tid)}", headers=CLIENT))["stage"] == "running"
    await resolve(client, ag, done, {"success": 0.1}, {"ok": 1})
    await resolve(client, ag, failed, {"failure": ["boom", 0.1]}, None)

    polled = await call(client, "GET", f"/api/task/poll/{tp(done)}", headers=CLIENT)
    assert polled["status"] == "completed" and "stage" not in polled
    retried = await call(client, "GET", f"/api/task/poll/{tp(failed)}", headers=CLIENT)
    assert retried["status"] == "pending" and "stage" not in retried  # the next attempt starts afresh

    await call(client, "GET", "/private/agent/task/poll?wait=0", headers=ag.h)
    await take(client, ag, failed)
    await progress(client, ag, failed, stage="fetching files")
    await resolve(client, ag, failed, {"failure": ["boom", 0.1]}, None)
    listing = await call(client, "GET", "/management/tasks/list", headers=MGMT_H)
    rows = {t["id"]["id"]: t for t in listing["regular"]["assigned"]}
    assert rows[done["id"]]["stage"] is None and rows[done["id"]]["endedAt"]
    ended = rows[failed["id"]]
    assert ended["status"] == "failed" and ended["stage"] is None
    assert ended["history"][-1]["description"].endswith("(in stage fetching files)"), ended["history"]


async def test_submit_blocking_reports_a_failure_with_200(client):
    ag = await agent(client)

    async def failing_agent():
        task = await poll(client, ag, wait=5)
        await take(client, ag, task["id"])
        await resolve(client, ag, task["id"], {"failure": ["boom", 0.2]}, {"err": "boom"})

    worker = asyncio.create_task(failing_agent())
    result = await call(client, "POST", "/api/task/submit_blocking", headers=CLIENT,
                        json={"capability": "echo", "urgent": True})
    await worker
    assert result["status"] == "failed" and result["result"] == {"err": "boom"}
    assert "boom" in result["history"][-1]["description"]


async def test_submit_blocking_past_the_hold_limit_is_504_and_stays_pollable(make_client):
    client = await make_client(blocking_hold_s=0.3)
    ag = await agent(client)

    async def slow_agent():
        task = await poll(client, ag, wait=5)
        await take(client, ag, task["id"])
        return task["id"]

    worker = asyncio.create_task(slow_agent())
    started = time.perf_counter()
    body = await fails(client, "POST", "/api/task/submit_blocking", 504, headers=CLIENT,
                       json={"capability": "echo", "urgent": True})
    assert 0.25 < time.perf_counter() - started < 2
    tid = await worker
    assert body["id"] == tid
    assert (await client_poll(client, tid))["status"] == "assigned"
    await resolve(client, ag, tid, output=7)
    assert (await client_poll(client, tid))["output"] == 7


async def test_urgent_task_nobody_takes_expires_and_blocking_answers_503(make_client):
    now = [time.time()]
    client = await make_client(clock=lambda: now[0])
    await agent(client)
    blocking = asyncio.create_task(call(client, "POST", "/api/task/submit_blocking", 503,
                                        headers=CLIENT, json={"capability": "echo", "urgent": True}))
    await asyncio.sleep(0.1)
    now[0] += 61  # the hub's once-a-second round expires it
    body = await asyncio.wait_for(blocking, 3)
    assert body["error"]["type"] == "scheduling_impossible"
    assert (await client_poll(client, body["id"]))["status"] == "failed"
    listing = await call(client, "GET", "/management/tasks/list", headers=MGMT_H)
    [expired] = listing["urgent"]["assigned"]
    assert "expired" in expired["history"][-1]["description"]


async def test_tasks_reset_during_submit_blocking_is_404(client):
    await agent(client)
    blocking = asyncio.create_task(call(client, "POST", "/api/task/submit_blocking", 404,
                                        headers=CLIENT, json={"capability": "echo", "urgent": True}))
    await asyncio.sleep(0.1)
    await call(client, "POST", "/management/tasks/reset", headers=MGMT_H)
    body = await asyncio.wait_for(blocking, 2)
    assert body["error"]["type"] == "not_found" and "id" in body


# ---------------------------------------------------------------- client: poll

async def test_client_poll_shape_and_auth_schemes(client):
    tid = await submit(client)
    for method, headers, kw in (("GET", CLIENT, {}), ("POST", CLIENT, {}),
                                ("POST", {}, {"json": {"apiKey": CLIENT_KEY}}),
                                ("GET", MGMT_H, {})):
        body = await call(client, method, f"/api/task/poll/{tp(tid)}", headers=headers, **kw)
        assert body["id"] == tid and body["status"] == "pending" and body["log"] == ""
        assert body["createdAt"].endswith("Z")
        assert "output" not in body and "stage" not in body


async def test_client_poll_unknown_task_or_other_key_is_404(client):
    tid = await submit(client)
    await fails(client, "GET", "/api/task/poll/echo/01ARZ3NDEKTSV4RRFFQ69G5FAV", 404, headers=CLIENT)
    await fails(client, "GET", f"/api/task/poll/other/{tid['id']}", 404, headers=CLIENT)
    await call(client, "POST", "/management/client_api_keys/update", headers=MGMT_H,
               json={"key": "ck-other-0123456789abcdef", "capabilities": ["*"]})
    await fails(client, "GET", f"/api/task/poll/{tp(tid)}", 404, headers={"X-API-Key": "ck-other-0123456789abcdef"})
    await fails(client, "GET", f"/api/task/poll/{tp(tid)}", 401)


@pytest.mark.parametrize("wait", ["abc", "-1", "61", "nan", "inf", ""])
async def test_bad_wait_is_400(client, wait):
    tid = await submit(client)
    ag = await agent(client)
    await fails(client, "GET", f"/api/task/poll/{tp(tid)}?wait={wait}", 400, headers=CLIENT)
    await fails(client, "GET", f"/private/agent/task/poll?wait={wait}", 400, headers=ag.h)


async def test_bad_percent_encoding_in_the_capability_is_400(client):
    ag = await agent(client)
    await fails(client, "GET", "/api/task/poll/ec%ffho/01ARZ3NDEKTSV4RRFFQ69G5FAV", 400, headers=CLIENT)
    await fails(client, "POST", "/private/agent/take/ec%ffho/01ARZ3NDEKTSV4RRFFQ69G5FAV", 400,
                headers=ag.h)


async def test_client_poll_wait_returns_as_soon_as_the_task_ends(client):
    ag = await agent(client)
    tid = await submit(client)
    await take(client, ag, tid)
    waiting = asyncio.create_task(client_poll(client, tid, query="?wait=10"))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await resolve(client, ag, tid, output="ok")
    ended = time.perf_counter()
    body = await asyncio.wait_for(waiting, 2)
    assert time.perf_counter() - ended < 0.2
    assert body["status"] == "completed" and body["output"] == "ok"


async def test_client_poll_wait_times_out_with_the_current_status(client):
    tid = await submit(client)
    started = time.perf_counter()
    body = await client_poll(client, tid, query="?wait=0.3")
    assert 0.25 < time.perf_counter() - started < 1.5
    assert body["status"] == "pending"


# ---------------------------------------------------------------- agent: register, auth, tokens

async def test_register_and_auth_shapes(client):
    reg = await call(client, "POST", "/agent/register", json={
        "capabilities": ["echo"], "tier": 5, "capacity": 2, "systemInfo": {}, "apiKey": AGENT_KEY})
    assert set(reg) >= {"agentId", "key", "message"} and reg["message"] == "Registered"
    assert len(reg["agentId"]) == 26
    auth = await call(client, "POST", "/agent/auth", json={"agentId": reg["agentId"], "key": reg["key"]})
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
async def test_register_errors(client, extra, status):
    body = {"capabilities": ["echo"], "tier": 0, "capacity": 1, "systemInfo": {}, **extra}
    await fails(client, "POST", "/agent/register", status, json=body)


async def test_register_and_auth_reject_malformed_json(client):
    for path in ("/agent/register", "/agent/auth", "/management/client_api_keys/update"):
        await fails(client, "POST", path, 400, data=b"{oops",
                    headers={"Content-Type": "application/json", **MGMT_H})


async def test_auth_says_why_it_refuses_in_the_words_the_private_routes_use(client):
    ag = await agent(client)
    wrong_key = await fails(client, "POST", "/agent/auth", 401, json={"agentId": ag.uid, "key": "x"})
    assert wrong_key["error"]["message"] == "wrong key for this agent"
    unknown = await fails(client, "POST", "/agent/auth", 401,
                          json={"agentId": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "key": ag.key})
    assert unknown["error"]["message"] == "this agent no longer exists; register again"

    await call(client, "POST", f"/management/agents/rotate_key/{ag.uid}", headers=MGMT_H)
    on_ping = await fails(client, "GET", "/private/agent/ping", 401, headers=ag.h)
    on_auth = await fails(client, "POST", "/agent/auth", 401, json={"agentId": ag.uid, "key": ag.key})
    assert on_auth["error"]["message"] == on_ping["error"]["message"]
    assert "credential was revoked; register again" in on_auth["error"]["message"]

    for reset in ("/management/agents/delete/{uid}", "/management/agents/reset"):
        gone = await agent(client)
        await call(client, "GET", "/private/agent/ping", headers=gone.h)
        await call(client, "POST", reset.format(uid=gone.uid), headers=MGMT_H)
        on_ping = await fails(client, "GET", "/private/agent/ping", 401, headers=gone.h)
        on_auth = await fails(client, "POST", "/agent/auth", 401, json={"agentId": gone.uid, "key": gone.key})
        assert on_auth["error"]["message"] == on_ping["error"]["message"] \
            == "this agent no longer exists; register again"
    await fails(client, "POST", "/agent/auth", 400, json={"agentId": ag.uid})
    await fails(client, "POST", "/agent/auth", 400, json={"agentId": 1, "key": "x"})


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


async def test_agent_routes_refuse_bad_tokens(client):
    ag = await agent(client)
    routes = [("GET", "/private/agent/ping"), ("GET", "/private/agent/task/poll?wait=0"),
              ("GET", "/private/agent/task/poll_urgent?wait=0"),
              ("POST", "/private/agent/info/update"), ("POST", "/private/agent/take/echo/X"),
              ("POST", "/private/agent/task/progress/echo/X"),
              ("POST", "/private/agent/task/resolve/echo/X")]
    headers = [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}]
    headers += [{"Authorization": f"Bearer {t}"} for t in forged_tokens(ag.uid).values()]
    for method, path in routes:
        for h in headers:
            await fails(client, method, path, 401, headers=h)
    await call(client, "GET", "/private/agent/ping", headers=ag.h)  # the real one still works


async def test_a_hand_made_hs256_token_with_the_secret_works(client):
    ag = await agent(client)
    now = int(time.time())
    token = jwt.encode({"sub": ag.uid, "iat": now, "exp": now + 60}, SECRET, algorithm="HS256")
    await call(client, "GET", "/private/agent/ping", headers={"Authorization": f"Bearer {token}"})


async def test_deleted_agents_token_stops_working(client):
    ag = await agent(client)
    await call(client, "GET", "/private/agent/ping", headers=ag.h)  # now cached
    assert await call(client, "POST", f"/management/agents/delete/{ag.uid}", headers=MGMT_H) \
        == "Agent deleted"
    await fails(client, "GET", "/private/agent/ping", 401, headers=ag.h)
    await fails(client, "POST", "/agent/auth", 401, json={"agentId": ag.uid, "key": ag.key})


async def test_info_update_changes_what_the_agent_serves(client):
    ag = await agent(client, caps=("echo",))
    body = await call(client, "POST", "/private/agent/info/update", headers=ag.h, json={
        "capabilities": ["vision[gpu;cuda12]"], "tier": 3, "capacity": 4, "systemInfo": {"os": "x"}})
    assert body == {"agentId": ag.uid, "key": ag.key, "message": "Updated"}
    assert await call(client, "GET", "/management/capabilities/list/online", headers=MGMT_H) == ["vision"]
    [listed] = await call(client, "GET", "/management/agents/list", headers=MGMT_H)
    assert listed["capabilities"] == ["vision[gpu;cuda12]"] and listed["tier"] == 3
    assert listed["capacity"] == 4 and listed["systemInfo"] == {"os": "x"}
    await fails(client, "POST", "/private/agent/info/update", 400, headers=ag.h,
                json={"capabilities": ["echo"], "capacity": -1})
    await fails(client, "POST", "/private/agent/info/update", 400, headers=ag.h, data=b"{")


# ---------------------------------------------------------------- agent: poll, long poll

async def test_poll_hands_urgent_first_then_oldest_first(client):
    ag = await agent(client, capacity=10)
    first = await submit(client)
    second = await submit(client)
    urgent = await submit(client, urgent=True, status=202)
    order = [(await poll(client, ag))["id"] for _ in range(3)]
    assert order == [urgent, first, second]
    assert await poll(client, ag) is None


async def test_poll_urgent_returns_only_urgent_tasks(client):
    ag = await agent(client, capacity=10)
    await submit(client)
    assert await poll(client, ag, urgent=True) is None
    urgent = await submit(client, urgent=True, status=202)
    got = await call(client, "POST", "/private/agent/task/poll_urgent?wait=0", headers=ag.h)
    assert got["id"] == urgent and got["data"]["urgent"] is True
    assert await poll(client, ag, urgent=True) is None


async def test_long_poll_wakes_within_50ms_of_a_submit(make_client):
    # The default fsync policy (`always`): the submit is on disk before the poller wakes.
    # Best of three, so one scheduler hiccup on a loaded CI box does not fail the build.
    client = await make_client(fsync="always")
    ag = await agent(client, capacity=3)
    times = []
    for _ in range(3):
        waiting = asyncio.create_task(poll(client, ag, wait=10))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        submitted = time.perf_counter()
        tid = await submit(client)
        got = await asyncio.wait_for(waiting, 2)
        times.append(time.perf_counter() - submitted)
        assert got["id"] == tid
        if times[-1] < 0.05:
            break
    assert min(times) < 0.05, f"woke after {[round(t * 1000, 1) for t in times]} ms"


async def test_long_poll_times_out_with_null(client):
    ag = await agent(client)
    started = time.perf_counter()
    assert await poll(client, ag, wait=0.3) is None
    assert 0.28 < time.perf_counter() - started < 1.5


async def test_long_poll_wakes_only_agents_that_serve_the_task(client):
    echo, other = await agent(client, caps=("echo",)), await agent(client, caps=("other",))
    waiting_other = asyncio.create_task(poll(client, other, wait=0.5))
    waiting_echo = asyncio.create_task(poll(client, echo, wait=5))
    await asyncio.sleep(0.1)
    tid = await submit(client)
    assert (await waiting_echo)["id"] == tid
    assert await waiting_other is None


async def test_two_waiting_agents_one_task_exactly_one_gets_it(client):
    a, b = await agent(client), await agent(client)
    waits = [asyncio.create_task(poll(client, ag, wait=0.5)) for ag in (a, b)]
    await asyncio.sleep(0.1)
    tid = await submit(client)
    got = await asyncio.gather(*waits)
    assert [g["id"] for g in got if g] == [tid]


async def test_a_poller_that_disconnects_leaves_the_task_for_others(client):
    a, b = await agent(client), await agent(client)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"GET /private/agent/task/poll?wait=10 HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {a.token}\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.sleep(0.3)  # the server notices the closed connection
    tid = await submit(client)
    await asyncio.sleep(0.05)
    assert (await poll(client, b))["id"] == tid
    assert (await take(client, b, tid))["agentId"] == b.uid
    [listed] = [x for x in await call(client, "GET", "/management/agents/list", headers=MGMT_H)
                if x["uid"] == a.uid]
    assert listed["online"] is True


async def test_deleting_a_long_polling_agent_ends_its_poll_with_401(client):
    ag = await agent(client)
    waiting = asyncio.create_task(client.get("/private/agent/task/poll?wait=10", headers=ag.h))
    await asyncio.sleep(0.1)
    await call(client, "POST", f"/management/agents/delete/{ag.uid}", headers=MGMT_H)
    resp = await asyncio.wait_for(waiting, 2)
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "authentication_error"


async def test_agent_at_capacity_gets_nothing_from_poll(client):
    ag = await agent(client, capacity=1)
    first, _ = await submit(client), await submit(client)
    await run_task_take_only(client, ag, first)
    assert await poll(client, ag) is None
    await resolve(client, ag, first)
    assert await poll(client, ag) is not None


async def run_task_take_only(client, ag, tid):
    assert (await poll(client, ag))["id"] == tid
    return await take(client, ag, tid)


# ---------------------------------------------------------------- agent: take, progress, resolve

async def test_take_returns_the_assigned_task(client):
    ag = await agent(client)
    tid = await submit(client, payload=[1, 2])
    body = await run_task_take_only(client, ag, tid)
    assert set(body) >= {"id", "data", "agentId", "status", "history", "createdAt",
                         "assignedAt", "result", "log", "stage"}
    assert body["id"] == tid and body["agentId"] == ag.uid and body["status"] == "assigned"
    assert body["data"]["payload"] == [1, 2] and body["result"] is None and body["log"] == ""
    described = [h["description"] for h in body["history"]]
    assert described[0] == "submitted" and f"assigned to agent {ag.uid}" in described[1]
    assert len(described) == 2 and body["history"][1]["timestamp"].endswith("Z")
    assert (await client_poll(client, tid))["status"] == "assigned"


async def test_take_without_poll_works(client):
    ag = await agent(client)
    tid = await submit(client)
    assert (await take(client, ag, tid))["status"] == "assigned"


async def test_take_errors(client):
    a, b = await agent(client), await agent(client)
    stranger = await agent(client, caps=("other",))
    tid = await submit(client)
    await fails(client, "POST", f"/private/agent/take/{tp(tid)}", 403, headers=stranger.h)
    await fails(client, "POST", "/private/agent/take/echo/01ARZ3NDEKTSV4RRFFQ69G5FAV", 404, headers=a.h)
    await take(client, a, tid)
    await fails(client, "POST", f"/private/agent/take/{tp(tid)}", 409, headers=b.h)  # taken by a
    await fails(client, "POST", f"/private/agent/take/{tp(tid)}", 409, headers=a.h)  # even by a
    second = await submit(client)
    await fails(client, "POST", f"/private/agent/take/{tp(second)}", 409, headers=a.h)  # capacity


async def test_a_task_offered_to_one_agent_is_not_taken_by_another(client):
    a, b = await agent(client), await agent(client)
    tid = await submit(client)
    assert (await poll(client, a))["id"] == tid
    assert await poll(client, b) is None
    await fails(client, "POST", f"/private/agent/take/{tp(tid)}", 409, headers=b.h)
    await take(client, a, tid)


async def test_progress_moves_to_running_and_appends_the_log(client):
    ag = await agent(client)
    tid = await submit(client)
    await take(client, ag, tid)
    assert await progress(client, ag, tid, stage="download", logUpdate="a\n") \
        == {"message": "task update confirmed"}
    await progress(client, ag, tid, stage="None", logUpdate="None")
    await call(client, "POST", f"/private/agent/task/progress/{tp(tid)}", headers=ag.h,
               json={"id": tid, "logUpdate": "b\n"})  # the id may be the whole task id
    status = await client_poll(client, tid)
    assert status["status"] == "running" and status["stage"] == "download"
    assert status["log"] == "a\nb\n"


async def test_progress_and_resolve_errors(client):
    a, b = await agent(client), await agent(client)
    tid = await submit(client)
    await take(client, a, tid)
    for route in ("progress", "resolve"):
        path = f"/private/agent/task/{route}/{tp(tid)}"
        body = {"id": tid["id"], "capability": "echo", "status": {"success": 1}}
        await fails(client, "POST", path, 400, headers=a.h, json={**body, "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
        await fails(client, "POST", path, 400, headers=a.h, json={**body, "id": {"cap": "x", "id": tid["id"]}})
        await fails(client, "POST", path, 400, headers=a.h, json={k: v for k, v in body.items() if k != "id"})
        await fails(client, "POST", path, 400, headers=a.h, data=b"{bad")
        await fails(client, "POST", path, 400, headers=a.h, json=[1])
        await fails(client, "POST", path, 403, headers=b.h, json=body)
        await fails(client, "POST", f"/private/agent/task/{route}/echo/01ARZ3NDEKTSV4RRFFQ69G5FAV", 404,
                    headers=a.h, json={**body, "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
    await fails(client, "POST", f"/private/agent/task/progress/{tp(tid)}", 400, headers=a.h,
                json={"id": tid["id"], "stage": 5})
    for bad in ({"won": 1}, "maybe", {"success": 1, "failure": ["x", 1]}, None):
        await fails(client, "POST", f"/private/agent/task/resolve/{tp(tid)}", 400, headers=a.h,
                    json={"id": tid["id"], "status": bad})
    await resolve(client, a, tid)
    await progress(client, a, tid, status=409)
    await resolve(client, a, tid, status=409)
    await fails(client, "POST", f"/private/agent/task/resolve/{tp(tid)}", 409, headers=a.h,
                json={"id": tid["id"], "status": {"success": 1}})


async def test_progress_on_a_pending_task_is_403(client):
    ag = await agent(client)
    tid = await submit(client)
    await fails(client, "POST", f"/private/agent/task/progress/{tp(tid)}", 403, headers=ag.h,
                json={"id": tid["id"]})


@pytest.mark.parametrize("outcome,restartable,expected", [
    ({"success": 2.0}, False, "completed"),
    ({"failure": ["boom", 1.0]}, False, "failed"),
    ({"notExecuted": "no gpu"}, False, "failed"),
    ({"failure": ["boom", 1.0]}, True, "pending"),
    ({"notExecuted": "no gpu"}, True, "pending"),
])
async def test_resolve_outcomes(client, outcome, restartable, expected):
    ag = await agent(client)
    tid = await submit(client, restartable=restartable, retryDelaySecs=0)
    await take(client, ag, tid)
    assert await resolve(client, ag, tid, outcome, {"out": 1}) == {"message": "task report confirmed"}
    status = await client_poll(client, tid)
    assert status["status"] == expected
    if expected == "completed":
        assert status["output"] == {"out": 1}


async def test_restartable_failure_goes_to_another_agent(client):
    a, b = await agent(client), await agent(client)
    tid = await submit(client, restartable=True, retryDelaySecs=0)
    await take(client, a, tid)
    await resolve(client, a, tid, {"failure": ["oom", 3.0]})
    got = await poll(client, b, wait=3)
    assert got["id"] == tid
    body = await take(client, b, tid)
    assert body["agentId"] == b.uid
    assert any("oom" in h["description"] for h in body["history"])
    await progress(client, a, tid, status=403)  # the first agent lost it


async def test_restartable_task_fails_once_its_retries_run_out(client):
    # maxRetries (an extension) is 2 here, which is also the original's three runs in all.
    ag = await agent(client)
    tid = await submit(client, restartable=True, retryDelaySecs=0, maxRetries=2)
    for _ in range(3):
        assert (await poll(client, ag, wait=3))["id"] == tid
        await take(client, ag, tid)
        await resolve(client, ag, tid, {"failure": ["flaky", 1]})
    assert (await client_poll(client, tid))["status"] == "failed"


# ---------------------------------------------------------------- capabilities on the wire

async def test_capability_with_slashes_round_trips_as_percent_2f(client):
    cap = "ollama/llama3:8b.q4"
    ag = await agent(client, caps=(cap,))
    tid = await submit(client, cap)
    assert tid["cap"] == cap
    assert "%2F" in tp(tid)
    await run_task(client, ag, tid, output="slash ok")
    status = await client_poll(client, tid)
    assert status["status"] == "completed" and status["output"] == "slash ok"
    assert (await call(client, "GET", f"/api/task/poll/ollama%2fllama3:8b.q4/{tid['id']}",
                       headers=CLIENT))["id"] == tid


async def test_bracketed_attributes_serve_the_base_capability(client):
    ag = await agent(client, caps=("vision[gpu;cuda12]",))
    assert await call(client, "GET", "/api/capabilities/online", headers=CLIENT) == ["vision"]
    tid = await submit(client, "vision", urgent=True, status=202)
    await run_task(client, ag, tid)
    assert (await client_poll(client, tid))["status"] == "completed"


async def test_capability_with_a_percent_sign_is_addressable(client):
    cap = "odd%41cap"
    ag = await agent(client, caps=(cap,))
    tid = await submit(client, cap)
    await run_task(client, ag, tid)
    assert (await client_poll(client, tid))["status"] == "completed"


# ---------------------------------------------------------------- scheduling over HTTP

async def test_tier_spill_over(client):
    high = await agent(client, tier=9, capacity=1)
    low = await agent(client, tier=1, capacity=1)
    first, second = await submit(client), await submit(client)
    assert await poll(client, low) is None  # the higher tier has room
    assert (await poll(client, high))["id"] == first
    await take(client, high, first)
    assert (await poll(client, low))["id"] == second  # the higher tier is full: spill over
    await take(client, low, second)


async def test_urgent_tasks_ignore_tiers(client):
    await agent(client, tier=9)
    low = await agent(client, tier=0)
    tid = await submit(client, urgent=True, status=202)
    assert (await poll(client, low))["id"] == tid


async def test_deleted_agents_tasks_requeue_when_restartable_else_fail(client):
    a, b = await agent(client, capacity=2), await agent(client)
    again, lost = await submit(client, restartable=True, retryDelaySecs=0), await submit(client)
    await take(client, a, again)
    await take(client, a, lost)
    await call(client, "POST", f"/management/agents/delete/{a.uid}", headers=MGMT_H)
    assert (await client_poll(client, again))["status"] == "pending"
    assert (await client_poll(client, lost))["status"] == "failed"
    assert (await poll(client, b))["id"] == again
    listing = await call(client, "GET", "/management/tasks/list", headers=MGMT_H)
    [ended] = listing["regular"]["assigned"]
    assert "deleted" in ended["history"][-1]["description"]


async def test_agent_gone_offline_loses_its_tasks(make_client):
    now = [time.time()]
    client = await make_client(clock=lambda: now[0])
    a = await agent(client)
    tid = await submit(client, restartable=True, retryDelaySecs=0)
    await take(client, a, tid)
    now[0] += 121
    for _ in range(30):
        await asyncio.sleep(0.1)
        if (await client_poll(client, tid))["status"] == "pending":
            break
    assert (await client_poll(client, tid))["status"] == "pending"
    assert await call(client, "GET", "/management/agents/list/online", headers=MGMT_H) == []
    [listed] = await call(client, "GET", "/management/agents/list", headers=MGMT_H)
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
async def test_management_refuses_bad_credentials(client, headers):
    for method, path in MGMT_ROUTES:
        await fails(client, method, path, 401, headers=headers)


async def test_management_accepts_both_header_schemes(client):
    for headers in (MGMT_H, {"Authorization": f"Bearer {MGMT}"}):
        assert await call(client, "GET", "/management/agents/list", headers=headers) == []


async def test_management_agent_routes(client):
    ag = await agent(client, caps=("echo", "vision[gpu]"), tier=2, capacity=3)
    assert await call(client, "GET", "/management/capabilities/list/online", headers=MGMT_H) \
        == ["echo", "vision"]
    for path in ("/management/agents/list", "/management/agents/list/online"):
        [listed] = await call(client, "GET", path, headers=MGMT_H)
        assert set(listed) >= {"uid", "uidShort", "registeredAt", "lastContact", "capabilities",
                               "tier", "capacity", "systemInfo", "online"}
        assert listed["uid"] == ag.uid and listed["uidShort"] == ag.uid[-6:]
        # The login secret shows as personalLoginToken (as the original's listing does), only.
        secret = listed.pop("personalLoginToken")
        assert listed["online"] is True and secret == ag.key and ag.key not in json.dumps(listed)
    await fails(client, "POST", "/management/agents/delete/01ARZ3NDEKTSV4RRFFQ69G5FAV", 404, headers=MGMT_H)
    await agent(client)
    assert await call(client, "POST", "/management/agents/reset", headers=MGMT_H) \
        == {"result": "Reset successful"}
    assert await call(client, "GET", "/management/agents/list", headers=MGMT_H) == []
    await fails(client, "GET", "/private/agent/ping", 401, headers=ag.h)


async def test_management_task_routes(client):
    ag = await agent(client, capacity=5)
    taken = await submit(client)
    waiting = await submit(client)
    urgent = await submit(client, urgent=True, status=202)
    await take(client, ag, taken)
    listing = await call(client, "GET", "/management/tasks/list", headers=MGMT_H)
    assert set(listing) >= {"urgent", "regular"}
    assert [t["id"] for t in listing["regular"]["assigned"]] == [taken]
    assert [t["id"] for t in listing["regular"]["unassigned"]] == [waiting]
    assert [t["id"] for t in listing["urgent"]["unassigned"]] == [urgent]
    assert listing["urgent"]["assigned"] == []
    assert set(listing["regular"]["assigned"][0]) >= {"agentId", "status", "history"}
    assert await call(client, "POST", "/management/tasks/reset", headers=MGMT_H) \
        == {"result": "Reset successful"}
    assert await call(client, "GET", "/management/tasks/list", headers=MGMT_H) == {
        "urgent": {"assigned": [], "unassigned": []}, "regular": {"assigned": [], "unassigned": []}}
    await fails(client, "GET", f"/api/task/poll/{tp(taken)}", 404, headers=CLIENT)
    assert await poll(client, ag) is None


async def test_client_key_create_replace_revoke(client):
    [predefined] = await call(client, "GET", "/management/client_api_keys/list", headers=MGMT_H)
    assert predefined["key"] == CLIENT_KEY and predefined["isPredefined"] is True
    assert predefined["capabilities"] == ["*"] and predefined["isRevoked"] is False
    made = await call(client, "POST", "/management/client_api_keys/update", headers=MGMT_H,
                      json={"key": "ck-new-0123456789abcdef", "capabilities": ["llm.*"]})
    assert set(made) >= {"key", "capabilities", "isPredefined", "created", "isRevoked"}
    assert made == {**made, "key": "ck-new-0123456789abcdef", "capabilities": ["llm.*"], "isPredefined": False,
                    "isRevoked": False}
    h = {"X-API-Key": "ck-new-0123456789abcdef"}
    await fails(client, "POST", "/api/task/submit", 403, headers=h, json={"capability": "echo"})
    replaced = await call(client, "POST", "/management/client_api_keys/update",
                          headers={"Authorization": f"Bearer {MGMT}"},
                          json={"key": "ck-new-0123456789abcdef", "capabilities": ["echo"]})
    assert replaced["capabilities"] == ["echo"] and replaced["created"] == made["created"]
    tid = await submit(client, headers=h)
    assert len(await call(client, "GET", "/management/client_api_keys/list", headers=MGMT_H)) == 2
    revoked = await call(client, "POST", "/management/client_api_keys/revoke/ck-new-0123456789abcdef", headers=MGMT_H)
    assert revoked["isRevoked"] is True and revoked["key"] == "ck-new-0123456789abcdef"
    await fails(client, "POST", "/api/task/submit", 401, headers=h, json={"capability": "echo"})
    await fails(client, "GET", f"/api/task/poll/{tp(tid)}", 401, headers=h)
    await fails(client, "POST", "/management/client_api_keys/revoke/ck-unknown", 404, headers=MGMT_H)
    # Updating a revoked key brings it back.
    await call(client, "POST", "/management/client_api_keys/update", headers=MGMT_H,
               json={"key": "ck-new-0123456789abcdef", "capabilities": ["echo"]})
    assert (await client_poll(client, tid, headers=h))["id"] == tid


@pytest.mark.parametrize("body", [
    {"capabilities": ["*"]},
    {"key": "", "capabilities": ["*"]},
    {"key": 5, "capabilities": ["*"]},
    {"key": "k"},
    {"key": "k", "capabilities": "*"},
    {"key": "k", "capabilities": [1]},
    [],
])
async def test_client_key_update_rejects_bad_bodies(client, body):
    await fails(client, "POST", "/management/client_api_keys/update", 400, headers=MGMT_H, json=body)


async def test_client_key_never_reaches_agents_listings_or_logs(client, caplog, tmp_path):
    secret = "ck-very-secret-value-123"
    await call(client, "POST", "/management/client_api_keys/update", headers=MGMT_H,
               json={"key": secret, "capabilities": ["*"]})
    caplog.clear()
    caplog.set_level("DEBUG")
    ag = await agent(client)
    body = await call(client, "POST", "/api/task/submit", 201,
                      json={"capability": "echo", "apiKey": secret, "payload": {"p": 1}})
    tid = body["id"]
    seen = [await poll(client, ag), await take(client, ag, tid),
            await call(client, "GET", "/management/tasks/list", headers=MGMT_H),
            await call(client, "GET", "/stats"), await client_poll(client, tid, headers={"X-API-Key": secret})]
    await progress(client, ag, tid, logUpdate="x")
    await resolve(client, ag, tid)
    seen.append(await call(client, "GET", "/management/tasks/list", headers=MGMT_H))
    assert seen[0]["data"] == {"capability": "echo", "urgent": False, "restartable": False,
                               "payload": {"p": 1}, "fetchFiles": [], "artifacts": []}
    for view in seen:
        assert secret not in json.dumps(view)
        assert "apiKey" not in json.dumps(view)
    assert secret not in caplog.text
    # The journal keeps managed keys (they must survive a restart), never in task records.
    for _ in range(50):  # fsync "no": the journal writer catches up in the background
        tasks = [line.decode() for line in await stored_lines(client) if b'"op":"task.' in line]
        if len(tasks) == 4:
            break
        await asyncio.sleep(0.02)
    assert len(tasks) == 4 and not any(secret in line for line in tasks)


async def test_mgmt_token_on_client_routes_sees_every_task(client):
    tid = await submit(client)
    assert (await client_poll(client, tid, headers=MGMT_H))["id"] == tid
    mine = await submit(client, headers=MGMT_H)
    await fails(client, "GET", f"/api/task/poll/{tp(mine)}", 404, headers=CLIENT)


# ---------------------------------------------------------------- what cannot be stored

def nested(levels):
    """A JSON array nested `levels` deep, as text: no Python recursion either way."""
    return "[" * levels + "]" * levels


def submission_text(payload_levels):
    return '{"capability": "echo", "payload": %s}' % nested(payload_levels)


@pytest.mark.parametrize("levels", [252, 1000])
async def test_a_payload_nested_too_deep_for_the_journal_is_refused_on_submit(client, levels):
    body = await fails(client, "POST", "/api/task/submit", 400, data=submission_text(levels),
                       headers={**CLIENT, "Content-Type": "application/json"})
    assert "nested" in body["error"]["message"]
    listing = await call(client, "GET", "/management/tasks/list", headers=MGMT_H)
    assert listing["regular"]["unassigned"] == []


async def test_agent_output_and_system_info_nested_too_deep_are_refused(client):
    ag = await agent(client)
    tid = await submit(client)
    await take(client, ag, tid)
    resolve = '{"id": "%s", "status": {"success": 1}, "output": %s}' % (tid["id"], nested(252))
    await fails(client, "POST", f"/private/agent/task/resolve/{tp(tid)}", 400, data=resolve,
                headers={**ag.h, "Content-Type": "application/json"})
    task = (await call(client, "GET", "/management/tasks/list", headers=MGMT_H))["regular"]["assigned"][0]
    assert task["status"] == "assigned" and task["result"] is None
    register = ('{"capabilities": ["echo"], "apiKey": "%s", "systemInfo": {"x": %s}}'
                % (AGENT_KEY, nested(1000)))
    await fails(client, "POST", "/agent/register", 400, data=register,
                headers={"Content-Type": "application/json"})
    await fails(client, "POST", "/private/agent/info/update", 400, headers=ag.h,
                data='{"capabilities": ["echo"], "systemInfo": {"x": %s}}' % nested(252))


async def test_the_deepest_payload_accepted_is_listed_streamed_and_resolved(client):
    from offloadmq import MAX_BODY_DEPTH
    ag = await agent(client)
    payload = MAX_BODY_DEPTH - 1  # the body's own object is one level
    resp = await client.post("/api/task/submit", data=submission_text(payload),
                          headers={**CLIENT, "Content-Type": "application/json"})
    assert resp.status == 201, await resp.text()
    tid = (await resp.json())["id"]
    await take(client, ag, tid)
    resolve = '{"id": "%s", "status": {"success": 1}, "output": %s}' % (tid["id"], nested(payload))
    resp = await client.post(f"/private/agent/task/resolve/{tp(tid)}", data=resolve,
                          headers={**ag.h, "Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    listing = await call(client, "GET", "/management/tasks/list", headers=MGMT_H)
    assert listing["regular"]["assigned"][0]["status"] == "completed"
    resp = await client.get(f"/api/task/events?task={tid['cap']}/{tid['id']}", headers=CLIENT)
    assert await resp.content.readuntil(b"\n\n") == b": connected\n\n"
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


async def test_an_idempotent_retry_waiting_for_a_write_that_fails_gets_the_same_507(tiny_disk):
    """The disk fills up under the first submit's write (a tmpfs, for real): a retry that
    arrived while that write was pending is answered what the first submit is, 507, and
    no id is ever told that is not on disk; once there is room the key makes a new task."""
    from offloadmq import StorageFull, parse_submission
    config = Config(data_path=tiny_disk, jwt_secret=SECRET, client_api_keys=(CLIENT_KEY,))
    hub = Hub(config)
    hub.recover()
    journal_path = tiny_disk / "journal.jsonl"
    data = parse_submission({"capability": "echo", "payload": {"pad": "x" * 60_000}})
    try:
        filler = fill(tiny_disk, leave=30_000)
        first = asyncio.ensure_future(hub.submit(data, "o", None, "key-1"))
        while not hub.journal.buffer:  # the first submit's record waits for the write
            await asyncio.sleep(0)
        [refused] = hub.broker.tasks.values()

        async def retry():
            assert ("o", "key-1") in hub.submitting and not first.done(), "it must wait for the first"
            return await hub.submit(data, "o", None, "key-1")

        answers = await asyncio.gather(retry(), first, return_exceptions=True)
        assert [type(a) for a in answers] == [StorageFull, StorageFull], answers
        assert answers[0] is answers[1], "the retry gets what the first submit got"
        assert refused.id.encode() not in journal_path.read_bytes() and not hub.broker.tasks

        filler.unlink()
        assert hub.journal.probe()
        task, created = await hub.submit(data, "o", None, "key-1")
        assert created and task.id != refused.id and task.id.encode() in journal_path.read_bytes()
        assert (await hub.submit(data, "o", None, "key-1")) == (task, False)
    finally:
        await hub.release_waiters()
        await hub.stop()


async def test_log_text_is_acknowledged_only_once_it_is_on_disk(tiny_disk):
    """An agent does not send again log text the server acknowledged, so a progress report
    whose write fails (the disk fills up under it, a tmpfs for real) is answered 507, not
    200, and leaves the task's log as it was."""
    from offloadmq import StorageFull, parse_submission
    config = Config(data_path=tiny_disk, jwt_secret=SECRET, client_api_keys=(CLIENT_KEY,))
    hub = Hub(config)
    hub.recover()
    try:
        agent = await hub.register_agent({"capabilities": ["echo"], "tier": 0, "capacity": 1,
                                          "systemInfo": {}})
        task, _ = await hub.submit(parse_submission({"capability": "echo", "payload": 1}), "o", None, None)
        await hub.take(agent.uid, task.cap, task.id)
        await hub.progress(agent.uid, task.cap, task.id, None, "kept\n")
        filler = fill(tiny_disk, leave=30_000)
        with pytest.raises(StorageFull):
            await hub.progress(agent.uid, task.cap, task.id, None, "x" * 60_000)
        assert hub.broker.task(task.cap, task.id).log == "kept\n"  # memory went back to the disk
        filler.unlink()
        assert hub.journal.probe()
        await hub.progress(agent.uid, task.cap, task.id, None, "sent again\n")
        assert hub.broker.task(task.cap, task.id).log == "kept\nsent again\n"
    finally:
        await hub.release_waiters()
        await hub.stop()


# ---------------------------------------------------------------- heartbeats and what agents hold

async def test_heartbeat_secs_is_kept_shown_and_checked(client):
    ag = await agent(client, heartbeatSecs=8)
    agents = await call(client, "GET", "/management/agents/list", headers=MGMT_H)
    assert agents[0]["heartbeatSecs"] == 8
    plain = await agent(client)
    agents = {a["uid"]: a for a in await call(client, "GET", "/management/agents/list", headers=MGMT_H)}
    assert agents[plain.uid]["heartbeatSecs"] is None and agents[ag.uid]["heartbeatSecs"] == 8
    for bad in (0, 61, "8", True):
        await fails(client, "POST", "/agent/register", 400, json={
            "capabilities": ["echo"], "apiKey": AGENT_KEY, "heartbeatSecs": bad})
    await call(client, "POST", "/private/agent/info/update", headers=ag.h,
               json={"capabilities": ["echo"], "heartbeatSecs": 2})
    agents = {a["uid"]: a for a in await call(client, "GET", "/management/agents/list", headers=MGMT_H)}
    assert agents[ag.uid]["heartbeatSecs"] == 2


async def test_an_agent_missing_three_heartbeats_is_offline(make_client):
    clock = [time.time()]
    client = await make_client(clock=lambda: clock[0])
    ag = await agent(client, heartbeatSecs=5)
    clock[0] += 16
    online = await call(client, "GET", "/management/agents/list/online", headers=MGMT_H)
    assert ag.uid not in {a["uid"] for a in online}


async def test_a_task_whose_take_answer_was_lost_goes_back_when_the_agent_pings_without_it(make_client):
    clock = [time.time()]
    client = await make_client(clock=lambda: clock[0])
    ag = await agent(client)
    tid = await submit(client)
    # The take is journaled; its answer never reaches the agent.
    await call(client, "GET", "/private/agent/task/poll?take=1&wait=0", headers=ag.h)
    answer = await call(client, "POST", "/private/agent/ping", headers=ag.h, json={"holding": []})
    assert answer["released"] == [] and answer["status"] == "healthy"  # within the grace
    clock[0] += 6
    answer = await call(client, "POST", "/private/agent/ping", headers=ag.h, json={"holding": []})
    assert answer["released"] == [tid]
    status = await call(client, "GET", f"/api/task/poll/{tp(tid)}", headers=CLIENT)
    assert status["status"] == "pending"
    again = await call(client, "GET", "/private/agent/task/poll?take=1&wait=0", headers=ag.h)
    assert again["id"] == tid and again["attempt"] == 1


async def test_a_started_task_its_agent_no_longer_holds_fails_unless_restartable(make_client):
    clock = [time.time()]
    client = await make_client(clock=lambda: clock[0])
    ag = await agent(client, capacity=2)
    held, lost = await submit(client), await submit(client)
    for tid in (held, lost):
        await take(client, ag, tid)
        await progress(client, ag, tid, stage="running")
    clock[0] += 10
    answer = await call(client, "POST", "/private/agent/ping", headers=ag.h, json={"holding": [held]})
    assert answer["released"] == [lost]
    status = await call(client, "GET", f"/api/task/poll/{tp(lost)}", headers=CLIENT)
    assert status["status"] == "failed" and f"agent {ag.uid} no longer holds it" in str(status["output"])
    status = await call(client, "GET", f"/api/task/poll/{tp(held)}", headers=CLIENT)
    assert status["status"] == "running"


async def test_ping_without_holding_stays_a_contact_and_a_bad_holding_list_is_refused(client):
    ag = await agent(client)
    for method, kw in (("GET", {}), ("POST", {}), ("POST", {"json": {}})):
        answer = await call(client, method, "/private/agent/ping", headers=ag.h, **kw)
        assert answer["status"] == "healthy" and "released" not in answer
    for bad in ({"holding": "x"}, {"holding": [{"cap": "echo"}]}, {"holding": [1]},
                {"holding": [{"cap": "echo", "id": str(i)} for i in range(10_001)]}, []):
        await fails(client, "POST", "/private/agent/ping", 400, headers=ag.h, json=bad)


# ---------------------------------------------------------------- claim-on-poll and resolve-with-next (extensions)

def resolve_body(task_id, output):
    return {"id": task_id, "capability": task_id["cap"], "status": {"success": 0.01}, "output": output}


async def test_poll_with_take_assigns_and_answers_the_assigned_task(client):
    ag = await new_agent(client, ["debug.echo"])
    agent, uid = ag.h, ag.uid
    task_id = await submit(client, "debug.echo", payload={"n": 1})
    resp = await client.get("/private/agent/task/poll?wait=1&take=1", headers=agent)
    body = await resp.json()
    assert resp.status == 200 and body["id"] == task_id
    assert body["status"] == "assigned" and body["agentId"] == uid
    # It is already ours: taking it again is a conflict, resolving works.
    again = await client.post(f"/private/agent/take/debug.echo/{task_id['id']}", headers=agent)
    assert again.status == 409
    done = await client.post(f"/private/agent/task/resolve/debug.echo/{task_id['id']}",
                             json=resolve_body(task_id, 1), headers=agent)
    assert done.status == 200


async def test_poll_with_take_times_out_with_null(client):
    ag = await new_agent(client, ["debug.echo"])
    agent, _ = ag.h, ag.uid
    started = time.monotonic()
    resp = await client.get("/private/agent/task/poll?wait=0.3&take=true", headers=agent)
    assert await resp.json() is None
    assert 0.25 <= time.monotonic() - started < 2


async def test_resolve_with_next_hands_over_the_next_task_in_the_same_answer(client):
    ag = await new_agent(client, ["debug.echo"])
    agent, uid = ag.h, ag.uid
    first, second = await submit(client, "debug.echo", payload={"n": 1}), await submit(client, "debug.echo", payload={"n": 2})
    resp = await client.get("/private/agent/task/poll?take=1", headers=agent)
    assert (await resp.json())["id"] == first
    resp = await client.post(f"/private/agent/task/resolve/debug.echo/{first['id']}?next=1",
                             json=resolve_body(first, "one"), headers=agent)
    body = await resp.json()
    assert body["message"] == "task report confirmed"
    assert body["next"]["id"] == second and body["next"]["agentId"] == uid
    assert body["next"]["data"]["payload"] == {"n": 2}
    resp = await client.post(f"/private/agent/task/resolve/debug.echo/{second['id']}?next=0",
                             json=resolve_body(second, "two"), headers=agent)
    assert (await resp.json()) == {"message": "task report confirmed", "next": None}
    poll = await client.get(f"/api/task/poll/debug.echo/{first['id']}", headers=CLIENT)
    assert (await poll.json())["output"] == "one"


async def test_resolve_with_next_waits_for_a_task_submitted_later(client):
    ag = await new_agent(client, ["debug.echo"])
    agent, _ = ag.h, ag.uid
    first = await submit(client, "debug.echo", payload=1)
    await client.get("/private/agent/task/poll?take=1", headers=agent)
    waiting = asyncio.ensure_future(client.post(
        f"/private/agent/task/resolve/debug.echo/{first['id']}?next=5",
        json=resolve_body(first, 1), headers=agent))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    later = await submit(client, "debug.echo", payload=2)
    body = await (await waiting).json()
    assert body["next"]["id"] == later


@pytest.mark.parametrize("query", ["take=maybe", "next=-1", "next=61", "next=soon"])
async def test_bad_extension_parameters_are_rejected_before_any_change(client, query):
    ag = await new_agent(client, ["debug.echo"])
    agent, _ = ag.h, ag.uid
    task_id = await submit(client, "debug.echo", payload=1)
    await client.get("/private/agent/task/poll?take=1&wait=0", headers=agent)
    path = ("/private/agent/task/poll?" if query.startswith("take") else
            f"/private/agent/task/resolve/debug.echo/{task_id['id']}?")
    resp = await client.post(path + query, json=resolve_body(task_id, 1), headers=agent)
    body = await resp.json()
    assert resp.status == 400 and body["error"]["type"] == "bad_request"
    status = await client.get(f"/api/task/poll/debug.echo/{task_id['id']}", headers=CLIENT)
    assert (await status.json())["status"] == "assigned"


async def test_a_waiting_take_shares_the_submits_fdatasync_and_follows_it_on_disk(client, tmp_path):
    """The agent's long poll wakes before the submit reaches the disk, so its take joins
    the same write; its answer still waits for that write, which holds both records."""
    ag = await new_agent(client, ["debug.echo"])
    agent = ag.h
    journal = client.server.app[HUB].journal
    poll = asyncio.ensure_future(client.get("/private/agent/task/poll?wait=5&take=1", headers=agent))
    await asyncio.sleep(0.2)  # the poll is waiting
    syncs_before = sum(journal.fsync_seconds.counts)
    submitted = await client.post("/api/task/submit", json={"capability": "debug.echo", "payload": 1},
                                  headers=CLIENT)
    answer = await submitted.json()
    task_id = answer["id"]
    assert answer["status"] == "pending", "answered as submitted, though the agent has it already"
    resp = await poll
    assert (await resp.json())["id"] == task_id
    assert sum(journal.fsync_seconds.counts) - syncs_before == 1, "one fdatasync for both records"
    ops = [json.loads(line)["op"] for line in await stored_lines(client)]
    assert ops[-2:] == ["task.submitted", "task.assigned"]


# ---------------------------------------------------------------- lifecycle over HTTP: cancel, dead letters, drain, limits

async def status_of(client, task_id):
    resp = await client.get(f"/api/task/poll/job/{task_id['id']}", headers=CLIENT)
    return (await resp.json())["status"]


def assert_error(resp_status, body, status, error_type):
    assert resp_status == status
    assert body["error"]["status"] == status and body["error"]["type"] == error_type
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_client_cancels_a_queued_task(client):
    task_id = await submit(client, "job")
    resp = await client.post(f"/api/task/cancel/job/{task_id['id']}", headers=CLIENT)
    assert resp.status == 200 and (await resp.json())["status"] == "canceled"
    resp = await client.post(f"/api/task/cancel/job/{task_id['id']}", headers=CLIENT)
    assert_error(resp.status, await resp.json(), 409, "conflict")


async def test_cancel_needs_the_owning_key(client):
    await client.post("/management/client_api_keys/update", headers=MGMT_H,
                      json={"key": "other-key-0123456789", "capabilities": ["*"]})
    task_id = await submit(client, "job")
    resp = await client.post(f"/api/task/cancel/job/{task_id['id']}", headers={"X-API-Key": "other-key-0123456789"})
    assert_error(resp.status, await resp.json(), 404, "not_found")
    resp = await client.post(f"/api/task/cancel/job/{task_id['id']}")
    assert_error(resp.status, await resp.json(), 401, "authentication_error")


async def test_running_task_cancel_reaches_the_agent_by_long_poll_and_progress(client):
    ag = await new_agent(client, ["job"])
    agent, _ = ag.h, ag.uid
    task_id = await submit(client, "job")
    await client.get("/private/agent/task/poll?take=1", headers=agent)
    waiting = asyncio.ensure_future(client.get("/private/agent/task/cancels?wait=5", headers=agent))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    resp = await client.post(f"/management/tasks/cancel/job/{task_id['id']}", headers=MGMT_H)
    assert (await resp.json())["cancelRequested"] is True
    assert await (await asyncio.wait_for(waiting, 2)).json() == [task_id]
    resp = await client.post(f"/private/agent/task/progress/job/{task_id['id']}", headers=agent,
                             json={"id": task_id, "logUpdate": "still here\n"})
    assert await resp.json() == {"message": "task update confirmed", "cancel": True}
    resp = await client.post(f"/private/agent/task/resolve/job/{task_id['id']}", headers=agent,
                             json={"id": task_id, "status": {"failure": ["killed", 0.1]}, "output": None})
    assert resp.status == 200
    assert await status_of(client, task_id) == "canceled"


async def test_cancel_long_poll_times_out_empty(client):
    ag = await new_agent(client, ["job"])
    agent, _ = ag.h, ag.uid
    resp = await client.get("/private/agent/task/cancels?wait=0.2", headers=agent)
    assert await resp.json() == []


async def test_dead_letter_listing_and_requeue(client):
    ag = await new_agent(client, ["job"])
    agent, _ = ag.h, ag.uid
    task_id = await submit(client, "job")
    await client.get("/private/agent/task/poll?take=1", headers=agent)
    await client.post(f"/private/agent/task/resolve/job/{task_id['id']}", headers=agent,
                      json={"id": task_id, "status": {"failure": ["boom", 0.1]}, "output": None})
    resp = await client.get("/management/tasks/list?status=failed", headers=MGMT_H)
    listing = await resp.json()
    assert [t["id"] for t in listing["regular"]["assigned"]] == [task_id]
    resp = await client.get("/management/tasks/list?status=bogus", headers=MGMT_H)
    assert_error(resp.status, await resp.json(), 400, "bad_request")
    resp = await client.post(f"/management/tasks/requeue/job/{task_id['id']}", headers=MGMT_H)
    assert resp.status == 200 and (await resp.json())["status"] == "pending"
    resp = await client.post(f"/management/tasks/requeue/job/{task_id['id']}", headers=MGMT_H)
    assert_error(resp.status, await resp.json(), 409, "conflict")
    resp = await client.post("/management/tasks/requeue/job/NOPE", headers=MGMT_H)
    assert_error(resp.status, await resp.json(), 404, "not_found")


async def test_drain_and_resume(client):
    ag = await new_agent(client, ["job"])
    agent, uid = ag.h, ag.uid
    await submit(client, "job")
    resp = await client.post(f"/management/agents/drain/{uid}", headers=MGMT_H)
    assert (await resp.json())["draining"] is True
    resp = await client.get("/private/agent/task/poll?wait=0", headers=agent)
    assert await resp.json() is None
    listed = await (await client.get("/management/agents/list", headers=MGMT_H)).json()
    assert listed[0]["draining"] is True
    resp = await client.post(f"/management/agents/resume/{uid}", headers=MGMT_H)
    assert (await resp.json())["draining"] is False
    resp = await client.get("/private/agent/task/poll?wait=0", headers=agent)
    assert (await resp.json())["data"]["capability"] == "job"
    resp = await client.post("/management/agents/drain/NOPE", headers=MGMT_H)
    assert_error(resp.status, await resp.json(), 404, "not_found")


async def test_max_in_flight_answers_429(client):
    resp = await client.post("/management/client_api_keys/update", headers=MGMT_H,
                             json={"key": "small-key-0123456789", "capabilities": ["job"], "maxInFlight": 1})
    assert (await resp.json())["maxInFlight"] == 1
    small = {"X-API-Key": "small-key-0123456789"}
    await submit(client, "job", headers=small)
    body = await submit(client, "job", headers=small, status=429)
    assert body["error"]["type"] == "too_many_requests" and body["error"]["status"] == 429
    resp = await client.post("/management/client_api_keys/update", headers=MGMT_H,
                             json={"key": "small-key-0123456789", "capabilities": ["job"], "maxInFlight": 0})
    assert_error(resp.status, await resp.json(), 400, "bad_request")


@pytest.mark.parametrize("fields", [
    {"priority": 11}, {"priority": True}, {"maxRetries": -1}, {"retryDelaySecs": "soon"},
    {"delaySecs": -5}, {"runAt": "not a time"}, {"maxWaitSecs": 0}, {"retryOnSameNode": "no"},
])
async def test_bad_lifecycle_fields_are_rejected(client, fields):
    body = await submit(client, "job", status=400, **fields)
    assert body["error"]["type"] == "bad_request"


async def test_delayed_task_is_held_back_over_http(client):
    ag = await new_agent(client, ["job"])
    agent, _ = ag.h, ag.uid
    task_id = await submit(client, "job", delaySecs=3600, priority=7)
    resp = await client.get("/private/agent/task/poll?wait=0", headers=agent)
    assert await resp.json() is None
    resp = await client.post(f"/private/agent/take/job/{task_id['id']}", headers=agent)
    assert_error(resp.status, await resp.json(), 409, "conflict")


# ---------------------------------------------------------------- events, Idempotency-Key, client keys as Bearer, /metrics

async def read_events(resp, count, timeout=5.0):
    """Parse `count` events (comments skipped) from an SSE response."""
    events, current = [], {}
    async def reader():
        while len(events) < count:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if not line:
                if current:
                    events.append(dict(current))
                    current.clear()
                continue
            field, _, value = line.partition(": ")
            current[field] = json.loads(value) if field == "data" else value
    await asyncio.wait_for(reader(), timeout)
    return events


# ---------------------------------------------------------------- SSE

async def test_events_stream_a_tasks_whole_life(client):
    agent = (await new_agent(client, ["job"])).h
    stream = await client.get("/api/task/events", headers=CLIENT)
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    resp = await client.post("/api/task/submit", json={"capability": "job"}, headers=CLIENT)
    task_id = (await resp.json())["id"]
    await client.get("/private/agent/task/poll?take=1", headers=agent)
    await client.post(f"/private/agent/task/progress/job/{task_id['id']}", headers=agent,
                      json={"id": task_id, "stage": "build", "logUpdate": "compiling\n"})
    await client.post(f"/private/agent/task/resolve/job/{task_id['id']}", headers=agent,
                      json={"id": task_id, "status": {"success": 1}, "output": {"ok": 1}})
    events = await read_events(stream, 6)
    kinds = [(e["event"], e["data"].get("status")) for e in events]
    assert kinds == [("status", "pending"), ("status", "assigned"), ("status", "running"),
                     ("log", None), ("status", "completed"), ("end", "completed")]
    assert events[3]["data"]["log"] == "compiling\n" and events[3]["data"]["stage"] == "build"
    assert events[5]["data"]["result"] == {"ok": 1}
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 6
    stream.close()


async def test_events_resume_after_last_event_id_without_gaps(client):
    stream = await client.get("/api/task/events", headers=CLIENT)
    for n in range(3):
        await client.post("/api/task/submit", json={"capability": "job", "payload": n}, headers=CLIENT)
    first = await read_events(stream, 1)
    stream.close()
    resumed = await client.get("/api/task/events", headers={**CLIENT, "Last-Event-ID": first[0]["id"]})
    assert await resumed.content.readuntil(b"\n\n") == b": resumed\n\n", "it says it replays"
    rest = await read_events(resumed, 2)
    assert [int(e["id"]) for e in rest] == [int(first[0]["id"]) + 1, int(first[0]["id"]) + 2]
    resumed.close()


async def test_events_show_only_the_keys_own_tasks_and_named_ones(client):
    await client.post("/management/client_api_keys/update", headers=MGMT_H,
                      json={"key": "other-key-0123456789", "capabilities": ["*"]})
    mine = await (await client.post("/api/task/submit", json={"capability": "job"}, headers=CLIENT)).json()
    theirs = await (await client.post("/api/task/submit", json={"capability": "job"},
                                      headers={"X-API-Key": "other-key-0123456789"})).json()
    # Without Last-Event-ID a stream starts with the current state of the visible tasks.
    stream = await client.get("/api/task/events", headers=CLIENT)
    events = await read_events(stream, 1)
    assert [e["data"]["id"] for e in events] == [mine["id"]]
    stream.close()
    name = f"job/{theirs['id']['id']}"
    resp = await client.get(f"/api/task/events?task={name}", headers=CLIENT)
    assert resp.status == 404
    mgmt = await client.get(f"/management/events?task={name}", headers=MGMT_H)
    events = await read_events(mgmt, 1)
    assert events[0]["data"]["id"] == theirs["id"]
    mgmt.close()


async def test_events_reject_bad_parameters(client):
    resp = await client.get("/api/task/events?task=nonsense", headers=CLIENT)
    assert resp.status == 400 and (await resp.json())["error"]["type"] == "bad_request"
    resp = await client.get("/api/task/events", headers={**CLIENT, "Last-Event-ID": "x"})
    assert resp.status == 400
    resp = await client.get("/api/task/events")
    assert resp.status == 401
    resp = await client.get("/management/events", headers=CLIENT)
    assert resp.status == 401


async def test_management_events_include_agents(client):
    stream = await client.get("/management/events", headers=MGMT_H)
    await new_agent(client, ["job"])
    events = await read_events(stream, 1)
    assert events[0]["event"] == "agent" and events[0]["data"]["op"] == "agent.registered"
    stream.close()


async def test_management_events_tell_of_resets_of_agents_and_tasks(client):
    stream = await client.get("/management/events", headers=MGMT_H)
    await call(client, "POST", "/management/agents/reset", headers=MGMT_H)
    await call(client, "POST", "/management/tasks/reset", headers=MGMT_H)
    events = await read_events(stream, 2)
    assert [(e["event"], e["data"]["op"]) for e in events] == [
        ("agent", "agents.reset"), ("reset", "tasks.reset")]
    stream.close()


# ---------------------------------------------------------------- event streams at scale (EventStreams)

OTHER_KEY = "ck-other"
OTHER = {"X-API-Key": OTHER_KEY}


@pytest.fixture
async def two_keys(make_client):
    """A client with a second client key and at most 3 event streams per key."""
    return await make_client(client_api_keys=(CLIENT_KEY, OTHER_KEY), max_streams_per_key=3)


async def metric(client, name):
    text = await (await client.get("/metrics", headers=MGMT_H)).text()
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


async def test_streams_per_key_are_capped_and_a_closed_one_frees_its_place(two_keys):
    client = two_keys
    streams = [await client.get("/api/task/events", headers=CLIENT) for _ in range(3)]
    assert all(s.status == 200 for s in streams)
    body = await fails(client, "GET", "/api/task/events", 429, headers=CLIENT)
    assert "event streams" in body["error"]["message"]
    # Other keys and management have their own count.
    other = await client.get("/api/task/events", headers=OTHER)
    mgmt = await client.get("/management/events", headers=MGMT_H)
    assert other.status == 200 and mgmt.status == 200
    assert await metric(client, "offloadmq_event_streams") == 5
    streams[0].close()
    for _ in range(50):  # the server notices a reader gone within a second
        again = await client.get("/api/task/events", headers=CLIENT)
        if again.status == 200:
            break
        await asyncio.sleep(0.1)
    assert again.status == 200
    for s in (*streams[1:], other, mgmt, again):
        s.close()
    for _ in range(50):
        if await metric(client, "offloadmq_event_streams") == 0:
            break
        await asyncio.sleep(0.1)
    assert await metric(client, "offloadmq_event_streams") == 0


async def test_a_stream_with_current_0_starts_with_what_happens_next(client):
    await submit(client)
    stream = await client.get("/api/task/events?current=0", headers=CLIENT)
    task = await submit(client)
    events = await read_events(stream, 1)
    assert events[0]["data"]["id"] == task and events[0]["data"]["op"] == "task.submitted"
    body = await fails(client, "GET", "/api/task/events?current=maybe", 400, headers=CLIENT)
    assert "current" in body["error"]["message"]
    stream.close()


async def test_status_events_carry_what_a_listing_row_shows(client):
    stream = await client.get("/management/events?current=0", headers=MGMT_H)
    task = await submit(client, priority=7)
    [event] = await read_events(stream, 1)
    [row] = (await call(client, "GET", f"/management/tasks/list?task=echo/{task['id']}",
                        headers=MGMT_H))["regular"]["unassigned"]
    for field in ("id", "status", "attempt", "createdAt"):
        assert event["data"][field] == row[field]
    assert event["data"]["urgent"] is False and event["data"]["priority"] == 7
    assert event["data"]["agentId"] is None
    stream.close()


async def test_every_audience_gets_its_own_events_in_order_from_the_flusher(two_keys):
    client = two_keys
    mine = await client.get("/api/task/events?current=0", headers=CLIENT)
    theirs = await client.get("/api/task/events?current=0", headers=OTHER)
    everything = await client.get("/management/events?current=0", headers=MGMT_H)
    first = await submit(client)
    named = await client.get(f"/management/events?current=0&task=echo/{first['id']}", headers=MGMT_H)
    await asyncio.sleep(0.05)
    sent = []
    for n in range(30):  # interleaved, and faster than one flush: batches of several
        sent.append(("mine", await submit(client)))
        sent.append(("theirs", await submit(client, headers=OTHER)))
        if n % 10 == 0:
            resp = await client.post(f"/management/tasks/cancel/echo/{first['id']}", headers=MGMT_H)
            assert resp.status in (200, 409)
    # Mine: 31 submitted, then the cancel's status and end; management: all 63.
    got_mine = await read_events(mine, 33)
    got_theirs = await read_events(theirs, 30)
    got_all = await read_events(everything, 63)
    got_named = await read_events(named, 1)
    assert [e["event"] for e in got_mine].count("end") == 1
    assert [e["data"]["id"] for e in got_mine if e["data"].get("op") == "task.submitted"] == \
        [first] + [t for who, t in sent if who == "mine"]
    assert [e["data"]["id"] for e in got_theirs] == [t for who, t in sent if who == "theirs"]
    assert len([e for e in got_all if e["data"].get("op") == "task.submitted"]) == 61
    for got in (got_mine, got_theirs, got_all):
        ids = [int(e["id"]) for e in got]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert got_named[0]["data"]["id"] == first and got_named[0]["data"]["status"] == "canceled"
    for s in (mine, theirs, everything, named):
        s.close()


async def test_a_stream_of_named_tasks_gets_theirs_in_order_and_resets(client):
    one, two, other = await submit(client), await submit(client), await submit(client)
    named = await client.get(f"/api/task/events?current=0&task=echo/{one['id']}&task=echo/{two['id']}",
                             headers=CLIENT)
    await asyncio.sleep(0.05)
    for task in (two, other, one):
        await call(client, "POST", f"/api/task/cancel/echo/{task['id']}", headers=CLIENT)
    await call(client, "POST", "/management/tasks/reset", headers=MGMT_H)
    events = await read_events(named, 5)  # status + end for each named task, then the reset
    assert [e["event"] for e in events] == ["status", "end", "status", "end", "reset"]
    assert [e["data"]["id"] for e in events[:4]] == [two, two, one, one]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)
    named.close()


async def test_a_stream_start_sends_each_pending_task_once(two_keys):
    client = two_keys
    tasks = [await submit(client) for _ in range(300)]  # more than one slice of the start
    await submit(client, headers=OTHER)
    stream = await client.get("/api/task/events", headers=CLIENT)
    events = await read_events(stream, 300)
    assert sorted(e["data"]["id"]["id"] for e in events) == sorted(t["id"] for t in tasks)
    assert {e["data"]["op"] for e in events} == {"current"}
    stream.close()


# ---------------------------------------------------------------- task listing pages

def rows_of(listing):
    return [row for queue in ("urgent", "regular") for kind in ("assigned", "unassigned")
            for row in listing[queue][kind]]


async def listed(client, query, status=200):
    return await call(client, "GET", f"/management/tasks/list?{query}", status, headers=MGMT_H)


async def test_a_cursor_walk_sees_every_task_once_while_tasks_are_submitted(client):
    before = [await submit(client) for _ in range(120)]
    seen, cursor, pages = [], None, 0
    while True:
        listing = await listed(client, "limit=7" + (f"&cursor={cursor}" if cursor else ""))
        ids = [r["id"]["id"] for r in rows_of(listing)]
        assert ids == sorted(ids, reverse=True)  # newest first within a page
        seen += ids
        pages += 1
        for _ in range(3):  # submits during the walk
            await submit(client)
        cursor = listing["next"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)), "a task was listed twice"
    assert set(t["id"] for t in before) <= set(seen)
    assert seen == sorted(seen, reverse=True) and pages == 18


async def test_pages_filter_by_status_capability_queue_key_and_task(two_keys):
    client = two_keys
    a = [await submit(client, cap="alpha") for _ in range(3)]
    b = [await submit(client, cap="beta[gpu]", headers=OTHER) for _ in range(2)]
    await call(client, "POST", f"/management/tasks/cancel/alpha/{a[0]['id']}", headers=MGMT_H)

    async def ids(query):
        return sorted(r["id"]["id"] for r in rows_of(await listed(client, query)))
    assert await ids("capability=alpha") == sorted(t["id"] for t in a)
    assert await ids("capability=beta") == sorted(t["id"] for t in b)  # the base
    assert await ids("status=canceled&limit=5") == [a[0]["id"]]
    assert await ids(f"key={OTHER_KEY}") == sorted(t["id"] for t in b)
    assert await ids("queue=urgent") == []
    assert (await listed(client, "queue=regular"))["total"] == 5
    one = await listed(client, f"task=alpha/{a[1]['id']}")
    assert [r["id"]["id"] for r in rows_of(one)] == [a[1]["id"]] and one["next"] is None and one["total"] == 1
    assert rows_of(await listed(client, "task=alpha/nothing")) == []
    listing = await listed(client, "limit=2&capability=alpha")
    assert listing["total"] == 3 and listing["next"] == a[1]["id"]
    assert await ids(f"limit=2&capability=alpha&cursor={listing['next']}") == [a[0]["id"]]


async def test_a_page_shows_the_end_of_a_long_log_and_a_named_task_all_of_it(client):
    ag = await new_agent(client, ["echo"])
    task = await submit(client)
    await call(client, "POST", f"/private/agent/take/echo/{task['id']}", headers=ag.h)
    text = "".join(f"line {n}\n" for n in range(1000))
    await call(client, "POST", f"/private/agent/task/progress/echo/{task['id']}", headers=ag.h,
               json={"id": task, "logUpdate": text})
    [row] = rows_of(await listed(client, "limit=10"))
    assert row["logChars"] == len(text) and text.endswith(row["log"]) and len(row["log"]) < len(text)
    [whole] = rows_of(await listed(client, f"task=echo/{task['id']}"))
    assert whole["log"] == text and "logChars" not in whole


@pytest.mark.parametrize("query, word", [
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=x", "limit"), ("limit=-1", "limit"),
    ("cursor=abc", "cursor"), ("cursor=" + "0" * 25 + "!", "cursor"), ("queue=soon", "queue"),
    ("status=lost&limit=5", "status"), ("key=unknown", "key"), ("task=nothing", "task"),
    ("capability=", "capability"),
])
async def test_bad_listing_parameters_answer_400(client, query, word):
    body = await fails(client, "GET", f"/management/tasks/list?{query}", 400, headers=MGMT_H)
    assert word in body["error"]["message"]


async def test_the_unparameterized_listing_keeps_the_original_shape(client):
    for _ in range(450):  # more than one written slice
        await submit(client)
    await submit(client, urgent=True, status=503)  # no agent serves it: nothing listed for it
    last = await submit(client)
    await call(client, "POST", f"/management/tasks/cancel/echo/{last['id']}", headers=MGMT_H)
    resp = await client.get("/management/tasks/list", headers=MGMT_H)
    assert resp.status == 200 and resp.content_type == "application/json"
    listing = json.loads(await resp.read())
    assert set(listing) == {"urgent", "regular"} and len(listing["regular"]["unassigned"]) == 450
    page = await listed(client, "limit=1000")  # the same rows, newest first
    for queue, kinds in listing.items():
        for kind, rows in kinds.items():
            assert sorted(rows, key=lambda r: r["id"]["id"]) == page[queue][kind][::-1]
    canceled = await listed(client, "status=canceled")
    assert set(canceled) == {"urgent", "regular"} and len(rows_of(canceled)) == 1


# ---------------------------------------------------------------- Idempotency-Key

async def test_idempotency_key_returns_the_original_task(client):
    headers = {**CLIENT, "Idempotency-Key": "build-42"}
    body = {"capability": "job", "payload": {"ref": "main"}}
    first = await client.post("/api/task/submit", json=body, headers=headers)
    again = await client.post("/api/task/submit", json=body, headers=headers)
    assert first.status == 201 and again.status == 200
    assert (await first.json())["id"] == (await again.json())["id"]
    other = await client.post("/api/task/submit", json={**body, "payload": {"ref": "dev"}}, headers=headers)
    assert other.status == 409 and (await other.json())["error"]["type"] == "conflict"
    listing = await (await client.get("/management/tasks/list", headers=MGMT_H)).json()
    assert len(listing["regular"]["unassigned"]) == 1


async def test_idempotency_keys_are_per_client_key(client):
    await client.post("/management/client_api_keys/update", headers=MGMT_H,
                      json={"key": "other-key-0123456789", "capabilities": ["*"]})
    body = {"capability": "job"}
    a = await client.post("/api/task/submit", json=body, headers={**CLIENT, "Idempotency-Key": "k"})
    b = await client.post("/api/task/submit", json=body, headers={"X-API-Key": "other-key-0123456789", "Idempotency-Key": "k"})
    assert b.status == 201 and (await a.json())["id"] != (await b.json())["id"]
    bad = await client.post("/api/task/submit", json=body, headers={**CLIENT, "Idempotency-Key": "x" * 300})
    assert bad.status == 400


def test_idempotency_key_survives_a_restart(server):
    headers = {**server.client, "Idempotency-Key": "deploy-7"}
    status, first = http("POST", server.url + "/api/task/submit", {"capability": "job"}, headers)
    assert status == 201
    server.restart()
    status, again = http("POST", server.url + "/api/task/submit", {"capability": "job"}, headers)
    assert status == 200 and again["id"] == first["id"]


# ---------------------------------------------------------------- Bearer, metrics

async def test_client_key_as_bearer(client):
    resp = await client.post("/api/task/submit", json={"capability": "job"},
                             headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert resp.status == 201
    resp = await client.post("/api/task/submit", json={"capability": "job"},
                             headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401


async def test_metrics_need_the_token_and_count_tasks(client):
    resp = await client.get("/metrics")
    assert resp.status == 401
    agent = (await new_agent(client, ["job"])).h
    task_id = (await (await client.post("/api/task/submit", json={"capability": "job"}, headers=CLIENT)).json())["id"]
    await client.post("/api/task/submit", json={"capability": "nobody.serves"}, headers=CLIENT)
    await client.get("/private/agent/task/poll?take=1", headers=agent)
    await client.post(f"/private/agent/task/resolve/job/{task_id['id']}", headers=agent,
                      json={"id": task_id, "status": {"success": 1}, "output": None})
    text = await (await client.get("/metrics", headers=MGMT_H)).text()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples['offloadmq_tasks_submitted_total{capability="job"}'] == "1"
    assert samples['offloadmq_tasks_completed_total{capability="job"}'] == "1"
    assert samples['offloadmq_queue_depth{capability="nobody.serves"}'] == "1"
    assert samples["offloadmq_tasks_unservable"] == "1"
    assert samples["offloadmq_agents_online"] == "1"
    assert float(samples["offloadmq_journal_bytes"]) > 0
    assert int(samples["offloadmq_fsync_seconds_count"]) >= 1
    assert int(samples['offloadmq_http_request_duration_seconds_count{method="POST",route="/api/task/submit"}']) == 2
    assert "# TYPE offloadmq_http_request_duration_seconds histogram" in text


async def test_metrics_can_be_public(aiohttp_client, tmp_path):
    client = await aiohttp_client(create_app(api_config(tmp_path, metrics_public=True)))
    resp = await client.get("/metrics")
    assert resp.status == 200 and "offloadmq_agents_online 0" in await resp.text()


async def test_event_ring_forgets_oldest_events_past_its_byte_budget(client, monkeypatch):
    import offloadmq
    monkeypatch.setattr(offloadmq, "EVENT_RING_BYTES", 2000)
    for n in range(30):
        await client.post("/api/task/submit", json={"capability": "job", "payload": "x" * 100},
                          headers=CLIENT)
    hub = client.app[offloadmq.HUB]
    log = hub.events
    assert log.bytes <= 2000 and sum(e.size for e in log.ring) == log.bytes
    assert len(log.ring) < 30
    # A Last-Event-ID older than what is kept cannot resume: the stream starts over.
    assert log.after(log.ring[0].id - 2, "x", None) is None


async def test_a_change_wakes_only_the_clients_waiting_for_that_task(tmp_path):
    """poll?wait= holders wait on their own task: a change to another task does not wake
    them all (with hundreds waiting, each change would cost a pass over all of them)."""
    from offloadmq import Hub, parse_submission
    hub = Hub(Config(data_path=tmp_path, jwt_secret="s" * 32, client_api_keys=("ck",)))
    await hub.start()
    try:
        agent = await hub.register_agent({
            "capabilities": ["debug.echo"], "tier": 0, "capacity": 100, "systemInfo": {}})
        tasks = [(await hub.submit(parse_submission({"capability": "debug.echo"}), "o", None, None))[0]
                 for _ in range(50)]
        waits = [asyncio.ensure_future(hub.poll(t.cap, t.id, "o", 30)) for t in tasks]
        await asyncio.sleep(0.05)
        assert sum(len(w) for w in hub.end_waiters.values()) == 50
        first = tasks[0]
        await hub.take(agent.uid, first.cap, first.id)
        await hub.resolve(agent.uid, first.cap, first.id, "success", None, 1)
        await asyncio.sleep(0.05)
        assert waits[0].done() and not any(w.done() for w in waits[1:])
        assert len(hub.end_waiters) == 49
        await hub.reset_tasks()  # the rest go away: their waits end
        await asyncio.wait_for(asyncio.gather(*waits), 5)
        assert hub.end_waiters == {}
        timed_out = (await hub.submit(parse_submission({"capability": "debug.echo"}), "o", None, None))[0]
        await hub.poll(timed_out.cap, timed_out.id, "o", 0.05)
        assert hub.end_waiters == {}, "a wait that timed out leaves nothing behind"
    finally:
        await hub.release_waiters()
        await hub.stop()


# ---------------------------------------------------------------- hostile requests and credentials (raw sockets: test_e2e_hostile.py)

# ---------------------------------------------------------------- methods and paths

@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/api/task/submit", "POST"),              # answered by the console's catch-all before
    ("GET", "/management/agents/reset", "POST"),
    ("GET", "/private/agent/take/echo/01ABC", "POST"),
    ("TRACE", "/health", "GET"),                      # typed bad_request before
    ("DELETE", "/api/task/submit", "POST"),
    ("PUT", "/management/tasks/list", "GET"),
])
async def test_a_method_a_route_does_not_take_is_405_with_allow(client, method, path, allowed):
    resp = await client.request(method, path, headers=MGMT_H)
    assert resp.headers["Allow"] == allowed
    message = (await fails(client, method, path, 405, headers=MGMT_H))["error"]["message"]
    assert method in message and allowed in message


async def test_console_files_and_unknown_pages_keep_their_answers(client):
    assert (await client.get("/")).status == 200
    await fails(client, "GET", "/no-such-page", 404)


@pytest.mark.parametrize("tail", ["%ZZ/01ABC", "%E9/01ABC", "echo/%ZZ", "echo/%E9%80", "%/x"])
async def test_undecodable_paths_are_400_alike(client, tail):
    url = URL(str(client.make_url("/api/task/poll/")) + tail, encoded=True)  # sent as written
    resp = await client.session.get(url, headers=CLIENT)
    body = await resp.json()
    assert resp.status == 400 and body["error"]["type"] == "bad_request", body
    assert "surrogate" not in body["error"]["message"]


async def test_a_number_range_prints_plainly(client):
    message = (await fails(client, "POST", "/api/task/submit", 400, headers=CLIENT,
                           json={"capability": "echo", "timeoutSecs": -1}))["error"]["message"]
    assert "from 0.001 to 31622400" in message and "e+" not in message


async def test_invalid_utf8_body_says_utf8_not_surrogates(client):
    message = (await fails(client, "POST", "/api/task/submit", 400, headers=CLIENT,
                           data=b'{"capability": "\xff\xfe"}'))["error"]["message"]
    assert "UTF-8" in message and "surrogate" not in message


async def test_a_non_ascii_credential_is_just_a_wrong_one(client):
    """(Bytes that are not UTF-8 at all need a raw socket: tests/test_e2e_hostile.py.)"""
    await fails(client, "GET", "/management/agents/list", 401,
                headers={"X-Mgmt-Token": "mt-é"})
    await fails(client, "POST", "/api/task/submit", 401,
                headers={"X-API-Key": "ck-ÿ-0123456789abcdef"}, json={"capability": "echo"})


async def test_idempotent_replay_says_it_is_the_earlier_task(client):
    ag = await agent(client)
    headers = {**CLIENT, "Idempotency-Key": "job-1"}
    first = await call(client, "POST", "/api/task/submit", 201, headers=headers, json={"capability": "echo"})
    assert first["message"] == "Added to tasks queue"
    await call(client, "GET", "/private/agent/task/poll?wait=0", headers=ag.h)
    await take(client, ag, first["id"])
    await call(client, "POST", f"/private/agent/task/resolve/{tp(first['id'])}", headers=ag.h,
               json={"id": first["id"]["id"], "status": {"failure": ["boom", 1]}})
    replay = await call(client, "POST", "/api/task/submit", 200, headers=headers, json={"capability": "echo"})
    assert replay["id"] == first["id"] and replay["status"] == "failed"
    assert "Added" not in replay["message"] and "failed" in replay["message"]


# ---------------------------------------------------------------- bodies

async def test_a_broken_gzip_body_is_400(client):
    broken = gzip.compress(json.dumps({"capability": "echo"}).encode())[:-12] + b"garbage!" * 3
    message = (await fails(client, "POST", "/api/task/submit", 400, data=broken, headers={
        **CLIENT, "Content-Encoding": "gzip", "Content-Type": "application/json"}))["error"]["message"]
    assert "gzip" in message
    ok = await client.post("/api/task/submit", headers={**CLIENT, "Content-Encoding": "gzip"},
                           data=gzip.compress(json.dumps({"capability": "echo"}).encode()))
    assert ok.status == 201


async def test_a_wrong_header_credential_is_refused_before_the_body_is_read(client):
    hub = client.server.app[HUB]
    reads = []

    async def body():
        reads.append(1)
        yield b'{"capability": "echo", '
        await asyncio.sleep(30)  # a body that would hold the request this long
        yield b'"payload": 1}'

    resp = await asyncio.wait_for(client.post("/api/task/submit", headers={"X-API-Key": "ck-wrong-guess"},
                                              data=body()), 5)
    assert resp.status == 401
    assert len(hub.broker.tasks) == 0


async def test_past_the_body_budget_a_request_is_503_overloaded(make_client):
    client = await make_client(body_budget_bytes=1000)
    resp = await client.post("/api/task/submit", headers=CLIENT, json={"capability": "echo", "payload": "x" * 2000})
    assert resp.status == 503 and (await resp.json())["error"]["type"] == "overloaded"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    await call(client, "POST", "/api/task/submit", 201, headers=CLIENT,
               json={"capability": "echo", "payload": "x" * 100})  # the budget was given back


# ---------------------------------------------------------------- control characters and logs

@pytest.mark.parametrize("bad", ["echo\nINFO forged", "echo\r", "ec\x00ho", "echo\x1b[31m", "echo\x7f",
                                 "echo\x85", "echo\u2028"])
async def test_control_characters_in_capabilities_are_400(client, bad):
    await fails(client, "POST", "/api/task/submit", 400, headers=CLIENT,
                json={"capability": bad})
    await fails(client, "POST", "/agent/register", 400,
                json={"capabilities": [bad], "apiKey": AGENT_KEY})
    ag = await agent(client)
    await fails(client, "POST", "/private/agent/info/update", 400, headers=ag.h,
                json={"capabilities": ["echo", bad]})
    await fails(client, "POST", "/management/client_api_keys/update", 400, headers=MGMT_H,
                json={"key": "ck-0123456789abcdef", "capabilities": [bad]})


async def test_nothing_sent_forges_a_log_line(client, caplog):
    caplog.set_level(logging.DEBUG, logger="offloadmq")
    await client.post("/api/task/submit", json={"capability": "echo", "apiKey": "x\nWARNING forged line"})
    await client.session.get(URL(str(client.make_url("/management/agents/list%0AWARNING%20forged")), encoded=True),
                             headers={"X-Mgmt-Token": "wrong"})
    await client.session.get(URL(str(client.make_url("/no-page%0AWARNING%20forged")), encoded=True))
    for record in caplog.records:
        assert "\n" not in record.getMessage(), record.getMessage()
    assert "forged line" not in caplog.text  # a key is never logged, escaped or not


# ---------------------------------------------------------------- schema and code agree

async def test_agent_info_nulls_mean_defaults_and_odd_types_are_refused(client):
    ag = await agent(client)
    await call(client, "POST", "/private/agent/info/update", headers=ag.h,
               json={"capabilities": ["echo"], "capacity": None, "tier": None, "systemInfo": None})
    [listed] = await call(client, "GET", "/management/agents/list", headers=MGMT_H)
    assert listed["capacity"] == 1 and listed["tier"] == 0
    for info in ([], False, 0, ""):
        await fails(client, "POST", "/private/agent/info/update", 400, headers=ag.h,
                    json={"capabilities": ["echo"], "systemInfo": info})
    await fails(client, "POST", "/private/agent/info/update", 400, headers=ag.h,
                json={"capabilities": ["echo"], "capacity": 10 ** 30})


def test_document_says_what_the_code_refuses():
    doc = openapi_document(ROUTES)
    schemas = doc["components"]["schemas"]
    assert schemas["AgentInfo"]["properties"]["capacity"]["maximum"] >= 1
    assert schemas["AgentInfo"]["properties"]["systemInfo"]["type"] == ["object", "null"]
    update = doc["paths"]["/management/client_api_keys/update"]["post"]
    key = update["requestBody"]["content"]["application/json"]["schema"]["properties"]["key"]
    assert key["minLength"] == 16 and key["maxLength"] == 512
    submission = json.dumps(schemas["Submission"])
    assert "runAt" in submission and "delaySecs" in submission and '"not"' in submission
    for path in ("/management/agents/rotate_key/{agent_id}", "/private/agent/rotate_key"):
        assert "post" in doc["paths"][path]


# ---------------------------------------------------------------- headers

async def test_every_answer_carries_the_security_headers_and_no_version_banner(client):
    for method, path in (("GET", "/"), ("GET", "/js/app.js"), ("GET", "/health"),
                         ("GET", "/management/agents/list"), ("POST", "/api/task/submit")):
        resp = await client.request(method, path)
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers.get("Server", "OffloadMQ") == "OffloadMQ"


# ---------------------------------------------------------------- authentication failures

async def test_sixty_wrong_keys_from_one_address_get_429_with_retry_after(client):
    statuses = []
    for i in range(80):
        resp = await client.post("/api/task/submit", headers={"X-API-Key": f"ck-guess-{i}"},
                                 json={"capability": "echo"})
        statuses.append(resp.status)
        if resp.status == 429:
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
            assert (await resp.json())["error"]["type"] == "too_many_requests"
            break
    assert statuses[-1] == 429 and statuses.count(401) >= 50, statuses
    # Blocked: the right key too (else a 200 among 429s would tell the right guess).
    resp = await client.post("/api/task/submit", headers=CLIENT, json={"capability": "echo"})
    assert resp.status == 429
    for path, kw in (("/agent/register", {"json": {"capabilities": ["a"], "apiKey": "wrong"}}),
                     ("/agent/auth", {"json": {"agentId": "x", "key": "y"}}),
                     ("/management/agents/list", {"headers": {"X-Mgmt-Token": "wrong"}})):
        assert (await client.request("GET" if "management" in path else "POST", path, **kw)).status == 429


@pytest.mark.parametrize("path, kw", [
    ("/agent/register", {"json": {"capabilities": ["a"], "apiKey": "ak-guess"}}),
    ("/agent/auth", {"json": {"agentId": "01ABC", "key": "guess"}}),
    ("/management/tasks/list", {"headers": {"X-Mgmt-Token": "mt-guess"}}),
])
async def test_every_scheme_is_throttled(client, path, kw):
    method = "GET" if path.startswith("/management") else "POST"
    statuses = [(await client.request(method, path, **kw)).status for _ in range(70)]
    assert 429 in statuses and statuses.index(429) >= 50, statuses


async def test_successes_and_agent_tokens_are_not_counted(client):
    ag = await agent(client)
    for _ in range(100):
        assert (await client.get("/management/agents/list", headers=MGMT_H)).status == 200
        assert (await client.get("/private/agent/ping", headers={"Authorization": "Bearer bad.jwt.x"})).status == 401
    assert (await client.get("/private/agent/ping", headers=ag.h)).status == 200
    await submit(client)


def test_throttle_keeps_other_addresses_apart_and_refills():
    throttle = AuthThrottle(per_min=60)
    for i in range(60):
        assert throttle.wait_s("10.0.0.1", now=i * 0.001) == 0
        throttle.failed("10.0.0.1", now=i * 0.001)
    assert 0 < throttle.wait_s("10.0.0.1", now=0.1) <= 60
    assert throttle.wait_s("10.0.0.2", now=0.1) == 0  # another address is unaffected
    assert throttle.wait_s("10.0.0.1", now=2.0) == 0  # a token back after a second
    for _ in range(1000):  # guesses in flight when the tokens ran out still count...
        throttle.failed("10.0.0.3", now=5.0)
    assert 59 < throttle.wait_s("10.0.0.3", now=5.0) <= 60  # ...but the wait stays within a minute
    # IPv6 counts per /64; an IPv4-mapped address as its IPv4 address.
    assert throttle.address_key("2001:db8::1") == throttle.address_key("2001:db8::ffff") == "2001:db8::/64"
    assert throttle.address_key("::ffff:10.0.0.1") == "10.0.0.1"


def test_throttle_table_is_capped_and_summaries_count_and_forget():
    throttle = AuthThrottle(per_min=60)
    throttle.MAX_ADDRESSES = 100
    for i in range(1000):
        assert throttle.failed(f"10.0.{i // 256}.{i % 256}", now=1.0) is True  # first: log it now
    assert len(throttle.table) == 100
    assert throttle.failed("10.0.3.231", now=1.0) is False  # second: summed up later
    assert ("10.0.3.231", 2) in throttle.summaries(now=2.0)
    assert throttle.summaries(now=200.0) == [] and not throttle.table  # full again: forgotten


async def test_failures_are_logged_without_the_secret(client, caplog):
    caplog.set_level(logging.INFO, logger="offloadmq")
    for _ in range(5):
        await client.get("/management/agents/list", headers={"X-Mgmt-Token": "mt-secret-guess-123"})
    lines = [r.getMessage() for r in caplog.records if "failed authentication" in r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0], lines
    assert "mt-secret-guess-123" not in caplog.text


# ---------------------------------------------------------------- keys

@pytest.mark.parametrize("key", ["short", "ck-" + "a" * 12, "has space 0123456789", "ck/0123456789abcdef",
                                 "ck-0123456789abcdef\n", "k" * 513])
async def test_created_keys_must_be_long_and_plain(client, key):
    message = (await fails(client, "POST", "/management/client_api_keys/update", 400,
                           headers=MGMT_H, json={"key": key, "capabilities": ["*"]}))["error"]["message"]
    assert "16" in message


async def test_a_short_key_set_at_start_can_still_get_a_limit(client):
    saved = await call(client, "POST", "/management/client_api_keys/update", headers=MGMT_H,
                       json={"key": CLIENT_KEY, "capabilities": ["*"], "maxInFlight": 2})
    assert saved["key"] == CLIENT_KEY and saved["isPredefined"] is True and saved["maxInFlight"] == 2


async def test_short_keys_set_at_start_stay_and_are_warned_about(config, caplog):
    caplog.set_level(logging.WARNING, logger="offloadmq")
    warn_short_secrets(config)  # ck-test, ak-test, mt-test: all short
    assert len([r for r in caplog.records if "characters" in r.getMessage()]) == 3
    assert CLIENT_KEY not in caplog.text and MGMT not in caplog.text


async def test_max_queued_bytes_limits_what_a_key_has_queued(client):
    key = "ck-quota-0123456789abcdef"
    saved = await call(client, "POST", "/management/client_api_keys/update", headers=MGMT_H,
                       json={"key": key, "capabilities": ["*"], "maxQueuedBytes": 3000})
    assert saved["maxQueuedBytes"] == 3000
    headers = {"X-API-Key": key}
    first = await submit(client, headers=headers, payload="x" * 1000)
    await submit(client, headers=headers, payload="x" * 1000)
    message = (await fails(client, "POST", "/api/task/submit", 429, headers=headers,
                           json={"capability": "echo", "payload": "x" * 1000}))["error"]["message"]
    assert "maxQueuedBytes is 3000" in message
    await submit(client, payload="x" * 1000)  # another key is not affected
    # An ended task gives its bytes back.
    await call(client, "POST", f"/api/task/cancel/{tp(first)}", headers=headers)
    await submit(client, headers=headers, payload="x" * 1000)
    [listed] = [k for k in await call(client, "GET", "/management/client_api_keys/list", headers=MGMT_H)
                if k["key"] == key]
    assert listed["maxQueuedBytes"] == 3000
    for bad in (0, -1, True, "1", 1 << 60):
        await fails(client, "POST", "/management/client_api_keys/update", 400, headers=MGMT_H,
                    json={"key": key, "capabilities": ["*"], "maxQueuedBytes": bad})


async def test_max_queued_bytes_survives_a_restart(make_client, config):
    key = "ck-quota-0123456789abcdef"
    first = await make_client()
    await call(first, "POST", "/management/client_api_keys/update", headers=MGMT_H,
               json={"key": key, "capabilities": ["*"], "maxQueuedBytes": 1500})
    await submit(first, headers={"X-API-Key": key}, payload="x" * 1000)
    await first.close()
    second = await make_client()
    await fails(second, "POST", "/api/task/submit", 429, headers={"X-API-Key": key},
                json={"capability": "echo", "payload": "x" * 1000})


# ---------------------------------------------------------------- agent credentials

async def test_management_rotation_revokes_the_old_key_and_tokens(make_client):
    client = await make_client()
    ag = await agent(client)
    tid = await submit(client)
    await call(client, "GET", "/private/agent/task/poll?wait=0", headers=ag.h)
    await take(client, ag, tid)
    rotated = await call(client, "POST", f"/management/agents/rotate_key/{ag.uid}", headers=MGMT_H)
    assert rotated["uid"] == ag.uid and rotated["tasksInFlight"] == 1 and "key" not in rotated
    message = (await fails(client, "GET", "/private/agent/ping", 401, headers=ag.h))["error"]["message"]
    assert "revoked" in message
    await fails(client, "POST", "/agent/auth", 401,
                json={"agentId": ag.uid, "key": ag.key})
    await fails(client, "POST", "/management/agents/rotate_key/nope", 404, headers=MGMT_H)
    await fails(client, "POST", f"/management/agents/rotate_key/{ag.uid}", 401)


async def test_a_long_poll_held_across_a_rotation_hands_out_nothing(make_client):
    client = await make_client()
    ag = await agent(client)
    poll = asyncio.ensure_future(call(client, "GET", "/private/agent/task/poll?take=1&wait=5",
                                      headers=ag.h))
    await asyncio.sleep(0.05)  # the poll is waiting
    await call(client, "POST", f"/management/agents/rotate_key/{ag.uid}", headers=MGMT_H)
    tid = await submit(client)
    assert await asyncio.wait_for(poll, 3) is None
    status = await call(client, "GET", f"/api/task/poll/{tp(tid)}", headers=CLIENT)
    assert status["status"] == "pending"


async def test_agent_rotates_its_own_key_and_keeps_its_id_and_tasks_across_a_restart(make_client):
    client = await make_client()
    ag = await agent(client)
    tid = await submit(client)
    await call(client, "GET", "/private/agent/task/poll?wait=0", headers=ag.h)
    await take(client, ag, tid)
    fresh = await call(client, "POST", "/private/agent/rotate_key", headers=ag.h)
    assert fresh["agentId"] == ag.uid and fresh["key"] != ag.key and fresh["expiresIn"] > 0
    new_h = {"Authorization": f"Bearer {fresh['token']}"}
    await fails(client, "GET", "/private/agent/ping", 401, headers=ag.h)
    await call(client, "GET", "/private/agent/ping", headers=new_h)
    await client.server.app[HUB].compact()  # the rotation must survive a snapshot too
    await client.close()

    again = await make_client()  # the snapshot and journal replayed
    await fails(again, "GET", "/private/agent/ping", 401, headers=ag.h)
    await fails(again, "POST", "/agent/auth", 401,
                json={"agentId": ag.uid, "key": ag.key})
    await call(again, "GET", "/private/agent/ping", headers=new_h)
    token = (await call(again, "POST", "/agent/auth", json={"agentId": ag.uid, "key": fresh["key"]}))["token"]
    h = {"Authorization": f"Bearer {token}"}
    await call(again, "POST", f"/private/agent/task/resolve/{tp(tid)}", headers=h,
               json={"id": tid["id"], "status": {"success": 1}})
    status = await call(again, "GET", f"/api/task/poll/{tp(tid)}", headers=CLIENT)
    assert status["status"] == "completed"


async def test_a_token_from_before_the_rotation_fails_even_within_the_same_second(make_client):
    now = [time.time() // 1 - 10 + 0.25]  # pyjwt refuses an iat in its future
    client = await make_client(clock=lambda: now[0])
    ag = await agent(client)
    now[0] += 0.001
    await call(client, "POST", f"/management/agents/rotate_key/{ag.uid}", headers=MGMT_H)
    await fails(client, "GET", "/private/agent/ping", 401, headers=ag.h)
    claims = jwt.decode(ag.token, SECRET, algorithms=["HS256"])
    assert int(claims["iat"]) == int(now[0])  # same second, still refused


async def test_a_token_issued_at_the_very_instant_of_the_rotation_works(make_client):
    now = time.time() // 1 - 10 + 0.1234567  # a clock that does not move, below a microsecond
    client = await make_client(clock=lambda: now)
    ag = await agent(client)
    fresh = await call(client, "POST", "/private/agent/rotate_key", headers=ag.h)
    await call(client, "GET", "/private/agent/ping", headers={"Authorization": f"Bearer {fresh['token']}"})


# ---------------------------------------------------------------- the OpenAPI document, and schemathesis run from it

# Streams never end, so schemathesis cannot judge them; the event stream tests above cover them.
STREAMS = ("/api/task/events", "/management/events")
# These hold the request for `?wait=` seconds (default 20): fuzz them with wait=0.
# Workers stay at 1: hypothesis' lambda descriptions are not thread-safe on Python 3.11.
LONG_POLLS = ("/private/agent/task/poll", "/private/agent/task/poll_urgent",
              "/private/agent/task/cancels", "/api/task/poll/{cap}/{id}")


def test_document_is_valid_openapi_3_1():
    document = openapi_document(ROUTES)
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_document_names_every_route():
    paths = openapi_document(ROUTES)["paths"]
    for method, path, kind, _ in ROUTES:
        if path == "/{path:.*}":  # the console's static files
            continue
        operation = paths[openapi_path(path)][method.lower()]
        if kind != "open":
            assert "401" in operation["responses"], (method, path)
        for status, answer in operation["responses"].items():
            health = status == "503" and path in ("/health", "/api/ping")  # unhealthy: the Health body
            not_ready = status == "503" and path == "/health/ready"  # a standby: the Ready body
            if int(status) >= 400:
                assert answer["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/" + ("Health" if health else "Ready" if not_ready else "Error")}
    assert "507" in paths["/api/task/submit"]["post"]["responses"]
    assert "507" in paths["/private/agent/task/poll"]["get"]["responses"], "?take=1 writes"
    assert "507" not in paths["/private/agent/ping"]["post"]["responses"], "a contact only"


def test_served_document_is_the_built_one(server):
    status, body = http("GET", server.url + "/openapi.json")
    assert status == 200
    assert body == json.loads(json.dumps(openapi_document(ROUTES)))
    assert "/api/task/poll/{cap}/{id}" in body["paths"]
    schemes = body["components"]["securitySchemes"]
    assert schemes["ApiKey"]["name"] == "X-API-Key" and schemes["MgmtToken"]["name"] == "X-Mgmt-Token"
    assert schemes["AgentJWT"]["bearerFormat"] == "JWT"


def agent_token(server) -> str:
    return server.new_agent(["schemathesis.only"])["Authorization"].removeprefix("Bearer ")


def schemathesis_config(server, token: str) -> str:
    long_polls = "\n".join(f"""
[[operations]]
include-path = "{path}"
parameters = {{ "query.wait" = 0 }}
""" for path in LONG_POLLS)
    return f"""
[generation]
max-examples = 8

[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_schema_conformance.enabled = true

[auth.openapi.ApiKey]
api_key = "{server.client_key}"
[auth.openapi.MgmtToken]
api_key = "{server.mgmt_token}"
[auth.openapi.AgentJWT]
bearer = "{token}"
{long_polls}
# The contract's 503 scheduling_impossible (urgent task, no agent online) and 504 timeout
# are answers, not server faults: the only 5xx allowed, and only where documented.
[[operations]]
include-path-regex = "^/api/task/submit"
checks = {{ not_a_server_error = {{ expected-statuses = ["2XX", "4XX", 503, 504] }} }}

# Keep the test agent on a capability fuzzed submissions never name: an urgent task an
# online agent serves would hold submit_blocking for a minute.
[[operations]]
include-path = "/private/agent/info/update"
parameters = {{ "body.capabilities" = ["schemathesis.only"] }}

[[operations]]
include-path = "/agent/register"
parameters = {{ "body.apiKey" = "{server.agent_key}", "body.capabilities" = ["schemathesis.only"] }}
"""


def run_schemathesis(server, config: Path, *filters: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", server.url + "/openapi.json",
               "--phases", "examples,coverage,fuzzing", "--seed", "1", "--request-timeout", "10",
               "--workers", "1", "--no-color",
               *[f"--exclude-path={path}" for path in STREAMS], *filters]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)


def test_schemathesis_finds_no_5xx_and_no_contract_mismatch(server, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(schemathesis_config(server, agent_token(server)))
    # Management resets and deletes would pull the agent and tasks from under the rest,
    # so the management routes run second.
    runs = [run_schemathesis(server, config, "--exclude-path-regex=^/management/"),
            run_schemathesis(server, config, "--include-path-regex=^/management/")]
    for done in runs:
        assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]
    assert "Internal Server Error" not in server.output()
    assert not re.search(r"bug while handling", server.output()), server.output()[-5000:]


class Conformance:
    """Calls the live server and checks each answer against the document's schema for
    its operation and status: the happy paths fuzzing rarely reaches."""

    def __init__(self, server, document):
        from jsonschema import Draft202012Validator
        self.server, self.document, self.validator = server, document, Draft202012Validator
        self.seen = set()

    def __call__(self, method, template, values=None, body=None, headers=None, query="", expect=200):
        path = template.format(**{k: quote(v, safe="") for k, v in (values or {}).items()})
        status, answer = http(method, self.server.url + path + query, body, headers)
        assert status == expect, (method, path, status, answer)
        response = self.document["paths"][template][method.lower()]["responses"][str(status)]
        schema = response["content"]["application/json"]["schema"]
        self.validator({**schema, "components": self.document["components"]}).validate(answer)
        self.seen.add((method, template))
        return answer


def test_happy_paths_answer_the_documented_shapes(server):
    check = Conformance(server, openapi_document(ROUTES))
    client, mgmt = server.client, server.mgmt
    reg = check("POST", "/agent/register", body={"apiKey": server.agent_key, "capabilities": ["a/b"],
                                                 "tier": 1, "capacity": 2, "systemInfo": {"os": "linux"}})
    token = check("POST", "/agent/auth", body={"agentId": reg["agentId"], "key": reg["key"]})["token"]
    agent = {"Authorization": "Bearer " + token}
    check("GET", "/private/agent/ping", headers=agent)
    check("POST", "/private/agent/info/update", headers=agent,
          body={"capabilities": ["a/b"], "tier": 1, "capacity": 2, "systemInfo": {}})
    sub = check("POST", "/api/task/submit", headers={**client, "Idempotency-Key": "k1"}, expect=201,
                body={"capability": "a/b", "payload": {"n": 1}, "priority": 7, "maxRetries": 0})
    check("POST", "/api/task/submit", headers={**client, "Idempotency-Key": "k1"},
          body={"capability": "a/b", "payload": {"n": 1}, "priority": 7, "maxRetries": 0})
    ids = {"cap": sub["id"]["cap"], "id": sub["id"]["id"]}
    check("GET", "/api/task/poll/{cap}/{id}", ids, headers=client)
    check("GET", "/management/tasks/list", headers=mgmt)
    offered = check("GET", "/private/agent/task/poll", headers=agent, query="?wait=0")
    assert offered["id"] == sub["id"]
    check("POST", "/private/agent/take/{cap}/{id}", ids, headers=agent)
    check("GET", "/management/tasks/list", headers=mgmt)
    check("POST", "/private/agent/task/progress/{cap}/{id}", ids, headers=agent,
          body={"id": ids["id"], "stage": "build", "logUpdate": "line\n"})
    check("GET", "/api/task/poll/{cap}/{id}", ids, headers=client)
    check("GET", "/private/agent/task/cancels", headers=agent, query="?wait=0")
    second = check("POST", "/api/task/submit", headers=client, expect=202,
                   body={"capability": "a/b", "urgent": True, "restartable": True})
    done = check("POST", "/private/agent/task/resolve/{cap}/{id}", ids, headers=agent, query="?next=0",
                 body={"id": ids["id"], "capability": "a/b", "status": {"failure": ["boom", 1]},
                       "output": [1, "x"]})
    assert done["next"]["id"] == second["id"]
    check("GET", "/api/task/poll/{cap}/{id}", ids, headers=client)
    check("POST", "/management/tasks/requeue/{cap}/{id}", ids, headers=mgmt)
    check("POST", "/management/tasks/cancel/{cap}/{id}", ids, headers=mgmt)
    check("POST", "/api/task/cancel/{cap}/{id}", {"cap": "a/b", "id": second["id"]["id"]}, headers=client)
    check("POST", "/api/capabilities/online", headers=client, body={})
    for path in ("/management/agents/list", "/management/agents/list/online",
                 "/management/capabilities/list/online", "/management/client_api_keys/list"):
        check("GET", path, headers=mgmt)
    check("POST", "/management/agents/drain/{agent_id}", {"agent_id": reg["agentId"]}, headers=mgmt)
    check("POST", "/management/agents/resume/{agent_id}", {"agent_id": reg["agentId"]}, headers=mgmt)
    check("POST", "/management/client_api_keys/update", headers=mgmt,
          body={"key": "ck-extra-0123456789abcdef", "capabilities": ["llm.*"], "maxInFlight": 3})
    check("POST", "/management/client_api_keys/revoke/{key}", {"key": "ck-extra-0123456789abcdef"}, headers=mgmt)
    for path in ("/health", "/stats", "/api/ping"):
        check("GET", path)
    check("GET", "/api/task/poll/{cap}/{id}", {"cap": "a/b", "id": "nope"}, headers=client, expect=404)
    check("POST", "/api/task/submit", body={"capability": "a/b"}, expect=401)
    check("POST", "/management/agents/delete/{agent_id}", {"agent_id": reg["agentId"]}, headers=mgmt)
    check("POST", "/management/tasks/reset", headers=mgmt)
    check("POST", "/management/agents/reset", headers=mgmt)
    assert len(check.seen) >= 30
