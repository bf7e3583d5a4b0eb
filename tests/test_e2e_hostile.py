"""Hostile bodies and guessed credentials against a real server process, over raw
sockets: bodies that never end are cut, bodies refused for a wrong credential are not
read, many large bodies at once keep the server's memory bounded, guesses get 429."""
import concurrent.futures
import json
import socket
import time
from pathlib import Path

from conftest import http

MB = 1024 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_request(server, head: str, body: bytes = b"") -> socket.socket:
    """Send a request's head (and the start of its body) and leave the socket open."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def head(path: str, *headers: str) -> str:
    return "".join(f"{line}\r\n" for line in (f"POST {path} HTTP/1.1", "Host: 127.0.0.1",
                                               "Content-Type: application/json", *headers))


def read_answer(sock: socket.socket, timeout: float) -> tuple[int, dict, bytes, float]:
    """(status, headers, body, seconds taken) of the answer; the body read until the
    server closes the connection (the test then knows it was closed)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    elapsed = time.monotonic() - started
    raw_head, _, body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body, elapsed


def error_type(body: bytes) -> str:
    return json.loads(body)["error"]["type"]


def test_a_body_that_never_ends_is_cut_after_the_body_timeout(make_server):
    server = make_server(extra_env={"OFFLOADMQ_BODY_TIMEOUT": "1"}).start()
    key = f"X-API-Key: {server.client_key}"
    never_ending = [
        # chunked without the last chunk, with a key in the header
        open_request(server, head("/api/task/submit", key, "Transfer-Encoding: chunked"), b'5\r\n{"cap\r\n'),
        # Content-Length larger than what is sent
        open_request(server, head("/api/task/submit", key, "Content-Length: 1000"), b'{"capability"'),
        # no credential in the headers: the body would carry it (apiKey)
        open_request(server, head("/api/task/submit", "Transfer-Encoding: chunked"), b"3\r\n{\"a\r\n"),
        # an open route
        open_request(server, head("/agent/register", "Content-Length: 500"), b"{"),
        # a management route
        open_request(server, head("/management/client_api_keys/update", f"X-Mgmt-Token: {server.mgmt_token}",
                                  "Content-Length: 500"), b"{"),
    ]
    for sock in never_ending:
        status, headers, body, elapsed = read_answer(sock, timeout=20)  # and the connection closed
        assert status == 408 and error_type(body) == "request_timeout", body
        assert headers.get("connection", "").lower() == "close"
        assert elapsed < 15
        sock.close()
    status, _ = http("GET", server.url + "/health")
    assert status == 200
    assert "Traceback" not in server.output()


def test_a_wrong_header_credential_is_refused_without_reading_the_body(make_server):
    server = make_server().start()
    # Sixteen 16 MB bodies announced, none sent: each is answered at once.
    socks = [open_request(server, head("/api/task/submit", f"X-API-Key: ck-wrong-{i:04d}-0123456789",
                                       f"Content-Length: {16 * MB}"), b"{") for i in range(16)]
    socks += [open_request(server, head("/management/tasks/reset", "X-Mgmt-Token: mt-wrong-0123456789",
                                        f"Content-Length: {16 * MB}"), b"{")]
    for sock in socks:
        sock.settimeout(10)
        first = sock.recv(200)
        assert first.startswith(b"HTTP/1.1 401"), first
        sock.close()


def test_many_large_bodies_at_once_get_503_and_memory_stays_bounded(make_server):
    server = make_server(extra_env={"OFFLOADMQ_BODY_TIMEOUT": "5", "OFFLOADMQ_BODY_BUDGET_MB": "64"}).start()
    before = rss_mb(server.proc.pid)
    size, sent = 15 * MB, 12 * MB
    heads = [head("/api/task/submit", f"X-API-Key: {server.client_key}", f"Content-Length: {size}")] * 24
    heads += [head("/api/task/submit", f"X-API-Key: ck-guess-{i:03d}-0123456789", f"Content-Length: {size}")
              for i in range(24)]
    socks = [open_request(server, h) for h in heads]
    body = b'{"capability": "bulk", "payload": "' + b"x" * sent

    def send_then_answer(sock):
        try:  # 12 of the 15 MB, then nothing: the admitted ones hold their share of the budget
            sock.sendall(body)
        except OSError:
            pass  # refused and closed before all of it was sent: the answer is still there
        return read_answer(sock, timeout=30)

    peak = before
    with concurrent.futures.ThreadPoolExecutor(len(socks)) as pool:
        futures = [pool.submit(send_then_answer, sock) for sock in socks]
        while not all(f.done() for f in futures):
            peak = max(peak, rss_mb(server.proc.pid))
            time.sleep(0.05)
        answers = [f.result() for f in futures]
    statuses = [a[0] for a in answers]
    authenticated, guessed = statuses[:24], statuses[24:]
    assert set(guessed) == {401}, guessed
    assert authenticated.count(503) >= 24 - 64 // 15, authenticated  # past the budget
    assert set(authenticated) <= {503, 408}, authenticated            # the admitted ones time out
    for status, headers, answer, _ in answers[:24]:
        if status == 503:
            assert error_type(answer) == "overloaded" and 1 <= int(headers["retry-after"]) <= 60
    for sock in socks:
        sock.close()
    # Before the budget, 24 such bodies took the server from 46 to 729 MB.
    print(f"RSS before {before:.0f} MB, peak {peak:.0f} MB")
    assert peak - before < 250, (before, peak)
    status, _ = http("GET", server.url + "/health")
    assert status == 200
    # After the load, a normal submit works.
    status, answer = http("POST", server.url + "/api/task/submit", {"capability": "bulk"}, server.client)
    assert status == 201, answer


def test_guessed_keys_get_429_and_are_logged_without_the_secret(make_server):
    server = make_server().start()
    statuses = []
    for i in range(80):
        guess = f"ck-guess-{i:03d}-secret-looking"
        req_headers = {"X-API-Key": guess}
        status, body = http("POST", server.url + "/api/task/submit", {"capability": "x"}, req_headers)
        statuses.append(status)
        if status == 429:
            assert body["error"]["type"] == "too_many_requests"
            break
    assert statuses[-1] == 429 and statuses.count(401) >= 50, statuses
    # Retry-After is at most a minute; after it the address may try again.
    sock = open_request(server, head("/api/task/submit", "X-API-Key: ck-guess-again-0123456789",
                                     "Content-Length: 2", "Connection: close"), b"{}")
    status, headers, _, _ = read_answer(sock, timeout=10)
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 60
    time.sleep(int(headers["retry-after"]) + 0.2)
    status, _ = http("POST", server.url + "/api/task/submit", {"capability": "x"}, server.client)
    assert status == 201
    log = server.output()
    assert "failed authentication from 127.0.0.1" in log
    assert "secret-looking" not in log


def test_control_characters_cannot_forge_server_log_lines(make_server):
    server = make_server().start()
    forged = "FORGED 2026-01-01 00:00:00 INFO agent"
    status, _ = http("POST", server.url + "/agent/register", {
        "apiKey": server.agent_key, "capabilities": [f"echo\n{forged}"], "systemInfo": {}})
    assert status == 400
    status, _ = http("POST", server.url + "/api/task/submit", {"capability": f"x\r\n{forged}"}, server.client)
    assert status == 400
    sock = open_request(server, head(f"/api/task/poll/x%0A{forged.replace(' ', '%20')}/1",
                                     "X-API-Key: wrong-0123456789abcdef", "Content-Length: 0",
                                     "Connection: close"))
    read_answer(sock, timeout=10)
    for line in server.output().splitlines():
        assert not line.startswith("FORGED"), line


def test_short_keys_from_the_environment_work_and_are_warned_about(make_server):
    server = make_server()
    server.client_key = "ck-short"
    server.start()
    status, _ = http("POST", server.url + "/api/task/submit", {"capability": "x"}, server.client)
    assert status == 201
    assert "client API key set at start has 8 characters" in server.output()
    assert "ck-short" not in server.output()


def test_answers_name_no_server_version_and_stats_hide_the_journal(server):
    sock = open_request(server, "GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n")
    status, headers, body, _ = read_answer(sock, timeout=10)
    assert status == 200 and headers["server"] == "OffloadMQ"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    stats = json.loads(body)
    assert "journal" not in stats and str(server.data) not in body.decode()
    status, stats = http("GET", server.url + "/stats", headers=server.mgmt)
    assert status == 200 and stats["journal"]["path"].startswith(str(server.data))
    status, _ = http("GET", server.url + "/stats", headers={"X-Mgmt-Token": "mt-wrong-0123456789"})
    assert status == 401


def test_headers_that_are_not_utf8_are_400_not_500(server):
    body = b'{"capability": "x"}'
    for header in (b"X-API-Key: ck-\xff-0123456789abcdef", b"X-Mgmt-Token: mt-\xe9",
                   b"Authorization: Bearer ab\xffcd", b"Idempotency-Key: job-\xff"):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        key = b"" if header.startswith(b"X-API-Key") else b"X-API-Key: %s\r\n" % server.client_key.encode()
        sock.sendall(b"POST /api/task/submit HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + key
                     + b"Content-Length: %d\r\n" % len(body) + header + b"\r\n\r\n" + body)
        status, _, answer, _ = read_answer(sock, timeout=10)
        assert status == 400, answer
        message = json.loads(answer)["error"]["message"]
        assert "UTF-8" in message and "surrogate" not in message
        sock.close()
    assert "bug while handling" not in server.output()


def test_a_rotated_agent_credential_stays_revoked_after_kill_9(make_server):
    server = make_server().start()
    status, reg = http("POST", server.url + "/agent/register", {
        "apiKey": server.agent_key, "capabilities": ["echo"], "systemInfo": {}})
    assert status == 200, reg
    token = http("POST", server.url + "/agent/auth", {"agentId": reg["agentId"], "key": reg["key"]})[1]["token"]
    old = {"Authorization": f"Bearer {token}"}
    status, sub = http("POST", server.url + "/api/task/submit", {"capability": "echo"}, server.client)
    task = sub["id"]
    assert http("GET", server.url + "/private/agent/task/poll?wait=0&take=1", headers=old)[1]["id"] == task
    status, fresh = http("POST", server.url + "/private/agent/rotate_key", headers=old)
    assert status == 200 and fresh["agentId"] == reg["agentId"], fresh
    server.restart()  # kill -9, then the journal replayed
    new = {"Authorization": f"Bearer {fresh['token']}"}
    status, answer = http("GET", server.url + "/private/agent/ping", headers=old)
    assert status == 401 and "revoked" in answer["error"]["message"]
    assert http("POST", server.url + "/agent/auth", {"agentId": reg["agentId"], "key": reg["key"]})[0] == 401
    assert http("GET", server.url + "/private/agent/ping", headers=new)[0] == 200
    assert http("POST", server.url + "/agent/auth", {"agentId": reg["agentId"], "key": fresh["key"]})[0] == 200

    status, agent = http("POST", f"{server.url}/management/agents/rotate_key/{reg['agentId']}", headers=server.mgmt)
    assert status == 200 and agent["tasksInFlight"] == 1 and "key" not in agent
    server.restart()
    status, answer = http("GET", server.url + "/private/agent/ping", headers=new)
    assert status == 401 and "revoked" in answer["error"]["message"]
    assert http("POST", server.url + "/agent/auth", {"agentId": reg["agentId"], "key": fresh["key"]})[0] == 401
    [listed] = http("GET", server.url + "/management/agents/list", headers=server.mgmt)[1]
    assert listed["uid"] == reg["agentId"] and listed["tasksInFlight"] == 1
