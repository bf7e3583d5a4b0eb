"""Failover on the PostgreSQL store (issue 13): two servers on one throwaway cluster, a
client submitting durable tasks without pause to whichever answers (the other URL on a
connection error or 503 not_leader), and `--kills` rounds of kill -9 of the leader,
which then restarts as a standby. Per kill: seconds from the kill to the first 2xx
from the new leader. At the end every task answered 201 must be on the last leader.

    python -m bench.failover --kills 10 --dir TMP
Prints one JSON line. (No agent: results and their duplicates are the agent's side.)
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import HOST, PY, ROOT, Proc, emit, free_port, wait_for

CAP = "debug.echo"


def call(url: str, key: str, body: dict | None = None, timeout: float = 2.0) -> tuple[int, dict | None]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"X-API-Key": key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, None


class Servers:
    def __init__(self, tmp: Path, url: str):
        self.tmp, self.store = tmp, url
        self.key = "ck_" + secrets.token_urlsafe(16)
        self.ports = [free_port(), free_port()]
        self.procs: list[Proc | None] = [None, None]
        self.starts = 0

    def url(self, i: int) -> str:
        return f"http://{HOST}:{self.ports[i]}"

    def start(self, i: int) -> None:
        self.starts += 1
        env = {"CLIENT_API_KEYS": self.key, "AGENT_API_KEYS": "ak_" + secrets.token_urlsafe(16)}
        self.procs[i] = Proc(f"server{i}-{self.starts}", [
            PY, str(ROOT / "offloadmq.py"), "--host", HOST, "--port", str(self.ports[i]),
            "--data", str(self.tmp / f"data{i}"), "--store", self.store], self.tmp, env=env)
        wait_for(lambda: urllib.request.urlopen(self.url(i) + "/health", timeout=1).status == 200,
                 30, f"server {i}", self.procs[i])

    def role(self, i: int) -> dict:
        try:
            with urllib.request.urlopen(self.url(i) + "/health/ready", timeout=2) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return json.loads(err.read())

    def leader(self) -> int:
        return wait_for(lambda: next((i + 1 for i in (0, 1) if self.role(i).get("ready")), None),
                        30, "a leader") - 1


def submitter(servers: Servers, acked: list, stop: threading.Event, first_2xx: dict) -> None:
    """Submit without pause; on a refusal or a dead connection, try the other server."""
    i, n = 0, 0
    while not stop.is_set():
        try:
            status, body = call(servers.url(i) + "/api/task/submit", servers.key,
                                {"capability": CAP, "payload": {"n": n}})
        except OSError:
            status, body = 0, None
        if status == 201:
            acked.append(body["id"]["id"])
            n += 1
            first_2xx.setdefault(i, time.monotonic())
        else:
            i = 1 - i
            time.sleep(0.005)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--dir", required=True)
    args = p.parse_args()
    tmp = Path(args.dir)
    tmp.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import PostgresCluster, postgres_bin  # the test suite's throwaway cluster
    cluster = PostgresCluster(postgres_bin()).start()
    servers = Servers(tmp, cluster.url())
    acked: list[str] = []
    stop = threading.Event()
    takeovers = []
    try:
        servers.start(0)
        servers.start(1)
        for _ in range(args.kills):
            leader = servers.leader()
            first_2xx: dict = {}
            thread = threading.Thread(target=submitter, args=(servers, acked, stop, first_2xx))
            thread.start()
            time.sleep(1.0)  # under load
            os.kill(servers.procs[leader].pid, signal.SIGKILL)
            killed = time.monotonic()
            first_2xx.pop(1 - leader, None)
            wait_for(lambda: first_2xx.get(1 - leader), 30, "the first 2xx from the new leader")
            takeovers.append(first_2xx[1 - leader] - killed)
            stop.set()
            thread.join()
            stop.clear()
            servers.procs[leader].stop()
            servers.start(leader)  # back, as a standby
        final = servers.leader()
        lost = [tid for tid in acked
                if call(f"{servers.url(final)}/api/task/poll/{CAP}/{tid}", servers.key, timeout=10)[0] != 200]
    finally:
        stop.set()
        for proc in servers.procs:
            if proc is not None:
                proc.stop()
        cluster.stop()
    emit({"kills": len(takeovers), "median_s": statistics.median(takeovers), "max_s": max(takeovers),
          "acked": len(acked), "lost": len(lost)})


if __name__ == "__main__":
    main()
