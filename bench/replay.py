"""Replay speed of a large journal, in its own process so nothing else competes:
writes a synthetic journal with bench/bench_journal.py's generator (the real
`encode_record`; tasks submitted, assigned, progressed and completed), then times
`Journal.recover` into a fresh Broker.

    python -m bench.replay --records 1000000 --dir TMP
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.bench_journal import time_replay, write_synthetic_journal
from bench.common import emit, rss_bytes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--dir", required=True)
    args = p.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = write_synthetic_journal(folder / "journal.jsonl", args.records)
    written_s = time.perf_counter() - started
    size = (folder / "journal.jsonl").stat().st_size
    rss0 = rss_bytes(os.getpid())
    replayed, elapsed, cpu = time_replay(folder)
    emit({"records": replayed, "tasks": tasks, "bytes": size, "replay_s": elapsed,
          "records_per_s": replayed / elapsed, "replay_cpu_s": cpu,
          "records_per_cpu_s": replayed / cpu, "generate_s": written_s,
          "rss_growth_mb": (rss_bytes(os.getpid()) - rss0) / 2**20})
    (folder / "journal.jsonl").unlink()


if __name__ == "__main__":
    main()
