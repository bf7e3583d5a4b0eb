"""Shared plumbing for the benchmark: free ports, child processes stopped by pid,
readiness waits, percentiles and /proc sampling. Everything binds to 127.0.0.1."""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Proc:
    """A child process with its output in a log file; stop() ends it by its own pid."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, cwd=cwd or ROOT,
                                      stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 8.0) -> None:
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        self.log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for(check, timeout_s: float, what: str, proc: Proc | None = None, every_s: float = 0.05):
    """Poll `check()` until truthy; bounded by `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        try:
            value = check()
            if value:
                return value
        except Exception:
            pass
        time.sleep(every_s)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}"
                       + (f":\n{proc.tail()}" if proc else ""))


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def run_json(argv: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Run a client subprocess whose last stdout line is a JSON object."""
    done = subprocess.run(argv, capture_output=True, timeout=timeout_s, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(argv[:4])}… failed (rc {done.returncode}):\n"
                           f"{done.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(lines[-1])


def percentiles(samples_s: list[float]) -> dict:
    """p50/p90/p99 in ms (nearest rank)."""
    xs = sorted(samples_s)
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "n": 0}

    def rank(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))] * 1000
    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "n": len(xs),
            "mean": sum(xs) / len(xs) * 1000}


def round_trips(echo, n: int, warmup: int) -> dict:
    """W2: `echo(payload)` answers the payload back, one at a time; latency percentiles
    of the `n` after `warmup`, and how many answers were wrong."""
    samples, wrong = [], 0
    for i in range(-warmup, n):
        t0 = time.perf_counter()
        out = echo({"n": i})
        dt = time.perf_counter() - t0
        if i >= 0:
            samples.append(dt)
            wrong += out != {"n": i}
    return {**percentiles(samples), "wrong": wrong}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def emit(result: dict) -> None:
    """Client subprocesses report with one JSON line on stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def peer_main(module) -> None:
    """Command line of a peer's client side: `w1`, `w1c` or `w2`, one JSON line out."""
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("w1", "w1c", "w2"))
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=32, help="w1c: threads")
    args = p.parse_args()
    if args.what == "w1c":
        emit(module.w1c(args.n, args.concurrency))
    else:
        emit(module.w1(args.n) if args.what == "w1" else module.w2(args.n, args.warmup))
