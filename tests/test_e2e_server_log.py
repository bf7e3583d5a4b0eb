"""What a real server process writes to its log: the start and stop lines with counts,
the access log (`--access-log`, off by default) that never shows a key or token, and
`--help` naming the CLI commands."""
import re
import subprocess
import sys
import urllib.request

from conftest import ROOT, http

ACCESS_LINE = re.compile(r"^\S+ \S+ INFO 127\.0\.0\.1 (GET|POST) (\S+) (\d{3}|-) [\d.]+ ms$", re.MULTILINE)


def raw_get(url, headers):
    """A GET whose answer may be any status (urllib raises on 4xx)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_access_log_shows_each_request_and_never_a_key_or_token(make_server, tmp_path):
    server = make_server(extra_args=["--access-log"]).start()
    agent = server.new_agent(["debug.echo"])
    token = agent["Authorization"].removeprefix("Bearer ")
    task_id = server.submit("debug.echo", {"n": 1})
    created_key = "ck-access-log-" + task_id["id"].lower()
    assert http("POST", server.url + "/management/client_api_keys/update",
                {"key": created_key, "capabilities": ["*"]}, server.mgmt)[0] == 200
    assert http("GET", f"{server.url}/api/task/poll/debug.echo/{task_id['id']}?wait=0", headers=server.client)[0] == 200
    # Secrets where a careless log would copy them: a key in the path (with a wrong
    # management token first: the failed-authentication warning names the path too), the
    # socket's query token, a key in the query.
    assert http("POST", f"{server.url}/management/client_api_keys/revoke/{created_key}",
                headers={"X-Mgmt-Token": "mt-wrong-" + task_id["id"]})[0] == 401
    assert raw_get(f"{server.url}/private/agent/ws?token={token}", {}) >= 400
    assert raw_get(f"{server.url}/api/capabilities/online?apiKey={server.client_key}&x=1", {}) == 401
    assert http("POST", f"{server.url}/management/client_api_keys/revoke/{created_key}",
                headers=server.mgmt)[0] == 200
    server.stop()

    output = server.output()
    lines = ACCESS_LINE.findall(output)
    targets = [(method, path, status) for method, path, status in lines]
    assert ("POST", "/api/task/submit", "201") in targets, output
    assert ("GET", f"/api/task/poll/debug.echo/{task_id['id']}?wait=0", "200") in targets, output
    assert ("GET", "/api/capabilities/online?apiKey=<hidden>&x=1", "401") in targets, output
    assert ("POST", "/management/client_api_keys/revoke/<hidden>", "200") in targets, output
    assert ("POST", "/management/client_api_keys/revoke/<hidden>", "401") in targets, output
    assert any(path == "/private/agent/ws?token=<hidden>" for _, path, _ in targets), output
    for secret in (token, server.client_key, server.agent_key, server.mgmt_token, created_key):
        assert secret not in output, f"a secret is in the server log:\n{output}"


def test_start_and_stop_lines_count_tasks_and_agents_and_access_log_is_off_by_default(make_server):
    server = make_server().start()
    server.new_agent(["debug.echo"])
    first = server.submit("debug.echo", {"n": 1})
    server.submit("debug.echo", {"n": 2})
    assert http("POST", f"{server.url}/management/tasks/cancel/debug.echo/{first['id']}", headers=server.mgmt)[0] == 200
    server.stop()
    output = server.output()
    assert re.search(r"started: tasks 0 pending, 0 running, 0 ended; agents 0 \(0 online\)", output), output
    assert re.search(r"stopped after \d+ s: tasks 1 pending, 0 running, 1 ended; agents 1 \(1 online\)", output), output
    assert not ACCESS_LINE.search(output), output

    server.start()  # a restart counts what it recovered
    server.stop()
    assert re.findall(r"started: .*", server.output())[-1] == \
        "started: tasks 1 pending, 0 running, 1 ended; agents 1 (0 online)"


def test_help_names_the_cli_commands():
    done = subprocess.run([sys.executable, str(ROOT / "offloadmq.py"), "--help"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for command in ("submit", "status", "cancel", "keys", "--access-log"):
        assert re.search(rf"^\s+{command}\b", done.stdout, re.MULTILINE), done.stdout
