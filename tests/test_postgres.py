"""The PostgreSQL store with real processes and a real (throwaway) PostgreSQL: bad store
URLs and a newer schema refused in one line, asyncpg never loaded without it, two servers
on one database (one leads, the other answers 503 not_leader and follows its records),
kill -9 of the leader (the standby serves within 5 s with every acknowledged task), the
shared secrets, and event streams resumed across the failover.
"""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, ServerProcess, free_port, http

CAP = "debug.echo"


def pg_server(tmp_path, url, name, keys_from=None, **env):
    """A server on the store `url`; with `keys_from`, the same client/agent/management keys."""
    srv = ServerProcess(tmp_path / name, extra_env=env, extra_args=["--store", url])
    if keys_from is not None:
        srv.agent_key, srv.client_key, srv.mgmt_token = keys_from.agent_key, keys_from.client_key, keys_from.mgmt_token
    return srv


def headers_of(method, url, headers=None):
    """(status, headers, JSON body) of a request, errors included."""
    req = urllib.request.Request(url, method=method, headers=headers or {},
                                 data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, head, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        status, head, raw = err.code, err.headers, err.read()
    return status, head, json.loads(raw) if head.get("Content-Type", "").startswith("application/json") else raw


def wait_for(condition, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def store_seq(srv) -> int:
    return http("GET", srv.url + "/stats", headers=srv.mgmt)[1]["journal"]["seq"]


def ready(srv) -> tuple[int, dict]:
    return http("GET", srv.url + "/health/ready", timeout=5)


def run_server(tmp_path, *args, env=None, timeout=30):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOADMQ_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "offloadmq.py"), "--host", "127.0.0.1",
                           "--port", str(free_port()), "--data", str(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=timeout, env=environ, cwd=tmp_path)


# ---------------------------------------------------------------- optional, and refused clearly

def test_importing_offloadmq_does_not_load_asyncpg():
    done = subprocess.run([sys.executable, "-c", "import sys, offloadmq; print(sorted(m for m in sys.modules "
                           "if m.split('.')[0] == 'asyncpg'))"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("case", ["unreachable", "wrong password", "no such database", "no such schema"])
def test_an_unusable_store_url_is_one_line_and_exit_2(postgres, tmp_path, case):
    good = postgres.url()
    url = {"unreachable": f"postgresql://offloadmq:pw@127.0.0.1:{free_port()}/postgres",
           "wrong password": good.replace(postgres.password, "not-the-password"),
           "no such database": good.rsplit("/", 1)[0] + "/nosuchdb",
           "no such schema": postgres.url("nosuchschema")}[case]
    done = run_server(tmp_path, "--store", url)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot start" in lines[0] and "Remedy" in lines[0], output
    assert postgres.password not in output and "not-the-password" not in output, "no password in logs"
    assert not (tmp_path / "data").exists(), "nothing written to the data folder in PostgreSQL mode"


def test_a_store_url_that_is_not_postgresql_is_refused_by_the_options(tmp_path):
    done = run_server(tmp_path, env={"OFFLOADMQ_STORE": "mysql://db/x"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "must be a postgresql:// URL" in done.stderr


def test_a_database_written_by_a_newer_schema_is_refused(postgres, tmp_path):
    schema = postgres.new_schema()
    postgres.execute("CREATE TABLE offloadmq_meta (name text PRIMARY KEY, value text NOT NULL)", schema)
    postgres.execute("INSERT INTO offloadmq_meta VALUES ('schema_version', '99')", schema)
    done = run_server(tmp_path, "--store", postgres.url(schema))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "newer OffloadMQ" in lines[0] and "schema version 99" in lines[0]
    tables = postgres.execute(f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}'")
    assert [t[0] for t in tables] == ["offloadmq_meta"], "nothing created in a newer database"


# ---------------------------------------------------------------- leader and standby

def test_one_leads_the_other_follows_and_takes_over_within_5_s_of_a_kill_9(postgres, tmp_path):
    url = postgres.url(postgres.new_schema())
    leader = pg_server(tmp_path, url, "a").start()
    standby = pg_server(tmp_path, url, "b", keys_from=leader).start()
    try:
        assert ready(leader) == (200, {"ready": True, "role": "leader"})
        status, body = ready(standby)
        assert status == 503 and body["role"] == "standby" and body["leader"] == leader.url
        status, head, err = headers_of("POST", standby.url + "/api/task/submit", standby.client)
        assert status == 503 and head["Retry-After"] == "1"
        assert err["error"]["type"] == "not_leader" and err["error"]["leader"] == leader.url
        assert leader.url in err["error"]["message"]
        for path in ("/health", "/version", "/"):
            assert headers_of("GET", standby.url + path)[0] == 200, path
        for path in ("/stats", "/metrics", "/management/agents/list", "/private/agent/task/poll",
                     "/private/agent/ws", "/api/task/events", "/management/events", "/openapi.json"):
            assert headers_of("GET", standby.url + path, standby.mgmt)[0] == 503, path

        # Work on the leader: ended, running and pending tasks, an agent with a token.
        bearer = leader.new_agent([CAP], capacity=10)
        acked = [leader.submit(CAP, {"n": n}) for n in range(40)]
        for tid in acked[:10]:
            assert http("POST", leader.url + f"/private/agent/take/{CAP}/{tid['id']}", {}, bearer)[0] == 200
        for tid in acked[:5]:
            status, _ = http("POST", leader.url + f"/private/agent/task/resolve/{CAP}/{tid['id']}",
                             {"id": tid, "capability": CAP, "status": {"success": 0.1},
                              "output": {"done": tid["id"]}}, bearer)
            assert status == 200
        # The standby follows: its state is warm before the leader dies.
        wait_for(lambda: ready(standby)[1].get("seq") == store_seq(leader), what="the standby to follow")

        leader.kill()  # SIGKILL
        killed = time.monotonic()
        probe = f"{standby.url}/api/task/poll/{CAP}/{acked[-1]['id']}"
        while True:
            try:
                if http("GET", probe, headers=standby.client, timeout=1)[0] < 300:
                    break
            except OSError:
                pass
            assert time.monotonic() - killed < 30, standby.output()[-2000:]
            time.sleep(0.01)
        took = time.monotonic() - killed
        print(f"\nkill -9 of the leader to the first 2xx from the standby: {took:.2f} s")
        assert took < 5, standby.output()[-3000:]
        assert ready(standby) == (200, {"ready": True, "role": "leader"})
        assert re.search(r"leading at record \d+ \(0 applied at takeover\)", standby.output()), \
            "the standby had every record applied before it took over:\n" + standby.output()[-3000:]
        # Every acknowledged task is there, as it was.
        for n, tid in enumerate(acked):
            status, task = http("GET", f"{standby.url}/api/task/poll/{CAP}/{tid['id']}", headers=standby.client)
            assert status == 200, task
            expected = "completed" if n < 5 else "assigned" if n < 10 else "pending"
            assert task["status"] == expected, (n, task, standby.output()[-3000:])
            if n < 5:
                assert task["output"] == {"done": tid["id"]}
        # The agent's token from the old leader is good here: the JWT secret is the database's.
        status, _ = http("GET", standby.url + "/private/agent/ping", headers=bearer)
        assert status == 200
        status, _ = http("POST", standby.url + f"/private/agent/task/resolve/{CAP}/{acked[5]['id']}",
                         {"id": acked[5], "capability": CAP, "status": {"success": 0.1}, "output": 1}, bearer)
        assert status == 200
        # The old leader comes back as a standby of the new one.
        leader.start()
        status, body = ready(leader)
        assert status == 503 and body["leader"] == standby.url, (body, leader.output()[-3000:])
    finally:
        standby.kill()
        leader.kill()


def test_the_secrets_are_created_once_in_the_database_and_shared(postgres, tmp_path):
    url = postgres.url(postgres.new_schema())
    unset = {"AGENT_API_KEYS": "", "CLIENT_API_KEYS": "", "MGMT_TOKEN": ""}
    first = pg_server(tmp_path, url, "a", **unset).start()
    second = pg_server(tmp_path, url, "b", **unset).start()
    try:
        assert "first start: generated secrets" in first.output()
        assert "first start" not in second.output()
        stored = json.loads(postgres.execute("SELECT value FROM offloadmq_meta WHERE name = 'secrets'",
                                             url.rsplit("=", 1)[1])[0][0])
        assert not (tmp_path / "a" / "secrets.json").exists()
        mgmt = {"X-Mgmt-Token": stored["MGMT_TOKEN"]}
        assert http("GET", first.url + "/management/agents/list", headers=mgmt)[0] == 200
        status, reg = http("POST", first.url + "/agent/register", {
            "apiKey": stored["AGENT_API_KEYS"], "capabilities": [CAP], "tier": 0, "capacity": 1,
            "systemInfo": {}})
        assert status == 200
        first.kill()
        wait_for(lambda: ready(second)[0] == 200, what="the takeover")
        assert http("GET", second.url + "/management/agents/list", headers=mgmt)[0] == 200
        status, auth = http("POST", second.url + "/agent/auth", {"agentId": reg["agentId"], "key": reg["key"]})
        assert status == 200, auth
        status, _ = http("POST", second.url + "/api/task/submit", {"capability": CAP},
                         {"X-API-Key": stored["CLIENT_API_KEYS"]})
        assert status == 201
        # `offloadmq.py keys` shows them from the store, as it does from a data folder.
        shown = subprocess.run([sys.executable, str(ROOT / "offloadmq.py"), "keys", "--store", url],
                               capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0, shown.stderr
        assert all(stored[name] in shown.stdout for name in ("AGENT_API_KEYS", "CLIENT_API_KEYS", "MGMT_TOKEN"))
        assert "password" not in shown.stdout and postgres.password not in shown.stdout
    finally:
        first.kill()
        second.kill()


def read_events(sock: socket.socket, until: bytes, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while until not in got:
        chunk = sock.recv(1 << 16)
        assert chunk, got[-500:]
        got += chunk
    return got


def open_events(srv, headers: dict, query: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"GET /api/task/events{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode())
    return sock


def test_an_event_stream_resumed_on_the_new_leader_misses_no_result(postgres, tmp_path):
    """The reader saw events up to some id, then the leader ended a task and died before the
    reader got that `end`. On the new leader, resuming with its Last-Event-ID (only what
    happens from now: current=0) still brings that task's `end`."""
    url = postgres.url(postgres.new_schema())
    leader = pg_server(tmp_path, url, "a").start()
    standby = pg_server(tmp_path, url, "b", keys_from=leader).start()
    try:
        bearer = leader.new_agent([CAP])
        seen_task = leader.submit(CAP, "seen")
        sock = open_events(leader, leader.client, "?current=0")
        missed = leader.submit(CAP, "missed")
        got = read_events(sock, missed["id"].encode())
        last_id = re.findall(rb"^id: (\d+)$", got, re.M)[-1].decode()
        sock.close()
        for tid in (missed,):
            assert http("POST", leader.url + f"/private/agent/take/{CAP}/{tid['id']}", {}, bearer)[0] == 200
            assert http("POST", leader.url + f"/private/agent/task/resolve/{CAP}/{tid['id']}",
                        {"id": tid, "capability": CAP, "status": {"success": 0.1}, "output": "result"},
                        bearer)[0] == 200
        leader.kill()
        wait_for(lambda: ready(standby)[0] == 200, what="the takeover")
        sock = open_events(standby, {**standby.client, "Last-Event-ID": last_id}, "?current=0")
        got = read_events(sock, b"event: end")
        sock.close()
        end = json.loads(got.split(b"event: end\ndata: ", 1)[1].split(b"\n", 1)[0])
        assert end["id"] == missed and end["status"] == "completed" and end["result"] == "result"
        assert seen_task["id"].encode() not in got, "a task that did not end is not repeated"
    finally:
        standby.kill()
        leader.kill()


def assert_took_over_with(standby, acked) -> None:
    """The standby becomes ready and knows every task acknowledged before."""
    wait_for(lambda: ready(standby)[0] == 200, what="the takeover")
    for tid in acked:
        assert http("GET", f"{standby.url}/api/task/poll/{CAP}/{tid['id']}", headers=standby.client)[0] == 200


def test_a_leader_whose_session_ends_stops_and_the_standby_leads(postgres, tmp_path):
    """Fencing by the engine: the leader's session is terminated in PostgreSQL (as when
    keepalives find the network cut), so its lock is gone and it cannot write: it stops
    at once rather than serve a state it can no longer keep; the standby leads."""
    schema = postgres.new_schema()
    url = postgres.url(schema)
    leader = pg_server(tmp_path, url, "a").start()
    standby = pg_server(tmp_path, url, "b", keys_from=leader).start()
    try:
        acked = [leader.submit(CAP, n) for n in range(5)]
        holders = postgres.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            f"AND classid = {0x0FF10AD} AND objid = hashtext('{schema}')::oid")
        assert len(holders) == 1
        assert leader.proc.wait(timeout=10) == 70
        assert "connection to" in leader.output() and "stopping now" in leader.output()
        assert_took_over_with(standby, acked)
    finally:
        standby.kill()
        leader.kill()


def test_a_standby_stopped_across_a_compaction_starts_again_from_the_snapshot(postgres, tmp_path):
    """A standby that was frozen (SIGSTOP) while the leader compacted lacks records that no
    longer exist: it loads the snapshot and the records after it, and takes over with all."""
    url = postgres.url(postgres.new_schema())
    leader = pg_server(tmp_path, url, "a")
    leader.extra_args += ["--compact-mb", "0.002"]
    leader.start()
    standby = pg_server(tmp_path, url, "b", keys_from=leader).start()
    try:
        first = [leader.submit(CAP, {"n": n}) for n in range(5)]
        wait_for(lambda: ready(standby)[1].get("seq") == store_seq(leader), what="the standby to follow")
        os.kill(standby.proc.pid, signal.SIGSTOP)
        try:
            later = [leader.submit(CAP, {"n": n, "pad": "x" * 100}) for n in range(40)]
            wait_for(lambda: http("GET", leader.url + "/stats", headers=leader.mgmt)[1]["journal"]
                     ["lastCompactionAt"], what="a compaction")
            gone = postgres.execute("SELECT min(seq) FROM offloadmq_records", url.rsplit("=", 1)[1])[0][0]
            assert gone is None or gone > 6, "the records the standby lacks were deleted"
        finally:
            os.kill(standby.proc.pid, signal.SIGCONT)
        wait_for(lambda: ready(standby)[1].get("seq") == store_seq(leader), what="the standby to reload")
        assert "compacted past record" in standby.output()
        leader.kill()
        wait_for(lambda: ready(standby)[0] == 200, what="the takeover")
        for tid in first + later:
            assert http("GET", f"{standby.url}/api/task/poll/{CAP}/{tid['id']}", headers=standby.client)[0] == 200
    finally:
        standby.kill()
        leader.kill()


def test_the_store_and_advertised_url_come_from_flags_or_the_environment(tmp_path):
    from offloadmq import load_config
    config = load_config(["--store", "postgresql://u@db.invalid/q", "--port", "4000", "--data",
                          str(tmp_path / "data")], environ={}, cwd=tmp_path)
    assert config.store == "postgresql://u@db.invalid/q"
    assert config.advertise_url == f"http://{socket.gethostname()}:4000"
    assert config.jwt_secret == "" and not (tmp_path / "data").exists(), \
        "in PostgreSQL mode the secrets come from the database, not the data folder"
    config = load_config(["--host", "10.1.2.3", "--data", str(tmp_path / "d")], cwd=tmp_path, environ={
        "OFFLOADMQ_STORE": "postgres://u@db.invalid/q", "OFFLOADMQ_ADVERTISE_URL": "https://mq.example"})
    assert config.store == "postgres://u@db.invalid/q" and config.advertise_url == "https://mq.example"
    assert load_config(["--host", "10.1.2.3", "--data", str(tmp_path / "d")], environ={},
                       cwd=tmp_path).advertise_url == "http://10.1.2.3:3069"


def test_a_standby_names_the_url_the_leader_advertises(postgres, tmp_path):
    url = postgres.url(postgres.new_schema())
    leader = pg_server(tmp_path, url, "a", OFFLOADMQ_ADVERTISE_URL="https://mq-a.invalid").start()
    standby = pg_server(tmp_path, url, "b", keys_from=leader).start()
    try:
        status, body = ready(standby)
        assert status == 503 and body["leader"] == "https://mq-a.invalid"
        status, err = http("GET", standby.url + "/api/capabilities/online", headers=standby.client)
        assert status == 503 and err["error"]["leader"] == "https://mq-a.invalid"
    finally:
        standby.kill()
        leader.kill()


def test_a_leader_stopped_by_sigterm_hands_over_with_every_acknowledged_task(postgres, tmp_path):
    url = postgres.url(postgres.new_schema())
    leader = pg_server(tmp_path, url, "a").start()
    standby = pg_server(tmp_path, url, "b", keys_from=leader).start()
    try:
        acked = [leader.submit(CAP, n) for n in range(20)]
        leader.stop()  # SIGTERM: it commits what is queued and ends its session
        assert leader.proc.returncode == 0, leader.output()[-2000:]
        assert_took_over_with(standby, acked)
    finally:
        standby.kill()
        leader.kill()


def test_a_database_out_of_room_refuses_writes_with_507_and_reads_go_on_until_there_is_room(tmp_path):
    """The cluster lives on a 96 MiB tmpfs that fills up for real: PostgreSQL cannot extend
    the records table (SQLSTATE 53100). As on a full journal disk, the batch is refused
    with 507, memory goes back to what the database holds, reads go on and the server
    stays up (it used to stop with exit 70); once there is room, writes are accepted
    again, and a restart finds every acknowledged task and none of the refused ones."""
    from conftest import PostgresCluster, fill, mount_tmpfs, postgres_bin, unmount
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (`make test` installs Debian's postgresql)")
    pytest.importorskip("asyncpg")
    disk = Path(tempfile.mkdtemp(prefix="offloadmq-pg-disk-"))
    disk.chmod(0o755)  # the cluster runs as `postgres`
    mount_tmpfs(disk, "96m")
    cluster = srv = None
    try:
        cluster = PostgresCluster(bin_dir, folder=disk / "pg").start()
        srv = pg_server(tmp_path, cluster.url(), "a").start()
        acked = [srv.submit(CAP, n) for n in range(3)]
        filler = fill(disk, leave=2_000_000)
        for _ in range(60):  # incompressible payloads: each needs room in the table
            status, body = http("POST", srv.url + "/api/task/submit", headers=srv.client,
                                body={"capability": CAP, "payload": os.urandom(150_000).hex()}, timeout=15)
            if status != 201:
                break
            acked.append(body["id"])
        assert status == 507, body
        assert body["error"]["type"] == "storage_full" and "no room" in body["error"]["message"]
        assert srv.proc.poll() is None, srv.output()
        # Reads go on, and show only what the database holds.
        listed = {t["id"]["id"] for t in http("GET", srv.url + "/management/tasks/list",
                                              headers=srv.mgmt)[1]["regular"]["unassigned"]}
        assert listed == {tid["id"] for tid in acked}
        health = http("GET", srv.url + "/health")[1]
        assert health["status"] == "unhealthy" and health["reason"] == "storage_full", health
        assert http("POST", srv.url + "/api/task/submit", headers=srv.client,
                    body={"capability": CAP, "payload": 1})[0] == 507
        filler.unlink()
        later = wait_for(lambda: (lambda r: r[0] == 201 and r[1])(http(
            "POST", srv.url + "/api/task/submit", headers=srv.client, body={"capability": CAP, "payload": "later"})),
            timeout=10, what="writes accepted once there is room")
        acked.append(later["id"])
        srv.kill()
        srv.start()
        listed = {t["id"]["id"] for t in http("GET", srv.url + "/management/tasks/list",
                                              headers=srv.mgmt)[1]["regular"]["unassigned"]}
        assert listed == {tid["id"] for tid in acked}
    finally:
        if srv is not None:
            srv.kill()
        if cluster is not None:
            cluster.stop()
        unmount(disk)
        shutil.rmtree(disk, ignore_errors=True)


def test_a_frozen_leader_loses_its_session_to_the_standby_which_serves(postgres, tmp_path):
    """SIGSTOP the leader: its session stays open and says nothing, as with a stuck loop or
    a network cut that keepalives have not found yet, so PostgreSQL keeps its lock. The
    standby ends that session once it has been silent PG_LEADER_SILENT_S (3.5 s) and
    serves every acknowledged task; the old leader, thawed, finds its session gone and
    stops (exit 70) rather than serve a state it can no longer write."""
    url = postgres.url(postgres.new_schema())
    leader = pg_server(tmp_path, url, "a").start()
    standby = pg_server(tmp_path, url, "b", keys_from=leader).start()
    try:
        acked = [leader.submit(CAP, n) for n in range(5)]
        time.sleep(4.5)  # a healthy idle leader is never taken for a silent one
        assert ready(leader)[0] == 200 and "said nothing" not in standby.output()
        held = {}

        def poll_held_across_the_freeze() -> None:
            try:
                held["answer"] = http("GET", f"{leader.url}/api/task/poll/{CAP}/{acked[0]['id']}?wait=2",
                                      headers=leader.client)
            except OSError as err:  # the thawed leader may exit first
                held["answer"] = err
        poller = threading.Thread(target=poll_held_across_the_freeze, daemon=True)
        poller.start()
        time.sleep(0.3)
        os.kill(leader.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        assert_took_over_with(standby, acked)
        took = time.monotonic() - frozen
        print(f"\nSIGSTOP of the leader to the standby ready: {took:.2f} s")
        assert took < 8, standby.output()[-3000:]  # 3.5 s silent + a lock attempt; the bench times it
        assert "has said nothing for" in standby.output()
        assert standby.submit(CAP, "after")
        canceled = http("POST", f"{standby.url}/api/task/cancel/{CAP}/{acked[0]['id']}", headers=leader.client)
        assert canceled[0] == 200 and canceled[1]["status"] == "canceled", canceled
        os.kill(leader.proc.pid, signal.SIGCONT)
        poller.join(15)
        # The poll's wait ended while the leader was frozen: thawed, it must not answer
        # from what it held in memory (the task pending; it was canceled meanwhile).
        answer = held["answer"]
        assert isinstance(answer, OSError) or answer[0] == 503 and answer[1]["error"]["type"] == "not_leader", answer
        assert leader.proc.wait(timeout=15) == 70
        assert "Traceback" not in leader.output(), leader.output()[-3000:]
        # Whichever finds it first: its once-a-second check, or asyncpg's end of connection.
        assert re.search(r"STORE (the session with .* is gone|the connection to .* ended)", leader.output())
        assert "stopping now" in leader.output()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leader.proc.pid, signal.SIGCONT)
        standby.kill()
        leader.kill()
