"""Scale workloads against a running OffloadMQ server (run as its own process by run.py).

    python -m bench.scale idle  --url U --agent-key K --server-pid P --agents 1000 --duration 60
    python -m bench.scale claim --url U --agent-key K --client-key C --server-pid P \\
                                --fill 100000 --caps 1000 --iters 300

idle:  N simulated agents (registered and logged in over HTTP, one keep-alive connection
       each) long-poll /private/agent/task/poll?wait=20 in a loop like offload_agent.py
       --transport http, or (--transport ws) each hold the agent WebSocket and send a
       heartbeat frame every 8 s and a WebSocket ping after 5 s with nothing received, like
       offload_agent.py does by default; the server's CPU
       (utime+stime from /proc) and RSS are sampled over the duration.
claim: claim latency = agent poll?wait=0 + take, for one task submitted just before (not
       timed) and resolved just after (not timed). Measured on an empty queue, then again
       after filling the queue with `fill` regular tasks spread round-robin over `caps`
       capabilities. Two agents: one serving one capability, one serving all `caps`.
       The RSS growth over the fill gives the memory per queued task.
"""
from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson

from bench.common import cpu_seconds, emit, percentiles, rss_bytes
from offload_agent import WS_PING_S

SYSINFO = {"os": "linux", "client": "bench", "runtime": "python", "cpuArch": "x86_64",
           "totalMemoryMb": 1024, "gpu": None}


async def call(session, method: str, url: str, body=None, headers=None, expect=(200,),
               timeout_s: float = 60):
    data = orjson.dumps(body) if body is not None else None
    h = {"Content-Type": "application/json", **(headers or {})}
    async with session.request(method, url, data=data, headers=h,
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
        raw = await r.read()
        if r.status not in expect:
            raise RuntimeError(f"{method} {url}: {r.status} {raw[:200]!r}")
        return orjson.loads(raw) if raw else None


async def new_agent(session, url: str, agent_key: str, caps: list[str], capacity: int = 1) -> dict:
    reg = await call(session, "POST", url + "/agent/register",
                     {"capabilities": caps, "tier": 0, "capacity": capacity,
                      "systemInfo": SYSINFO, "apiKey": agent_key})
    auth = await call(session, "POST", url + "/agent/auth", {"agentId": reg["agentId"], "key": reg["key"]})
    return {"uid": reg["agentId"], "headers": {"Authorization": f"Bearer {auth['token']}"}}


async def gather_limited(factories, limit: int):
    sem = asyncio.Semaphore(limit)

    async def one(f):
        async with sem:
            return await f()
    return await asyncio.gather(*(one(f) for f in factories))


# ---------------------------------------------------------------- idle agents

async def idle(args) -> dict:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        agents = await gather_limited(
            [lambda: new_agent(session, args.url, args.agent_key, ["bench.idle"])] * args.agents, 32)
        register_s = time.perf_counter() - started
        stop = asyncio.Event()
        stats = {"polls": 0, "errors": 0, "tasks": 0}

        async def poller(agent):
            # One connection per agent, as each real agent process has its own.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as own:
                while not stop.is_set():
                    try:
                        task = await call(own, "GET", args.url + "/private/agent/task/poll?wait=20",
                                          headers=agent["headers"], timeout_s=40)
                        stats["polls"] += 1
                        stats["tasks"] += task is not None
                    except Exception:
                        stats["errors"] += 1
                        await asyncio.sleep(1)

        async def socket_agent(agent):
            # The agent WebSocket, as offload_agent.py holds it: pushes read, a heartbeat
            # frame with its (empty) holding report every --heartbeat seconds, pings.
            token = agent["headers"]["Authorization"].removeprefix("Bearer ")
            ws_url = args.url.replace("http", "ws", 1) + "/private/agent/ws?token=" + token
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as own:
                while not stop.is_set():
                    try:
                        async with own.ws_connect(ws_url, heartbeat=WS_PING_S) as ws:
                            beats = asyncio.create_task(heartbeats(ws))
                            try:
                                async for msg in ws:
                                    frame = orjson.loads(msg.data)
                                    stats["tasks"] += frame.get("type") == "task"
                                    stats["polls"] += frame.get("type") == "response"
                            finally:
                                beats.cancel()
                    except Exception:
                        stats["errors"] += 1
                        await asyncio.sleep(1)

        async def heartbeats(ws):
            n = 0
            while True:
                await asyncio.sleep(args.heartbeat)
                n += 1
                await ws.send_str(orjson.dumps({"req_id": n, "action": "heartbeat",
                                                "params": {"holding": []}}).decode())

        serve = socket_agent if args.transport == "ws" else poller
        pollers = [asyncio.create_task(serve(a)) for a in agents]
        await asyncio.sleep(args.settle)  # every poll in flight
        rss_before = rss_bytes(args.server_pid)
        cpu0, t0 = cpu_seconds(args.server_pid), time.perf_counter()
        rss_max = rss_before
        deadline = t0 + args.duration
        while time.perf_counter() < deadline:
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.perf_counter())))
            rss_max = max(rss_max, rss_bytes(args.server_pid))
        cpu1, t1 = cpu_seconds(args.server_pid), time.perf_counter()
        stop.set()
        for p in pollers:
            p.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
    return {"agents": args.agents, "transport": args.transport, "duration_s": t1 - t0, "cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
            "rss_mb": rss_max / 2**20, "rss_before_mb": rss_before / 2**20, "register_s": register_s,
            **stats}


# ---------------------------------------------------------------- claim latency

async def claim(args) -> dict:
    caps = [f"scale.c{i:04d}" for i in range(args.caps)]
    client = {"X-API-Key": args.client_key}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        one = await new_agent(session, args.url, args.agent_key, [caps[0]])
        every = await new_agent(session, args.url, args.agent_key, caps)

        async def submit(cap: str):
            return await call(session, "POST", args.url + "/api/task/submit",
                              {"capability": cap, "payload": {"n": 0}}, client, expect=(201,))

        async def measure(agent: dict, iters: int) -> dict:
            samples = []
            for i in range(-10, iters):
                await submit(caps[0])
                t0 = time.perf_counter()
                task = await call(session, "GET", args.url + "/private/agent/task/poll?wait=0",
                                  headers=agent["headers"])
                if task is None:
                    raise RuntimeError("claim: poll returned nothing with a task queued")
                tid = task["id"]
                await call(session, "POST", args.url + f"/private/agent/take/{tid['cap']}/{tid['id']}",
                           headers=agent["headers"])
                dt = time.perf_counter() - t0
                await call(session, "POST", args.url + f"/private/agent/task/resolve/{tid['cap']}/{tid['id']}",
                           {"id": tid, "capability": tid["cap"], "status": {"success": 0.0},
                            "output": None}, agent["headers"])
                if i >= 0:
                    samples.append(dt)
            return percentiles(samples)

        empty_one = await measure(one, args.iters)
        empty_every = await measure(every, args.iters)

        rss_before = rss_bytes(args.server_pid)
        started = time.perf_counter()
        await gather_limited([lambda c=caps[i % len(caps)]: submit(c) for i in range(args.fill)], 64)
        fill_s = time.perf_counter() - started
        await asyncio.sleep(1.5)  # let the allocator settle
        rss_after = rss_bytes(args.server_pid)

        full_one = await measure(one, args.iters)
        full_every = await measure(every, args.iters)
    return {"fill": args.fill, "caps": args.caps, "fill_s": fill_s, "fill_per_s": args.fill / fill_s,
            "rss_empty_mb": rss_before / 2**20, "rss_full_mb": rss_after / 2**20,
            "bytes_per_task": (rss_after - rss_before) / args.fill,
            "empty_one": empty_one, "full_one": full_one,
            "empty_every": empty_every, "full_every": full_every}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("idle", "claim"))
    p.add_argument("--url", required=True)
    p.add_argument("--agent-key", required=True)
    p.add_argument("--client-key")
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--settle", type=float, default=5)
    p.add_argument("--fill", type=int, default=100_000)
    p.add_argument("--caps", type=int, default=1000)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--transport", choices=("http", "ws"), default="http",
                   help="idle: long polls (http) or the agent WebSocket (ws)")
    p.add_argument("--heartbeat", type=float, default=8.0,
                   help="idle over ws: seconds between the agents' heartbeat frames")
    args = p.parse_args()
    emit(asyncio.run(idle(args) if args.what == "idle" else claim(args)))


if __name__ == "__main__":
    main()
