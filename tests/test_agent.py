"""Unit tests of the agent's executors, file fetching and artifacts.

Executors run for real (bash, git, HTTP): files come from an aiohttp server started in the
test, git repositories are local ones cloned over file://, and `llm.*` talks to a small
aiohttp stand-in that speaks Ollama's /api/chat, streaming NDJSON included. Progress goes
to a recorder instead of a server; the server side is covered by test_e2e_agent.py.
"""
import asyncio
import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import offload_agent as agent
from conftest import free_port
from offload_agent import (AgentIdentity, Backoff, ProgressReporter, ServerUnavailable,
                           Settings, TaskRun, execute_task, find_executor)

ROOT = Path(__file__).resolve().parent.parent


class ProgressRecorder:
    """Stands where the server's progress route would be: remembers what was sent, and when."""

    def __init__(self):
        self.sent = []  # (monotonic time, stage, log text)

    async def __call__(self, stage, text):
        self.sent.append((time.monotonic(), stage, text))

    @property
    def log(self):
        return "".join(text for _, _, text in self.sent if text)

    @property
    def stages(self):
        return [stage for _, stage, _ in self.sent if stage]


@pytest.fixture
async def http_session():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def make_run(tmp_path, http_session):
    """Builds a TaskRun with its own folder and progress recorder, as the serve loop would.
    The local test services stand for public ones, so 127.0.0.1 is allowed to fetch from
    unless a test says otherwise."""
    count = 0
    sessions = []

    def factory(capability, payload=None, *, fetch=(), artifacts=(), interval_s=0.5,
                stage_delay_s=0.0, **settings):
        nonlocal count
        count += 1
        folder = tmp_path / "work" / f"task{count}"
        folder.mkdir(parents=True)
        recorder = ProgressRecorder()
        settings.setdefault("allow_fetch", ("127.0.0.1",))
        settings = Settings(work_root=tmp_path / "work", **settings)
        sessions.append(agent.make_fetch_session(settings))
        run = TaskRun(
            task_id={"cap": capability, "id": f"01TESTTASK{count:016d}"},
            data={"capability": capability, "payload": payload,
                  "fetchFiles": list(fetch), "artifacts": list(artifacts)},
            folder=folder,
            settings=settings,
            http=http_session,
            progress=ProgressReporter(recorder, interval_s, stage_delay_s),
            fetch_http=sessions[-1],
        )
        return run, recorder

    yield factory
    for session in sessions:
        await session.close()


async def run_task(run):
    return await execute_task(run, find_executor(run.capability))


def failure_message(outcome):
    assert outcome.kind == "failure", outcome
    return outcome.status["failure"][0]


def process_alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


# -- executor table ------------------------------------------------------------

def test_find_executor_serves_base_capability_and_llm_prefix():
    assert find_executor("debug.echo") is agent.run_echo
    assert find_executor("shell.bash[gpu;cuda12]") is agent.run_shell_streaming
    assert find_executor("shellcmd.bash") is agent.run_shell_quiet
    assert find_executor("llm.qwen3:8b") is agent.run_llm
    assert find_executor("llm.") is None
    assert find_executor("vision") is None


def test_only_tasks_that_use_files_get_a_folder():
    assert not agent.needs_folder(agent.run_echo, {"payload": 1})
    assert not agent.needs_folder(agent.run_llm, {"payload": "hi", "fetchFiles": [], "artifacts": []})
    assert agent.needs_folder(agent.run_shell_streaming, {"payload": "ls"})
    assert agent.needs_folder(agent.run_shell_quiet, {"payload": "ls"})
    assert agent.needs_folder(agent.run_echo, {"artifacts": [{"path": "a"}]})
    assert agent.needs_folder(agent.run_llm, {"fetchFiles": [{"path": "a", "get": "http://x"}]})
    assert not agent.needs_folder(None, {"artifacts": [{"path": "a"}]})  # never runs


async def test_echo_returns_payload_as_output(make_run):
    payload = {"text": "hi", "nested": [1, 2, {"x": None}]}
    run, _ = make_run("debug.echo", payload)
    outcome = await run_task(run)
    assert outcome.kind == "success"
    assert outcome.output == payload
    assert outcome.status["success"] >= 0


async def test_task_without_executor_is_reported_not_executed(make_run):
    run, recorder = make_run("vision.detect", {"image": "x"})
    outcome = await run_task(run)
    assert outcome.status == {"notExecuted": "this agent has no executor for 'vision.detect'"}
    assert recorder.stages == []  # nothing started, so nothing was reported as running


async def test_executor_exception_becomes_failure_with_its_message(make_run):
    async def broken_executor(run):
        raise RuntimeError("disk on fire")

    run, _ = make_run("debug.echo", "x")
    outcome = await execute_task(run, broken_executor)
    assert failure_message(outcome) == "RuntimeError: disk on fire"


# -- shell.bash / shellcmd.bash --------------------------------------------------

async def test_shell_streams_lines_while_the_command_runs(make_run):
    run, recorder = make_run("shell.bash", {"command": "echo first; sleep 1.3; echo second >&2"})
    outcome = await run_task(run)
    finished_at = time.monotonic()
    assert outcome.kind == "success"
    assert outcome.output == {"stdout": "first\n", "stderr": "second\n"}
    first_sent_at = next(t for t, _, text in recorder.sent if text and "first" in text)
    assert finished_at - first_sent_at > 0.5, "first line was only sent at the end"
    assert recorder.log == "first\nsecond\n"
    assert "running" in recorder.stages


async def test_shell_progress_is_batched_at_most_every_interval(make_run):
    command = "for i in $(seq 1 30); do echo line$i; sleep 0.03; done"
    run, recorder = make_run("shell.bash", command, interval_s=0.4)
    outcome = await run_task(run)
    assert outcome.kind == "success"
    log_sends = [t for t, _, text in recorder.sent if text]
    # ~1 s of output in 30 lines arrives in a few batches, not 30 requests.
    assert 2 <= len(log_sends) <= 5
    gaps = [b - a for a, b in zip(log_sends, log_sends[1:-1])]  # the last is the final flush
    assert all(gap >= 0.35 for gap in gaps), gaps
    assert recorder.log == "".join(f"line{i}\n" for i in range(1, 31))


async def test_shell_nonzero_exit_fails_with_return_code_and_output(make_run):
    run, _ = make_run("shell.bash", {"command": "echo partial; echo oops >&2; exit 3"})
    outcome = await run_task(run)
    assert failure_message(outcome) == "command exited with code 3"
    assert outcome.output == {"stdout": "partial\n", "stderr": "oops\n", "return_code": 3}


async def test_shell_runs_multiline_command_in_a_fresh_task_folder(make_run):
    command = "total=0\nfor n in 1 2 3; do\n  total=$((total + n))\ndone\necho $total\npwd\nls -A | wc -l"
    run, _ = make_run("shell.bash", {"command": command})
    outcome = await run_task(run)
    assert outcome.kind == "success"
    total, cwd, entries = outcome.output["stdout"].split()
    assert total == "6"
    assert Path(cwd) == run.folder.resolve()
    assert entries == "0"


async def test_shell_timeout_kills_the_whole_process_group(make_run):
    command = "sleep 30 & echo $! > background.pid; sleep 30"
    run, _ = make_run("shell.bash", {"command": command, "timeoutSecs": 0.5})
    started = time.monotonic()
    outcome = await run_task(run)
    assert time.monotonic() - started < 5
    assert "timed out after 0.5 s" in failure_message(outcome)
    background_pid = int((run.folder / "background.pid").read_text())
    deadline = time.monotonic() + 2
    while process_alive(background_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not process_alive(background_pid), "the background child outlived the timeout"


async def test_runtime_secs_stops_any_executor_and_its_processes(make_run):
    run, _ = make_run("shellcmd.bash", "sleep 30 & echo $! > bg.pid; wait")
    run.data["runtimeSecs"] = 0.5
    started = time.monotonic()
    outcome = await run_task(run)
    assert time.monotonic() - started < 5
    assert failure_message(outcome) == "ran past runtimeSecs (0.5 s) and was stopped"
    background_pid = int((run.folder / "bg.pid").read_text())
    deadline = time.monotonic() + 2
    while process_alive(background_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not process_alive(background_pid)


async def test_shell_refuses_payload_without_a_command(make_run):
    run, _ = make_run("shell.bash", {"cmd": "ls"})
    assert "payload must be a command string" in failure_message(await run_task(run))
    run, _ = make_run("shell.bash", {"command": "ls", "timeoutSecs": "soon"})
    assert "timeoutSecs must be a positive number" in failure_message(await run_task(run))


async def test_shellcmd_sends_no_log_lines_but_returns_output(make_run):
    run, recorder = make_run("shellcmd.bash", "echo quiet; echo loud >&2")
    outcome = await run_task(run)
    assert outcome.output == {"stdout": "quiet\n", "stderr": "loud\n"}
    assert recorder.log == ""
    assert recorder.stages == ["running"]


async def test_shell_keeps_only_the_tail_of_huge_output(make_run, monkeypatch):
    monkeypatch.setattr(agent, "OUTPUT_MAX_BYTES", 1000)
    run, _ = make_run("shellcmd.bash", "head -c 100000 /dev/zero | tr '\\0' a; echo END")
    outcome = await run_task(run)
    header, kept = outcome.output["stdout"].split("\n", 1)
    assert header == "[... 99004 earlier bytes dropped ...]"
    assert kept == "a" * 996 + "END\n"


# -- the deferred "running" stage ---------------------------------------------------

async def test_quick_task_sends_no_running_stage(make_run):
    run, recorder = make_run("debug.echo", {"n": 1}, stage_delay_s=0.5)
    outcome = await run_task(run)
    await asyncio.sleep(0.6)  # past the delay: nothing left to fire either
    assert outcome.kind == "success"
    assert recorder.sent == []


async def test_quiet_task_still_running_after_the_delay_reports_running(make_run):
    run, recorder = make_run("shellcmd.bash", "sleep 1; echo done", stage_delay_s=0.3)
    started = time.monotonic()
    outcome = await run_task(run)
    assert outcome.output["stdout"] == "done\n"
    assert recorder.stages == ["running"]
    sent_after = recorder.sent[0][0] - started
    assert 0.25 <= sent_after < 0.8, sent_after


async def test_first_log_line_carries_the_running_stage_without_waiting(make_run):
    run, recorder = make_run("shell.bash", "echo first; sleep 1; echo second",
                             stage_delay_s=0.5)
    started = time.monotonic()
    outcome = await run_task(run)
    assert outcome.kind == "success"
    at, stage, text = recorder.sent[0]
    assert (stage, text) == ("running", "first\n")
    assert at - started < 0.4, "the first line waited for the stage delay"
    assert recorder.stages == ["running"]
    assert recorder.log == "first\nsecond\n"


async def test_real_stages_are_not_deferred(make_run):
    run, recorder = make_run("debug.echo", "x", artifacts=[{"path": "missing.txt"}],
                             stage_delay_s=5)
    outcome = await run_task(run)
    assert failure_message(outcome) == "artifact 'missing.txt' was not produced"
    assert recorder.stages == ["collecting artifacts"]


# -- fetchFiles ------------------------------------------------------------------

@pytest.fixture
async def file_server(aiohttp_server):
    """A local HTTP server with one route per way fetchFiles can authenticate."""
    hits = []

    async def plain(request):
        hits.append(request.path)
        return web.Response(body=b"plain content\n")

    async def basic(request):
        hits.append(request.path)
        expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401)
        return web.Response(body=b"basic content")

    async def bearer(request):
        hits.append(request.path)
        if request.headers.get("Authorization") != "Bearer tok-123":
            return web.Response(status=403)
        return web.Response(body=b"bearer content")

    async def custom(request):
        hits.append(request.path)
        if request.headers.get("X-Download-Token") != "abc":
            return web.Response(status=403)
        return web.Response(body=bytes(range(256)) * 400)  # binary, > one chunk

    app = web.Application()
    app.router.add_get("/plain.txt", plain)
    app.router.add_get("/basic", basic)
    app.router.add_get("/bearer", bearer)
    app.router.add_get("/custom", custom)
    server = await aiohttp_server(app)
    server.hits = hits
    server.base = str(server.make_url(""))
    return server


async def test_fetch_files_with_each_auth_scheme(make_run, file_server):
    base = file_server.base
    fetch = [
        {"path": "plain.txt", "get": base + "/plain.txt"},
        {"path": "in/basic.txt", "get": base + "/basic", "httpLogin": "alice", "httpPassword": "s3cret"},
        {"path": "in/deep/bearer.txt", "get": base + "/bearer", "httpAuthHeader": "Bearer tok-123"},
        {"path": "custom.bin", "get": base + "/custom", "customHeader": {"X-Download-Token": "abc"}},
    ]
    run, recorder = make_run("shell.bash", "cat plain.txt in/basic.txt in/deep/bearer.txt; wc -c < custom.bin",
                             fetch=fetch)
    outcome = await run_task(run)
    assert outcome.kind == "success", outcome
    assert outcome.output["stdout"] == "plain content\nbasic contentbearer content102400\n"
    assert recorder.stages[:2] == ["fetching files", "running"]


async def test_fetch_failure_names_the_file_and_status(make_run, file_server):
    fetch = [{"path": "secret.txt", "get": file_server.base + "/basic",
              "httpLogin": "alice", "httpPassword": "wrong"}]
    run, _ = make_run("shell.bash", "cat secret.txt", fetch=fetch)
    message = failure_message(await run_task(run))
    assert message.startswith("fetchFiles 'secret.txt': HTTP 401")
    assert "wrong" not in message


async def test_fetch_refuses_unreachable_host_clearly(make_run):
    fetch = [{"path": "x.txt", "get": f"http://127.0.0.1:{free_port()}/x"}]
    run, _ = make_run("debug.echo", "x", fetch=fetch)
    assert failure_message(await run_task(run)).startswith("fetchFiles 'x.txt': http://127.0.0.1:")


@pytest.mark.parametrize("bad_path, complaint", [
    ("../outside.txt", "escapes the task folder"),
    ("a/../../outside.txt", "escapes the task folder"),
    ("/tmp/outside.txt", "is absolute"),
    ("", "must be a non-empty relative path"),
])
async def test_fetch_refuses_paths_outside_the_task_folder(make_run, file_server, bad_path, complaint):
    fetch = [{"path": "ok.txt", "get": file_server.base + "/plain.txt"},
             {"path": bad_path, "get": file_server.base + "/plain.txt"}]
    run, _ = make_run("shell.bash", "echo should not run", fetch=fetch)
    outcome = await run_task(run)
    assert complaint in failure_message(outcome)
    assert file_server.hits == [], "nothing is fetched when any path is bad"
    assert not (run.folder.parent / "outside.txt").exists()
    assert outcome.output is None


async def test_fetch_refuses_a_symlink_that_leads_out(make_run, file_server, tmp_path):
    run, _ = make_run("debug.echo", "x", fetch=[{"path": "link/file.txt", "get": file_server.base + "/plain.txt"}])
    (run.folder / "link").symlink_to(tmp_path)
    assert "escapes the task folder" in failure_message(await run_task(run))
    assert not (tmp_path / "file.txt").exists()


def make_git_repo(path: Path) -> Path:
    path.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    (path / "README").write_text("from git\n")
    (path / "lib").mkdir()
    (path / "lib" / "code.sh").write_text("echo sourced\n")
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", *args], cwd=path, env=env, check=True)
    return path


async def test_git_clone_fetches_a_repository_into_the_task_folder(make_run, tmp_path):
    repo = make_git_repo(tmp_path / "origin")
    fetch = [{"path": "src/project", "gitClone": f"file://{repo}"}]
    run, _ = make_run("shell.bash", "cat src/project/README; . src/project/lib/code.sh",
                      fetch=fetch, allow_local_git=True)
    outcome = await run_task(run)
    assert outcome.kind == "success", outcome
    assert outcome.output["stdout"] == "from git\nsourced\n"


async def test_git_clone_of_local_repository_needs_opt_in(make_run, tmp_path):
    repo = make_git_repo(tmp_path / "origin")
    run, _ = make_run("debug.echo", "x", fetch=[{"path": "p", "gitClone": f"file://{repo}"}])
    assert "git URL scheme not allowed" in failure_message(await run_task(run))
    assert not (run.folder / "p").exists()


async def test_git_clone_failure_reports_gits_message(make_run, tmp_path):
    fetch = [{"path": "p", "gitClone": f"file://{tmp_path}/no-such-repo"}]
    run, _ = make_run("debug.echo", "x", fetch=fetch, allow_local_git=True)
    message = failure_message(await run_task(run))
    assert message.startswith("fetchFiles 'p': git clone failed:")
    assert "no-such-repo" in message


# -- artifacts -------------------------------------------------------------------

async def test_artifacts_come_back_with_size_hash_and_content(make_run):
    command = "mkdir -p out; printf 'hello artifact' > out/a.txt; head -c 3000 /dev/urandom > out/b.bin"
    run, _ = make_run("shell.bash", command, artifacts=[{"path": "out/a.txt"}, {"path": "out/b.bin"}])
    outcome = await run_task(run)
    assert outcome.kind == "success", outcome
    first, second = outcome.output["artifacts"]
    assert first == {"path": "out/a.txt", "size": 14,
                     "sha256": hashlib.sha256(b"hello artifact").hexdigest(),
                     "contentBase64": base64.b64encode(b"hello artifact").decode()}
    content = base64.b64decode(second["contentBase64"])
    assert second["size"] == len(content) == 3000
    assert second["sha256"] == hashlib.sha256(content).hexdigest()
    assert outcome.output["stdout"] == ""


async def test_artifacts_of_a_non_object_output_keep_it_under_result(make_run):
    run, _ = make_run("debug.echo", "just text", artifacts=[{"path": "a"}])
    (run.folder / "a").write_text("x")
    outcome = await run_task(run)
    assert outcome.output["result"] == "just text"
    assert outcome.output["artifacts"][0]["size"] == 1


async def test_missing_artifact_fails_the_task(make_run):
    run, _ = make_run("shell.bash", "true", artifacts=[{"path": "never.txt"}])
    assert failure_message(await run_task(run)) == "artifact 'never.txt' was not produced"


async def test_artifact_over_the_size_cap_fails_clearly(make_run):
    run, _ = make_run("shell.bash", "head -c 2048 /dev/zero > big", artifacts=[{"path": "big"}],
                      artifact_max_bytes=1024)
    assert failure_message(await run_task(run)) == \
        "artifact 'big' is 2048 bytes, over the limit of 1024 bytes"


async def test_artifact_symlink_out_of_the_task_folder_is_refused(make_run):
    run, _ = make_run("shell.bash", "ln -s /etc/hostname stolen", artifacts=[{"path": "stolen"}])
    outcome = await run_task(run)
    assert failure_message(outcome) == \
        "file path 'stolen' escapes the task folder through the symbolic link 'stolen'"
    assert outcome.output is None


# -- llm.<model> against an Ollama stand-in ----------------------------------------

@pytest.fixture
async def ollama(aiohttp_server):
    """Speaks Ollama's /api/chat: a JSON answer, or NDJSON chunks when `stream` is true."""
    requests = []
    words = ["The ", "sky ", "is ", "blue."]

    async def chat(request):
        body = await request.json()
        requests.append(body)
        if body["model"] != "tiny:1b":
            return web.json_response({"error": f"model '{body['model']}' not found"}, status=404)
        base = {"model": body["model"], "created_at": "2026-11-28T10:00:00Z"}
        if not body.get("stream", True):
            return web.json_response({**base, "message": {"role": "assistant", "content": "".join(words)},
                                      "done": True, "done_reason": "stop"})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for word in words:
            chunk = {**base, "message": {"role": "assistant", "content": word}, "done": False}
            await response.write(json.dumps(chunk).encode() + b"\n")
            await asyncio.sleep(0.3)
        final = {**base, "message": {"role": "assistant", "content": ""}, "done": True,
                 "done_reason": "stop", "eval_count": len(words)}
        await response.write(json.dumps(final).encode() + b"\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    server = await aiohttp_server(app)
    server.requests = requests
    server.base = str(server.make_url("")).rstrip("/")
    return server


async def test_llm_streams_text_as_progress_and_returns_the_full_message(make_run, ollama):
    payload = {"messages": [{"role": "user", "content": "Colour of the sky?"}], "stream": True}
    run, recorder = make_run("llm.tiny:1b", payload, ollama_url=ollama.base, interval_s=0.2)
    outcome = await run_task(run)
    assert outcome.kind == "success", outcome
    assert outcome.output["message"] == {"role": "assistant", "content": "The sky is blue."}
    assert outcome.output["done"] is True and outcome.output["eval_count"] == 4
    assert ollama.requests == [{"messages": payload["messages"], "stream": True, "model": "tiny:1b"}]
    log_sends = [text for _, _, text in recorder.sent if text]
    assert len(log_sends) >= 3, "the text should arrive in pieces, not at the end"
    assert "".join(log_sends) == "The sky is blue."


async def test_llm_without_stream_turns_a_prompt_into_chat_messages(make_run, ollama):
    run, recorder = make_run("llm.tiny:1b", {"prompt": "Colour?", "system": "Be brief."},
                             ollama_url=ollama.base)
    outcome = await run_task(run)
    assert outcome.output["message"]["content"] == "The sky is blue."
    assert ollama.requests[0] == {"model": "tiny:1b", "stream": False, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"}]}
    assert recorder.log == ""


async def test_llm_unknown_model_fails_with_ollamas_error(make_run, ollama):
    run, _ = make_run("llm.huge:405b", "hi", ollama_url=ollama.base)
    outcome = await run_task(run)
    assert failure_message(outcome) == "Ollama answered HTTP 404: model 'huge:405b' not found"


async def test_llm_unreachable_ollama_fails_clearly(make_run):
    url = f"http://127.0.0.1:{free_port()}"
    run, _ = make_run("llm.tiny:1b", "hi", ollama_url=url)
    assert failure_message(await run_task(run)).startswith(f"Ollama is not reachable at {url}")


# -- pieces of the agent's plumbing -------------------------------------------------

def test_backoff_doubles_to_the_cap_and_resets():
    backoff = Backoff(start_s=0.5, cap_s=30)
    assert [backoff.next_delay() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    backoff.reset()
    assert backoff.next_delay() == 0.5


async def test_progress_kept_when_the_server_is_unreachable_and_sent_later():
    attempts = []

    async def flaky_send(stage, text):
        attempts.append((stage, text))
        if len(attempts) == 1:
            raise ServerUnavailable("connection refused")

    reporter = ProgressReporter(flaky_send, interval_s=0.05)
    reporter.set_stage("running")
    reporter.write("one\n")
    await asyncio.sleep(0.01)
    reporter.write("two\n")
    await reporter.close()
    assert attempts == [("running", "one\n"), ("running", "one\ntwo\n")]


async def test_close_during_a_send_loses_no_text_and_sends_none_twice():
    # The task ends while a send is in flight: close() must let it finish (its text may
    # already be at the server), then send the rest after it, in order.
    delivered, in_flight, release = [], asyncio.Event(), asyncio.Event()

    async def slow_send(stage, text):
        if not delivered:
            in_flight.set()
            await release.wait()
        delivered.append(text)

    reporter = ProgressReporter(slow_send, interval_s=0.01)
    reporter.write("one\n")
    await in_flight.wait()
    reporter.write("two\n")
    closing = asyncio.ensure_future(reporter.close())
    await asyncio.sleep(0.05)
    release.set()
    await closing
    assert delivered == ["one\n", "two\n"]


async def test_progress_stops_after_the_server_refuses_it():
    attempts = []

    async def refusing_send(stage, text):
        attempts.append(text)
        raise agent.ServerRefused(409, "conflict", "task already ended")

    reporter = ProgressReporter(refusing_send, interval_s=0.01)
    reporter.write("one\n")
    await asyncio.sleep(0.05)
    reporter.write("two\n")
    await asyncio.sleep(0.05)
    await reporter.close()
    assert attempts == ["one\n"]
    assert not reporter.pending


def test_identity_file_is_private_and_round_trips(tmp_path):
    path = tmp_path / "conf" / "agent.json"
    path.parent.mkdir()
    path.write_text("{}")
    path.chmod(0o644)
    identity = AgentIdentity(server="http://127.0.0.1:1", agent_id="01AGENT", key="secret",
                             capabilities=["shell.bash", "llm.x[gpu]"], tier=3, capacity=2)
    agent.save_identity(path, identity)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert agent.load_identity(path) == identity
    assert json.loads(path.read_text())["agentId"] == "01AGENT"


def test_system_info_reports_the_contract_fields():
    info = agent.system_info()
    assert set(info) == {"os", "client", "runtime", "cpuArch", "totalMemoryMb", "gpu"}
    assert info["totalMemoryMb"] > 0
    assert info["client"] == f"offload-agent/{agent.__version__}"


def test_cli_sysinfo_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "offload_agent.py"), "sysinfo"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert json.loads(out)["cpuArch"]


def test_cli_serve_refuses_an_identity_with_nothing_it_can_run(tmp_path):
    config = tmp_path / "agent.json"
    agent.save_identity(config, AgentIdentity(server="http://127.0.0.1:9", agent_id="01A",
                                              key="k", capabilities=["vision[gpu]"]))
    proc = subprocess.run([sys.executable, str(ROOT / "offload_agent.py"), "serve",
                           "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "none of vision[gpu] has an executor here" in proc.stderr


def test_cli_serve_without_registration_explains_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "offload_agent.py"), "serve",
                           "--config", str(tmp_path / "none.json")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "run `register` first" in proc.stderr


# ---------------------------------------------------------------- the agent's HTTP client

@pytest.fixture
async def answering_server(aiohttp_server):
    """Answers the shapes a server or a proxy in front of it may use: a plain body, a
    chunked one, one that ends with the connection, and a slow one."""
    seen = []

    async def plain(request):
        seen.append((request.method, request.path, await request.read(),
                     request.headers.get("Authorization")))
        return web.json_response({"ok": True, "n": len(seen)})

    async def chunked(request):
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b'{"parts": ', b'[1, 2, ', b'3]}'):
            await response.write(part)
        await response.write_eof()
        return response

    async def closing(request):
        return web.Response(body=b'{"closed": true}', headers={"Connection": "close"})

    async def slow(request):
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/base/plain", plain)
    app.router.add_get("/base/chunked", chunked)
    app.router.add_get("/base/closing", closing)
    app.router.add_get("/base/slow", slow)
    server = await aiohttp_server(app)
    server.seen = seen
    return server


async def test_server_http_speaks_keep_alive_chunked_and_close(answering_server):
    http = agent.ServerHttp(str(answering_server.make_url("/base/")))
    try:
        status, body = await http.request("POST", "/plain", b'{"a": 1}', {"Authorization": "Bearer t"}, 5)
        assert status == 200 and json.loads(body) == {"ok": True, "n": 1}
        assert answering_server.seen[0] == ("POST", "/base/plain", b'{"a": 1}', "Bearer t")
        connection = http.idle[-1]
        await http.request("POST", "/plain", b"{}", {}, 5)
        assert http.idle == [connection], "the second request reused the connection"
        assert json.loads((await http.request("GET", "/chunked", None, {}, 5))[1]) == {"parts": [1, 2, 3]}
        assert (await http.request("GET", "/closing", None, {}, 5))[1] == b'{"closed": true}'
        assert http.idle == [], "a connection the server closes is not kept"
        assert (await http.request("GET", "/missing", None, {}, 5))[0] == 404
    finally:
        await http.close()


async def test_server_http_retries_an_idle_connection_the_server_closed(aiohttp_server):
    count = 0

    async def plain(request):
        nonlocal count
        count += 1
        return web.json_response({"n": count})

    app = web.Application()
    app.router.add_post("/plain", plain)
    server = await aiohttp_server(app, keepalive_timeout=0.1)
    http = agent.ServerHttp(str(server.make_url("")))
    try:
        await http.request("POST", "/plain", b"{}", {}, 5)
        _, writer = http.idle[-1]
        await asyncio.sleep(0.5)  # the server ends the idle keep-alive connection
        status, body = await http.request("POST", "/plain", b"{}", {}, 5)
        assert status == 200 and json.loads(body) == {"n": 2}, "sent once, on a new connection"
        assert writer.is_closing() and len(http.idle) == 1
    finally:
        await http.close()


async def test_server_http_times_out_and_drops_the_connection(answering_server):
    http = agent.ServerHttp(str(answering_server.make_url("")))
    try:
        with pytest.raises(TimeoutError):
            await http.request("GET", "/base/slow", None, {}, 0.2)
        assert http.idle == []
        with pytest.raises(OSError):
            await agent.ServerHttp(f"http://127.0.0.1:{free_port()}").request("GET", "/", None, {}, 5)
        with pytest.raises(ValueError):
            agent.ServerHttp("localhost:3069")
    finally:
        await http.close()


@pytest.mark.parametrize("command", ["register", "serve"])
def test_a_server_url_without_scheme_is_refused_clearly(tmp_path, command):
    config = tmp_path / "agent.json"
    if command == "serve":
        config.write_text(json.dumps({"server": "localhost:3069", "agentId": "a", "key": "k",
                                      "capabilities": ["debug.echo"], "tier": 0, "capacity": 1}))
        argv = ["serve", "--config", str(config)]
    else:
        argv = ["register", "--server", "localhost:3069", "--key", "k", "--config", str(config)]
    done = subprocess.run([sys.executable, str(ROOT / "offload_agent.py"), *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "http(s)://host[:port]" in done.stderr and "Traceback" not in done.stderr
