"""OffloadMQ client side of W1/W2 (run as its own process by run.py).

    python -m bench.ours_client w1 --url URL --key KEY --n 5000
    python -m bench.ours_client w2 --url URL --key KEY --n 1000 --mode blocking|poll
    python -m bench.ours_client w1c --url URL --key KEY --n 5000 --concurrency 32
Prints one JSON line. Plain aiohttp + orjson, as a user's client would be written: W1 and
W2 over one keep-alive connection, strictly sequential (W1 collects the results from the
event stream on a second connection, or with --collect poll by poll?wait= per task); W1c (not an issue-6 workload, an
"info" variant) the same 5,000 tasks with a pool of 32 connections and a semaphore keeping
32 requests in flight, first for the submits, then for the poll?wait= collection."""
from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson

from bench.common import emit, percentiles

CAP = "debug.echo"


class Client:
    def __init__(self, session: aiohttp.ClientSession, url: str, key: str):
        self.session, self.url = session, url
        self.headers = {"X-API-Key": key, "Content-Type": "application/json"}

    async def post(self, path: str, body: dict | None = None, expect: tuple = (200,)) -> dict:
        data = orjson.dumps(body) if body is not None else b"{}"
        async with self.session.post(self.url + path, data=data, headers=self.headers) as r:
            raw = await r.read()
            if r.status not in expect:
                raise RuntimeError(f"{path}: {r.status} {raw[:300]!r}")
            return orjson.loads(raw)

    async def submit(self, payload, urgent: bool = False) -> dict:
        body = {"capability": CAP, "payload": payload}
        if urgent:
            body["urgent"] = True
        return (await self.post("/api/task/submit", body, (201, 202)))["id"]

    async def wait_result(self, task_id: dict, wait_s: int = 60):
        # The capability is percent-encoded in the path; debug.echo needs no escaping.
        path = f"/api/task/poll/{task_id['cap']}/{task_id['id']}?wait={wait_s}"
        for _ in range(10):  # bounded: each round holds up to wait_s
            status = await self.post(path)
            if status["status"] in ("completed", "failed", "canceled"):
                if status["status"] != "completed":
                    raise RuntimeError(f"task {task_id['id']} {status['status']}: {status}")
                return status.get("output")
        raise RuntimeError(f"task {task_id['id']} did not end")

    async def submit_blocking(self, payload):
        task = await self.post("/api/task/submit_blocking",
                               {"capability": CAP, "payload": payload, "urgent": True})
        if task["status"] != "completed":
            raise RuntimeError(f"blocking task ended {task['status']}")
        return task["result"]


async def w1(client: Client, n: int, collect: str) -> dict:
    """All submits, one request each, then all results: `collect` "events" reads them
    from the key's event stream (GET /api/task/events, opened before the first submit:
    the `end` event carries the result), "poll" asks poll?wait= for each task in turn."""
    stream = ends = None
    if collect == "events":
        stream = await client.session.get(client.url + "/api/task/events", headers=client.headers,
                                          timeout=aiohttp.ClientTimeout(total=None))
        await stream.content.readline()  # ": connected": the stream is live
        ends = asyncio.ensure_future(read_ends(stream, n))
    started = time.perf_counter()
    ids = [await client.submit({"n": i}) for i in range(n)]
    submitted = time.perf_counter()
    if ends is not None:
        outputs = await asyncio.wait_for(ends, 600)
        stream.close()
        wrong = sum(outputs.get(t["id"]) != {"n": i} for i, t in enumerate(ids))
    else:
        wrong = 0
        for i, task_id in enumerate(ids):
            if await client.wait_result(task_id) != {"n": i}:
                wrong += 1
    ended = time.perf_counter()
    return {"tasks": n, "wall_s": ended - started, "submit_s": submitted - started,
            "tasks_per_s": n / (ended - started), "wrong": wrong, "collect": collect}


async def read_ends(stream: aiohttp.ClientResponse, n: int) -> dict:
    """Task id -> result from the first n `end` events of an SSE stream (read in chunks:
    the server writes events that come close together at once)."""
    outputs, pending = {}, b""
    async for chunk in stream.content.iter_any():
        *events, pending = (pending + chunk).split(b"\n\n")
        for event in events:
            if b"\nevent: end\n" not in event:
                continue
            task = orjson.loads(event[event.index(b"\ndata: ") + 7:])
            if task["status"] != "completed":
                raise RuntimeError(f"task {task['id']} ended {task['status']}")
            outputs[task["id"]["id"]] = task["result"]
        if len(outputs) >= n:
            break
    return outputs


async def w1c(client: Client, n: int, concurrency: int) -> dict:
    """W1 with `concurrency` requests in flight (asyncio.Semaphore over a pool of as many
    keep-alive connections): all submits, then all results."""
    gate = asyncio.Semaphore(concurrency)

    async def submit(i: int):
        async with gate:
            return await client.submit({"n": i})

    async def collect(i: int, task_id: dict) -> bool:
        async with gate:
            return await client.wait_result(task_id) == {"n": i}

    started = time.perf_counter()
    ids = await asyncio.gather(*(submit(i) for i in range(n)))
    submitted = time.perf_counter()
    ok = await asyncio.gather(*(collect(i, t) for i, t in enumerate(ids)))
    ended = time.perf_counter()
    return {"tasks": n, "wall_s": ended - started, "submit_s": submitted - started,
            "tasks_per_s": n / (ended - started), "wrong": n - sum(ok), "concurrency": concurrency}


async def w2(client: Client, n: int, mode: str, warmup: int) -> dict:
    samples, wrong = [], 0
    for i in range(-warmup, n):
        t0 = time.perf_counter()
        if mode == "blocking":
            out = await client.submit_blocking({"n": i})
        else:
            out = await client.wait_result(await client.submit({"n": i}))
        dt = time.perf_counter() - t0
        if i >= 0:
            samples.append(dt)
            wrong += out != {"n": i}
    return {**percentiles(samples), "wrong": wrong}


async def main_async(args) -> dict:
    # W1 collecting from the event stream holds that stream on a second connection.
    limit = args.concurrency if args.what == "w1c" else 2 if args.collect == "events" else 1
    connector = aiohttp.TCPConnector(limit=limit)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = Client(session, args.url, args.key)
        if args.what == "w1":
            await client.wait_result(await client.submit({"n": -1}))  # connection warm
            return await w1(client, args.n, args.collect)
        if args.what == "w1c":
            await client.wait_result(await client.submit({"n": -1}))  # connection warm
            return await w1c(client, args.n, args.concurrency)
        return await w2(client, args.n, args.mode, args.warmup)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("w1", "w1c", "w2"))
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--mode", choices=("blocking", "poll"), default="blocking")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=32, help="w1c: requests in flight")
    p.add_argument("--collect", choices=("events", "poll"), default="events",
                   help="w1: results from the event stream, or poll?wait= per task")
    args = p.parse_args()
    emit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
