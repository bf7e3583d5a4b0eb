"""Task lifecycle control in the pure broker (explicit `now`): cancel, timeouts, retries
with backoff, dead letters, priority and fairness, delays, drain, per-key limits."""
import random

import pytest

from conftest import recorded, take_records
from offloadmq import (
    ASSIGNED, CANCEL_GRACE_S, CANCELED, COMPLETED, FAILED, MAX_RETRY_DELAY_S, PENDING, Broker,
    BadRequest, Conflict, TooManyRequests, agent_json, assigned_json, iso, listing_json,
    parse_submission, task_id_json,
)

T0 = 1_800_000_000.0


def agent(b, caps=("job",), capacity=1, tier=0, now=T0):
    return b.register_agent({"capabilities": list(caps), "tier": tier, "capacity": capacity,
                             "systemInfo": {}}, now).uid


def submit(b, now=T0, owner="alice", limit=None, **fields):
    return b.submit(parse_submission({"capability": "job", **fields}), owner, limit, now)


def claim(b, uid, now):
    task = b.offer(uid, now)
    return None if task is None else b.take(uid, task.cap, task.id, now)


# ---------------------------------------------------------------- cancel

def test_cancel_of_a_queued_task_is_immediate():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b)
    b.cancel(task.cap, task.id, "alice", T0 + 1)
    assert task.status == CANCELED and task.ended_at == pytest.approx(T0 + 1)
    assert b.offer(uid, T0 + 1) is None


def test_cancel_of_a_running_task_asks_the_agent_and_its_report_ends_it_canceled():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b, restartable=True)
    claim(b, uid, T0)
    b.cancel(task.cap, task.id, "alice", T0 + 1)
    assert task.status == ASSIGNED and task.cancel_requested_at is not None
    assert b.cancel_requests(uid) == [task]
    b.resolve(uid, task.cap, task.id, "failure", "killed", None, T0 + 2)
    assert task.status == CANCELED  # not retried although restartable
    assert b.cancel_requests(uid) == [] and b.agents[uid].load == 0


def test_cancel_grace_ends_the_task_and_a_late_report_conflicts():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b)
    claim(b, uid, T0)
    b.cancel(task.cap, task.id, "alice", T0 + 1)
    b.touch(uid, T0 + CANCEL_GRACE_S)
    b.expire(T0 + CANCEL_GRACE_S)
    assert task.status == ASSIGNED
    b.touch(uid, T0 + 1 + CANCEL_GRACE_S)
    b.expire(T0 + 1 + CANCEL_GRACE_S)
    assert task.status == CANCELED and "did not confirm" in task.history[-1][1]
    with pytest.raises(Conflict):
        b.resolve(uid, task.cap, task.id, "success", None, 1, T0 + 62)


def test_cancel_by_another_key_is_not_found_and_of_an_ended_task_conflicts():
    b = recorded(Broker())
    task = submit(b)
    with pytest.raises(Exception) as err:
        b.cancel(task.cap, task.id, "mallory", T0)
    assert err.value.status == 404
    b.cancel(task.cap, task.id, "alice", T0)
    with pytest.raises(Conflict):
        b.cancel(task.cap, task.id, "alice", T0)


# ---------------------------------------------------------------- timeouts

def test_max_wait_expires_a_task_nobody_took():
    b = recorded(Broker())
    task = submit(b, maxWaitSecs=10)
    b.expire(T0 + 9)
    assert task.status == PENDING
    b.expire(T0 + 10)
    assert task.status == FAILED and "expired" in task.history[-1][1]


def test_max_wait_does_not_touch_a_taken_task():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b, maxWaitSecs=10)
    claim(b, uid, T0 + 1)
    b.touch(uid, T0 + 11)
    b.expire(T0 + 11)
    assert task.status == ASSIGNED


def test_timeout_cancels_a_running_task_and_it_ends_failed_timeout():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b, timeoutSecs=30)
    claim(b, uid, T0)
    b.touch(uid, T0 + 30)
    b.expire(T0 + 30)
    assert task.cancel_reason == "timeout" and b.cancel_requests(uid) == [task]
    b.resolve(uid, task.cap, task.id, "failure", "killed", None, T0 + 31)
    assert task.status == FAILED and "timeout" in task.history[-1][1]


def test_timeout_of_a_queued_task_fails_it():
    b = recorded(Broker())
    task = submit(b, timeoutSecs=5)
    b.expire(T0 + 5)
    assert task.status == FAILED and "timeout" in task.history[-1][1]


def test_runtime_secs_is_handed_to_the_agent():
    b = recorded(Broker())
    uid = agent(b)
    submit(b, runtimeSecs=12.5)
    assert assigned_json(claim(b, uid, T0))["data"]["runtimeSecs"] == 12.5


# ---------------------------------------------------------------- retries and dead letters

def test_retry_waits_for_its_backoff_delay():
    b = recorded(Broker(rng=random.Random(1)))
    uid = agent(b)
    task = submit(b, restartable=True, retryDelaySecs=10)
    claim(b, uid, T0)
    b.resolve(uid, task.cap, task.id, "failure", "x", None, T0)
    due = task.not_before
    assert task.status == PENDING and 5 <= due - T0 < 15
    b.expire(due - 0.01)
    assert b.offer(uid, due - 0.01) is None
    b.expire(due)
    assert claim(b, uid, due) is task and task.attempts == 2


def test_backoff_doubles_and_is_capped():
    b = recorded(Broker(rng=random.Random(7)))
    task = submit(b, restartable=True, retryDelaySecs=100, maxRetries=20)
    delays = []
    for attempt in (1, 2, 3, 8):
        task.attempts = attempt
        delays.append(b._retry_delay(task))
    assert 50 <= delays[0] < 150 and 100 <= delays[1] < 300 and 200 <= delays[2] < 600
    assert delays[3] == MAX_RETRY_DELAY_S


def test_retry_storm_keeps_exact_attempt_counts_and_delays():
    b = recorded(Broker(rng=random.Random(3)))
    uid = agent(b, capacity=1000)
    tasks = [submit(b, now=T0 + i * 1e-4, restartable=True, maxRetries=2, retryDelaySecs=1)
             for i in range(1000)]
    now = T0
    for round_no in range(1, 4):
        now += 10  # past every delay of this round (at most 1 * 2 * 1.5 s)
        b.touch(uid, now)
        b.expire(now)
        taken = [claim(b, uid, now) for _ in range(1000)]
        assert all(t is not None for t in taken)
        for task in taken:
            assert task.attempts == round_no
            b.resolve(uid, task.cap, task.id, "failure", "boom", None, now)
            if task.status == PENDING:
                assert now + 0.5 * 2 ** (round_no - 1) <= task.not_before < now + 1.5 * 2 ** (round_no - 1)
    assert all(t.status == FAILED and t.attempts == 3 for t in tasks)
    assert b.offer(uid, now + 100) is None


def test_dead_letters_are_listed_and_can_be_requeued():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b)
    claim(b, uid, T0)
    b.resolve(uid, task.cap, task.id, "failure", "x", None, T0)
    listing = listing_json([t for t in b.tasks.values() if t.status == FAILED])
    assert [t["id"] for t in listing["regular"]["assigned"]] == [task_id_json(task)]
    assert listing_json([t for t in b.tasks.values() if t.status == COMPLETED])["regular"]["assigned"] == []
    b.requeue(task.cap, task.id, T0 + 1)
    assert task.status == PENDING and task.attempts == 0 and task.result is None
    assert claim(b, uid, T0 + 2) is task
    with pytest.raises(Conflict):
        b.requeue(task.cap, task.id, T0 + 3)


def test_retry_on_same_node_false_prefers_another_agent():
    b = recorded(Broker())
    first, second = agent(b), agent(b)
    task = submit(b, restartable=True, retryOnSameNode=False, retryDelaySecs=0)
    assert claim(b, first, T0) is task
    b.resolve(first, task.cap, task.id, "failure", "x", None, T0)
    b.expire(T0)
    assert b.offer(first, T0) is None
    assert claim(b, second, T0) is task


def test_retry_on_same_node_false_still_retries_when_no_other_agent_has_room():
    b = recorded(Broker())
    only = agent(b)
    task = submit(b, restartable=True, retryOnSameNode=False, retryDelaySecs=0)
    claim(b, only, T0)
    b.resolve(only, task.cap, task.id, "failure", "x", None, T0)
    b.expire(T0)
    assert claim(b, only, T0) is task


# ---------------------------------------------------------------- priority and fairness

def test_higher_priority_first_fifo_within_a_priority():
    b = recorded(Broker())
    uid = agent(b, capacity=10)
    low = submit(b, priority=1)
    mid1 = submit(b, now=T0 + 1)
    high = submit(b, now=T0 + 2, priority=9)
    mid2 = submit(b, now=T0 + 3)
    assert [b.offer(uid, T0 + 4) for _ in range(4)] == [high, mid1, mid2, low]


def test_keys_take_turns_within_a_priority():
    b = recorded(Broker())
    uid = agent(b, capacity=100)
    bulk = [submit(b, now=T0 + i * 1e-3, owner="bulk") for i in range(10)]
    small = [submit(b, now=T0 + 1 + i, owner="small") for i in range(2)]
    order = [b.offer(uid, T0 + 5) for _ in range(12)]
    assert order[:4] == [bulk[0], small[0], bulk[1], small[1]]
    assert order[4:] == bulk[2:]


def test_priority_is_for_regular_tasks_and_validated():
    with pytest.raises(BadRequest):
        parse_submission({"capability": "job", "priority": 10})
    with pytest.raises(BadRequest):
        parse_submission({"capability": "job", "priority": "high"})
    with pytest.raises(BadRequest):
        parse_submission({"capability": "job", "urgent": True, "priority": 9})


# ---------------------------------------------------------------- delayed tasks

def test_delayed_task_is_not_handed_out_before_its_time():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b, delaySecs=30)
    assert b.offer(uid, T0 + 29) is None
    with pytest.raises(Conflict):
        b.take(uid, task.cap, task.id, T0 + 29)
    b.expire(T0 + 30)
    assert claim(b, uid, T0 + 30) is task


def test_run_at_is_an_absolute_time():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b, runAt=iso(T0 + 100))
    b.expire(T0 + 99)
    assert b.offer(uid, T0 + 99) is None
    b.touch(uid, T0 + 100)
    b.expire(T0 + 100)
    assert b.offer(uid, T0 + 100) is task


def test_run_at_and_delay_secs_together_are_rejected():
    with pytest.raises(BadRequest):
        parse_submission({"capability": "job", "runAt": iso(T0), "delaySecs": 1})
    with pytest.raises(BadRequest):
        parse_submission({"capability": "job", "runAt": "tomorrow"})


# ---------------------------------------------------------------- drain

def test_draining_agent_gets_nothing_new_and_keeps_its_tasks():
    b = recorded(Broker())
    uid = agent(b, capacity=2)
    running = submit(b)
    waiting = submit(b, now=T0 + 1)
    claim(b, uid, T0 + 2)
    b.drain_agent(uid, True, T0 + 3)
    assert b.offer(uid, T0 + 3) is None
    assert agent_json(b.agents[uid], True)["draining"] is True
    b.resolve(uid, running.cap, running.id, "success", None, 1, T0 + 4)
    assert running.status == COMPLETED
    b.drain_agent(uid, False, T0 + 5)
    assert b.offer(uid, T0 + 5) is waiting


def test_draining_higher_tier_does_not_hold_back_lower_tiers():
    b = recorded(Broker())
    high, low = agent(b, tier=9), agent(b, tier=1)
    task = submit(b)
    b.drain_agent(high, True, T0)
    assert b.offer(low, T0) is task


# ---------------------------------------------------------------- per-key limits

def test_max_in_flight_limits_queued_plus_running_tasks_per_key():
    b = recorded(Broker())
    uid = agent(b)
    first = submit(b, limit=2)
    submit(b, limit=2)
    with pytest.raises(TooManyRequests):
        submit(b, limit=2)
    submit(b, owner="bob", limit=2)  # other keys are not affected
    claim(b, uid, T0)
    with pytest.raises(TooManyRequests):
        submit(b, limit=2)  # running still counts
    b.resolve(uid, first.cap, first.id, "success", None, 1, T0)
    submit(b, limit=2)


def test_lifecycle_state_survives_replay():
    live = recorded(Broker(rng=random.Random(5)))
    uid = agent(live, capacity=3)
    a = submit(live, restartable=True, retryDelaySecs=50)
    c = submit(live, now=T0 + 1, timeoutSecs=500, priority=8)
    d = submit(live, now=T0 + 2, delaySecs=100)
    claim(live, uid, T0 + 3)
    claim(live, uid, T0 + 3)
    live.resolve(uid, a.cap, a.id, "failure", "x", None, T0 + 4)
    live.cancel(c.cap, c.id, "alice", T0 + 5)
    live.drain_agent(uid, True, T0 + 6)
    replayed = recorded(Broker())
    for record in take_records(live):
        replayed.apply(record)
    assert replayed.snapshot() == live.snapshot()
    for broker in (live, replayed):
        broker.touch(uid, T0 + 70)
        broker.expire(T0 + 70)  # c's cancel grace ran out
        assert broker.tasks[c.key].status == CANCELED
        assert broker.tasks[a.key].not_before is None and broker.tasks[d.key].not_before is not None


def test_declined_task_goes_to_another_agent_when_one_has_room():
    b = recorded(Broker())
    picky, other = agent(b), agent(b)
    task = submit(b, restartable=True)
    assert claim(b, picky, T0) is task
    b.resolve(picky, task.cap, task.id, "notExecuted", "no GPU", None, T0)
    assert task.status == PENDING and task.not_before is None  # back at once, no backoff
    assert b.offer(picky, T0) is None
    assert claim(b, other, T0) is task


def test_declined_task_returns_to_the_same_agent_when_it_is_the_only_one():
    b = recorded(Broker())
    only = agent(b)
    task = submit(b, restartable=True)
    claim(b, only, T0)
    b.resolve(only, task.cap, task.id, "notExecuted", "busy", None, T0)
    assert claim(b, only, T0) is task
