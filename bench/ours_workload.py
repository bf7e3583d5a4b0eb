"""OffloadMQ client side of W1/W2 (run as its own process by run.py), written as a user
would with the library: `offloadmq.Client`, nothing hand-tuned.

    python -m bench.ours_workload w1 --url URL --key KEY --n 5000 [--in-flight 8] [--collect poll]
    python -m bench.ours_workload w2 --url URL --key KEY --n 1000 --mode blocking|poll
Prints one JSON line. W1: `Client.map` (the client's one event stream is opened, every
task submitted, one request each, then the outputs collected from the stream's `end`
events); `--in-flight N` keeps N submits in flight; `--collect poll` submits, then waits
for each handle's `result()` in turn (a long poll per task, no stream). W2: sequential
`submit_blocking` or `submit(...).result()` round trips."""
from __future__ import annotations

import argparse
import time

from bench.common import emit, round_trips
from offloadmq import Client

CAP = "debug.echo"


def w1(mq: Client, n: int, in_flight: int, collect: str) -> dict:
    payloads = [{"n": i} for i in range(n)]
    started = time.perf_counter()
    if collect == "poll":
        handles = [mq.submit(CAP, p) for p in payloads]
        outputs = [h.result(timeout=600) for h in handles]
    else:
        outputs = list(mq.map(CAP, payloads, in_flight=in_flight))
    ended = time.perf_counter()
    wrong = sum(out != p for out, p in zip(outputs, payloads))
    return {"tasks": n, "wall_s": ended - started, "tasks_per_s": n / (ended - started),
            "wrong": wrong, "collect": collect, "in_flight": in_flight}


def w2(mq: Client, n: int, mode: str, warmup: int) -> dict:
    if mode == "blocking":
        return round_trips(lambda payload: mq.submit_blocking(CAP, payload), n, warmup)
    return round_trips(lambda payload: mq.submit(CAP, payload).result(timeout=60), n, warmup)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("w1", "w2"))
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--mode", choices=("blocking", "poll"), default="blocking")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--in-flight", type=int, default=1, help="w1: submits in flight")
    p.add_argument("--collect", choices=("events", "poll"), default="events",
                   help="w1: outputs from the event stream (map), or result() per task")
    args = p.parse_args()
    with Client(args.url, args.key) as mq:
        if args.what == "w1":
            mq.submit(CAP, {"n": -1}).result(timeout=60)  # connection and agent warm
            emit(w1(mq, args.n, args.in_flight, args.collect))
        else:
            emit(w2(mq, args.n, args.mode, args.warmup))


if __name__ == "__main__":
    main()
