"""End to end: the real server and the real agent as processes on 127.0.0.1.

Each test starts a server (conftest's `server` fixture) and registers and serves one or
more agents with `python offload_agent.py register|serve`, then talks to the server as a
client would, with conftest's stdlib `http` helper. Agents are stopped by their pid.
"""
import base64
import hashlib
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import ROOT, http

AGENT_SCRIPT = ROOT / "offload_agent.py"
DONE = ("completed", "failed", "canceled")


class AgentProcess:
    """`offload_agent.py serve` as a child process, with its own folder, config and log."""

    def __init__(self, server, folder: Path, caps, capacity=1, serve_args=(), env=None):
        self.server = server
        self.folder = folder
        self.folder.mkdir(parents=True)
        self.config = folder / "agent.json"
        self.work = folder / "work"
        self.log_path = folder / "agent.log"
        self.caps = list(caps)
        self.capacity = capacity
        self.serve_args = list(serve_args)
        self.env = env or {}
        self.proc = None

    def register(self):
        done = subprocess.run(
            [sys.executable, str(AGENT_SCRIPT), "register", "--server", self.server.url,
             "--key", self.server.agent_key, "--caps", *self.caps,
             "--capacity", str(self.capacity), "--config", str(self.config)],
            cwd=self.folder, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        self.register_output = done.stdout + done.stderr
        self.identity = json.loads(self.config.read_text())
        return self

    def start(self, timeout=15):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT_SCRIPT), "serve", "--config", str(self.config),
             "--work-dir", str(self.work), *self.serve_args],
            cwd=self.folder, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        self.wait_for_log("online, serving", timeout)
        return self

    def output(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text, timeout=15):
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent never logged {text!r}:\n{self.output()}")
            time.sleep(0.05)

    def signal(self, sig=signal.SIGTERM):
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture
def start_agent(server, tmp_path):
    """Registers and starts agents against `server`; kills whatever is left at the end."""
    agents = []

    def factory(caps=("debug.echo", "shell.bash"), capacity=1, serve_args=(), env=None):
        agent = AgentProcess(server, tmp_path / f"agent{len(agents)}", caps, capacity, serve_args, env)
        agents.append(agent)
        return agent.register().start()

    yield factory
    for agent in agents:
        agent.kill()


def submit(server, capability, payload, **fields):
    status, body = http("POST", server.url + "/api/task/submit",
                        {"capability": capability, "payload": payload, **fields}, server.client)
    assert status == 201, body
    return body["id"]


def run_blocking(server, capability, payload, **fields):
    """Submits an urgent task and holds until it ends; returns the full task."""
    status, body = http("POST", server.url + "/api/task/submit_blocking",
                        {"capability": capability, "payload": payload, "urgent": True, **fields},
                        server.client, timeout=90)
    assert status == 200, body
    return body


def task_status(server, task_id, wait=None):
    url = f"{server.url}/api/task/poll/{quote(task_id['cap'], safe='')}/{task_id['id']}"
    status, body = http("GET", url + (f"?wait={wait}" if wait else ""), None, server.client)
    assert status == 200, body
    return body


def wait_done(server, task_id, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = task_status(server, task_id, wait=2)
        if body["status"] in DONE:
            return body
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} not done in {timeout} s: {body}")


def history_text(task):
    return " | ".join(entry["description"] for entry in task.get("history", []))


def requests_served(server, method, route_prefix):
    """How many requests the server answered on a route, from its Prometheus /metrics."""
    req = urllib.request.Request(server.url + "/metrics", headers=server.mgmt)
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("offloadmq_http_request_duration_seconds_count{")
               and f'method="{method}"' in line and f'route="{route_prefix}' in line)


# -- the executors through the whole system -----------------------------------------

def test_echo_round_trip(server, start_agent):
    start_agent(caps=["debug.echo"])
    payload = {"message": "hello", "list": [1, 2.5, None, True]}
    task = run_blocking(server, "debug.echo", payload)
    assert task["status"] == "completed"
    assert task["result"] == payload
    assert task["data"]["capability"] == "debug.echo"


def test_shell_log_streams_while_the_command_runs(server, start_agent):
    start_agent()
    task_id = submit(server, "shell.bash", {"command": "echo first; sleep 1.5; echo second"})
    deadline = time.monotonic() + 10
    seen_running_with_log = False
    while time.monotonic() < deadline:
        body = task_status(server, task_id)
        if body["status"] in DONE:
            break
        if "first" in (body.get("log") or ""):
            assert "second" not in body["log"]
            assert body["status"] == "running"
            seen_running_with_log = True
            break
        time.sleep(0.05)
    assert seen_running_with_log, "the first line never showed up while the task ran"
    body = wait_done(server, task_id)
    assert body["status"] == "completed"
    assert body["output"] == {"stdout": "first\nsecond\n", "stderr": ""}
    assert body["log"].endswith("first\nsecond\n")


def test_shell_nonzero_exit_code_fails_the_task(server, start_agent):
    start_agent()
    task = run_blocking(server, "shell.bash", {"command": "echo before; echo bad >&2; exit 7"})
    assert task["status"] == "failed"
    assert task["result"] == {"stdout": "before\n", "stderr": "bad\n", "return_code": 7}
    assert "command exited with code 7" in history_text(task)


def test_shell_multiline_command(server, start_agent):
    start_agent()
    command = 'name="multi line"\nif [ -n "$name" ]; then\n  echo "got $name"\nfi\ntotal=0\nfor n in 1 2 3; do\n  total=$((total + n))\ndone\necho $total'
    task = run_blocking(server, "shell.bash", {"command": command})
    assert task["status"] == "completed", history_text(task)
    assert task["result"]["stdout"] == "got multi line\n6\n"


@pytest.mark.parametrize("protocol", ["extensions", "original"])
def test_capacity_two_runs_two_sleeps_side_by_side(server, start_agent, protocol):
    serve_args = ["--original-protocol"] if protocol == "original" else []
    start_agent(capacity=2, serve_args=serve_args)
    started = time.monotonic()
    ids = [submit(server, "shell.bash", {"command": f"sleep 1; echo {n}"}) for n in (1, 2)]
    results = [wait_done(server, task_id) for task_id in ids]
    elapsed = time.monotonic() - started
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert [r["output"]["stdout"] for r in results] == ["1\n", "2\n"]
    assert elapsed < 2.0, f"two 1 s tasks took {elapsed:.2f} s: they did not run side by side"
    # The original protocol takes each polled task with its own call; the extensions
    # (take on poll, next task on resolve) never need that call.
    takes = requests_served(server, "POST", "/private/agent/take/")
    assert takes == (2 if protocol == "original" else 0)


def test_many_tasks_each_run_exactly_once_across_two_agents(server, start_agent):
    first, second = start_agent(capacity=2), start_agent(capacity=1)
    ids = [submit(server, "debug.echo", n) for n in range(12)]
    assert [wait_done(server, task_id)["output"] for task_id in ids] == list(range(12))
    resolved = [line for agent in (first, second) for line in agent.output().splitlines()
                if "resolved: success" in line]
    assert len(resolved) == 12, "a task ran twice or not at all"


def wait_folder_empty(folder: Path, timeout=5):
    """Task folders go in a thread after the result; give that a moment."""
    deadline = time.monotonic() + timeout
    while folder.exists() and any(folder.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_quick_tasks_send_no_progress_and_leave_no_folders(server, start_agent):
    """A task done within the running delay costs one round trip: no "running" stage, no
    cancel watch (over HTTP; the socket's frames are test_e2e_agent_ws's). Shell tasks get
    a folder, removed after the result; echo none at all."""
    agent = start_agent(caps=["debug.echo", "shellcmd.bash"], serve_args=["--transport", "http"])
    ids = [submit(server, "debug.echo", {"n": n}) for n in range(20)]
    ids += [submit(server, "shellcmd.bash", "echo hi > out.txt; cat out.txt") for _ in range(5)]
    results = [wait_done(server, task_id) for task_id in ids]
    assert [r["output"] for r in results[:20]] == [{"n": n} for n in range(20)]
    assert all(r["output"]["stdout"] == "hi\n" for r in results[20:])
    assert requests_served(server, "POST", "/private/agent/task/progress/") == 0
    assert requests_served(server, "GET", "/private/agent/task/cancels") == 0
    assert wait_folder_empty(agent.work) == []


def test_slow_quiet_task_is_still_reported_running(server, start_agent):
    start_agent(caps=["shellcmd.bash"], serve_args=["--transport", "http"])
    task_id = submit(server, "shellcmd.bash", "sleep 1.5; echo done")
    deadline = time.monotonic() + 10
    body = task_status(server, task_id)
    while body["status"] != "running":
        assert body["status"] not in DONE, "the task ended without being reported running"
        assert time.monotonic() < deadline
        time.sleep(0.05)
        body = task_status(server, task_id)
    assert body["stage"] == "running"
    assert wait_done(server, task_id)["output"]["stdout"] == "done\n"
    assert requests_served(server, "POST", "/private/agent/task/progress/") == 1


def test_sigterm_leaves_no_task_folders(server, start_agent):
    """Right after a task with a big folder, and with one cut short by the grace expiry."""
    agent = start_agent(caps=["shellcmd.bash"], capacity=2, serve_args=["--grace", "0.5"])
    big = submit(server, "shellcmd.bash", "mkdir d && cd d && seq 20000 | xargs touch")
    cut = submit(server, "shellcmd.bash",
                 "mkdir d && cd d && seq 20000 | xargs touch && touch ../started; sleep 60")
    assert wait_done(server, big)["status"] == "completed"
    deadline = time.monotonic() + 10
    while not list(agent.work.glob("*/task/started")):
        assert time.monotonic() < deadline, "the long task never started"
        time.sleep(0.05)
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=15) == 0
    assert wait_done(server, cut)["status"] == "failed"
    assert sorted(p.name for p in agent.work.iterdir()) == []


def test_capability_without_executor_is_not_announced(server, start_agent):
    agent = start_agent(caps=["debug.echo", "custom.render"])
    assert "no executor for custom.render: not announcing it" in agent.output()
    status, online = http("GET", server.url + "/api/capabilities/online", None, server.client)
    assert status == 200
    assert "debug.echo" in online and "custom.render" not in online
    status, body = http("POST", server.url + "/api/task/submit_blocking",
                        {"capability": "custom.render", "payload": 1, "urgent": True}, server.client)
    assert status == 503, body


@pytest.mark.parametrize("protocol", ["extensions", "original"])
def test_cancel_stops_the_running_work(server, start_agent, protocol, tmp_path):
    """With extensions the agent long-polls for cancel requests, so even a quiet task stops;
    on the original protocol it still learns it from the answer to a progress report.
    Either way the `sleep 30` process is gone within 2 s of the cancel."""
    pid_file = tmp_path / "sleep.pid"
    if protocol == "original":
        agent = start_agent(serve_args=["--original-protocol"])
        payload = {"command": f"sleep 30 & echo $! > {pid_file}; "
                              "while true; do echo tick; sleep 0.2; done"}
        task_id = submit(server, "shell.bash", payload)
    else:
        agent = start_agent(caps=["shellcmd.bash"])
        task_id = submit(server, "shellcmd.bash", {"command": f"sleep 30 & echo $! > {pid_file}; wait"})
    deadline = time.monotonic() + 10
    while task_status(server, task_id)["status"] != "running":
        assert time.monotonic() < deadline, "task never started"
        time.sleep(0.05)
    time.sleep(0.3)
    url = f"{server.url}/api/task/cancel/{quote(task_id['cap'], safe='')}/{task_id['id']}"
    status, body = http("POST", url, None, server.client)
    assert status == 200, body
    started = time.monotonic()
    sleep_pid = int(pid_file.read_text())
    while process_alive(sleep_pid):
        assert time.monotonic() - started < 2, "sleep 30 still runs 2 s after the cancel"
        time.sleep(0.05)
    body = wait_done(server, task_id, timeout=10)
    assert body["status"] == "canceled"
    assert "the server asked to stop it" in agent.output()
    agent.wait_for_log("resolved: stopped as the server asked")
    assert "resolved: failure" not in agent.output()
    assert "Unknown child process" not in agent.output()


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- files in and out ------------------------------------------------------------------

@pytest.fixture
def file_host(tmp_path):
    """A stdlib HTTP server on 127.0.0.1 serving a folder of files."""
    root = tmp_path / "hosted"
    root.mkdir()

    class QuietHandler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.root = root
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_fetch_files_by_http_and_git_clone(server, start_agent, file_host, tmp_path):
    (file_host.root / "numbers.txt").write_text("3\n4\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "sum.sh").write_text("awk '{ total += $1 } END { print total }' \"$1\"\n")
    git_env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e.x",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e.x"}
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "tool"]):
        subprocess.run(["git", *args], cwd=repo, env=git_env, check=True)
    start_agent(serve_args=["--allow-local-git", "--allow-fetch", "127.0.0.1"])
    task = run_blocking(server, "shell.bash", {"command": "bash tools/sum.sh input/numbers.txt"},
                        fetchFiles=[{"path": "input/numbers.txt", "get": file_host.url + "/numbers.txt"},
                                    {"path": "tools", "gitClone": f"file://{repo}"}])
    assert task["status"] == "completed", history_text(task)
    assert task["result"]["stdout"] == "7\n"


def test_artifacts_come_back_in_the_output(server, start_agent):
    start_agent()
    task = run_blocking(server, "shell.bash", {"command": "mkdir out; printf 'result data' > out/r.txt"},
                        artifacts=[{"path": "out/r.txt"}])
    assert task["status"] == "completed", history_text(task)
    [artifact] = task["result"]["artifacts"]
    assert artifact["path"] == "out/r.txt"
    assert base64.b64decode(artifact["contentBase64"]) == b"result data"
    assert artifact["size"] == 11
    assert artifact["sha256"] == hashlib.sha256(b"result data").hexdigest()


def test_path_traversal_is_refused(server, start_agent, file_host, tmp_path):
    (file_host.root / "evil.txt").write_text("overwritten")
    agent = start_agent()
    task = run_blocking(server, "shell.bash", {"command": "echo ran"},
                        fetchFiles=[{"path": "../../escaped.txt", "get": file_host.url + "/evil.txt"}])
    assert task["status"] == "failed"
    assert "escapes the task folder" in history_text(task)
    assert "stdout" not in (task["result"] or {}), "the command ran after a refused fetch"
    assert wait_folder_empty(agent.work) == []  # then nothing is removed while we look
    assert not list(tmp_path.rglob("escaped.txt"))
    task = run_blocking(server, "shell.bash", {"command": "true"},
                        artifacts=[{"path": str(agent.config)}])
    assert task["status"] == "failed"
    assert "is absolute" in history_text(task)
    assert agent.identity["key"] not in json.dumps(task), "the agent's secret came back"


# -- staying alive ------------------------------------------------------------------------

def test_agent_survives_a_server_restart(server, start_agent):
    agent = start_agent()
    # A task that ends while the server is down keeps its result until the server is back.
    in_flight = submit(server, "shell.bash", {"command": "sleep 1; echo survived"})
    deadline = time.monotonic() + 10
    while task_status(server, in_flight)["status"] != "running":
        assert time.monotonic() < deadline, "task never started"
        time.sleep(0.05)
    server.kill()
    agent.wait_for_log("result not delivered")
    server.start()
    body = wait_done(server, in_flight, timeout=30)
    assert body["status"] == "completed", body
    assert body["output"]["stdout"] == "survived\n"
    assert body["log"].endswith("survived\n"), \
        f"log text held back by the outage was lost; agent:\n{agent.output()[-3000:]}"
    # An idle agent, cut off in the middle of its long poll, finds its way back too.
    agent.wait_for_log("resolved: success")
    time.sleep(0.3)
    server.restart()
    after = submit(server, "debug.echo", "after restart")
    assert wait_done(server, after, timeout=30)["output"] == "after restart"
    assert agent.proc.poll() is None
    assert "server: " in agent.output() and "retrying in" in agent.output()


def test_agent_logs_in_again_when_its_token_is_refused(server, start_agent):
    agent = start_agent(caps=["debug.echo"])
    # A new JWT secret invalidates every issued token: the agent's next call gets 401.
    server.extra_env["JWT_SECRET"] = "another-secret-" + "x" * 32
    server.restart()
    task_id = submit(server, "debug.echo", {"n": 1})
    assert wait_done(server, task_id, timeout=30)["output"] == {"n": 1}
    assert "logging in again" in agent.output()


def test_sigterm_lets_running_tasks_finish_and_takes_no_new_work(server, start_agent):
    agent = start_agent(capacity=2, serve_args=["--grace", "10"])
    running = submit(server, "shell.bash", {"command": "sleep 1; echo finished"})
    while task_status(server, running)["status"] != "running":
        time.sleep(0.05)
    agent.signal(signal.SIGTERM)
    agent.wait_for_log("taking no new tasks")
    late = submit(server, "debug.echo", "too late")
    assert agent.wait_exit(timeout=10) == 0
    assert wait_done(server, running, timeout=5)["output"]["stdout"] == "finished\n"
    assert task_status(server, late)["status"] in ("pending", "queued")


def test_sigterm_grace_expiry_fails_the_task_and_kills_its_processes(server, start_agent):
    agent = start_agent(serve_args=["--grace", "0.5"])
    task_id = submit(server, "shell.bash", {"command": "sleep 60 & echo pid=$!; wait"})
    deadline = time.monotonic() + 10
    while "pid=" not in (task_status(server, task_id).get("log") or ""):
        assert time.monotonic() < deadline, "task never started"
        time.sleep(0.05)
    background_pid = int(task_status(server, task_id)["log"].split("pid=")[1].split()[0])
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert wait_done(server, task_id, timeout=5)["status"] == "failed"
    assert "task %s/%s resolved: failure" % (task_id["cap"], task_id["id"]) in agent.output()
    assert not process_alive(background_pid), "the task's child outlived the agent"


def process_alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_secrets_stay_out_of_logs_and_config_is_private(server, start_agent):
    agent = start_agent(caps=["debug.echo"])
    assert run_blocking(server, "debug.echo", "x")["status"] == "completed"
    agent.signal(signal.SIGTERM)
    agent.wait_exit(timeout=10)
    assert stat.S_IMODE(agent.config.stat().st_mode) == 0o600
    everything_printed = agent.output() + agent.register_output
    assert agent.identity["agentId"] in everything_printed
    for secret in (server.agent_key, agent.identity["key"]):
        assert secret not in everything_printed
    assert "eyJ" not in everything_printed  # no JWT either
