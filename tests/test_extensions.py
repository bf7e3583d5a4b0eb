"""Extensions next to the original two-step protocol: claim-on-poll and resolve-with-next."""
import asyncio
import time

import pytest

from offloadmq import Config, create_app


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    config = Config(data_path=tmp_path, jwt_secret="s" * 32, agent_api_keys=("ak",),
                    client_api_keys=("ck",), mgmt_token="mt")
    return await aiohttp_client(create_app(config))


async def new_agent(client, caps=("debug.echo",), capacity=1):
    resp = await client.post("/agent/register", json={
        "apiKey": "ak", "capabilities": list(caps), "tier": 0, "capacity": capacity, "systemInfo": {}})
    reg = await resp.json()
    resp = await client.post("/agent/auth", json={"agentId": reg["agentId"], "key": reg["key"]})
    return {"Authorization": "Bearer " + (await resp.json())["token"]}, reg["agentId"]


async def submit(client, payload, cap="debug.echo"):
    resp = await client.post("/api/task/submit", json={"capability": cap, "payload": payload},
                             headers={"X-API-Key": "ck"})
    assert resp.status == 201
    return (await resp.json())["id"]


def resolve_body(task_id, output):
    return {"id": task_id, "capability": task_id["cap"], "status": {"success": 0.01}, "output": output}


async def test_poll_with_take_assigns_and_answers_the_assigned_task(client):
    agent, uid = await new_agent(client)
    task_id = await submit(client, {"n": 1})
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
    agent, _ = await new_agent(client)
    started = time.monotonic()
    resp = await client.get("/private/agent/task/poll?wait=0.3&take=true", headers=agent)
    assert await resp.json() is None
    assert 0.25 <= time.monotonic() - started < 2


async def test_resolve_with_next_hands_over_the_next_task_in_the_same_answer(client):
    agent, uid = await new_agent(client)
    first, second = await submit(client, {"n": 1}), await submit(client, {"n": 2})
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
    poll = await client.get(f"/api/task/poll/debug.echo/{first['id']}", headers={"X-API-Key": "ck"})
    assert (await poll.json())["output"] == "one"


async def test_resolve_with_next_waits_for_a_task_submitted_later(client):
    agent, _ = await new_agent(client)
    first = await submit(client, 1)
    await client.get("/private/agent/task/poll?take=1", headers=agent)
    waiting = asyncio.ensure_future(client.post(
        f"/private/agent/task/resolve/debug.echo/{first['id']}?next=5",
        json=resolve_body(first, 1), headers=agent))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    later = await submit(client, 2)
    body = await (await waiting).json()
    assert body["next"]["id"] == later


@pytest.mark.parametrize("query", ["take=maybe", "next=-1", "next=61", "next=soon"])
async def test_bad_extension_parameters_are_rejected_before_any_change(client, query):
    agent, _ = await new_agent(client)
    task_id = await submit(client, 1)
    await client.get("/private/agent/task/poll?take=1&wait=0", headers=agent)
    path = ("/private/agent/task/poll?" if query.startswith("take") else
            f"/private/agent/task/resolve/debug.echo/{task_id['id']}?")
    resp = await client.post(path + query, json=resolve_body(task_id, 1), headers=agent)
    body = await resp.json()
    assert resp.status == 400 and body["error"]["type"] == "bad_request"
    status = await client.get(f"/api/task/poll/debug.echo/{task_id['id']}", headers={"X-API-Key": "ck"})
    assert (await status.json())["status"] == "assigned"


async def test_a_waiting_take_shares_the_submits_fdatasync_and_follows_it_on_disk(client, tmp_path):
    """The agent's long poll wakes before the submit reaches the disk, so its take joins
    the same write; its answer still waits for that write, which holds both records."""
    from offloadmq import HUB, decode_record
    agent, uid = await new_agent(client)
    journal = client.server.app[HUB].journal
    poll = asyncio.ensure_future(client.get("/private/agent/task/poll?wait=5&take=1", headers=agent))
    await asyncio.sleep(0.2)  # the poll is waiting
    syncs_before = sum(journal.fsync_seconds.counts)
    submitted = await client.post("/api/task/submit", json={"capability": "debug.echo", "payload": 1},
                                  headers={"X-API-Key": "ck"})
    answer = await submitted.json()
    task_id = answer["id"]
    assert answer["status"] == "pending", "answered as submitted, though the agent has it already"
    resp = await poll
    assert (await resp.json())["id"] == task_id
    assert sum(journal.fsync_seconds.counts) - syncs_before == 1, "one fdatasync for both records"
    ops = [decode_record(line)["op"] for line in (tmp_path / "journal.jsonl").read_bytes().splitlines()]
    assert ops[-2:] == ["task.submitted", "task.assigned"]
