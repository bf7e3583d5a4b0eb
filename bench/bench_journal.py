#!/usr/bin/env python3
"""Journal benchmark: prints figures, asserts nothing.

  1. durable submits/s with fsync `always` vs `no` (real server processes, concurrent
     aiohttp clients from this process);
  2. replay speed (records/s) of a 1,000,000-record journal written with the real
     `encode_record`;
  3. p99 submit latency while a compaction of a large state runs, against the p99 of
     the same load without one.

Run: .venv/bin/python bench/bench_journal.py [--seconds 5] [--clients 64] [--records 1000000]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offloadmq import Broker, Journal, UlidFactory, encode_record, iso, owner_of, parse_iso  # noqa: E402

CAP = "bench.echo"


# ---------------------------------------------------------------- a server process

class Server:
    def __init__(self, data: Path, env: dict[str, str] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = data
        self.client_key = "ck-" + secrets.token_hex(8)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOADMQ_")}
        self.env.update(AGENT_API_KEYS="ak-" + secrets.token_hex(8), CLIENT_API_KEYS=self.client_key,
                        MGMT_TOKEN="mt-" + secrets.token_hex(8), JWT_SECRET=secrets.token_hex(16),
                        **(env or {}))
        self.log_path = data.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 300) -> "Server":
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "offloadmq.py"), "--host", "127.0.0.1",
             "--port", str(self.port), "--data", str(self.data)],
            cwd=str(self.data.parent), env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log_path.read_text())
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


# ---------------------------------------------------------------- load

async def submit_load(url: str, key: str, clients: int, seconds: float,
                      samples: list | None = None) -> tuple[int, list[float]]:
    """`clients` concurrent submit loops for `seconds`; returns (acknowledged, latencies).
    With `samples`, appends (start time, latency) of every request."""
    latencies: list[float] = []
    done = 0
    stop_at = time.perf_counter() + seconds
    body = {"capability": CAP, "payload": {"text": "x" * 100}}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers={"X-API-Key": key}) as session:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                async with session.post(url + "/api/task/submit", json=body) as resp:
                    await resp.read()
                    ok = resp.status == 201
                latency = time.perf_counter() - started
                if ok:
                    done += 1
                    latencies.append(latency)
                    if samples is not None:
                        samples.append((started, latency))
        await asyncio.gather(*[worker() for _ in range(clients)])
    return done, latencies


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def bench_fsync(tmp: Path, clients: int, seconds: float) -> None:
    print(f"== durable submits/s ({clients} concurrent clients, {seconds:.0f} s each)")
    for policy in ("always", "no"):
        srv = Server(tmp / f"fsync-{policy}" / "data", {"OFFLOADMQ_FSYNC": policy}).start()
        try:
            asyncio.run(submit_load(srv.url, srv.client_key, clients, 1.0))  # warm-up
            done, lat = asyncio.run(submit_load(srv.url, srv.client_key, clients, seconds))
        finally:
            srv.stop()
        print(f"  fsync={policy:7} {done / seconds:8.0f} submits/s   "
              f"p50 {pct(lat, 50) * 1000:6.1f} ms   p99 {pct(lat, 99) * 1000:6.1f} ms")


# ---------------------------------------------------------------- replay

def write_synthetic_journal(path: Path, n_records: int, with_lifecycle: bool = True) -> int:
    """A realistic journal: one agent, then tasks that are submitted, assigned, progressed
    and completed (4 records each), or only submitted. Returns the number of tasks."""
    ids = UlidFactory()
    now = time.time() - 3600
    owner = owner_of("ck-bench")
    agent_uid = ids.new(now)
    seq = 0
    chunks: list[bytes] = []

    def emit(record: dict) -> None:
        nonlocal seq
        seq += 1
        chunks.append(encode_record({"seq": seq, **record}))

    emit({"op": "agent.registered", "at": iso(now), "agent": {
        "uid": agent_uid, "key": secrets.token_urlsafe(24), "registeredAt": now,
        "capabilities": [CAP], "tier": 0, "capacity": 10**9, "systemInfo": {"os": "linux"}}})
    tasks = 0
    with open(path, "wb") as f:
        while seq < n_records:
            now += 0.001
            task_id = ids.new(now)
            at = iso(now)
            tasks += 1
            emit({"op": "task.submitted", "at": at, "task": {
                "cap": CAP, "id": task_id, "owner": owner, "createdAt": now,
                "data": {"capability": CAP, "urgent": False, "restartable": False,
                         "payload": {"text": "x" * 100, "n": tasks}, "fetchFiles": [], "artifacts": []}}})
            if with_lifecycle and seq + 3 <= n_records:
                emit({"op": "task.assigned", "at": at, "cap": CAP, "id": task_id, "agentId": agent_uid})
                emit({"op": "task.progressed", "at": at, "cap": CAP, "id": task_id,
                      "stage": "run", "log": "working\n"})
                emit({"op": "task.completed", "at": at, "cap": CAP, "id": task_id,
                      "result": {"echo": tasks}})
            if len(chunks) >= 10_000:
                f.write(b"".join(chunks))
                chunks.clear()
        f.write(b"".join(chunks))
    return tasks


def time_replay(folder: Path) -> tuple[int, float, float]:
    """Recover folder's journal into a fresh Broker: (records replayed, seconds, CPU
    seconds - which leave out the time spent waiting for a CPU on a busy machine)."""
    broker = Broker(("ck-bench",), time.time())
    journal = Journal(folder, "always")
    started, cpu_started = time.perf_counter(), time.process_time()
    gc.disable()  # as main() does around recovery
    try:
        replayed = journal.recover(broker)
    finally:
        gc.freeze()
        gc.enable()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    os.close(journal.fd)
    return replayed, elapsed, cpu


def bench_replay(tmp: Path, n_records: int) -> None:
    print(f"== replay of a {n_records:,}-record journal")
    folder = tmp / "replay"
    folder.mkdir()
    started = time.perf_counter()
    tasks = write_synthetic_journal(folder / "journal.jsonl", n_records)
    written = time.perf_counter() - started
    size = (folder / "journal.jsonl").stat().st_size
    print(f"  generated {tasks:,} tasks, {size / 2**20:.0f} MiB in {written:.1f} s")
    replayed, elapsed, cpu = time_replay(folder)
    assert replayed == n_records, replayed  # a sanity check of the generator, not of speed
    print(f"  replayed {replayed:,} records in {elapsed:.2f} s = {replayed / elapsed:,.0f} records/s "
          f"({size / 2**20 / elapsed:.0f} MiB/s; {replayed / cpu:,.0f} records per CPU second)")


# ---------------------------------------------------------------- latency during compaction

async def watch_compactions(url: str, stop: asyncio.Event, seen: list) -> None:
    """Record (compaction start stamp, wall time it was seen finished) from /stats."""
    last = "unset"
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.get(url + "/stats") as resp:
                stamp = (await resp.json())["journal"]["lastCompactionAt"]
            if last != "unset" and stamp != last:
                seen.append((stamp, time.time()))
            last = stamp
            await asyncio.sleep(0.02)


async def compaction_latency(srv: Server, clients: int, seconds: float) -> tuple[list, list]:
    samples: list = []
    seen: list = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_compactions(srv.url, stop, seen))
    await submit_load(srv.url, srv.client_key, clients, seconds, samples)
    stop.set()
    await watcher
    return samples, seen


def bench_compaction(tmp: Path, tasks: int, clients: int, seconds: float) -> None:
    print(f"== submit latency while compacting a state of {tasks:,} tasks ({clients} clients)")
    data = tmp / "compaction" / "data"
    data.mkdir(parents=True)
    n = write_synthetic_journal(data / "journal.jsonl", tasks, with_lifecycle=False)
    size_mb = (data / "journal.jsonl").stat().st_size / 2**20
    # Compaction starts once the load has added ~0.25 MiB to the journal (a second or so).
    srv = Server(data, {"OFFLOADMQ_COMPACT_MB": f"{size_mb + 0.25:.3f}"})
    started = time.perf_counter()
    srv.start()
    print(f"  server recovered {n:,} tasks ({size_mb:.0f} MiB journal) in "
          f"{time.perf_counter() - started:.1f} s")
    try:
        samples, seen = asyncio.run(compaction_latency(srv, clients, max(seconds, 8.0)))
    finally:
        srv.stop()
    log_lines = [line for line in srv.log_path.read_text().splitlines() if "compacted" in line]
    if not seen:
        print("  no compaction observed; raise --seconds")
        return
    # Wall-clock times of the samples: perf_counter offsets mapped onto time.time().
    offset = time.time() - time.perf_counter()
    windows = [(parse_iso(stamp), end) for stamp, end in seen]
    during, outside = [], []
    for start, latency in samples:
        s, e = start + offset, start + offset + latency
        (during if any(s <= we and e >= ws for ws, we in windows) else outside).append(latency)
    for ws, we in windows:
        print(f"  compaction ran ~{(we - ws) * 1000:.0f} ms (from /stats)")
    for line in log_lines:
        print("  server:", line.split(" ", 3)[-1])
    print(f"  during compaction: {len(during):6} submits  p50 {pct(during, 50) * 1000:7.1f} ms  "
          f"p99 {pct(during, 99) * 1000:7.1f} ms  max {max(during, default=0) * 1000:7.1f} ms")
    print(f"  otherwise:         {len(outside):6} submits  p50 {pct(outside, 50) * 1000:7.1f} ms  "
          f"p99 {pct(outside, 99) * 1000:7.1f} ms  max {max(outside, default=0) * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--compaction-tasks", type=int, default=200_000)
    parser.add_argument("--phases", default="fsync,replay,compaction")
    args = parser.parse_args()
    phases = args.phases.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="offloadmq-bench-"))
    try:
        print(f"OffloadMQ journal benchmark, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
              f"data in {tmp}")
        if "fsync" in phases:
            bench_fsync(tmp, args.clients, args.seconds)
        if "replay" in phases:
            bench_replay(tmp, args.records)
        if "compaction" in phases:
            bench_compaction(tmp, args.compaction_tasks, args.clients, args.seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
