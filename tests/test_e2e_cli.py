"""The CLI for CI runners (`python offloadmq.py submit|status|cancel`) against a real
server process and a scripted agent: a thread that long-polls with `?take=1`, reports
the payload's lines as progress and resolves as the payload says."""
import json
import os
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import pytest
from conftest import ROOT, http

CAP = "ci.job"


class ScriptedAgent(threading.Thread):
    """Runs tasks whose payload is {"lines": [..], "fail": bool, "hold": bool}; a held
    task resolves only once `release` is set."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.url = server.url
        self.stop = threading.Event()
        self.release = threading.Event()
        status, reg = http("POST", self.url + "/agent/register", {
            "apiKey": server.agent_key, "capabilities": [CAP], "tier": 0, "capacity": 1,
            "systemInfo": {}})
        assert status == 200, reg
        status, auth = http("POST", self.url + "/agent/auth", {"agentId": reg["agentId"], "key": reg["key"]})
        self.headers = {"Authorization": "Bearer " + auth["token"]}

    def call(self, method, path, body=None):
        status, answer = http(method, self.url + path, body, self.headers)
        assert status == 200, (path, answer)
        return answer

    def run(self):
        while not self.stop.is_set():
            task = self.call("GET", "/private/agent/task/poll?take=1&wait=1")
            if not task:
                continue
            cap, task_id = task["id"]["cap"], task["id"]["id"]
            path = f"{quote(cap, safe='')}/{quote(task_id, safe='')}"
            payload = task["data"]["payload"] or {}
            for line in payload.get("lines", []):
                self.call("POST", f"/private/agent/task/progress/{path}",
                          {"id": task_id, "stage": "running", "logUpdate": line + "\n"})
            if payload.get("hold"):
                self.release.wait(30)
            outcome = {"failure": ["make: *** [all] Error 2", 1.0]} if payload.get("fail") else {"success": 1.0}
            self.call("POST", f"/private/agent/task/resolve/{path}", {
                "id": task_id, "capability": cap, "status": outcome, "output": {"lines": len(payload.get("lines", []))}})


@pytest.fixture
def agent(server):
    thread = ScriptedAgent(server)
    thread.start()
    yield thread
    thread.release.set()
    thread.stop.set()
    thread.join(5)


def cli_env(server, **changes):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOADMQ_")}
    env.update(OFFLOADMQ_URL=server.url, OFFLOADMQ_API_KEY=server.client_key, PYTHONUNBUFFERED="1")
    env.update(changes)
    return env


def cli(server, *args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "offloadmq.py"), *args],
                          check=False, capture_output=True, text=True, timeout=60, cwd=cwd,
                          env=env or cli_env(server))


def test_submit_wait_prints_the_completed_task_and_streams_its_log(server, agent, tmp_path):
    done = cli(server, "submit", CAP, "--payload", '{"lines": ["compiling", "linking"]}',
               "--wait", "--timeout", "30", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)
    assert task["status"] == "completed" and task["result"] == {"lines": 2}
    assert task["log"] == "compiling\nlinking\n"
    assert "compiling\nlinking\n" in done.stderr


def test_submit_wait_streams_log_lines_before_the_task_ends(server, agent, tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "offloadmq.py"), "submit", CAP, "--payload",
                             '{"lines": ["first step"], "hold": true}', "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=cli_env(server))
    try:
        seen = []
        for line in proc.stderr:  # the task is still held by the agent meanwhile
            seen.append(line)
            if line == "first step\n":
                break
        assert seen[-1] == "first step\n", seen
        assert proc.poll() is None
        agent.release.set()
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0
    assert json.loads(out)["status"] == "completed"


def test_submit_wait_of_a_failing_task_exits_non_zero(server, agent, tmp_path):
    done = cli(server, "submit", CAP, "--payload", '{"lines": ["cc -o app"], "fail": true}',
               "--wait", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    task = json.loads(done.stdout)
    assert task["status"] == "failed"
    assert "cc -o app" in done.stderr


def test_submit_without_wait_exits_zero_once_accepted_and_status_follows(server, agent, tmp_path):
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"lines": ["from a file"]}))
    done = cli(server, "submit", CAP, "--payload", f"@{payload}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["status"] == "pending" and answer["id"]["cap"] == CAP
    deadline = time.monotonic() + 15
    while True:
        status = cli(server, "status", CAP, answer["id"]["id"], cwd=tmp_path)
        task = json.loads(status.stdout)
        if task["status"] == "completed" or time.monotonic() > deadline:
            break
        assert status.returncode == 1  # not completed (yet)
        time.sleep(0.2)
    assert status.returncode == 0 and task["log"] == "from a file\n"


def test_cancel_then_status_reports_canceled(server, tmp_path):
    done = cli(server, "submit", "nobody/serves:this", "--payload", '{"x": 1}', cwd=tmp_path)
    task_id = json.loads(done.stdout)["id"]["id"]
    canceled = cli(server, "cancel", "nobody/serves:this", task_id, cwd=tmp_path)
    assert canceled.returncode == 0, canceled.stderr
    assert json.loads(canceled.stdout)["status"] == "canceled"
    status = cli(server, "status", "nobody/serves:this", task_id, cwd=tmp_path)
    assert status.returncode == 1 and json.loads(status.stdout)["status"] == "canceled"
    again = cli(server, "cancel", "nobody/serves:this", task_id, cwd=tmp_path)
    assert again.returncode == 3 and "HTTP 409" in again.stderr


def test_wait_timeout_exits_124_and_leaves_the_task(server, tmp_path):
    done = cli(server, "submit", "nobody.serves", "--wait", "--timeout", "1", cwd=tmp_path)
    assert done.returncode == 124, done.stderr
    assert json.loads(done.stdout)["status"] == "pending"
    assert "still pending" in done.stderr


def test_bad_payload_json_is_a_usage_error(server, tmp_path):
    done = cli(server, "submit", CAP, "--payload", "{not json", cwd=tmp_path)
    assert done.returncode == 2
    assert "--payload is not valid JSON" in done.stderr and done.stdout == ""
    missing = cli(server, "submit", CAP, "--payload", "@nope.json", cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read nope.json" in missing.stderr


def test_missing_or_wrong_api_key(server, tmp_path):
    env = cli_env(server)
    del env["OFFLOADMQ_API_KEY"]
    done = cli(server, "status", CAP, "01ARZ3NDEKTSV4RRFFQ69G5FAV", env=env, cwd=tmp_path)
    assert done.returncode == 2 and "OFFLOADMQ_API_KEY is not set" in done.stderr
    wrong = cli(server, "submit", CAP, env=cli_env(server, OFFLOADMQ_API_KEY="nope"), cwd=tmp_path)
    assert wrong.returncode == 3
    assert "HTTP 401" in wrong.stderr and "unknown or revoked API key" in wrong.stderr


def test_unknown_task_and_unreachable_server_are_clear_errors(server, tmp_path):
    done = cli(server, "status", CAP, "01ARZ3NDEKTSV4RRFFQ69G5FAV", cwd=tmp_path)
    assert done.returncode == 3 and "HTTP 404" in done.stderr
    down = cli(server, "status", CAP, "x", env=cli_env(server, OFFLOADMQ_URL="http://127.0.0.1:9"),
               cwd=tmp_path)
    assert down.returncode == 3 and "127.0.0.1:9" in down.stderr


def test_url_and_key_may_come_from_dotenv(server, tmp_path):
    (tmp_path / ".env").write_text(f"OFFLOADMQ_URL={server.url}\nOFFLOADMQ_API_KEY={server.client_key}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOADMQ_")}
    done = cli(server, "submit", "dotenv.cap", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
