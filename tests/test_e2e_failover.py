"""Failover with real processes: a throwaway PostgreSQL (conftest's `postgres`), two
servers on it (the first leads, the second is a standby), a real agent serving
(`offload_agent.py` with both URLs, on its WebSocket) and `offloadmq.Client` with both
URLs submitting. The leader is killed with -9 in the middle of the submits: every task
that was acknowledged completes exactly once, and the time from the kill to the first
2xx from the new leader is printed. A leader frozen for good (SIGSTOP) is left by the
agent, on the socket and over HTTP."""
import collections
import os
import re
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import ServerProcess, first_2xx_after, http, server_role as role
from test_e2e_agent import AgentProcess

from offloadmq import Client

TASKS = 300
KILL_AT = 100


def pg_server(folder, store, keys_of=None) -> ServerProcess:
    """A server on `store`; with `keys_of`, the same client/agent/management keys."""
    folder.mkdir(parents=True)
    srv = ServerProcess(folder / "data", extra_args=("--store", store))
    if keys_of is not None:
        srv.agent_key, srv.client_key, srv.mgmt_token = \
            keys_of.agent_key, keys_of.client_key, keys_of.mgmt_token
    return srv


def wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def pair(tmp_path, pg_url):
    leader = pg_server(tmp_path / "a", pg_url).start()
    wait_until(lambda: role(leader) == "leader", 30, "the first server to lead")
    standby = pg_server(tmp_path / "b", pg_url, keys_of=leader).start()
    wait_until(lambda: role(standby) == "standby", 30, "the second server to stand by")
    yield leader, standby
    for srv in (leader, standby):
        srv.kill()


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_kill_9_of_the_leader_loses_no_acknowledged_task_and_runs_none_twice(pair, tmp_path, transport):
    """The client's event stream is open (as_completed has begun) when the leader dies, so
    it resumes on the new leader; the agent reconnects its socket, or long-polls again."""
    leader, standby = pair
    urls = f"{leader.url},{standby.url}"
    agent = AgentProcess(SimpleNamespace(url=urls, agent_key=leader.agent_key), tmp_path / "agent",
                         ["debug.echo"], capacity=4, serve_args=("--transport", transport)).register().start()
    acked = []
    measured = {}

    def kill_the_leader_mid_run():
        wait_until(lambda: len(acked) >= KILL_AT + 20, 60, "submits after the stream opened")
        measured["kill_at"] = time.monotonic()
        leader.kill(signal.SIGKILL)
        measured["failover_s"] = first_2xx_after(measured["kill_at"], standby)
    killer = threading.Thread(target=kill_the_leader_mid_run, daemon=True)
    try:
        with Client(urls, leader.client_key) as mq:
            def submit(n):
                acked.append(mq.submit("debug.echo", {"n": n}))  # a 201: acknowledged
                time.sleep(0.005)
            for n in range(KILL_AT):
                submit(n)
            first = mq.as_completed(acked[:KILL_AT], timeout=120)
            ended = [next(first)]  # the client's event stream is live from here
            killer.start()
            for n in range(KILL_AT, TASKS):
                submit(n)
            killer.join(60)
            assert "failover_s" in measured, "the leader was not killed mid-run"
            ended += list(first) + list(mq.as_completed(acked[KILL_AT:], timeout=120))
            results = {h.id: h.result() for h in ended}
        assert [results[h.id] for h in acked] == [{"n": n} for n in range(TASKS)]
        stats = http("GET", standby.url + "/stats")[1]
        assert stats["tasks"]["regular"].get("completed") == TASKS, stats
        # One report of each task: a report whose answer the kill cut off is sent
        # again and finds its task ended (409), which says it was delivered.
        reported = collections.Counter(re.findall(
            r"task debug\.echo/(\w+)(?: resolved| ended before its report was sent again|: result refused: 409)",
            agent.output()))
        assert {h.id for h in acked} == set(reported), "a task the agent never reported"
        assert max(reported.values()) == 1, [i for i, n in reported.items() if n > 1]
        assert agent.proc.poll() is None
    finally:
        agent.kill()
    print(f"\nfailover ({transport} agent): kill -9 of the leader -> first 2xx from the new leader "
          f"{measured['failover_s']:.2f} s; {TASKS} acknowledged tasks, 0 lost, 0 run twice")


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_an_agent_and_a_client_leave_a_leader_frozen_for_good(pair, tmp_path, transport):
    """The leader is SIGSTOPped while the agent runs a task, and stays so: its
    connections stay open and silent. The standby ends its session and leads. The agent
    must notice the silence (on the socket, pings that get no pong; over HTTP, a
    heartbeat that gets no answer), deliver the result it had for the frozen leader to
    the new one, and serve it (it has one slot: the next task waits for that). The
    client, given both URLs and waiting on its event stream, must notice too (no
    heartbeat comes) and collect the result and submit at the new leader; so must a
    client waiting by polling (its held poll gets no answer)."""
    leader, standby = pair
    urls = f"{leader.url},{standby.url}"
    agent = AgentProcess(SimpleNamespace(url=urls, agent_key=leader.agent_key), tmp_path / "agent",
                         ["debug.echo", "shell.bash"], serve_args=("--transport", transport)
                         ).register().start()
    try:
        with Client(urls, leader.client_key) as mq:
            before = mq.submit("debug.echo", "before")
            assert [h.result() for h in mq.as_completed([before], timeout=30)] == ["before"]
            running = mq.submit("shell.bash", {"command": "sleep 2; echo late"})
            polled = {}

            def wait_by_polling() -> None:
                with Client(urls, leader.client_key) as other:  # no event stream: polls
                    polled["output"] = other.task("shell.bash", running.id).result(timeout=60)
                    polled["took"] = time.monotonic() - frozen
            poller = threading.Thread(target=wait_by_polling, daemon=True)
            poller.start()
            wait_until(lambda: running.status()["status"] == "running", 15, "the task to run")
            os.kill(leader.proc.pid, signal.SIGSTOP)
            frozen = time.monotonic()
            assert "late" in str(running.result(timeout=60))  # through the event stream
            assert mq.submit("debug.echo", "after").result(timeout=60) == "after"
            took = time.monotonic() - frozen
            assert mq.url == urls and role(standby) == "leader"
            poller.join(70)
            # A poll is held 10 s and given 5 s more; before, 60 s and 30 s more.
            assert "late" in str(polled.get("output")) and polled["took"] < 30, polled
        print(f"\n{transport} agent and client: SIGSTOP of the leader -> both tasks done on the "
              f"new leader in {took:.1f} s; the result by polling in {polled['took']:.1f} s")
        # The socket's pings and the heartbeat's short timeout find it in about 8 and 13 s,
        # the client's stream in at most 15 s; without them the socket waited for good, a
        # long poll 50 s and the stream 45 s (then 30 s more to open at the frozen leader);
        # without cutting the exchanges still open with it, the result waited 120 s.
        assert took < 30, agent.output()[-3000:]
        assert f"{leader.url} unavailable or not the leader; trying {standby.url}" in agent.output()
    except BaseException:
        print(f"agent log:\n{agent.output()[-6000:]}\nnew leader's log:\n{standby.output()[-4000:]}")
        raise
    finally:
        os.kill(leader.proc.pid, signal.SIGCONT)
        agent.kill()
