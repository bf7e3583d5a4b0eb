"""Huey peer: the task module its consumer imports, and the client side of W1/W2.

Configured from the environment so the consumer process builds the same instance:
BENCH_HUEY=sqlite (BENCH_HUEY_DB=path) or BENCH_HUEY=redis (BENCH_REDIS_PORT=port).
SQLite: fsync=True (synchronous=FULL, WAL), the durability of our fsync `always`.
Redis: blocking BRPOP dequeue and notify_result=True (BLPOP result notification), the
lowest-latency setup huey offers.

    python -m bench.peer_huey w1 --n 5000 | w1c --n 5000 --concurrency 32 | w2 --n 1000
"""
from __future__ import annotations

import os
import time

from huey import RedisHuey, SqliteHuey

from bench.common import peer_main, round_trips

KIND = os.environ.get("BENCH_HUEY", "sqlite")
if KIND == "redis":
    huey = RedisHuey("bench", host="127.0.0.1", port=int(os.environ.get("BENCH_REDIS_PORT", "6379")),
                     blocking=True, notify_result=True)
else:
    huey = SqliteHuey("bench", filename=os.environ.get("BENCH_HUEY_DB", "huey.db"), fsync=True)

# Result polling for SQLite (no notification exists): poll every 1 ms instead of the
# default 50 ms..1 s backoff, the best latency that storage can give.
GET = {"blocking": True, "timeout": 60, "backoff": 1.0, "max_delay": 0.001}


@huey.task()
def echo(payload):
    return payload


def w1(n: int) -> dict:
    echo({"n": -1}).get(**GET)  # connection and consumer warm
    started = time.perf_counter()
    results = [echo({"n": i}) for i in range(n)]
    submitted = time.perf_counter()
    wrong = sum(r.get(**GET) != {"n": i} for i, r in enumerate(results))
    ended = time.perf_counter()
    return {"tasks": n, "wall_s": ended - started, "submit_s": submitted - started,
            "tasks_per_s": n / (ended - started), "wrong": wrong}


def w1c(n: int, concurrency: int) -> dict:
    """W1 with 32 threads (ThreadPoolExecutor): each enqueues, then each waits on results.
    Huey has no bulk enqueue: `echo.map(items)` is a loop of single enqueues (and SqliteHuey
    serialises its one connection behind a lock), so threads are the way to overlap."""
    from concurrent.futures import ThreadPoolExecutor
    echo({"n": -1}).get(**GET)  # warm
    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        results = list(pool.map(lambda i: echo({"n": i}), range(n)))
        submitted = time.perf_counter()
        outs = list(pool.map(lambda r: r.get(**GET), results))
        ended = time.perf_counter()
    wrong = sum(out != {"n": i} for i, out in enumerate(outs))
    return {"tasks": n, "wall_s": ended - started, "submit_s": submitted - started,
            "tasks_per_s": n / (ended - started), "wrong": wrong, "concurrency": concurrency}


def w2(n: int, warmup: int) -> dict:
    return round_trips(lambda payload: echo(payload).get(**GET), n, warmup)


def main() -> None:
    # Run as __main__, this file would register its task under another module name than
    # the worker's import of it: use the imported module's task.
    import bench.peer_huey as mod
    peer_main(mod)


if __name__ == "__main__":
    main()
