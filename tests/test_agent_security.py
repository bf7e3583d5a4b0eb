"""Attacks on the agent, performed for real: a client turning the agent against its host,
a task reaching for the agent's identity, a hostile server, a killed agent.

Real processes throughout: the server (conftest's ServerProcess), the agent
(`offload_agent.py serve`), `git` building repositories with links that lead out, local
HTTP services on 127.0.0.1 standing for the internal network. The hostile server is a
small aiohttp app in the test that plays the attacker (it is not a stand-in for ours).
"""
import asyncio
import json
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

import offload_agent as agent_module
from conftest import ROOT, http
from test_agent import failure_message, http_session, make_run, ollama, run_task  # noqa: F401
from test_e2e_agent import AgentProcess, history_text, run_blocking, start_agent, submit  # noqa: F401
from test_e2e_agent import file_host, wait_done  # noqa: F401

AGENT_SCRIPT = ROOT / "offload_agent.py"
TASK_ULID = "01J9ZX0000000000000000000A"
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True)


def wait_until(condition, timeout, message):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


# -- 1. nothing outside the task folder through links ------------------------------------

@pytest.fixture
def victim(tmp_path):
    """A folder outside every task folder, with a file worth stealing and one worth
    overwriting."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "secret.txt").write_text("the victim's secret\n")
    (folder / "existing.txt").write_text("original content\n")
    return folder


def snapshot(folder: Path) -> dict:
    """Everything in `folder`, with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def linking_repository(tmp_path, victim) -> Path:
    """A bare git repository whose tree holds links out of any folder it is cloned into."""
    work = tmp_path / "evil-src"
    work.mkdir()
    (work / "README").write_text("harmless\n")
    os.symlink(victim, work / "out")                        # absolute, to a folder
    os.symlink(victim / "existing.txt", work / "file-out")  # absolute, to a file
    os.symlink("../../../../../../../../../../" + str(victim).lstrip("/"), work / "up")  # relative
    git("init", "-q", cwd=work)
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "links", cwd=work)
    bare = tmp_path / "evil.git"
    git("clone", "-q", "--bare", str(work), str(bare), cwd=tmp_path)
    return bare


def test_links_from_a_cloned_repository_lead_nowhere_outside(server, start_agent, file_host,
                                                             tmp_path, victim):
    """The attack of issue 19 item 1 through the real server and agent: a clone brings links
    out of the task folder, then fetchFiles writes and clones through them, and an
    artifact reads through them. Nothing outside changes, nothing comes back."""
    bare = linking_repository(tmp_path, victim)
    (file_host.root / "payload.txt").write_text("planted by a task\n")
    before = snapshot(victim)
    start_agent(serve_args=["--allow-local-git", "--allow-fetch", "127.0.0.1"])
    clone = {"path": "repo", "gitClone": f"file://{bare}"}
    payload = file_host.url + "/payload.txt"
    attacks = [
        ({"fetchFiles": [clone, {"path": "repo/out/planted.txt", "get": payload}]}, "'out'"),
        ({"fetchFiles": [clone, {"path": "repo/up/existing.txt", "get": payload}]}, "'up'"),
        ({"fetchFiles": [clone, {"path": "repo/out/cloned", "gitClone": f"file://{bare}"}]}, "'out'"),
        ({"fetchFiles": [clone], "artifacts": [{"path": "repo/out/secret.txt"}]}, "'out'"),
        ({"fetchFiles": [clone], "artifacts": [{"path": "repo/file-out"}]}, "'file-out'"),
    ]
    for fields, link in attacks:
        task = run_blocking(server, "shell.bash", {"command": "echo ran"}, **fields)
        assert task["status"] == "failed", (fields, history_text(task))
        assert f"escapes the task folder through the symbolic link {link}" in history_text(task)
        assert "victim's secret" not in json.dumps(task)
        assert snapshot(victim) == before, f"{fields} changed the folder outside"
    # A fetch onto a planted link replaces the link inside the folder, never its target.
    task = run_blocking(server, "shell.bash", {"command": "cat repo/file-out"},
                        fetchFiles=[clone, {"path": "repo/file-out", "get": payload}])
    assert task["status"] == "completed", history_text(task)
    assert task["result"]["stdout"] == "planted by a task\n"
    assert snapshot(victim) == before


async def test_an_artifact_hard_linked_to_a_file_outside_is_refused(make_run, tmp_path):
    secret = tmp_path / "outside-secret.txt"
    secret.write_text("not the task's\n")
    run, _ = make_run("shell.bash", f"ln {secret} out.txt", artifacts=[{"path": "out.txt"}])
    outcome = await run_task(run)
    assert "has other hard links" in failure_message(outcome)
    assert "not the task's" not in json.dumps(outcome.output)


async def test_a_fifo_artifact_is_refused_without_hanging(make_run):
    run, _ = make_run("shell.bash", "mkfifo pipe", artifacts=[{"path": "pipe"}])
    outcome = await asyncio.wait_for(run_task(run), 10)
    assert failure_message(outcome) == "artifact 'pipe' is not a regular file"


async def test_a_failure_message_shows_paths_relative_to_the_task_folder(make_run, tmp_path):
    async def reads_a_missing_file(run):
        return (run.folder / "inputs" / "missing.txt").read_text()
    run, _ = make_run("debug.echo", "x")
    outcome = await agent_module.execute_task(run, reads_a_missing_file)
    message = failure_message(outcome)
    assert "'inputs/missing.txt'" in message
    assert str(tmp_path) not in message


# -- 2. no proxy into the agent's network ----------------------------------------------

@pytest.fixture
async def internal_service(aiohttp_server):
    """Stands for a service on the agent's internal network; records every request."""
    hits = []

    async def secret(request):
        hits.append(request.path)
        return web.Response(text="internal secret")

    async def redirect(request):
        hits.append(request.path)
        raise web.HTTPFound(request.query["to"])

    async def huge(request):
        hits.append(request.path)
        response = web.StreamResponse()  # chunked: no length to refuse up front
        await response.prepare(request)
        chunk = b"x" * (1 << 20)
        for _ in range(200):  # 200 MB
            await response.write(chunk)
        return response

    async def trickle(request):
        hits.append(request.path)
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(600):
            await response.write(b"x")
            await asyncio.sleep(0.1)
        return response

    app = web.Application()
    for path, handler in (("/secret", secret), ("/redirect", redirect), ("/huge", huge),
                          ("/trickle", trickle)):
        app.router.add_get(path, handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    server.hits = hits
    return server


@pytest.mark.parametrize("address, allowed", [
    ("8.8.8.8", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("169.254.169.254", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("240.0.0.1", False), ("255.255.255.255", False), ("::1", False), ("::", False),
    ("fe80::1", False), ("fc00::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False),
    ("64:ff9b::7f00:1", False), ("2002:7f00:1::", False), ("::ffff:8.8.8.8", True),
])
def test_only_public_addresses_pass_by_default(address, allowed):
    assert (agent_module.FetchPolicy().refusal(address) is None) is allowed


def test_allow_fetch_takes_ips_networks_and_host_names():
    policy = agent_module.FetchPolicy(("10.0.0.0/8", "127.0.0.1", "Git.Internal."))
    assert policy.refusal("10.9.8.7") is None and policy.refusal("::ffff:127.0.0.1") is None
    assert policy.refusal("127.0.0.2") is not None and policy.refusal("192.168.0.1") is not None
    assert policy.host_allowed("git.internal") and not policy.host_allowed("other.internal")
    with pytest.raises(ValueError):
        agent_module.FetchPolicy(("not a host!",))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0.0.0.0",
                                  "[::ffff:127.0.0.1]"])
async def test_fetch_refuses_internal_addresses_by_default(make_run, internal_service, host):
    fetch = [{"path": "s.txt", "get": f"http://{host}:{internal_service.port}/secret",
              "customHeader": {"Metadata-Flavor": "Google"}}]
    run, _ = make_run("shell.bash", "cat s.txt", fetch=fetch, allow_fetch=())
    message = failure_message(await run_task(run))
    assert message.startswith("fetchFiles 's.txt': refused: "), message
    assert "see --allow-fetch" in message
    assert internal_service.hits == [], "the internal service was contacted"


async def test_fetch_serves_what_allow_fetch_lists(make_run, internal_service):
    fetch = [{"path": "s.txt", "get": f"http://127.0.0.1:{internal_service.port}/secret"}]
    run, _ = make_run("shell.bash", "cat s.txt", fetch=fetch, allow_fetch=("127.0.0.0/8",))
    outcome = await run_task(run)
    assert outcome.output["stdout"] == "internal secret"


async def test_a_redirect_to_an_internal_address_is_refused(make_run, internal_service):
    """Allowed: 127.0.0.1 only. The redirect goes to 0.0.0.0, which Linux connects to the
    local host: followed, it would return the internal secret."""
    port = internal_service.port
    to = f"http://0.0.0.0:{port}/secret"
    fetch = [{"path": "s.txt", "get": f"http://127.0.0.1:{port}/redirect?to={to}"}]
    run, _ = make_run("shell.bash", "cat s.txt", fetch=fetch, allow_fetch=("127.0.0.1",))
    message = failure_message(await run_task(run))
    assert "refused: 0.0.0.0 is a unspecified address" in message
    assert internal_service.hits == ["/redirect"]


async def test_a_download_stops_at_the_byte_cap(make_run, internal_service):
    fetch = [{"path": "big.bin", "get": f"http://127.0.0.1:{internal_service.port}/huge"}]
    run, _ = make_run("shell.bash", "echo ran", fetch=fetch, fetch_max_bytes=2_000_000)
    started = time.monotonic()
    message = failure_message(await run_task(run))
    assert message == "fetchFiles 'big.bin': over this agent's limit of 2000000 fetched bytes per task"
    assert time.monotonic() - started < 20
    assert list(run.folder.iterdir()) == [], "a partial download was left behind"


async def test_runtime_secs_bounds_a_slow_download(make_run, internal_service):
    fetch = [{"path": "slow.bin", "get": f"http://127.0.0.1:{internal_service.port}/trickle"}]
    run, _ = make_run("shell.bash", "echo ran", fetch=fetch)
    run.data["runtimeSecs"] = 1
    started = time.monotonic()
    message = failure_message(await run_task(run))
    assert message == "ran past runtimeSecs (1 s) and was stopped"
    assert time.monotonic() - started < 10


@pytest.fixture
async def git_http(aiohttp_server, tmp_path):
    """A git repository served over smart HTTP by `git http-backend` (a CGI), on 127.0.0.1."""
    root = tmp_path / "git-served"
    work = root / "src"
    work.mkdir(parents=True)
    (work / "tool.sh").write_text("echo tool from git\n")
    git("init", "-q", cwd=work)
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "tool", cwd=work)
    git("clone", "-q", "--bare", str(work), str(root / "tool.git"), cwd=root)
    hits = []

    async def backend(request):
        hits.append(request.path)
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(root), "GIT_HTTP_EXPORT_ALL": "1",
               "REQUEST_METHOD": request.method, "PATH_INFO": request.path,
               "QUERY_STRING": request.query_string, "REMOTE_ADDR": "127.0.0.1",
               "CONTENT_TYPE": request.headers.get("Content-Type", ""),
               "GIT_PROTOCOL": request.headers.get("Git-Protocol", "")}
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            import gzip
            body = gzip.decompress(body)
        done = await asyncio.create_subprocess_exec(
            "git", "http-backend", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out, _ = await done.communicate(body)
        head, _, content = out.partition(b"\r\n\r\n")
        headers, status = {}, 200
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(": ")
            if name.lower() == "status":
                status = int(value.split()[0])
            else:
                headers[name] = value
        return web.Response(status=status, body=content, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", backend)
    server = await aiohttp_server(app, host="127.0.0.1")
    server.hits = hits
    server.repo_path = "/tool.git"
    return server


async def test_git_clone_is_held_to_the_same_addresses(make_run, git_http):
    """Refused by default (git never contacted); allowed by --allow-fetch, `localhost`
    pinned to the one address the list allows, so git does not resolve it by itself."""
    for host in ("127.0.0.1", "localhost"):
        fetch = [{"path": "tools", "gitClone": f"http://{host}:{git_http.port}{git_http.repo_path}"}]
        run, _ = make_run("shell.bash", "bash tools/tool.sh", fetch=fetch, allow_fetch=())
        assert "refused: " in failure_message(await run_task(run))
        assert git_http.hits == []
        run, _ = make_run("shell.bash", "bash tools/tool.sh", fetch=fetch, allow_fetch=("127.0.0.1",))
        outcome = await run_task(run)
        assert outcome.kind == "success", outcome
        assert outcome.output["stdout"] == "tool from git\n"
        git_http.hits.clear()


async def test_git_clone_stops_at_the_byte_cap(make_run, git_http):
    fetch = [{"path": "tools", "gitClone": f"http://127.0.0.1:{git_http.port}{git_http.repo_path}"}]
    run, _ = make_run("shell.bash", "echo ran", fetch=fetch, fetch_max_bytes=100)
    assert "over this agent's limit of 100 fetched bytes" in failure_message(await run_task(run))
    assert list(run.folder.iterdir()) == [], "the clone was left behind"


@pytest.mark.parametrize("url", ["ssh://git@127.0.0.1/x.git", "git://127.0.0.1/x.git",
                                 "ext::true", "git@127.0.0.1:x.git"])
async def test_git_clone_takes_only_http(make_run, url):
    run, _ = make_run("shell.bash", "true", fetch=[{"path": "p", "gitClone": url}])
    assert "git URL scheme not allowed" in failure_message(await run_task(run))


def test_the_real_agent_refuses_the_internal_network_unless_allowed(server, start_agent, file_host):
    (file_host.root / "internal.txt").write_text("internal data\n")
    fields = {"fetchFiles": [{"path": "i.txt", "get": file_host.url + "/internal.txt"}]}
    start_agent()
    task = run_blocking(server, "shell.bash", {"command": "cat i.txt"}, **fields)
    assert task["status"] == "failed"
    assert "127.0.0.1 is a loopback address" in history_text(task)
    start_agent(caps=["shellcmd.bash"], serve_args=["--allow-fetch", "127.0.0.1"])
    task = run_blocking(server, "shellcmd.bash", {"command": "cat i.txt"}, **fields)
    assert task["status"] == "completed", history_text(task)
    assert task["result"]["stdout"] == "internal data\n"


# -- 3. a task does not get the agent's identity --------------------------------------

ANCESTORS_ENVIRONMENT = (
    "env; p=$$; while [ \"$p\" -gt 1 ]; do echo \"== $p\"; tr '\\0' '\\n' < /proc/$p/environ; "
    "tr '\\0' ' ' < /proc/$p/cmdline; echo; p=$(sed 's/.*) //' /proc/$p/stat | cut -d' ' -f2); done")


@pytest.mark.parametrize("given_by", ["environment", "argv"])
def test_a_task_finds_no_agent_secret_in_any_environment(server, start_agent, given_by):
    if given_by == "environment":
        agent = start_agent(env={"OFFLOAD_AGENT_KEY": server.agent_key})
    else:
        agent = start_agent(serve_args=["--key", server.agent_key])
    task = run_blocking(server, "shell.bash", {"command": ANCESTORS_ENVIRONMENT})
    assert task["status"] == "completed", history_text(task)
    seen = task["result"]["stdout"] + task["result"]["stderr"]
    assert f"== {agent.proc.pid}" in seen, "the walk did not reach the agent"
    assert server.agent_key not in seen
    assert agent.identity["key"] not in seen
    names = {line.split("=", 1)[0] for line in seen.split("== ")[0].splitlines() if "=" in line}
    assert names <= {"PATH", "HOME", "LANG", "TERM", "TZ", "PWD", "SHLVL", "_", "OLDPWD"} | \
        {n for n in names if n.startswith("LC_")}, names


@pytest.fixture
def task_user():
    if os.geteuid() != 0:
        pytest.skip("--task-user needs the tests to run as root")
    name = "offloadmq-task"
    try:
        return pwd.getpwnam(name)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                               "/usr/sbin/nologin", name], capture_output=True)
        if made.returncode != 0:
            return pwd.getpwnam("nobody")
        return pwd.getpwnam(name)


def test_task_user_runs_tasks_out_of_reach_of_the_identity(server, start_agent, file_host, task_user):
    (file_host.root / "in.txt").write_text("fetched for the task user\n")
    agent = start_agent(serve_args=["--task-user", task_user.pw_name, "--allow-fetch", "127.0.0.1"])
    command = (f"id -u; cat in.txt; cat {agent.config}; cat /proc/$PPID/environ; "
               f"ls /proc/$PPID/cwd/; ls ..; ls {agent.work}; cd .. && echo reached; "
               "echo made > out.txt")
    task = run_blocking(server, "shell.bash", {"command": command},
                        fetchFiles=[{"path": "in.txt", "get": file_host.url + "/in.txt"}],
                        artifacts=[{"path": "out.txt"}])
    assert task["status"] == "completed", history_text(task)
    out, err = task["result"]["stdout"], task["result"]["stderr"]
    assert out.splitlines()[:2] == [str(task_user.pw_uid), "fetched for the task user"]
    assert agent.identity["key"] not in out + err
    assert "agent.json" not in out, "the task listed the agent's folder"
    assert "reached" not in out
    assert err.count("Permission denied") == 6, err
    task = run_blocking(server, "shell.bash", {"command": "echo made > out.txt"},
                        artifacts=[{"path": "out.txt"}])
    assert task["status"] == "completed", history_text(task)
    assert task["result"]["artifacts"][0]["size"] == 5


def test_task_user_needs_root_and_an_existing_user(tmp_path):
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"server": "http://127.0.0.1:9", "agentId": "a", "key": "k",
                                  "capabilities": ["shell.bash"]}))
    done = subprocess.run([sys.executable, str(AGENT_SCRIPT), "serve", "--config", str(config),
                           "--task-user", "no-such-user-here"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "no-such-user-here" in done.stderr or "needs the agent to run as root" in done.stderr


# -- 4. a hostile server --------------------------------------------------------------

class HostileServer:
    """Answers the agent's calls like a server would, handing out the tasks it was given;
    records what the agent sends back. `post_ping` False answers POST ping with 405 (the
    original server)."""

    def __init__(self, tasks, post_ping=True):
        self.tasks = list(tasks)
        self.post_ping = post_ping
        self.resolved = {}
        self.pings = []        # (monotonic time, method, body)
        self.logins = []
        self.updates = []

    def app(self):
        app = web.Application()
        app.router.add_post("/agent/auth", self.auth)
        app.router.add_post("/private/agent/info/update", self.update)
        app.router.add_get("/private/agent/task/poll", self.poll)
        app.router.add_post("/private/agent/task/resolve/{tail:.*}", self.resolve)
        app.router.add_post("/private/agent/task/progress/{tail:.*}", self.progress)
        app.router.add_get("/private/agent/task/cancels", self.cancels)
        app.router.add_get("/private/agent/ping", self.ping)
        app.router.add_post("/private/agent/ping", self.ping)
        return app

    async def auth(self, request):
        self.logins.append(time.monotonic())
        return web.json_response({"token": "hostile-token", "expiresIn": 3600})

    async def update(self, request):
        self.updates.append(await request.json())
        return web.json_response({"agentId": "a", "key": "k", "message": "Updated"})

    async def poll(self, request):
        if self.tasks:
            return web.json_response({**self.tasks.pop(0), "agentId": "a",
                                      "createdAt": "2026-01-01T00:00:00.000Z"})
        await asyncio.sleep(0.5)
        return web.json_response(None)

    async def resolve(self, request):
        body = await request.json()
        self.resolved[body["id"]["id"]] = body
        return web.json_response({"message": "task report confirmed", "next": None})

    async def progress(self, request):
        return web.json_response({"message": "task update confirmed"})

    async def cancels(self, request):
        await asyncio.sleep(0.5)
        return web.json_response([])

    async def ping(self, request):
        if request.method == "POST" and not self.post_ping:
            return web.json_response({"error": {"type": "method_not_allowed", "message": "no",
                                                "status": 405}}, status=405)
        body = await request.json() if request.can_read_body else None
        self.pings.append((time.monotonic(), request.method, body))
        return web.json_response({"status": "ok", "released": []})


async def serve_against(hostile_server, folder: Path, caps, *serve_args):
    """The real agent process, its identity pointing at the hostile server."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "agent.json"
    config.write_text(json.dumps({"server": str(hostile_server.make_url("")).rstrip("/"),
                                  "agentId": "a", "key": "k", "capabilities": caps}))
    log = open(folder / "agent.log", "wb")
    proc = subprocess.Popen([sys.executable, str(AGENT_SCRIPT), "serve", "--config", str(config),
                             "--work-dir", str(folder / "work"), *serve_args],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.log_path = folder / "agent.log"
    return proc


async def wait_for(condition, timeout, message):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.05)


def stop(proc):
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def test_a_hostile_server_cannot_make_the_agent_delete_or_run_outside(aiohttp_server, tmp_path):
    """Every id the hostile server sends points inside this test's own temp folder, so that
    even an agent without the check harms nothing else on the machine."""
    folder = tmp_path / "agent"
    victim = folder / "victim-dir"  # where work/../victim-dir points
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("keep me\n")
    absolute = tmp_path / "absolute-victim"
    absolute.mkdir()
    (absolute / "keep.txt").write_text("keep me too\n")
    hostile = HostileServer([
        {"id": {"cap": "shell.bash", "id": "../victim-dir"},
         "data": {"capability": "shell.bash", "payload": "touch ran-marker"}},
        {"id": {"cap": "shell.bash", "id": str(absolute)},
         "data": {"capability": "shell.bash", "payload": "touch ran-marker"}},
        {"id": {"cap": "shellcmd.bash", "id": TASK_ULID},  # not a capability it announced
         "data": {"capability": "shellcmd.bash", "payload": "touch ran-marker"}},
    ])
    server = await aiohttp_server(hostile.app(), host="127.0.0.1")
    proc = await serve_against(server, folder, ["shell.bash"])
    try:
        await wait_for(lambda: len(hostile.resolved) == 3, 20, "the agent did not report all three")
    finally:
        stop(proc)
    for task_id in ("../victim-dir", str(absolute), TASK_ULID):
        assert "notExecuted" in hostile.resolved[task_id]["status"], hostile.resolved[task_id]
    assert "not a ULID" in hostile.resolved["../victim-dir"]["status"]["notExecuted"]
    assert (victim / "keep.txt").read_text() == "keep me\n"
    assert (absolute / "keep.txt").read_text() == "keep me too\n"
    assert not list(tmp_path.rglob("ran-marker"))


async def test_llm_options_beyond_the_allowlist_or_caps_are_refused(make_run, ollama):
    for payload, complaint in [
        ({"prompt": "hi", "keep_alive": -1}, "keep_alive not allowed"),
        ({"prompt": "hi", "options": {"num_ctx": 1048576}}, "num_ctx must be an integer from 1 to 32768"),
        ({"prompt": "hi", "options": {"num_predict": -1}}, "num_predict must be an integer"),
        ({"prompt": "hi", "options": {"num_gpu": 99}}, "num_gpu not allowed"),
        ({"prompt": "hi", "options": {"temperature": "hot"}}, "temperature must be a number"),
    ]:
        run, _ = make_run("llm.tiny:1b", payload, ollama_url=ollama.base)
        assert complaint in failure_message(await run_task(run)), payload
    assert ollama.requests == [], "a refused request reached Ollama"
    run, _ = make_run("llm.tiny:1b", {"prompt": "hi", "options": {"temperature": 0.2, "num_ctx": 4096}},
                      ollama_url=ollama.base)
    outcome = await run_task(run)
    assert outcome.kind == "success", outcome
    assert ollama.requests[-1]["options"] == {"temperature": 0.2, "num_ctx": 4096}


# -- 5. what the agent holds, and its tasks die with it ----------------------------------

async def test_holding_reports_every_heartbeat_even_with_every_slot_busy(aiohttp_server, tmp_path):
    hostile = HostileServer([{"id": {"cap": "shell.bash", "id": TASK_ULID},
                              "data": {"capability": "shell.bash", "payload": "sleep 5"}}])
    server = await aiohttp_server(hostile.app(), host="127.0.0.1")
    proc = await serve_against(server, tmp_path / "agent", ["shell.bash"], "--heartbeat", "1")
    try:
        await wait_for(lambda: TASK_ULID in hostile.resolved, 30, "the task was not reported")
    finally:
        stop(proc)
    assert hostile.updates[0]["heartbeatSecs"] == 1
    assert hostile.pings[0][0] - hostile.logins[0] < 0.9, "no report right after the login"
    holding = [at for at, method, body in hostile.pings
               if method == "POST" and body == {"holding": [{"cap": "shell.bash", "id": TASK_ULID}]}]
    assert len(holding) >= 3, hostile.pings  # a 5 s task, a 1 s heartbeat, capacity 1
    gaps = [b - a for a, b in zip(holding, holding[1:])]
    assert max(gaps) < 2.5, gaps


async def test_holding_report_falls_back_to_get_ping_on_an_original_server(aiohttp_server, tmp_path):
    hostile = HostileServer([], post_ping=False)
    server = await aiohttp_server(hostile.app(), host="127.0.0.1")
    proc = await serve_against(server, tmp_path / "agent", ["shell.bash"], "--heartbeat", "1")
    try:
        await wait_for(lambda: len(hostile.pings) >= 3, 15, "no GET pings after the 405")
    finally:
        stop(proc)
    assert {method for _, method, _ in hostile.pings} == {"GET"}


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def test_a_killed_agents_task_processes_die_with_it(server, start_agent):
    agent = start_agent()
    submit(server, "shell.bash", {"command": "sleep 300 & echo $! > bg.pid; sleep 300 & wait"})
    wait_until(lambda: list(agent.work.glob("*/task/bg.pid")), 15, "the task never started")
    pid_file = next(agent.work.glob("*/task/bg.pid"))
    wait_until(lambda: pid_file.read_text().strip(), 5, "no pid written")
    sleeper = int(pid_file.read_text())
    pgid = os.getpgid(sleeper)
    assert pgid != os.getpgid(agent.proc.pid)
    try:
        agent.kill()  # kill -9
        wait_until(lambda: not group_members(pgid), 5,
                   f"the task's processes outlived the agent: {group_members(pgid)}")
    finally:
        if group_members(pgid):  # leave no sleeper behind, whatever the outcome
            os.killpg(pgid, signal.SIGKILL)


def test_heartbeat_reaches_the_real_server_while_every_slot_is_busy(server, start_agent):
    """Against today's server (POST ping 404/405: GET pings), and with the holding contract."""
    from test_e2e_agent import requests_served
    agent = start_agent(serve_args=["--heartbeat", "1", "--transport", "http"])
    task_id = submit(server, "shell.bash", {"command": "sleep 4"})
    wait_until(lambda: list(agent.work.glob("*/task")), 10, "the task never started")
    before = requests_served(server, "GET", "/private/agent/ping") + \
        requests_served(server, "POST", "/private/agent/ping")
    time.sleep(2.5)
    after = requests_served(server, "GET", "/private/agent/ping") + \
        requests_served(server, "POST", "/private/agent/ping")
    assert after - before >= 2, (before, after)
    assert wait_done(server, task_id)["status"] == "completed"


def test_a_killed_agents_restartable_task_goes_to_another_agent_after_three_beats(
        server, start_agent, tmp_path):
    """Issue 18 item 2: a lost agent is noticed after three missed heartbeats (our agent's
    default of 8 s makes that 24 s; 1 s here), and its restartable task runs elsewhere."""
    first = start_agent(serve_args=["--heartbeat", "1"])
    status, agents = http("GET", server.url + "/management/agents/list", None, server.mgmt)
    assert status == 200 and agents[0]["heartbeatSecs"] == 1, agents
    marker = tmp_path / "first-attempt"
    command = f"if [ -e {marker} ]; then echo second; else touch {marker}; sleep 300; fi"
    task_id = submit(server, "shell.bash", {"command": command}, restartable=True)
    wait_until(marker.exists, 15, "the first attempt never started")
    second = start_agent(serve_args=["--heartbeat", "1"])
    killed_at = time.monotonic()
    first.kill()  # kill -9: no goodbye, no more heartbeats
    try:
        task = wait_done(server, task_id, timeout=30)
        assert task["status"] == "completed", task
        assert "second" in json.dumps(task["output"])
        # Three missed 1 s beats plus a round of the once-a-second loop, with room for a
        # loaded machine; the 120 s rule would take far longer.
        assert time.monotonic() - killed_at < 15
    finally:
        second.kill()


def test_our_agent_declares_a_heartbeat_that_makes_a_loss_known_within_30_s(server, start_agent):
    start_agent()
    status, agents = http("GET", server.url + "/management/agents/list", None, server.mgmt)
    assert status == 200 and 3 * agents[0]["heartbeatSecs"] <= 30, agents


# -- 6. a deleted or revoked agent ----------------------------------------------------------

def delete_agent(server, agent_id):
    status, body = http("POST", f"{server.url}/management/agents/delete/{agent_id}", None, server.mgmt)
    assert status == 200, body


def test_a_deleted_agent_registers_again_with_its_registration_key(server, start_agent):
    agent = start_agent(env={"OFFLOAD_AGENT_KEY": server.agent_key}, serve_args=["--heartbeat", "1"])
    old_id = agent.identity["agentId"]
    delete_agent(server, old_id)
    wait_until(lambda: json.loads(agent.config.read_text())["agentId"] != old_id, 15,
               "the agent did not register again:\n" + agent.output())
    assert oct(agent.config.stat().st_mode & 0o777) == "0o600"
    saved = json.loads(agent.config.read_text())
    assert server.agent_key not in agent.config.read_text(), "the registration key was saved"
    task = run_blocking(server, "debug.echo", {"after": "re-registration"})
    assert task["status"] == "completed", history_text(task)
    assert saved["agentId"] in history_text(task)
    assert "registered again as" in agent.output()


def test_a_deleted_agent_without_a_key_exits_with_one_line_to_act_on(server, start_agent):
    agent = start_agent(serve_args=["--heartbeat", "1"])
    delete_agent(server, agent.identity["agentId"])
    assert agent.wait_exit(20) == agent_module.EXIT_CREDENTIAL_REVOKED
    last = agent.output().strip().splitlines()[-1]
    assert f"register it again with `{sys.executable} {AGENT_SCRIPT} register --server" in last, last
    assert server.agent_key not in agent.output()


def test_a_take_whose_answer_was_lost_is_released_by_the_holding_report(server, start_agent, tmp_path):
    """Issue 18 item 2's repro: a task taken with the agent's own token, the answer dropped;
    the real agent then starts with that identity. Its holding report (WIRE.md) does not
    list the task, so the server gives it back at once (it never started, so whether it is
    restartable does not matter) and both tasks complete."""
    agent = AgentProcess(server, tmp_path / "lost", ["debug.echo"], serve_args=["--heartbeat", "1"])
    agent.register()
    status, login = http("POST", server.url + "/agent/auth",
                         {"agentId": agent.identity["agentId"], "key": agent.identity["key"]})
    assert status == 200, login
    bearer = {"Authorization": f"Bearer {login['token']}"}
    status, answer = http("POST", server.url + "/private/agent/ping", {"holding": []}, bearer)
    assert status == 200 and answer["released"] == [], answer
    first = submit(server, "debug.echo", {"n": 1}, restartable=False)
    status, taken = http("GET", server.url + "/private/agent/task/poll?take=1&wait=5", None, bearer)
    assert status == 200 and taken["id"] == first, taken  # and then the answer is "lost"
    agent.start()
    try:
        second = submit(server, "debug.echo", {"n": 2})
        assert wait_done(server, first, timeout=60)["status"] == "completed"
        assert wait_done(server, second, timeout=60)["status"] == "completed"
    finally:
        agent.kill()


@pytest.mark.parametrize("with_key", [True, False])
def test_a_revoked_credential_is_replaced_or_reported(server, start_agent, with_key):
    """WIRE.md: the management revokes the agent's credential; with a registration key the
    agent registers again and serves on, without one it exits with what to run."""
    env = {"OFFLOAD_AGENT_KEY": server.agent_key} if with_key else None
    agent = start_agent(env=env, serve_args=["--heartbeat", "1"])
    old_id = agent.identity["agentId"]
    status, body = http("POST", f"{server.url}/management/agents/rotate_key/{old_id}", None, server.mgmt)
    assert status == 200, body
    if with_key:
        wait_until(lambda: json.loads(agent.config.read_text())["agentId"] != old_id, 15,
                   "the agent did not register again:\n" + agent.output())
        task = run_blocking(server, "debug.echo", "after the revocation")
        assert task["status"] == "completed", history_text(task)
    else:
        assert agent.wait_exit(20) == agent_module.EXIT_CREDENTIAL_REVOKED
        assert "register it again" in agent.output().strip().splitlines()[-1]


def test_rotate_key_saves_a_fresh_secret(server, tmp_path):
    """WIRE.md: the old secret stops working and the saved new one logs in."""
    agent = AgentProcess(server, tmp_path / "rotating", ["debug.echo"]).register()
    done = subprocess.run([sys.executable, str(AGENT_SCRIPT), "rotate-key", "--config", str(agent.config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    after = json.loads(agent.config.read_text())
    assert after["agentId"] == agent.identity["agentId"] and after["key"] != agent.identity["key"]
    assert oct(agent.config.stat().st_mode & 0o777) == "0o600"
    old, _ = http("POST", server.url + "/agent/auth", {"agentId": after["agentId"], "key": agent.identity["key"]})
    new, _ = http("POST", server.url + "/agent/auth", {"agentId": after["agentId"], "key": after["key"]})
    assert (old, new) == (401, 200)


@pytest.mark.parametrize("header", [{"X-A": "1\r\nX-Evil: 2"}, {"X-A\nB": "1"}, {"X-A": "1\nhttp.proxy=x"}])
async def test_fetch_headers_cannot_carry_line_breaks(make_run, internal_service, header):
    fetch = [{"path": "s.txt", "get": f"http://127.0.0.1:{internal_service.port}/secret",
              "customHeader": header}]
    run, _ = make_run("shell.bash", "true", fetch=fetch)
    assert "is not a valid header" in failure_message(await run_task(run))
    assert internal_service.hits == []
