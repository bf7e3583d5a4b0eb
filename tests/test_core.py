"""The pure broker, driven with explicit `now`: no event loop, no HTTP, no sleeping.
The state machine, matching, tiers, capacity, leases, the LRU of agents, all-or-nothing
changes, heartbeats and what agents hold; then lifecycle control: cancel, timeouts,
retries with backoff, dead letters, priority and fairness, delays, drain, per-key limits."""
import json
import random

import pytest

import offloadmq
from conftest import (
    OWNER, T0, claim, core_agent as agent, core_submit as submit, recorded, take_records,
)
from offloadmq import (
    ASSIGNED, BadRequest, Broker, CANCELED, CANCEL_GRACE_S, COMPLETED, Conflict,
    DEFAULT_MAX_RETRIES, ENDED, FAILED, Forbidden, HOLD_GRACE_S, MAX_RETRY_DELAY_S, NotFound,
    ONLINE_S, PENDING, RUNNING, SchedulingImpossible, TASK_MOVES, TooManyRequests,
    URGENT_KEEP_S, URGENT_TAKE_S, UlidFactory, Unauthenticated, agent_json, assigned_json,
    base_capability, iso, listing_place, listing_row, parse_iso, parse_submission, pattern_allows,
    task_id_json,
)



def recording(broker):
    """From now on every change the broker's methods make lands in the list returned."""
    broker.out = []
    return broker.out


def durable_records(changes):
    return [c.record for c in changes if c.durable]


def poll_take(broker, uid, now=T0):
    task = claim(broker, uid, now)
    assert task is not None
    return task


# ---------------------------------------------------------------- state machine

def moves_from(state):
    """The states TASK_MOVES lets a task in `state` go to."""
    return {to or state for allowed, to in TASK_MOVES.values() if state in allowed}


def test_every_legal_transition_is_in_the_table_and_ended_states_are_final():
    assert moves_from(PENDING) == {ASSIGNED, FAILED, "canceled"}
    assert moves_from(ASSIGNED) >= {RUNNING, COMPLETED, FAILED, PENDING}
    assert moves_from(COMPLETED) == set()
    for dead_letter in (FAILED, "canceled"):  # only a management requeue revives them
        assert moves_from(dead_letter) == {PENDING}
        assert [op for op, (allowed, _) in TASK_MOVES.items() if dead_letter in allowed] == ["task.requeued"]


def test_full_lifecycle_pending_assigned_running_completed():
    b = Broker()
    uid = agent(b)
    task = submit(b)
    assert task.status == PENDING
    poll_take(b, uid, T0 + 1)
    assert task.status == ASSIGNED and task.agent_id == uid and task.assigned_at == pytest.approx(T0 + 1)
    b.progress(uid, task.cap, task.id, "working", "line 1\n", T0 + 2)
    assert task.status == RUNNING and task.stage == "working" and task.log == "line 1\n"
    b.progress(uid, task.cap, task.id, None, "line 2\n", T0 + 3)
    assert task.log == "line 1\nline 2\n" and task.stage == "working"
    b.resolve(uid, task.cap, task.id, "success", None, {"out": 1}, T0 + 4)
    assert task.status == COMPLETED and task.result == {"out": 1}
    assert [d for _, d in task.history] == ["submitted", f"attempt 1: assigned to agent {uid}", "completed"]


def test_illegal_move_raises_and_changes_nothing():
    b = Broker()
    uid = agent(b)
    task = submit(b)
    poll_take(b, uid)
    changes = []
    b.resolve(uid, task.cap, task.id, "success", None, 1, T0, changes=changes)
    before = (task.status, task.result, list(task.history))
    with pytest.raises(Conflict):
        b.resolve(uid, task.cap, task.id, "failure", "late", None, T0 + 1)
    with pytest.raises(Conflict):
        b.progress(uid, task.cap, task.id, "x", "y", T0 + 1)
    with pytest.raises(Conflict):
        b.take(uid, task.cap, task.id, T0 + 1, changes=changes)
    assert (task.status, task.result, list(task.history)) == before
    assert [c.op for c in changes] == ["task.completed"]


def test_illegal_move_from_pending_raises():
    b = Broker()
    uid = agent(b)
    task = submit(b)
    with pytest.raises(Forbidden):
        b.resolve(uid, task.cap, task.id, "success", None, 1, T0)
    with pytest.raises(Forbidden):
        b.progress(uid, task.cap, task.id, "x", None, T0)
    assert task.status == PENDING


def test_a_record_the_table_forbids_raises_and_changes_nothing():
    b = Broker()
    task = submit(b)
    for op in ("task.completed", "task.progressed", "task.retried", "task.requeued"):
        with pytest.raises(Conflict):
            b.apply({"op": op, "at": iso(T0 + 1), "cap": task.cap, "id": task.id, "result": 1,
                     "stage": None, "log": None, "reason": "x"})
    assert task.status == PENDING and task.result is None and len(task.history) == 1


# ---------------------------------------------------------------- matching

def test_bracketed_capability_serves_its_base_name():
    b = Broker()
    uid = agent(b, caps=["vision[gpu;cuda12]"])
    task = submit(b, cap="vision")
    assert base_capability("vision[gpu;cuda12]") == "vision"
    assert b.offer(uid, T0) is task


def test_agent_gets_nothing_it_does_not_serve_and_cannot_take_it():
    b = Broker()
    uid = agent(b, caps=["shell.bash"])
    task = submit(b, cap="debug.echo")
    assert b.offer(uid, T0) is None
    with pytest.raises(Forbidden):
        b.take(uid, task.cap, task.id, T0)


def test_urgent_before_regular_then_oldest_first_across_capabilities():
    b = Broker()
    uid = agent(b, caps=["a", "b"], capacity=10)
    r1 = submit(b, cap="b", now=T0)
    r2 = submit(b, cap="a", now=T0 + 1)
    u1 = submit(b, cap="a", urgent=True, now=T0 + 2)
    order = [b.offer(uid, T0 + 3) for _ in range(3)]
    assert order == [u1, r1, r2]
    assert b.offer(uid, T0 + 3) is None


def test_concurrent_pollers_are_offered_different_tasks():
    b = Broker()
    a1, a2 = agent(b), agent(b)
    t1, t2 = submit(b), submit(b, now=T0 + 0.001)
    assert b.offer(a1, T0) is t1
    assert b.offer(a2, T0) is t2
    with pytest.raises(Conflict):
        b.take(a2, t1.cap, t1.id, T0)  # offered to a1


def test_unclaimed_offer_lapses_back_to_the_queue():
    b = Broker()
    a1, a2 = agent(b), agent(b)
    task = submit(b)
    assert b.offer(a1, T0) is task
    assert b.offer(a2, T0 + 1) is None
    b.expire(T0 + 16)
    assert b.offer(a2, T0 + 16) is task
    b.take(a2, task.cap, task.id, T0 + 16)
    assert task.agent_id == a2


def test_released_offer_is_offered_again_at_once():
    b = Broker()
    a1, a2 = agent(b), agent(b)
    task = submit(b)
    b.offer(a1, T0)
    b.release_offer(task.key, T0)
    assert b.offer(a2, T0) is task


def test_poll_only_urgent_skips_regular_tasks():
    b = Broker()
    uid = agent(b)
    submit(b)
    assert b.offer(uid, T0, urgent_only=True) is None
    urgent = submit(b, urgent=True)
    assert b.offer(uid, T0, urgent_only=True) is urgent


def test_requeued_task_keeps_its_place_before_younger_tasks():
    b = Broker()
    uid = agent(b, capacity=2)
    old = submit(b, restartable=True, retryDelaySecs=0)
    young = submit(b, now=T0 + 1)
    poll_take(b, uid)
    b.resolve(uid, old.cap, old.id, "failure", "boom", None, T0 + 2)
    assert old.status == PENDING
    b.expire(T0 + 2)
    assert b.offer(uid, T0 + 3) is old
    assert b.offer(uid, T0 + 3) is young


# ---------------------------------------------------------------- tiers

def test_lower_tier_waits_while_a_higher_tier_agent_has_room():
    b = Broker()
    low, high = agent(b, tier=1), agent(b, tier=5)
    task = submit(b)
    assert b.offer(low, T0) is None
    assert b.offer(high, T0) is task


def test_lower_tier_gets_the_spill_over_when_higher_tiers_are_full():
    b = Broker()
    low, high = agent(b, tier=1), agent(b, tier=5)
    submit(b)
    second = submit(b, now=T0 + 1)
    poll_take(b, high)
    assert b.offer(low, T0 + 2) is second


def test_offline_higher_tier_agent_does_not_block_lower_tiers():
    b = Broker()
    high = agent(b, tier=5, now=T0)
    low = agent(b, tier=1, now=T0 + ONLINE_S)
    b.expire(T0 + ONLINE_S + 1)  # high's last contact is now too old
    task = submit(b, now=T0 + ONLINE_S + 1)
    assert high not in b.online
    assert b.offer(low, T0 + ONLINE_S + 1) is task


def test_tiers_do_not_hold_back_urgent_tasks():
    b = Broker()
    low, _high = agent(b, tier=1), agent(b, tier=5)
    task = submit(b, urgent=True)
    assert b.offer(low, T0) is task


# ---------------------------------------------------------------- capacity

def test_agent_at_capacity_is_offered_nothing_and_cannot_take():
    b = Broker()
    uid = agent(b, capacity=1)
    submit(b)
    other = submit(b, now=T0 + 1)
    poll_take(b, uid)
    assert b.offer(uid, T0) is None
    with pytest.raises(Conflict):
        b.take(uid, other.cap, other.id, T0)


def test_offers_count_against_capacity():
    b = Broker()
    uid = agent(b, capacity=2)
    t1, t2, _t3 = submit(b), submit(b, now=T0 + 1), submit(b, now=T0 + 2)
    assert b.offer(uid, T0) is t1
    assert b.offer(uid, T0) is t2
    assert b.offer(uid, T0) is None
    b.take(uid, t1.cap, t1.id, T0)
    b.take(uid, t2.cap, t2.id, T0)
    assert b.agents[uid].load == 2


def test_resolving_frees_capacity():
    b = Broker()
    uid = agent(b, capacity=1)
    task = submit(b)
    nxt = submit(b, now=T0 + 1)
    poll_take(b, uid)
    b.resolve(uid, task.cap, task.id, "success", None, None, T0)
    assert b.offer(uid, T0) is nxt


def test_only_the_holder_may_report():
    b = Broker()
    a1, a2 = agent(b), agent(b)
    task = submit(b)
    poll_take(b, a1)
    with pytest.raises(Forbidden):
        b.progress(a2, task.cap, task.id, "x", None, T0)
    with pytest.raises(Forbidden):
        b.resolve(a2, task.cap, task.id, "success", None, None, T0)
    assert task.status == ASSIGNED


# ---------------------------------------------------------------- outcomes and lost agents

def test_failure_of_a_plain_task_fails_it():
    b = Broker()
    uid = agent(b)
    task = submit(b)
    poll_take(b, uid)
    b.resolve(uid, task.cap, task.id, "failure", "exit 2", {"stderr": "x"}, T0)
    assert task.status == FAILED and task.result == {"stderr": "x"}
    assert "exit 2" in task.history[-1][1]


def test_restartable_task_is_retried_until_retries_run_out():
    b = Broker()
    uid = agent(b)
    task = submit(b, restartable=True)
    now = T0
    for attempt in range(1, DEFAULT_MAX_RETRIES + 2):
        now += 3600  # past any backoff
        b.touch(uid, now)
        b.expire(now)
        poll_take(b, uid, now)
        assert task.attempts == attempt
        b.resolve(uid, task.cap, task.id, "failure", f"try {attempt}", None, now)
    assert task.status == FAILED


def test_not_executed_requeues_restartable_and_fails_others():
    b = Broker()
    uid = agent(b, capacity=2)
    keep = submit(b, restartable=True)
    plain = submit(b, now=T0 + 1)
    poll_take(b, uid)
    poll_take(b, uid)
    b.resolve(uid, keep.cap, keep.id, "notExecuted", "busy", None, T0 + 2)
    b.resolve(uid, plain.cap, plain.id, "notExecuted", "busy", None, T0 + 2)
    assert keep.status == PENDING and keep.agent_id is None
    assert plain.status == FAILED


def test_lost_agent_requeues_restartable_and_fails_the_rest_with_reason():
    b = Broker()
    uid = agent(b, capacity=2)
    keep = submit(b, restartable=True)
    plain = submit(b, now=T0 + 1)
    poll_take(b, uid)
    poll_take(b, uid)
    b.expire(T0 + ONLINE_S + 1)
    assert uid not in b.online
    assert keep.status == PENDING and "went offline" in keep.history[-1][1]
    assert plain.status == FAILED and "went offline" in plain.history[-1][1]
    assert b.agents[uid].load == 0


def test_deleted_agent_is_gone_and_its_tasks_handled_as_lost():
    b = Broker()
    uid = agent(b)
    task = submit(b)
    poll_take(b, uid)
    b.delete_agent(uid, T0 + 1)
    assert uid not in b.agents and uid not in b.online
    assert task.status == FAILED and "deleted" in task.history[-1][1]
    with pytest.raises(NotFound):
        b.delete_agent(uid, T0 + 2)
    with pytest.raises(Unauthenticated):
        b.touch(uid, T0 + 2)


def test_reset_tasks_clears_queues_and_capacity():
    b = Broker()
    uid = agent(b)
    submit(b)
    poll_take(b, uid)
    submit(b, urgent=True)
    b.reset_tasks(T0)
    assert not b.tasks and b.agents[uid].load == 0 and b.offer(uid, T0) is None
    assert b.stats(T0)["tasks"] == {"urgent": {}, "regular": {}}


# ---------------------------------------------------------------- urgent tasks

def test_urgent_task_needs_an_online_agent():
    b = Broker()
    changes = []
    with pytest.raises(SchedulingImpossible):
        b.submit(parse_submission({"capability": "debug.echo", "urgent": True}), "o1", None, T0,
                 changes=changes)
    assert not b.tasks and not changes


def test_urgent_task_nobody_takes_expires_then_is_dropped_later():
    b = Broker()
    agent(b, caps=["other"])
    agent(b, caps=["debug.echo"], now=T0)
    task = submit(b, urgent=True, now=T0)
    b.expire(T0 + URGENT_TAKE_S - 1)
    assert task.status == PENDING
    b.expire(T0 + URGENT_TAKE_S)
    assert task.status == FAILED and "expired" in task.history[-1][1]
    b.expire(T0 + URGENT_TAKE_S + URGENT_KEEP_S - 1)
    assert task.key in b.tasks
    b.expire(T0 + URGENT_TAKE_S + URGENT_KEEP_S)
    assert task.key not in b.tasks


def test_urgent_tasks_are_never_durable_records():
    b = Broker()
    uid = agent(b)
    changes = recording(b)
    task = submit(b, urgent=True)
    poll_take(b, uid)
    b.progress(uid, task.cap, task.id, "s", "l", T0)
    b.resolve(uid, task.cap, task.id, "success", None, 1, T0)
    assert changes and durable_records(changes) == []
    changes.clear()
    submit(b)
    assert [r["op"] for r in durable_records(changes)] == ["task.submitted"]


def test_taken_urgent_task_does_not_expire():
    b = Broker()
    uid = agent(b)
    task = submit(b, urgent=True)
    poll_take(b, uid, T0 + 1)
    b.touch(uid, T0 + URGENT_TAKE_S + 5)
    b.expire(T0 + URGENT_TAKE_S + 5)
    assert task.status == ASSIGNED


# ---------------------------------------------------------------- LRU of agents

def test_online_agents_are_ordered_by_last_contact():
    b = Broker()
    a1, a2, a3 = agent(b, now=T0), agent(b, now=T0 + 1), agent(b, now=T0 + 2)
    assert list(b.online) == [a1, a2, a3]
    b.touch(a1, T0 + 3)
    assert list(b.online) == [a2, a3, a1]


def test_expiry_stops_at_the_first_recent_agent():
    b = Broker()
    old, recent = agent(b, now=T0), agent(b, now=T0 + 100)
    b.expire(T0 + ONLINE_S + 1)
    assert list(b.online) == [recent]
    assert {uid: b.is_online(a, T0 + ONLINE_S + 1) for uid, a in b.agents.items()} == {old: False, recent: True}
    b.touch(old, T0 + 200)
    assert list(b.online) == [recent, old]


def test_agent_update_changes_what_it_serves():
    b = Broker()
    uid = agent(b, caps=["a"])
    task = submit(b, cap="b")
    assert b.offer(uid, T0) is None
    b.update_agent(uid, {"capabilities": ["b"], "tier": 0, "capacity": 1, "systemInfo": {}}, T0)
    assert b.online_capabilities() == ["b"]
    assert b.offer(uid, T0) is task


# ---------------------------------------------------------------- keys, ids, patterns

def test_capability_patterns():
    assert pattern_allows(["*"], "anything")
    assert pattern_allows(["llm.*"], "llm.mistral")
    assert not pattern_allows(["llm.*"], "shell.bash")
    assert pattern_allows(["shell.bash"], "shell.bash")
    assert not pattern_allows(["shell.bash"], "shell.bash2")


def test_client_keys_update_and_revoke():
    b = Broker(predefined_keys=("pre",))
    assert b.client_key("pre").is_predefined
    b.update_key("new", ["llm.*"], None, T0)
    assert b.client_key("new").capabilities == ["llm.*"]
    assert b.client_key("nope") is None
    b.revoke_key("new", T0)
    assert b.client_key("new").is_revoked
    with pytest.raises(NotFound):
        b.revoke_key("nope", T0)


def test_task_of_another_owner_is_not_found():
    b = Broker()
    task = submit(b, owner="alice")
    assert b.task(task.cap, task.id, "alice") is task
    with pytest.raises(NotFound):
        b.task(task.cap, task.id, "bob")


def test_ids_sort_in_creation_order_within_one_millisecond():
    b = Broker()
    ids = [submit(b, now=T0).id for _ in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50 and all(len(i) == 26 for i in ids)


def test_replaying_records_rebuilds_the_same_state():
    live = Broker()
    changes = recording(live)
    uid = agent(live, capacity=3)
    t1 = submit(live, restartable=True)
    t2 = submit(live, now=T0 + 1)
    poll_take(live, uid, T0 + 2)
    live.progress(uid, t1.cap, t1.id, "s", "log", T0 + 3)
    live.resolve(uid, t1.cap, t1.id, "failure", "x", None, T0 + 4)
    poll_take(live, uid, T0 + 5)
    live.update_key("k", ["*"], 2, T0)
    replayed = Broker()
    for record in durable_records(changes):
        replayed.apply(record)
    assert replayed.snapshot() == live.snapshot()
    # t1 failed and waits out its retry delay, so the second poll got t2.
    assert replayed.agents[uid].held == live.agents[uid].held == {t2.key}
    replayed.touch(uid, T0 + 60)
    replayed.expire(T0 + 60)
    assert replayed.offer(uid, T0 + 60) is replayed.tasks[t1.key]


def test_claim_takes_the_oldest_task_of_its_capability_among_many():
    b = Broker()
    for i in range(20_000):
        submit(b, cap=f"cap{i % 1000}", now=T0 + i * 1e-3)
    uid = agent(b, caps=["cap7"])
    first = b.offer(uid, T0 + 100)
    assert first.cap == "cap7" and first is min(
        (t for t in b.tasks.values() if t.cap == "cap7"), key=lambda t: t.id)


def test_walking_the_fronts_finds_what_scanning_every_capability_finds():
    """An agent serving many capabilities finds work through the fronts index; under a
    random mix of submits, claims, ends, cancels and lapses it must pick exactly the task
    a look at each of its capabilities picks."""
    import random
    rng = random.Random(11)
    b = Broker(rng=random.Random(1))
    caps = [f"c{i}" for i in range(40)]
    wide = agent(b, caps=caps, capacity=1_000_000)
    narrow = [agent(b, caps=rng.sample(caps, 3), capacity=1_000_000, tier=rng.choice([0, 9]))
              for _ in range(4)]
    now, taken = T0, []
    for step in range(3000):
        now += 0.01
        for uid in (wide, *narrow):
            b.touch(uid, now)
        roll = rng.random()
        if roll < 0.45:
            submit(b, cap=rng.choice(caps), now=now, owner=rng.choice("abc"),
                   priority=rng.randint(0, 9), restartable=rng.random() < 0.3, retryDelaySecs=0)
        elif roll < 0.75:
            who = rng.choice((wide, *narrow))
            agent_ = b.agents[who]
            for urgent in (True, False):
                assert b._walk_fronts(agent_, urgent, now) is b._scan_heads(agent_, urgent, now)
            task = b.offer(who, now)
            if task is not None and rng.random() < 0.8:
                b.take(who, task.cap, task.id, now)
                taken.append((who, task))
        elif roll < 0.9 and taken:
            who, task = taken.pop(rng.randrange(len(taken)))
            if task.status in ("assigned", "running"):
                outcome = rng.choice(["success", "failure", "notExecuted"])
                b.resolve(who, task.cap, task.id, outcome, "x", None, now)
        elif roll < 0.95:
            pending = [t for t in b.tasks.values() if t.status == PENDING]
            if pending:
                victim = rng.choice(pending)
                b.cancel(victim.cap, victim.id, victim.owner, now)
        else:
            now += 16  # offers lapse, retry delays pass
            for uid in (wide, *narrow):
                b.touch(uid, now)
            b.expire(now)
    assert len(b.front_heaps.get(False, [])) <= 2 * len(b.fronts) + 65


def test_iso_writes_what_datetime_writes_to_the_millisecond():
    from datetime import datetime, timezone
    rng = random.Random(7)
    stamps = [0.0, 0.0005, 0.9999995, 1764627000.9995, 1764627000.0009995, 1790671559.4159994]
    stamps += [rng.uniform(0, 4e9) for _ in range(20_000)]
    stamps += [round(rng.uniform(1.7e9, 1.8e9), 3) + rng.choice((0.0, 0.0005, -5e-7)) for _ in range(20_000)]
    for ts in stamps:
        expected = datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        assert iso(ts) == expected, ts
        assert abs(parse_iso(iso(ts)) - ts) < 0.001


# ---------------------------------------------------------------- all or nothing

def deep(levels):
    value = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_a_record_that_cannot_be_encoded_changes_nothing():
    """The core encodes each record before applying it: what cannot be stored is refused
    with the state, the queues and the caller's changes as they were."""
    b = Broker()
    uid = agent(b)
    changes = []
    with pytest.raises(BadRequest):
        b.submit(parse_submission({"capability": "debug.echo", "payload": deep(300)}), "o1", None,
                 T0, changes=changes)
    assert not b.tasks and not changes and b.counts.get((False, PENDING), 0) == 0
    task = submit(b)
    poll_take(b, uid)
    with pytest.raises(BadRequest):
        b.resolve(uid, task.cap, task.id, "success", None, deep(300), T0 + 1, changes=changes)
    assert task.status == ASSIGNED and task.result is None and not changes
    assert task.key in b.agents[uid].held
    b.resolve(uid, task.cap, task.id, "success", None, deep(250), T0 + 2, changes=changes)
    assert task.status == COMPLETED and [c.op for c in changes] == ["task.completed"]


def test_changes_say_what_happened_in_order_with_status_before_and_after():
    b = Broker()
    uid = agent(b)
    task = submit(b, restartable=True)
    changes = []
    b.offer(uid, T0)
    b.take(uid, task.cap, task.id, T0, changes=changes)
    b.resolve(uid, task.cap, task.id, "failure", "boom", None, T0 + 1, changes=changes)
    assert [(c.op, c.before, c.after, c.task) for c in changes] == [
        ("task.assigned", PENDING, ASSIGNED, task), ("task.retried", ASSIGNED, PENDING, task)]
    assert all(c.durable and c.line.startswith(b'{"op":') for c in changes)


def test_ids_and_agent_secrets_come_from_what_the_broker_is_given():
    def run():
        seeded = random.Random(42)
        b = Broker(ids=UlidFactory(seeded.getrandbits), new_secret=lambda: "secret-%d" % seeded.randrange(10**6))
        uid = agent(b)
        return uid, b.agents[uid].key, submit(b).id
    assert run() == run()


# ---------------------------------------------------------------- heartbeats and holding

def heartbeat_agent(b, heartbeat_s, now=T0, caps=("debug.echo",), capacity=1):
    info = {"capabilities": list(caps), "tier": 0, "capacity": capacity, "systemInfo": {},
            "heartbeatSecs": heartbeat_s}
    return b.register_agent(info, now).uid


def test_an_agent_with_a_heartbeat_is_offline_after_three_missed_beats():
    b = Broker()
    quick = heartbeat_agent(b, 5)
    classic = agent(b)
    task = submit(b, restartable=True)
    b.offer(quick, T0)
    b.take(quick, task.cap, task.id, T0)
    b.expire(T0 + 15)
    assert quick in b.online and task.status == ASSIGNED
    b.expire(T0 + 15.5)
    assert quick not in b.online and classic in b.online
    assert task.status == PENDING and f"agent {quick} went offline" in task.history[-1][1]
    b.expire(T0 + ONLINE_S + 1)
    assert classic not in b.online


def test_expiry_pops_each_window_from_its_front():
    b = Broker()
    fast = [heartbeat_agent(b, 2, now=T0 + i) for i in range(3)]
    slow = [agent(b, now=T0 + i) for i in range(3)]
    b.touch(fast[0], T0 + 4)
    b.expire(T0 + 8.5)  # fast[1] and fast[2] (last seen T0+1, T0+2) missed three beats of 2 s
    assert [u for u in fast if u in b.online] == [fast[0]]
    assert all(u in b.online for u in slow)
    assert list(b.online.windows[6.0]) == [fast[0]] and list(b.online.windows[ONLINE_S]) == slow


def test_a_heartbeat_change_moves_the_agent_to_its_new_window():
    b = Broker()
    uid = heartbeat_agent(b, 10)
    b.update_agent(uid, {"capabilities": ["debug.echo"], "tier": 0, "capacity": 1, "systemInfo": {}},
                   T0 + 1)
    assert b.agents[uid].heartbeat_s is None and b.agents[uid].online_s == ONLINE_S
    b.expire(T0 + 60)
    assert uid in b.online


def test_ping_releases_a_task_taken_but_never_started_back_to_the_queue():
    b = Broker()
    uid = agent(b)
    task = submit(b)  # not restartable: it never ran, so it goes back all the same
    poll_take(b, uid, T0)
    assert b.ping(uid, set(), T0 + HOLD_GRACE_S) == []  # within the grace: may be in flight
    assert task.status == ASSIGNED
    assert b.ping(uid, {task.key}, T0 + 60) == []
    assert b.ping(uid, set(), T0 + 60) == [task]
    assert task.status == PENDING and task.attempts == 0 and task.agent_id is None
    assert not b.agents[uid].held and "no longer holds it" in task.history[-1][1]
    assert b.offer(uid, T0 + 61) is task  # at once, to whoever polls


def test_ping_fails_a_started_task_its_agent_no_longer_holds_unless_restartable():
    b = Broker()
    uid = agent(b, capacity=2)
    once, again = submit(b), submit(b, restartable=True)
    poll_take(b, uid, T0)
    poll_take(b, uid, T0)
    for task in (once, again):
        b.progress(uid, task.cap, task.id, "running", None, T0 + 1)
    released = b.ping(uid, set(), T0 + 10)
    assert released == sorted([once, again], key=lambda t: t.key)
    assert once.status == FAILED and f"agent {uid} no longer holds it" in once.result["error"]
    assert again.status == PENDING and again.attempts == 1


def test_released_tasks_and_heartbeats_replay_to_the_same_state():
    live = Broker()
    changes = recording(live)
    uid = heartbeat_agent(live, 8, capacity=2)
    t1, t2 = submit(live), submit(live, restartable=True)
    poll_take(live, uid, T0)
    poll_take(live, uid, T0)
    live.progress(uid, t2.cap, t2.id, None, "x", T0 + 1)
    live.ping(uid, set(), T0 + 10)
    replayed = Broker()
    for record in durable_records(changes):
        replayed.apply(record)
    assert replayed.snapshot() == live.snapshot()
    assert replayed.agents[uid].heartbeat_s == 8 and replayed.tasks[t1.key].status == PENDING


# ---------------------------------------------------------------- cancel

def test_cancel_of_a_queued_task_is_immediate():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b)
    b.cancel(task.cap, task.id, OWNER, T0 + 1)
    assert task.status == CANCELED and task.ended_at == pytest.approx(T0 + 1)
    assert b.offer(uid, T0 + 1) is None


def test_cancel_of_a_running_task_asks_the_agent_and_its_report_ends_it_canceled():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b, restartable=True)
    claim(b, uid, T0)
    b.cancel(task.cap, task.id, OWNER, T0 + 1)
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
    b.cancel(task.cap, task.id, OWNER, T0 + 1)
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
    b.cancel(task.cap, task.id, OWNER, T0)
    with pytest.raises(Conflict):
        b.cancel(task.cap, task.id, OWNER, T0)


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


def test_timers_of_ended_tasks_are_dropped_without_running_expire():
    # A standby applies records but never runs `expire`: its timers must not pile up.
    b = recorded(Broker())
    uid = agent(b)
    done = submit(b, timeoutSecs=30)
    claim(b, uid, T0)
    b.resolve(uid, done.cap, done.id, "success", {}, None, T0 + 1)
    waiting = submit(b, timeoutSecs=30)
    assert len(b.timers) == 2
    assert b.drop_stale_timers() == 1
    assert [key for _, _, _, key, _ in b.timers] == [waiting.key]
    b.expire(T0 + 30)
    assert waiting.status == FAILED and "timeout" in waiting.history[-1][1]


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
    dead = [t for t in b.tasks.values() if t.status == FAILED]
    assert [(listing_place(t), listing_row(t)["id"]) for t in dead] == \
        [(("regular", "assigned"), task_id_json(task))]
    assert [t for t in b.tasks.values() if t.status == COMPLETED] == []
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
    submit(b, owner="o2", limit=2)  # other keys are not affected
    claim(b, uid, T0)
    with pytest.raises(TooManyRequests):
        submit(b, limit=2)  # running still counts
    b.resolve(uid, first.cap, first.id, "success", None, 1, T0)
    submit(b, limit=2)


def replay(records):
    broker = Broker()
    broker.begin_loading()
    for record in records:
        broker.apply(record)
    broker.end_loading()
    return broker


def test_max_queued_bytes_counts_the_encoded_tasks_per_key_and_replay_agrees():
    b = recorded(Broker())
    data = parse_submission({"capability": "echo", "payload": "x" * 100})
    size = len(json.dumps(data, separators=(",", ":")))
    first = b.submit(data, "o1", None, T0, max_queued_bytes=3 * size)
    b.submit(data, "o1", None, T0)
    b.submit(data, "o2", None, T0)
    assert b.bytes_by_owner == {"o1": 2 * size, "o2": size}
    with pytest.raises(TooManyRequests, match=f"maxQueuedBytes is {2 * size}"):
        b.submit(data, "o1", None, T0, max_queued_bytes=2 * size)
    b.cancel(first.cap, first.id, "o1", T0)
    assert b.bytes_by_owner["o1"] == size
    records = take_records(b)
    assert replay(records).bytes_by_owner == {"o1": size, "o2": size}
    b.requeue(first.cap, first.id, T0)  # management may requeue past the quota
    assert b.bytes_by_owner["o1"] == 2 * size
    b.reset_tasks(T0)
    assert not any(b.bytes_by_owner.values())


def test_key_rotation_is_a_record_that_replays_to_the_same_agent():
    b = recorded(Broker())
    uid = agent(b)
    live = b.agents[uid]
    old_key = live.key
    rotated = b.rotate_agent_key(uid, T0 + 1)
    assert rotated is live and live.key != old_key and live.tokens_after == T0 + 1
    records = take_records(b)
    assert records[-1]["op"] == "agent.key_rotated" and records[-1]["tokensAfter"] == T0 + 1
    again = replay(records).agents[uid]
    assert (again.key, again.tokens_after) == (live.key, T0 + 1)
    with pytest.raises(NotFound):
        b.rotate_agent_key("nope", T0)


def test_lifecycle_state_survives_replay():
    live = recorded(Broker(rng=random.Random(5)))
    uid = agent(live, capacity=3)
    a = submit(live, restartable=True, retryDelaySecs=50)
    c = submit(live, now=T0 + 1, timeoutSecs=500, priority=8)
    d = submit(live, now=T0 + 2, delaySecs=100)
    claim(live, uid, T0 + 3)
    claim(live, uid, T0 + 3)
    live.resolve(uid, a.cap, a.id, "failure", "x", None, T0 + 4)
    live.cancel(c.cap, c.id, OWNER, T0 + 5)
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


# ---------------------------------------------------------------- retention

def ended_run(n):
    """n regular tasks ending in the reverse of their creation order, one a second, plus
    an urgent ended task and a pending one (retention never drops those)."""
    b = recorded(Broker())
    uid = agent(b, capacity=1000)
    tasks = [submit(b, payload=i) for i in range(n)]
    for i, task in enumerate(reversed(tasks)):
        b.take(uid, task.cap, task.id, T0 + 1 + i)
        b.resolve(uid, task.cap, task.id, "success", None, i, T0 + 1 + i)
    urgent = submit(b, urgent=True)
    b.take(uid, urgent.cap, urgent.id, T0 + 1)
    b.resolve(uid, urgent.cap, urgent.id, "success", None, 0, T0 + 1)
    submit(b)
    return b, tasks


def replayed(b):
    """A fresh broker that applied `b`'s records since the last take_records."""
    again = Broker()
    for record in take_records(b):
        again.apply(record)
    return again


def test_retention_by_count_drops_the_earliest_ended_through_one_record():
    b, tasks = ended_run(6)
    again = replayed(b)
    assert b.drop_retained(1e9, 4, T0 + 10) == 2
    change = b.out[-1]
    assert change.op == "tasks.dropped" and change.durable
    assert change.record["tasks"] == [list(tasks[5].key), list(tasks[4].key)], "ended first, dropped first"
    assert all(t.key in b.tasks for t in tasks[:4])
    assert b.drop_retained(1e9, 4, T0 + 10) == 0
    again.apply(take_records(b)[-1])
    assert again.snapshot() == b.snapshot() and list(again.ended) == list(b.ended)


def test_retention_by_age_drops_what_ended_before_the_cutoff_and_never_a_live_or_urgent_task():
    b, tasks = ended_run(6)  # ended at T0+1 .. T0+6
    assert b.drop_retained(100, 1000, T0 + 103.5) == 3
    assert [t.key in b.tasks for t in tasks] == [True, True, True, False, False, False]
    assert sum(1 for t in b.tasks.values() if t.urgent) == 1 and b.counts[(False, PENDING)] == 1
    assert b.drop_retained(0, 0, T0 + 1e6) == 3 and not b.ended
    assert len(b.tasks) == 2, "the pending and the urgent task stay"
    assert replayed(b).snapshot() == b.snapshot()


def test_retention_drops_in_bounded_batches(monkeypatch):
    monkeypatch.setattr(offloadmq, "DROP_BATCH", 2)
    b, tasks = ended_run(5)
    assert [b.drop_retained(1e9, 0, T0 + 10) for _ in range(4)] == [2, 2, 1, 0]
    assert not any(t.status in ENDED and not t.urgent for t in b.tasks.values())


def test_a_requeued_task_leaves_retention_until_it_ends_again():
    b = Broker()
    tasks = [submit(b) for _ in range(3)]
    for i, task in enumerate(tasks):
        b.cancel(task.cap, task.id, OWNER, T0 + 1 + i)
    b.requeue(tasks[0].cap, tasks[0].id, T0 + 10)  # ended first; waits again
    assert tasks[0].key not in b.ended
    assert b.drop_retained(1e9, 0, T0 + 11) == 2 and tasks[0].key in b.tasks
    b.cancel(tasks[0].cap, tasks[0].id, OWNER, T0 + 12)
    assert list(b.ended) == [tasks[0].key]


def test_a_dropped_record_naming_a_task_not_ended_changes_nothing():
    b, tasks = ended_run(2)
    waiting = next(t for t in b.tasks.values() if t.status == PENDING)
    record = {"op": "tasks.dropped", "at": iso(T0 + 20),
              "tasks": [list(tasks[0].key), list(waiting.key)]}
    with pytest.raises(Conflict):
        b.apply(record)
    assert tasks[0].key in b.tasks and tasks[0].key in b.ended and waiting.key in b.tasks


def test_a_snapshot_keeps_the_order_tasks_ended_in():
    b, tasks = ended_run(5)
    again = Broker()
    again.begin_loading()
    again.load_snapshot(b.snapshot())  # which lists tasks by creation
    again.end_loading()
    assert list(again.ended) == list(b.ended) == [t.key for t in reversed(tasks)]


def test_adopting_memory_only_tasks_keeps_urgent_ones_as_they_were():
    """How the hub goes back to the disk: the rebuilt broker takes the urgent tasks
    (never journaled) of the one it replaces, same objects, with their timers."""
    b = recorded(Broker())
    uid = agent(b, capacity=3)
    regular = submit(b)
    held, waiting, ended = (submit(b, urgent=True) for _ in range(3))
    b.take(uid, held.cap, held.id, T0)
    b.take(uid, ended.cap, ended.id, T0)
    b.resolve(uid, ended.cap, ended.id, "success", None, 1, T0)
    rebuilt = replayed(b)
    rebuilt.touch(uid, T0)
    rebuilt.adopt_memory_only(b)
    assert rebuilt.tasks[held.key] is held and held.key in rebuilt.agents[uid].held
    assert rebuilt.tasks[ended.key] is ended and rebuilt.tasks[regular.key] is not regular
    assert rebuilt.offer(uid, T0) is waiting
    assert rebuilt.counts[(True, PENDING)] == 1 and rebuilt.counts[(True, COMPLETED)] == 1
    rebuilt.expire(T0 + URGENT_KEEP_S + URGENT_TAKE_S + 1)
    assert ended.key not in rebuilt.tasks, "an ended urgent task is still forgotten in time"


# ---------------------------------------------------------------- a push channel closing

def test_release_unstarted_requeues_assigned_tasks_and_keeps_started_ones():
    b = Broker()
    uid = agent(b, capacity=4)
    started, unstarted, canceled = submit(b), submit(b), submit(b)
    offered = submit(b)
    for task in (started, unstarted, canceled):
        b.offer(uid, T0)
        b.take(uid, task.cap, task.id, T0)
    assert b.offer(uid, T0) is offered  # polled, not taken
    b.progress(uid, started.cap, started.id, "running", None, T0 + 1)
    b.cancel(canceled.cap, canceled.id, OWNER, T0 + 1)
    changes = []
    released = b.release_unstarted(uid, T0 + 2, changes=changes)
    assert released == [unstarted, canceled]
    assert (unstarted.status, unstarted.agent_id, unstarted.attempts) == (PENDING, None, 0)
    assert canceled.status == CANCELED and started.status == RUNNING
    assert b.agents[uid].held == {started.key} and not b.agents[uid].offered
    assert [c.op for c in changes if c.durable] == ["task.released", "task.canceled"]
    # Another agent gets the released tasks at once, the offered one included.
    other = agent(b)
    assert claim(b, other, T0 + 2) in (unstarted, offered)
    assert b.release_unstarted("no-such-agent", T0 + 3) == []


def test_release_unstarted_replays_to_the_same_state():
    b = recorded(Broker())
    uid = agent(b)
    task = submit(b)
    claim(b, uid)
    b.release_unstarted(uid, T0 + 1)
    replayed = Broker()
    for record in take_records(b):
        replayed.apply(record)
    assert replayed.tasks[task.key].status == PENDING and replayed.tasks[task.key].attempts == 0
