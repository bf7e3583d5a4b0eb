"""Interfaces: Server-Sent Events, Idempotency-Key, client keys as Bearer, /metrics."""
import asyncio
import json

import pytest

from conftest import http
from offloadmq import Config, create_app

CLIENT = {"X-API-Key": "ck"}
MGMT = {"X-Mgmt-Token": "mt"}


def config_for(tmp_path, **changes):
    return Config(data_path=tmp_path, jwt_secret="s" * 32, agent_api_keys=("ak",),
                  client_api_keys=("ck",), mgmt_token="mt", **changes)


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    return await aiohttp_client(create_app(config_for(tmp_path)))


async def new_agent(client, caps=("job",)):
    resp = await client.post("/agent/register", json={
        "apiKey": "ak", "capabilities": list(caps), "tier": 0, "capacity": 1, "systemInfo": {}})
    reg = await resp.json()
    resp = await client.post("/agent/auth", json={"agentId": reg["agentId"], "key": reg["key"]})
    return {"Authorization": "Bearer " + (await resp.json())["token"]}


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
    agent = await new_agent(client)
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
    rest = await read_events(resumed, 2)
    assert [int(e["id"]) for e in rest] == [int(first[0]["id"]) + 1, int(first[0]["id"]) + 2]
    resumed.close()


async def test_events_show_only_the_keys_own_tasks_and_named_ones(client):
    await client.post("/management/client_api_keys/update", headers=MGMT,
                      json={"key": "other", "capabilities": ["*"]})
    mine = await (await client.post("/api/task/submit", json={"capability": "job"}, headers=CLIENT)).json()
    theirs = await (await client.post("/api/task/submit", json={"capability": "job"},
                                      headers={"X-API-Key": "other"})).json()
    # Without Last-Event-ID a stream starts with the current state of the visible tasks.
    stream = await client.get("/api/task/events", headers=CLIENT)
    events = await read_events(stream, 1)
    assert [e["data"]["id"] for e in events] == [mine["id"]]
    stream.close()
    name = f"job/{theirs['id']['id']}"
    resp = await client.get(f"/api/task/events?task={name}", headers=CLIENT)
    assert resp.status == 404
    mgmt = await client.get(f"/management/events?task={name}", headers=MGMT)
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
    stream = await client.get("/management/events", headers=MGMT)
    await new_agent(client)
    events = await read_events(stream, 1)
    assert events[0]["event"] == "agent" and events[0]["data"]["op"] == "agent.registered"
    stream.close()


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
    listing = await (await client.get("/management/tasks/list", headers=MGMT)).json()
    assert len(listing["regular"]["unassigned"]) == 1


async def test_idempotency_keys_are_per_client_key(client):
    await client.post("/management/client_api_keys/update", headers=MGMT,
                      json={"key": "other", "capabilities": ["*"]})
    body = {"capability": "job"}
    a = await client.post("/api/task/submit", json=body, headers={**CLIENT, "Idempotency-Key": "k"})
    b = await client.post("/api/task/submit", json=body, headers={"X-API-Key": "other", "Idempotency-Key": "k"})
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
                             headers={"Authorization": "Bearer ck"})
    assert resp.status == 201
    resp = await client.post("/api/task/submit", json={"capability": "job"},
                             headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401


async def test_metrics_need_the_token_and_count_tasks(client):
    resp = await client.get("/metrics")
    assert resp.status == 401
    agent = await new_agent(client)
    task_id = (await (await client.post("/api/task/submit", json={"capability": "job"}, headers=CLIENT)).json())["id"]
    await client.post("/api/task/submit", json={"capability": "nobody.serves"}, headers=CLIENT)
    await client.get("/private/agent/task/poll?take=1", headers=agent)
    await client.post(f"/private/agent/task/resolve/job/{task_id['id']}", headers=agent,
                      json={"id": task_id, "status": {"success": 1}, "output": None})
    text = await (await client.get("/metrics", headers=MGMT)).text()
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
    client = await aiohttp_client(create_app(config_for(tmp_path, metrics_public=True)))
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
    assert log.bytes <= 2000 and sum(len(e.data) for e in log.ring) == log.bytes
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
