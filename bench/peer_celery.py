"""Celery peer: Redis broker and Redis result backend (results arrive by pub/sub).

The worker runs `-P solo -c 1` (one task at a time, like our capacity-1 agent) with
heartbeat, gossip and mingle off, the usual settings for a single-worker benchmark.

    python -m bench.peer_celery w1 --n 5000 | w1c --n 5000 --concurrency 32 | w2 --n 1000
"""
from __future__ import annotations

import os
import time

from celery import Celery

from bench.common import peer_main, round_trips

REDIS = f"redis://127.0.0.1:{os.environ.get('BENCH_REDIS_PORT', '6379')}"
app = Celery("bench", broker=REDIS + "/0", backend=REDIS + "/1")
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                result_expires=3600)


@app.task(name="bench.echo")
def echo(payload):
    return payload


def w1(n: int) -> dict:
    echo.delay({"n": -1}).get(timeout=60)  # connections and worker warm
    started = time.perf_counter()
    results = [echo.delay({"n": i}) for i in range(n)]
    submitted = time.perf_counter()
    wrong = sum(r.get(timeout=60) != {"n": i} for i, r in enumerate(results))
    ended = time.perf_counter()
    return {"tasks": n, "wall_s": ended - started, "submit_s": submitted - started,
            "tasks_per_s": n / (ended - started), "wrong": wrong}


def w1c(n: int, concurrency: int) -> dict:
    """W1 with 32 threads (ThreadPoolExecutor) calling .delay(), then 32 threads
    collecting .get() (results by pub/sub on the Redis backend)."""
    from concurrent.futures import ThreadPoolExecutor
    echo.delay({"n": -1}).get(timeout=60)  # warm
    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        results = list(pool.map(lambda i: echo.delay({"n": i}), range(n)))
        submitted = time.perf_counter()
        outs = list(pool.map(lambda r: r.get(timeout=60), results))
        ended = time.perf_counter()
    wrong = sum(out != {"n": i} for i, out in enumerate(outs))
    return {"tasks": n, "wall_s": ended - started, "submit_s": submitted - started,
            "tasks_per_s": n / (ended - started), "wrong": wrong, "concurrency": concurrency}


def w2(n: int, warmup: int) -> dict:
    return round_trips(lambda payload: echo.delay(payload).get(timeout=60), n, warmup)


def main() -> None:
    # Run as __main__, this file would register its task under another module name than
    # the worker's import of it: use the imported module's task.
    import bench.peer_celery as mod
    peer_main(mod)


if __name__ == "__main__":
    main()
