"""The agent WebSocket (`GET /private/agent/ws?token=<JWT>`): every frame type, pushes
under the scheduler's rules, supersede, disconnect, cancels, bad frames; and the
original's own WebSocket tests, run unchanged against our server."""
import ast
import asyncio
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import CLIENT, MGMT, ROOT, call, fails, new_agent, submit

REQ_IDS = itertools.count(1)


class WsAgent:
    """An agent on the socket, as a test drives it: frames it did not ask for yet wait in
    `inbox` until a test looks for them."""

    def __init__(self, ws, handle):
        self.ws, self.handle, self.inbox = ws, handle, []

    async def frame(self, match, timeout=5.0):
        for i, frame in enumerate(self.inbox):
            if match(frame):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no such frame; got {self.inbox}"
            msg = await self.ws.receive(timeout=left)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            frame = msg.json()
            if match(frame):
                return frame
            self.inbox.append(frame)

    async def pushed(self, kind="task", timeout=5.0):
        return await self.frame(lambda f: f.get("type") == kind, timeout)

    async def nothing_pushed(self, kind="task", wait=0.3):
        with pytest.raises((AssertionError, asyncio.TimeoutError, TimeoutError)):
            await self.pushed(kind, wait)

    async def request(self, action, params=None, **frame):
        req_id = f"r{next(REQ_IDS)}"
        await self.ws.send_json({"req_id": req_id, "action": action, "params": params, **frame})
        return await self.frame(lambda f: f.get("req_id") == req_id)

    async def ok(self, action, params=None):
        answer = await self.request(action, params)
        assert answer["type"] == "response" and answer["status"] == 200, answer
        return answer["data"]


async def connect(client, handle=None, **agent):
    handle = handle or await new_agent(client, **agent)
    ws = await client.ws_connect(f"/private/agent/ws?token={handle.token}")
    sock = WsAgent(ws, handle)
    hello = await sock.pushed("connected")
    assert hello["agentId"] == hello["agent_id"] == handle.uid
    return sock


def resolve_params(task_id, status=None):
    return {"id": task_id, "capability": task_id["cap"], "status": status or {"success": 0.1},
            "output": {"ok": True}}


async def status_of(client, task_id):
    return (await call(client, "GET", f"/api/task/poll/{task_id['cap']}/{task_id['id']}",
                       headers=CLIENT))["status"]


# ---------------------------------------------------------------- refusals before the upgrade

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


async def test_bad_token_is_refused_before_the_upgrade_with_the_error_body(client):
    for query in ("", "?token=", "?token=not.a.jwt"):
        body = await fails(client, "GET", "/private/agent/ws" + query, 401, headers=UPGRADE)
        assert "token" in body["error"]["message"]
    gone = await new_agent(client)
    await call(client, "POST", f"/management/agents/delete/{gone.uid}", headers=MGMT)
    await fails(client, "GET", f"/private/agent/ws?token={gone.token}", 401, headers=UPGRADE)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/private/agent/ws?token=forged")
    assert refused.value.status == 401


async def test_a_plain_get_is_told_to_upgrade(client):
    agent = await new_agent(client)
    body = await fails(client, "GET", f"/private/agent/ws?token={agent.token}", 400)
    assert "upgrade" in body["error"]["message"].lower()


# ---------------------------------------------------------------- server -> agent frames

async def test_heartbeat_frames_count_up_with_a_timestamp(make_client):
    client = await make_client(ws_heartbeat_min_s=0.05, ws_heartbeat_max_s=0.1)
    sock = await connect(client)
    first, second = await sock.pushed("heartbeat"), await sock.pushed("heartbeat")
    assert (first["counter"], second["counter"]) == (1, 2)
    assert first["timestamp"].endswith("Z")


async def test_queued_task_is_pushed_on_connect_and_resolved_over_the_socket(client):
    task_id = await submit(client, "echo", payload={"n": 1})
    sock = await connect(client)
    push = await sock.pushed()
    assert push["task"]["id"] == task_id and push["task"]["status"] == "assigned"
    assert push["task"]["agentId"] == sock.handle.uid and push["task"]["data"]["payload"] == {"n": 1}
    answer = await sock.ok("update_progress", {"id": task_id, "stage": "work", "logUpdate": "line\n"})
    assert answer == {"message": "task update confirmed"}
    assert await status_of(client, task_id) == "running"
    assert await sock.ok("resolve_task", resolve_params(task_id)) == {"message": "task report confirmed"}
    done = await call(client, "GET", f"/api/task/poll/{task_id['cap']}/{task_id['id']}", headers=CLIENT)
    assert done["status"] == "completed" and done["output"] == {"ok": True} and done["log"] == "line\n"


async def test_a_task_submitted_later_is_pushed_at_once(client):
    sock = await connect(client)
    task_id = await submit(client, "echo")
    assert (await sock.pushed())["task"]["id"] == task_id


async def test_push_never_exceeds_capacity_and_resumes_as_slots_free(client):
    sock = await connect(client, capacity=2)
    ids = [await submit(client, "echo", payload={"n": n}) for n in range(3)]
    got = [(await sock.pushed())["task"]["id"] for _ in range(2)]
    assert got == ids[:2]
    await sock.nothing_pushed()
    await sock.ok("resolve_task", resolve_params(got[0]))
    assert (await sock.pushed())["task"]["id"] == ids[2]


async def test_a_higher_tier_socket_gets_the_task_and_a_lower_tier_poller_spills_over(client):
    high = await connect(client, tier=5)
    low = await new_agent(client, tier=1)
    first = await submit(client, "echo")
    assert (await high.pushed())["task"]["id"] == first
    second = await submit(client, "echo")  # the high tier is full now: spill-over
    polled = await call(client, "GET", "/private/agent/task/poll?wait=5&take=1", headers=low.h)
    assert polled["id"] == second


async def test_socket_and_polling_agents_serve_the_same_queue_side_by_side(client):
    sock = await connect(client)
    poller = await new_agent(client)
    ids = {(await submit(client, "echo"))["id"] for _ in range(2)}
    pushed = (await sock.pushed())["task"]["id"]["id"]
    polled = (await call(client, "GET", "/private/agent/task/poll?wait=5&take=1", headers=poller.h))["id"]["id"]
    assert {pushed, polled} == ids


async def test_a_draining_agent_gets_no_push_until_resumed(client):
    sock = await connect(client)
    await call(client, "POST", f"/management/agents/drain/{sock.handle.uid}", headers=MGMT)
    task_id = await submit(client, "echo")
    await sock.nothing_pushed()
    await call(client, "POST", f"/management/agents/resume/{sock.handle.uid}", headers=MGMT)
    await submit(client, "echo")  # a change wakes the pusher
    assert (await sock.pushed())["task"]["id"] == task_id


async def test_a_failed_restartable_task_is_retried_to_the_socket(client):
    sock = await connect(client)
    task_id = await submit(client, "echo", restartable=True, retryDelaySecs=0)
    await sock.pushed()
    await sock.ok("resolve_task", resolve_params(task_id, {"failure": ["boom", 0.1]}))
    again = await sock.pushed()
    assert again["task"]["id"] == task_id and again["task"]["attempt"] == 2


async def test_cancel_is_pushed_to_the_agent_holding_the_task(client):
    sock = await connect(client)
    task_id = await submit(client, "echo")
    await sock.pushed()
    await sock.ok("update_progress", {"id": task_id, "stage": "running"})
    await call(client, "POST", f"/api/task/cancel/{task_id['cap']}/{task_id['id']}", headers=CLIENT)
    assert (await sock.pushed("cancel"))["taskId"] == task_id
    answer = await sock.ok("update_progress", {"id": task_id, "logUpdate": "stopping\n"})
    assert answer["cancel"] is True
    await sock.ok("resolve_task", resolve_params(task_id, {"failure": ["canceled", 0.1]}))
    assert await status_of(client, task_id) == "canceled"


async def test_a_cancel_asked_while_away_is_pushed_on_reconnect(client):
    sock = await connect(client)
    task_id = await submit(client, "echo")
    await sock.pushed()
    await sock.ok("update_progress", {"id": task_id, "stage": "running"})
    await sock.ws.close()
    await call(client, "POST", f"/api/task/cancel/{task_id['cap']}/{task_id['id']}", headers=CLIENT)
    again = await connect(client, sock.handle)
    assert (await again.pushed("cancel"))["taskId"] == task_id


# ---------------------------------------------------------------- agent -> server requests

async def test_heartbeat_and_ping_answer_health_and_the_holding_report_releases(make_client):
    now = [time.time()]
    client = await make_client(clock=lambda: now[0])
    sock = await connect(client)
    assert (await sock.ok("heartbeat"))["status"] == "healthy"
    assert (await sock.ok("ping"))["status"] == "healthy"
    task_id = await submit(client, "echo")
    await sock.pushed()
    now[0] += 30  # past the holding report's grace
    answer = await sock.ok("heartbeat", {"holding": []})
    assert answer["released"] == [task_id]


async def test_legacy_pull_actions_answer_as_their_http_routes(client):
    sock = await connect(client)
    assert await sock.ok("poll_task", {"wait": 0}) is None
    assert await sock.ok("poll_task_urgent") is None
    later = await submit(client, "echo", delaySecs=600)
    refused = await sock.request("take_task", {"id": later})
    assert refused["type"] == "error" and refused["status"] == 409
    assert refused["error"]["type"] == "conflict"
    missing = await sock.request("take_task", {"id": {"cap": "echo", "id": "nope"}})
    assert missing["status"] == 404


async def test_get_and_post_reach_the_agent_routes(client):
    sock = await connect(client)
    assert (await sock.ok("get", {"path": ["ping"]}))["status"] == "healthy"
    info = {"capabilities": ["echo", "other"], "tier": 2, "capacity": 3, "systemInfo": {}}
    updated = await sock.ok("post", {"path": ["info", "update"], "body": info})
    assert updated == {"agentId": sock.handle.uid, "key": sock.handle.key, "message": "Updated"}
    assert (await sock.ok("get", {"path": "task/cancels", "query": {"wait": 0}})) == []
    unknown = await sock.request("post", {"path": ["no", "such"]})
    assert unknown["type"] == "error" and unknown["status"] in (404, 405)
    itself = await sock.request("get", {"path": ["ws"]})
    assert itself["status"] == 400


async def test_upload_file_answers_after_its_binary_frame(client):
    sock = await connect(client)
    await sock.ws.send_json({"req_id": "up1", "action": "upload_file",
                             "params": {"bucket_uid": "b1", "filename": "out.txt"}})
    await sock.ws.send_bytes(b"file content")
    answer = await sock.frame(lambda f: f.get("req_id") == "up1")
    assert answer["type"] == "error" and answer["status"] == 404  # no task of its names b1
    assert "bucket" in answer["error"]["message"]
    await sock.ws.send_bytes(b"stray")
    stray = await sock.frame(lambda f: f.get("type") == "error")
    assert stray["req_id"] is None and stray["status"] == 400
    assert (await sock.ok("ping"))["status"] == "healthy"


# ---------------------------------------------------------------- bad frames

async def test_malformed_frames_get_error_envelopes_and_the_socket_stays_open(client):
    sock = await connect(client)
    for text in ("{not json", "[1, 2]", '"text"', '{"req_id": "x"}', '{"action": 5}'):
        await sock.ws.send_str(text)
        error = await sock.frame(lambda f: f.get("type") == "error")
        assert error["status"] == 400 and error["error"]["type"] == "bad_request", (text, error)
    unknown = await sock.request("fly")
    assert unknown["status"] == 400 and "unknown action" in unknown["error"]["message"]
    bad_params = await sock.request("resolve_task", [1])
    assert bad_params["status"] == 400
    no_id = await sock.request("update_progress", {"stage": "x"})
    assert no_id["status"] == 400
    foreign = await sock.request("resolve_task", resolve_params({"cap": "echo", "id": "nope"}))
    assert foreign["status"] == 404
    assert not sock.ws.closed
    assert (await sock.ok("ping"))["status"] == "healthy"


async def test_requests_in_flight_are_bounded_per_socket(client):
    sock = await connect(client)
    for n in range(70):  # long polls that hold: the first 64 stay in flight
        await sock.ws.send_json({"req_id": n, "action": "poll_task", "params": {"wait": 30}})
    refused = [await sock.frame(lambda f: f.get("type") == "error") for _ in range(6)]
    assert {f["req_id"] for f in refused} == set(range(64, 70))
    assert all(f["status"] == 503 and f["error"]["type"] == "overloaded" for f in refused)
    assert not sock.ws.closed


async def test_a_frame_over_the_size_limit_closes_the_socket_with_1009(make_client):
    client = await make_client(max_body_bytes=4096)
    sock = await connect(client)
    await sock.ws.send_str('{"req_id": 1, "action": "ping", "params": {"pad": "' + "x" * 8192 + '"}}')
    msg = await sock.ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009


# ---------------------------------------------------------------- supersede and disconnect

async def test_a_new_socket_replaces_the_old_and_gets_its_unstarted_tasks(client):
    old = await connect(client)
    task_id = await submit(client, "echo")
    await old.pushed()
    new = await connect(client, old.handle)
    closed = await old.ws.receive(timeout=5)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4000
    assert (await new.pushed())["task"]["id"] == task_id
    await new.ok("resolve_task", resolve_params(task_id))
    assert await status_of(client, task_id) == "completed"


async def test_a_dropped_socket_requeues_unstarted_tasks_and_keeps_started_ones(client):
    sock = await connect(client, capacity=2)
    started, unstarted = await submit(client, "echo"), await submit(client, "echo")
    await sock.pushed(), await sock.pushed()
    await sock.ok("update_progress", {"id": started, "stage": "running"})
    await sock.ws.close()
    other = await connect(client)
    assert (await other.pushed())["task"]["id"] == unstarted
    assert await status_of(client, started) == "running"
    back = await connect(client, sock.handle)
    await back.nothing_pushed()  # the started task is not handed out again
    await back.ok("resolve_task", resolve_params(started))
    assert await status_of(client, started) == "completed"


async def test_a_deleted_agent_loses_its_socket(client):
    sock = await connect(client)
    await call(client, "POST", f"/management/agents/delete/{sock.handle.uid}", headers=MGMT)
    msg = await sock.ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE


async def test_an_unstarted_task_whose_cancel_was_asked_ends_canceled_when_the_socket_drops(client):
    sock = await connect(client)
    task_id = await submit(client, "echo")
    await sock.pushed()
    await call(client, "POST", f"/api/task/cancel/{task_id['cap']}/{task_id['id']}", headers=CLIENT)
    await sock.pushed("cancel")
    await sock.ws.close()
    for _ in range(50):
        if await status_of(client, task_id) == "canceled":
            break
        await asyncio.sleep(0.05)
    assert await status_of(client, task_id) == "canceled"


# ---------------------------------------------------------------- the original's own tests

REFERENCE_FILES = ("test_websocket.py", "test_websocket_push.py")


def reference_folder() -> Path | None:
    """The original's reference material, if this checkout sits next to it."""
    given = os.environ.get("OFFLOADMQ_REFERENCE_DIR")
    candidates = [Path(given)] if given else [
        parent / "shared" / "reference" / "offloadmq-head" for parent in ROOT.parents]
    for folder in candidates:
        if all((folder / name).is_file() for name in REFERENCE_FILES):
            return folder
    return None


def module_constant(path: Path, name: str) -> str:
    """A string constant of the original's test module (the keys it registers with)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return node.value.value
    raise LookupError(name)


@pytest.mark.skipif(reference_folder() is None, reason="the original's reference tests are not next to this checkout")
def test_the_originals_websocket_tests_pass_unchanged(make_server, tmp_path):
    folder = reference_folder()
    push_tests = folder / "test_websocket_push.py"
    server = make_server(extra_env={
        # The original's test harness starts its server with these heartbeat bounds.
        "AGENT_WS_HEARTBEAT_MIN_SECS": "2", "AGENT_WS_HEARTBEAT_MAX_SECS": "3"})
    server.port, server.url = 3069, "http://127.0.0.1:3069"  # the tests name this port
    server.agent_key = module_constant(push_tests, "AGENT_API_KEY")
    server.client_key = module_constant(push_tests, "CLIENT_API_KEY")
    server.start()
    try:
        (tmp_path / "pytest.ini").write_text("[pytest]\n")
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
             "--rootdir", str(tmp_path), *(str(folder / name) for name in REFERENCE_FILES)],
            cwd=tmp_path, capture_output=True, text=True, timeout=180,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "8 passed" in done.stdout, done.stdout[-3000:]


async def test_a_rotated_credential_closes_the_socket_it_opened(client):
    sock = await connect(client)
    await call(client, "POST", f"/management/agents/rotate_key/{sock.handle.uid}", headers=MGMT)
    msg = await sock.ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4001
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(f"/private/agent/ws?token={sock.handle.token}")
    assert refused.value.status == 401
