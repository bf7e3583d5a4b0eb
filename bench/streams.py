"""Slow and many readers (issue 18 item 5) and the task listing at scale (issue 16 item 10).

Client side of three bench/run.py sections; each prints one JSON line.

  fanout   sequential submits (fsync always), p50/p90 and server CPU per submit, first with
           no event stream open, then with N /management/events subscribers (read by a
           separate process that discards what it gets), in one run: the ratio is the target.
  streams  at a prebuilt queue of pending tasks: time to the first byte of a stream's
           start, /health latency while 10 streams that never read start, server RSS held
           by them and after they close.
  list     at a prebuilt 100,000-task state: the first page of the paginated listing
           (latency, bytes), the full listing of the original shape (latency, bytes), the
           slowest /health answered during it, and the console's first paint of Tasks in bytes.

The queues are built before the server starts, through the project's own broker and
journal (build_state), so the run does not spend minutes submitting over HTTP.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import selectors
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import HOST, cpu_seconds, emit, percentiles, rss_bytes


def build_state(data: Path, client_key: str, pending: int, ended: int = 0, cap: str | None = None) -> None:
    """`pending` waiting tasks plus `ended` canceled ones of `client_key` (of `cap`, else
    spread over ten capabilities), journaled as the server journals them (fsync off:
    this is setup, not the measurement)."""
    from offloadmq import Broker, Journal, owner_of, parse_submission

    async def fill():
        broker, journal = Broker((client_key,), time.time()), Journal(data, "no")
        journal.recover(broker)
        owner, changes = owner_of(client_key), []
        for i in range(pending + ended):
            submission = parse_submission({"capability": cap or f"bench.cap{i % 10}",
                                           "payload": {"n": i, "pad": "x" * 200}})
            task = broker.submit(submission, owner, None, time.time(), changes=changes)
            if i < ended:
                broker.cancel(task.cap, task.id, owner, time.time(), changes=changes)
        journal.enqueue([c.line for c in changes if c.durable])
        await journal.close()
    asyncio.run(fill())


class Http:
    """One keep-alive connection, stdlib only."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def call(self, method: str, path: str, headers: dict, body: dict | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {**headers, **({"Content-Type": "application/json"} if data else {})}
        self.conn.request(method, path, body=data, headers=hdrs)
        resp = self.conn.getresponse()
        return resp.status, resp.read()


def submit_run(url: str, key: str, n: int, pid: int) -> dict:
    client = Http(url)
    headers = {"X-API-Key": key}
    for i in range(20):  # warm-up
        client.call("POST", "/api/task/submit", headers, {"capability": "bench.fanout", "payload": {"w": i}})
    samples = []
    cpu0 = cpu_seconds(pid)
    for i in range(n):
        started = time.perf_counter()
        status, body = client.call("POST", "/api/task/submit", headers,
                                   {"capability": "bench.fanout", "payload": {"n": i}})
        samples.append(time.perf_counter() - started)
        if status != 201:
            raise RuntimeError(f"submit answered {status}: {body[:200]!r}")
    cpu = cpu_seconds(pid) - cpu0
    return {**percentiles(samples), "server_cpu_ms_per_submit": cpu / n * 1000}


def _reader(port: int, token: str, count: int, ready, stop) -> None:
    """A separate process: opens `count` management streams and reads them all,
    discarding the bytes, until told to stop."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(count):
        s = socket.create_connection((HOST, port))
        s.sendall(f"GET /management/events?current=0 HTTP/1.1\r\nHost: {HOST}\r\n"
                  f"X-Mgmt-Token: {token}\r\n\r\n".encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    started = set()
    got = 0
    while not stop.is_set():
        for key, _ in sel.select(timeout=0.2):
            try:
                chunk = key.fileobj.recv(1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            got += len(chunk)
            if key.fileobj not in started and b" 200 " in chunk[:20]:
                started.add(key.fileobj)
                if len(started) == count:
                    ready.set()
    for s in socks:
        s.close()


def fanout(url: str, key: str, token: str, pid: int, subscribers: int, n: int) -> dict:
    port = urlsplit(url).port
    alone = submit_run(url, key, n, pid)
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    reader = ctx.Process(target=_reader, args=(port, token, subscribers, ready, stop), daemon=True)
    reader.start()
    try:
        if not ready.wait(120):
            raise RuntimeError(f"{subscribers} event streams did not all open")
        time.sleep(1.0)
        crowded = submit_run(url, key, n, pid)
    finally:
        stop.set()
        reader.join(30)
    return {"subscribers": subscribers, "n": n, "none": alone, "with": crowded,
            "p50_ratio": crowded["p50"] / alone["p50"],
            "cpu_ratio": crowded["server_cpu_ms_per_submit"] / max(alone["server_cpu_ms_per_submit"], 1e-6)}


def _health_during(url: str, busy: threading.Event) -> list[float]:
    client = Http(url)
    times = []
    while not busy.is_set():
        started = time.perf_counter()
        client.call("GET", "/health", {})
        times.append(time.perf_counter() - started)
        time.sleep(0.01)
    return times


def streams(url: str, key: str, pid: int, count: int) -> dict:
    port = urlsplit(url).port
    time.sleep(1.0)
    rss0 = rss_bytes(pid)
    started = time.perf_counter()
    first = socket.create_connection((HOST, port))
    first.sendall(f"GET /api/task/events HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: {key}\r\n\r\n".encode())
    data = b""
    while b"event: status" not in data:
        data += first.recv(1 << 16)
    first_event_ms = (time.perf_counter() - started) * 1000
    first.close()
    done = threading.Event()
    health: list[float] = []
    prober = threading.Thread(target=lambda: health.extend(_health_during(url, done)))
    prober.start()
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((HOST, port))
        s.sendall(f"GET /api/task/events HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: {key}\r\n\r\n".encode())
        socks.append(s)
    time.sleep(3.0)
    done.set()
    prober.join()
    held = rss_bytes(pid)
    for s in socks:
        s.close()
    time.sleep(3.0)
    after = rss_bytes(pid)
    return {"streams": count, "first_event_ms": first_event_ms,
            "health_max_ms": max(health) * 1000 if health else None,
            "health_p50_ms": percentiles(health)["p50"], "rss_before_mb": rss0 / 2**20,
            "rss_held_mb": held / 2**20, "rss_after_mb": after / 2**20,
            "mb_per_stream": (held - rss0) / 2**20 / count}


def listing(url: str, token: str, static_root: Path) -> dict:
    headers = {"X-Mgmt-Token": token}
    client = Http(url)
    client.call("GET", "/health", {})
    started = time.perf_counter()
    status, page = client.call("GET", "/management/tasks/list?limit=200", headers)
    page_ms = (time.perf_counter() - started) * 1000
    if status != 200:
        raise RuntimeError(f"paginated listing answered {status}: {page[:200]!r}")
    done = threading.Event()
    health: list[float] = []
    prober = threading.Thread(target=lambda: health.extend(_health_during(url, done)))
    prober.start()
    time.sleep(0.1)
    started = time.perf_counter()
    status, full = Http(url).call("GET", "/management/tasks/list", headers)
    full_ms = (time.perf_counter() - started) * 1000
    done.set()
    prober.join()
    tasks = sum(len(v) for q in json.loads(full).values() if isinstance(q, dict) for v in q.values())
    # The console's first paint of Tasks: its static files plus the calls the page makes.
    static = sum(p.stat().st_size for p in static_root.rglob("*") if p.is_file())
    console = static + len(page)
    for path in ("/stats", "/management/capabilities/list/online"):
        console += len(client.call("GET", path, headers)[1])
    return {"tasks": tasks, "page_ms": page_ms, "page_bytes": len(page), "full_ms": full_ms,
            "full_bytes": len(full), "health_max_ms_during_full": max(health) * 1000 if health else None,
            "health_n": len(health), "console_first_paint_bytes": console,
            "browser": console_in_chromium(url, token)}


def console_in_chromium(url: str, token: str) -> dict | None:
    """The console's Tasks page in headless Chromium (when installed): time from
    navigation to the first task row, and the bytes of every response finished by then."""
    import shutil
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return None
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context().new_page()
            page.add_init_script(f"localStorage.setItem('offloadmq.mgmtToken', {json.dumps(token)})")
            received = []
            page.on("requestfinished", lambda req: received.append(req.sizes()["responseBodySize"]))
            started = time.perf_counter()
            page.goto(url + "/#/tasks")
            page.wait_for_selector("#view tbody tr", timeout=60_000)
            first_row_ms = (time.perf_counter() - started) * 1000
            rows = page.locator("#view tbody tr").count()
            return {"first_row_ms": first_row_ms, "bytes": sum(received), "rows": rows}
        finally:
            browser.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("fanout", "streams", "list"))
    p.add_argument("--url", required=True)
    p.add_argument("--key", default="")
    p.add_argument("--token", default="")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--subscribers", type=int, default=500)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--static", type=Path)
    args = p.parse_args()
    if args.what == "fanout":
        emit(fanout(args.url, args.key, args.token, args.pid, args.subscribers, args.n))
    elif args.what == "streams":
        emit(streams(args.url, args.key, args.pid, args.count))
    else:
        emit(listing(args.url, args.token, args.static))


if __name__ == "__main__":
    main()
