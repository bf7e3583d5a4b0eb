"""OffloadMQ's server with timing instruments, for finding where W1's time goes without
touching offloadmq.py: the same app (create_app) plus an outer middleware timing every
route, and a wrapper timing each journal write+fdatasync and its batch size. At shutdown
it writes the figures to $BENCH_TRACE_OUT as JSON.

    BENCH_TRACE_OUT=trace.json python -m bench.trace_server --host 127.0.0.1 --port P --data D
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import offloadmq as m  # noqa: E402

route_times: dict[str, list[float]] = defaultdict(list)
write_times: list[float] = []
write_bytes: list[int] = []
write_records: list[int] = []


@web.middleware
async def timing(request: web.Request, handler):
    started = time.perf_counter()
    try:
        return await handler(request)
    finally:
        route = request.match_info.route.resource
        name = f"{request.method} {route.canonical if route is not None else request.path}"
        route_times[name].append(time.perf_counter() - started)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else 0.0


def summary() -> dict:
    routes = {name: {"n": len(xs), "p50_ms": pct(xs, 50), "p90_ms": pct(xs, 90),
                     "p99_ms": pct(xs, 99), "total_s": sum(xs)}
              for name, xs in route_times.items()}
    return {"routes": routes,
            "journal_writes": {"n": len(write_times), "p50_ms": pct(write_times, 50),
                               "p90_ms": pct(write_times, 90), "p99_ms": pct(write_times, 99),
                               "total_s": sum(write_times),
                               "records_per_write": (sum(write_records) / len(write_records))
                               if write_records else 0}}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    config = m.load_config(sys.argv[1:])
    hub = m.Hub(config)
    hub.recover()
    journal = hub.journal
    original_write = journal._write

    def timed_write(data: bytes) -> None:
        started = time.perf_counter()
        original_write(data)
        write_times.append(time.perf_counter() - started)
        write_bytes.append(len(data))
        write_records.append(data.count(b"\n"))
    journal._write = timed_write
    app = m.create_app(config, hub)
    app.middlewares.insert(0, timing)

    async def dump(app: web.Application) -> None:
        out = os.environ.get("BENCH_TRACE_OUT")
        if out:
            Path(out).write_text(json.dumps(summary(), indent=1))
    app.on_shutdown.append(dump)
    web.run_app(app, host=config.host, port=config.port, access_log=None, print=None,
                shutdown_timeout=3.0)


if __name__ == "__main__":
    main()
