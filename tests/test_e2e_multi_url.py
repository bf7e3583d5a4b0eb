"""Clients and agents given several server URLs (WIRE.md, "Running on PostgreSQL"), with
real processes: a URL where nothing listens before a real server; a real server killed
with -9 and started again on its port while an agent serves and `as_completed` waits;
and a standby that is not ours (a small HTTP server in the test answering every
request `503 not_leader`, naming a leader) to check that the named leader is preferred
when it is configured and never followed when it is not."""
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from conftest import ROOT, ServerProcess, free_port, http
from test_e2e_agent import AgentProcess

from offloadmq import Client, Unreachable


class Standby(threading.Thread):
    """Answers every request as a standby does: 503, `Retry-After: 1`, the not_leader
    body naming `leader`. Keeps the request lines it got (and their headers)."""

    def __init__(self, leader=None):
        super().__init__(daemon=True)
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                seen.append((self.command, self.path, dict(self.headers)))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps({"error": {
                    "type": "not_leader", "status": 503, "leader": leader,
                    "message": f"this server is a standby; the leader is {leader}"}}).encode()
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(body)
            do_GET = do_POST = do_PUT = do_DELETE = answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def run(self):
        self.httpd.serve_forever(poll_interval=0.05)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def standbys():
    started = []

    def factory(leader=None):
        standby = Standby(leader)
        standby.start()
        started.append(standby)
        return standby
    yield factory
    for standby in started:
        standby.stop()


@pytest.fixture
def agents(tmp_path):
    """Agents registered with `--server <urls>` (a comma list); killed by pid after."""
    started = []

    def factory(server, urls, caps=("debug.echo",), capacity=2, serve_args=()):
        agent = AgentProcess(SimpleNamespace(url=urls, agent_key=server.agent_key),
                             tmp_path / f"agent{len(started)}", caps, capacity, serve_args)
        started.append(agent)
        return agent.register()
    yield factory
    for agent in started:
        agent.kill()


def nowhere() -> str:
    return f"http://127.0.0.1:{free_port()}"


def cli(*args, env):
    return subprocess.run([sys.executable, str(ROOT / "offloadmq.py"), *args], capture_output=True,
                          text=True, timeout=60, env=env)


def cli_env(**values):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOADMQ_")}
    return {**env, "PYTHONUNBUFFERED": "1", **values}


def completed(server) -> int:
    return http("GET", server.url + "/stats")[1]["tasks"]["regular"].get("completed", 0)


def test_agent_client_and_cli_go_on_past_a_url_where_nothing_listens(server, agents):
    urls = f"{nowhere()},{server.url}"
    agent = agents(server, urls)
    assert agent.identity["server"] == urls  # serve follows the same list
    agent.start()
    with Client(urls, server.client_key) as mq:
        handles = [mq.submit("debug.echo", {"n": n}) for n in range(20)]
        assert {h.id for h in mq.as_completed(handles, timeout=30)} == {h.id for h in handles}
        assert [h.result() for h in handles] == [{"n": n} for n in range(20)]
        assert mq.submit_blocking("debug.echo", {"urgent": 1}) == {"urgent": 1}
    # The CLI: --server, then OFFLOADMQ_URL, each with the dead URL first.
    done = cli("submit", "debug.echo", "--payload", '{"cli": 1}', "--wait", "--timeout", "30",
               "--server", urls, env=cli_env(OFFLOADMQ_API_KEY=server.client_key))
    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)
    assert task["result"] == {"cli": 1}
    done = cli("status", "debug.echo", task["id"]["id"],
               env=cli_env(OFFLOADMQ_URL=urls, OFFLOADMQ_API_KEY=server.client_key))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "completed"
    assert completed(server) == 21


def test_urls_where_nothing_listens_fail_fast_and_bad_ones_are_refused(tmp_path):
    with Client(f"{nowhere()},{nowhere()}", "ck", retry_s=0.3) as mq:
        started = time.monotonic()
        with pytest.raises(Unreachable):
            mq.submit("debug.echo")
        assert time.monotonic() - started < 10
    done = cli("status", "x", "y", "--server", "http://127.0.0.1:1,localhost:3069",
               env=cli_env(OFFLOADMQ_API_KEY="ck"))
    assert done.returncode == 2 and "http(s)://host[:port]" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_agent_and_as_completed_carry_on_across_a_kill_9_and_restart(make_server, agents):
    srv = make_server().start()
    urls = f"{nowhere()},{srv.url}"
    agent = agents(srv, urls, capacity=4).start()
    with Client(urls, srv.client_key) as mq:
        handles = [mq.submit("debug.echo", {"n": n}, restartable=True) for n in range(300)]
        seen = {}
        for handle in mq.as_completed(handles, timeout=120):
            seen[handle.id] = handle.result()
            if len(seen) == 60:
                srv.restart()  # kill -9, then the same port and data folder
        assert [seen[h.id] for h in handles] == [{"n": n} for n in range(300)]
        # Both went on without a restart of their own: new work is served.
        later = [mq.submit("debug.echo", {"later": n}) for n in range(5)]
        assert len(list(mq.as_completed(later, timeout=60))) == 5
    assert agent.proc.poll() is None
    assert completed(srv) == 305  # each task once: nothing lost, nothing run twice


def test_a_standby_naming_a_configured_leader_sends_the_client_straight_there(server, standbys):
    standby = standbys(leader=server.url + "/")  # another spelling of the same URL
    skipped = standbys(leader=server.url)
    with Client(f"{standby.url},{skipped.url},{server.url}", server.client_key) as mq:
        task = mq.submit("nobody.serves", {"x": 1})
        assert task.status()["status"] == "pending"
    assert [(m, p) for m, p, _ in standby.seen] == [("POST", "/api/task/submit")]
    assert skipped.seen == [], "the named leader is preferred to the next URL"


def test_a_leader_that_is_not_configured_is_never_followed(server, standbys, agents):
    trap = standbys()  # stands for a server the user never named: it must get nothing
    standby = standbys(leader=trap.url)
    urls = f"{standby.url},{server.url}"
    with Client(urls, server.client_key) as mq:
        task = mq.submit("debug.echo", {"followed": "the configured one"})
        agent = agents(server, urls).start()  # logs in, announces, opens its socket past the standby
        assert task.result(timeout=30) == {"followed": "the configured one"}
    assert trap.seen == [], f"requests went to an unconfigured leader: {trap.seen}"
    assert standby.seen, "the standby, first in the list, was asked"
    assert "not a configured server URL" in agent.output()


def test_while_only_standbys_answer_requests_wait_for_a_leader(tmp_path, standbys):
    """A failover in progress: every URL is a standby or down. A request waits (asking
    again every half second) instead of failing, and is answered once a leader is up."""
    standby = standbys()
    srv = ServerProcess(tmp_path / "data")  # its port is chosen; nothing listens there yet
    starter = threading.Timer(1.5, srv.start)
    starter.start()
    try:
        with Client(f"{standby.url},{srv.url}", srv.client_key, retry_s=0.5) as mq:
            started = time.monotonic()
            task = mq.submit("nobody.serves", {"waited": True})
            assert time.monotonic() - started >= 1.0
            assert task.status()["status"] == "pending"
        starter.join()
        status, listing = http("GET", srv.url + "/management/tasks/list", headers=srv.mgmt)
        mine = [t for part in listing["regular"].values() for t in part]
        assert [t["id"]["id"] for t in mine] == [task.id]
        assert len(standby.seen) >= 2
    finally:
        starter.join()
        srv.stop()


def test_a_stale_leader_named_by_a_standby_does_not_keep_the_next_url_from_its_turn(server, standbys):
    """URLs: a standby still naming the old leader, the new leader, the old leader (gone).
    After the named one fails, the round goes on after the standby: the new leader."""
    gone = nowhere()
    standby = standbys(leader=gone)
    with Client(f"{standby.url},{server.url},{gone}", server.client_key, retry_s=1, request_s=5) as mq:
        started = time.monotonic()
        task = mq.submit("nobody.serves", {"stale": True})
        assert time.monotonic() - started < 2, "it waited as if no server led"
        assert task.status()["status"] == "pending"
    assert len(standby.seen) == 1
