"""`make torture`: the whole queue under repeated kill -9, counted from the outside.

Several clients submit restartable durable tasks, each with its own Idempotency-Key, and
retry a submit until it is answered (a retry after a lost answer must name the same task).
Two real agents serve them. Meanwhile the server is killed with SIGKILL at random moments
and started again on the same port and data folder. When every client has its answers,
the queue is drained and counted:
  acknowledged  submits answered 200/201 (the client holds a task id for them)
  lost          acknowledged ids the server no longer knows
  duplicated    Idempotency-Keys that ended up with more than one task
  stuck         acknowledged tasks not ended within the drain time
  wrong         completed tasks whose result is not their payload
Exit status 0 only when lost, duplicated, stuck and wrong are all 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.common import HOST, PY, Proc, free_port, http_ok, wait_for  # noqa: E402

CAP = "debug.echo"


class Server:
    """offloadmq.py on one port and data folder across kills."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.env = {"AGENT_API_KEYS": "ak_" + secrets.token_urlsafe(16),
                    "CLIENT_API_KEYS": "ck_" + secrets.token_urlsafe(16),
                    "MGMT_TOKEN": "mt_" + secrets.token_urlsafe(16),
                    "JWT_SECRET": secrets.token_urlsafe(32)}
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(f"server{self.starts}", [PY, str(ROOT / "offloadmq.py"), "--host", HOST,
                                                   "--port", str(self.port), "--data",
                                                   str(self.tmp / "data")],
                         self.tmp, env=self.env, cwd=self.tmp)
        wait_for(lambda: http_ok(self.url + "/health"), 60, "the server", self.proc)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(10)
        self.proc.log.close()

    def listing(self) -> list[dict]:
        req = urllib.request.Request(self.url + "/management/tasks/list",
                                     headers={"X-Mgmt-Token": self.env["MGMT_TOKEN"]})
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        return [t for queue in body.values() if isinstance(queue, dict)
                for part in ("assigned", "unassigned") for t in queue.get(part, [])]


def start_agent(server: Server, n: int) -> Proc:
    config = server.tmp / f"agent{n}.json"
    register = Proc(f"agent{n}-register", [PY, str(ROOT / "offload_agent.py"), "register",
                                          "--server", server.url, "--key",
                                          server.env["AGENT_API_KEYS"], "--caps", CAP,
                                          "--capacity", "2", "--config", str(config)],
                    server.tmp, cwd=server.tmp)
    if register.popen.wait(60) != 0:
        raise RuntimeError(f"agent register failed:\n{register.tail()}")
    register.stop()
    return Proc(f"agent{n}", [PY, str(ROOT / "offload_agent.py"), "serve", "--config", str(config),
                              "--work-dir", str(server.tmp / f"work{n}")], server.tmp, cwd=server.tmp)


async def client(server: Server, name: str, count: int, acked: dict, stats: dict,
                 killing: asyncio.Task) -> None:
    """Submit tasks until at least `count` are answered and the kills are over; each is
    retried with its own key until it is answered."""
    headers = {"X-API-Key": server.env["CLIENT_API_KEYS"]}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        i = 0
        while i < count or not killing.done():
            i += 1
            key = f"{name}-{i}"
            body = {"capability": CAP, "restartable": True, "maxRetries": 20,
                    "payload": {"key": key}}
            while True:
                try:
                    async with session.post(server.url + "/api/task/submit", json=body,
                                            headers={"Idempotency-Key": key}) as resp:
                        answer = await resp.json(content_type=None)
                        if resp.status in (200, 201):
                            task_id = answer["id"]["id"]
                            if key in acked and acked[key] != task_id:
                                stats["answered_two_ids"] += 1
                            acked[key] = task_id
                            break
                        stats["refused"] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    stats["retries"] += 1
                await asyncio.sleep(0.05)


async def killer(server: Server, kills: int, low_s: float, high_s: float) -> None:
    for _ in range(kills):
        await asyncio.sleep(random.uniform(low_s, high_s))
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(random.uniform(0.0, 0.5))
        await asyncio.to_thread(server.start)


def count(server: Server, acked: dict, drain_s: float) -> dict:
    deadline = time.monotonic() + drain_s
    while True:
        tasks = server.listing()
        by_id = {t["id"]["id"]: t for t in tasks}
        unended = [k for k, i in acked.items()
                   if i in by_id and by_id[i]["status"] not in ("completed", "failed", "canceled")]
        if not unended or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    keys: dict[str, int] = {}
    wrong = 0
    for task in tasks:
        key = (task["data"].get("payload") or {}).get("key")
        keys[key] = keys.get(key, 0) + 1
        if task["status"] == "completed" and task.get("result") != task["data"]["payload"]:
            wrong += 1
    return {"lost": sum(1 for i in acked.values() if i not in by_id),
            "duplicated": sum(1 for k in acked if keys.get(k, 0) > 1),
            "stuck": len(unended),
            "failed": sum(1 for i in acked.values() if by_id.get(i, {}).get("status") == "failed"),
            "completed": sum(1 for i in acked.values() if by_id.get(i, {}).get("status") == "completed"),
            "wrong": wrong}


async def run(args: argparse.Namespace, tmp: Path) -> dict:
    server = Server(tmp)
    server.start()
    agents = [start_agent(server, n) for n in range(2)]
    acked: dict[str, str] = {}
    stats = {"retries": 0, "refused": 0, "answered_two_ids": 0}
    started = time.monotonic()
    kills = asyncio.create_task(killer(server, args.kills, args.kill_low, args.kill_high))
    await asyncio.gather(*(client(server, f"c{n}", args.tasks, acked, stats, kills)
                           for n in range(args.clients)))
    submit_s = time.monotonic() - started
    try:
        counts = count(server, acked, args.drain)
    finally:
        for agent in agents:
            agent.stop()
        server.proc.stop()
    return {"clients": args.clients, "acknowledged": len(acked), "kills": server.starts - 1,
            "submit_seconds": round(submit_s, 1), **stats, **counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=500, help="tasks per client at least; clients go on while the kills last")
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--kill-low", type=float, default=1.0, help="seconds between kills, at least")
    parser.add_argument("--kill-high", type=float, default=4.0, help="seconds between kills, at most")
    parser.add_argument("--drain", type=float, default=180.0, help="seconds allowed to drain")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="offloadmq-torture-"))
    result = asyncio.run(run(args, tmp))
    for name, value in result.items():
        print(f"{name:18} {value}")
    print(f"logs in {tmp}" if args.keep else "")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    bad = result["lost"] + result["duplicated"] + result["stuck"] + result["wrong"] + result["answered_two_ids"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
