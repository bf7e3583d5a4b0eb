"""Lifecycle extensions over HTTP: cancel, cancel long poll, dead letters, drain, limits."""
import asyncio

import pytest

from offloadmq import Config, create_app

CLIENT = {"X-API-Key": "ck"}
MGMT = {"X-Mgmt-Token": "mt"}


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    config = Config(data_path=tmp_path, jwt_secret="s" * 32, agent_api_keys=("ak",),
                    client_api_keys=("ck",), mgmt_token="mt")
    return await aiohttp_client(create_app(config))


async def new_agent(client, capacity=1):
    resp = await client.post("/agent/register", json={
        "apiKey": "ak", "capabilities": ["job"], "tier": 0, "capacity": capacity, "systemInfo": {}})
    reg = await resp.json()
    resp = await client.post("/agent/auth", json={"agentId": reg["agentId"], "key": reg["key"]})
    return {"Authorization": "Bearer " + (await resp.json())["token"]}, reg["agentId"]


async def submit(client, headers=CLIENT, expect=201, **fields):
    resp = await client.post("/api/task/submit", json={"capability": "job", **fields}, headers=headers)
    body = await resp.json()
    assert resp.status == expect, body
    return body.get("id", body)


async def status_of(client, task_id):
    resp = await client.get(f"/api/task/poll/job/{task_id['id']}", headers=CLIENT)
    return (await resp.json())["status"]


def assert_error(resp_status, body, status, error_type):
    assert resp_status == status
    assert body["error"]["status"] == status and body["error"]["type"] == error_type
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_client_cancels_a_queued_task(client):
    task_id = await submit(client)
    resp = await client.post(f"/api/task/cancel/job/{task_id['id']}", headers=CLIENT)
    assert resp.status == 200 and (await resp.json())["status"] == "canceled"
    resp = await client.post(f"/api/task/cancel/job/{task_id['id']}", headers=CLIENT)
    assert_error(resp.status, await resp.json(), 409, "conflict")


async def test_cancel_needs_the_owning_key(client):
    await client.post("/management/client_api_keys/update", headers=MGMT,
                      json={"key": "other", "capabilities": ["*"]})
    task_id = await submit(client)
    resp = await client.post(f"/api/task/cancel/job/{task_id['id']}", headers={"X-API-Key": "other"})
    assert_error(resp.status, await resp.json(), 404, "not_found")
    resp = await client.post(f"/api/task/cancel/job/{task_id['id']}")
    assert_error(resp.status, await resp.json(), 401, "authentication_error")


async def test_running_task_cancel_reaches_the_agent_by_long_poll_and_progress(client):
    agent, _ = await new_agent(client)
    task_id = await submit(client)
    await client.get("/private/agent/task/poll?take=1", headers=agent)
    waiting = asyncio.ensure_future(client.get("/private/agent/task/cancels?wait=5", headers=agent))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    resp = await client.post(f"/management/tasks/cancel/job/{task_id['id']}", headers=MGMT)
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
    agent, _ = await new_agent(client)
    resp = await client.get("/private/agent/task/cancels?wait=0.2", headers=agent)
    assert await resp.json() == []


async def test_dead_letter_listing_and_requeue(client):
    agent, _ = await new_agent(client)
    task_id = await submit(client)
    await client.get("/private/agent/task/poll?take=1", headers=agent)
    await client.post(f"/private/agent/task/resolve/job/{task_id['id']}", headers=agent,
                      json={"id": task_id, "status": {"failure": ["boom", 0.1]}, "output": None})
    resp = await client.get("/management/tasks/list?status=failed", headers=MGMT)
    listing = await resp.json()
    assert [t["id"] for t in listing["regular"]["assigned"]] == [task_id]
    resp = await client.get("/management/tasks/list?status=bogus", headers=MGMT)
    assert_error(resp.status, await resp.json(), 400, "bad_request")
    resp = await client.post(f"/management/tasks/requeue/job/{task_id['id']}", headers=MGMT)
    assert resp.status == 200 and (await resp.json())["status"] == "pending"
    resp = await client.post(f"/management/tasks/requeue/job/{task_id['id']}", headers=MGMT)
    assert_error(resp.status, await resp.json(), 409, "conflict")
    resp = await client.post("/management/tasks/requeue/job/NOPE", headers=MGMT)
    assert_error(resp.status, await resp.json(), 404, "not_found")


async def test_drain_and_resume(client):
    agent, uid = await new_agent(client)
    await submit(client)
    resp = await client.post(f"/management/agents/drain/{uid}", headers=MGMT)
    assert (await resp.json())["draining"] is True
    resp = await client.get("/private/agent/task/poll?wait=0", headers=agent)
    assert await resp.json() is None
    listed = await (await client.get("/management/agents/list", headers=MGMT)).json()
    assert listed[0]["draining"] is True
    resp = await client.post(f"/management/agents/resume/{uid}", headers=MGMT)
    assert (await resp.json())["draining"] is False
    resp = await client.get("/private/agent/task/poll?wait=0", headers=agent)
    assert (await resp.json())["data"]["capability"] == "job"
    resp = await client.post("/management/agents/drain/NOPE", headers=MGMT)
    assert_error(resp.status, await resp.json(), 404, "not_found")


async def test_max_in_flight_answers_429(client):
    resp = await client.post("/management/client_api_keys/update", headers=MGMT,
                             json={"key": "small", "capabilities": ["job"], "maxInFlight": 1})
    assert (await resp.json())["maxInFlight"] == 1
    small = {"X-API-Key": "small"}
    await submit(client, headers=small)
    body = await submit(client, headers=small, expect=429)
    assert body["error"]["type"] == "too_many_requests" and body["error"]["status"] == 429
    resp = await client.post("/management/client_api_keys/update", headers=MGMT,
                             json={"key": "small", "capabilities": ["job"], "maxInFlight": 0})
    assert_error(resp.status, await resp.json(), 400, "bad_request")


@pytest.mark.parametrize("fields", [
    {"priority": 11}, {"priority": True}, {"maxRetries": -1}, {"retryDelaySecs": "soon"},
    {"delaySecs": -5}, {"runAt": "not a time"}, {"maxWaitSecs": 0}, {"retryOnSameNode": "no"},
])
async def test_bad_lifecycle_fields_are_rejected(client, fields):
    body = await submit(client, expect=400, **fields)
    assert body["error"]["type"] == "bad_request"


async def test_delayed_task_is_held_back_over_http(client):
    agent, _ = await new_agent(client)
    task_id = await submit(client, delaySecs=3600, priority=7)
    resp = await client.get("/private/agent/task/poll?wait=0", headers=agent)
    assert await resp.json() is None
    resp = await client.post(f"/private/agent/take/job/{task_id['id']}", headers=agent)
    assert_error(resp.status, await resp.json(), 409, "conflict")
