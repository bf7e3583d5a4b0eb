#!/usr/bin/env python3
"""OffloadMQ benchmark: issue 6's workloads for us and for the peers, in one run, one table.

    .venv/bin/python bench/run.py                 # the full run (about 8 minutes)
    .venv/bin/python bench/run.py --quick         # a smoke run (about 1 minute)
    .venv/bin/python bench/run.py --only ours,l0 --profile /tmp/prof --trace

--profile DIR  py-spy (raw collapsed stacks) of our server and agent during W1 and W1c, and of the
               server during the idle and claim sections; a summary is printed.
--trace        W2, W1 and W1c again on bench/trace_server.py: server time per route, journal
               fdatasync latency and records per write.

Workloads (definitions from the issue, kept exactly):
  W1     one client process submits 5,000 echo tasks {"n": i} one request each, then
         collects all results; wall time first submit -> last result. One agent process
         (the real offload_agent.py, capacity 1, serving debug.echo); regular durable
         tasks, fsync always. Ours runs through the library a user gets
         (`offloadmq.Client.map`, bench/ours_workload.py): it opens the client's event
         stream, submits, and collects each task's `end` event; an info row collects with
         `result()` per task (a long poll each) instead, another keeps 8 submits in flight.
  W2     agent idle and waiting; 1,000 sequential submit-and-wait round trips; p50/p90/p99.
         Ours twice, through the client: submit_blocking (urgent) and submit().result().
         W1 also runs with the agent's --original-protocol (poll, then take).
         "ours" runs the agent with --transport http (long polls); "ours-ws" runs W1 and
         W2 again with the agent on its default transport, the agent WebSocket (tasks
         pushed, reports as frames).
  ours-pg  (issue 13) W2 and W1 again with the server on the PostgreSQL store (--store), a
         throwaway cluster of Debian's postgresql at its default durability; the rows give
         the ratio to the embedded journal's figures of the same run (goal ≤ 1.5×).
  W1c    (not an issue workload; an "info" row) the same 5,000 tasks with the client keeping
         32 requests in flight, written as a user of each system would: ours
         `Client.map(in_flight=32)` (32 submits at a time, results from the stream); Huey and Celery 32 threads enqueuing / .delay(), then 32
         threads on .get() (Huey has no bulk enqueue: Task.map() loops single enqueues).
         Same worker (capacity 1) and durability as W1.
  L0     bare aiohttp + orjson POST echo app under wrk (keep-alive): the HTTP ceiling.
  Scale  1,000 idle long-polling agents (server CPU and RSS), the same over the agent
         WebSocket (idle-ws: a heartbeat frame every 8 s each), claim latency with 100,000
         queued tasks over 1,000 capabilities vs an empty queue, replay of a 1,000,000-
         record journal, memory per queued task.
  fanout  (issue 18) submit p50/p90 and server CPU per submit with no event stream open,
         then with --subscribers /management/events readers, in one run: target ≤ 2×.
  streams (issue 18) at --stream-pending pending tasks: first event of a stream's start,
         /health while 10 streams that never read start, server RSS held and after close.
  list    (issue 16) at --list-tasks tasks (90 % ended): the first page of tasks/list
         (limit 200), the unparameterized listing, /health during it, console first paint
         in bytes. The three build their state through the project's own broker and
         journal before the server starts (bench/streams.py).
  failover (issue 13) two servers on a throwaway PostgreSQL, an agent and a submitting
         client with both URLs; --kills times kill -9 the leader: median and max seconds
         to the first 2xx from the new leader, acknowledged tasks lost, duplicated results
         (bench/failover.py); then --kills/2 times SIGSTOP the leader (a silent session
         the standby must end itself).
The machine's speed drifts over minutes, so ours and the peers' W1/W1c/W2 run in turn for
--rounds rounds (default 2) and each system shows its best round.
Peers, same W1/W2: Huey + SQLite (no server), Huey + Redis, Celery + Redis, with Debian's
redis-server started here on 127.0.0.1 (free port, temp folder, appendfsync always to
match our fsync always) and stopped by pid. Everything binds to 127.0.0.1 on free ports,
in a temp folder removed at the end (--keep keeps it). Needs: pip install -e '.[bench]',
apt-get install redis-server wrk.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Child processes run `python -m bench.x`: they need the repository on their path too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from bench import peers, profile  # noqa: E402
from bench.common import PY, run_json  # noqa: E402
from bench.l0 import run_l0  # noqa: E402
from bench.ours import OursServer  # noqa: E402

SECTIONS = ("ours", "ours-pg", "ours-ws", "ours-original", "huey-sqlite", "huey-redis", "celery", "l0", "idle",
            "idle-ws", "claim", "replay", "fanout", "streams", "list", "failover")
COMPARED = ("ours", "ours-pg", "ours-ws", "ours-original", "huey-sqlite", "huey-redis", "celery")  # run in turn, best round kept
EXTRA_SECTIONS = ("trace",)  # only when asked for: W1 again on an instrumented server
PEERS = (("huey-sqlite", "Huey-SQLite"), ("huey-redis", "Huey-Redis"), ("celery", "Celery+Redis"))


def better(key: str, new, old) -> bool:
    """Of two rounds' results for one key, is `new` the better? W1 by tasks/s, W2 by p50."""
    if not (isinstance(new, dict) and isinstance(old, dict)):
        return False
    if "tasks_per_s" in new and "tasks_per_s" in old:
        return new["tasks_per_s"] > old["tasks_per_s"]
    if "p50" in new and "p50" in old:
        return new["p50"] < old["p50"]
    return False


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================ sections

def agent_knows(flag: str) -> bool:
    import subprocess
    helptext = subprocess.run([PY, str(ROOT / "offload_agent.py"), "serve", "--help"],
                              capture_output=True, text=True, timeout=60).stdout
    return flag in helptext


def run_ours(tmp: Path, args, results: dict) -> None:
    server = OursServer(tmp, fsync="always")
    spies = []
    try:
        # The HTTP transport here; the socket's figures are the ours-ws section's.
        http_args = ("--transport", "http") if agent_knows("--transport") else ()
        agent = server.start_agent("debug.echo", capacity=1, serve_args=http_args)
        log(f"ours: W2 submit_blocking x{args.w2}")
        results["ours_w2_blocking"] = server.client("w2", "--n", str(args.w2), "--mode", "blocking")
        log(f"ours: W2 submit + poll?wait x{args.w2}")
        results["ours_w2_poll"] = server.client("w2", "--n", str(args.w2), "--mode", "poll")
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            spies = [profile.start(server.proc.pid, args.profile / "w1-server.txt", "server", tmp),
                     profile.start(agent.pid, args.profile / "w1-agent.txt", "agent", tmp)]
            time.sleep(1.0)  # py-spy attached
        log(f"ours: W1 x{args.w1}")
        before = server.http_requests()
        results["ours_w1"] = server.client("w1", "--n", str(args.w1))
        # +1: the client's warm-up task; the requests the agent and client made for it
        # are in the count too, spread over the n + 1 tasks.
        results["ours_w1"]["http_requests"] = server.http_requests() - before
        results["ours_w1"]["req_per_task"] = results["ours_w1"]["http_requests"] / (args.w1 + 1)
        log(f"ours: W1 x{args.w1}, results by poll?wait= per task")
        results["ours_w1_poll"] = server.client("w1", "--n", str(args.w1), "--collect", "poll")
        log(f"ours: W1 x{args.w1}, 8 submits in flight")
        results["ours_w1_8"] = server.client("w1", "--n", str(args.w1), "--in-flight", "8")
    finally:
        for spy in spies:
            profile.stop(spy)
    spies = []
    try:
        if args.profile:
            spies = [profile.start(server.proc.pid, args.profile / "w1c-server.txt", "server-w1c", tmp),
                     profile.start(agent.pid, args.profile / "w1c-agent.txt", "agent-w1c", tmp)]
            time.sleep(1.0)
        log(f"ours: W1c x{args.w1}, {args.w1c_concurrency} requests in flight")
        before = server.http_requests()
        results["ours_w1c"] = server.client("w1", "--n", str(args.w1),
                                            "--in-flight", str(args.w1c_concurrency))
        results["ours_w1c"]["http_requests"] = server.http_requests() - before
        results["ours_w1c"]["req_per_task"] = results["ours_w1c"]["http_requests"] / (args.w1 + 1)
    finally:
        for spy in spies:
            profile.stop(spy)
        server.stop()


def run_ours_pg(tmp: Path, args, results: dict) -> None:
    """W2 and W1 as in `ours`, on the PostgreSQL store (--store) of a throwaway cluster
    started here (Debian's postgresql, default durability: fsync and synchronous_commit on)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import PostgresCluster, postgres_bin  # the test suite's throwaway cluster
    if postgres_bin() is None:
        log("ours-pg: PostgreSQL is not installed (apt-get install postgresql); skipped")
        return
    cluster = PostgresCluster(postgres_bin()).start()
    server = None
    try:
        server = OursServer(tmp, name="offloadmq-pg", extra_args=("--store", cluster.url()))
        http_args = ("--transport", "http") if agent_knows("--transport") else ()
        server.start_agent("debug.echo", capacity=1, serve_args=http_args)
        run_w2_w1(server, "ours-pg", args, results)
    finally:
        if server is not None:
            server.stop()
        cluster.stop()


def run_w2_w1(server, section: str, args, results: dict) -> None:
    """W2 (both modes) then W1 through our client, as `section`_w2_blocking/_w2_poll/_w1."""
    for mode in ("blocking", "poll"):
        log(f"{section}: W2 {mode} x{args.w2}")
        results[f"{section}_w2_{mode}"] = server.client("w2", "--n", str(args.w2), "--mode", mode)
    log(f"{section}: W1 x{args.w1}")
    results[f"{section}_w1"] = server.client("w1", "--n", str(args.w1))


def run_ours_ws(tmp: Path, args, results: dict) -> None:
    """W2 and W1 with the agent on the agent WebSocket: tasks pushed, reports as frames."""
    if not agent_knows("--transport"):
        log("ours-ws: the agent has no --transport; skipped")
        return
    server = OursServer(tmp, fsync="always", name="offloadmq-ws")
    try:
        server.start_agent("debug.echo", capacity=1, serve_args=("--transport", "ws"))
        run_w2_w1(server, "ours-ws", args, results)
    finally:
        server.stop()


def run_ours_original(tmp: Path, args, results: dict) -> None:
    """W1 again with the agent limited to the original two-step protocol (poll, then take),
    to show what the extensions buy. Skipped when the agent has no such switch."""
    import subprocess
    helptext = subprocess.run([PY, str(ROOT / "offload_agent.py"), "serve", "--help"],
                              capture_output=True, text=True, timeout=60).stdout
    if "--original-protocol" not in helptext:
        log("ours-original: the agent has no --original-protocol; skipped")
        return
    server = OursServer(tmp, fsync="always", name="offloadmq-original")
    try:
        server.start_agent("debug.echo", capacity=1, serve_args=("--original-protocol",))
        log(f"ours-original: W1 x{args.w1}, agent --original-protocol")
        results["ours-original_w1"] = server.client("w1", "--n", str(args.w1))
    finally:
        server.stop()


def run_peer(tmp: Path, args, results: dict, which: str) -> None:
    procs = []
    try:
        if which == "huey-sqlite":
            worker, env = peers.start_huey(tmp, "sqlite")
            module = "bench.peer_huey"
        else:
            redis, port = peers.start_redis(tmp, f"redis-{which}", args.redis_fsync)
            procs.append(redis)
            if which == "huey-redis":
                worker, env = peers.start_huey(tmp, "redis", port)
                module = "bench.peer_huey"
            else:
                worker, env = peers.start_celery(tmp, port)
                module = "bench.peer_celery"
        procs.append(worker)
        log(f"{which}: W2 x{args.w2}")
        results[f"{which}_w2"] = peers.client(module, env, "w2", "--n", str(args.w2))
        log(f"{which}: W1 x{args.w1}")
        results[f"{which}_w1"] = peers.client(module, env, "w1", "--n", str(args.w1))
        log(f"{which}: W1c x{args.w1}, {args.w1c_concurrency} threads")
        results[f"{which}_w1c"] = peers.client(module, env, "w1c", "--n", str(args.w1),
                                                "--concurrency", str(args.w1c_concurrency))
    finally:
        for proc in reversed(procs):
            proc.stop()


def run_idle(tmp: Path, args, results: dict, transport: str = "http") -> None:
    key = "idle" if transport == "http" else f"idle-{transport}"
    server = OursServer(tmp, name=f"offloadmq-{key}")
    spy = _spy(args, server.proc.pid, f"{key}-server", tmp)
    try:
        how = "long-polling" if transport == "http" else "on the agent WebSocket"
        log(f"{key}: {args.agents} agents {how} for {args.idle_duration:.0f} s")
        results[key] = run_json(
            [PY, "-m", "bench.scale", "idle", "--url", server.url, "--agent-key", server.agent_key,
             "--server-pid", str(server.proc.pid), "--agents", str(args.agents),
             "--duration", str(args.idle_duration), "--settle", str(args.settle),
             "--transport", transport],
            args.idle_duration + 600)
    finally:
        profile.stop(spy)
        server.stop()


def run_claim(tmp: Path, args, results: dict) -> None:
    server = OursServer(tmp, name="offloadmq-claim")
    spy = _spy(args, server.proc.pid, "claim-server", tmp)
    try:
        log(f"claim: empty queue, then {args.fill:,} queued over {args.caps} capabilities")
        results["claim"] = run_json(
            [PY, "-m", "bench.scale", "claim", "--url", server.url, "--agent-key", server.agent_key,
             "--client-key", server.client_key, "--server-pid", str(server.proc.pid),
             "--fill", str(args.fill), "--caps", str(args.caps), "--iters", str(args.claim_iters)],
            1800)
    finally:
        profile.stop(spy)
        server.stop()


def _spy(args, pid: int, name: str, tmp: Path):
    """With --profile, py-spy the process for the whole section."""
    if not args.profile:
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    return profile.start(pid, args.profile / f"{name}.txt", name, tmp)


def run_replay(tmp: Path, args, results: dict) -> None:
    log(f"replay: {args.records:,}-record journal")
    results["replay"] = run_json([PY, "-m", "bench.replay", "--records", str(args.records),
                                  "--dir", str(tmp / "replay")], 1800)


def run_failover(tmp: Path, args, results: dict) -> None:
    log(f"failover: {args.kills} kills of the leader of two servers on PostgreSQL")
    results["failover"] = run_json([PY, "-m", "bench.failover", "--kills", str(args.kills)], 1800)
    freezes = max(1, args.kills // 2)
    log(f"failover: {freezes} SIGSTOPs of the leader (a silent session)")
    results["failover_freeze"] = run_json([PY, "-m", "bench.failover", "--kills", str(freezes),
                                           "--freeze"], 1800)


def run_fanout(tmp: Path, args, results: dict) -> None:
    """Submit latency with no event stream open, then with --subscribers management
    streams, on one server in one run (issue 18: within 2x)."""
    server = OursServer(tmp, name="offloadmq-fanout",
                        extra_env={"OFFLOADMQ_STREAMS_PER_KEY": str(args.subscribers + 10)})
    try:
        log(f"fanout: {args.fanout_n} submits alone, then with {args.subscribers} subscribers")
        results["fanout"] = run_json(
            [PY, "-m", "bench.streams", "fanout", "--url", server.url, "--key", server.client_key,
             "--token", server.mgmt_token, "--pid", str(server.proc.pid),
             "--subscribers", str(args.subscribers), "--n", str(args.fanout_n)], 900)
    finally:
        server.stop()


def _prebuilt(tmp: Path, name: str, pending: int, ended: int = 0) -> tuple[str, Path]:
    import secrets
    from bench.streams import build_state
    key = "ck_" + secrets.token_urlsafe(16)
    build_state(tmp / f"{name}-data", key, pending, ended)
    return key, tmp / f"{name}-data"


def run_streams(tmp: Path, args, results: dict) -> None:
    """Event streams starting at a queue of --stream-pending pending tasks."""
    log(f"streams: building {args.stream_pending:,} pending tasks")
    key, _ = _prebuilt(tmp, "offloadmq-streams", args.stream_pending)
    server = OursServer(tmp, name="offloadmq-streams", client_key=key, fsync="no")
    try:
        log("streams: 10 streams that never read")
        results["streams"] = run_json(
            [PY, "-m", "bench.streams", "streams", "--url", server.url, "--key", key,
             "--pid", str(server.proc.pid), "--count", "10"], 600)
        results["streams"]["pending"] = args.stream_pending
    finally:
        server.stop()


def run_list(tmp: Path, args, results: dict) -> None:
    """/management/tasks/list and the console's Tasks page at --list-tasks tasks (90 % ended)."""
    ended = args.list_tasks * 9 // 10
    log(f"list: building {args.list_tasks:,} tasks ({ended:,} ended)")
    key, _ = _prebuilt(tmp, "offloadmq-list", args.list_tasks - ended, ended)
    server = OursServer(tmp, name="offloadmq-list", client_key=key, fsync="no")
    try:
        results["list"] = run_json(
            [PY, "-m", "bench.streams", "list", "--url", server.url, "--token", server.mgmt_token,
             "--pid", str(server.proc.pid), "--static", str(ROOT / "static")], 600)
    finally:
        server.stop()


def run_trace(tmp: Path, args, results: dict) -> None:
    """W2 (both modes), W1 and W1c on bench/trace_server.py, a fresh server each: where the
    server's time goes, per route and per journal write (the timers cost a little, so
    these are not the measured figures)."""
    n2 = str(min(args.w2, 300))
    results["trace"] = {}
    for label, client_args in (("W2 submit_blocking", ("w2", "--n", n2, "--mode", "blocking")),
                               ("W2 submit+poll?wait", ("w2", "--n", n2, "--mode", "poll")),
                               ("W1", ("w1", "--n", str(args.w1))),
                               (f"W1c ({args.w1c_concurrency} in flight)",
                                ("w1", "--n", str(args.w1), "--in-flight", str(args.w1c_concurrency)))):
        out = tmp / f"trace-{len(results['trace'])}.json"
        server = OursServer(tmp, name=f"offloadmq-trace{len(results['trace'])}", trace_out=out)
        try:
            server.start_agent("debug.echo", capacity=1)
            log(f"trace: {label} on the instrumented server")
            client = server.client(*client_args)
        finally:
            server.stop()
        results["trace"][label] = {"client": client,
                                   "server": json.loads(out.read_text()) if out.exists() else None}


def render_trace(traces: dict) -> str:
    lines = ["Where the time goes (instrumented server, bench/trace_server.py): server time per "
             "route, handler entry to response"]
    rows = [["workload / route", "n", "p50 ms", "p90 ms", "p99 ms", "total s"]]
    for label, t in traces.items():
        c, srv = t["client"], t["server"]
        head = (f"{c['tasks_per_s']:,.0f} tasks/s" if "tasks_per_s" in c
                else f"round trip p50 {c['p50']:.2f} ms, p90 {c['p90']:.2f} ms")
        rows.append([f"{label}: {head}", "", "", "", "", ""])
        if not srv:
            continue
        for name, r in sorted(srv["routes"].items(), key=lambda kv: -kv[1]["total_s"]):
            if r["n"] < 10:
                continue  # setup calls and the held cancel long-poll
            rows.append([f"  {name}", str(r["n"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                         f"{r['p99_ms']:.2f}", f"{r['total_s']:.2f}"])
        j = srv["journal_writes"]
        rows.append([f"  journal write+fdatasync ({j['records_per_write']:.2f} records/write)",
                     str(j["n"]), f"{j['p50_ms']:.2f}", f"{j['p90_ms']:.2f}", f"{j['p99_ms']:.2f}",
                     f"{j['total_s']:.2f}"])
    lines.append(render(rows))
    return "\n".join(lines)


def run_l0_section(tmp: Path, args, results: dict) -> None:
    log(f"L0: wrk -t2 -c64 -d{args.l0_duration}s")
    results["l0"] = run_l0(tmp, 2, 64, args.l0_duration)


# ============================================================================ table

def fmt(value, spec: str = ",.0f") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return format(value, spec)


def get(results: dict, key: str, *path):
    value = results.get(key)
    for p in path:
        if not isinstance(value, dict):
            return None
        value = value.get(p)
    return value


def build_table(results: dict, args) -> list[list[str]]:
    names = [label for _, label in PEERS]
    head = ["metric", "OffloadMQ", *names, "best peer", "ratio", "target", "met"]
    rows = [head]

    def verdict(ok):
        return "—" if ok is None else ("yes" if ok else "NO")

    def compare(label, ours, peer_vals, higher_better, spec, target_ratio, extra_ok=None):
        known = [v for v in peer_vals if v is not None]
        best = (max(known) if higher_better else min(known)) if known else None
        ratio = ours / best if ours is not None and best else None
        if ratio is None:
            ok = None
        else:
            ok = ratio >= target_ratio if higher_better else ratio <= target_ratio
        target = f"{'≥' if higher_better else '≤'}{target_ratio:.2f}×"
        rows.append([label, fmt(ours, spec), *[fmt(v, spec) for v in peer_vals], fmt(best, spec),
                     fmt(ratio, ".2f") + ("×" if ratio is not None else ""), target, verdict(ok)])

    def single(label, value, spec, target="", ok=None):
        rows.append([label, fmt(value, spec), *[""] * len(names), "", "", target, verdict(ok)])

    def peer_vals(suffix, *path):
        return [get(results, f"{key}_{suffix}", *path) for key, _ in PEERS]

    n1 = args.w1
    compare(f"W1 throughput, tasks/s ({n1:,}, durable)", get(results, "ours_w1", "tasks_per_s"),
            peer_vals("w1", "tasks_per_s"), True, ",.0f", 1.2)
    polled = get(results, "ours_w1_poll", "tasks_per_s")
    if polled is not None:
        compare("W1, ours collecting by poll?wait= per task", polled, peer_vals("w1", "tasks_per_s"),
                True, ",.0f", 1.2)
        rows[-1][-2:] = ["info", ""]
    eight = get(results, "ours_w1_8", "tasks_per_s")
    if eight is not None:
        compare("W1, ours with 8 submits in flight", eight, peer_vals("w1", "tasks_per_s"),
                True, ",.0f", 1.2)
        rows[-1][-2:] = ["info", ""]
    orig = get(results, "ours-original_w1", "tasks_per_s")
    if orig is not None:
        compare("W1 tasks/s, agent --original-protocol", orig, peer_vals("w1", "tasks_per_s"),
                True, ",.0f", 1.2)
    pg_w1 = get(results, "ours-pg_w1", "tasks_per_s")
    if pg_w1 is not None:  # (issue 13) the PostgreSQL store against the embedded journal
        ours_w1 = get(results, "ours_w1", "tasks_per_s")
        ratio = ours_w1 / pg_w1 if ours_w1 else None
        rows.append(["W1 tasks/s on PostgreSQL (--store), embedded / PostgreSQL", fmt(pg_w1, ",.0f"),
                     *[""] * len(names), "", fmt(ratio, ".2f") + "×" if ratio else "—", "≤1.50×",
                     verdict(None if ratio is None else ratio <= 1.5)])
        for mode, label in (("poll", "submit+poll?wait"), ("blocking", "submit_blocking (urgent)")):
            pg_p50, ours_p50 = get(results, f"ours-pg_w2_{mode}", "p50"), get(results, f"ours_w2_{mode}", "p50")
            ratio = pg_p50 / ours_p50 if pg_p50 and ours_p50 else None
            rows.append([f"W2 p50 ms, {label} on PostgreSQL / embedded", fmt(pg_p50, ".2f"),
                         *[""] * len(names), "", fmt(ratio, ".2f") + "×" if ratio else "—", "≤1.50×",
                         verdict(None if ratio is None else ratio <= 1.5)])
    ws_w1 = get(results, "ours-ws_w1", "tasks_per_s")
    if ws_w1 is not None:
        compare("W1 tasks/s, agent on the WebSocket (pushed)", ws_w1, peer_vals("w1", "tasks_per_s"),
                True, ",.0f", 1.2)
    compare("W1 wall time, s", get(results, "ours_w1", "wall_s"), peer_vals("w1", "wall_s"),
            False, ".2f", 1 / 1.2)
    rows[-1][-2:] = ["(same)", ""]
    c = args.w1c_concurrency
    compare(f"W1c: same {n1:,} tasks, client keeps {c} requests in flight, tasks/s",
            get(results, "ours_w1c", "tasks_per_s"), peer_vals("w1c", "tasks_per_s"), True,
            ",.0f", 1.2)
    rows[-1][-2:] = ["info", ""]
    compare("W1c wall time, s", get(results, "ours_w1c", "wall_s"), peer_vals("w1c", "wall_s"),
            False, ".2f", 1 / 1.2)
    rows[-1][-2:] = ["info", ""]
    for mode, label in (("blocking", "submit_blocking"), ("poll", "submit+poll?wait")):
        compare(f"W2 p50 ms, ours {label}", get(results, f"ours_w2_{mode}", "p50"),
                peer_vals("w2", "p50"), False, ".2f", 0.8)
    for mode, label in (("blocking", "submit_blocking"), ("poll", "submit+poll?wait")):
        ws_p50 = get(results, f"ours-ws_w2_{mode}", "p50")
        if ws_p50 is not None:
            compare(f"W2 p50 ms, ours {label}, agent on the WebSocket", ws_p50,
                    peer_vals("w2", "p50"), False, ".2f", 0.8)
    for mode, label in (("blocking", "submit_blocking"), ("poll", "submit+poll?wait")):
        for p in ("p90", "p99"):
            ours = get(results, f"ours_w2_{mode}", p)
            vals = peer_vals("w2", p)
            known = [v for v in vals if v is not None]
            best = min(known) if known else None
            ok = (ours < 3.0) if (p == "p99" and ours is not None) else None
            rows.append([f"W2 {p} ms, ours {label}", fmt(ours, ".2f"), *[fmt(v, ".2f") for v in vals],
                         fmt(best, ".2f"), fmt(ours / best, ".2f") + "×" if ours and best else "—",
                         "<3 ms" if p == "p99" else "", verdict(ok)])
    single("L0 ceiling, req/s (bare aiohttp+orjson, wrk)", get(results, "l0", "req_per_s"), ",.0f",
           "info")
    l0 = get(results, "l0", "req_per_s")
    w1 = get(results, "ours_w1", "tasks_per_s")
    per_task = get(results, "ours_w1", "req_per_task")
    if l0 and w1 and per_task:
        single(f"W1 HTTP requests/s as % of L0 ({per_task:.2f} req/task, from /metrics)",
               100 * w1 * per_task / l0, ".0f", "info")
    w1c = get(results, "ours_w1c", "tasks_per_s")
    per_task_c = get(results, "ours_w1c", "req_per_task")
    if l0 and w1c and per_task_c:
        single(f"W1c HTTP requests/s as % of L0 ({per_task_c:.2f} req/task, from /metrics)",
               100 * w1c * per_task_c / l0, ".0f", "info")
    cpu = get(results, "idle", "cpu_pct")
    single(f"{get(results, 'idle', 'agents') or args.agents:,} idle agents: server CPU % of a core "
           f"({args.idle_duration:.0f} s)", cpu, ".2f", "<5%", None if cpu is None else cpu < 5)
    rss = get(results, "idle", "rss_mb")
    single("idle agents: server RSS MB", rss, ".1f", "<100 MB", None if rss is None else rss < 100)
    if results.get("idle-ws"):
        cpu = get(results, "idle-ws", "cpu_pct")
        single(f"{get(results, 'idle-ws', 'agents'):,} idle WebSocket agents: server CPU % of a core",
               cpu, ".2f", "<5%", None if cpu is None else cpu < 5)
        rss = get(results, "idle-ws", "rss_mb")
        single("idle WebSocket agents: server RSS MB", rss, ".1f", "<100 MB",
               None if rss is None else rss < 100)
    claim = results.get("claim") or {}
    for who, label in (("one", "agent with 1 cap"), ("every", f"agent with {args.caps:,} caps")):
        e, f = get(claim, f"empty_{who}", "p50"), get(claim, f"full_{who}", "p50")
        single(f"claim p50 ms, empty queue, {label}", e, ".2f")
        ratio = f / e if e and f else None
        rows.append([f"claim p50 ms, {args.fill:,} queued, {label}", fmt(f, ".2f"), *[""] * len(names),
                     "", fmt(ratio, ".2f") + "× empty" if ratio else "—", "≤1.20×",
                     verdict(None if ratio is None else ratio <= 1.2)])
    single("queue fill, submits/s (64 concurrent)", claim.get("fill_per_s"), ",.0f", "info")
    single("memory per queued task, bytes (RSS growth)", claim.get("bytes_per_task"), ",.0f", "info")
    rps = get(results, "replay", "records_per_s")
    single(f"replay {get(results, 'replay', 'records') or args.records:,} records, records/s", rps,
           ",.0f", "≥200,000", None if rps is None else rps >= 200_000)
    single("replay time, s", get(results, "replay", "replay_s"), ".2f")
    fan = results.get("fanout") or {}
    if fan:
        subs = fan["subscribers"]
        single("submit p50 ms, no event stream open", get(fan, "none", "p50"), ".2f")
        ratio = fan.get("p50_ratio")
        rows.append([f"submit p50 ms, {subs} /management/events readers", fmt(get(fan, "with", "p50"), ".2f"),
                     *[""] * len(names), "", fmt(ratio, ".2f") + "× none" if ratio else "—", "≤2.00×",
                     verdict(None if ratio is None else ratio <= 2.0)])
        single("submit p90 ms: none / with readers",
               f"{get(fan, 'none', 'p90'):.2f} / {get(fan, 'with', 'p90'):.2f}", "")
        single("server CPU ms per submit: none / with readers",
               f"{get(fan, 'none', 'server_cpu_ms_per_submit'):.2f} / "
               f"{get(fan, 'with', 'server_cpu_ms_per_submit'):.2f}", "", "info")
    st = results.get("streams") or {}
    if st:
        single(f"stream start at {st['pending']:,} pending: first event, ms", st["first_event_ms"], ".1f")
        single(f"/health max ms while {st['streams']} never-reading streams start", st["health_max_ms"], ".1f")
        single("server RSS MB: before / streams held / after close",
               f"{st['rss_before_mb']:.0f} / {st['rss_held_mb']:.0f} / {st['rss_after_mb']:.0f}", "")
    li = results.get("list") or {}
    if li:
        single(f"tasks/list first page (limit 200) at {li['tasks']:,} tasks, ms", li["page_ms"], ".1f")
        single("tasks/list first page, bytes", li["page_bytes"], ",.0f")
        single("tasks/list unparameterized (original shape), ms", li["full_ms"], ",.0f")
        single("tasks/list unparameterized, bytes", li["full_bytes"], ",.0f")
        single("/health max ms during the unparameterized listing", li["health_max_ms_during_full"], ".1f")
        single("console Tasks first paint, bytes (static files + first page + overview calls)",
               li["console_first_paint_bytes"], ",.0f", "<5 MB",
               li["console_first_paint_bytes"] < 5 * 2**20)
        seen = li.get("browser")
        if seen:
            single(f"console Tasks in Chromium: first row shown, ms ({seen['rows']} rows)",
                   seen["first_row_ms"], ",.0f", "<1 s", seen["first_row_ms"] < 1000)
            single("console Tasks in Chromium: bytes received by then", seen["bytes"], ",.0f",
                   "<5 MB", seen["bytes"] < 5 * 2**20)
    for key, how in (("failover", "kill -9"), ("failover_freeze", "SIGSTOP")):
        fo = results.get(key) or {}
        if fo:
            single(f"failover: {how} of the leader -> serving, median / max s ({fo['kills']} times)",
                   f"{fo['median_s']:.2f} / {fo['max_s']:.2f}", "", "≤5 s", fo["max_s"] <= 5)
            single(f"failover ({how}): acknowledged tasks lost (of {fo['acked']:,})", fo["lost"], ",.0f",
                   "0", fo["lost"] == 0)
            single(f"failover ({how}): duplicated results", fo["duplicated"], ",.0f", "0",
                   fo["duplicated"] == 0)
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append(" | ".join(cells))
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ============================================================================ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="OffloadMQ benchmark (issue 6)")
    p.add_argument("--quick", action="store_true", help="shorten everything for a smoke run")
    p.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS + EXTRA_SECTIONS)}")
    p.add_argument("--w1", type=int, help="W1 tasks (default 5000)")
    p.add_argument("--w1c-concurrency", type=int, default=32,
                   help="W1c (info variant of W1): requests/threads in flight (default 32)")
    p.add_argument("--w2", type=int, help="W2 round trips (default 1000)")
    p.add_argument("--agents", type=int, help="idle agents (default 1000)")
    p.add_argument("--idle-duration", type=float, help="idle-agent sampling seconds (default 60)")
    p.add_argument("--fill", type=int, help="queued tasks for claim latency (default 100000)")
    p.add_argument("--caps", type=int, default=1000, help="capabilities the fill spreads over")
    p.add_argument("--claim-iters", type=int, help="claims measured per case (default 300)")
    p.add_argument("--records", type=int, help="journal records to replay (default 1000000)")
    p.add_argument("--l0-duration", type=int, help="wrk seconds (default 5)")
    p.add_argument("--subscribers", type=int, help="fanout: /management/events readers (default 500)")
    p.add_argument("--fanout-n", type=int, help="fanout: submits measured per case (default 500)")
    p.add_argument("--stream-pending", type=int, help="streams: pending tasks (default 50000)")
    p.add_argument("--list-tasks", type=int, help="list: tasks in the state (default 100000)")
    p.add_argument("--kills", type=int, help="failover: kill -9 rounds of the leader (default 10)")
    p.add_argument("--redis-fsync", default="always", choices=("always", "everysec", "no"),
                   help="redis appendfsync for the peers (default always, like our journal)")
    p.add_argument("--profile", type=Path, help="py-spy our W1 (server and agent) into this folder")
    p.add_argument("--trace", action="store_true",
                   help="also run W2 and W1 on an instrumented server: time per route")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    p.add_argument("--rounds", type=int, help="rounds of the compared sections, run in turn; "
                   "each system's best round is shown (default 2, 1 with --quick)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"w1": (5000, 500), "w2": (1000, 100), "agents": (1000, 200),
                "idle_duration": (60.0, 5.0), "fill": (100_000, 5_000), "claim_iters": (300, 50),
                "records": (1_000_000, 50_000), "l0_duration": (5, 2), "subscribers": (500, 100),
                "fanout_n": (500, 200), "stream_pending": (50_000, 10_000), "list_tasks": (100_000, 20_000),
                "kills": (10, 3)}
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.settle = 3.0 if quick else 5.0
    if args.rounds is None:
        args.rounds = 1 if quick else 2
    args.sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    if args.trace and "trace" not in args.sections:
        args.sections = (*args.sections, "trace")
    unknown = set(args.sections) - set(SECTIONS) - set(EXTRA_SECTIONS)
    if unknown:
        p.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="offloadmq-bench-"))
    results: dict = {}
    errors: dict = {}
    started = time.monotonic()
    load_before = os.getloadavg()
    runners = {"ours": run_ours, "ours-pg": run_ours_pg, "ours-ws": run_ours_ws,
               "ours-original": run_ours_original,
               "idle-ws": lambda tmp, args, found: run_idle(tmp, args, found, "ws"),
               "trace": run_trace, "l0": run_l0_section, "idle": run_idle, "claim": run_claim,
               "replay": run_replay, "failover": run_failover, "fanout": run_fanout,
               "streams": run_streams, "list": run_list}
    # The machine's speed drifts over minutes: the compared sections run in turn, for
    # `--rounds` rounds, and each system keeps its best round; the rest run once, after.
    compared = [s for s in args.sections if s in COMPARED]
    plan = [(n, s) for n in range(args.rounds) for s in compared]
    plan += [(0, s) for s in args.sections if s not in COMPARED]
    try:
        for round_no, section in plan:
            if section in errors:
                continue
            if section in COMPARED and args.rounds > 1:
                log(f"round {round_no + 1} of {args.rounds}: {section}")
            found: dict = {}
            try:
                if section in runners:
                    runners[section](tmp, args, found)
                else:
                    run_peer(tmp, args, found, section)
            except Exception as err:  # one broken section must not hide the others
                errors[section] = f"{type(err).__name__}: {err}"
                log(f"{section} FAILED: {err}")
                traceback.print_exc()
            for key, value in found.items():
                if key not in results or better(key, value, results[key]):
                    results[key] = value
    finally:
        if args.keep:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nOffloadMQ benchmark — {when}; Python {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"load avg before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"{time.monotonic() - started:.0f} s{' (--quick)' if args.quick else ''}")
    print(f"peers: Huey {_version('huey')}, Celery {_version('celery')}, redis-server appendfsync "
          f"{args.redis_fsync}; ours: fsync always, 1 agent capacity 1; W1/W1c/W2: each system's "
          f"best of {args.rounds} round(s), run in turn\n")
    print(render(build_table(results, args)))
    wrong = {k: v.get("wrong") for k, v in results.items() if isinstance(v, dict) and v.get("wrong")}
    if wrong:
        print(f"\nWRONG RESULTS: {wrong}")
    for section, err in errors.items():
        print(f"\n{section}: FAILED: {err}")
    if results.get("trace"):
        print("\n" + render_trace(results["trace"]))
    if args.profile:
        for name in ("w1-server.txt", "w1-agent.txt", "w1c-server.txt", "w1c-agent.txt", "idle-server.txt", "claim-server.txt"):
            path = args.profile / name
            if path.exists():
                print("\n" + profile.summarize(path, top=15))
        print(f"\nprofiles (py-spy collapsed stacks) in {args.profile}; "
              f"python -m bench.profile summarize FILE --only offloadmq.py")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "errors": errors,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    return 1 if errors or wrong else 0


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
