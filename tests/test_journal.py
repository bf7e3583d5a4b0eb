"""The journal: crafted files replayed into a fresh Broker, the Hub's compaction under
load, the real server process crashing at each compaction step, and the disk failing
for real under the Hub (a small tmpfs filled up, the journal replaced).

Most tests build a realistic run on a live Broker (explicit `now`), write its durable
records with the real `encode_record`, damage the file the way a crash or a bad disk
would, and compare what `Journal.recover` rebuilds against the live state.
"""
import asyncio
import logging
import os
import random
import signal
import time
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest

import offloadmq
from conftest import ROOT, fill, http, recorded, take_records
from offloadmq import (
    PENDING, Broker, Config, Hub, Journal, JournalCorrupt, OffloadError, StorageFull,
    StorageLost, decode_record, encode_record, iso, load_config, owner_of, parse_iso,
    parse_submission,
)

T0 = 1_800_000_000.0
END_T = T0 + 9  # the clock when realistic_run() ends
PREDEFINED = ("ck-pre",)
OWNER = owner_of("ck-new")


# ---------------------------------------------------------------- helpers

def submission(cap, restartable=False, urgent=False, payload=None):
    return parse_submission({"capability": cap, "restartable": restartable, "urgent": urgent,
                             "payload": payload})


def agent_info(caps, tier=0, capacity=1):
    return {"capabilities": caps, "tier": tier, "capacity": capacity,
            "systemInfo": {"os": "linux", "cpuArch": "x86_64", "gpu": None}}


def realistic_run() -> tuple[Broker, list[dict]]:
    """Every kind of durable change: agents, keys, submit, take, progress, the three
    resolve outcomes, requeue, an urgent task (never journaled), agent update and delete.
    Returns the live broker and its records numbered as the journal numbers them."""
    b = recorded(Broker(PREDEFINED, T0))
    t = T0
    a = b.register_agent(agent_info(["debug.echo", "vision[gpu;cuda12]"], tier=1, capacity=2), t)
    bee = b.register_agent(agent_info(["debug.echo"], capacity=3), t + 0.1)
    b.update_key("ck-new", ["debug.*"], None, t + 0.2)
    b.update_key("ck-new", ["debug.*", "vision"], 50, t + 0.3)
    b.update_key("ck-gone", ["*"], None, t + 0.4)
    b.revoke_key("ck-gone", t + 0.5)
    t += 1
    t1 = b.submit(submission("debug.echo", payload={"n": 1}), OWNER, None, t)
    t2 = b.submit(submission("debug.echo", restartable=True, payload="two"), OWNER, None, t + 0.01)
    t3 = b.submit(submission("vision", payload=[3]), OWNER, None, t + 0.02)
    t4 = b.submit(submission("debug.echo"), OWNER, None, t + 0.03)
    t5 = b.submit(submission("debug.echo", restartable=True), OWNER, None, t + 0.04)
    t6 = b.submit(submission("debug.echo", payload={"held": "across"}), OWNER, None, t + 0.05)
    t += 1
    b.take(a.uid, t1.cap, t1.id, t)
    b.progress(a.uid, t1.cap, t1.id, "loading", "line one\n", t + 0.1)
    b.progress(a.uid, t1.cap, t1.id, None, "line two\n", t + 0.2)
    b.resolve(a.uid, t1.cap, t1.id, "success", None, {"echo": {"n": 1}}, t + 0.3)
    b.take(a.uid, t2.cap, t2.id, t + 0.4)
    b.resolve(a.uid, t2.cap, t2.id, "failure", "boom", None, t + 0.5)   # requeued, retried later
    b.take(a.uid, t3.cap, t3.id, t + 0.7)
    b.resolve(a.uid, t3.cap, t3.id, "notExecuted", "no gpu", None, t + 0.8)  # failed
    b.take(bee.uid, t4.cap, t4.id, t + 0.9)
    b.take(bee.uid, t5.cap, t5.id, t + 0.95)
    t += 1
    b.update_agent(a.uid, agent_info(["debug.echo", "vision[gpu;cuda12]"], tier=2, capacity=4), t)
    urgent = b.submit(submission("debug.echo", urgent=True), OWNER, None, t + 0.1)
    b.take(a.uid, urgent.cap, urgent.id, t + 0.2)
    b.resolve(a.uid, urgent.cap, urgent.id, "success", None, "fast", t + 0.3)
    b.delete_agent(bee.uid, t + 0.4)       # t5 back to the queue, t4 fails
    b.take(a.uid, t6.cap, t6.id, t + 0.5)
    b.progress(a.uid, t6.cap, t6.id, "half", "x" * 50, t + 0.6)
    t += 1
    # Cancel a queued task, ask a running one to stop, revive a dead letter, drain.
    t7 = b.submit(submission("debug.echo"), OWNER, None, t)
    t8 = b.submit(submission("debug.echo"), OWNER, None, t + 0.01)
    b.cancel(t7.cap, t7.id, OWNER, t + 0.1)
    b.take(a.uid, t8.cap, t8.id, t + 0.2)
    b.cancel(t8.cap, t8.id, OWNER, t + 0.3)
    b.requeue(t3.cap, t3.id, t + 0.4)
    b.drain_agent(a.uid, True, t + 0.5)
    b.drain_agent(a.uid, False, t + 0.6)
    assert END_T > t
    b.expire(END_T)  # a retry delay passes: in memory only, recomputed from the clock
    records = [{"seq": i, **r} for i, r in enumerate(take_records(b), 1)]
    return b, records


def view(b: Broker) -> dict:
    """Everything durable, in a form that does not depend on dict insertion order."""
    snap = b.snapshot()
    return {
        "tasks": sorted(snap["tasks"], key=lambda t: t["id"]),
        "agents": sorted(snap["agents"], key=lambda a: a["uid"]),
        "keys": sorted(snap["keys"], key=lambda k: k["key"]),
        "buckets": sorted(snap["buckets"], key=lambda k: k["uid"]),
        "held": {uid: sorted(a.held) for uid, a in b.agents.items()},
        "counts": {s: n for (u, s), n in b.counts.items() if not u and n},
        "pending_by_cap": {c: n for c, n in b.pending_by_cap.items() if n},
    }


def write_journal(folder: Path, records: list[dict], extra: bytes = b"") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "journal.jsonl"
    path.write_bytes(b"".join(encode_record(r) for r in records) + extra)
    return path


def write_snapshot(folder: Path, broker: Broker, seq: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "snapshot.json").write_bytes(
        orjson.dumps({"seq": seq, "at": iso(T0 + 100), **broker.snapshot()}))


def replay(folder: Path, repair=False, now=END_T) -> tuple[Broker, Journal, int]:
    """Recover into a fresh broker, then let the clock reach `now` as the live run did
    (timers such as retry delays are not journaled: they follow from the clock)."""
    b = recorded(Broker(PREDEFINED, T0))
    j = Journal(folder, "always")
    n = j.recover(b, repair)
    os.close(j.fd)
    b.expire(now)
    return b, j, n


def replay_records(folder: Path, records: list[dict]) -> dict:
    """The state a clean journal of these records gives (the reference)."""
    write_journal(folder, records)
    return view(replay(folder)[0])


async def append_one(journal: Journal, record: dict) -> None:
    await journal.append([orjson.dumps(record)])
    await journal.close()


# ---------------------------------------------------------------- replay equals live

def test_replayed_state_equals_live_state_after_realistic_run(tmp_path):
    live, records = realistic_run()
    ops = {r["op"] for r in records}
    assert ops >= {"agent.registered", "agent.updated", "agent.deleted", "agent.drained",
                   "agent.resumed", "key.updated", "key.revoked", "task.submitted",
                   "task.assigned", "task.progressed", "task.completed", "task.failed",
                   "task.retried", "task.canceled", "task.cancel_requested", "task.requeued"}
    write_journal(tmp_path, records)
    replayed, journal, n = replay(tmp_path)
    assert n == len(records) and journal.seq == len(records)
    assert view(replayed) == view(live)
    assert view(replayed)["tasks"], "the run must leave tasks behind"
    # The urgent task lived in memory only.
    assert len(live.tasks) == len(replayed.tasks) + 1


def test_replay_after_task_and_agent_resets_matches_live(tmp_path):
    live, records = realistic_run()
    t = T0 + 10
    live.reset_tasks(t)
    kept = live.submit(submission("debug.echo"), OWNER, None, t + 1)
    live.reset_agents(t + 2)
    c = live.register_agent(agent_info(["debug.echo"]), t + 3)
    live.take(c.uid, kept.cap, kept.id, t + 4)
    records += [{"seq": i, **r} for i, r in enumerate(take_records(live), len(records) + 1)]
    write_journal(tmp_path, records)
    assert view(replay(tmp_path, now=t + 4)[0]) == view(live)
    assert [t["id"] for t in view(live)["tasks"]] == [kept.id]


def test_records_are_crc_checked_lines(tmp_path):
    _, records = realistic_run()
    for record in records:
        line = encode_record(record)
        assert line.endswith(b"}\n") and line.count(b"\n") == 1
        assert decode_record(line[:-1]) == record
    assert decode_record(b'{"seq":1,"op":"x","crc":1}') is None


# ---------------------------------------------------------------- torn tail

def test_torn_tail_at_every_byte_offset_is_dropped_and_truncated(tmp_path, caplog):
    live, records = realistic_run()
    before, last = records[:-1], records[-1]
    reference = replay_records(tmp_path / "ref", before)
    assert reference != view(live), "the last record must change the state"
    prefix = b"".join(encode_record(r) for r in before)
    line = encode_record(last)
    folder = tmp_path / "data"
    for cut in range(1, len(line)):  # line[:len(line)-1] lacks only its newline
        caplog.clear()
        path = write_journal(folder, before, extra=line[:cut])
        with caplog.at_level(logging.WARNING, logger="offloadmq"):
            replayed, journal, n = replay(folder)
        assert n == len(before), cut
        assert view(replayed) == reference, cut
        assert path.read_bytes() == prefix, cut
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"torn last record of {cut} bytes" in w for w in warnings), (cut, warnings)
    # After the truncation, the next append lands on a clean line boundary and replays.
    write_journal(folder, before, extra=line[:len(line) // 2])
    b = recorded(Broker(PREDEFINED, T0))
    j = Journal(folder, "always")
    j.recover(b)
    b.update_key("ck-after", ["*"], None, T0 + 50)
    asyncio.run(append_one(j, take_records(b)[0]))
    again, j2, n = replay(folder)
    assert n == len(before) + 1 and j2.seq == len(before) + 1
    assert "ck-after" in {k["key"] for k in view(again)["keys"]}


def test_whole_last_record_is_kept(tmp_path, caplog):
    live, records = realistic_run()
    write_journal(tmp_path, records)
    with caplog.at_level(logging.WARNING, logger="offloadmq"):
        replayed, _, n = replay(tmp_path)
    assert n == len(records) and view(replayed) == view(live)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_records_longer_than_the_read_buffer_replay_whole_or_torn(tmp_path, caplog):
    """Replay reads the journal in pieces: a record several pieces long (a big log
    update) replays whole, and is dropped when torn, like any other."""
    live = recorded(Broker(PREDEFINED, T0))
    uid = live.register_agent(agent_info(["debug.echo"]), T0).uid
    task = live.submit(submission("debug.echo"), OWNER, None, T0)
    live.take(uid, task.cap, task.id, T0)
    live.progress(uid, task.cap, task.id, None, "x" * 300_000, T0 + 1)
    records = [{"seq": n, **r} for n, r in enumerate(take_records(live), 1)]
    write_journal(tmp_path, records)
    replayed, _, n = replay(tmp_path, now=T0 + 1)
    assert n == len(records) and view(replayed) == view(live)
    assert len(replayed.tasks[task.key].log) == 300_000
    path = write_journal(tmp_path, records[:-1], extra=encode_record(records[-1])[:-1])
    with caplog.at_level(logging.WARNING, logger="offloadmq"):
        _, _, n = replay(tmp_path, now=T0 + 1)
    assert n == len(records) - 1
    assert path.read_bytes() == b"".join(encode_record(r) for r in records[:-1])
    assert any("torn last record" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- corruption mid-file

def test_garbage_mid_file_refuses_to_start_naming_file_line_and_remedy(tmp_path):
    _, records = realistic_run()
    lines = [encode_record(r) for r in records]
    bad_line = 6
    lines.insert(bad_line - 1, b"\x00\x00garbage that is not a record\n")
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"".join(lines))
    with pytest.raises(JournalCorrupt) as err:
        replay(tmp_path)
    message = str(err.value)
    assert f"{path}:{bad_line}:" in message
    assert "--repair" in message
    assert path.read_bytes() == b"".join(lines), "a refused start must not change the file"


def test_every_flipped_bit_of_a_mid_file_record_is_detected(tmp_path):
    _, records = realistic_run()
    lines = [encode_record(r) for r in records[:8]]
    target = 4  # 1-based line number of the damaged record
    path = tmp_path / "journal.jsonl"
    good = lines[target - 1]
    for bit in range(len(good) * 8):
        damaged = bytearray(good)
        damaged[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(b"".join(lines[:target - 1]) + bytes(damaged) + b"".join(lines[target:]))
        with pytest.raises(JournalCorrupt) as err:
            replay(tmp_path)
        assert f"{path}:{target}:" in str(err.value), bit
        assert "--repair" in str(err.value)


def test_record_that_does_not_apply_is_corruption(tmp_path):
    """A well-formed record that contradicts the state before it (here: a task assigned
    twice) is not silently applied."""
    _, records = realistic_run()
    assigned = next(i for i, r in enumerate(records) if r["op"] == "task.assigned")
    dup = {**records[assigned], "seq": len(records) + 1}
    path = write_journal(tmp_path, records + [dup, {**records[-1], "seq": len(records) + 2}])
    with pytest.raises(JournalCorrupt) as err:
        replay(tmp_path)
    assert f"{path}:{len(records) + 1}:" in str(err.value)


def test_repair_moves_the_rest_into_a_side_file_and_starts(tmp_path, caplog):
    _, records = realistic_run()
    good = records[:10]
    reference = replay_records(tmp_path / "ref", good)
    folder = tmp_path / "data"
    rest = b"not json at all\n" + b"".join(encode_record(r) for r in records[10:])
    path = write_journal(folder, good, extra=rest)
    with caplog.at_level(logging.WARNING, logger="offloadmq"):
        replayed, journal, n = replay(folder, repair=True)
    assert n == len(good) and view(replayed) == reference
    assert path.read_bytes() == b"".join(encode_record(r) for r in good)
    sides = list(folder.glob("journal-rejected-*.jsonl"))
    assert len(sides) == 1 and sides[0].read_bytes() == rest
    assert any("moved" in r.getMessage() and str(sides[0]) in r.getMessage() for r in caplog.records)
    # Appends continue with the next seq and the repaired journal replays cleanly.
    b = recorded(Broker(PREDEFINED, T0))
    j = Journal(folder)
    j.recover(b)
    b.update_key("ck-after", ["*"], None, T0 + 50)
    asyncio.run(append_one(j, take_records(b)[0]))
    again, j2, _ = replay(folder)
    assert j2.seq == len(good) + 1
    assert "ck-after" in {k["key"] for k in view(again)["keys"]}


# ---------------------------------------------------------------- snapshot plus tail

def test_snapshot_plus_journal_tail_equals_live(tmp_path):
    live, records = realistic_run()
    k = 15
    partial, _, _ = replay(_journal_dir(tmp_path / "prefix", records[:k]))
    folder = tmp_path / "data"
    write_snapshot(folder, partial, k)
    write_journal(folder, records[k:])
    replayed, journal, n = replay(folder)
    assert n == len(records) - k
    assert journal.snapshot_seq == k and journal.seq == len(records)
    assert view(replayed) == view(live)


def test_replay_skips_records_at_or_below_the_snapshot_seq(tmp_path):
    """A crash after the snapshot rename but before the journal was cut leaves the whole
    old journal next to the new snapshot: re-applying would raise (a task assigned twice),
    so recovery must skip every record the snapshot already holds."""
    live, records = realistic_run()
    k = 20
    partial, _, _ = replay(_journal_dir(tmp_path / "prefix", records[:k]))
    folder = tmp_path / "data"
    write_snapshot(folder, partial, k)
    write_journal(folder, records)
    replayed, journal, n = replay(folder)
    assert n == len(records) - k and journal.records_since_snapshot == len(records) - k
    assert view(replayed) == view(live)


def test_replay_skips_a_repeated_seq(tmp_path):
    live, records = realistic_run()
    doubled = records[:7] + [records[6]] + records[7:]
    write_journal(tmp_path, doubled)
    replayed, _, n = replay(tmp_path)
    assert n == len(records) and view(replayed) == view(live)


def test_leftover_temp_files_are_removed_at_start(tmp_path, caplog):
    live, records = realistic_run()
    write_journal(tmp_path, records)
    (tmp_path / "snapshot.json.tmp").write_bytes(b'{"seq": 99999, "tasks": [')
    (tmp_path / "journal.jsonl.tmp").write_bytes(b"half a jour")
    with caplog.at_level(logging.WARNING, logger="offloadmq"):
        replayed, journal, _ = replay(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    assert view(replayed) == view(live) and journal.snapshot_seq == 0
    assert sum("interrupted write" in r.getMessage() for r in caplog.records) == 2


def _journal_dir(folder: Path, records: list[dict]) -> Path:
    write_journal(folder, records)
    return folder


# ---------------------------------------------------------------- hub: compaction

def hub_config(folder: Path, **overrides) -> Config:
    return Config(data_path=folder, jwt_secret="s" * 32, agent_api_keys=("ak",),
                  client_api_keys=PREDEFINED, mgmt_token="mt", **overrides)


async def drive(hub: Hub, n: int, caps=("debug.echo",)) -> list:
    tasks = await asyncio.gather(*[
        hub.submit(submission(caps[i % len(caps)], payload={"i": i}), OWNER, None, None)
        for i in range(n)])
    return [task for task, _ in tasks]


async def test_compaction_during_concurrent_appends_loses_nothing(tmp_path):
    hub = Hub(hub_config(tmp_path))
    hub.recover()
    agent = await hub.register_agent(agent_info(["debug.echo"], capacity=1000))
    first = await drive(hub, 50)
    for task in first[:20]:
        await hub.take(agent.uid, task.cap, task.id)
    # Submits, takes and results keep arriving while the snapshot is written and cut,
    # and some records still wait for the writer at the moment the snapshot is taken.
    inflight = [asyncio.ensure_future(hub.submit(submission("debug.echo"), OWNER, None, None))
                for _ in range(100)]
    await asyncio.sleep(0)
    assert hub.journal.buffer and hub.journal.end_offset > hub.journal.size
    results = await asyncio.gather(
        hub.compact(),
        *[hub.resolve(agent.uid, t.cap, t.id, "success", None, {"r": t.id})
          for t in first[:10]],
        drive(hub, 100), *inflight)
    assert hub.journal.snapshot_seq > 0
    more = await drive(hub, 10)
    await hub.journal.close()
    live = view(hub.broker)
    assert len(live["tasks"]) == 260 and live["counts"]["completed"] == 10

    snap = orjson.loads((tmp_path / "snapshot.json").read_bytes())
    seqs = [decode_record(line)["seq"] for line in (tmp_path / "journal.jsonl").read_bytes().splitlines()]
    assert seqs == list(range(snap["seq"] + 1, snap["seq"] + 1 + len(seqs))), \
        "the journal after compaction holds exactly the records after the snapshot"

    again = Hub(hub_config(tmp_path))
    again.recover()
    await again.journal.close()
    assert view(again.broker) == live
    assert more[-1].key in again.broker.tasks and results


async def test_no_event_is_shown_before_its_change_is_on_disk(tmp_path):
    """An urgent change needs no disk and is shown at once; it must not carry along the
    events of an earlier regular change whose record still waits for its write."""
    hub = Hub(hub_config(tmp_path))
    hub.recover()
    await hub.register_agent(agent_info(["debug.echo"]))  # urgent tasks need one online
    on_disk = hub.journal.size
    shown_early = []

    def check() -> None:
        if hub.events.released >= regular_events and hub.journal.size == on_disk:
            shown_early.append(hub.events.released)
    regular = asyncio.ensure_future(hub.submit(submission("debug.echo"), OWNER, None, None))
    await asyncio.sleep(0)
    regular_events = hub.events.seq
    assert hub.journal.buffer and hub.events.released < regular_events  # published, not written
    hub.events.on_publish = check
    await hub.submit(submission("debug.echo", urgent=True), OWNER, None, None)
    await regular
    assert not shown_early, "a regular task's events were shown before its record was on disk"
    assert hub.events.released == hub.events.seq  # and all of them once it was
    await hub.journal.close()


async def test_compaction_drops_old_ended_tasks_and_replay_agrees(tmp_path):
    clock = [T0]
    hub = Hub(hub_config(tmp_path, retention_s=100.0), clock=lambda: clock[0])
    hub.recover()
    agent = await hub.register_agent(agent_info(["debug.echo"], capacity=10))
    old = await drive(hub, 3)
    for task in old:
        await hub.take(agent.uid, task.cap, task.id)
        await hub.resolve(agent.uid, task.cap, task.id, "success", None, 1)
    clock[0] += 1000
    fresh = await drive(hub, 2)
    await hub.compact()
    assert all(t.key not in hub.broker.tasks for t in old)
    assert all(t.key in hub.broker.tasks for t in fresh)
    clock[0] += 1
    await drive(hub, 1)
    await hub.journal.close()
    again = Hub(hub_config(tmp_path, retention_s=100.0), clock=lambda: clock[0])
    again.recover()
    await again.journal.close()
    assert view(again.broker) == view(hub.broker)
    assert again.journal.records_since_snapshot == 1


async def test_shutdown_while_a_compaction_rotates_closes_cleanly(tmp_path):
    """Hub.stop cancels the background loop; if that loop is waiting for the rotation,
    the writer must still finish it, and closing the journal must not raise."""
    b = recorded(Broker(PREDEFINED, T0))
    journal = Journal(tmp_path, "everysec")
    journal.recover(b)
    b.update_key("ck-new", ["*"], None, T0)
    await journal.append([orjson.dumps(r) for r in take_records(b)])
    rotate = journal._rotate
    journal._rotate = lambda cut: (time.sleep(0.2), rotate(cut))
    compaction = asyncio.ensure_future(journal.compact(b.snapshot, T0 + 1))
    while journal.rotation is None:
        await asyncio.sleep(0.01)
    compaction.cancel()
    with pytest.raises(asyncio.CancelledError):
        await compaction
    await journal.close()
    assert journal.fd == -1
    assert (tmp_path / "journal.jsonl").read_bytes() == b""
    again, j2, n = replay(tmp_path)
    assert n == 0 and j2.snapshot_seq == 1 and view(again) == view(b)


async def test_everysec_and_no_policies_replay_the_same(tmp_path):
    for policy in ("everysec", "no"):
        folder = tmp_path / policy
        hub = Hub(hub_config(folder, fsync=policy), clock=lambda: T0)
        hub.recover()
        await drive(hub, 30)
        await hub.journal.close()
        again = Hub(hub_config(folder, fsync=policy), clock=lambda: T0)
        again.recover()
        await again.journal.close()
        assert view(again.broker) == view(hub.broker) and len(again.broker.tasks) == 30


# ---------------------------------------------------------------- real process

CAP = "debug.echo"


def take_and_resolve(srv, bearer, task_id, output):
    path = f"{quote(CAP, safe='')}/{task_id}"
    status, body = http("POST", f"{srv.url}/private/agent/take/{path}", headers=bearer)
    if status != 200:
        return status
    status, body = http("POST", f"{srv.url}/private/agent/task/resolve/{path}",
                        {"id": {"cap": CAP, "id": task_id}, "capability": CAP,
                         "status": {"success": 0.01}, "output": output}, headers=bearer)
    return status


def regular_tasks(srv) -> dict:
    status, listing = http("GET", srv.url + "/management/tasks/list", headers=srv.mgmt)
    assert status == 200, listing
    regular = listing["regular"]
    found = {t["id"]["id"]: t for t in regular["unassigned"]}
    found.update({t["id"]["id"]: t for t in regular["assigned"]})
    return found


@pytest.mark.parametrize("step", ["snapshot-written", "snapshot-renamed",
                                  "journal-written", "journal-renamed"])
def test_crash_at_each_compaction_step_recovers_every_acknowledged_task(make_server, step):
    srv = make_server(extra_env={"OFFLOADMQ_CRASH_AT": step, "OFFLOADMQ_COMPACT_MB": "0.005"},
                      script=Path(__file__).parent / "crashing_server.py")
    srv.start()
    bearer = srv.new_agent([CAP], capacity=1000)
    submitted, resolved = [], {}
    deadline = time.monotonic() + 20
    while srv.proc.poll() is None and time.monotonic() < deadline:
        try:
            status, body = http("POST", srv.url + "/api/task/submit",
                                {"capability": CAP, "payload": {"n": len(submitted)}},
                                headers=srv.client, timeout=5)
            if status == 201:
                submitted.append(body["id"]["id"])
            if len(submitted) % 3 == 0:
                task_id = submitted[len(submitted) // 2]
                if task_id not in resolved and take_and_resolve(srv, bearer, task_id, task_id) == 200:
                    resolved[task_id] = task_id
        except OSError:
            break
    srv.proc.wait(timeout=10)
    if step.startswith("snapshot"):  # the forked writer died there, and the server with it
        assert srv.proc.returncode == -signal.SIGKILL, srv.output()[-3000:]
    else:
        assert srv.proc.returncode == 99, srv.output()[-3000:]
    leftovers = {p.name for p in srv.data.glob("*.tmp")}
    if step == "snapshot-written":
        assert "snapshot.json.tmp" in leftovers
    if step == "journal-written":
        assert "journal.jsonl.tmp" in leftovers

    srv.extra_env, srv.script = {}, ROOT / "offloadmq.py"
    srv.start()
    assert not list(srv.data.glob("*.tmp"))
    found = regular_tasks(srv)
    missing = [t for t in submitted if t not in found]
    assert not missing, f"{len(missing)} of {len(submitted)} acknowledged submits lost"
    for task_id, output in resolved.items():
        assert found[task_id]["status"] == "completed" and found[task_id]["result"] == output
    assert len(submitted) > 10 and resolved
    # The agent's token from before the crash still works.
    status, _ = http("GET", srv.url + "/private/agent/ping", headers=bearer)
    assert status == 200
    # The recovered folder compacts and restarts cleanly again.
    srv.kill()
    srv.start()
    assert set(regular_tasks(srv)) >= set(submitted)


def test_server_drops_torn_tail_and_keeps_serving(make_server):
    srv = make_server()
    srv.start()
    ids = []
    for i in range(5):
        status, body = http("POST", srv.url + "/api/task/submit", {"capability": CAP, "payload": i},
                            headers=srv.client)
        assert status == 201
        ids.append(body["id"]["id"])
    srv.kill()
    path = srv.data / "journal.jsonl"
    whole = path.read_bytes()
    lines = whole.splitlines(keepends=True)
    torn = lines[-1][: len(lines[-1]) // 2]
    path.write_bytes(b"".join(lines[:-1]) + torn)
    srv.start()
    assert f"torn last record of {len(torn)} bytes" in srv.output()
    assert path.read_bytes() == b"".join(lines[:-1])
    found = regular_tasks(srv)
    assert set(ids[:-1]) <= set(found) and ids[-1] not in found
    status, body = http("POST", srv.url + "/api/task/submit", {"capability": CAP}, headers=srv.client)
    assert status == 201
    srv.kill()
    srv.start()
    assert body["id"]["id"] in regular_tasks(srv)


def test_server_refuses_corrupt_journal_then_starts_with_repair(make_server):
    srv = make_server()
    srv.start()
    ids = []
    for i in range(6):
        status, body = http("POST", srv.url + "/api/task/submit", {"capability": CAP, "payload": i},
                            headers=srv.client)
        ids.append(body["id"]["id"])
    srv.stop()
    path = srv.data / "journal.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 6
    damaged = bytearray(lines[2])
    damaged[len(damaged) // 2] ^= 0x04
    path.write_bytes(b"".join(lines[:2]) + bytes(damaged) + b"".join(lines[3:]))
    with pytest.raises(RuntimeError) as err:
        srv.start()
    assert srv.proc.returncode == 2
    assert f"{path}:3:" in str(err.value) and "--repair" in str(err.value)
    srv.extra_args = ["--repair"]
    srv.start()
    assert set(regular_tasks(srv)) == set(ids[:2])
    assert len(list(srv.data.glob("journal-rejected-*.jsonl"))) == 1


def test_replay_queues_only_the_tasks_still_waiting(tmp_path):
    """Tasks that ended within the journal leave no queue entries behind, so the first
    claim after a restart does not wade through them; waiting tasks keep their order."""
    live = recorded(Broker(PREDEFINED, T0))
    uid = live.register_agent(agent_info(["debug.echo"], capacity=1000), T0).uid
    done = [live.submit(submission("debug.echo", payload=i), OWNER, None, T0 + i * 1e-3)
            for i in range(300)]
    for task in done:
        live.offer(uid, T0 + 1)
        live.take(uid, task.cap, task.id, T0 + 1)
        live.resolve(uid, task.cap, task.id, "success", None, None, T0 + 1)
    waiting = [live.submit(submission("debug.echo", payload=i), OWNER, None, T0 + 2 + i * 1e-3)
               for i in range(5)]
    write_journal(tmp_path, [{"seq": n, **r} for n, r in enumerate(take_records(live), 1)])
    b, _, _ = replay(tmp_path, now=T0 + 3)
    entries = [e for q in b.queues.values() for turns in q.levels.values()
               for heap in turns.values() for e in heap]
    assert sorted(e[0] for e in entries) == [t.id for t in waiting]
    b.touch(uid, T0 + 3)
    assert [b.offer(uid, T0 + 3).id for _ in waiting] == [t.id for t in waiting]


# ---------------------------------------------------------------- replay equals apply

def random_run(rng: random.Random, steps: int) -> tuple[list[dict], Broker]:
    """A live broker driven by random calls - most tasks run to an end, some wait, fail,
    retry, get canceled or requeued; agents and keys change too. Its journal records,
    and the broker."""
    b = recorded(Broker(PREDEFINED, T0, rng=random.Random(rng.random())))
    caps = ["debug.echo", "vision[gpu]", "llm.chat"]
    owners = [OWNER, owner_of("ck-pre")]
    t = T0
    for _ in range(3):
        b.register_agent(agent_info(rng.sample(caps, rng.randint(1, 3)), capacity=5), t)
    for _ in range(steps):
        t += rng.choice((0.0, 0.001, 0.001, 0.5, 7.0))
        agents, tasks = list(b.agents), list(b.tasks.values())
        uid = rng.choice(agents) if agents else None
        held = [key for a in b.agents.values() for key in sorted(a.held)]
        task = b.tasks[rng.choice(held)] if held and rng.random() < 0.8 \
            else rng.choice(tasks) if tasks else None
        roll = rng.random()
        try:
            if roll < 0.25:
                extras = rng.choice(({}, {}, {"priority": rng.randint(0, 9)},
                                     {"restartable": True, "retryDelaySecs": rng.choice((0, 2))},
                                     {"delaySecs": 3}, {"runAt": iso(t + 1)}, {"timeoutSecs": 20},
                                     {"maxWaitSecs": 30}, {"maxRetries": 0, "restartable": True}))
                data = parse_submission({"capability": rng.choice(caps),
                                         "payload": {"n": rng.random()}, **extras})
                b.submit(data, rng.choice(owners), None, t, rng.choice((None, None, "idem")))
            elif roll < 0.45 and uid:
                b.touch(uid, t)
                offered = b.offer(uid, t)
                if offered is not None and rng.random() < 0.9:
                    b.take(uid, offered.cap, offered.id, t)
            elif roll < 0.55 and task:
                b.take(uid, task.cap, task.id, t)  # without a poll: leaves a stale queue entry
            elif roll < 0.65 and task:
                b.progress(task.agent_id or uid, task.cap, task.id, rng.choice((None, "s")),
                           rng.choice((None, "", "line\n")), t)
            elif roll < 0.85 and task:
                b.resolve(task.agent_id or uid, task.cap, task.id,
                          rng.choice(("success", "success", "failure", "notExecuted")),
                          "why", rng.choice((None, {"out": 1})), t)
            elif roll < 0.9 and task:
                b.cancel(task.cap, task.id, task.owner, t)
            elif roll < 0.93 and task:
                b.requeue(task.cap, task.id, t)
            elif roll < 0.95 and uid:
                b.drain_agent(uid, rng.random() < 0.5, t)
            elif roll < 0.96 and uid:
                b.update_agent(uid, agent_info(rng.sample(caps, 2), capacity=3), t)
            elif roll < 0.965 and uid:
                b.delete_agent(uid, t)
                b.register_agent(agent_info(caps, capacity=5), t)
            elif roll < 0.975:
                b.update_key(rng.choice(("ck-new", "ck-pre")), ["*"], rng.choice((None, 9)), t)
            elif roll < 0.976:
                b.reset_tasks(t)
            elif roll < 0.98:
                b.drop_retained(rng.choice((0, 30, 1e9)), rng.randint(0, 20), t)
            else:
                b.expire(t)
        except OffloadError:
            pass  # refused: changes nothing, journals nothing
    return [{"seq": n, **r} for n, r in enumerate(take_records(b), 1)], b


def settled(state: dict, now: float) -> dict:
    """A view with the waits that are over by `now` dropped: live, a timer ended them;
    after a restart, the first tick does (timers are not journaled)."""
    for task in state["tasks"]:
        if task["status"] == "pending" and task["notBefore"] is not None and task["notBefore"] <= now:
            task["notBefore"] = None
    return state


def test_a_requeued_timed_out_task_gets_its_timeout_again_from_the_requeue(tmp_path):
    b = recorded(Broker(PREDEFINED, T0))
    task = b.submit(parse_submission({"capability": "debug.echo", "timeoutSecs": 20}), OWNER, None, T0)
    b.expire(T0 + 21)
    assert task.status == "failed"
    b.requeue(task.cap, task.id, T0 + 100)
    b.expire(T0 + 110)
    assert task.status == "pending", "not failed again at once by the first timeout"
    write_journal(tmp_path, [{"seq": n, **r} for n, r in enumerate(take_records(b), 1)])
    again, _, _ = replay(tmp_path, now=T0 + 110)
    assert view(again) == view(b), "nor after a restart"
    for broker in (b, again):
        broker.expire(T0 + 121)
    assert again.tasks[task.key].status == task.status == "failed"
    assert view(again) == view(b)


def full_state(b: Broker) -> dict:
    """view() plus what replay rebuilds besides the durable records: in-flight counts,
    idempotency index, timers and the tasks each ready queue would hand out."""
    def live(entry: tuple[str, str]) -> bool:  # Broker._live without dropping stale entries
        task = b.tasks.get((entry[1], entry[0]))
        return task is not None and task.status == PENDING and task.in_heap \
            and task.not_before is None

    ready = {slot: sorted((prio, owner, entry) for prio, turns in q.levels.items()
                          for owner, heap in turns.items() for entry in heap if live(entry))
             for slot, q in b.queues.items()}
    return {**view(b), "ready": {slot: entries for slot, entries in ready.items() if entries},
            "in_flight": {o: n for o, n in b.in_flight_by_owner.items() if n},
            "idempotent": b.idempotent, "timers": sorted(b.timers), "ended": list(b.ended),
            "offered": {uid: a.offered for uid, a in b.agents.items()}}


@pytest.mark.parametrize("seed", range(8))
def test_replay_builds_the_state_that_applying_each_record_builds(tmp_path, seed):
    """Replay takes shortcuts (counts and queues built once at the end); the state must
    be the one that applying the records one by one, as the live broker did, gives."""
    rng = random.Random(seed)
    records, live = random_run(rng, 1500)
    assert {"task.completed", "task.failed", "task.retried", "task.requeued", "tasks.dropped"} <= {
        r["op"] for r in records}
    reference = recorded(Broker(PREDEFINED, T0))
    for record in records:
        reference.apply(record)
    write_journal(tmp_path, records)
    b = recorded(Broker(PREDEFINED, T0))
    journal = Journal(tmp_path, "always")
    assert journal.recover(b) == len(records)
    os.close(journal.fd)
    assert full_state(b) == full_state(reference)
    last = max(parse_iso(r["at"]) for r in records)
    assert settled(view(b), last) == settled(view(live), last), \
        "what was live before the restart is there after it"
    assert any(b.queues.values()) and b.timers, "the run must leave work behind"
    for now in (T0 + 3600, T0 + 7200):  # and time passing treats both alike
        for broker in (b, reference):
            broker.expire(now)
        assert full_state(b) == full_state(reference)


@pytest.mark.parametrize("seed", range(3))
def test_postgres_load_and_follow_build_the_state_that_applying_each_record_builds(pg_url, seed):
    """The same on the PostgreSQL store: the records go through its group commit; a
    restart loads them, a standby applies them batch by batch as they come, and one that
    lagged behind a compaction starts again from the snapshot: each gives the state that
    applying the records one by one gave."""
    from offloadmq import PostgresStore
    records, live = random_run(random.Random(seed), 1500)
    reference = recorded(Broker(PREDEFINED, T0))
    for record in records:
        reference.apply(record)
    last = max(parse_iso(r["at"]) for r in records)

    async def run():
        writer, standby, lagging = PostgresStore(pg_url), PostgresStore(pg_url), PostgresStore(pg_url)
        followed, behind = recorded(Broker(PREDEFINED, T0)), recorded(Broker(PREDEFINED, T0))
        for store, broker in ((writer, Broker()), (standby, followed), (lagging, behind)):
            await store.open()
            await store.load(broker)
        assert await writer.try_lead() and not await standby.try_lead()
        await writer.lead()
        lines = [orjson.dumps({k: v for k, v in r.items() if k != "seq"}) for r in records]
        for start in range(0, len(lines), 97):  # batches, as turns of the loop make them
            await writer.append(lines[start:start + 97])
            assert await standby.catch_up(followed)
        restarted = recorded(Broker(PREDEFINED, T0))
        again = PostgresStore(pg_url)
        await again.open()
        assert await again.load(restarted) == len(records)
        assert await writer.compact(reference.snapshot, last)
        assert not await lagging.catch_up(behind), "the records it lacks are compacted away"
        behind = recorded(Broker(PREDEFINED, T0))
        assert await lagging.load(behind) == 0 and lagging.seq == len(records)
        for store in (writer, standby, lagging, again):
            await store.close()
        return followed, restarted, behind

    followed, restarted, behind = asyncio.run(run())
    assert full_state(restarted) == full_state(reference)
    assert full_state(followed) == full_state(reference)
    assert settled(view(behind), last) == settled(view(reference), last) == settled(view(live), last)


# ---------------------------------------------------------------- journals of earlier versions

def test_a_journal_written_before_the_rename_of_requeue_ops_replays_to_the_same_state(tmp_path):
    """Before the rename a retry was journaled as `task.requeued` and a management requeue
    as `task.revived`; such a journal (lines as the earlier server wrote them) still
    replays, each record meaning what it meant then."""
    data = {"capability": "job", "urgent": False, "restartable": True, "payload": None,
            "fetchFiles": [], "artifacts": []}

    def at(s):
        return iso(T0 + s)

    old = [
        {"op": "agent.registered", "at": at(0), "agent": {
            "uid": "A1", "key": "k1", "registeredAt": T0, "capabilities": ["job"], "tier": 0,
            "capacity": 2, "systemInfo": {}}},
        *[{"op": "task.submitted", "at": at(1), "task": {"cap": "job", "id": tid, "data": data,
                                                           "owner": OWNER, "createdAt": T0 + 1}}
          for tid in ("T1", "T2")],
        {"op": "task.assigned", "at": at(2), "cap": "job", "id": "T1", "agentId": "A1"},
        {"op": "task.assigned", "at": at(2), "cap": "job", "id": "T2", "agentId": "A1"},
        # the retry of T1 after a failed attempt, in the old vocabulary
        {"op": "task.requeued", "at": at(3), "cap": "job", "id": "T1", "notBefore": None,
         "declined": False, "reason": "failed on agent A1: boom; retry 1 of 3"},
        {"op": "task.failed", "at": at(4), "cap": "job", "id": "T2", "reason": "gave up",
         "result": None},
        # management requeue of the dead letter T2, in the old vocabulary
        {"op": "task.revived", "at": at(5), "cap": "job", "id": "T2"},
    ]
    write_journal(tmp_path, [{"seq": n, **r} for n, r in enumerate(old, 1)])
    b, _, n = replay(tmp_path, now=T0 + 6)
    assert n == len(old)
    t1, t2 = b.tasks[("job", "T1")], b.tasks[("job", "T2")]
    assert (t1.status, t1.attempts, t1.agent_id) == ("pending", 1, None)
    assert t1.history[-1][1] == "failed on agent A1: boom; retry 1 of 3"
    assert (t2.status, t2.attempts, t2.result) == ("pending", 0, None)
    assert t2.history[-1][1] == "requeued by management"
    assert not b.agents["A1"].held

    # The same story told by today's server, in the new vocabulary, gives the same state.
    new = [dict(r) for r in old]
    new[5]["op"], new[7]["op"] = "task.retried", "task.requeued"
    again = tmp_path / "new"
    write_journal(again, [{"seq": n, **r} for n, r in enumerate(new, 1)])
    b2, _, _ = replay(again, now=T0 + 6)
    assert view(b2) == view(b)


def test_a_record_encoded_by_the_core_is_written_as_encode_record_would_write_it():
    """The core encodes each record once, before applying it; the journal adds seq and
    crc around those bytes instead of encoding the record again."""
    from offloadmq import encode_line
    b = recorded(Broker(PREDEFINED, T0))
    uid = b.register_agent(agent_info(["debug.echo"]), T0).uid
    task = b.submit(submission("debug.echo", payload={"n": [1, {"x": "é"}]}), OWNER, None, T0)
    b.offer(uid, T0)
    b.take(uid, task.cap, task.id, T0)
    for seq, change in enumerate(b.out, 1):
        line = encode_line(seq, change.line)
        assert line == encode_record({"seq": seq, **change.record})
        assert decode_record(line) == {"seq": seq, **change.record}


# ---------------------------------------------------------------- disk faults (a tmpfs filled for real)

BIG = {"pad": "x" * 60_000}


def durable(state: dict) -> dict:
    """A view without pending_by_cap, which counts urgent tasks too."""
    return {k: v for k, v in state.items() if k != "pending_by_cap"}


async def started_hub(folder: Path, clock: list, **overrides) -> tuple[Hub, object]:
    hub = Hub(hub_config(folder, **overrides), clock=lambda: clock[0])
    hub.recover()
    agent = await hub.register_agent(agent_info(["debug.echo"], capacity=10))
    return hub, agent


async def submit(hub: Hub, payload=None, urgent=False):
    task, _ = await hub.submit(submission("debug.echo", urgent=urgent, payload=payload), OWNER, None, None)
    return task


async def test_a_refused_write_takes_memory_back_to_the_disk_and_keeps_urgent_tasks(tiny_disk):
    clock = [T0]
    hub, agent = await started_hub(tiny_disk, clock)
    kept = [await submit(hub, {"i": i}) for i in range(3)]
    await hub.take(agent.uid, kept[0].cap, kept[0].id)
    urgent = await submit(hub, urgent=True)
    regular_waiter = asyncio.ensure_future(hub.poll(kept[1].cap, kept[1].id, OWNER, 30))
    urgent_waiter = asyncio.ensure_future(hub.poll(urgent.cap, urgent.id, OWNER, 30))
    await asyncio.sleep(0)
    before, old = view(hub.broker), hub.broker
    filler = fill(tiny_disk, leave=30_000)

    # One batch: three big submits and a resolve; it cannot be written whole.
    results = await asyncio.gather(
        *[submit(hub, BIG) for _ in range(3)],
        hub.resolve(agent.uid, kept[0].cap, kept[0].id, "success", None, 1),
        return_exceptions=True)
    assert all(isinstance(r, StorageFull) for r in results), results
    assert hub.broker is not old and view(hub.broker) == before
    assert (tiny_disk / "journal.jsonl").stat().st_size == hub.journal.size
    assert (tiny_disk / "journal.jsonl").read_bytes().endswith(b"\n"), "the partial write was cut"
    clock[0] += 1
    from_disk, _, _ = replay(tiny_disk, now=clock[0])
    assert durable(view(from_disk)) == durable(before), "memory is what a restart would rebuild"

    # What never depended on the disk stays as it was.
    assert hub.broker.tasks[urgent.key] is urgent and hub.broker.counts[(True, "pending")] == 1
    assert agent.uid in hub.broker.online
    await asyncio.sleep(0)
    assert isinstance(regular_waiter.exception(), StorageFull), "its task may have been undone"
    assert not urgent_waiter.done()
    reset = hub.events.ring[-1]
    assert b"event: reset\n" in reset.frame and hub.events.released == reset.id, "streams hear of it"
    assert not hub.metrics.totals.get(("completed", "debug.echo")), "nothing refused is counted"

    # Refused up front while the disk stays full, memory untouched; a ping is a contact.
    with pytest.raises(StorageFull):
        await submit(hub, {"late": 1})
    with pytest.raises(StorageFull):
        await submit(hub, urgent=True)
    clock[0] += 1
    assert (await hub.ping(agent.uid, set()))["released"] == []
    assert hub.broker.agents[agent.uid].last_contact == clock[0]
    assert view(hub.broker) == before
    assert hub.health()["status"] == "unhealthy" and hub.health()["reason"] == "storage_full"
    assert hub.readiness() == {"ready": False, "role": "leader", "reason": "storage_full"}
    assert not hub.journal.probe()

    filler.unlink()
    assert hub.journal.probe() and hub.health()["status"] == "healthy"
    assert hub.readiness() == {"ready": True, "role": "leader"}
    taken = await hub.take(agent.uid, urgent.cap, urgent.id)
    await hub.resolve(agent.uid, taken.cap, taken.id, "success", None, "ok")
    await asyncio.wait_for(urgent_waiter, 5)
    late = await submit(hub, BIG)
    await hub.journal.close()
    again, _, _ = replay(tiny_disk, now=clock[0])
    assert view(again) == view(hub.broker) and late.key in again.tasks


async def test_everysec_write_refused_later_still_goes_back_to_the_disk(tiny_disk):
    clock = [T0]
    hub, agent = await started_hub(tiny_disk, clock, fsync="everysec")
    await submit(hub, {"i": 1})
    await asyncio.sleep(0.01)
    before = view(hub.broker)
    fill(tiny_disk, leave=30_000)
    await submit(hub, BIG)  # everysec answers before the write: the documented trade
    await asyncio.sleep(0.01)
    assert view(hub.broker) == before
    with pytest.raises(StorageFull):
        await submit(hub, {"i": 2})
    await hub.journal.close()


async def test_compaction_on_a_full_disk_keeps_the_files_and_retries_later(tiny_disk, caplog):
    caplog.set_level(logging.INFO, "offloadmq")
    clock = [T0]
    hub, agent = await started_hub(tiny_disk, clock)
    for _ in range(5):
        await submit(hub, BIG)
    journal = (tiny_disk / "journal.jsonl").read_bytes()
    filler = fill(tiny_disk, leave=100_000)
    await hub.compact()
    assert "compaction failed" in caplog.text and "No space left" in caplog.text
    assert (tiny_disk / "journal.jsonl").read_bytes() == journal
    assert not (tiny_disk / "snapshot.json").exists() and not list(tiny_disk.glob("*.tmp"))
    assert hub.journal.fault is None and hub.health()["status"] == "healthy"
    await submit(hub, {"small": 1})  # writes go on

    filler.unlink()
    caplog.clear()
    await hub.compact()
    assert not (tiny_disk / "snapshot.json").exists(), "not before its retry time"
    clock[0] += offloadmq.COMPACT_RETRY_S + 1
    await hub.compact()
    assert (tiny_disk / "snapshot.json").exists() and "journal compacted" in caplog.text
    await hub.journal.close()
    again, _, _ = replay(tiny_disk, now=clock[0])
    assert view(again) == view(hub.broker)


async def test_a_journal_replaced_under_the_hub_is_lost_for_writes_and_memory_saved(tmp_path):
    clock = [T0]
    data = tmp_path / "data"
    hub, agent = await started_hub(data, clock)
    first = await submit(hub, {"i": 1})
    replacement = data / "other.jsonl"
    replacement.write_bytes(b"")
    os.replace(replacement, data / "journal.jsonl")
    with pytest.raises(StorageLost):
        await submit(hub, {"i": 2})
    assert hub.broker.tasks[first.key] is first, "reads go on from memory"
    assert not hub.journal.probe(), "a lost journal does not come back by itself"
    assert hub.health()["reason"] == "storage_lost"
    with pytest.raises(StorageLost):
        await submit(hub, {"i": 3})
    await hub.journal.close()

    rescued = list(tmp_path.glob("data-rescued-*.json"))
    assert len(rescued) == 1, "saved once, next to the data folder"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.replace(rescued[0], fresh / "snapshot.json")
    again, _, _ = replay(fresh, now=clock[0])
    assert view(again) == view(hub.broker)


# ---------------------------------------------------------------- retention in the hub

async def test_the_background_round_applies_retention_and_replay_agrees(tmp_path):
    clock = [T0]
    hub, agent = await started_hub(tmp_path, clock, retention_tasks=2, retention_s=3600.0)
    tasks = [await submit(hub, {"i": i}) for i in range(5)]
    for task in tasks:
        await hub.take(agent.uid, task.cap, task.id)
        await hub.resolve(agent.uid, task.cap, task.id, "success", None, 1)
    await hub.start()
    try:
        for _ in range(50):
            if len(hub.broker.ended) == 2:
                break
            await asyncio.sleep(0.1)
        assert [t.key in hub.broker.tasks for t in tasks] == [False, False, False, True, True]
        clock[0] += 3601  # and by age, the rest
        for _ in range(50):
            if not hub.broker.ended:
                break
            await asyncio.sleep(0.1)
        assert not hub.broker.ended
    finally:
        await hub.release_waiters()
        await hub.stop()
    again, _, _ = replay(tmp_path, now=clock[0])
    assert view(again) == view(hub.broker)


def test_retention_settings_from_flags_and_environment(tmp_path):
    secrets = {"JWT_SECRET": "j", "AGENT_API_KEYS": "a", "CLIENT_API_KEYS": "c", "MGMT_TOKEN": "m"}
    data = ["--data", str(tmp_path)]
    config = load_config(data, secrets, tmp_path)
    assert config.retention_s == 7 * 86400 and config.retention_tasks == 100_000
    config = load_config(data, {**secrets, "OFFLOADMQ_RETENTION_DAYS": "0.5",
                                "OFFLOADMQ_RETENTION_TASKS": "10"}, tmp_path)
    assert config.retention_s == 43200 and config.retention_tasks == 10
    config = load_config([*data, "--retention-days", "2", "--retention-tasks", "3"],
                         {**secrets, "OFFLOADMQ_RETENTION_DAYS": "0.5"}, tmp_path)
    assert config.retention_s == 2 * 86400 and config.retention_tasks == 3
    for bad in ({"OFFLOADMQ_RETENTION_DAYS": "soon"}, {"OFFLOADMQ_RETENTION_TASKS": "-1"},
                {"OFFLOADMQ_RETENTION_DAYS": "nan"}):
        with pytest.raises(SystemExit):
            load_config(data, {**secrets, **bad}, tmp_path)
