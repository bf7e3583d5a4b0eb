"""File buckets: the core's bucket records (replay equals live), every storage route
in-process (ownership, quotas, sizes, hostile names, a file lost behind the server's
back), the agent's routes and its socket's upload_file, reaping; and with real
processes: a 200 MB upload against a bounded RSS, a full disk, kill -9, and a real
agent that reads an input file and writes an output file."""
import asyncio
import hashlib
from http.client import HTTPConnection
import json
import os
import resource
import threading
import time
from pathlib import Path

import aiohttp
import aiohttp.web
import pytest

from conftest import (CLIENT, MGMT, OWNER, T0, call, claim, core_agent, core_submit,
                      fails, http, new_agent, recorded, submit, take_records)
from offloadmq import (HUB, MGMT_OWNER, Broker, Conflict, Forbidden, NotFound, PayloadTooLarge,
                       TooManyRequests, check_file_name, parse_submission)
import offload_agent
from test_agent import failure_message, http_session, make_run, run_task  # noqa: F401 (fixtures)

MB = 1 << 20


# ---------------------------------------------------------------- helpers

def multipart(filename, content: bytes, field="file", boundary="XyZ-boundary", disposition=None):
    """A multipart/form-data body written by hand: the file name reaches the server exactly
    as given (aiohttp's FormData would percent-encode it)."""
    disposition = disposition or f'form-data; name="{field}"; filename="{filename}"'
    body = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def create_bucket(client, headers=CLIENT, status=201, **body):
    answer = await call(client, "POST", "/api/storage/bucket/create", status, headers=headers, json=body)
    return answer["bucket_uid"] if status == 201 else answer


async def upload(client, bucket_uid, name="in.txt", content=b"hello", headers=CLIENT, status=201,
                 route="/api/storage/bucket/{}/upload"):
    body, content_type = multipart(name, content)
    return await call(client, "POST", route.format(bucket_uid), status, data=body,
                      headers={**headers, **content_type})


async def second_key(client) -> dict:
    key = "ck-second-key-0123456789"
    await call(client, "POST", "/management/client_api_keys/update", headers=MGMT,
               json={"key": key, "capabilities": ["*"]})
    return {"X-API-Key": key}


# ---------------------------------------------------------------- the core (explicit now)

def replayed(records) -> Broker:
    fresh = Broker()
    for record in records:
        fresh.apply(json.loads(json.dumps(record)))  # as the journal hands them back
    return fresh


def test_bucket_records_replay_to_the_state_they_made():
    broker = recorded(Broker(new_uuid=iter(f"b{n}" for n in range(100)).__next__))
    uid = broker.create_bucket(OWNER, 10, False, T0).uid
    keep = broker.create_bucket(OWNER, 10, True, T0 + 1).uid
    broker.add_file(uid, OWNER, "f1", "a.txt", 5, "aa" * 32, 100, T0 + 2)
    broker.add_file(uid, OWNER, "f2", "b.txt", 7, "bb" * 32, 100, T0 + 3)
    broker.add_file(keep, OWNER, "f3", "c.txt", 1, "cc" * 32, 100, T0 + 3)
    broker.delete_file(uid, OWNER, "f1", T0 + 4)
    task = core_submit(broker, file_bucket=[keep], output_bucket=uid)
    records = take_records(broker)
    assert [r["op"] for r in records] == ["bucket.created", "bucket.created", "bucket.file_added",
                                         "bucket.file_added", "bucket.file_added",
                                         "bucket.file_deleted", "task.submitted"]
    again = replayed(records)
    assert again.snapshot() == broker.snapshot()
    assert again.buckets[uid].used == 7 and again.buckets[keep].tasks == {task.key}
    from_snapshot = Broker()
    from_snapshot.load_snapshot(json.loads(json.dumps(broker.snapshot())))
    assert from_snapshot.snapshot() == broker.snapshot()
    assert from_snapshot.buckets[keep].tasks == {task.key}
    broker.delete_bucket(uid, OWNER, T0 + 5)
    assert replayed(records + take_records(broker)).snapshot() == broker.snapshot()


def test_a_key_gets_no_more_buckets_than_its_quota():
    broker = Broker()
    for _ in range(2):
        broker.create_bucket(OWNER, 2, False, T0)
    with pytest.raises(TooManyRequests):
        broker.create_bucket(OWNER, 2, False, T0)
    broker.create_bucket("another owner", 2, False, T0)  # quotas are per key


def test_a_file_that_does_not_fit_or_repeats_a_name_changes_nothing():
    broker = recorded(Broker())
    uid = broker.create_bucket(OWNER, 5, False, T0).uid
    broker.add_file(uid, OWNER, "f1", "a.txt", 60, "aa" * 32, 100, T0)
    take_records(broker)
    with pytest.raises(PayloadTooLarge):
        broker.add_file(uid, OWNER, "f2", "b.txt", 41, "bb" * 32, 100, T0)
    with pytest.raises(Conflict):
        broker.add_file(uid, OWNER, "f2", "a.txt", 1, "bb" * 32, 100, T0)
    assert take_records(broker) == [] and broker.buckets[uid].used == 60


def test_another_keys_bucket_is_not_found_and_a_task_cannot_name_it():
    broker = Broker()
    uid = broker.create_bucket(OWNER, 5, False, T0).uid
    with pytest.raises(NotFound):
        broker.bucket(uid, "someone else")
    assert broker.bucket(uid, MGMT_OWNER).uid == uid  # the management override sees all
    for fields in ({"file_bucket": [uid]}, {"output_bucket": uid}, {"file_bucket": ["nope"]}):
        with pytest.raises(Forbidden):
            core_submit(broker, owner="someone else", **fields)
    assert core_submit(broker, file_bucket=[uid]).data["file_bucket"] == [uid]


def test_ttl_and_rm_after_task_reap_through_records():
    broker = recorded(Broker())
    old = broker.create_bucket(OWNER, 9, False, T0).uid
    young = broker.create_bucket(OWNER, 9, False, T0 + 50).uid
    tied = broker.create_bucket(OWNER, 9, True, T0 + 50).uid
    uid = core_agent(broker)
    task = core_submit(broker, now=T0 + 51, file_bucket=[tied])
    assert [b.uid for b in broker.reap_buckets(100, T0 + 99)] == []
    assert [b.uid for b in broker.reap_buckets(100, T0 + 100)] == [old]
    claim(broker, uid, T0 + 101)
    assert broker.reap_buckets(100, T0 + 102) == []  # its task is running
    broker.resolve(uid, task.cap, task.id, "success", None, {}, T0 + 103)
    assert [b.uid for b in broker.reap_buckets(100, T0 + 104)] == [tied]
    assert set(broker.buckets) == {young}
    assert replayed(take_records(broker)).snapshot() == broker.snapshot()


def test_a_task_whose_bucket_was_reaped_is_not_requeued_to_fail():
    """Requeuing a dead letter whose rm_after_task bucket went with it would hand agents a
    task that can only fail at its first download: refused, saying which bucket is gone."""
    broker = recorded(Broker())
    tied = broker.create_bucket(OWNER, 9, True, T0).uid
    kept = broker.create_bucket(OWNER, 9, False, T0).uid
    lost = core_submit(broker, file_bucket=[kept], output_bucket=tied)
    alive = core_submit(broker, file_bucket=[kept])
    for task in (lost, alive):
        broker.cancel(task.cap, task.id, OWNER, T0 + 1)
    assert [b.uid for b in broker.reap_buckets(100, T0 + 2)] == [tied]
    take_records(broker)
    with pytest.raises(Conflict, match=f"bucket {tied} is gone"):
        broker.requeue(lost.cap, lost.id, T0 + 3)
    assert take_records(broker) == [] and lost.status == "canceled"
    assert broker.requeue(alive.cap, alive.id, T0 + 3).status == "pending"


def test_an_agent_reaches_only_the_buckets_of_tasks_it_holds():
    broker = Broker()
    inputs = broker.create_bucket(OWNER, 9, False, T0).uid
    output = broker.create_bucket(OWNER, 9, False, T0).uid
    other = broker.create_bucket(OWNER, 9, False, T0).uid
    uid, idle = core_agent(broker), core_agent(broker)
    core_submit(broker, file_bucket=[inputs], output_bucket=output)
    for bucket in (inputs, output, other):
        with pytest.raises(NotFound):
            broker.agent_bucket(uid, bucket, output=False)  # not taken yet
    claim(broker, uid)
    assert broker.agent_bucket(uid, inputs, output=False).uid == inputs
    assert broker.agent_bucket(uid, output, output=True).uid == output
    for agent, bucket, out in ((uid, inputs, True), (uid, other, False), (idle, inputs, False)):
        with pytest.raises(NotFound):
            broker.agent_bucket(agent, bucket, output=out)


HOSTILE_NAMES = ["..", ".", "", "../x", "a/b", "/etc/passwd", "a\\b", "a\x00b", "new\nline",
                 "x" * 256]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_file_name_is_one_plain_name(name):
    with pytest.raises(Exception) as refused:
        check_file_name(name)
    assert refused.value.status == 400
    with pytest.raises(offload_agent.TaskFailed):
        offload_agent.plain_file_name(name)


def test_plain_names_pass():
    for name in ("a.txt", "..hidden", "résumé.pdf", "with space", "x" * 255):
        assert check_file_name(name) == offload_agent.plain_file_name(name) == name


def test_submission_takes_bucket_fields_only_in_their_shape():
    data = parse_submission({"capability": "c", "file_bucket": ["a", "a", "b"], "output_bucket": "o"})
    assert data["file_bucket"] == ["a", "b"] and data["output_bucket"] == "o"
    assert "file_bucket" not in parse_submission({"capability": "c"})
    for bad in ({"file_bucket": "a"}, {"file_bucket": [1]}, {"file_bucket": [""]},
                {"output_bucket": ["o"]}, {"file_bucket": [f"b{n}" for n in range(17)]}):
        with pytest.raises(Exception) as refused:
            parse_submission({"capability": "c", **bad})
        assert refused.value.status == 400


# ---------------------------------------------------------------- the routes, in-process

async def test_client_routes_round_trip(client):
    limits = await call(client, "GET", "/api/storage/limits", headers=CLIENT)
    assert limits == {"max_buckets_per_key": 256, "bucket_size_bytes": 1 << 30, "bucket_ttl_minutes": 1440}
    uid = await create_bucket(client)
    content = os.urandom(300_000)
    stored = await upload(client, uid, "data.bin", content)
    assert stored["size"] == len(content) and stored["sha256"] == hashlib.sha256(content).hexdigest()
    stat = await call(client, "GET", f"/api/storage/bucket/{uid}/stat", headers=CLIENT)
    [listed] = stat["files"]
    assert listed["file_uid"] == stored["file_uid"] and listed["size_bytes"] == len(content)
    assert listed["original_name"] == "data.bin" and listed["missing"] is False
    assert stat["used_bytes"] + stat["remaining_bytes"] == 1 << 30
    resp = await client.get(f"/api/storage/bucket/{uid}/file/{stored['file_uid']}", headers=CLIENT)
    assert resp.status == 200 and await resp.read() == content
    assert 'filename="data.bin"' in resp.headers["Content-Disposition"]
    digest = await call(client, "GET", f"/api/storage/bucket/{uid}/file/{stored['file_uid']}/hash",
                        headers=CLIENT)
    assert digest == {"hash": stored["sha256"]}
    [summary] = (await call(client, "GET", "/api/storage/buckets", headers=CLIENT))["buckets"]
    assert summary["bucket_uid"] == uid and summary["file_count"] == 1 and summary["tasks"] == []
    await fails(client, "POST", f"/api/storage/bucket/{uid}/upload", 409,
                data=multipart("data.bin", b"x")[0], headers={**CLIENT, **multipart("a", b"")[1]})
    assert await call(client, "DELETE", f"/api/storage/bucket/{uid}/file/{stored['file_uid']}",
                      headers=CLIENT) == {"deleted_file_uid": stored["file_uid"]}
    await fails(client, "GET", f"/api/storage/bucket/{uid}/file/{stored['file_uid']}", 404, headers=CLIENT)
    assert await call(client, "DELETE", f"/api/storage/bucket/{uid}", headers=CLIENT) == {
        "deleted_bucket_uid": uid}
    await fails(client, "GET", f"/api/storage/bucket/{uid}/stat", 404, headers=CLIENT)
    folder = client.server.app[HUB].config.data_path / "buckets"
    assert not folder.exists() or list(folder.iterdir()) == []


async def test_another_keys_bucket_is_404_on_every_route(client):
    uid = await create_bucket(client)
    file_uid = (await upload(client, uid))["file_uid"]
    other = await second_key(client)
    for method, path in (("GET", f"/api/storage/bucket/{uid}/stat"),
                         ("GET", f"/api/storage/bucket/{uid}/file/{file_uid}"),
                         ("GET", f"/api/storage/bucket/{uid}/file/{file_uid}/hash"),
                         ("DELETE", f"/api/storage/bucket/{uid}/file/{file_uid}"),
                         ("DELETE", f"/api/storage/bucket/{uid}")):
        await fails(client, method, path, 404, headers=other)
    await upload(client, uid, "x.txt", headers=other, status=404)
    assert (await call(client, "GET", "/api/storage/buckets", headers=other))["buckets"] == []
    await fails(client, "POST", "/api/task/submit", 403, headers=other,
                json={"capability": "echo", "file_bucket": [uid]})
    await fails(client, "POST", "/api/task/submit", 403, headers=other,
                json={"capability": "echo", "output_bucket": uid})
    await submit(client, file_bucket=[uid], output_bucket=uid)  # its owner may
    await fails(client, "GET", f"/api/storage/bucket/{uid}/stat", 401)  # no key at all
    await fails(client, "POST", f"/api/storage/bucket/{uid}/upload", 401, data=b"x")


async def test_quota_and_size_refusals_are_429_and_413(make_client):
    client = await make_client(storage_max_buckets_per_key=2, storage_bucket_size_bytes=1000)
    first = await create_bucket(client)
    await create_bucket(client)
    refused = await fails(client, "POST", "/api/storage/bucket/create", 429, headers=CLIENT, json={})
    assert "STORAGE_MAX_BUCKETS_PER_KEY" in refused["error"]["message"]
    await upload(client, first, "a", b"x" * 600)
    body, content_type = multipart("b", b"y" * 600)
    refused = await fails(client, "POST", f"/api/storage/bucket/{first}/upload", 413,
                          data=body, headers={**CLIENT, **content_type})
    assert "STORAGE_BUCKET_SIZE_BYTES" in refused["error"]["message"]
    # A chunked body declares no length: refused as it passes the room left, nothing kept.
    async def chunked():
        yield body[:100]
        yield body[100:]
    await fails(client, "POST", f"/api/storage/bucket/{first}/upload", 413, data=chunked(),
                headers={**CLIENT, **content_type})
    await upload(client, first, "c", b"z" * 400)  # exactly full
    stat = await call(client, "GET", f"/api/storage/bucket/{first}/stat", headers=CLIENT)
    assert stat["used_bytes"] == 1000 and stat["remaining_bytes"] == 0
    folder = client.server.app[HUB].config.data_path / "buckets" / first
    assert len(list(folder.iterdir())) == 2


@pytest.mark.parametrize("disposition", [
    'form-data; name="file"; filename="../escape.txt"',
    'form-data; name="file"; filename="/etc/passwd"',
    'form-data; name="file"; filename="a/b.txt"',
    'form-data; name="file"; filename=".."',
    'form-data; name="file"; filename="a\\\\b"',
    "form-data; name=\"file\"; filename*=UTF-8''a%00b",
    "form-data; name=\"file\"; filename*=UTF-8''..%2F..%2Fx",
    'form-data; name="file"',  # no name at all
    'form-data; name="other"; filename="a.txt"',  # no part named file
])
async def test_unsafe_or_missing_file_names_are_refused(client, disposition):
    uid = await create_bucket(client)
    body, content_type = multipart(None, b"data", disposition=disposition)
    await fails(client, "POST", f"/api/storage/bucket/{uid}/upload", 400, data=body,
                headers={**CLIENT, **content_type})
    assert (await call(client, "GET", f"/api/storage/bucket/{uid}/stat", headers=CLIENT))["files"] == []


async def test_an_upload_that_is_not_multipart_is_refused(client):
    uid = await create_bucket(client)
    await fails(client, "POST", f"/api/storage/bucket/{uid}/upload", 400, headers=CLIENT, json={"a": 1})
    await fails(client, "POST", f"/api/storage/bucket/{uid}/upload", 400, data=b"--x\r\ngarbage",
                headers={**CLIENT, "Content-Type": "multipart/form-data; boundary=x"})
    cut_short = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc'
    for content_type, body in (("multipart/form-data", b"--x\r\n"),  # no boundary given
                               ("multipart/form-data; boundary=x", cut_short)):
        await fails(client, "POST", f"/api/storage/bucket/{uid}/upload", 400, data=body,
                    headers={**CLIENT, "Content-Type": content_type})
    assert (await call(client, "GET", f"/api/storage/bucket/{uid}/stat", headers=CLIENT))["files"] == []


async def test_a_file_removed_behind_the_servers_back_is_reported_missing(client):
    uid = await create_bucket(client)
    gone = await upload(client, uid, "gone.txt", b"a" * 100)
    cut = await upload(client, uid, "cut.txt", b"b" * 100)
    folder = client.server.app[HUB].config.data_path / "buckets" / uid
    linked = await upload(client, uid, "linked.txt", b"c" * 100)
    (folder / gone["file_uid"]).unlink()
    (folder / cut["file_uid"]).write_bytes(b"b" * 10)
    outside = folder.parent.parent / "outside.txt"
    outside.write_bytes(b"s" * 100)  # the same size: only the link gives it away
    (folder / linked["file_uid"]).unlink()
    (folder / linked["file_uid"]).symlink_to(outside)
    stat = await call(client, "GET", f"/api/storage/bucket/{uid}/stat", headers=CLIENT)
    assert [f["missing"] for f in stat["files"]] == [True, True, True]
    for file_uid in (gone["file_uid"], cut["file_uid"], linked["file_uid"]):
        body = await fails(client, "GET", f"/api/storage/bucket/{uid}/file/{file_uid}", 410,
                           "file_missing", headers=CLIENT)
        assert "upload it again" in body["error"]["message"]
    await call(client, "DELETE", f"/api/storage/bucket/{uid}/file/{gone['file_uid']}", headers=CLIENT)
    await upload(client, uid, "gone.txt", b"a" * 100)  # the name is free again


async def test_agent_routes_serve_only_the_buckets_of_its_held_tasks(client):
    inputs, output, unrelated = await create_bucket(client), await create_bucket(client), await create_bucket(client)
    file_uid = (await upload(client, inputs, "in.txt", b"input"))["file_uid"]
    ag = await new_agent(client, caps=("echo",))
    task_id = await submit(client, file_bucket=[inputs], output_bucket=output)
    await fails(client, "GET", f"/private/agent/bucket/{inputs}/stat", 404, headers=ag.h)
    await call(client, "POST", f"/private/agent/take/echo/{task_id['id']}", headers=ag.h)
    stat = await call(client, "GET", f"/private/agent/bucket/{inputs}/stat", headers=ag.h)
    assert [f["original_name"] for f in stat["files"]] == ["in.txt"]
    resp = await client.get(f"/private/agent/bucket/{inputs}/file/{file_uid}", headers=ag.h)
    assert resp.status == 200 and await resp.read() == b"input"
    stored = await upload(client, output, "out.txt", b"result", headers=ag.h,
                          route="/private/agent/bucket/{}/upload")
    assert stored["original_name"] == "out.txt" and stored["bucket_uid"] == output
    await upload(client, inputs, "out.txt", b"x", headers=ag.h, status=404,
                 route="/private/agent/bucket/{}/upload")  # an input bucket is read-only
    await fails(client, "GET", f"/private/agent/bucket/{unrelated}/stat", 404, headers=ag.h)
    other = await new_agent(client, caps=("echo",))
    await fails(client, "GET", f"/private/agent/bucket/{inputs}/file/{file_uid}", 404, headers=other.h)
    await fails(client, "GET", f"/private/agent/bucket/{inputs}/stat", 401)
    [listed] = [b for b in (await call(client, "GET", "/api/storage/buckets", headers=CLIENT))["buckets"]
                if b["bucket_uid"] == output]
    assert listed["file_count"] == 1 and listed["tasks"] == [task_id["id"]]
    await call(client, "POST", f"/private/agent/task/resolve/echo/{task_id['id']}", headers=ag.h,
               json={"id": task_id, "status": {"success": 1}, "output": {}})
    await fails(client, "GET", f"/private/agent/bucket/{inputs}/stat", 404, headers=ag.h)  # it ended


async def test_upload_file_over_the_agent_socket(client):
    output = await create_bucket(client)
    ag = await new_agent(client, caps=("echo",))
    ws = await client.ws_connect(f"/private/agent/ws?token={ag.token}")
    frames = []

    async def answer_to(req_id):
        while True:
            frame = await ws.receive_json(timeout=5)
            if frame.get("req_id") == req_id:
                return frame
            frames.append(frame)

    await ws.send_json({"req_id": "u0", "action": "upload_file",
                        "params": {"bucket_uid": output, "filename": "early.txt"}})
    await ws.send_bytes(b"too soon")
    assert (await answer_to("u0"))["status"] == 404  # no task names it yet...
    task_id = await submit(client, output_bucket=output)
    while not any(f.get("type") == "task" for f in frames):  # ...until the push
        frames.append(await ws.receive_json(timeout=5))
    await ws.send_json({"req_id": "u1", "action": "upload_file",
                        "params": {"bucket_uid": output, "filename": "out.bin"}})
    await ws.send_bytes(b"\x00\x01binary")
    stored = await answer_to("u1")
    assert stored["type"] == "response" and stored["status"] == 201, stored
    assert stored["data"]["size"] == 8 and stored["data"]["original_name"] == "out.bin"
    await ws.send_json({"req_id": "u2", "action": "upload_file",
                        "params": {"bucket_uid": output, "filename": "../evil"}})
    await ws.send_bytes(b"x")
    assert (await answer_to("u2"))["status"] == 400
    for frame in ({"action": "get", "params": {"path": ["bucket", output, "file", stored["data"]["file_uid"]]}},
                  {"action": "post", "params": {"path": ["bucket", output, "upload"], "body": {}}}):
        await ws.send_json({"req_id": "g1", **frame})
        refused = await answer_to("g1")  # bytes would corrupt the socket: refused, socket kept
        assert refused["status"] == 400 and "HTTP" in refused["error"]["message"], refused
    await ws.send_json({"req_id": "p1", "action": "ping"})
    assert (await answer_to("p1"))["status"] == 200
    await ws.close()
    resp = await client.get(f"/api/storage/bucket/{output}/file/{stored['data']['file_uid']}", headers=CLIENT)
    assert await resp.read() == b"\x00\x01binary"
    assert task_id["id"]


async def test_management_storage_routes(client):
    mine = await create_bucket(client)
    await upload(client, mine, "a", b"12345")
    other = await second_key(client)
    theirs = [await create_bucket(client, headers=other) for _ in range(2)]
    listing = (await call(client, "GET", "/management/storage/buckets", headers=MGMT))["buckets_by_key"]
    assert listing["ck-test"]["total_bytes"] == 5 and listing["ck-test"]["bucket_count"] == 1
    assert listing[other["X-API-Key"]]["bucket_count"] == 2
    quotas = await call(client, "GET", "/management/storage/quotas?api_key=ck-test", headers=MGMT)
    assert quotas["limits"]["max_buckets_per_key"] == 256
    assert quotas["usage"] == {"ck-test": {"bucket_count": 1, "total_files": 1, "total_bytes": 5}}
    assert (await call(client, "GET", "/management/storage/quotas?api_key=nobody", headers=MGMT))["usage"] == {}
    assert await call(client, "DELETE", f"/management/storage/bucket/{theirs[0]}", headers=MGMT) == {
        "deleted_bucket_uid": theirs[0]}
    await fails(client, "DELETE", f"/management/storage/bucket/{theirs[0]}", 404, headers=MGMT)
    assert await call(client, "DELETE", f"/management/storage/key/{other['X-API-Key']}/buckets",
                      headers=MGMT) == {"api_key": other["X-API-Key"], "deleted_count": 1}
    assert await call(client, "POST", "/management/storage/cleanup/trigger", headers=MGMT) == {"deleted_count": 0}
    assert await call(client, "DELETE", "/management/storage/buckets", headers=MGMT) == {"deleted_count": 1}
    assert (await call(client, "GET", "/management/storage/buckets", headers=MGMT))["buckets_by_key"] == {}
    await fails(client, "GET", "/management/storage/buckets", 401, headers={"X-Mgmt-Token": "wrong"})


async def wait_gone(client, uid, timeout=8.0):
    """Until the bucket is unknown and its folder removed (the bytes go after the record)."""
    folder = client.server.app[HUB].config.data_path / "buckets" / uid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await client.get(f"/api/storage/bucket/{uid}/stat", headers=CLIENT)
        if resp.status == 404 and not folder.exists():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"bucket {uid} still there after {timeout} s")


async def test_the_tick_loop_reaps_expired_and_finished_rm_after_task_buckets(make_client):
    client = await make_client(storage_bucket_ttl_s=1.5)
    expiring = await create_bucket(client)
    await upload(client, expiring, "a", b"a")
    await wait_gone(client, expiring)
    client = await make_client(storage_bucket_ttl_s=3600)
    tied = await create_bucket(client, rm_after_task=True)
    kept = await create_bucket(client)
    ag = await new_agent(client, caps=("echo",))
    task_id = await submit(client, file_bucket=[tied, kept])
    await call(client, "POST", f"/private/agent/take/echo/{task_id['id']}", headers=ag.h)
    await asyncio.sleep(1.5)  # two rounds of the loop while the task runs: kept
    await call(client, "GET", f"/api/storage/bucket/{tied}/stat", headers=CLIENT)
    await call(client, "POST", f"/private/agent/task/resolve/echo/{task_id['id']}", headers=ag.h,
               json={"id": task_id, "status": {"success": 1}, "output": {}})
    await wait_gone(client, tied)
    await call(client, "GET", f"/api/storage/bucket/{kept}/stat", headers=CLIENT)


# ---------------------------------------------------------------- real processes

def raw_upload(server, bucket_uid, name, chunks, length, headers=None, timeout=120):
    """POST a multipart upload whose file part comes from `chunks` (a generator), with a
    Content-Length: nothing is held whole on this side either."""
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    conn = HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.putrequest("POST", f"/api/storage/bucket/{bucket_uid}/upload")
    for key, value in {**server.client, **(headers or {}),
                       "Content-Type": f"multipart/form-data; boundary={boundary}",
                       "Content-Length": str(len(head) + length + len(tail))}.items():
        conn.putheader(key, value)
    conn.endheaders()
    try:
        conn.send(head)
        for chunk in chunks:
            conn.send(chunk)
        conn.send(tail)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before the end: the answer is still there to read
    resp = conn.getresponse()
    body = json.loads(resp.read() or b"null")
    conn.close()
    return resp.status, body


def proc_status(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def new_bucket(server, **body):
    status, answer = http("POST", server.url + "/api/storage/bucket/create", body, server.client)
    assert status == 201, answer
    return answer["bucket_uid"]


def test_a_200_mb_upload_streams_to_disk_in_bounded_memory(server):
    uid = new_bucket(server)
    idle = proc_status(server.proc.pid, "VmRSS")
    block = os.urandom(MB)
    digest = hashlib.sha256()
    peak = [idle]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], proc_status(server.proc.pid, "VmRSS"))

    def chunks():
        for n in range(200):
            piece = block[n:] + block[:n]  # every MiB differs
            digest.update(piece)
            yield piece

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        status, stored = raw_upload(server, uid, "big.bin", chunks(), 200 * MB)
    finally:
        done.set()
        sampler.join()
    took = time.monotonic() - started
    assert status == 201, stored
    assert stored["size"] == 200 * MB and stored["sha256"] == digest.hexdigest()
    grew = max(peak[0], proc_status(server.proc.pid, "VmHWM")) - idle  # the kernel's peak too
    print(f"\n200 MB upload: {took:.1f} s, server RSS idle {idle / MB:.0f} MiB, peak +{grew / MB:.1f} MiB")
    assert grew < 100 * MB, f"RSS grew {grew / MB:.0f} MiB during a 200 MB upload"
    # Streamed back the same way: the bytes and the memory.
    conn = HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("GET", f"/api/storage/bucket/{uid}/file/{stored['file_uid']}", headers=server.client)
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == 200 * MB
    back = hashlib.sha256()
    while piece := resp.read(MB):
        back.update(piece)
    conn.close()
    assert back.hexdigest() == digest.hexdigest()
    assert proc_status(server.proc.pid, "VmHWM") - idle < 100 * MB


def test_a_full_disk_refuses_the_upload_507_and_keeps_no_part(make_server, tmp_path):
    """RLIMIT_FSIZE makes the server's file writes fail for real (EFBIG) past 2 MiB."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MB, 2 * MB))
    server = make_server(preexec_fn=limit_file_size).start()
    uid = new_bucket(server)
    status, body = raw_upload(server, uid, "big.bin", (b"x" * MB for _ in range(3)), 3 * MB)
    assert status == 507 and body["error"]["type"] == "storage_full", body
    assert list((tmp_path / "data" / "buckets" / uid).iterdir()) == []
    status, stored = raw_upload(server, uid, "small.bin", [b"y" * 1000], 1000)
    assert status == 201, stored  # the server goes on
    status, stat = http("GET", f"{server.url}/api/storage/bucket/{uid}/stat", headers=server.client)
    assert [f["original_name"] for f in stat["files"]] == ["small.bin"]


def test_kill_9_keeps_buckets_and_files_and_sweeps_what_no_record_names(server):
    uid = new_bucket(server, rm_after_task=True)
    content = os.urandom(50_000)
    status, stored = raw_upload(server, uid, "keep.bin", [content], len(content))
    assert status == 201
    folder = server.data / "buckets"
    server.kill()
    (folder / uid / ".part-leftover").write_bytes(b"half")   # as a crash mid-upload leaves
    (folder / uid / "unrecorded").write_bytes(b"no record")  # written, record lost
    (folder / "deleted-bucket").mkdir()                       # deleted, folder not removed yet
    server.start()
    status, stat = http("GET", f"{server.url}/api/storage/bucket/{uid}/stat", headers=server.client)
    assert status == 200 and [f["file_uid"] for f in stat["files"]] == [stored["file_uid"]]
    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", f"/api/storage/bucket/{uid}/file/{stored['file_uid']}", headers=server.client)
    assert conn.getresponse().read() == content
    conn.close()
    assert sorted(p.name for p in folder.iterdir()) == [uid]
    assert sorted(p.name for p in (folder / uid).iterdir()) == [stored["file_uid"]]
    [listed] = http("GET", f"{server.url}/api/storage/buckets", headers=server.client)[1]["buckets"]
    assert listed["rm_after_task"] is True


def start_agent(server, folder, transport):
    from test_e2e_agent import AgentProcess
    return AgentProcess(server, folder, ["shell.bash"],
                        serve_args=["--transport", transport]).register().start()


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_an_agent_reads_an_input_file_and_writes_an_output_file(server, tmp_path, transport):
    inputs, output = new_bucket(server), new_bucket(server)
    assert raw_upload(server, inputs, "words.txt", [b"hello buckets\n"], 14)[0] == 201
    agent = start_agent(server, tmp_path / "agent", transport)
    try:
        task_id = server.submit("shell.bash", {"command": "tr a-z A-Z < words.txt > output/shout.txt"},
                                file_bucket=[inputs], output_bucket=output)
        deadline = time.monotonic() + 30
        while True:
            status, task = http("GET", f"{server.url}/api/task/poll/{task_id['cap']}/{task_id['id']}",
                                headers=server.client)
            if task["status"] in ("completed", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert task["status"] == "completed", (task, agent.output())
        [made] = task["output"]["output_files"]
        assert made["name"] == "shout.txt" and made["bucket_uid"] == output
        conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", f"/api/storage/bucket/{output}/file/{made['file_uid']}", headers=server.client)
        assert conn.getresponse().read() == b"HELLO BUCKETS\n"
        conn.close()
        agent.wait_for_log("uploading 'shout.txt' (14 bytes) to bucket %s over %s"
                           % (output, "the socket" if transport == "ws" else "HTTP"))
    finally:
        agent.signal()
        agent.proc.wait(timeout=30)


def test_storage_answers_match_the_document(server):
    from offloadmq import ROUTES, openapi_document
    from test_api import Conformance
    check = Conformance(server, openapi_document(ROUTES))
    client, mgmt = server.client, server.mgmt
    check("GET", "/api/storage/limits", headers=client)
    made = check("POST", "/api/storage/bucket/create", body={"rm_after_task": False}, headers=client,
                 expect=201)
    ids = {"bucket_uid": made["bucket_uid"]}
    status, stored = raw_upload(server, made["bucket_uid"], "a.txt", [b"abc"], 3)
    assert status == 201
    schema = openapi_document(ROUTES)["paths"]["/api/storage/bucket/{bucket_uid}/upload"]["post"]
    check.validator({**schema["responses"]["201"]["content"]["application/json"]["schema"],
                     "components": check.document["components"]}).validate(stored)
    file_ids = {**ids, "file_uid": stored["file_uid"]}
    check("GET", "/api/storage/buckets", headers=client)
    check("GET", "/api/storage/bucket/{bucket_uid}/stat", ids, headers=client)
    check("GET", "/api/storage/bucket/{bucket_uid}/file/{file_uid}/hash", file_ids, headers=client)
    check("GET", "/management/storage/buckets", headers=mgmt)
    check("GET", "/management/storage/quotas", headers=mgmt, query="?api_key=" + server.client_key)
    check("POST", "/management/storage/cleanup/trigger", headers=mgmt)
    check("DELETE", "/api/storage/bucket/{bucket_uid}/file/{file_uid}", file_ids, headers=client)
    check("GET", "/api/storage/bucket/{bucket_uid}/file/{file_uid}", file_ids, headers=client, expect=404)
    check("DELETE", "/api/storage/bucket/{bucket_uid}", ids, headers=client)
    check("DELETE", "/management/storage/bucket/{bucket_uid}", ids, headers=mgmt, expect=404)
    check("DELETE", "/management/storage/key/{api_key}/buckets", {"api_key": server.client_key}, headers=mgmt)
    check("DELETE", "/management/storage/buckets", headers=mgmt)
    agent = server.new_agent(["x"])
    check("GET", "/private/agent/bucket/{bucket_uid}/stat", ids, headers=agent, expect=404)


# ---------------------------------------------------------------- the agent against a hostile server

class HostileBuckets:
    """Plays a server that lies about bucket files: names that are paths, bytes that do
    not match their hash; and records what the agent uploads."""

    def __init__(self, files):
        self.files = files  # [(name, content, sha256 claimed)]
        self.uploads = []

    def app(self):
        app = aiohttp.web.Application()
        app.router.add_get("/private/agent/bucket/{uid}/stat", self.stat)
        app.router.add_get("/private/agent/bucket/{uid}/file/{file_uid}", self.download)
        app.router.add_post("/private/agent/bucket/{uid}/upload", self.upload)
        return app

    async def stat(self, request):
        return aiohttp.web.json_response({"files": [
            {"file_uid": f"f{n}", "original_name": name, "size_bytes": len(content), "sha256": claimed}
            for n, (name, content, claimed) in enumerate(self.files)]})

    async def download(self, request):
        return aiohttp.web.Response(body=self.files[int(request.match_info["file_uid"][1:])][1])

    async def upload(self, request):
        part = await (await request.multipart()).next()
        self.uploads.append((part.filename, await part.read()))
        return aiohttp.web.json_response({"file_uid": "u1", "size": 1, "sha256": "x"}, status=201)


@pytest.fixture
async def hostile_run(aiohttp_server, make_run):
    async def factory(files, command, **data):
        hostile = HostileBuckets(files)
        server = await aiohttp_server(hostile.app(), host="127.0.0.1")
        client = offload_agent.ServerClient(str(server.make_url("")).rstrip("/"))
        client.token = "a token the hostile server takes"
        run, _ = make_run("shell.bash", {"command": command})
        run.data.update(data)
        run.server = client
        return hostile, run
    return factory


def sha(content):
    return hashlib.sha256(content).hexdigest()


async def test_the_agent_writes_no_input_file_outside_its_task_folder(hostile_run, tmp_path):
    for name in ("../escape.txt", "/tmp/escape.txt", "a/b.txt", ".."):
        hostile, run = await hostile_run([(name, b"evil", sha(b"evil"))], "true", file_bucket=["b1"])
        outcome = await run_task(run)
        assert "not a plain file name" in failure_message(outcome), outcome
    assert not (tmp_path / "work" / "escape.txt").exists()
    assert not list(tmp_path.rglob("escape.txt"))


async def test_the_agent_fails_a_task_whose_input_bytes_do_not_match_their_hash(hostile_run):
    hostile, run = await hostile_run([("in.txt", b"tampered", sha(b"original"))], "cat in.txt",
                                     file_bucket=["b1"])
    assert "SHA-256" in failure_message(await run_task(run))
    hostile, run = await hostile_run([("a.txt", b"1", sha(b"1")), ("a.txt", b"2", sha(b"2"))], "true",
                                     file_bucket=["b1"])
    assert "two input files" in failure_message(await run_task(run))


async def test_the_agent_uploads_output_files_but_never_through_a_link(hostile_run, tmp_path):
    hostile, run = await hostile_run([("in.txt", b"data", sha(b"data"))],
                                     "cp in.txt output/copy.txt", file_bucket=["b1"], output_bucket="o1")
    outcome = await run_task(run)
    assert outcome.kind == "success", outcome
    assert hostile.uploads == [("copy.txt", b"data")]
    assert outcome.output["output_files"][0]["name"] == "copy.txt"
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    hostile, run = await hostile_run([], f"ln -s {secret} output/leak.txt", output_bucket="o1")
    assert "symbolic link" in failure_message(await run_task(run))
    assert hostile.uploads == []
    hostile, run = await hostile_run([], "touch \"output/forged$(printf '\\nline')\"", output_bucket="o1")
    assert "not a plain file name" in failure_message(await run_task(run))
    assert hostile.uploads == []


# ---------------------------------------------------------------- through the journal

async def test_buckets_survive_compaction_and_replay_as_they_were(tmp_path):
    from test_journal import hub_config, view
    from offloadmq import Hub
    clock = [T0]
    hub = Hub(hub_config(tmp_path), clock=lambda: clock[0])
    hub.recover()

    async def chunks(*pieces):
        for piece in pieces:
            yield piece

    kept = await hub.create_bucket(OWNER, False)
    dropped = await hub.create_bucket(OWNER, True)
    first = await hub.store_file(kept.uid, "a.txt", chunks(b"aa", b"aa"), owner=OWNER)
    await hub.store_file(dropped.uid, "b.txt", chunks(b"b"), owner=OWNER)
    await hub.compact()
    second = await hub.store_file(kept.uid, "c.txt", chunks(b"ccc"), owner=OWNER)
    await hub.delete_file(kept.uid, OWNER, first.uid)
    await hub.delete_bucket(dropped.uid, OWNER)
    with pytest.raises(NotFound):
        await hub.store_file(dropped.uid, "late.txt", chunks(b"x"), owner=OWNER)
    await hub.journal.close()
    again = Hub(hub_config(tmp_path), clock=lambda: clock[0])
    again.recover()
    await again.journal.close()
    assert view(again.broker) == view(hub.broker)
    assert list(again.broker.buckets) == [kept.uid]
    assert [f.name for f in again.broker.buckets[kept.uid].files.values()] == ["c.txt"]
    assert again.files.present(kept.uid, again.broker.buckets[kept.uid].files[second.uid])
    assert sorted(p.name for p in (tmp_path / "buckets").iterdir()) == [kept.uid]
    assert [p.name for p in (tmp_path / "buckets" / kept.uid).iterdir()] == [second.uid]


def test_an_upload_cut_off_midway_leaves_no_part_file(server):
    import socket
    uid = new_bucket(server)
    head = ("--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cut.bin\"\r\n\r\n").encode()
    request = (f"POST /api/storage/bucket/{uid}/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"X-API-Key: {server.client_key}\r\nContent-Type: multipart/form-data; boundary=b0\r\n"
               f"Content-Length: {len(head) + 10 * MB + 8}\r\n\r\n").encode() + head
    folder = server.data / "buckets" / uid
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        for _ in range(3):
            sock.sendall(b"z" * MB)
        deadline = time.monotonic() + 10
        while not (folder.exists() and any(folder.iterdir())):  # the part file is being written
            assert time.monotonic() < deadline, "no part file appeared"
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while any(folder.iterdir()):
        assert time.monotonic() < deadline, list(folder.iterdir())
        time.sleep(0.05)
    status, stat = http("GET", f"{server.url}/api/storage/bucket/{uid}/stat", headers=server.client)
    assert stat["files"] == [] and stat["used_bytes"] == 0


async def test_an_upload_that_stalls_is_cut_with_408_and_keeps_nothing(make_client):
    client = await make_client(body_timeout_s=0.3)
    uid = await create_bucket(client)
    body, content_type = multipart("slow.bin", b"s" * 1000)

    async def stalling():
        yield body[:500]
        await asyncio.sleep(2)
        yield body[500:]
    await fails(client, "POST", f"/api/storage/bucket/{uid}/upload", 408, data=stalling(),
                headers={**CLIENT, **content_type})
    folder = client.server.app[HUB].config.data_path / "buckets" / uid
    assert not folder.exists() or list(folder.iterdir()) == []


def test_storage_limits_come_from_the_environment(tmp_path):
    from offloadmq import load_config
    given = {"JWT_SECRET": "j", "AGENT_API_KEYS": "a", "CLIENT_API_KEYS": "c", "MGMT_TOKEN": "m"}
    data = ["--data", str(tmp_path)]
    config = load_config(data, given, tmp_path)
    assert (config.storage_max_buckets_per_key, config.storage_bucket_size_bytes,
            config.storage_bucket_ttl_s) == (256, 1 << 30, 86400)
    (tmp_path / ".env").write_text("STORAGE_BUCKET_TTL_MINUTES=90\n")
    config = load_config(data, {**given, "STORAGE_MAX_BUCKETS_PER_KEY": "3",
                                "STORAGE_BUCKET_SIZE_BYTES": "1000"}, tmp_path)
    assert (config.storage_max_buckets_per_key, config.storage_bucket_size_bytes,
            config.storage_bucket_ttl_s) == (3, 1000, 5400)
    for bad in ({"STORAGE_MAX_BUCKETS_PER_KEY": "many"}, {"STORAGE_BUCKET_SIZE_BYTES": "-1"},
                {"STORAGE_BUCKET_TTL_MINUTES": "0"}, {"STORAGE_BUCKET_TTL_MINUTES": "nan"}):
        with pytest.raises(SystemExit):
            load_config(data, {**given, **bad}, tmp_path)


async def test_a_file_whose_record_cannot_be_written_is_not_kept(client):
    """The journal is replaced while the file streams in (a real fault: the server then
    refuses writes, 507 storage_lost): the file, complete on disk, must go too."""
    uid = await create_bucket(client)
    body, content_type = multipart("late.bin", b"L" * 4000)
    data_path = client.server.app[HUB].config.data_path
    folder = data_path / "buckets" / uid
    halfway = asyncio.Event()

    async def slow():
        yield body[:2000]
        await halfway.wait()
        yield body[2000:]

    answer = asyncio.ensure_future(fails(client, "POST", f"/api/storage/bucket/{uid}/upload", 507,
                                         "storage_lost", data=slow(), headers={**CLIENT, **content_type}))
    while not (folder.exists() and any(folder.iterdir())):
        await asyncio.sleep(0.01)
    journal = data_path / "journal.jsonl"
    journal.rename(data_path / "journal.moved")
    journal.write_bytes(b"")
    halfway.set()
    await answer
    assert list(folder.iterdir()) == []
