"""The Python client (`offloadmq.Client`, `offloadmq.AsyncClient`) against real server
processes: every verb, a failing task, cancel, a server kill -9 and restart in the
middle of `as_completed` with a real agent process, a submit whose answer is lost on the
way (a local TCP proxy drops it), and 10,000 submits over one TCP connection (the proxy
counts the connections it accepts)."""
import hashlib
import socket
import threading
import time

import pytest

from conftest import free_port, http
from test_e2e_agent import AgentProcess
from test_e2e_cli import CAP, agent  # noqa: F401 (a fixture)

import offloadmq
from offloadmq import (AsyncClient, BadRequest, Client, Conflict, DamagedFile, NotFound, OffloadError,
                       SchedulingImpossible, TaskCanceled, TaskFailed, Unauthenticated,
                       Unreachable, WaitTimeout)


class TcpProxy(threading.Thread):
    """127.0.0.1:port -> the server. Counts the connections it accepts; `drop_answers`
    makes it swallow that many of the server's answers and cut the client's connection
    instead (the request did reach the server); `mute_streams` swallows what the server
    writes on event streams, as a frozen server would say nothing; `cut()` ends every
    open connection."""

    def __init__(self, upstream_port: int):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream_port = upstream_port
        self.accepted = 0
        self.drop_answers = 0
        self.refuse = False  # accept and close at once, as a server that is not there
        self.mute_streams = False
        self.streams: set[socket.socket] = set()  # upstream connections that carry one
        self.requests: list[bytes] = []  # the first bytes of each client send
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()

    def run(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.accepted += 1
                self.open += [client, upstream]
            threading.Thread(target=self.pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, client, True), daemon=True).start()

    def pump(self, source, target, answers):
        try:
            while data := source.recv(65536):
                if answers:
                    if self.mute_streams and source in self.streams:
                        continue
                    with self.lock:
                        drop = self.drop_answers > 0
                        self.drop_answers -= drop
                    if drop:
                        break
                else:
                    with self.lock:
                        self.requests.append(data[:2000])
                        if data.startswith(b"GET /api/task/events"):
                            self.streams.add(target)
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut(self):
        with self.lock:
            for sock in self.open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.open.clear()

    def stop(self):
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(server):
    p = TcpProxy(server.port)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def mq(server):
    client = Client(server.url, server.client_key)
    yield client
    client.close()


def regular_tasks(server) -> list:
    status, listing = http("GET", server.url + "/management/tasks/list", headers=server.mgmt)
    assert status == 200
    return [t for part in listing["regular"].values() for t in part]


def wait_until(check, timeout=15, what="the condition"):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------- the verbs

def test_submit_result_status_and_the_configuration_from_the_environment(server, agent, monkeypatch):
    monkeypatch.setenv("OFFLOADMQ_URL", server.url)
    monkeypatch.setenv("OFFLOADMQ_API_KEY", server.client_key)
    with Client() as mq:
        task = mq.submit(CAP, {"lines": ["one"]}, restartable=True, max_retries=1)
        assert task.answer["status"] == "pending" and task.cap == CAP
        assert task.result(timeout=15) == {"lines": 1}
        status = task.status()
        assert status["status"] == "completed" and status["log"] == "one\n"
        again = mq.task(CAP, task.id)
        assert again.result(timeout=5) == {"lines": 1}
        assert CAP in mq.capabilities()


def test_lifecycle_fields_are_sent_in_camel_case(server, mq):
    task = mq.submit("nobody.serves", 1, priority=7, delay_secs=3600)
    listed = {t["id"]["id"]: t for t in regular_tasks(server)}[task.id]
    assert listed["data"]["priority"] == 7 and listed["data"]["delaySecs"] == 3600
    with pytest.raises(BadRequest) as err:
        mq.submit("nobody.serves", 1, priority="high")
    assert err.value.status == 400 and "priority" in err.value.message


def test_a_failed_task_raises_task_failed_with_its_output_and_log(server, agent, mq):
    task = mq.submit(CAP, {"lines": ["cc -o app"], "fail": True})
    with pytest.raises(TaskFailed) as err:
        task.result(timeout=15)
    assert err.value.task["status"] == "failed"
    assert err.value.output == {"lines": 1} and err.value.log == "cc -o app\n"
    # The same through the event stream, and from submit_blocking.
    other = mq.submit(CAP, {"fail": True})
    assert [h.id for h in mq.as_completed([other], timeout=15)] == [other.id]
    with pytest.raises(TaskFailed):
        other.result()
    with pytest.raises(TaskFailed) as err:
        mq.submit_blocking(CAP, {"lines": ["boom"], "fail": True})
    assert err.value.log == "boom\n"


def test_cancel_a_queued_task_then_its_result_raises_canceled(server, mq):
    task = mq.submit("nobody.serves", {"x": 1})
    assert task.cancel()["status"] == "canceled"
    with pytest.raises(TaskCanceled):
        task.result(timeout=5)
    with pytest.raises(Conflict) as err:
        task.cancel()
    assert err.value.status == 409 and err.value.message


def test_logs_stream_while_the_task_runs(server, agent, mq):
    task = mq.submit(CAP, {"lines": ["first", "second"], "hold": True})
    logs = task.logs()
    seen = ""
    while seen != "first\nsecond\n":
        seen += next(logs)
    assert task.status()["status"] == "running"  # the agent holds it: the log came live
    agent.release.set()
    assert list(logs) == []  # ends with the task
    assert task.result(timeout=15) == {"lines": 2}


def test_submit_blocking_map_and_as_completed(server, agent, mq):
    assert mq.submit_blocking(CAP, {"lines": ["a"]}) == {"lines": 1}
    outputs = list(mq.map(CAP, [{"lines": ["x"] * n} for n in range(20)]))
    assert outputs == [{"lines": n} for n in range(20)]
    handles = [mq.submit(CAP, {"lines": ["y"] * n}) for n in range(10)]
    done = list(mq.as_completed(handles, timeout=30))
    assert sorted(h.id for h in done) == sorted(h.id for h in handles)
    assert all(h.result() == {"lines": n} for n, h in enumerate(handles))
    with pytest.raises(WaitTimeout):
        list(mq.as_completed([mq.submit("nobody.serves")], timeout=0.5))


def test_events_is_the_raw_stream(server, agent, mq):
    with mq.events() as stream:
        task = mq.submit(CAP, {"lines": ["l1"]})
        kinds = []
        for event in stream:
            if isinstance(event.data, dict) and event.data.get("id") == task.task_id:
                kinds.append(event.kind)
                if event.kind == "end":
                    assert event.data["result"] == {"lines": 1} and event.id
                    break
    assert kinds[0] == "status" and "log" in kinds and kinds[-1] == "end"


def test_server_errors_become_exceptions_with_the_servers_message(server, mq):
    with pytest.raises(NotFound) as err:
        mq.task(CAP, "01ARZ3NDEKTSV4RRFFQ69G5FAV").status()
    assert err.value.status == 404 and err.value.type == "not_found" and err.value.message
    with pytest.raises(SchedulingImpossible) as err:
        mq.submit("nobody.serves", urgent=True)
    assert err.value.status == 503
    with Client(server.url, "wrong-key") as bad:
        with pytest.raises(Unauthenticated) as err:
            bad.submit(CAP)
    assert "unknown or revoked API key" in str(err.value)
    assert isinstance(err.value, OffloadError)
    with Client(f"http://127.0.0.1:{free_port()}", "k", retry_s=0.3) as down:
        with pytest.raises(Unreachable):
            down.submit(CAP)


async def test_async_client_verbs(server, agent):
    async with AsyncClient(server.url, server.client_key) as mq:
        task = await mq.submit(CAP, {"lines": ["async"]})
        assert await task.result(timeout=15) == {"lines": 1}
        assert (await task.status())["log"] == "async\n"
        outputs = [o async for o in mq.map(CAP, [{"lines": []}] * 5, in_flight=3)]
        assert outputs == [{"lines": 0}] * 5
        handles = [await mq.submit(CAP, {"lines": ["z"]}) for _ in range(3)]
        assert len([h async for h in mq.as_completed(handles, timeout=15)]) == 3
        assert await mq.submit_blocking(CAP, {}) == {"lines": 0}
        queued = await mq.submit("nobody.serves")
        assert (await queued.cancel())["status"] == "canceled"


def test_bucket_files_go_to_a_real_agent_and_its_output_comes_back_checked(server, mq, tmp_path):
    """Stage a file, name the buckets in a task a real agent runs, download what it wrote;
    a file the disk damaged behind the server's back (same size) is refused on download
    and leaves nothing at the destination."""
    from test_e2e_agent import AgentProcess
    words = tmp_path / "words.txt"
    words.write_bytes(b"hello buckets\n" * 5000)
    inputs, output = mq.create_bucket(), mq.create_bucket()
    stored = mq.upload(inputs, words)
    assert stored["size"] == 70_000 and stored["sha256"] == hashlib.sha256(words.read_bytes()).hexdigest()
    assert [f["original_name"] for f in mq.bucket(inputs)["files"]] == ["words.txt"]
    with pytest.raises(Conflict):
        mq.upload(inputs, words)  # the name is taken
    tied = mq.create_bucket(rm_after_task=True)
    assert {b["bucket_uid"]: b["rm_after_task"] for b in mq.buckets()} == {inputs: False, output: False, tied: True}
    agent = AgentProcess(server, tmp_path / "agent", ["shell.bash"]).register().start()
    try:
        task = mq.submit("shell.bash", {"command": "tr a-z A-Z < words.txt > output/shout.txt"},
                         file_bucket=[inputs], output_bucket=output)
        [shout] = task.result(timeout=30)["output_files"]
    finally:
        agent.kill()
    got = mq.download(output, shout["file_uid"], tmp_path / "shout.txt")
    assert got.read_bytes() == words.read_bytes().upper()
    (server.data / "buckets" / inputs / stored["file_uid"]).write_bytes(b"X" * 70_000)
    with pytest.raises(DamagedFile, match="arrived damaged"):
        mq.download(inputs, stored["file_uid"], tmp_path / "copy.txt")
    assert not list(tmp_path.glob("*copy.txt*"))
    mq.delete_file(inputs, stored["file_uid"])
    assert mq.bucket(inputs)["files"] == []
    mq.delete_bucket(inputs)
    with pytest.raises(NotFound):
        mq.bucket(inputs)
    with Client(server.url, "not-a-key-of-this-server") as stranger, pytest.raises(Unauthenticated):
        stranger.buckets()


# ---------------------------------------------------------------- faults, for real

def test_server_kill_9_and_restart_during_as_completed_loses_nothing(make_server, tmp_path):
    """The client's event stream is down (a proxy refuses it) while the server is killed,
    restarted, and the agent finishes every task: the resumed stream, from a new run,
    cannot replay those ends, and the client must ask the server for them."""
    srv = make_server().start()
    proxy = TcpProxy(srv.port)
    proxy.start()
    agent = AgentProcess(srv, tmp_path / "agent", ["debug.echo"], capacity=4).register()

    def start_agent_once_the_stream_is_open():
        wait_until(lambda: any(r.startswith(b"GET /api/task/events") for r in proxy.requests),
                   what="the client's event stream")
        agent.start()
    starter = threading.Thread(target=start_agent_once_the_stream_is_open, daemon=True)
    try:
        with Client(proxy.url, srv.client_key) as mq:
            handles = [mq.submit("debug.echo", {"n": i}, restartable=True) for i in range(1000)]
            starter.start()
            seen = {}
            for handle in mq.as_completed(handles, timeout=60):
                seen[handle.id] = handle.result()
                if len(seen) == 200:
                    proxy.refuse = True
                    proxy.cut()
                    srv.restart()  # kill -9, then the same port and data folder
                    wait_until(lambda: http("GET", srv.url + "/stats")[1]["tasks"]["regular"]
                               .get("completed") == 1000, timeout=60, what="every task done")
                    proxy.refuse = False
            assert len(seen) == 1000
            assert all(seen[h.id] == {"n": i} for i, h in enumerate(handles))
    finally:
        starter.join(20)
        agent.kill()
        proxy.stop()


def test_a_dropped_stream_resumes_with_last_event_id(server, agent, proxy):
    with Client(proxy.url, server.client_key) as mq:
        first = mq.submit(CAP, {"lines": []})
        list(mq.as_completed([first], timeout=15))  # the watch is open now
        handles = [mq.submit(CAP, {"lines": ["x"], "hold": True})] + \
            [mq.submit(CAP, {"lines": []}) for _ in range(5)]
        wait_until(lambda: handles[0].status()["status"] == "running", what="the held task")
        proxy.cut()  # every connection, the event stream too

        def resumed() -> list[int]:
            return [i for i, r in enumerate(proxy.requests) if r.startswith(b"GET /api/task/events")
                    and b"Last-Event-ID: " in r]
        wait_until(resumed, what="the stream resumed with Last-Event-ID")
        agent.release.set()  # the tasks end after the resume: none ended while it was cut
        assert len(list(mq.as_completed(handles, timeout=30))) == 6
    polls = [r for r in proxy.requests[resumed()[0]:] if r.startswith(b"GET /api/task/poll")]
    assert not polls, "the server replayed what the stream missed: no poll per task"


def test_a_stream_lost_before_its_first_event_still_finds_the_tasks_that_ended_meanwhile(
        server, agent, proxy):
    """Reconnecting without a Last-Event-ID (no event had come) cannot resume: a task
    that ended while the stream was down must be asked about, not waited for."""
    with Client(proxy.url, server.client_key) as mq:
        assert list(mq.as_completed([], timeout=5)) == []  # the watch is open, no event yet
        proxy.mute_streams = True  # its events go nowhere, as from a frozen server
        task = mq.submit(CAP, {"lines": []})
        wait_until(lambda: http("GET", f"{server.url}/api/task/poll/{CAP}/{task.id}",
                                headers={"X-API-Key": server.client_key})[1]["status"] == "completed",
                   what="the task to end")
        proxy.cut()
        proxy.mute_streams = False
        assert [h.id for h in mq.as_completed([task], timeout=10)] == [task.id]


def test_a_submit_whose_answer_is_lost_makes_one_task(server, proxy):
    with Client(proxy.url, server.client_key) as mq:
        mq.submit("warm.up")  # a kept-alive connection, so the drop hits a reused one
        proxy.drop_answers = 1
        task = mq.submit("nobody.serves", {"once": True})
        assert proxy.drop_answers == 0  # the first answer was swallowed
        mine = [t for t in regular_tasks(server) if t["data"]["capability"] == "nobody.serves"]
        assert [t["id"]["id"] for t in mine] == [task.id]
        sent = [r for r in proxy.requests if r.startswith(b"POST /api/task/submit")]
        assert len(sent) == 3  # warm-up, the lost one, its retry
        assert sent[1].split(b"Idempotency-Key: ")[1].split(b"\r\n")[0] == \
            sent[2].split(b"Idempotency-Key: ")[1].split(b"\r\n")[0]
        # A fresh connection whose first answer is lost is retried the same way.
        proxy.cut()
        proxy.drop_answers = 1
        second = mq.submit("nobody.serves", {"twice": True})
        mine = [t for t in regular_tasks(server) if t["data"]["capability"] == "nobody.serves"]
        assert sorted(t["id"]["id"] for t in mine) == sorted([task.id, second.id])


def test_ten_thousand_submits_use_one_tcp_connection(make_server):
    srv = make_server(extra_args=("--fsync", "no")).start()
    proxy = TcpProxy(srv.port)
    proxy.start()
    try:
        with Client(proxy.url, srv.client_key) as mq:
            ids = {mq.submit("bulk.cap", i).id for i in range(10_000)}
        assert len(ids) == 10_000
        assert proxy.accepted == 1
        status, stats = http("GET", srv.url + "/stats")
        assert stats["queues"]["bulk.cap"] == 10_000, stats
    finally:
        proxy.stop()


def test_the_client_lives_beside_the_agent_and_shares_its_http(server):
    """The HTTP code exists once: the client's connection is the agent's ServerHttp."""
    import offload_agent
    with Client(server.url, server.client_key) as mq:
        assert isinstance(mq._async.http, offload_agent.ServerHttp)
    assert offloadmq.Client is Client
