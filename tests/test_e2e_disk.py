"""Disk faults injected for real into a real server process: a small tmpfs filled up
(ENOSPC), the data folder removed or the journal replaced under it, a data folder it
cannot open at start, and SIGTERM with connections that hold on.

The tmpfs tests need to mount (root, as in CI); they skip, saying so, where that is
not permitted.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_bytes, free_port, http, mount_tmpfs, mounted_disk, unmount

CAP = "debug.echo"


# ---------------------------------------------------------------- helpers

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: the data folder itself, so the server log stays outside it."""
    yield from mounted_disk(tmp_path, "2m")


def submit(srv, n, headers=None, size=8000):
    return http("POST", srv.url + "/api/task/submit",
                {"capability": CAP, "payload": {"n": n, "pad": "x" * size}},
                headers=headers or srv.client, timeout=10)


def regular_ids(srv) -> set:
    status, listing = http("GET", srv.url + "/management/tasks/list", headers=srv.mgmt)
    assert status == 200, listing
    return {t["id"]["id"] for t in listing["regular"]["unassigned"] + listing["regular"]["assigned"]}


def wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def run_server_expecting_exit(data: Path, tmp_path: Path, port: int = 9) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOADMQ_")}
    env.update(AGENT_API_KEYS="ak-start", CLIENT_API_KEYS="ck-start", MGMT_TOKEN="mt-start",
               JWT_SECRET="js-start", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "offloadmq.py"), "--host", "127.0.0.1", "--port", str(port),
         "--data", str(data)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- disk full

def test_full_disk_refuses_writes_keeps_serving_and_recovers_without_restart(small_disk, make_server):
    # Compaction is due early, so it also meets the full disk (and must not stop the server).
    srv = make_server(data_dir=small_disk, extra_env={"OFFLOADMQ_COMPACT_MB": "0.25"})
    srv.start()
    pid = srv.proc.pid
    bearer = srv.new_agent([CAP], capacity=100)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free_bytes(small_disk) - 450_000))

    acknowledged, refused = [], []
    # Past the compaction threshold, with less room left than a snapshot needs: the
    # compaction fails, says so, leaves the files as they were, and the server goes on.
    # No submit runs once it is due, so none races the snapshot's temp file for room.
    while (small_disk / "journal.jsonl").stat().st_size < int(0.25 * 1024 * 1024):
        status, body = submit(srv, len(acknowledged))
        assert status == 201, body
        acknowledged.append(body["id"]["id"])
    wait_for(lambda: "compaction failed" in srv.output(), 10, "a compaction attempt on the full disk")
    assert not (small_disk / "snapshot.json").exists()
    assert not list(small_disk.glob("*.tmp")), "the failed snapshot gave its room back"
    assert http("GET", srv.url + "/health")[0] == 200, "a failed compaction refuses nothing"

    for n in range(400):
        status, body = submit(srv, n)
        if status == 201:
            acknowledged.append(body["id"]["id"])
            continue
        refused.append((status, body))
        if len(refused) >= 5:
            break
    assert len(refused) == 5, "the disk never filled up"
    for status, body in refused:
        assert status == 507, body
        assert body["error"]["type"] == "storage_full" and body["error"]["status"] == 507, body
    assert srv.proc.poll() is None, "the server keeps running on a full disk"

    status, health = http("GET", srv.url + "/health")
    assert status == 503 and health["status"] == "unhealthy", health
    assert health["reason"] == "storage_full" and "room" in health["message"], health

    # Reads and long polls are served; memory holds exactly what is on disk.
    assert regular_ids(srv) == set(acknowledged)
    first = acknowledged[0]
    started = time.monotonic()
    status, body = http("GET", f"{srv.url}/api/task/poll/{CAP}/{first}?wait=1", headers=srv.client)
    assert status == 200 and body["status"] == "pending" and time.monotonic() - started >= 0.9, body
    status, offered = http("GET", srv.url + "/private/agent/task/poll?wait=1", headers=bearer)
    assert status == 200, offered
    status, body = http("POST", f"{srv.url}/private/agent/take/{CAP}/{first}", headers=bearer)
    assert status == 507 and body["error"]["type"] == "storage_full", body
    # A ping is a contact, not a write: the agent stays online through it.
    status, body = http("GET", srv.url + "/private/agent/ping", headers=bearer)
    assert status == 200 and body["status"] == "unhealthy", body

    assert "Traceback" not in srv.output()

    # Room again: writes resume by themselves, same process.
    filler.unlink()
    wait_for(lambda: http("GET", srv.url + "/health")[0] == 200, 10, "/health healthy again")
    status, body = submit(srv, 10_000)
    assert status == 201, body
    acknowledged.append(body["id"]["id"])
    assert srv.proc.pid == pid and srv.proc.poll() is None

    srv.kill()
    srv.start()
    assert regular_ids(srv) == set(acknowledged), "every 201 survives kill -9, nothing refused appears"


# ---------------------------------------------------------------- data folder lost

@pytest.mark.parametrize("how", ["folder removed", "journal replaced"])
def test_lost_journal_refuses_writes_and_says_so(server, how):
    status, body = submit(server, 1, size=10)
    assert status == 201, body
    first = body["id"]["id"]
    journal = server.data / "journal.jsonl"
    if how == "folder removed":
        shutil.rmtree(server.data)
    else:
        replacement = server.data / "journal.jsonl.new"
        replacement.write_bytes(journal.read_bytes())
        os.replace(replacement, journal)

    status, body = submit(server, 2, size=10)
    assert status == 507 and body["error"]["type"] == "storage_lost", body
    assert "restart" in body["error"]["message"]
    status, health = http("GET", server.url + "/health")
    assert status == 503 and health["reason"] == "storage_lost", health
    status, body = http("GET", f"{server.url}/api/task/poll/{CAP}/{first}", headers=server.client)
    assert status == 200 and body["status"] == "pending", "reads go on"
    status, body = submit(server, 3, size=10)
    assert status == 507, "and stay refused"
    assert server.proc.poll() is None

    # What memory held is saved next to the data folder; a server can start from it.
    rescued = list(server.data.parent.glob("data-rescued-*.json"))
    assert len(rescued) == 1, server.output()
    assert str(rescued[0]) in server.output()
    server.stop()
    shutil.rmtree(server.data, ignore_errors=True)
    server.data.mkdir()
    os.replace(rescued[0], server.data / "snapshot.json")
    server.start()
    status, body = http("GET", f"{server.url}/api/task/poll/{CAP}/{first}", headers=server.client)
    assert status == 200 and body["status"] == "pending", body


# ---------------------------------------------------------------- unusable at start

def assert_one_line_exit(done: subprocess.CompletedProcess, *words: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    critical = [line for line in output.splitlines() if "CRITICAL" in line]
    assert len(critical) == 1, output
    for word in words:
        assert word in critical[0], critical[0]


def test_data_path_that_is_a_file_exits_2_with_one_line(tmp_path):
    data = tmp_path / "data"
    data.write_text("not a folder")
    assert_one_line_exit(run_server_expecting_exit(data, tmp_path), str(data), "Remedy", "folder")
    below = data / "sub"
    assert_one_line_exit(run_server_expecting_exit(below, tmp_path), "Remedy", "folder")


def test_read_only_data_folder_exits_2_with_one_line(tmp_path):
    mnt = tmp_path / "ro"
    mount_tmpfs(mnt, "1m")
    try:
        (mnt / "journal.jsonl").write_bytes(b"")
        done = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"remounting read-only is not permitted here ({done.stderr.strip()})")
        assert_one_line_exit(run_server_expecting_exit(mnt, tmp_path), "journal.jsonl",
                             "Remedy", "read-only")
    finally:
        unmount(mnt)


def test_a_busy_port_exits_2_with_one_line_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_server_expecting_exit(tmp_path / "data", tmp_path, port)
    assert_one_line_exit(done, f"127.0.0.1:{port}", "in use", "--port")


# ---------------------------------------------------------------- shutdown

def test_sigterm_exits_within_its_timeout_with_streams_and_long_polls_open(server):
    bearer = server.new_agent([CAP], capacity=100)
    status, body = submit(server, 0, size=10)
    task_path = f"{CAP}/{body['id']['id']}"
    status, _ = http("POST", f"{server.url}/private/agent/take/{task_path}", headers=bearer)
    assert status == 200

    held = []

    def hold(method, path, headers):
        try:
            http(method, server.url + path, headers=headers, timeout=120)
        except OSError:
            pass

    for path, headers in [("/private/agent/task/poll?wait=60", bearer),
                          ("/private/agent/task/cancels?wait=60", bearer),
                          (f"/api/task/poll/{task_path}?wait=60", server.client)]:
        thread = threading.Thread(target=hold, args=("GET", path, headers), daemon=True)
        thread.start()
        held.append(thread)
    # Two event streams: one read, one never read while megabytes of log events come,
    # so that the server's write to it blocks.
    reading = socket.create_connection(("127.0.0.1", server.port))
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", server.port))
    request = f"GET /management/events HTTP/1.1\r\nHost: x\r\nX-Mgmt-Token: {server.mgmt_token}\r\n\r\n"
    for sock in (reading, stuck):
        sock.sendall(request.encode())
    threading.Thread(target=lambda: [None for _ in iter(lambda: reading.recv(65536), b"")],
                     daemon=True).start()
    for i in range(40):
        status, _ = http("POST", f"{server.url}/private/agent/task/progress/{task_path}",
                         {"id": body["id"]["id"], "logUpdate": f"{i:04d}" + "y" * 200_000},
                         headers=bearer)
        assert status == 200
    time.sleep(0.5)
    assert all(t.is_alive() for t in held), "the long polls are still held"

    started = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=30)
    took = time.monotonic() - started
    stuck.close()
    reading.close()
    assert took < 4.0, f"SIGTERM took {took:.1f} s to exit (timeout 3 s)"
    assert server.proc.returncode == 0, server.output()


# ---------------------------------------------------------------- secrets at start

def start_and_stop_without_secrets(tmp_path: Path) -> str:
    """`python offloadmq.py` with nothing configured, stopped once it serves; its output."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OFFLOADMQ_") and k not in ("AGENT_API_KEYS", "CLIENT_API_KEYS",
                                                            "MGMT_TOKEN", "JWT_SECRET")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "offloadmq.py"), "--host", "127.0.0.1",
                             "--port", str(port), "--data", str(tmp_path / "data")],
                            cwd=str(tmp_path), env={**env, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if http("GET", f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
    finally:
        proc.terminate()
    return proc.communicate(timeout=15)[0]


def test_secrets_are_printed_once_and_their_place_at_every_start(tmp_path):
    first = start_and_stop_without_secrets(tmp_path)
    stored = json.loads((tmp_path / "data" / "secrets.json").read_text())
    assert stored["MGMT_TOKEN"] in first and stored["CLIENT_API_KEYS"] in first
    again = start_and_stop_without_secrets(tmp_path)
    assert str(tmp_path / "data" / "secrets.json") in again
    assert stored["MGMT_TOKEN"] not in again and stored["CLIENT_API_KEYS"] not in again


def test_keys_prints_the_generated_secrets_from_the_data_folder(tmp_path):
    start_and_stop_without_secrets(tmp_path)
    stored = json.loads((tmp_path / "data" / "secrets.json").read_text())
    done = subprocess.run([sys.executable, str(ROOT / "offloadmq.py"), "keys", "--data",
                           str(tmp_path / "data")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for name in ("AGENT_API_KEYS", "CLIENT_API_KEYS", "MGMT_TOKEN"):
        assert stored[name] in done.stdout
    missing = subprocess.run([sys.executable, str(ROOT / "offloadmq.py"), "keys", "--data",
                              str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "cannot read" in missing.stderr and not missing.stdout
