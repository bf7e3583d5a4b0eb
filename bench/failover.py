#!/usr/bin/env python3
"""Failover under load (issue 13): two servers on one throwaway PostgreSQL, a real agent
(capacity 4, on its WebSocket) and `offloadmq.Client` with both URLs submitting echo
tasks all along. `--kills` times: kill -9 the leader, time until an API route answers
2xx on the other server (kill -> serving), start the killed one again (a standby now).
With `--freeze` the leader is SIGSTOPped instead (its session stays open and silent, as
in a network cut): the standby must end that session and lead; the old leader is then
thawed, must exit by itself (code 70), and starts again.
At the end every acknowledged task is collected: lost = acknowledged tasks that never
completed with their own payload; duplicated = results delivered twice by the agent
plus tasks the server holds twice for one submit.

    .venv/bin/python bench/failover.py [--kills 10] [--freeze]   # one JSON line on stdout

The throwaway cluster and the server processes are the test suite's (tests/conftest.py:
initdb in a temp folder, free 127.0.0.1 ports, stopped by pid)."""
from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench.common import PY, emit, wait_for  # noqa: E402
from conftest import (PostgresCluster, ServerProcess, first_2xx_after, http,  # noqa: E402
                      postgres_bin, server_role as role)

from offloadmq import Client, WaitTimeout  # noqa: E402

TASKS_BETWEEN_KILLS = 40


def run(tmp: Path, kills: int, freeze: bool = False) -> dict:
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian's postgresql)")
    cluster = PostgresCluster(bin_dir).start()
    servers: list[ServerProcess] = []
    agent = None
    try:
        store = cluster.url(cluster.new_schema())
        for name in ("a", "b"):
            (tmp / name).mkdir(parents=True)
            srv = ServerProcess(tmp / name / "data", extra_args=("--store", store))
            if servers:
                first = servers[0]
                srv.agent_key, srv.client_key, srv.mgmt_token = first.agent_key, first.client_key, first.mgmt_token
            servers.append(srv.start())
            wait_for(lambda: role(srv) == ("standby" if name == "b" else "leader"), 60, f"server {name}")
        urls = ",".join(s.url for s in servers)
        agent_dir = tmp / "agent"
        agent_dir.mkdir()
        config = agent_dir / "agent.json"
        subprocess.run([PY, str(ROOT / "offload_agent.py"), "register", "--server", urls, "--key",
                        servers[0].agent_key, "--caps", "debug.echo", "--capacity", "4", "--config",
                        str(config)], check=True, capture_output=True, timeout=60)
        agent_log = open(agent_dir / "agent.log", "wb")
        agent = subprocess.Popen([PY, str(ROOT / "offload_agent.py"), "serve", "--config", str(config),
                                  "--work-dir", str(agent_dir / "work")],
                                 stdout=agent_log, stderr=subprocess.STDOUT, cwd=agent_dir)
        acked: list = []  # (n, handle) of each submit answered 2xx
        stop = threading.Event()
        errors: list[str] = []

        with Client(urls, servers[0].client_key) as mq:
            def submit_all_along() -> None:
                n = 0
                while not stop.is_set():
                    try:
                        acked.append((n, mq.submit("debug.echo", {"n": n})))
                    except Exception as err:  # counted: a submit the client gave up on
                        errors.append(f"{type(err).__name__}: {err}")
                    n += 1
                    time.sleep(0.005)
            submitter = threading.Thread(target=submit_all_along, daemon=True)
            submitter.start()
            times = []
            for _ in range(kills):
                target = len(acked) + TASKS_BETWEEN_KILLS
                wait_for(lambda: len(acked) >= target, 120, "submits between kills")
                leader = next(s for s in servers if role(s) == "leader")
                other = next(s for s in servers if s is not leader)
                killed_at = time.monotonic()
                if freeze:
                    os.kill(leader.proc.pid, signal.SIGSTOP)
                else:
                    leader.kill()  # SIGKILL
                times.append(first_2xx_after(killed_at, other, timeout=60))
                if freeze:
                    os.kill(leader.proc.pid, signal.SIGCONT)
                    if leader.proc.wait(timeout=30) != 70:
                        raise RuntimeError("the thawed leader did not stop by itself with code 70")
                leader.start()  # same port: a standby of the new leader
                wait_for(lambda: role(leader) == "standby", 60, "the killed server back as a standby")
            target = len(acked) + TASKS_BETWEEN_KILLS
            wait_for(lambda: len(acked) >= target, 120, "submits after the last kill")
            stop.set()
            submitter.join(60)
            outputs = {}
            try:
                for handle in mq.as_completed([h for _, h in acked], timeout=300):
                    with_error = handle.final.get("status") != "completed"
                    outputs[handle.id] = None if with_error else handle.result()
            except WaitTimeout:
                pass
        lost = sum(1 for n, h in acked if outputs.get(h.id) != {"n": n})
        leader = next(s for s in servers if role(s) == "leader")
        status, listing = http("GET", leader.url + "/management/tasks/list", headers=leader.mgmt, timeout=60)
        per_payload = collections.Counter(
            str(t["data"]["payload"]) for part in listing["regular"].values() for t in part)
        agent_log.flush()
        # One report of each task: a report whose answer a kill cut off is sent again
        # and finds its task ended (409), which says it was delivered.
        resolved = collections.Counter(re.findall(
            r"task debug\.echo/(\w+)(?: resolved| ended before its report was sent again|: result refused: 409)",
            (agent_dir / "agent.log").read_text(errors="replace")))
        return {"kills": kills, "how": "SIGSTOP" if freeze else "SIGKILL", "median_s": statistics.median(times), "max_s": max(times),
                "times_s": [round(t, 3) for t in times], "acked": len(acked), "lost": lost,
                "duplicated": sum(n - 1 for n in resolved.values() if n > 1)
                + sum(n - 1 for n in per_payload.values() if n > 1),
                "submit_errors": len(errors)}
    finally:
        if agent is not None:
            agent.kill()
            agent.wait(10)
        for srv in servers:
            srv.kill()
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--freeze", action="store_true", help="SIGSTOP the leader instead of kill -9")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="offloadmq-failover-") as tmp:
        emit(run(Path(tmp), args.kills, args.freeze))


if __name__ == "__main__":
    main()
