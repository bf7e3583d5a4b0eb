"""Starting the peers for the benchmark: redis-server (Debian's, on a free port in a temp
folder, append-only with fsync always like our journal), Huey consumers and a Celery
worker. Each start returns Procs that run.py stops by pid."""
from __future__ import annotations

import shutil
from pathlib import Path

from bench.common import HOST, PY, Proc, free_port, port_open, run_json, wait_for


def start_redis(tmp: Path, name: str = "redis", fsync: str = "always") -> tuple[Proc, int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found (apt-get install -y redis-server)")
    port = free_port()
    folder = tmp / f"{name}-data"
    folder.mkdir(parents=True, exist_ok=True)
    proc = Proc(name, [exe, "--bind", HOST, "--port", str(port), "--dir", str(folder),
                       "--save", "", "--appendonly", "yes", "--appendfsync", fsync,
                       "--daemonize", "no", "--protected-mode", "yes"], tmp)
    wait_for(lambda: port_open(port), 20, "redis-server", proc)
    return proc, port


def start_huey(tmp: Path, kind: str, redis_port: int | None = None) -> tuple[Proc, dict]:
    env = {"BENCH_HUEY": kind, "BENCH_HUEY_DB": str(tmp / "huey.db"),
           "BENCH_REDIS_PORT": str(redis_port or 0)}
    # One worker thread; idle polling starts at 1 ms and backs off to 5 ms at most (the
    # defaults, 0.1 s up to 10 s, would make W2 meaningless for SQLite).
    proc = Proc(f"huey-{kind}", [PY, "-m", "huey.bin.huey_consumer", "bench.peer_huey.huey",
                                 "-w", "1", "-k", "thread", "-d", "0.001", "-m", "0.005",
                                 "-b", "1.1"], tmp, env=env)
    return proc, env


def start_celery(tmp: Path, redis_port: int) -> tuple[Proc, dict]:
    env = {"BENCH_REDIS_PORT": str(redis_port)}
    proc = Proc("celery", [PY, "-m", "celery", "-A", "bench.peer_celery", "worker", "-P", "solo",
                           "-c", "1", "--without-heartbeat", "--without-gossip",
                           "--without-mingle", "-l", "WARNING"], tmp, env=env)
    return proc, env


def client(module: str, env: dict, *args: str, timeout_s: float = 900) -> dict:
    return run_json([PY, "-m", module, *args], timeout_s, env)
