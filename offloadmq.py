#!/usr/bin/env python3
"""OffloadMQ: a task queue that offloads work to remote agents over HTTP.

Run it:   python offloadmq.py [--host H] [--port P] [--data DIR] [--fsync always|everysec|no]
With nothing configured it listens on 0.0.0.0:3069, keeps its state in ./data and
generates its secrets there once (printing the keys at first start). With
--store postgresql://... the state and secrets live in PostgreSQL instead, and several
servers share it: one leads, the others are hot standbys (pip install 'offloadmq[postgres]').

The wire contract is shared/API.md (compatible with the original OffloadMQ server).

Python client: `offloadmq.Client` (blocking) and `offloadmq.AsyncClient` (see the client
section; they need offload_agent.py beside this file, which `pip install offloadmq` puts).
CLI for CI runners: python offloadmq.py submit CAP [--payload JSON|@file] [--wait] ...,
status CAP ID, cancel CAP ID (OFFLOADMQ_URL, OFFLOADMQ_API_KEY; see the cli section).

Sections (``grep '^# ===' offloadmq.py``), each using only what is above it:
  imports · config · errors · models · core (pure) · journal · store (PostgreSQL) ·
  bucket files · wire shapes · listing · hub · streams · auth · handlers · agent websocket ·
  agent logs · routes · openapi · app · client · cli (main() hands CLI commands to the last one)
"""
# ============================================================================ imports
from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import errno
import functools
import gc
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import logging
import math
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import uuid
import weakref
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import jwt
import orjson
from aiohttp import web

__version__ = "0.1.0"
log = logging.getLogger("offloadmq")
access_log = logging.getLogger("offloadmq.access")  # --access-log: one line per request


# ============================================================================ config

SECRET_NAMES = ("JWT_SECRET", "AGENT_API_KEYS", "CLIENT_API_KEYS", "MGMT_TOKEN")
SECRETS_FILE = "secrets.json"
FSYNC_POLICIES = ("always", "everysec", "no")
PG_SCHEMES = ("postgresql://", "postgres://")
MAX_BODY_TIMEOUT_S = 60.0
MIN_SECRET_CHARS = 16  # client keys created over HTTP; shorter ones set at start get a warning


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 3069
    data_path: Path = Path("./data")
    jwt_secret: str = ""
    agent_api_keys: tuple[str, ...] = ()
    client_api_keys: tuple[str, ...] = ()
    mgmt_token: str = ""
    fsync: str = "always"
    compact_bytes: int = 64 * 1024 * 1024
    retention_s: float = 7 * 24 * 3600  # ended regular tasks are kept this long...
    retention_tasks: int = 100_000      # ...and at most this many of them
    max_body_bytes: int = 16 * 1024 * 1024
    jwt_lifetime_s: int = 7 * 24 * 3600
    blocking_hold_s: float = 300.0
    repair: bool = False
    metrics_public: bool = False  # /metrics without the management token
    # The agent WebSocket's heartbeat frames go out after a fresh random delay in this range.
    ws_heartbeat_min_s: float = 60.0
    ws_heartbeat_max_s: float = 90.0
    max_streams_per_key: int = 32  # event streams open at once per client key (and management)
    stream_buffer_bytes: int = 1 << 20  # a live stream's unsent bytes past this drop its reader
    stream_stall_s: float = 60.0  # a stream that is starting drops a reader that reads nothing this long
    max_connections: int = 0  # open at once; 0: the descriptor limit less FD_MARGIN
    static_path: Path = Path(__file__).resolve().parent / "static"
    # Hostile bodies: a body must arrive within body_timeout_s (at most MAX_BODY_TIMEOUT_S),
    # and the bodies being read at once hold at most body_budget_bytes (past it: 503).
    body_timeout_s: float = 30.0
    body_budget_bytes: int = 64 * 1024 * 1024
    # Failed authentications allowed per client address and minute before 429.
    auth_failures_per_min: int = 60
    # File buckets (STORAGE_*): per client key, per bucket, and how long a bucket lives.
    storage_max_buckets_per_key: int = 256
    storage_bucket_size_bytes: int = 1 << 30
    storage_bucket_ttl_s: float = 1440 * 60
    # Names of secrets generated at this start, so main() can print them once.
    generated: tuple[str, ...] = ()
    # The store: "" for the embedded journal in data_path, or a postgresql:// URL.
    store: str = ""
    # The URL other parties should use to reach this server (the leader records it).
    advertise_url: str = ""
    access_log: bool = False  # one log line per request (access_middleware)


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped; optional quotes stripped."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def split_keys(value: str) -> tuple[str, ...]:
    """Key lists take ',' or the original's ':' as separator."""
    return tuple(k.strip() for k in value.replace(":", ",").split(",") if k.strip())


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """A new file with `data`, on disk before this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def new_secret_value(name: str) -> str:
    prefix = {"AGENT_API_KEYS": "ak_", "CLIENT_API_KEYS": "ck_", "MGMT_TOKEN": "mt_"}.get(name, "")
    return prefix + secrets.token_urlsafe(32)


def load_secrets(data_path: Path, settings: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """Fill unset secrets from data/secrets.json, generating (and saving, mode 0600) the
    missing ones. There is no built-in default secret: each install gets its own."""
    path = data_path / SECRETS_FILE
    stored = orjson.loads(path.read_bytes()) if path.exists() else {}
    generated = []
    for name in SECRET_NAMES:
        if settings.get(name):
            continue
        if not stored.get(name):
            stored[name] = new_secret_value(name)
            generated.append(name)
        settings[name] = stored[name]
    if generated:  # on disk before use: a lost secret would orphan every agent and key
        data_path.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_synced(tmp, orjson.dumps(stored, option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)
        fsync_folder(data_path)
    return settings, tuple(generated)


SERVER_EPILOG = """\
commands, instead of starting the server (COMMAND --help tells more):
  submit CAPABILITY [--payload JSON] [--urgent] [--wait]   submit a task
  status CAPABILITY ID                                     print a task's status
  cancel CAPABILITY ID                                     cancel a task
  keys [--data FOLDER]                                     print the generated secrets
"""


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None,
                cwd: Path | None = None) -> Config:
    """Environment, then `.env` in the working directory, then flags (flags win)."""
    environ = dict(os.environ if environ is None else environ)
    settings = {**read_dotenv((cwd or Path.cwd()) / ".env"), **environ}

    parser = argparse.ArgumentParser(prog="offloadmq", description="OffloadMQ server",
                                     epilog=SERVER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="address to listen on (SERVER_ADDRESS=host:port; 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (3069)")
    parser.add_argument("--data", help="data folder (DATABASE_ROOT_PATH)")
    parser.add_argument("--fsync", choices=FSYNC_POLICIES, help="journal fsync policy (OFFLOADMQ_FSYNC)")
    parser.add_argument("--compact-mb", type=float, help="compact the journal past this size")
    parser.add_argument("--retention-days", type=float,
                        help="keep ended tasks this many days (OFFLOADMQ_RETENTION_DAYS, 7)")
    parser.add_argument("--retention-tasks", type=int,
                        help="keep at most this many ended tasks (OFFLOADMQ_RETENTION_TASKS, 100000)")
    parser.add_argument("--metrics-public", action="store_true",
                        help="serve /metrics without the management token")
    parser.add_argument("--repair", action="store_true",
                        help="move a corrupt journal tail into a side file and start")
    parser.add_argument("--store", help="postgresql://... to keep the state in PostgreSQL and run "
                        "as leader or standby (OFFLOADMQ_STORE); default: the journal in --data")
    parser.add_argument("--advertise-url", help="the URL other parties reach this server at "
                        "(OFFLOADMQ_ADVERTISE_URL; default http://HOST:PORT)")
    parser.add_argument("--access-log", action="store_true",
                        help="log one line per request: method, path, status, duration; never a "
                             "key or token (OFFLOADMQ_ACCESS_LOG=1)")
    args = parser.parse_args(argv)

    host, _, port = settings.get("SERVER_ADDRESS", "0.0.0.0:3069").rpartition(":")
    data_path = Path(args.data or settings.get("DATABASE_ROOT_PATH") or "./data")
    fsync = args.fsync or settings.get("OFFLOADMQ_FSYNC") or "always"
    if fsync not in FSYNC_POLICIES:
        parser.error(f"OFFLOADMQ_FSYNC must be one of {', '.join(FSYNC_POLICIES)}")
    compact_mb = args.compact_mb or float(settings.get("OFFLOADMQ_COMPACT_MB") or 64)
    try:
        retention_days = args.retention_days if args.retention_days is not None \
            else float(settings.get("OFFLOADMQ_RETENTION_DAYS") or 7)
        retention_tasks = args.retention_tasks if args.retention_tasks is not None \
            else int(settings.get("OFFLOADMQ_RETENTION_TASKS") or 100_000)
    except ValueError:
        parser.error("OFFLOADMQ_RETENTION_DAYS must be a number, OFFLOADMQ_RETENTION_TASKS an integer")
    if not (retention_days >= 0 and retention_tasks >= 0):  # `not >=` also refuses NaN
        parser.error("retention days and tasks must not be negative")
    store = args.store or settings.get("OFFLOADMQ_STORE") or ""
    if store and not store.startswith(PG_SCHEMES):
        parser.error("--store (OFFLOADMQ_STORE) must be a postgresql:// URL, or unset for the "
                     "embedded journal")
    # In PostgreSQL mode the secrets live in the database (every server must share them):
    # PostgresStore.load_secrets fills them in once connected.
    settings, generated = load_secrets(data_path, settings) if not store else (settings, ())
    try:
        beat_min = float(settings.get("AGENT_WS_HEARTBEAT_MIN_SECS") or 60)
        beat_max = float(settings.get("AGENT_WS_HEARTBEAT_MAX_SECS") or max(90.0, beat_min))
    except ValueError:
        parser.error("AGENT_WS_HEARTBEAT_MIN_SECS and _MAX_SECS must be numbers of seconds")
    if not 0 < beat_min <= beat_max:
        parser.error("AGENT_WS_HEARTBEAT_MIN_SECS must be positive and at most _MAX_SECS")
    host = args.host or host or "0.0.0.0"
    port = args.port if args.port is not None else int(port or 3069)
    try:
        max_buckets = int(settings.get("STORAGE_MAX_BUCKETS_PER_KEY") or 256)
        bucket_bytes = int(settings.get("STORAGE_BUCKET_SIZE_BYTES") or 1 << 30)
        bucket_ttl_min = float(settings.get("STORAGE_BUCKET_TTL_MINUTES") or 1440)
    except ValueError:
        parser.error("STORAGE_MAX_BUCKETS_PER_KEY and STORAGE_BUCKET_SIZE_BYTES must be integers, "
                     "STORAGE_BUCKET_TTL_MINUTES a number")
    if not (max_buckets >= 0 and bucket_bytes >= 0 and bucket_ttl_min > 0):
        parser.error("STORAGE_* limits must not be negative, the bucket TTL must be positive")
    return Config(
        host=host,
        port=port,
        data_path=data_path,
        jwt_secret=settings.get("JWT_SECRET", ""),
        agent_api_keys=split_keys(settings.get("AGENT_API_KEYS", "")),
        client_api_keys=split_keys(settings.get("CLIENT_API_KEYS", "")),
        mgmt_token=settings.get("MGMT_TOKEN", ""),
        fsync=fsync,
        compact_bytes=int(compact_mb * 1024 * 1024),
        retention_s=retention_days * 24 * 3600,
        retention_tasks=retention_tasks,
        repair=args.repair,
        metrics_public=args.metrics_public or settings.get("OFFLOADMQ_METRICS_PUBLIC", "") in ("1", "true"),
        ws_heartbeat_min_s=beat_min,
        ws_heartbeat_max_s=beat_max,
        max_streams_per_key=int(settings.get("OFFLOADMQ_STREAMS_PER_KEY") or 32),
        stream_buffer_bytes=int(settings.get("OFFLOADMQ_STREAM_BUFFER_BYTES") or 1 << 20),
        stream_stall_s=float(settings.get("OFFLOADMQ_STREAM_STALL_S") or 60.0),
        max_connections=int(settings.get("OFFLOADMQ_MAX_CONNECTIONS") or 0),
        generated=generated,
        access_log=args.access_log or settings.get("OFFLOADMQ_ACCESS_LOG", "") in ("1", "true"),
        body_timeout_s=min(MAX_BODY_TIMEOUT_S, max(0.1, float(settings.get("OFFLOADMQ_BODY_TIMEOUT") or 30))),
        body_budget_bytes=int(float(settings.get("OFFLOADMQ_BODY_BUDGET_MB") or 64) * 1024 * 1024),
        store=store,
        advertise_url=args.advertise_url or settings.get("OFFLOADMQ_ADVERTISE_URL")
        or f"http://{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{port}",
        storage_max_buckets_per_key=max_buckets,
        storage_bucket_size_bytes=bucket_bytes,
        storage_bucket_ttl_s=bucket_ttl_min * 60,
    )


@dataclass(frozen=True)
class ClientConfig:
    """What the CLI (`submit`, `status`, `cancel`) needs: the server and a client key."""
    url: str = "http://127.0.0.1:3069"
    api_key: str = ""


def load_client_config(environ: dict[str, str] | None = None, cwd: Path | None = None) -> ClientConfig:
    """OFFLOADMQ_URL and OFFLOADMQ_API_KEY from the environment, then `.env` (environment wins)."""
    environ = dict(os.environ if environ is None else environ)
    settings = {**read_dotenv((cwd or Path.cwd()) / ".env"), **environ}
    return ClientConfig(url=(settings.get("OFFLOADMQ_URL") or ClientConfig.url).rstrip("/"),
                        api_key=settings.get("OFFLOADMQ_API_KEY", ""))


# ============================================================================ errors

class OffloadError(Exception):
    """Any failure a caller should see; the middleware turns it into the contract's body."""
    status = 500
    type = "internal_error"

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.message = message
        self.extra = extra  # extra top-level fields of the error body (e.g. a task id)


class BadRequest(OffloadError):
    status, type = 400, "bad_request"


class Unauthenticated(OffloadError):
    status, type = 401, "authentication_error"


class Forbidden(OffloadError):
    status, type = 403, "authorization_error"


class NotFound(OffloadError):
    status, type = 404, "not_found"


class Conflict(OffloadError):
    status, type = 409, "conflict"


class Gone(OffloadError):
    """Known to the server, but no longer on its disk (a bucket file lost in a crash)."""
    status, type = 410, "file_missing"


class PayloadTooLarge(OffloadError):
    status, type = 413, "payload_too_large"


class SchedulingImpossible(OffloadError):
    status, type = 503, "scheduling_impossible"


class WaitTimeout(OffloadError):
    status, type = 504, "timeout"


class TooManyRequests(OffloadError):
    status, type = 429, "too_many_requests"


class RequestTimeout(OffloadError):
    status, type = 408, "request_timeout"


class Overloaded(OffloadError):
    status, type = 503, "overloaded"


class StorageFull(OffloadError):
    """The journal could not be written (disk full, quota, file size limit): the change
    was not made; writes go on once there is room again."""
    status, type = 507, "storage_full"


class StorageLost(OffloadError):
    """The journal is no longer the file at its path (data folder removed, journal
    replaced): writes are refused until an operator restarts the server."""
    status, type = 507, "storage_lost"


def retry_after(err: OffloadError, seconds: float) -> OffloadError:
    """The error, answered with `Retry-After: seconds` (see error_middleware)."""
    err.retry_after_s = max(1, math.ceil(seconds))
    return err


# ============================================================================ models

PENDING, ASSIGNED, RUNNING = "pending", "assigned", "running"
COMPLETED, FAILED, CANCELED = "completed", "failed", "canceled"
ENDED = frozenset({COMPLETED, FAILED, CANCELED})

# The task state machine, one row per operation on an existing task: the states it may
# start from and the state it leaves the task in (None: the status stays). Every task
# record goes through it, live and at replay; from any other state it raises and
# changes nothing. (`queued` and `starting` exist in the original's vocabulary but are
# never entered.) Failed and canceled tasks go back to pending only by a management requeue.
_LIVE, _HELD = frozenset({PENDING, ASSIGNED, RUNNING}), frozenset({ASSIGNED, RUNNING})
TASK_MOVES: dict[str, tuple[frozenset[str], str | None]] = {
    "task.assigned": (frozenset({PENDING}), ASSIGNED),
    "task.progressed": (_HELD, RUNNING),
    "task.completed": (_HELD, COMPLETED),
    "task.failed": (_LIVE, FAILED),
    "task.canceled": (_LIVE, CANCELED),
    "task.cancel_requested": (_HELD, None),
    "task.retried": (_HELD, PENDING),                    # a failed attempt, tried again
    "task.released": (frozenset({ASSIGNED}), PENDING),   # never started, and its agent lost it
    "task.requeued": (frozenset({FAILED, CANCELED}), PENDING),  # by management
}

ONLINE_S = 120.0          # an agent is online while its last contact is this recent...
HEARTBEATS_MISSED = 3     # ...or, if it declared heartbeatSecs, while it missed fewer beats
MAX_HEARTBEAT_S = 60.0
HOLD_GRACE_S = 5.0        # a ping's holding list releases only tasks assigned before this
URGENT_TAKE_S = 60.0      # an urgent task nobody takes within this fails as expired
URGENT_KEEP_S = 600.0     # an ended urgent task stays pollable this long
DROP_BATCH = 10_000       # ended tasks retention drops at most at once (one record)
OFFER_S = 15.0            # a polled task is held for its agent this long before `take`
FRONT_WALK_MIN_CAPS = 16  # an agent serving more capabilities finds work via the fronts
CANCEL_GRACE_S = 60.0     # a task whose agent does not confirm a cancel ends anyway then
DEFAULT_PRIORITY = 5
DEFAULT_MAX_RETRIES = 3
DEFAULT_RETRY_DELAY_S = 5.0
MAX_RETRY_DELAY_S = 600.0
LOG_KEEP_CHARS = 1 << 20  # the server keeps the last 1 MiB of a task's log
CAP_MAX_CHARS = 256
MAX_CAPACITY = 65_536  # tasks one agent runs at once
MAX_KEY_CHARS = 512
# A new client key: no spaces (a header would strip them), no '/' (revoke/{key} takes
# one path segment), long enough not to be guessed.
NEW_KEY_PATTERN = re.compile(r"[\x21-\x2e\x30-\x7e]{%d,%d}" % (MIN_SECRET_CHARS, MAX_KEY_CHARS))
KEY_RULE = (f"key must be {MIN_SECRET_CHARS} to {MAX_KEY_CHARS} printable ASCII characters "
            "without spaces or '/' (the console's Generate makes one)")


def _writer_nesting() -> int:
    """The deepest nesting orjson writes (about 255 levels; it varies by version)."""
    low, high = 1, 1024  # it writes `low` levels; `high` is past what any version reads
    while high - low > 1:
        middle, value = (low + high) // 2, []
        for _ in range(middle - 1):
            value = [value]
        try:
            orjson.dumps(value)
            low = middle
        except orjson.JSONEncodeError:
            high = middle
    return low


# The server puts a body's values at most RECORD_WRAP levels further down in what it
# writes (journal, snapshot, listing, events): deeper bodies are refused when read, so
# everything accepted can be written.
MAX_NESTING = _writer_nesting()
RECORD_WRAP = 5
MAX_BODY_DEPTH = MAX_NESTING - RECORD_WRAP


def storable_depth(value: Any) -> bool:
    """Whether `value` is nested at most MAX_BODY_DEPTH levels: whether the writer can
    write it RECORD_WRAP levels down (orjson stops at MAX_NESTING, and in C)."""
    for _ in range(RECORD_WRAP):
        value = [value]
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True

TaskKey = tuple[str, str]  # (capability, id)

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class UlidFactory:
    """ULIDs whose string order is creation order, even within one millisecond.
    `randbits(n)` supplies the random part (tests pass a seeded one)."""

    def __init__(self, randbits: Callable[[int], int] = random.SystemRandom().getrandbits):
        self.randbits = randbits
        self.last_ms = -1
        self.last_rand = 0

    def new(self, now: float) -> str:
        ms = int(now * 1000)
        if ms <= self.last_ms:  # same millisecond (or clock stepped back): count up
            ms, rand = self.last_ms, self.last_rand + 1
        else:
            rand = self.randbits(79)  # of 80 bits: headroom for counting up
        self.last_ms, self.last_rand = ms, rand
        value = (ms << 80) | rand
        return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -5, -5))


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    fraction, seconds = math.modf(ts)  # rounded to microseconds as datetime does
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    return f"{_iso_second(int(seconds))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=64)  # a task's timestamps share a handful of seconds
def _iso_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


@functools.lru_cache(maxsize=4096)  # replay parses the same millisecond many times
def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@functools.lru_cache(maxsize=65536)  # on every status change; capabilities are few
def base_capability(cap: str) -> str:
    """`vision[gpu;cuda12]` serves `vision`."""
    return cap.split("[", 1)[0]


CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0, DEL, C1, line separators


def check_capability(cap: Any, what: str = "capability") -> str:
    if not isinstance(cap, str) or not cap.strip():
        raise BadRequest(f"{what} must be a non-empty string")
    if len(cap) > CAP_MAX_CHARS:
        raise BadRequest(f"{what} is longer than {CAP_MAX_CHARS} characters")
    if CONTROL_CHARS.search(cap):  # a newline in a name would forge lines in logs and streams
        raise BadRequest(f"{what} must not contain control characters")
    return cap


def plain_number(x: float) -> str:
    """31622400, 0.001: never 3.16224e+07 in a message."""
    return f"{x:f}".rstrip("0").rstrip(".") if isinstance(x, float) else str(x)


def pattern_allows(patterns: list[str], cap: str) -> bool:
    """`*` allows all, `llm.*` every capability starting with `llm.`, else exact."""
    for pattern in patterns:
        if pattern == "*" or pattern == cap or (pattern.endswith("*") and cap.startswith(pattern[:-1])):
            return True
    return False


IDEMPOTENCY_S = 24 * 3600  # an Idempotency-Key names the same task for this long


def submission_digest(data: dict) -> str:
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def owner_of(key: str) -> str:
    """Tasks remember their client key only as a digest: the key itself is never stored."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


MGMT_OWNER = "management"


@dataclass(slots=True, eq=False)
class Task:
    cap: str
    id: str
    data: dict              # the submission request, without apiKey
    owner: str              # digest of the submitting client key
    created_at: float
    status: str = PENDING
    agent_id: str | None = None
    assigned_at: float | None = None
    ended_at: float | None = None
    queued_at: float = 0.0  # when it last became pending (urgent expiry counts from here)
    timeout_from: float | None = None  # timeoutSecs counts from here: creation, or a requeue
    not_before: float | None = None  # pending but not handed out before this (delay, retry)
    cancel_requested_at: float | None = None
    cancel_reason: str | None = None  # "canceled" or "timeout"
    last_agent: str | None = None
    declined: bool = False  # its last agent reported it notExecuted: prefer another
    idempotency_key: str | None = None  # the client's Idempotency-Key header, if it sent one
    body_digest: str | None = None      # of the submission, to tell a retry from a reuse
    result: Any = None
    log: str = ""
    stage: str | None = None
    attempts: int = 0
    history: list = field(default_factory=list)  # [(at, description)]
    in_heap: bool = False   # has a live entry in its ready queue (see Broker)
    size: int = -1          # bytes of its submission encoded (maxQueuedBytes); -1: not yet known
    # Derived once: the hot paths read them on every move.
    key: TaskKey = field(init=False)
    base: str = field(init=False)  # the base capability that agents serve
    # The submission's options, typed: `data` itself only passes through to agents.
    urgent: bool = field(init=False)
    restartable: bool = field(init=False)
    priority: int = field(init=False)
    max_retries: int = field(init=False)
    retry_delay_s: float = field(init=False)
    retry_on_same_node: bool = field(init=False)
    timeout_s: float | None = field(init=False)    # from creation (or a management requeue)
    max_wait_s: float | None = field(init=False)   # pending at most this long from creation
    run_at: float | None = field(init=False)       # not handed out before this...
    delay_s: float | None = field(init=False)      # ...or this long after the submit

    def __post_init__(self):
        self.key = (self.cap, self.id)
        self.base = base_capability(self.cap)
        # The wire names are read here once: the journal keeps the submission as sent.
        data = self.data
        self.urgent, self.restartable = data["urgent"], data["restartable"]
        self.priority = data.get("priority", DEFAULT_PRIORITY)
        self.max_retries = data.get("maxRetries", DEFAULT_MAX_RETRIES)
        self.retry_delay_s = data.get("retryDelaySecs", DEFAULT_RETRY_DELAY_S)
        self.retry_on_same_node = data.get("retryOnSameNode", True)
        self.timeout_s, self.max_wait_s = data.get("timeoutSecs"), data.get("maxWaitSecs")
        run_at = data.get("runAt")
        self.run_at = None if run_at is None else parse_iso(run_at)
        self.delay_s = data.get("delaySecs")

    @property
    def retries_left(self) -> bool:
        return self.attempts <= self.max_retries

    def encoded_size(self) -> int:
        """The submission's bytes: recorded at submit, measured for tasks from older journals."""
        if self.size < 0:
            self.size = len(orjson.dumps(self.data))
        return self.size

    def to_record(self) -> dict:
        return {"cap": self.cap, "id": self.id, "data": self.data, "owner": self.owner,
                "createdAt": self.created_at, "status": self.status, "agentId": self.agent_id,
                "assignedAt": self.assigned_at, "endedAt": self.ended_at,
                "queuedAt": self.queued_at, "notBefore": self.not_before,
                "timeoutFrom": self.timeout_from,
                "cancelRequestedAt": self.cancel_requested_at, "cancelReason": self.cancel_reason,
                "lastAgent": self.last_agent, "declined": self.declined,
                "idempotencyKey": self.idempotency_key,
                "bodyDigest": self.body_digest, "result": self.result, "log": self.log,
                "stage": self.stage, "attempts": self.attempts,
                "history": [list(h) for h in self.history]}

    @classmethod
    def from_record(cls, r: dict) -> "Task":
        return cls(cap=r["cap"], id=r["id"], data=r["data"], owner=r["owner"],
                   created_at=r["createdAt"], status=r["status"], agent_id=r["agentId"],
                   assigned_at=r["assignedAt"], ended_at=r["endedAt"], queued_at=r["queuedAt"],
                   not_before=r["notBefore"], timeout_from=r.get("timeoutFrom"),
                   cancel_requested_at=r["cancelRequestedAt"],
                   cancel_reason=r["cancelReason"], last_agent=r["lastAgent"],
                   declined=r.get("declined", False),
                   idempotency_key=r.get("idempotencyKey"), body_digest=r.get("bodyDigest"),
                   result=r["result"], log=r["log"], stage=r["stage"], attempts=r["attempts"],
                   history=[tuple(h) for h in r["history"]])


@dataclass(slots=True, eq=False)
class Agent:
    uid: str
    key: str                 # the agent's login secret
    registered_at: float
    capabilities: list
    tier: int
    capacity: int
    system_info: dict
    last_contact: float
    bases: frozenset = frozenset()
    heartbeat_s: float | None = None           # declared: offline after 3 missed beats
    display_name: str | None = None            # shown in the console instead of its id
    app_version: str | None = None             # the agent program's version, as it says
    online_s: float = ONLINE_S                 # offline after this long without contact
    draining: bool = False                     # gets no new tasks, keeps its running ones
    tokens_after: float = 0.0                  # JWTs issued before this were revoked (rotation)
    held: set = field(default_factory=set)     # keys of tasks it holds (assigned/running)
    offered: set = field(default_factory=set)  # keys polled but not yet taken

    @property
    def load(self) -> int:
        return len(self.held) + len(self.offered)

    def to_record(self) -> dict:
        return {"uid": self.uid, "key": self.key, "registeredAt": self.registered_at,
                "capabilities": self.capabilities, "tier": self.tier,
                "capacity": self.capacity, "systemInfo": self.system_info,
                "draining": self.draining, "heartbeatSecs": self.heartbeat_s,
                "tokensAfter": self.tokens_after, "displayName": self.display_name,
                "appVersion": self.app_version}

    def set_heartbeat(self, heartbeat_s: float | None) -> None:
        self.heartbeat_s = heartbeat_s
        self.online_s = ONLINE_S if heartbeat_s is None else HEARTBEATS_MISSED * heartbeat_s


@dataclass(slots=True, eq=False)
class ClientKey:
    key: str
    capabilities: list
    is_predefined: bool
    created_at: float
    is_revoked: bool = False
    max_in_flight: int | None = None  # queued + running tasks allowed at once
    max_queued_bytes: int | None = None  # encoded bytes of its tasks not yet ended

    def to_record(self) -> dict:
        return {"key": self.key, "capabilities": self.capabilities,
                "isPredefined": self.is_predefined, "created": self.created_at,
                "isRevoked": self.is_revoked, "maxInFlight": self.max_in_flight,
                "maxQueuedBytes": self.max_queued_bytes}


@dataclass(slots=True, eq=False)
class BucketFile:
    uid: str
    name: str        # as uploaded (checked by check_file_name); files on disk are named by uid
    size: int
    sha256: str
    added_at: float

    def to_record(self) -> dict:
        return {"uid": self.uid, "name": self.name, "size": self.size, "sha256": self.sha256,
                "addedAt": self.added_at}


@dataclass(slots=True, eq=False)
class Bucket:
    """Files a client staged for tasks (input) or that agents put there (output)."""
    uid: str
    owner: str              # digest of the client key that made it (see owner_of)
    created_at: float
    rm_after_task: bool = False  # deleted once every task that names it has ended
    files: dict = field(default_factory=dict)   # file uid -> BucketFile, oldest first
    used: int = 0           # bytes of its files
    tasks: set = field(default_factory=set)     # keys of the tasks that name it

    def to_record(self) -> dict:
        return {"uid": self.uid, "owner": self.owner, "createdAt": self.created_at,
                "rmAfterTask": self.rm_after_task,
                "files": [f.to_record() for f in self.files.values()]}


MAX_TASK_BUCKETS = 16
FILE_NAME_MAX_BYTES = 255


def check_file_name(name: Any) -> str:
    """A bucket file's name becomes a file name in an agent's task folder: one plain
    component, never a path (`..`, `/`, `\\`, NUL, control characters are refused)."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise BadRequest("a file name must be a non-empty name other than . and ..")
    if "/" in name or "\\" in name or CONTROL_CHARS.search(name):
        raise BadRequest(f"file name {name[:80]!r} must be one plain name: no /, \\, NUL or "
                         "control characters")
    if len(name.encode(errors="surrogateescape")) > FILE_NAME_MAX_BYTES:
        raise BadRequest(f"a file name is at most {FILE_NAME_MAX_BYTES} bytes")
    return name


def task_buckets(data: dict) -> list[str]:
    """The buckets a submission names: input (`file_bucket`) and output (`output_bucket`)."""
    named = list(data.get("file_bucket") or ())
    if data.get("output_bucket"):
        named.append(data["output_bucket"])
    return named


@dataclass(slots=True, eq=False)
class Change:
    """One thing a core method did, returned to its caller in the order done. `record`
    is the journal record (None for what only memory knows: a delay ending, an offer
    lapsing, an agent going quiet), `line` that record encoded, before it was applied."""
    op: str
    record: dict | None
    durable: bool = False
    line: bytes | None = None
    task: Task | None = None        # the task it is about
    before: str | None = None       # the task's status before and after
    after: str | None = None
    agent_uid: str | None = None    # the agent it is about
    scope: str = "task"             # what it is about: task, agent, key, or tasks (all of them)


class Histogram:
    """A Prometheus histogram: cumulative buckets of observed seconds."""
    BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self):
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.sum += seconds

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, total = [], 0
        sep = "," if labels else ""
        for bound, n in zip((*map(str, self.BOUNDS), "+Inf"), self.counts):
            total += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {total}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {total}"]
        return out


# ============================================================================ core (pure)
#
# Theory of operation. The Broker holds every task, agent and client key and is the
# only thing that changes them. It never does I/O, never awaits and never reads the
# clock: callers pass `now` (and its randomness and ids come in with it). Every change
# is a journal record, encoded first and then applied by its APPLY handler - the same
# handlers replay the journal at start - so the state after a restart is the state
# before it by construction, and a record that cannot be written changes nothing. Task
# records move the task as TASK_MOVES says. Each state-changing method hands its
# caller a Change per record (plus the few changes only memory knows) in the list the
# caller passes: the hub journals the durable ones and turns all of them into wake-ups
# and live events. Records of urgent tasks are applied but not kept (urgent tasks live
# in memory only).
#
# Queues: one ReadyQueue per (urgency, base capability) holds the tasks that may be
# handed out now: higher priority first, client keys taking turns within a priority,
# each key's tasks oldest first (ULIDs sort by creation) - O(log n) per claim, and a
# requeued task regains its place. Entries are removed lazily: one whose task is no
# longer pending is skipped when it reaches the top. A poll *offers* the head task to
# the agent (popped, held for OFFER_S) so concurrent pollers get different tasks;
# `take` turns the offer into an assignment, and an offer not taken lapses back.
# Pending tasks that must wait (delayed, retry backoff) sit in `timers` until due.
# An agent serving many capabilities does not look at each queue: `fronts` keeps every
# queue's head in one heap, walked in (priority, age) order until a head it serves.
#
# Timers: one heap of (due, seq, kind, task key, anchor) for everything that happens
# because time passes: a delay ending, an urgent or maxWaitSecs expiry, a timeout, a
# cancel's grace period, an ended urgent task being forgotten. A timer that no longer
# applies when it comes due is dropped; `expire(now)` pops the due ones.
#
# Agents: `online` is an OrderedDict ordered by last contact, oldest first, holding
# only online agents, so expiry pops from the front and never visits offline ones.
# `serving` indexes online agents by base capability for matching and tier checks.
#
# Retention: `ended` holds the ended regular tasks in the order they ended, so
# `drop_retained` (age and count limits) drops from its front through one
# `tasks.dropped` record, never looking at the tasks it keeps.
#
# Buckets: the metadata of file buckets (`buckets`, oldest first, and by owner for
# quotas) changes by `bucket.*` records like everything else; their bytes live on disk
# and are the hub's. A task names buckets in its submission (checked at submit: they
# exist and are the submitter's); an agent reaches a bucket only through a task it
# holds. `reap_buckets` drops the expired ones (from the front) and the rm_after_task
# ones whose tasks have all ended (candidates noted as tasks end).

class ReadyQueue:
    """Ready tasks of one capability: higher priority first; within a priority the
    submitting keys take turns; each key's tasks oldest first."""
    __slots__ = ("levels",)

    def __init__(self):
        self.levels: dict[int, OrderedDict[str, list[tuple[str, str]]]] = {}

    def push(self, task: Task) -> None:
        turns = self.levels.setdefault(task.priority, OrderedDict())
        heapq.heappush(turns.setdefault(task.owner, []), (task.id, task.cap))

    def head(self, live: Callable[[tuple[str, str]], Task | None]) -> Task | None:
        """The next task to hand out; entries `live` rejects are dropped on the way."""
        while self.levels:  # at most 10 priority levels
            priority = max(self.levels)
            turns = self.levels[priority]
            while turns:
                owner, heap = next(iter(turns.items()))
                while heap:
                    task = live(heap[0])
                    if task is not None:
                        return task
                    heapq.heappop(heap)
                del turns[owner]
            del self.levels[priority]
        return None

    def pop(self, task: Task) -> None:
        """Remove `task` (the head just returned); its key's turn passes to the next."""
        turns = self.levels[task.priority]
        heap = turns[task.owner]
        heapq.heappop(heap)
        if heap:
            turns.move_to_end(task.owner)
        else:
            del turns[task.owner]
            if not turns:
                del self.levels[task.priority]


def storable(value: Any) -> bytes:
    """`value` encoded as the journal writes it, or BadRequest (nothing changed yet)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as err:
        raise BadRequest(f"this cannot be stored: {err}") from None


def changing(method: Callable) -> Callable:
    """A core method that changes state: its caller may pass `changes=`, a list that gets
    a Change for everything the call did (calls within it add to the same list)."""
    @functools.wraps(method)
    def wrapper(self: "Broker", *args: Any, changes: list | None = None, **kwargs: Any) -> Any:
        outer = self.out
        if changes is not None or outer is None:
            self.out = [] if changes is None else changes
        try:
            return method(self, *args, **kwargs)
        finally:
            self.out = outer
    return wrapper


class OnlineAgents:
    """Online agents by last contact, oldest first: one OrderedDict per online window
    (agents that declared a heartbeat have their own), so expiry pops from the fronts
    and never visits an agent that is still online."""
    __slots__ = ("windows", "window_of")

    def __init__(self):
        self.windows: dict[float, OrderedDict[str, Agent]] = {}
        self.window_of: dict[str, float] = {}

    def __contains__(self, uid: str) -> bool:
        return uid in self.window_of

    def __len__(self) -> int:
        return len(self.window_of)

    def values(self) -> list[Agent]:
        if len(self.windows) == 1:
            return list(next(iter(self.windows.values())).values())
        return sorted((a for w in self.windows.values() for a in w.values()),
                      key=lambda a: a.last_contact)

    def __iter__(self):
        return iter([a.uid for a in self.values()])

    def touch(self, agent: Agent) -> bool:
        """Move the agent to the young end; True if it was not online."""
        window = self.window_of.get(agent.uid)
        if window == agent.online_s:
            self.windows[window].move_to_end(agent.uid)
            return False
        if window is not None:
            self.pop(agent.uid)
        self.windows.setdefault(agent.online_s, OrderedDict())[agent.uid] = agent
        self.window_of[agent.uid] = agent.online_s
        return window is None

    def pop(self, uid: str) -> None:
        window = self.window_of.pop(uid, None)
        if window is not None:
            agents = self.windows[window]
            del agents[uid]
            if not agents:
                del self.windows[window]

    def expired(self, now: float) -> list[Agent]:
        """The agents whose last contact is older than their window."""
        gone = []
        for window, agents in self.windows.items():
            for agent in agents.values():
                if now - agent.last_contact <= window:
                    break
                gone.append(agent)
        return gone


class Broker:
    def __init__(self, predefined_keys: tuple[str, ...] = (), now: float = 0.0,
                 rng: random.Random | None = None, ids: UlidFactory | None = None,
                 new_secret: Callable[[], str] = lambda: secrets.token_urlsafe(24),
                 new_uuid: Callable[[], str] = lambda: str(uuid.uuid4())):
        self.tasks: dict[TaskKey, Task] = {}
        self.queues: dict[tuple[bool, str], ReadyQueue] = {}
        self.offers: dict[TaskKey, tuple[str, float]] = {}   # task -> (agent uid, lapses at)
        self.timers: list[tuple[float, int, str, TaskKey, Any]] = []
        self.timer_seq = itertools.count()
        self.agents: dict[str, Agent] = {}
        self.online = OnlineAgents()
        self.serving: dict[str, set[str]] = {}               # base capability -> online uids
        self.keys: dict[bytes, ClientKey] = {}               # sha256(key) -> key
        self.counts: dict[tuple[bool, str], int] = {}        # (urgent, status) -> tasks
        self.pending_by_cap: dict[str, int] = {}             # base capability -> pending tasks
        self.in_flight_by_owner: dict[str, int] = {}         # owner -> tasks not ended
        self.bytes_by_owner: dict[str, int] = {}             # owner -> their encoded bytes
        self.idempotent: dict[tuple[str, str], TaskKey] = {}  # (owner, Idempotency-Key) -> task
        # Ended regular tasks, the earliest ended first: retention drops from the front
        # without looking at the others.
        self.ended: OrderedDict[TaskKey, None] = OrderedDict()
        # File buckets, oldest first (TTL expiry stops at the first young one); by owner
        # for quotas; and the rm_after_task buckets one of whose tasks has ended.
        self.buckets: dict[str, Bucket] = {}
        self.buckets_by_owner: dict[str, dict[str, None]] = {}
        self.reap_candidates: set[str] = set()
        self.out: list[Change] | None = None  # the calling method's changes (see `changing`)
        self.loading = False  # replaying: queues and counts are built once, at the end
        # The head of every non-empty queue, and per urgency a heap of those heads (with
        # stale entries dropped lazily): how an agent serving many capabilities finds the
        # best task without looking at each of them.
        self.fronts: dict[tuple[bool, str], tuple[int, str]] = {}
        self.front_heaps: dict[bool, list[tuple[tuple[int, str], str]]] = {}
        self.rng = rng or random.Random()      # retry jitter
        self.ids = ids or UlidFactory()        # task and agent ids
        self.new_secret = new_secret           # agents' login secrets
        self.new_uuid = new_uuid               # bucket ids: unguessable, they act as tokens
        for key in predefined_keys:
            self.keys[key_digest(key)] = ClientKey(key, ["*"], True, now)

    # ---------------------------------------------------------------- records

    def _emit(self, op: str, now: float, durable: bool = True, subject: Task | None = None,
              agent_uid: str | None = None, scope: str = "task", **fields: Any) -> Change:
        """Encode the record, then apply it: a record that cannot be stored (or a move
        the table forbids) raises before anything changed."""
        record = {"op": op, "at": iso(now), **fields}
        line = storable(record) if durable else None
        task = subject
        before = task.status if task is not None else None
        APPLY[op](self, record, parse_iso(record["at"]))  # as replay will: to the millisecond
        change = Change(op, record, durable, line, task, before,
                        task.status if task is not None else None, agent_uid, scope)
        if self.out is not None:
            self.out.append(change)
        return change

    def _emit_task(self, op: str, task: Task, now: float, **fields: Any) -> None:
        self._emit(op, now, not task.urgent, task, cap=task.cap, id=task.id, **fields)

    def _note(self, op: str, task: Task | None = None, agent_uid: str | None = None) -> None:
        """A change only memory knows (no record): waiters may care all the same."""
        if self.out is not None:
            status = task.status if task is not None else None
            self.out.append(Change(op, None, False, None, task, status, status, agent_uid,
                                   "task" if task is not None else "agent"))

    def apply(self, record: dict) -> None:
        APPLY[record["op"]](self, record, parse_iso(record["at"]))

    # ---------------------------------------------------------------- internal moves

    def _move(self, task: Task, op: str) -> None:
        """The task's status as TASK_MOVES says `op` leaves it, or Conflict."""
        allowed, status = TASK_MOVES[op]
        if task.status not in allowed:
            raise Conflict(f"task {task.id} cannot go from {task.status} by {op}")
        if status is None:
            return
        if task.status == PENDING:  # live, a wait ends with a timer that replay does not run
            task.not_before = None
        if self.loading:  # end_loading counts
            task.status = status
        elif status != task.status:  # every progress report after the first is running -> running
            self._count(task, -1)
            task.status = status
            self._count(task, +1)

    def _count(self, task: Task, delta: int) -> None:
        status, counts = task.status, self.counts
        slot = (task.urgent, status)
        counts[slot] = counts.get(slot, 0) + delta
        if status == PENDING:
            self.pending_by_cap[task.base] = self.pending_by_cap.get(task.base, 0) + delta
        if status not in ENDED:
            owners = self.in_flight_by_owner
            owners[task.owner] = owners.get(task.owner, 0) + delta
            sizes = self.bytes_by_owner
            sizes[task.owner] = sizes.get(task.owner, 0) + delta * task.encoded_size()

    def _timer(self, due: float, kind: str, task: Task, anchor: Any = None) -> None:
        heapq.heappush(self.timers, (due, next(self.timer_seq), kind, task.key, anchor))

    def _enqueue(self, task: Task, now: float) -> None:
        """Make a pending task available: now, or when its not_before comes."""
        task.queued_at = now
        if task.urgent:
            self._timer(now + URGENT_TAKE_S, "expire", task, now)
        if task.not_before is not None and task.not_before > now:
            self._timer(task.not_before, "ready", task)
        else:
            task.not_before = None
            self._push(task)

    def _push(self, task: Task) -> None:
        if not task.in_heap:
            task.in_heap = True
            if self.loading:
                return
            slot = (task.urgent, task.base)
            queue = self.queues.get(slot)
            if queue is None:
                queue = self.queues[slot] = ReadyQueue()
            queue.push(task)
            self._refresh_front(task.urgent, task.base)

    def begin_loading(self) -> None:
        """Replay counts and queues nothing until `end_loading`: most tasks it sees also
        end in it, and counting each move of each of them costs more than counting once."""
        self.loading = True

    def end_loading(self) -> None:
        """Count every task and queue the waiting ones, as the records one by one would."""
        self.loading = False
        self.counts.clear()
        self.pending_by_cap.clear()
        self.in_flight_by_owner.clear()
        self.bytes_by_owner.clear()
        for task in self.tasks.values():
            self._count(task, +1)
            if task.in_heap:  # pushed while loading, and not queued yet
                task.in_heap = False
                if task.status == PENDING and task.not_before is None:
                    self._push(task)

    def _live(self, entry: tuple[str, str]) -> Task | None:
        task = self.tasks.get((entry[1], entry[0]))
        # A task taken without a poll keeps a stale entry; after a requeue with a retry
        # delay that entry must not hand it out before its time.
        if task is not None and task.status == PENDING and task.in_heap and task.not_before is None:
            return task
        if task is not None:
            task.in_heap = False
        return None

    def _head(self, urgent: bool, base: str) -> Task | None:
        queue = self.queues.get((urgent, base))
        return queue.head(self._live) if queue else None

    def _end(self, task: Task, op: str, now: float, description: str) -> None:
        self._move(task, op)
        task.ended_at = now
        task.not_before = None
        # An ended task is in no stage: the one it failed or was canceled in goes to its
        # history, where it still explains the end.
        if task.stage is not None and op != "task.completed":
            description = f"{description} (in stage {task.stage})"
        task.stage = None
        task.history.append((now, description))
        agent = self.agents.get(task.agent_id or "")
        if agent:
            agent.held.discard(task.key)
        if self.buckets:
            self._note_bucket_users_ended(task)
        if task.urgent:
            self._timer(now + URGENT_KEEP_S, "forget", task)
        else:
            self.ended[task.key] = None

    def _drop_offer(self, key: TaskKey) -> None:
        offer = self.offers.pop(key, None)
        if offer and offer[0] in self.agents:
            self.agents[offer[0]].offered.discard(key)

    # ---------------------------------------------------------------- agents

    def touch(self, uid: str, now: float) -> Agent:
        """Count a contact: the agent moves to the young end of the LRU."""
        agent = self.agents.get(uid)
        if agent is None:
            raise Unauthenticated("unknown agent")
        agent.last_contact = now
        if self.online.touch(agent):
            for base in agent.bases:
                self.serving.setdefault(base, set()).add(uid)
        return agent

    @changing
    def ping(self, uid: str, holding: set[TaskKey] | None, now: float) -> list[Task]:
        """A contact. With `holding` (the tasks the agent says it holds), every task
        assigned to it before HOLD_GRACE_S ago that it does not hold is released: one
        that never started goes back to the queue as if never taken; a started one is
        handled as for a lost agent. Returns the released tasks."""
        agent = self.touch(uid, now)
        if holding is None:
            return []
        released = []
        for key in sorted(agent.held):
            task = self.tasks[key]
            if key in holding or now - (task.assigned_at or now) <= HOLD_GRACE_S:
                continue
            reason = f"agent {uid} no longer holds it"
            if task.status == ASSIGNED and task.cancel_requested_at is None:
                self._emit_task("task.released", task, now, reason=f"released: {reason}")
            else:
                self._retry_or_fail(task, now, reason)
            released.append(task)
        return released

    @changing
    def release_unstarted(self, uid: str, now: float) -> list[Task]:
        """The agent's push channel closed (or a new one replaced it): the tasks it was
        handed but never started go back to the queue at once, as never taken (one whose
        cancel was asked ends canceled); the started ones stay for it to report. Its
        offers lapse. Returns the tasks released."""
        agent = self.agents.get(uid)
        if agent is None:
            return []
        for key in list(agent.offered):
            self._lapse_offer(key, now)
        released = []
        for key in sorted(agent.held):
            task = self.tasks[key]
            if task.status != ASSIGNED:
                continue
            if task.cancel_requested_at is not None:
                self._finish_cancel(task, now, f"agent {uid}'s connection closed before it started")
            else:
                self._emit_task("task.released", task, now,
                                reason=f"released: agent {uid}'s connection closed before it started")
            released.append(task)
        return released

    def _go_offline(self, agent: Agent) -> None:
        self.online.pop(agent.uid)
        for base in agent.bases:
            uids = self.serving.get(base)
            if uids:
                uids.discard(agent.uid)
                if not uids:
                    del self.serving[base]

    def _agent(self, uid: str) -> Agent:
        agent = self.agents.get(uid)
        if agent is None:
            raise NotFound(f"no agent {uid}")
        return agent

    @changing
    def register_agent(self, info: dict, now: float) -> Agent:
        uid = self.ids.new(now)
        self._emit("agent.registered", now, agent_uid=uid, scope="agent", agent={
            "uid": uid, "key": self.new_secret(), "registeredAt": now, **info})
        return self.touch(uid, now)

    @changing
    def update_agent(self, uid: str, info: dict, now: float) -> Agent:
        self.touch(uid, now)
        self._emit("agent.updated", now, agent_uid=uid, scope="agent", uid=uid, **info)
        return self.agents[uid]

    @changing
    def drain_agent(self, uid: str, draining: bool, now: float) -> Agent:
        """A draining agent gets no new tasks and keeps the ones it holds."""
        agent = self._agent(uid)
        self._emit("agent.drained" if draining else "agent.resumed", now, agent_uid=uid,
                   scope="agent", uid=uid)
        return agent

    @changing
    def rotate_agent_key(self, uid: str, now: float) -> Agent:
        """A new login secret; every JWT issued to the agent before now stops working.
        The agent keeps its id, its tasks and its settings."""
        agent = self._agent(uid)
        self._emit("agent.key_rotated", now, agent_uid=uid, scope="agent", uid=uid,
                   key=self.new_secret(), tokensAfter=now)
        return agent

    @changing
    def delete_agent(self, uid: str, now: float) -> None:
        agent = self._agent(uid)
        self._lose_agent(agent, now, f"agent {uid} was deleted")
        self._emit("agent.deleted", now, agent_uid=uid, scope="agent", uid=uid)

    @changing
    def reset_agents(self, now: float) -> None:
        for agent in list(self.agents.values()):
            self._lose_agent(agent, now, f"agent {agent.uid} was removed by a reset")
        self._emit("agents.reset", now, scope="agent")

    def _lose_agent(self, agent: Agent, now: float, reason: str) -> None:
        """An agent is gone: its offers lapse, its restartable tasks go back to the queue
        (while retries are left), the others fail - each with the reason in history."""
        for key in list(agent.offered):
            self._lapse_offer(key, now)
        for key in sorted(agent.held):
            self._retry_or_fail(self.tasks[key], now, reason)

    def _retry_or_fail(self, task: Task, now: float, reason: str, result: Any = None,
                       declined: bool = False) -> None:
        """After a failed attempt: cancel if one was asked for, retry if allowed, else fail.
        A declined task (notExecuted) goes back at once, for another agent if one has room."""
        if task.cancel_requested_at is not None:
            self._finish_cancel(task, now, reason)
        elif task.restartable and task.retries_left:
            wait_s = 0.0 if declined else self._retry_delay(task)
            # No delay means ready at once: `now + 0` would still be after the record's
            # millisecond-truncated time and wait for the next timer round.
            not_before = now + wait_s if wait_s > 0 else None
            retries = task.max_retries
            self._emit_task("task.retried", task, now, notBefore=not_before, declined=declined,
                            reason=f"{reason}; retry {task.attempts} of {retries}")
        else:
            self._emit_task("task.failed", task, now, reason=reason, result=result)

    def _retry_delay(self, task: Task) -> float:
        """Exponential backoff with jitter: delay * 2^(attempt-1) * [0.5, 1.5), capped."""
        base = task.retry_delay_s
        return min(MAX_RETRY_DELAY_S, base * 2 ** (task.attempts - 1) * (0.5 + self.rng.random()))

    def is_online(self, agent: Agent, now: float) -> bool:
        return agent.uid in self.online and now - agent.last_contact <= agent.online_s

    def online_agents(self, now: float) -> list[Agent]:
        return [a for a in self.online.values() if now - a.last_contact <= a.online_s]

    def online_capabilities(self) -> list[str]:
        return sorted(self.serving)

    # ---------------------------------------------------------------- keys

    def client_key(self, key: str) -> ClientKey | None:
        found = self.keys.get(key_digest(key))
        if found is not None and hmac.compare_digest(found.key.encode(), key.encode()):
            return found
        return None

    @changing
    def update_key(self, key: str, capabilities: list[str], max_in_flight: int | None,
                   now: float, max_queued_bytes: int | None = None) -> ClientKey:
        existing = self.client_key(key)
        self._emit("key.updated", now, scope="key", key={
            "key": key, "capabilities": capabilities,
            "isPredefined": existing.is_predefined if existing else False,
            "created": existing.created_at if existing else now, "isRevoked": False,
            "maxInFlight": max_in_flight, "maxQueuedBytes": max_queued_bytes})
        return self.client_key(key)

    @changing
    def revoke_key(self, key: str, now: float) -> ClientKey:
        if self.client_key(key) is None:
            raise NotFound("no such client API key")
        self._emit("key.revoked", now, scope="key", key=key)
        return self.client_key(key)

    # ---------------------------------------------------------------- tasks

    def find_idempotent(self, owner: str, idempotency_key: str, data: dict, now: float) -> Task | None:
        """The task an earlier submit with this Idempotency-Key made (within 24 h), or None.
        The same key with a different body is a conflict."""
        task = self.tasks.get(self.idempotent.get((owner, idempotency_key)))
        if task is None or task.created_at + IDEMPOTENCY_S <= now:
            return None
        if task.body_digest != submission_digest(data):
            raise Conflict("this Idempotency-Key was used for a different submission")
        return task

    @changing
    def submit(self, data: dict, owner: str, max_in_flight: int | None, now: float,
               idempotency_key: str | None = None, max_queued_bytes: int | None = None) -> Task:
        base = base_capability(data["capability"])
        if data["urgent"] and base not in self.serving:
            raise SchedulingImpossible(f"no online agent serves {base}")
        if max_in_flight is not None and self.in_flight_by_owner.get(owner, 0) >= max_in_flight:
            raise TooManyRequests(f"this key already has {max_in_flight} tasks queued or running")
        if "file_bucket" in data or "output_bucket" in data:
            for uid in task_buckets(data):
                self._bucket(uid, owner, Forbidden)
        size = len(storable(data))
        held = self.bytes_by_owner.get(owner, 0)
        if max_queued_bytes is not None and held + size > max_queued_bytes:
            raise TooManyRequests(
                f"this task ({size} bytes) would take the key's tasks queued or running to "
                f"{held + size} bytes; its maxQueuedBytes is {max_queued_bytes}")
        task_id = self.ids.new(now)
        record = {"cap": data["capability"], "id": task_id, "data": data, "owner": owner,
                  "createdAt": now, "size": size}
        if idempotency_key is not None:
            record.update(idempotencyKey=idempotency_key, bodyDigest=submission_digest(data))
        change = self._emit("task.submitted", now, not data["urgent"], task=record)
        change.task = self.tasks[(data["capability"], task_id)]
        change.after = PENDING
        return change.task

    def task(self, cap: str, task_id: str, owner: str | None = None) -> Task:
        """A task by id; with `owner`, one submitted with another key is not found."""
        task = self.tasks.get((cap, task_id))
        if task is None or (owner not in (None, MGMT_OWNER) and task.owner != owner):
            raise NotFound(f"no task {cap}/{task_id}")
        return task

    def offer(self, uid: str, now: float, urgent_only: bool = False) -> Task | None:
        """The task this agent should take next, held for it until it takes it, or None.
        Urgent first, then regular; by priority, then oldest, across its capabilities."""
        agent = self.agents[uid]
        if agent.load >= agent.capacity or agent.draining:
            return None
        best = self._best_head(agent, True, now)
        if best is None and not urgent_only:
            best = self._best_head(agent, False, now)
        if best is not None:
            self.queues[(best.urgent, best.base)].pop(best)
            best.in_heap = False
            self._refresh_front(best.urgent, best.base)
            self.offers[best.key] = (uid, now + OFFER_S)
            agent.offered.add(best.key)
        return best

    def _best_head(self, agent: Agent, urgent: bool, now: float) -> Task | None:
        """The best ready task among the agent's capabilities: by looking at each of
        them, or, for an agent that serves many, by walking the fronts in order."""
        if len(agent.bases) > FRONT_WALK_MIN_CAPS:
            return self._walk_fronts(agent, urgent, now)
        return self._scan_heads(agent, urgent, now)

    def _eligible(self, agent: Agent, task: Task, now: float) -> bool:
        return (task.urgent or self._tier_allows(agent, task.base, now)) and not (
            task.last_agent == agent.uid and self._another_could_retry(task, now))

    def _scan_heads(self, agent: Agent, urgent: bool, now: float) -> Task | None:
        best = None
        for base in agent.bases:
            task = self._head(urgent, base)
            if task is not None and (best is None or (-task.priority, task.id) < (-best.priority, best.id)) \
                    and self._eligible(agent, task, now):
                best = task
        return best

    def _walk_fronts(self, agent: Agent, urgent: bool, now: float) -> Task | None:
        """The first front, in (priority, age) order, that this agent serves and may take.
        Entries for fronts that moved are dropped (or renewed) on the way; the ones this
        agent passes over go back."""
        heap, passed, seen, found = self.front_heaps.setdefault(urgent, []), [], set(), None
        while heap:
            key, base = heap[0]
            if self.fronts.get((urgent, base)) != key or base in seen:
                heapq.heappop(heap)  # stale, or a second entry for the same front
                continue
            task = self._head(urgent, base)
            if task is None or (-task.priority, task.id) != key:
                heapq.heappop(heap)  # the front moved (its task ended): look again
                self._refresh_front(urgent, base)
                continue
            seen.add(base)
            if base in agent.bases and self._eligible(agent, task, now):
                found = task
                break
            passed.append(heapq.heappop(heap))
        for entry in passed:
            heapq.heappush(heap, entry)
        return found

    def _refresh_front(self, urgent: bool, base: str) -> None:
        """Record the queue's current head in the fronts index (see _walk_fronts)."""
        slot = (urgent, base)
        queue = self.queues.get(slot)
        task = queue.head(self._live) if queue else None
        key = None if task is None else (-task.priority, task.id)
        if key != self.fronts.get(slot):
            if key is None:
                del self.fronts[slot]
            else:
                self.fronts[slot] = key
                heap = self.front_heaps.setdefault(urgent, [])
                heapq.heappush(heap, (key, base))
                if len(heap) > 2 * len(self.fronts) + 64:  # mostly stale: rebuild it
                    heap[:] = [(k, b) for (u, b), k in self.fronts.items() if u == urgent]
                    heapq.heapify(heap)

    def _has_room(self, agent: Agent, now: float) -> bool:
        return (agent.load < agent.capacity and not agent.draining
                and now - agent.last_contact <= agent.online_s)

    def _tier_allows(self, agent: Agent, base: str, now: float) -> bool:
        """Spill-over: a lower tier gets a regular task only when no online agent of a
        higher tier that serves it has free capacity."""
        for uid in self.serving.get(base, ()):
            other = self.agents[uid]
            if other.tier > agent.tier and self._has_room(other, now):
                return False
        return True

    def _another_could_retry(self, task: Task, now: float) -> bool:
        """A task its last agent declined (notExecuted), or one with retryOnSameNode:
        false, goes to another agent when one has room."""
        if task.retry_on_same_node and not task.declined:
            return False
        return any(uid != task.last_agent and self._has_room(self.agents[uid], now)
                   for uid in self.serving.get(task.base, ()))

    @changing
    def release_offer(self, key: TaskKey, now: float) -> None:
        """The poller went away before it got the task: give it to the next one."""
        if key in self.offers:
            self._lapse_offer(key, now)

    def _lapse_offer(self, key: TaskKey, now: float) -> None:
        self._drop_offer(key)
        task = self.tasks.get(key)
        if task is not None and task.status == PENDING and task.not_before is None:
            self._push(task)
            self._note("task.offer_lapsed", task)

    @changing
    def take(self, uid: str, cap: str, task_id: str, now: float) -> Task:
        agent = self.touch(uid, now)
        task = self.task(cap, task_id)
        if base_capability(cap) not in agent.bases:
            raise Forbidden(f"agent {uid} does not serve {base_capability(cap)}")
        if task.status != PENDING:
            raise Conflict(f"task {task_id} was already taken")
        if task.not_before is not None:
            raise Conflict(f"task {task_id} may not run before {iso(task.not_before)}")
        offer = self.offers.get(task.key)
        mine = offer is not None and offer[0] == uid
        if offer is not None and not mine and offer[1] > now:
            raise Conflict(f"task {task_id} is offered to another agent")
        if not mine and (agent.load >= agent.capacity or agent.draining):
            raise Conflict(f"agent {uid} is at capacity ({agent.capacity}) or draining")
        self._emit_task("task.assigned", task, now, agentId=uid)
        return task

    def _held_by(self, uid: str, cap: str, task_id: str) -> Task:
        task = self.task(cap, task_id)
        if task.status in ENDED:
            raise Conflict(f"task {task_id} has already ended ({task.status})")
        if task.agent_id != uid or task.status == PENDING:
            raise Forbidden(f"task {task_id} is not held by agent {uid}")
        return task

    @changing
    def progress(self, uid: str, cap: str, task_id: str, stage: str | None,
                 log_update: str | None, now: float) -> Task:
        self.touch(uid, now)
        task = self._held_by(uid, cap, task_id)
        self._emit_task("task.progressed", task, now, stage=stage, log=log_update)
        return task

    @changing
    def resolve(self, uid: str, cap: str, task_id: str, outcome: str, message: str | None,
                output: Any, now: float) -> Task:
        """outcome: success | failure | notExecuted (API.md's resolve statuses)."""
        self.touch(uid, now)
        task = self._held_by(uid, cap, task_id)
        if outcome == "success":
            self._emit_task("task.completed", task, now, result=output)
        elif outcome == "failure":
            self._retry_or_fail(task, now, f"failed on agent {uid}: {message}", output)
        else:  # notExecuted: another agent may run it, at once
            self._retry_or_fail(task, now, f"not executed by agent {uid}: {message}", output,
                                declined=True)
        return task

    @changing
    def resolve_and_take_next(self, uid: str, cap: str, task_id: str, outcome: str,
                              message: str | None, output: Any, now: float) -> tuple[Task, Task | None]:
        """Resolve, then take the agent's next task if one is ready now: both changes
        reach the journal in one write (one fsync per task for a busy agent)."""
        task = self.resolve(uid, cap, task_id, outcome, message, output, now)
        nxt = self.offer(uid, now)
        if nxt is not None:
            self.take(uid, nxt.cap, nxt.id, now)
        return task, nxt

    @changing
    def cancel(self, cap: str, task_id: str, owner: str, now: float) -> Task:
        """A queued task is canceled at once; a running one is asked to stop (its agent
        learns it from progress answers and the cancel long poll)."""
        task = self.task(cap, task_id, owner)
        if task.status in ENDED:
            raise Conflict(f"task {task_id} has already ended ({task.status})")
        if task.status == PENDING:
            self._drop_offer(task.key)
            self._emit_task("task.canceled", task, now, reason="canceled while queued")
        elif task.cancel_requested_at is None:
            self._emit_task("task.cancel_requested", task, now, reason="canceled")
        return task

    def _finish_cancel(self, task: Task, now: float, detail: str) -> None:
        if task.cancel_reason == "timeout":
            self._emit_task("task.failed", task, now, reason=f"timeout; {detail}")
        else:
            self._emit_task("task.canceled", task, now, reason=f"canceled; {detail}")

    def cancel_requests(self, uid: str) -> list[Task]:
        """Tasks this agent holds that it should stop."""
        agent = self.agents.get(uid)
        return [self.tasks[key] for key in sorted(agent.held)
                if self.tasks[key].cancel_requested_at is not None] if agent else []

    @changing
    def requeue(self, cap: str, task_id: str, now: float) -> Task:
        """Management: a failed or canceled task (a dead letter) gets a fresh set of attempts."""
        task = self.task(cap, task_id)
        if task.status not in (FAILED, CANCELED):
            raise Conflict(f"only failed or canceled tasks can be requeued; this one is {task.status}")
        if task.urgent:
            raise Conflict("urgent tasks cannot be requeued: submit it again")
        gone = [uid for uid in task_buckets(task.data) if uid not in self.buckets]
        if gone:  # reaped with the task (rm_after_task), expired or deleted: it would fail
            raise Conflict(f"the task's bucket {gone[0]} is gone (removed after the task "
                           "ended, expired or deleted): upload the files again and submit it again")
        self._emit_task("task.requeued", task, now)
        return task

    @changing
    def reset_tasks(self, now: float) -> None:
        self._emit("tasks.reset", now, scope="tasks")

    # ---------------------------------------------------------------- buckets

    def _bucket(self, uid: Any, owner: str | None, missing: type = NotFound) -> Bucket:
        """A bucket by uid; with `owner`, another key's bucket is not found (management's
        override sees every bucket)."""
        bucket = self.buckets.get(uid) if isinstance(uid, str) else None
        if bucket is None or (owner not in (None, MGMT_OWNER) and bucket.owner != owner):
            shown = uid[:80] if isinstance(uid, str) else uid
            raise missing(f"no bucket {shown!r} (wrong id, expired, or another key's)")
        return bucket

    def bucket(self, uid: str, owner: str | None = None) -> Bucket:
        return self._bucket(uid, owner)

    def owner_buckets(self, owner: str) -> list[Bucket]:
        return [self.buckets[uid] for uid in self.buckets_by_owner.get(owner, ())]

    def agent_bucket(self, agent_uid: str, bucket_uid: str, output: bool) -> Bucket:
        """A bucket a task this agent holds names: as input or output to read, as output
        to write. Any other is not found, whoever owns it."""
        agent = self.agents.get(agent_uid)
        for key in sorted(agent.held) if agent else ():
            data = self.tasks[key].data
            if bucket_uid in ((data.get("output_bucket"),) if output else task_buckets(data)):
                return self._bucket(bucket_uid, None)
        raise NotFound(f"no bucket {bucket_uid[:80]!r} is attached to a task this agent holds"
                       + (" as its output_bucket" if output else ""))

    @changing
    def create_bucket(self, owner: str, max_buckets: int, rm_after_task: bool, now: float) -> Bucket:
        if len(self.buckets_by_owner.get(owner, ())) >= max_buckets:
            raise TooManyRequests(f"this key already has {max_buckets} buckets "
                                  "(STORAGE_MAX_BUCKETS_PER_KEY): delete one first")
        uid = self.new_uuid()
        self._emit("bucket.created", now, scope="bucket", bucket={
            "uid": uid, "owner": owner, "createdAt": now, "rmAfterTask": rm_after_task})
        return self.buckets[uid]

    @changing
    def add_file(self, uid: str, owner: str | None, file_uid: str, name: str, size: int,
                 sha256: str, limit: int, now: float) -> BucketFile:
        """A file already on disk joins its bucket (the hub writes it first)."""
        bucket = self._bucket(uid, owner)
        check_file_name(name)
        if any(f.name == name for f in bucket.files.values()):
            raise Conflict(f"bucket {uid} already has a file named {name!r}; delete it first")
        if bucket.used + size > limit:
            raise PayloadTooLarge(f"the file ({size} bytes) does not fit: bucket {uid} holds "
                                  f"{bucket.used} of {limit} bytes (STORAGE_BUCKET_SIZE_BYTES)")
        self._emit("bucket.file_added", now, scope="bucket", uid=uid, file={
            "uid": file_uid, "name": name, "size": size, "sha256": sha256})
        return bucket.files[file_uid]

    @changing
    def delete_file(self, uid: str, owner: str | None, file_uid: str, now: float) -> BucketFile:
        found = self._bucket(uid, owner).files.get(file_uid)
        if found is None:
            raise NotFound(f"bucket {uid} has no file {file_uid[:80]!r}")
        self._emit("bucket.file_deleted", now, scope="bucket", uid=uid, fileUid=file_uid)
        return found

    @changing
    def delete_bucket(self, uid: str, owner: str | None, now: float, reason: str = "deleted") -> Bucket:
        bucket = self._bucket(uid, owner)
        self._emit("bucket.deleted", now, scope="bucket", uid=uid, reason=reason)
        return bucket

    @changing
    def delete_buckets(self, owner: str | None, now: float) -> list[Bucket]:
        """Management: every bucket of `owner` (None: of everyone)."""
        chosen = list(self.buckets.values()) if owner is None else self.owner_buckets(owner)
        for bucket in chosen:
            self._emit("bucket.deleted", now, scope="bucket", uid=bucket.uid, reason="deleted by management")
        return chosen

    @changing
    def reap_buckets(self, ttl_s: float, now: float) -> list[Bucket]:
        """Buckets past their TTL, and rm_after_task buckets whose tasks have all ended."""
        reaped = []
        for bucket in self.buckets.values():  # oldest first
            if bucket.created_at + ttl_s > now:
                break
            reaped.append((bucket, "expired"))
        for uid in sorted(self.reap_candidates):
            bucket = self.buckets.get(uid)
            self.reap_candidates.discard(uid)
            if bucket is not None and bucket.created_at + ttl_s > now and all(
                    self.tasks.get(key) is None or self.tasks[key].status in ENDED for key in bucket.tasks):
                reaped.append((bucket, "its tasks ended (rm_after_task)"))
        for bucket, reason in reaped:
            self._emit("bucket.deleted", now, scope="bucket", uid=bucket.uid, reason=reason)
        return [bucket for bucket, _ in reaped]

    def _note_bucket_users_ended(self, task: Task) -> None:
        for uid in task_buckets(task.data):
            bucket = self.buckets.get(uid)
            if bucket is not None and bucket.rm_after_task:
                self.reap_candidates.add(uid)

    # ---------------------------------------------------------------- time passing

    @changing
    def expire(self, now: float) -> None:
        """Everything that happens because time passed; the hub calls it every second."""
        for agent in self.online.expired(now):
            self._go_offline(agent)
            self._note("agent.went_offline", agent_uid=agent.uid)  # lower tiers may get its work
            self._lose_agent(agent, now, f"agent {agent.uid} went offline")
        for key, (_, lapses_at) in list(self.offers.items()):
            if lapses_at <= now:
                self._lapse_offer(key, now)
        while self.timers and self.timers[0][0] <= now:
            _, _, kind, key, anchor = heapq.heappop(self.timers)
            task = self.tasks.get(key)
            if task is not None:
                TIMERS[kind](self, task, now, anchor)

    def drop_stale_timers(self) -> int:
        """Forget timers of tasks ended or gone. A standby applies records but never runs
        `expire`, so without this its timers would pile up until it leads."""
        kept = [t for t in self.timers if (task := self.tasks.get(t[3])) is not None
                and (task.status not in ENDED or t[2] == "forget")]
        dropped = len(self.timers) - len(kept)
        if dropped:
            heapq.heapify(kept)
            self.timers = kept
        return dropped

    def _on_ready_timer(self, task: Task, now: float, anchor: Any) -> None:
        if task.status == PENDING and task.not_before is not None and task.not_before <= now:
            task.not_before = None
            self._push(task)
            self._note("task.ready", task)

    def _on_expire_timer(self, task: Task, now: float, anchor: Any) -> None:
        if task.status == PENDING and task.queued_at == anchor:
            self._drop_offer(task.key)
            waited = now - anchor
            self._emit_task("task.failed", task, now,
                            reason=f"expired: no agent took it within {waited:.0f} s")

    def _on_timeout_timer(self, task: Task, now: float, anchor: Any) -> None:
        limit = task.timeout_s
        if anchor != task.timeout_from:  # set before a requeue restarted the clock
            return
        if task.status == PENDING:
            self._drop_offer(task.key)
            self._emit_task("task.failed", task, now,
                            reason=f"timeout: not done within {plain_number(limit)} s")
        elif task.status in (ASSIGNED, RUNNING) and task.cancel_requested_at is None:
            self._emit_task("task.cancel_requested", task, now, reason="timeout")

    def _on_grace_timer(self, task: Task, now: float, anchor: Any) -> None:
        if task.status in (ASSIGNED, RUNNING) and task.cancel_requested_at == anchor:
            self._finish_cancel(task, now, f"agent {task.agent_id} did not confirm within "
                                           f"{CANCEL_GRACE_S:.0f} s")

    def _on_forget_timer(self, task: Task, now: float, anchor: Any) -> None:
        if task.status in ENDED and task.ended_at is not None and task.ended_at + URGENT_KEEP_S <= now:
            self._forget(task)

    def _forget(self, task: Task) -> None:
        self._count(task, -1)
        del self.tasks[task.key]
        self.ended.pop(task.key, None)
        if task.idempotency_key is not None:
            self.idempotent.pop((task.owner, task.idempotency_key), None)

    @changing
    def drop_retained(self, keep_s: float, keep_tasks: int, now: float) -> int:
        """Retention: ended regular tasks that ended more than `keep_s` ago, or beyond the
        newest `keep_tasks`, go (the earliest ended first, at most DROP_BATCH a call),
        through one `tasks.dropped` record so that replay drops the same ones."""
        cutoff, over, dropped = now - keep_s, len(self.ended) - keep_tasks, []
        for key in self.ended:
            if len(dropped) >= DROP_BATCH or (
                    len(dropped) >= over and self.tasks[key].ended_at >= cutoff):
                break
            dropped.append(key)
        if dropped:
            self._emit("tasks.dropped", now, tasks=[list(key) for key in dropped])
        return len(dropped)

    def adopt_memory_only(self, old: "Broker") -> None:
        """The urgent tasks of `old` (never on disk), as they were, into this broker just
        rebuilt from the disk: how the hub goes back to the durable state after a write
        failed without losing what never depended on the disk."""
        for task in old.tasks.values():
            if task.urgent:
                task.in_heap = False
                self._add_task(task)
                if task.status in ENDED:
                    self._timer(task.ended_at + URGENT_KEEP_S, "forget", task)

    def after_recovery(self, now: float) -> None:
        """Agents holding tasks get a fresh grace period: contact times are not journaled,
        and they must be able to report on those tasks after a restart."""
        for agent in self.agents.values():
            if agent.held:
                self.touch(agent.uid, now)

    # ---------------------------------------------------------------- views

    def snapshot(self) -> dict:
        return {"tasks": [t.to_record() for t in self.tasks.values() if not t.urgent],
                "agents": [a.to_record() for a in self.agents.values()],
                "keys": [k.to_record() for k in self.keys.values()],
                "buckets": [b.to_record() for b in self.buckets.values()]}

    def load_snapshot(self, snap: dict) -> None:
        for record in snap["agents"]:
            self._add_agent(record)
        for record in snap["keys"]:
            self._add_key(record)
        for record in snap.get("buckets", ()):  # before the tasks, which link to them
            self._add_bucket(record)
        for record in snap["tasks"]:
            self._add_task(Task.from_record(record))
        # The snapshot lists tasks by creation; retention wants them by end.
        self.ended = OrderedDict.fromkeys(sorted(self.ended, key=lambda k: self.tasks[k].ended_at))

    def queue_ages(self, now: float) -> dict[str, float]:
        """Seconds the oldest ready task of each capability has waited since creation."""
        ages = {}
        for (_, base), queue in self.queues.items():
            oldest = None
            for turns in queue.levels.values():
                for heap in turns.values():
                    task = self.tasks.get((heap[0][1], heap[0][0])) if heap else None
                    if task is not None and task.status == PENDING and (
                            oldest is None or task.created_at < oldest):
                        oldest = task.created_at
            if oldest is not None:
                ages[base] = max(ages.get(base, 0.0), now - oldest)
        return ages

    def stats(self, now: float) -> dict:
        by_queue: dict[str, dict[str, int]] = {"urgent": {}, "regular": {}}
        for (urgent, status), n in self.counts.items():
            if n:
                by_queue["urgent" if urgent else "regular"][status] = n
        return {"agents": {"all": len(self.agents), "online": len(self.online_agents(now))},
                "tasks": by_queue,
                "queues": {cap: n for cap, n in sorted(self.pending_by_cap.items()) if n}}

    # ---------------------------------------------------------------- apply (one per op)

    def _add_agent(self, r: dict) -> Agent:
        agent = Agent(uid=r["uid"], key=r["key"], registered_at=r["registeredAt"],
                      capabilities=r["capabilities"], tier=r["tier"], capacity=r["capacity"],
                      system_info=r["systemInfo"], last_contact=r["registeredAt"],
                      bases=frozenset(map(base_capability, r["capabilities"])),
                      draining=r.get("draining", False), tokens_after=r.get("tokensAfter", 0.0),
                      display_name=r.get("displayName"), app_version=r.get("appVersion"))
        agent.set_heartbeat(r.get("heartbeatSecs"))
        self.agents[agent.uid] = agent
        return agent

    def _add_key(self, r: dict) -> None:
        digest = key_digest(r["key"])
        if r["isPredefined"] and digest not in self.keys:
            return  # no longer in the configuration: it must stop working
        self.keys[digest] = ClientKey(r["key"], r["capabilities"], r["isPredefined"],
                                      r["created"], r["isRevoked"], r.get("maxInFlight"),
                                      r.get("maxQueuedBytes"))

    def _add_task(self, task: Task) -> None:
        """A task enters the state (submitted, or loaded from a snapshot)."""
        self.tasks[task.key] = task
        if not self.loading:
            self._count(task, +1)
        if task.idempotency_key is not None:
            self.idempotent[(task.owner, task.idempotency_key)] = task.key
        if self.buckets:  # most servers have none: the hot path pays one check
            for uid in task_buckets(task.data):
                bucket = self.buckets.get(uid)
                if bucket is not None:
                    bucket.tasks.add(task.key)
            if task.status in ENDED:
                self._note_bucket_users_ended(task)
        if task.status in ENDED and not task.urgent:
            self.ended[task.key] = None
        if task.status == PENDING:
            self._enqueue(task, task.queued_at)
            if task.max_wait_s is not None and task.attempts == 0:
                self._timer(task.created_at + task.max_wait_s, "expire", task, task.queued_at)
        elif task.status in (ASSIGNED, RUNNING) and task.agent_id in self.agents:
            self.agents[task.agent_id].held.add(task.key)
            if task.cancel_requested_at is not None:
                self._timer(task.cancel_requested_at + CANCEL_GRACE_S, "grace", task,
                            task.cancel_requested_at)
        if task.timeout_s is not None and task.status not in ENDED:
            self._timeout_timer(task)

    def _timeout_timer(self, task: Task) -> None:
        if task.timeout_from is None:
            task.timeout_from = task.created_at
        self._timer(task.timeout_from + task.timeout_s, "timeout", task, task.timeout_from)

    def _on_agent_registered(self, r: dict, now: float) -> None:
        self._add_agent(r["agent"])

    def _on_agent_updated(self, r: dict, now: float) -> None:
        agent = self.agents[r["uid"]]
        was_online = agent.uid in self.online
        if was_online:
            self._go_offline(agent)
        agent.capabilities, agent.tier, agent.capacity = r["capabilities"], r["tier"], r["capacity"]
        agent.system_info = r["systemInfo"]
        agent.set_heartbeat(r.get("heartbeatSecs"))
        # Only sent when it changes: an update without them keeps what registration said.
        agent.display_name = r.get("displayName", agent.display_name)
        agent.app_version = r.get("appVersion", agent.app_version)
        agent.bases = frozenset(map(base_capability, agent.capabilities))
        if was_online:
            self.touch(agent.uid, agent.last_contact)

    def _on_agent_drained(self, r: dict, now: float) -> None:
        agent = self.agents[r["uid"]]
        agent.draining = True
        for key in list(agent.offered):
            self._lapse_offer(key, now)

    def _on_agent_key_rotated(self, r: dict, now: float) -> None:
        agent = self.agents[r["uid"]]
        agent.key, agent.tokens_after = r["key"], r["tokensAfter"]

    def _on_agent_resumed(self, r: dict, now: float) -> None:
        self.agents[r["uid"]].draining = False

    def _on_agent_deleted(self, r: dict, now: float) -> None:
        agent = self.agents.pop(r["uid"])
        self._go_offline(agent)

    def _on_agents_reset(self, r: dict, now: float) -> None:
        for agent in list(self.agents.values()):
            self._on_agent_deleted({"uid": agent.uid}, now)

    def _on_key_updated(self, r: dict, now: float) -> None:
        self._add_key(r["key"])

    def _on_key_revoked(self, r: dict, now: float) -> None:
        self.keys[key_digest(r["key"])].is_revoked = True

    def _on_task_submitted(self, r: dict, now: float) -> None:
        t = r["task"]
        # Positional, the rest set after: matching keywords against Task's two dozen
        # parameters took a third of building it, and replay builds one per task.
        task = Task(t["cap"], t["id"], t["data"], t["owner"], t["createdAt"])
        task.queued_at = now
        task.idempotency_key, task.body_digest = t.get("idempotencyKey"), t.get("bodyDigest")
        task.size = t.get("size", -1)
        if task.run_at is not None:
            task.not_before = task.run_at
        elif task.delay_s is not None:
            task.not_before = now + task.delay_s
        task.history.append((now, "submitted"))
        self._add_task(task)

    def _on_task_assigned(self, r: dict, now: float) -> None:
        task = self.tasks[(r["cap"], r["id"])]
        self._move(task, "task.assigned")
        self._drop_offer(task.key)
        task.agent_id = task.last_agent = r["agentId"]
        task.declined = False
        task.assigned_at = now
        task.attempts += 1
        task.history.append((now, f"attempt {task.attempts}: assigned to agent {r['agentId']}"))
        self.agents[r["agentId"]].held.add(task.key)

    def _on_task_progressed(self, r: dict, now: float) -> None:
        task = self.tasks[(r["cap"], r["id"])]
        self._move(task, "task.progressed")
        if r.get("stage") is not None:
            task.stage = r["stage"]
        if r.get("log"):
            task.log = (task.log + r["log"])[-LOG_KEEP_CHARS:]

    def _on_task_completed(self, r: dict, now: float) -> None:
        task = self.tasks[(r["cap"], r["id"])]
        self._end(task, "task.completed", now, "completed")
        task.result = r["result"]

    def _on_task_failed(self, r: dict, now: float) -> None:
        task = self.tasks[(r["cap"], r["id"])]
        self._end(task, "task.failed", now, f"failed: {r['reason']}")
        if r.get("result") is not None:
            task.result = r["result"]
        elif task.result is None:
            task.result = {"error": r["reason"]}

    def _on_task_canceled(self, r: dict, now: float) -> None:
        self._end(self.tasks[(r["cap"], r["id"])], "task.canceled", now, r["reason"])

    def _on_task_cancel_requested(self, r: dict, now: float) -> None:
        task = self.tasks[(r["cap"], r["id"])]
        self._move(task, "task.cancel_requested")
        task.cancel_requested_at, task.cancel_reason = now, r["reason"]
        task.history.append((now, f"cancel requested ({r['reason']})"))
        self._timer(now + CANCEL_GRACE_S, "grace", task, now)

    def _back_to_pending(self, task: Task, op: str) -> None:
        self._move(task, op)
        agent = self.agents.get(task.agent_id or "")
        if agent:
            agent.held.discard(task.key)
        task.agent_id = task.stage = None  # the next attempt reports its own stages

    def _on_task_retried(self, r: dict, now: float) -> None:
        task = self.tasks[(r["cap"], r["id"])]
        self._back_to_pending(task, "task.retried")
        task.declined = r.get("declined", False)
        task.not_before = r.get("notBefore")
        after = f"; runs again from {iso(task.not_before)}" if task.not_before else ""
        task.history.append((now, r["reason"] + after))
        self._enqueue(task, now)

    def _on_task_released(self, r: dict, now: float) -> None:
        """Its agent no longer holds it and it never started: it never ran, so it goes
        back at once and the attempt does not count."""
        task = self.tasks[(r["cap"], r["id"])]
        self._back_to_pending(task, "task.released")
        task.attempts -= 1
        task.declined = False
        task.history.append((now, r["reason"]))
        self._enqueue(task, now)

    def _on_task_requeued(self, r: dict, now: float) -> None:
        if "reason" in r:  # a journal from before the rename: `task.requeued` was a retry
            return self._on_task_retried(r, now)
        task = self.tasks[(r["cap"], r["id"])]
        self._move(task, "task.requeued")
        self.ended.pop(task.key, None)
        task.agent_id = task.ended_at = task.result = None
        task.cancel_requested_at = task.cancel_reason = None
        task.attempts = 0
        task.history.append((now, "requeued by management"))
        self._enqueue(task, now)
        if task.timeout_s is not None:  # a fresh allowance, or a timed-out task fails again at once
            task.timeout_from = now
            self._timeout_timer(task)

    def _on_tasks_reset(self, r: dict, now: float) -> None:
        self.tasks.clear()
        self.queues.clear()
        self.fronts.clear()
        self.front_heaps.clear()
        self.offers.clear()
        self.timers.clear()
        self.counts.clear()
        self.pending_by_cap.clear()
        self.in_flight_by_owner.clear()
        self.bytes_by_owner.clear()
        self.idempotent.clear()
        self.ended.clear()
        for agent in self.agents.values():
            agent.held.clear()
            agent.offered.clear()
        for bucket in self.buckets.values():
            bucket.tasks.clear()

    def _on_tasks_dropped(self, r: dict, now: float) -> None:
        """Retention forgets ended tasks: no move of the state machine (ended is final),
        and all of them checked before any goes."""
        tasks = [self.tasks[(cap, task_id)] for cap, task_id in r["tasks"]]
        if any(task.status not in ENDED for task in tasks):
            raise Conflict("only ended tasks can be dropped")
        for task in tasks:
            self._forget(task)

    def _add_bucket(self, r: dict) -> None:
        bucket = Bucket(r["uid"], r["owner"], r["createdAt"], r.get("rmAfterTask", False))
        for f in r.get("files", ()):
            bucket.files[f["uid"]] = BucketFile(f["uid"], f["name"], f["size"], f["sha256"], f["addedAt"])
            bucket.used += f["size"]
        self.buckets[bucket.uid] = bucket
        self.buckets_by_owner.setdefault(bucket.owner, {})[bucket.uid] = None

    def _on_bucket_created(self, r: dict, now: float) -> None:
        self._add_bucket(r["bucket"])

    def _on_bucket_file_added(self, r: dict, now: float) -> None:
        f, bucket = r["file"], self.buckets[r["uid"]]
        bucket.files[f["uid"]] = BucketFile(f["uid"], f["name"], f["size"], f["sha256"], now)
        bucket.used += f["size"]

    def _on_bucket_file_deleted(self, r: dict, now: float) -> None:
        bucket = self.buckets[r["uid"]]
        bucket.used -= bucket.files.pop(r["fileUid"]).size

    def _on_bucket_deleted(self, r: dict, now: float) -> None:
        bucket = self.buckets.pop(r["uid"])
        owned = self.buckets_by_owner[bucket.owner]
        del owned[bucket.uid]
        if not owned:
            del self.buckets_by_owner[bucket.owner]
        self.reap_candidates.discard(bucket.uid)


def key_digest(key: str) -> bytes:
    """Client keys are looked up by digest so the lookup's timing says nothing of the key."""
    return hashlib.sha256(key.encode()).digest()


APPLY: dict[str, Callable[[Broker, dict, float], None]] = {
    "agent.registered": Broker._on_agent_registered,
    "agent.updated": Broker._on_agent_updated,
    "agent.drained": Broker._on_agent_drained,
    "agent.resumed": Broker._on_agent_resumed,
    "agent.key_rotated": Broker._on_agent_key_rotated,
    "agent.deleted": Broker._on_agent_deleted,
    "agents.reset": Broker._on_agents_reset,
    "key.updated": Broker._on_key_updated,
    "key.revoked": Broker._on_key_revoked,
    "task.submitted": Broker._on_task_submitted,
    "task.assigned": Broker._on_task_assigned,
    "task.progressed": Broker._on_task_progressed,
    "task.completed": Broker._on_task_completed,
    "task.failed": Broker._on_task_failed,
    "task.canceled": Broker._on_task_canceled,
    "task.cancel_requested": Broker._on_task_cancel_requested,
    "task.retried": Broker._on_task_retried,
    "task.released": Broker._on_task_released,
    "task.requeued": Broker._on_task_requeued,
    "task.revived": Broker._on_task_requeued,  # a management requeue, in journals before the rename
    "tasks.reset": Broker._on_tasks_reset,
    "tasks.dropped": Broker._on_tasks_dropped,
    "bucket.created": Broker._on_bucket_created,
    "bucket.file_added": Broker._on_bucket_file_added,
    "bucket.file_deleted": Broker._on_bucket_file_deleted,
    "bucket.deleted": Broker._on_bucket_deleted,
}

TIMERS: dict[str, Callable[[Broker, Task, float, Any], None]] = {
    "ready": Broker._on_ready_timer,
    "expire": Broker._on_expire_timer,
    "timeout": Broker._on_timeout_timer,
    "grace": Broker._on_grace_timer,
    "forget": Broker._on_forget_timer,
}


# ============================================================================ journal
#
# journal.jsonl holds one record per line, appended in order, for example:
#   {"seq":7,"op":"task.assigned","at":"2026-11-28T10:00:00.123Z","cap":"debug.echo",
#    "id":"01JD…","agentId":"01JD…","crc":1234567890}
# `crc` is the CRC32 of the same record written without it, so a flipped bit shows.
# snapshot.json is the whole durable state as of its `seq`; replay applies only the
# journal records above that, which makes every crash point of a compaction safe:
#   1. snapshot.json.tmp written and fsynced   -> old snapshot + whole journal
#   2. renamed over snapshot.json, folder synced -> new snapshot, journal records <= seq skipped
#   3. journal tail (records after seq) copied to journal.jsonl.tmp, fsynced, renamed over
#      journal.jsonl, folder synced             -> new snapshot + short journal
# Disk faults: a batch that cannot be written for want of room is refused whole (507
# storage_full), cut off the file, and the hub rebuilds memory from the disk; writes stay
# refused until a once-a-second probe finds room. A journal no longer at its path (folder
# removed, file replaced) refuses writes for good (507 storage_lost). A failed fdatasync
# stops the server: what reached the disk is then unknown. A compaction that fails
# leaves the old snapshot and journal valid and is tried again later.

JOURNAL_FILE = "journal.jsonl"
SNAPSHOT_FILE = "snapshot.json"
_CRC_MARK = b',"crc":'


class JournalCorrupt(Exception):
    """The data folder cannot be trusted; the message names the file, line and remedy."""


def encode_record(record: dict) -> bytes:
    body = orjson.dumps(record)
    return b"%s%s%d}\n" % (body[:-1], _CRC_MARK, zlib.crc32(body))


def encode_line(seq: int, encoded: bytes) -> bytes:
    """encode_record({"seq": seq, **record}) for a record already encoded."""
    body = b'{"seq":%d,%s' % (seq, encoded[1:])
    return b"%s%s%d}\n" % (body[:-1], _CRC_MARK, zlib.crc32(body))


def decode_record(line: bytes) -> dict | None:
    """The record, or None when the line is not one we wrote (bad JSON or checksum)."""
    try:
        record = orjson.loads(line)  # the line with its crc is itself valid JSON
        crc = record.pop("crc")
    except (ValueError, KeyError, AttributeError, TypeError):  # not JSON, an object, or ours
        return None
    # CRC32 of the record without its crc field: the bytes before the mark, then "}".
    if crc != zlib.crc32(b"}", zlib.crc32(line[:line.rfind(_CRC_MARK)])) \
            or type(record.get("seq")) is not int:
        return None
    return record


def fatal(message: str, *args: Any) -> None:
    """Never keep serving on a journal that may have lost acknowledged writes (a failed
    fdatasync leaves unknown what reached the disk: PostgreSQL stops too)."""
    log.critical(message + "; stopping now. A restart resumes from what is on disk; "
                 "check the device (dmesg) first", *args)
    logging.shutdown()
    os._exit(70)


# A write that fails for want of room is refused and undone; the server goes on.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
PROBE_BYTES = 1 << 16       # room the once-a-second probe asks for before writes resume
COMPACT_RETRY_S = 30.0      # a compaction that failed is tried again after this long


# Loop turns a flush may wait for work in progress to join it (see _flush_when_idle).
FLUSH_DEFER_TURNS = 16


class Journal:
    leader, leader_url = True, None  # the one server of its data folder (see the store interface)

    def __init__(self, folder: Path, fsync: str = "always"):
        self.folder = folder
        self.path = folder / JOURNAL_FILE
        self.snapshot_path = folder / SNAPSHOT_FILE
        self.fsync = fsync
        self.seq = 0                      # last sequence number handed out
        self.snapshot_seq = 0
        self.fd = -1
        self.file_id = (0, 0)             # (device, inode) of the file `fd` appends to
        self.size = 0                     # bytes written to the file
        self.end_offset = 0               # bytes written + bytes waiting in the buffer
        self.records_since_snapshot = 0
        self.last_compaction_at: float | None = None
        self.buffer: list[bytes] = []
        self.waiters: list[asyncio.Future] = []
        self.flush_scheduled = False
        self.rotation: asyncio.Task | None = None  # a compaction switching files: no writes
        self.unsynced = False
        self.fsync_seconds = Histogram()
        # Writes refused, and why (StorageFull until a probe finds room, StorageLost for good).
        self.fault: OffloadError | None = None
        self.on_fault: Callable[[], None] | None = None  # called once per fault found: the hub reacts
        self.compaction_pid = 0     # the forked snapshot writer, while it runs
        self.compact_after = 0.0    # no compaction before this (one failed)
        self.closing = False

    # ---------------------------------------------------------------- recovery

    def recover(self, broker: Broker, repair: bool = False) -> int:
        """Load the snapshot, replay the journal into `broker`; returns records replayed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob("*.tmp"):
            log.warning("removing %s left by an interrupted write", leftover)
            leftover.unlink()
        replayed = self._load(broker, repair)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        opened = os.fstat(self.fd)
        self.size = self.end_offset = opened.st_size
        self.file_id = (opened.st_dev, opened.st_ino)
        fsync_folder(self.folder)
        return replayed

    def reload(self, broker: Broker) -> None:
        """The state on disk again, into a fresh `broker`: after a write was refused."""
        self.seq = self.snapshot_seq = self.records_since_snapshot = 0
        self._load(broker, repair=False)

    def _load(self, broker: Broker, repair: bool) -> int:
        broker.begin_loading()
        if self.snapshot_path.exists():
            try:
                snap = orjson.loads(self.snapshot_path.read_bytes())
                broker.load_snapshot(snap)
            except (ValueError, KeyError, TypeError) as err:
                raise JournalCorrupt(
                    f"{self.snapshot_path}: unreadable snapshot ({err}). Remedy: restore it from "
                    "a backup; the server will not guess which tasks existed") from err
            self.seq = self.snapshot_seq = snap["seq"]
            self.last_compaction_at = parse_iso(snap["at"])
        replayed = self._replay(broker, repair)
        broker.end_loading()
        return replayed

    def _replay(self, broker: Broker, repair: bool) -> int:
        if not self.path.exists():
            return 0
        seq, replayed, lineno, problem, torn = self.seq, 0, 0, None, False
        at, now = None, 0.0  # the last record's time: records come in bursts of one time
        # Broker.apply spelled out: a call less for each of up to millions of records.
        handlers = APPLY
        # Line by line, not the whole file split at once: a million lines alive together
        # cost more in fresh memory than reading them in small pieces does.
        with open(self.path, "rb", buffering=1 << 16) as f:
            for line in f:
                lineno += 1
                if line[-1] != 10:  # no newline: the last line, cut short by a crash
                    torn = True
                    break
                record = decode_record(line)
                if record is None:
                    problem = "bad checksum or JSON"
                    break
                if record["seq"] > seq:  # else the snapshot holds it already
                    try:
                        if record["at"] != at:
                            at, now = record["at"], parse_iso(record["at"])
                        handlers[record["op"]](broker, record, now)
                    except (KeyError, TypeError, ValueError, OffloadError) as err:
                        problem = f"record does not apply to the state before it ({err!r})"
                        break
                    seq = record["seq"]
                    replayed += 1
            self.seq = seq
            self.records_since_snapshot += replayed
            if problem and not repair:
                raise JournalCorrupt(
                    f"{self.path}:{lineno}: {problem}. Remedy: restart with --repair to move "
                    f"line {lineno} and everything after it into a side file, then inspect it")
            if problem or torn:
                pos = f.tell() - len(line)  # where that line starts
                f.seek(pos)
                rest = f.read()
        if problem:
            side = self.folder / (f"journal-rejected-{time.strftime('%Y%m%dT%H%M%S')}"
                                  f"-line{lineno}.jsonl")
            # The rejected bytes reach the disk before the journal lets go of them.
            write_synced(side, rest)
            os.truncate(self.path, pos)
            log.warning("JOURNAL %s:%d: %s; moved %d bytes from there on into %s",
                        self.path, lineno, problem, len(rest), side)
        elif torn:  # a crash mid-write: this record was never acknowledged
            log.warning("JOURNAL %s: dropping a torn last record of %d bytes at line %d "
                        "(a crash interrupted its write)", self.path, len(rest), lineno)
            os.truncate(self.path, pos)
        return replayed

    # ---------------------------------------------------------------- appending

    async def append(self, records: list[bytes]) -> None:
        """Queue encoded records for the next flush; with fsync `always`, return once
        they are on disk."""
        waiter = self.enqueue(records)
        if waiter is not None:
            await waiter

    def enqueue(self, records: list[bytes]) -> asyncio.Future | None:
        """Queue records (each encoded by the core before it applied it) for the next
        flush, in order; with fsync `always`, a future that is done once they are on disk."""
        for record in records:
            self.seq += 1
            line = encode_line(self.seq, record)
            self.buffer.append(line)
            self.end_offset += len(line)
        self.records_since_snapshot += len(records)
        waiter = None
        if self.fsync == "always":
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_when_idle, 0)
        return waiter

    def _flush_when_idle(self, turns: int) -> None:
        """Flush once the loop has nothing else ready to run, or after FLUSH_DEFER_TURNS
        turns: what runs meanwhile (an agent's long poll this change woke, taking the task;
        a request that arrived during the last fdatasync) joins the same write, and a lone
        change waits for nothing. (`_ready` is asyncio's own loop's queue of callbacks due
        now; a loop without it flushes after one turn.)"""
        loop = asyncio.get_running_loop()
        if turns < 1 or turns < FLUSH_DEFER_TURNS and getattr(loop, "_ready", None):
            loop.call_soon(self._flush_when_idle, turns + 1)
        else:
            self.flush()

    def flush(self) -> None:
        """Group commit: one write, and with fsync `always` one fdatasync, for whatever was
        appended since the last flush. Like Redis' `appendfsync always`, this runs
        on the loop itself: a hand-off to a thread and back cost more than the fdatasync
        (about 0.2 ms on an SSD), and requests that arrive meanwhile join the next batch.
        A batch that cannot be written is refused whole: its waiters get the reason, the
        file is cut back to its last record, and `on_fault` takes memory back to the disk."""
        self.flush_scheduled = False
        if not self.buffer or self.rotation is not None:
            return  # the rotation flushes when it is done
        data, waiters = b"".join(self.buffer), self.waiters
        self.buffer, self.waiters = [], []
        self._check_identity()
        if self.fault is None:
            try:
                write_all(self.fd, data)
            except OSError as err:
                if err.errno not in FULL_ERRNOS:
                    fatal("journal write to %s failed: %s", self.path, err)
                self._refuse_full(err)
        if self.fault is not None:
            self.end_offset = self.size
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(self.fault)
            return
        if self.fsync == "always":
            started = time.perf_counter()
            try:
                os.fdatasync(self.fd)
            except OSError as err:
                fatal("journal fsync of %s failed: %s", self.path, err)
            self.fsync_seconds.observe(time.perf_counter() - started)
        else:
            self.unsynced = True
        self.size += len(data)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ---------------------------------------------------------------- disk faults

    def check_writable(self) -> None:
        """Raise why writes are refused, if they are: before a change touches memory."""
        self._check_identity()
        if self.fault is not None:
            raise self.fault

    def _refuse_full(self, err: OSError) -> None:
        """Cut off what part of the batch got written (on disk before anything else
        happens: a crash must not bring back a refused record) and refuse writes."""
        try:
            os.ftruncate(self.fd, self.size)
            os.fdatasync(self.fd)
        except OSError as again:
            fatal("journal write to %s failed (%s) and cutting it back failed too: %s",
                  self.path, err.strerror, again)
        self.fault = StorageFull(
            f"the journal {self.path} cannot grow ({err.strerror}): writes are refused until "
            "there is room again; reads go on")
        log.error("JOURNAL %s: %s; refusing writes, back to the state on disk", self.path, err.strerror)
        if self.on_fault is not None:
            self.on_fault()

    def _check_identity(self) -> None:
        """Is the file we append to still the journal at our path? Someone removing the
        data folder or replacing the journal would otherwise make every later write (and
        its acknowledgement) vanish at the next restart."""
        if self.fault is not None or self.fd < 0 or self.rotation is not None:
            return  # a rotation switches files: checked again once it is done
        try:  # one stat: while our descriptor is open, no other file can get its inode
            found = os.stat(self.path)
            same = (found.st_dev, found.st_ino) == self.file_id
        except OSError:
            same = False
        if not same:
            self.fault = StorageLost(
                f"{self.path} is no longer the journal this server writes (the data folder "
                "was removed or the journal replaced while it ran): writes are refused so that "
                "nothing is acknowledged that a restart would lose; reads go on. Remedy: put "
                "the data folder back, or the state saved next to it (the log names the file), "
                "and restart the server")
            log.critical("JOURNAL %s", self.fault.message)
            if self.on_fault is not None:
                self.on_fault()

    def probe(self) -> bool:
        """Once a second while the disk is full: reserve PROBE_BYTES past the journal's
        end and give them back. True (and writes accepted again) when that worked."""
        if not isinstance(self.fault, StorageFull):
            return False
        try:
            try:
                os.posix_fallocate(self.fd, self.size, PROBE_BYTES)
            except OSError as err:
                if err.errno in FULL_ERRNOS:
                    return False
                # A file system without fallocate: a scratch file shows whether there is room.
                probe = self.folder / "space-probe.tmp"
                try:
                    write_synced(probe, bytes(PROBE_BYTES))
                finally:
                    probe.unlink(missing_ok=True)
        except OSError as err:
            if err.errno not in FULL_ERRNOS:
                log.error("JOURNAL probing the room left for %s failed: %s", self.path, err)
            return False
        finally:
            os.ftruncate(self.fd, self.size)
        self.fault = None
        self._check_identity()
        if self.fault is None:
            log.warning("JOURNAL %s: there is room again; writes are accepted", self.path)
        return self.fault is None

    def sync(self) -> None:
        """fsync `everysec`: called once a second off the event loop."""
        if self.unsynced and self.fault is None:
            self.unsynced = False
            try:
                os.fdatasync(self.fd)
            except OSError as err:
                fatal("journal fsync of %s failed: %s", self.path, err)

    # ---------------------------------------------------------------- compaction

    def step_done(self, step: str) -> None:
        """Called after each step of a compaction (in the forked writer for the snapshot
        steps): the crash tests run the server with this replaced by a `kill -9` there."""

    async def compact(self, snapshot: Callable[[], dict], now: float) -> bool:
        """Write the state `snapshot()` returns and start a fresh journal. Like Redis'
        BGSAVE, a forked child serializes and writes it: the child sees the state frozen
        at this instant, while the server goes on answering instead of stalling.
        A compaction that fails (a full disk) leaves the old snapshot and journal as they
        were and is tried again COMPACT_RETRY_S later; False when it did not happen."""
        if self.fault is not None or self.closing or now < self.compact_after:
            return False
        # Only what is written goes into the snapshot: a batch refused after the fork
        # must not come back from it.
        self.flush()
        if self.fault is not None:
            return False
        loop = asyncio.get_running_loop()
        seq, cut = self.seq, self.end_offset

        def serialized() -> bytes:
            return orjson.dumps({"seq": seq, "at": iso(now), **snapshot()})

        if not hasattr(os, "fork"):
            try:
                await loop.run_in_executor(None, self._write_snapshot, serialized())
            except OSError as err:
                return self._compaction_failed(now, f"writing {self.snapshot_path}: {err.strerror}")
        else:
            pid = os.fork()
            if pid == 0:  # the child: write, then leave without running any cleanup
                code = 1
                try:
                    self._write_snapshot(serialized())
                    code = 0
                except OSError as err:  # the errno, for the parent's log line
                    code = err.errno if err.errno and 1 < err.errno < 99 else 1
                finally:
                    os._exit(code)
            self.compaction_pid = pid
            try:
                _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
            finally:
                self.compaction_pid = 0
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                if self.closing:  # abandon_compaction() stopped it
                    return False
                reason = os.strerror(code) if 1 < code < 99 else f"the writer exited with {code}"
                return self._compaction_failed(now, f"writing {self.snapshot_path}: {reason}")
        self.flush()  # records up to now go into the old file, and so into the tail copied
        self.rotation = loop.create_task(self._rotation(cut))
        # Shielded: a shutdown that cancels the compaction must not stop the switch of files
        # halfway; close() waits for it.
        rotated = await asyncio.shield(self.rotation)
        self.snapshot_seq, self.last_compaction_at = seq, now  # the snapshot is in place
        self.records_since_snapshot = self.seq - seq
        if not rotated:
            return self._compaction_failed(now, f"cutting {self.path} (the snapshot is written)")
        return True

    def _compaction_failed(self, now: float, what: str) -> bool:
        self.compact_after = now + COMPACT_RETRY_S
        log.error("JOURNAL compaction failed %s; the snapshot and journal on disk stay valid, "
                  "trying again in %.0f s", what, COMPACT_RETRY_S)
        return False

    def abandon_compaction(self) -> None:
        """Shutdown: stop a snapshot writer rather than wait for it. What it leaves is a
        temporary file, removed at the next start; the old snapshot stays valid."""
        self.closing = True
        if self.compaction_pid:
            try:
                os.kill(self.compaction_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _write_snapshot(self, data: bytes) -> None:
        tmp = self.snapshot_path.with_name(SNAPSHOT_FILE + ".tmp")
        try:
            write_synced(tmp, data)
        except OSError:
            tmp.unlink(missing_ok=True)  # give the room back
            raise
        self.step_done("snapshot-written")
        os.replace(tmp, self.snapshot_path)
        fsync_folder(self.folder)
        self.step_done("snapshot-renamed")

    async def _rotation(self, cut: int) -> bool:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._rotate, cut)
            rotated = True
        except OSError as err:  # before the switch of files: the old journal is intact
            log.error("JOURNAL cutting %s failed: %s", self.path, err.strerror)
            rotated = False
        else:
            self.end_offset -= cut
        finally:
            self.rotation = None
        self.flush()
        return rotated

    def _rotate(self, cut: int) -> None:
        """Keep only the records after the snapshot: copy the journal from `cut` on."""
        with open(self.path, "rb") as f:
            f.seek(cut)
            tail = f.read()
        tmp = self.path.with_name(JOURNAL_FILE + ".tmp")
        try:
            write_synced(tmp, tail)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.step_done("journal-written")
        os.replace(tmp, self.path)
        try:  # past the rename: the old file is gone, so a failure here cannot be undone
            fsync_folder(self.folder)
            self.step_done("journal-renamed")
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            opened = os.fstat(self.fd)
            self.file_id = (opened.st_dev, opened.st_ino)
        except OSError as err:
            fatal("journal %s was switched to its cut copy, but then: %s", self.path, err)
        self.size = len(tail)

    async def close(self) -> None:
        self.closing, self.on_fault = True, None
        if self.rotation is not None:
            await self.rotation
        self.flush()
        if self.fd >= 0:
            if self.fsync != "no":
                os.fdatasync(self.fd)
            os.close(self.fd)
            self.fd = -1

    def stats(self) -> dict:
        return {"path": str(self.path), "bytes": self.size,
                "recordsSinceSnapshot": self.records_since_snapshot,
                "lastCompactionAt": iso(self.last_compaction_at), "fsync": self.fsync}


# ============================================================================ store (PostgreSQL)
#
# The store is what the hub writes records to and recovers them from. The embedded
# Journal above and PostgresStore below both offer what the hub uses of it:
#   seq, size, fault, on_fault, fsync, fsync_seconds, leader, leader_url   attributes
#   enqueue(lines) -> future | None            group commit, in order; the future is done
#                                              once the batch is durable
#   check_writable(), probe(), sync()          disk faults: writes refused while full
#   compact(snapshot, now) -> bool, abandon_compaction(), close(), stats()
# Recovery differs in where it runs, not in what it does: Journal.recover(broker) before
# the event loop starts, PostgresStore.load(broker) in it; both hand each record to the
# broker's APPLY handlers, the ones the live broker runs, so the state is the same.
#
# In PostgreSQL (in the schema the URL's search_path selects, `?search_path=name`):
#   offloadmq_meta(name text PRIMARY KEY, value text)       schema_version, secrets, leader
#   offloadmq_records(seq bigint PRIMARY KEY, record bytea)  the core's encoded records
#   offloadmq_snapshots(seq bigint PRIMARY KEY, at timestamptz, state bytea)
# A batch (what a turn of the loop queued) is one INSERT plus a NOTIFY: one transaction,
# and the clients are answered after its COMMIT. A compaction inserts a snapshot as of
# `seq` and deletes the records and snapshots below it, in one transaction that comes
# after the batches holding those records.
#
# Leadership: every server on the schema tries pg_try_advisory_lock on the one
# connection it reads and writes through. The holder leads: it writes and serves. The
# others are standbys: they LISTEN for the leader's NOTIFY and apply the new records
# (and catch up by seq at each lock attempt), so their state is warm when they take
# over, and answer the API with 503 not_leader. The lock belongs to the session: when the
# leader's session ends (its process died and its socket closed, or keepalives found the
# network cut) PostgreSQL releases it, and the next standby to try takes it, applies the
# records left and serves. A leader that lost its session cannot write (the engine fences
# it) and stops: a restart makes it a standby. A leader whose session stays open but
# silent (its process frozen, its loop stuck, the network cut before keepalives tell)
# would keep the lock for good: a leader asks its session something at least every
# PG_ALIVE_S, so a standby that finds the lock holder's session idle for longer than
# PG_LEADER_SILENT_S ends that session (pg_terminate_backend, the engine again) and leads.

PG_SCHEMA_VERSION = 1
PG_LOCK_CLASS = 0x0FF10AD        # advisory lock (PG_LOCK_CLASS, hashtext(schema)): one leader
PG_SCHEMA_LOCK_CLASS = 0x0FF10AE # held while a server creates or checks the tables
PG_LOCK_ATTEMPT_S = 0.25         # a standby tries the lock (and catches up) this often
STANDBY_TIMER_SWEEP_S = 60.0      # and forgets the timers of ended tasks this often
PG_CONNECT_TIMEOUT_S = 5.0
PG_COMMAND_TIMEOUT_S = 10.0      # a write or check that takes longer: the session is gone
PG_ALIVE_S = 1.0                 # an idle leader checks its session this often
PG_LEADER_SILENT_S = 3.5         # a lock holder's session idle this long: its leader is gone
# A leader whose session last answered longer ago than this (it was frozen, its loop
# stuck) may be replaced any moment: it answers nothing until the session answers again,
# so a thawed leader never hands out what it held in memory after a standby took over.
PG_LEADER_UNSURE_S = 2.5
PG_DISK_FULL = "53100"           # SQLSTATE disk_full: a batch refused, the session intact
PG_FOLLOW_BATCH = 5000           # records a standby applies per query
PG_SNAPSHOT_TIMEOUT_S = 300.0    # reading or writing a whole state may take this long
# PostgreSQL probes an idle client after 5 s, then every 2 s, 3 times: a leader cut off by
# the network loses its session (and lock) within about 11 s, not the system's 2 hours.
PG_SERVER_SETTINGS = {"application_name": "offloadmq", "tcp_keepalives_idle": "5",
                      "tcp_keepalives_interval": "2", "tcp_keepalives_count": "3"}
PG_TABLES = """
CREATE TABLE IF NOT EXISTS offloadmq_records (seq bigint PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE IF NOT EXISTS offloadmq_snapshots (
    seq bigint PRIMARY KEY, at timestamptz NOT NULL, state bytea NOT NULL);
"""


class StoreUnusable(Exception):
    """The store cannot be used; the message is one line saying why and what to do."""


def describe_store(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    except ValueError:
        return "the --store URL"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{where}{parts.path}"


def load_asyncpg() -> Any:
    """asyncpg, imported only by a server given a postgresql:// store."""
    try:
        import asyncpg
    except ImportError:
        raise StoreUnusable("--store postgresql://... needs asyncpg. Remedy: "
                            "pip install 'offloadmq[postgres]'") from None
    return asyncpg


def store_lost(message: str, *args: Any) -> None:
    """The session is gone or a write failed: what the last COMMIT did is unknown here, and
    another server may lead by now. Stop; a restart comes back as a standby."""
    log.critical("STORE " + message + "; stopping now (a restart rejoins as a standby)", *args)
    logging.shutdown()
    os._exit(70)


def read_to_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


async def serialized_by_child(snapshot: Callable[[], dict]) -> bytes | None:
    """orjson.dumps(snapshot()) done by a forked child and read back through a pipe (None
    when the child failed); where there is no fork, on the loop."""
    if not hasattr(os, "fork"):
        return orjson.dumps(snapshot())
    loop = asyncio.get_running_loop()
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running any cleanup
        code = 1
        try:
            os.close(readable)
            write_all(writable, orjson.dumps(snapshot()))
            code = 0
        finally:
            os._exit(code)
    os.close(writable)
    reading = loop.run_in_executor(None, read_to_end, readable)
    reading.add_done_callback(lambda _: os.close(readable))  # not while the thread reads it
    try:
        data = await asyncio.shield(reading)
    except asyncio.CancelledError:  # shutdown: the child goes, so the read ends too
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
    return data if os.waitstatus_to_exitcode(status) == 0 else None


class PostgresStore:
    fsync = "postgresql"  # durability is the database's (synchronous_commit)

    def __init__(self, url: str, advertise_url: str = ""):
        self.url = url
        self.advertise_url = advertise_url
        self.conn: Any = None
        self.using: asyncio.Lock | None = None  # one query at a time on the connection
        self.lock_id = 0                 # hashtext(current_schema())
        self.channel = ""
        self.leader = False
        self.leader_url: str | None = None
        self.seq = 0                     # last sequence number handed out (or applied)
        self.snapshot_seq = 0
        self.size = 0                    # bytes of records since the snapshot
        self.records_since_snapshot = 0
        self.last_compaction_at: float | None = None
        # StorageFull while the database has no room: reads go on, writes are refused. Any
        # other failed write stops the server (store_lost).
        self.fault: OffloadError | None = None
        self.on_fault: Callable[[], None] | None = None  # the journal's; unused here
        self.on_full: Callable[[], Awaitable[None]] | None = None  # the hub reloads memory
        self.probing: asyncio.Task | None = None
        self.fsync_seconds = Histogram()  # COMMIT latency
        self.seqs: list[int] = []        # queued for the next batch
        self.lines: list[bytes] = []
        self.waiters: list[asyncio.Future] = []
        self.writer: asyncio.Task | None = None
        self.alive: asyncio.Task | None = None
        self.heard: asyncio.Event | None = None  # the leader notified new records
        self.on_notify = lambda *_: self.heard.set()
        self.last_used = 0.0
        self.compact_after = 0.0
        self.closing = False

    # ---------------------------------------------------------------- opening

    async def open(self) -> None:
        """Connect, and create the tables (or check that this server can use them)."""
        if self.conn is not None:
            return
        asyncpg = load_asyncpg()
        where = describe_store(self.url)
        try:
            self.conn = await asyncpg.connect(self.url, timeout=PG_CONNECT_TIMEOUT_S,
                                              command_timeout=PG_COMMAND_TIMEOUT_S,
                                              server_settings=PG_SERVER_SETTINGS)
        except Exception as err:  # refused, unknown host, bad password or database, bad URL...
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StoreUnusable(f"cannot connect to {where}: {text}. Remedy: check the --store "
                                "URL and that PostgreSQL runs there and lets this user in") from None
        # This end probes the session too: a leader cut off by the network finds out.
        sock = self.conn._transport.get_extra_info("socket") if self.conn._transport else None
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        self.using = asyncio.Lock()
        self.heard = asyncio.Event()
        try:
            schema, self.lock_id = await self.conn.fetchrow(
                "SELECT current_schema(), hashtext(coalesce(current_schema(), ''))")
            if schema is None:
                raise StoreUnusable(f"{where}: no schema of the search_path exists. Remedy: "
                                    "create it, or name one in the URL (?search_path=name)")
            async with self.conn.transaction():
                # Two servers starting at once: one creates, the other then finds the tables.
                await self.conn.execute("SELECT pg_advisory_xact_lock($1, $2)", PG_SCHEMA_LOCK_CLASS,
                                        self.lock_id)
                await self.conn.execute("CREATE TABLE IF NOT EXISTS offloadmq_meta "
                                        "(name text PRIMARY KEY, value text NOT NULL)")
                version = await self.conn.fetchval(
                    "SELECT value FROM offloadmq_meta WHERE name = 'schema_version'")
                if version is not None and not (version.isdigit() and int(version) <= PG_SCHEMA_VERSION):
                    raise StoreUnusable(
                        f"{where} (schema {schema}) was written by a newer OffloadMQ (schema version "
                        f"{version}; this server knows {PG_SCHEMA_VERSION}). Remedy: run the newer "
                        "OffloadMQ, or point --store at another database or schema")
                await self.conn.execute(PG_TABLES)
                await self.conn.execute("INSERT INTO offloadmq_meta VALUES ('schema_version', $1) "
                                        "ON CONFLICT (name) DO NOTHING", str(PG_SCHEMA_VERSION))
        except StoreUnusable:
            await self.conn.close()
            raise
        except Exception as err:  # permission denied, read-only database...
            await self.conn.close()
            raise StoreUnusable(f"{where}: {str(err).splitlines()[0]}. Remedy: give this user "
                                "the right to create tables in the schema") from None
        self.channel = f"offloadmq_{self.lock_id & 0xFFFFFFFF:x}"
        await self.conn.add_listener(self.channel, self.on_notify)
        self.conn.add_termination_listener(lambda *_: self.closing or store_lost(
            "the connection to %s ended", describe_store(self.url)))

    async def load_secrets(self, settings: dict[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
        """As load_secrets, but kept in the database: the first server creates them, and
        every server of the database then shares them. Settings given at start win."""
        fresh = {name: new_secret_value(name) for name in SECRET_NAMES}
        async with self.conn.transaction():
            await self.conn.execute("INSERT INTO offloadmq_meta VALUES ('secrets', $1) "
                                    "ON CONFLICT (name) DO NOTHING", orjson.dumps(fresh).decode())
            stored = orjson.loads(await self.conn.fetchval(
                "SELECT value FROM offloadmq_meta WHERE name = 'secrets'"))
        generated = []
        for name in SECRET_NAMES:
            if not settings.get(name):
                settings[name] = stored[name]
                if stored[name] == fresh[name]:
                    generated.append(name)
        return settings, tuple(generated)

    async def load(self, broker: Broker) -> int:
        """The latest snapshot and the records after it, into `broker` (as at a restart);
        returns the records applied."""
        self.seq = self.snapshot_seq = self.size = self.records_since_snapshot = 0
        broker.begin_loading()
        async with self.using, self.conn.transaction(isolation="repeatable_read", readonly=True):
            row = await self.conn.fetchrow("SELECT seq, extract(epoch FROM at)::float8, state "
                                           "FROM offloadmq_snapshots ORDER BY seq DESC LIMIT 1",
                                           timeout=PG_SNAPSHOT_TIMEOUT_S)
            if row is not None:
                try:
                    broker.load_snapshot(orjson.loads(row[2]))
                except (ValueError, KeyError, TypeError) as err:
                    raise StoreUnusable(f"{describe_store(self.url)}: the snapshot at seq {row[0]} is "
                                        f"unreadable ({err}). Remedy: restore the database from a "
                                        "backup") from None
                self.seq = self.snapshot_seq = row[0]
                self.last_compaction_at = row[1]
            applied = await self._apply_after(broker)
        broker.end_loading()
        return applied

    async def _apply_after(self, broker: Broker) -> int | None:
        """Apply the records after `seq`, in order; None when some are gone (compacted)."""
        applied = 0
        while True:
            rows = await self.conn.fetch("SELECT seq, record FROM offloadmq_records WHERE seq > $1 "
                                         "ORDER BY seq LIMIT $2", self.seq, PG_FOLLOW_BATCH)
            if rows and rows[0][0] != self.seq + 1:
                return None
            for seq, raw in rows:
                try:
                    broker.apply(orjson.loads(raw))
                except (KeyError, TypeError, ValueError, OffloadError) as err:
                    raise StoreUnusable(f"{describe_store(self.url)}: record {seq} does not apply to "
                                        f"the state before it ({err!r}). Remedy: restore the database "
                                        "from a backup") from None
                self.seq = seq
                self.size += len(raw)
            applied += len(rows)
            self.records_since_snapshot += len(rows)
            if len(rows) < PG_FOLLOW_BATCH:
                return applied

    # ---------------------------------------------------------------- leading and following

    async def try_lead(self) -> bool:
        """One attempt at the lock; on success this server's URL is recorded as the leader's."""
        async with self.using:
            got, self.leader_url = await self.conn.fetchrow(
                "SELECT pg_try_advisory_lock($1, $2), "
                "(SELECT value FROM offloadmq_meta WHERE name = 'leader')", PG_LOCK_CLASS, self.lock_id)
            if got:
                await self.conn.execute(
                    "INSERT INTO offloadmq_meta VALUES ('leader', $1) "
                    "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", self.advertise_url)
            else:
                await self._end_silent_leader()
        return got

    async def _end_silent_leader(self) -> None:
        """End the lock holder's session when it has said nothing for PG_LEADER_SILENT_S
        (see Leadership above); the next attempt takes the lock. Only an `idle` session:
        one in a transaction may be a leader loading a large snapshot, which takes its
        time between fetches. Sessions of another role show no state here: left alone."""
        silent = await self.conn.fetchrow(
            "SELECT a.pid, extract(epoch FROM clock_timestamp() - a.state_change)::float8 "
            "FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.classid = $1 AND l.objid = $2::int4::oid AND l.objsubid = 2 "
            "AND a.state = 'idle' "
            "AND clock_timestamp() - a.state_change > make_interval(secs => $3)",
            PG_LOCK_CLASS, self.lock_id, PG_LEADER_SILENT_S)
        if silent is not None:
            log.warning("standby: the leader (%s, session %d) has said nothing for %.1f s: ending "
                        "its session so that a standby leads", self.leader_url or "no URL", *silent)
            await self.conn.execute("SELECT pg_terminate_backend($1)", silent[0])

    async def catch_up(self, broker: Broker) -> bool:
        """Apply what the leader wrote since; False when it compacted past what this server
        has (then `load` a fresh broker)."""
        self.heard.clear()
        async with self.using, self.conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot_seq = await self.conn.fetchval("SELECT coalesce(max(seq), 0) FROM offloadmq_snapshots")
            if snapshot_seq > self.seq:
                return False
            return await self._apply_after(broker) is not None

    async def wait_for_news(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.heard.wait()

    async def lead(self) -> None:
        """Holding the lock, with every record applied: write from now on."""
        self.leader, self.leader_url = True, self.advertise_url
        async with self.using:
            await self.conn.remove_listener(self.channel, self.on_notify)
        self.last_used = time.monotonic()
        self.alive = asyncio.get_running_loop().create_task(self._check_alive())

    @property
    def sure_to_lead(self) -> bool:
        return self.leader and time.monotonic() - self.last_used <= PG_LEADER_UNSURE_S

    async def _check_alive(self) -> None:
        """An idle leader asks its session once a second: one that is gone (the network
        cut, the database restarted) must stop serving what it can no longer write, and
        standbys take a session silent for long for a leader that is gone."""
        while not self.closing:
            await asyncio.sleep(PG_ALIVE_S / 4)  # never silent much past PG_ALIVE_S
            if time.monotonic() - self.last_used < PG_ALIVE_S or self.closing:
                continue
            try:
                async with self.using:
                    await self.conn.fetchval("SELECT 1", timeout=PG_COMMAND_TIMEOUT_S / 2)
                self.last_used = time.monotonic()
            except Exception as err:
                if not self.closing:
                    store_lost("the session with %s is gone (%s)", describe_store(self.url), err)

    # ---------------------------------------------------------------- writing

    def enqueue(self, records: list[bytes]) -> asyncio.Future:
        """Queue encoded records for the next batch, in order; a future that is done once
        their batch is committed."""
        for record in records:
            self.seq += 1
            self.seqs.append(self.seq)
            self.lines.append(record)
            self.size += len(record)
        self.records_since_snapshot += len(records)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.append(waiter)
        if self.writer is None:
            self.writer = loop.create_task(self._write())
        return waiter

    async def append(self, records: list[bytes]) -> None:
        await self.enqueue(records)

    def flush(self) -> None:
        """The writer task commits on its own; nothing to start here."""

    async def _write(self) -> None:
        """Group commit: one transaction for whatever was queued meanwhile. Like the
        journal's flush, it starts two turns of the loop late, so that the tasks a change
        wakes (a long poll taking the task just submitted) join the batch."""
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        insert = (f"WITH written AS (INSERT INTO offloadmq_records (seq, record) "
                  f"SELECT * FROM unnest($1::bigint[], $2::bytea[])) SELECT pg_notify('{self.channel}', $3)")
        try:
            while self.lines or self.waiters:
                seqs, lines, waiters = self.seqs, self.lines, self.waiters
                self.seqs, self.lines, self.waiters = [], [], []
                if lines:
                    started = time.perf_counter()
                    try:
                        async with self.using:
                            await self.conn.execute(insert, seqs, lines, str(seqs[-1]))
                    except Exception as err:
                        if getattr(err, "sqlstate", None) != PG_DISK_FULL:
                            raise
                        await self._refuse_full(err, waiters)
                        continue
                    self.last_used = time.monotonic()
                    self.fsync_seconds.observe(time.perf_counter() - started)
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        except Exception as err:
            store_lost("writing records %d.. to %s failed: %s", seqs[0] if seqs else self.seq,
                       describe_store(self.url), err)
        finally:
            self.writer = None

    async def _refuse_full(self, err: Exception, waiters: list[asyncio.Future]) -> None:
        """The database has no room for a batch (SQLSTATE 53100: its transaction rolled
        back, the session and the lock stay). Like the journal on a full disk: this batch
        and every one queued behind it are refused, memory goes back to what the database
        holds, and writes wait until a probe finds room."""
        reason = str(err).splitlines()[0]
        self.fault = StorageFull(
            f"{describe_store(self.url)} has no room ({reason}): writes are refused until "
            "there is room again; reads go on")
        log.error("STORE %s", self.fault.message)
        refused = waiters + self.waiters
        self.seqs, self.lines, self.waiters = [], [], []
        if self.on_full is not None:
            await self.on_full()  # reloads: seq goes back to the last committed record
        for waiter in refused:
            if not waiter.done():
                waiter.set_exception(self.fault)

    def check_writable(self) -> None:
        """A standby never writes (the routes are the leader's); the leader may while the
        database has room."""
        if self.fault is not None:
            raise self.fault

    def probe(self) -> bool:
        """Once a second while the database has no room: True (and writes accepted again)
        once the last probe could write PROBE_BYTES there; starts the next probe."""
        if not isinstance(self.fault, StorageFull):
            return False
        if self.probing is not None and self.probing.done():
            found_room = not self.probing.cancelled() and self.probing.exception() is None
            self.probing = None
            if found_room:
                self.fault = None
                log.warning("STORE %s has room again; writes are accepted", describe_store(self.url))
                return True
        if self.probing is None:
            self.probing = asyncio.get_running_loop().create_task(self._probe())
        return False

    async def _probe(self) -> None:
        """Write (and take back) PROBE_BYTES of incompressible text: fails while the
        database cannot extend a table."""
        async with self.using, self.conn.transaction():
            await self.conn.execute(
                "INSERT INTO offloadmq_meta SELECT 'space-probe', string_agg(md5(random()::text), '') "
                "FROM generate_series(1, $1) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                PROBE_BYTES // 32)
            await self.conn.execute("DELETE FROM offloadmq_meta WHERE name = 'space-probe'")

    def sync(self) -> None:
        """Durability is each COMMIT's."""

    # ---------------------------------------------------------------- compaction

    async def compact(self, snapshot: Callable[[], dict], now: float) -> bool:
        """A snapshot of the state as of `seq`, committed after the batches holding the
        records up to `seq`; those records and older snapshots go in the same transaction.
        As the journal does, a forked child serializes the state frozen at this instant
        (here into a pipe), so the server goes on answering meanwhile."""
        if self.closing or not self.leader or self.fault is not None or now < self.compact_after:
            return False
        seq, size = self.seq, self.size
        state = await serialized_by_child(snapshot)
        if state is None:
            self.compact_after = now + COMPACT_RETRY_S
            log.error("STORE serializing the snapshot failed; trying again in %.0f s", COMPACT_RETRY_S)
            return False
        await self.append([])  # every batch up to `seq` committed
        try:
            async with self.using, self.conn.transaction():
                await self.conn.execute(
                    "INSERT INTO offloadmq_snapshots VALUES ($1, to_timestamp($2), $3) "
                    "ON CONFLICT (seq) DO UPDATE SET at = EXCLUDED.at, state = EXCLUDED.state",
                    seq, now, state, timeout=PG_SNAPSHOT_TIMEOUT_S)
                await self.conn.execute("DELETE FROM offloadmq_records WHERE seq <= $1", seq)
                await self.conn.execute("DELETE FROM offloadmq_snapshots WHERE seq < $1", seq)
        except Exception as err:
            if self.closing:
                return False
            store_lost("compacting %s failed: %s", describe_store(self.url), err)
        self.snapshot_seq, self.last_compaction_at = seq, now
        self.size -= size
        self.records_since_snapshot = self.seq - seq
        return True

    def abandon_compaction(self) -> None:
        self.closing = True

    async def close(self) -> None:
        """Commit what is queued, then end the session (and with it the lock)."""
        if self.writer is not None:
            await asyncio.shield(self.writer)
        self.closing = True
        if self.alive is not None:
            self.alive.cancel()
        if self.conn is not None and not self.conn.is_closed():
            with contextlib.suppress(Exception):
                await self.conn.close(timeout=2)

    def stats(self) -> dict:
        return {"store": describe_store(self.url), "role": "leader" if self.leader else "standby",
                "seq": self.seq, "bytes": self.size, "recordsSinceSnapshot": self.records_since_snapshot,
                "lastCompactionAt": iso(self.last_compaction_at), "fsync": self.fsync}


# ============================================================================ bucket files
#
# The bytes of bucket files, on disk under data/buckets/<bucket uid>/<file uid>: both
# names are ids the server made, never a name a client sent. The metadata (which files
# a bucket has, their size and SHA-256) is in the journal like any other state; a file
# is written whole and fsynced before its record is written, so after a crash a record
# never names a file that was not complete. What a crash can leave - a part file, a
# file whose record never made it, the folder of a deleted bucket - is swept at start.
# A file lost anyway (removed behind the server's back) is answered 410 file_missing.

BUCKETS_FOLDER = "buckets"
PART_PREFIX = ".part-"
FILE_CHUNK = 256 * 1024  # bytes per read and write of a bucket file
MULTIPART_SLACK = 64 * 1024  # multipart framing a declared Content-Length may add to a file


class BucketFiles:
    def __init__(self, root: Path):
        self.root = root

    def path(self, bucket_uid: str, file_uid: str) -> Path:
        return self.root / bucket_uid / file_uid

    async def receive(self, bucket_uid: str, chunks: Any, room: int) -> tuple[str, int, str]:
        """Write `chunks` (an async iterator of bytes) to a new file of the bucket, hashing
        as they come: (file uid, size, sha256), on disk before this returns. Past `room`
        bytes it is PayloadTooLarge, without room on the disk StorageFull; either way
        nothing is left behind."""
        loop, folder = asyncio.get_running_loop(), self.root / bucket_uid
        file_uid = str(uuid.uuid4())
        part, final = folder / (PART_PREFIX + file_uid), folder / file_uid
        digest, size, fd, done = hashlib.sha256(), 0, -1, False
        try:
            if not folder.is_dir():  # new folders are on disk before a file in them is
                if not self.root.is_dir():
                    self.root.mkdir(exist_ok=True)
                    fsync_folder(self.root.parent)
                folder.mkdir(exist_ok=True)
                fsync_folder(self.root)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            async for chunk in chunks:
                size += len(chunk)
                if size > room:
                    raise PayloadTooLarge(f"the file is larger than the {room} bytes left in bucket "
                                          f"{bucket_uid} (STORAGE_BUCKET_SIZE_BYTES)")
                digest.update(chunk)
                write_all(fd, chunk)
            await loop.run_in_executor(None, os.fsync, fd)
            os.rename(part, final)
            await loop.run_in_executor(None, fsync_folder, folder)
            done = True
            return file_uid, size, digest.hexdigest()
        except FileNotFoundError:
            raise NotFound(f"bucket {bucket_uid} was deleted during the upload") from None
        except OSError as err:
            if err.errno in FULL_ERRNOS:
                raise StorageFull(f"no room on the server's disk for this file ({err.strerror}); "
                                  "nothing was kept") from None
            raise
        finally:
            if fd >= 0:
                os.close(fd)
            if not done:  # refused, failed or cancelled: no partial file stays
                for leftover in (part, final):
                    with contextlib.suppress(OSError):
                        leftover.unlink()

    def open(self, bucket_uid: str, file: BucketFile) -> int:
        """A descriptor of the file, or Gone when the disk no longer has it as recorded."""
        try:
            # Never through a link: the disk is not trusted to hold what we put there.
            fd = os.open(self.path(bucket_uid, file.uid), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as err:
            raise Gone(f"file {file.uid} ({file.name!r}) of bucket {bucket_uid} is recorded but "
                       f"not on the server's disk ({err.strerror}): upload it again") from None
        on_disk = os.fstat(fd).st_size
        if on_disk != file.size:
            os.close(fd)
            raise Gone(f"file {file.uid} ({file.name!r}) of bucket {bucket_uid} has {on_disk} bytes "
                       f"on the server's disk, not the {file.size} recorded: upload it again")
        return fd

    def present(self, bucket_uid: str, file: BucketFile) -> bool:
        try:
            found = os.stat(self.path(bucket_uid, file.uid), follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(found.st_mode) and found.st_size == file.size

    def remove_file(self, bucket_uid: str, file_uid: str) -> None:
        with contextlib.suppress(OSError):
            self.path(bucket_uid, file_uid).unlink()

    def remove_buckets(self, bucket_uids: list[str]) -> None:
        for uid in bucket_uids:
            shutil.rmtree(self.root / uid, ignore_errors=True)

    def sweep(self, buckets: dict[str, Bucket]) -> int:
        """At start: remove what no record names (see the section's comment); the count."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for folder in self.root.iterdir():
            bucket = buckets.get(folder.name)
            if bucket is None or not folder.is_dir() or folder.is_symlink():
                removed += 1
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink(missing_ok=True)
                continue
            for path in folder.iterdir():
                if path.name not in bucket.files:
                    removed += 1
                    path.unlink(missing_ok=True)
        return removed


# ============================================================================ wire shapes
#
# The JSON shapes of API.md for tasks, agents and keys: what handlers answer and what
# the event streams carry. The models above know nothing of them.

def task_id_json(task: Task) -> dict:
    return {"cap": task.cap, "id": task.id}


def unassigned_json(task: Task) -> dict:
    return {"id": task_id_json(task), "data": task.data, "createdAt": iso(task.created_at)}


def history_json(task: Task) -> list[dict]:
    return [{"timestamp": iso(at), "description": d} for at, d in task.history]


def assigned_json(task: Task) -> dict:
    return {"id": task_id_json(task), "data": task.data, "agentId": task.agent_id,
            "status": task.status, "history": history_json(task),
            "createdAt": iso(task.created_at), "assignedAt": iso(task.assigned_at),
            "endedAt": iso(task.ended_at),
            "result": task.result, "log": task.log, "stage": task.stage,
            "attempt": task.attempts, "cancelRequested": task.cancel_requested_at is not None}


def status_json(task: Task) -> dict:
    body = {"id": task_id_json(task), "status": task.status, "log": task.log,
            "createdAt": iso(task.created_at)}
    if task.stage is not None:
        body["stage"] = task.stage
    if task.result is not None:
        body["output"] = task.result
    return body


def listing_place(task: Task) -> tuple[str, str]:
    """Where /management/tasks/list shows a task: (queue, "assigned" | "unassigned")."""
    return "urgent" if task.urgent else "regular", "unassigned" if task.status == PENDING else "assigned"


def listing_row(task: Task) -> dict:
    if task.status == PENDING:  # the original shape, plus what a waiting task shows
        return {**unassigned_json(task), "status": task.status, "attempt": task.attempts,
                "notBefore": iso(task.not_before), "history": history_json(task)}
    return assigned_json(task)


def empty_listing() -> dict:
    return {"urgent": {"assigned": [], "unassigned": []}, "regular": {"assigned": [], "unassigned": []}}


def status_event(task: Task, op: str) -> dict:
    # With what a listing row shows, so a console adds a new task without fetching it.
    return {"id": task_id_json(task), "status": task.status, "stage": task.stage, "op": op,
            "attempt": task.attempts, "cancelRequested": task.cancel_requested_at is not None,
            "agentId": task.agent_id, "urgent": task.urgent, "priority": task.priority,
            "createdAt": iso(task.created_at), "assignedAt": iso(task.assigned_at),
            "endedAt": iso(task.ended_at)}


def agent_json(agent: Agent, online: bool) -> dict:
    return {"uid": agent.uid, "uidShort": agent.uid[-6:],
            "registeredAt": iso(agent.registered_at), "lastContact": iso(agent.last_contact),
            "capabilities": agent.capabilities, "tier": agent.tier, "capacity": agent.capacity,
            "systemInfo": agent.system_info, "online": online, "draining": agent.draining,
            "tasksInFlight": len(agent.held), "heartbeatSecs": agent.heartbeat_s,
            "displayName": agent.display_name, "appVersion": agent.app_version}


def agent_json_for_management(agent: Agent, online: bool) -> dict:
    """The management listing also shows the agent's login secret, as the original's does
    (its console displays it): the management token can thus log in as any agent. The
    README's security section says what that means."""
    return {**agent_json(agent, online), "personalLoginToken": agent.key}


def key_json(key: ClientKey) -> dict:
    return {**key.to_record(), "created": iso(key.created_at)}


def bucket_json(bucket: Bucket, limit: int, ttl_s: float) -> dict:
    """A bucket in a client's listing (the original's fields, then ours)."""
    return {"bucket_uid": bucket.uid, "created_at": iso(bucket.created_at),
            "file_count": len(bucket.files), "used_bytes": bucket.used,
            "remaining_bytes": max(0, limit - bucket.used),
            "tasks": [task_id for _, task_id in sorted(bucket.tasks)],
            "rm_after_task": bucket.rm_after_task, "expires_at": iso(bucket.created_at + ttl_s)}


def bucket_file_json(file: BucketFile, present: bool) -> dict:
    return {"file_uid": file.uid, "size_bytes": file.size, "original_name": file.name,
            "sha256": file.sha256, "created_at": iso(file.added_at), "missing": not present}


def uploaded_json(bucket_uid: str, file: BucketFile) -> dict:
    return {"file_uid": file.uid, "bucket_uid": bucket_uid, "original_name": file.name,
            "size": file.size, "sha256": file.sha256}


# ============================================================================ listing
#
# /management/tasks/list at 100,000 tasks without holding the loop: functions over the
# core's tasks (a live mapping they only read) that yield to the loop every slice. A
# page is chosen by a scan of the tasks; the original unparameterized listing (tens of
# MB) is encoded a slice of rows at a time, as its reader takes it. Pages run newest
# first by id (ULIDs: creation order); the cursor is the last id shown, so a walk sees
# every task that existed when it began exactly once, however many are submitted meanwhile.

LIST_SCAN_SLICE = 1000        # tasks looked at per loop turn
LIST_WRITE_BYTES = 256 << 10  # the full listing is written this much at a time...
LIST_WRITE_ROWS = 50          # ...or this many rows (about 1.5 ms of encoding), whichever first
DEFAULT_PAGE, MAX_PAGE = 100, 1000
PAGE_LOG_CHARS = 4096         # a page shows the end of each log; `?task=` shows all of it
PAGE_PARAMS = frozenset({"limit", "cursor", "capability", "queue", "key", "task"})
CURSOR_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
TASK_STATUSES = (PENDING, "queued", ASSIGNED, "starting", RUNNING, COMPLETED, FAILED, CANCELED)


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """The filters of a listing (None matches anything) and, for a page, where it starts."""
    status: str | None = None
    capability: str | None = None  # the task's capability or its base
    urgent: bool | None = None
    owner: str | None = None       # of `client_key`, the key the tasks were submitted with
    client_key: str | None = None
    task: TaskKey | None = None    # one task
    paged: bool = False            # False: every task, in the original shape
    limit: int = DEFAULT_PAGE
    cursor: str | None = None      # ids below this one

    def matches(self, task: Task) -> bool:
        return ((self.status is None or task.status == self.status)
                and (self.capability is None or self.capability in (task.cap, task.base))
                and (self.urgent is None or task.urgent == self.urgent)
                and (self.owner is None or task.owner == self.owner))


async def _scan(tasks: dict[TaskKey, Task], names: list[TaskKey]) -> Any:
    """The tasks of `names` still there, a slice of them per loop turn."""
    for start in range(0, len(names), LIST_SCAN_SLICE):
        if start:
            await asyncio.sleep(0)
        for key in names[start:start + LIST_SCAN_SLICE]:
            task = tasks.get(key)
            if task is not None:
                yield task


async def task_page(tasks: dict[TaskKey, Task], query: TaskQuery) -> dict:
    """Up to `query.limit` matching tasks with ids below its cursor, newest first, in the
    listing's shape, plus `next` (the cursor of the following page, or None) and `total`
    (tasks matching the filters, all pages)."""
    chosen: list[tuple[str, str]] = []  # a min-heap of the `limit` newest (id, cap) so far
    total = below = 0
    async for task in _scan(tasks, [query.task] if query.task is not None else list(tasks)):
        if not query.matches(task):
            continue
        total += 1
        if query.cursor is not None and task.id >= query.cursor:
            continue
        below += 1
        if len(chosen) < query.limit:
            heapq.heappush(chosen, (task.id, task.cap))
        elif (task.id, task.cap) > chosen[0]:
            heapq.heapreplace(chosen, (task.id, task.cap))
    chosen.sort(reverse=True)
    listing = empty_listing()
    for n, (task_id, cap) in enumerate(chosen):
        if n and n % LIST_WRITE_ROWS == 0:
            await asyncio.sleep(0)
        task = tasks.get((cap, task_id))
        if task is None:  # gone while the scan yielded
            continue
        row = listing_row(task)
        if query.task is None and len(row.get("log") or "") > PAGE_LOG_CHARS:
            row["logChars"] = len(row["log"])
            row["log"] = row["log"][-PAGE_LOG_CHARS:]
        queue, kind = listing_place(task)
        listing[queue][kind].append(row)
    listing["next"] = chosen[-1][0] if below > query.limit else None
    listing["total"] = total
    return listing


async def full_listing(tasks: dict[TaskKey, Task], status: str | None) -> Any:
    """The original shape, every task (or those in `status`), as JSON text in chunks:
    the next is encoded when the reader has taken the last (an async iterator)."""
    places: dict[tuple[str, str], list[TaskKey]] = {
        (q, k): [] for q in ("urgent", "regular") for k in ("assigned", "unassigned")}
    async for task in _scan(tasks, list(tasks)):
        if status is None or task.status == status:
            places[listing_place(task)].append(task.key)
    out, rows, skipped = bytearray(b"{"), 0, 0
    for queue in ("urgent", "regular"):
        out += b'"%b":{' % queue.encode()
        for kind in ("assigned", "unassigned"):
            out += b'"%b":[' % kind.encode()
            first = True
            for key in places[(queue, kind)]:
                task = tasks.get(key)
                if task is None:
                    continue
                try:
                    row = orjson.dumps(listing_row(task))
                except (TypeError, orjson.JSONEncodeError):  # one bad task never fails a listing
                    skipped += 1
                    continue
                out += row if first else b"," + row
                first, rows = False, rows + 1
                if rows >= LIST_WRITE_ROWS or len(out) >= LIST_WRITE_BYTES:
                    yield bytes(out)
                    out.clear()
                    rows = 0
                    await asyncio.sleep(0)
            out += b"]," if kind == "assigned" else b"]"
        out += b"}," if queue == "urgent" else b"}"
    yield bytes(out + b"}")
    if skipped:
        log.warning("task listing left out %d tasks that cannot be encoded", skipped)


# ============================================================================ hub
#
# The async shell: `Hub` owns the broker and the journal, reads the clock and offers one
# method per verb. Each verb runs one core method with `now`, then takes the Changes it
# returned once, in order: their encoded records go to the journal, agents' long polls
# wake, the live events go into the EventLog, and once on disk the waiters of durable
# state (clients waiting for a task's end, event streams) wake. Metrics counts outcomes.

DEFAULT_AGENT_WAIT_S = 20.0
MAX_WAIT_S = 60.0
EVENT_RING_SIZE = 10_000  # live events kept for Last-Event-ID resumption...
EVENT_RING_BYTES = 64 << 20  # ...unless they hold more than this (big logs)
OUTCOME_OPS = {"task.submitted": "submitted", "task.completed": "completed",
               "task.failed": "failed", "task.canceled": "canceled"}
STREAM_DROP_REASONS = ("slow", "stalled", "overrun")


def sse_frame(event_id: int, kind: str, data: bytes) -> bytes:
    return b"id: %d\nevent: %b\ndata: %b\n\n" % (event_id, kind.encode(), data)


class Event:
    """One server-sent event; `owner` None means every client may see it. Only its wire
    form is kept, built once here: every stream that shows it writes these same bytes."""
    __slots__ = ("id", "owner", "key", "frame", "size")

    def __init__(self, event_id: int, owner: str | None, key: TaskKey | None, kind: str, data: bytes):
        self.id, self.owner, self.key = event_id, owner, key
        self.frame = sse_frame(event_id, kind, data)
        self.size = len(data)  # what the ring's byte budget counts


class EventLog:
    """The live events of every change, in a ring bounded by count and bytes, so a
    stream that reconnects with a Last-Event-ID resumes where it was. Streams show the
    events up to `released`: those of changes on disk (or that need no disk), never
    past the first event of a change still on its way to the disk (`hold`): an urgent
    change released at once must not show a regular one's end before it is kept. Each
    release calls `on_publish` (EventStreams sets it; it must be cheap)."""

    def __init__(self, started_at: float):
        self.ring: deque[Event] = deque()
        self.bytes = 0
        # Event ids grow across restarts too, so a Last-Event-ID from an earlier run is
        # recognised as too old rather than mistaken for a recent one.
        self.seq = self.released = self.wanted = int(started_at * 1000) << 12
        self.unsaved: list[int] = []  # the first event id of each change on its way to disk
        self.on_publish: Callable[[], None] = lambda: None

    def publish(self, changes: list[Change]) -> list[TaskKey]:
        """Events for the changes: `status` on every transition, `log` with each log
        delta, `end` with the final task; management also sees agents. Returns the tasks
        that ended, for their waiters."""
        ended: list[TaskKey] = []
        for change in changes:
            task = change.task
            if task is not None:
                if change.before != change.after or change.op == "task.cancel_requested":
                    self.add(task.owner, task.key, "status", status_event(task, change.op))
                record = change.record
                if change.op == "task.progressed" and (record["log"] or record["stage"] is not None):
                    self.add(task.owner, task.key, "log", {"id": task_id_json(task),
                                                           "log": record["log"] or "", "stage": task.stage})
                if change.after in ENDED and change.before not in ENDED:
                    self.add(task.owner, task.key, "end", assigned_json(task))
                    ended.append(task.key)
            elif change.scope == "agent" and change.record is not None:
                self.add(MGMT_OWNER, None, "agent", {"op": change.op, "uid": change.agent_uid})
            elif change.scope == "tasks":
                self.add(None, None, "reset", {"op": change.op, "uid": None})
        return ended

    def renumber(self, now: float) -> None:
        """A standby taking over: its ids start past any its predecessor can have given
        (ids are its start in ms << 12 plus one per event), so that a Last-Event-ID from
        the old leader is unknown here, never mistaken for one of ours."""
        self.seq = self.released = self.wanted = max(self.seq, int(now * 1000) << 12)
        self.on_publish()

    def hold(self, first: int) -> None:
        self.unsaved.append(first)

    def unhold(self, first: int) -> None:
        self.unsaved.remove(first)
        self.release(self.wanted)

    def release(self, upto: int) -> None:
        self.wanted = max(self.wanted, upto)
        if self.unsaved:
            upto = min(upto, min(self.unsaved) - 1)
        if upto > self.released:
            self.released = upto
            self.on_publish()

    def add(self, owner: str | None, key: TaskKey | None, kind: str, data: dict) -> None:
        self.seq += 1
        event = Event(self.seq, owner, key, kind, orjson.dumps(data))
        self.ring.append(event)
        self.bytes += event.size
        while len(self.ring) > EVENT_RING_SIZE or self.bytes > EVENT_RING_BYTES:
            self.bytes -= self.ring.popleft().size

    @staticmethod
    def visible(event: Event, owner: str, keys: set | None) -> bool:
        if owner != MGMT_OWNER and event.owner not in (None, owner):
            return False
        return keys is None or event.key is None or event.key in keys

    def after(self, last_id: int | None, owner: str, keys: set | None) -> list[Event] | None:
        """Released events after `last_id` visible to `owner`; None when `last_id` cannot
        be resumed from (too old, from an earlier run, or absent)."""
        first = self.ring[0].id if self.ring else self.seq + 1
        if last_id is None or not first - 1 <= last_id <= self.released:
            return None
        return [e for e in self.between(last_id, self.released) if self.visible(e, owner, keys)]

    def between(self, after: int, upto: int) -> list[Event] | None:
        """Every event after `after` up to `upto`, oldest first; None when the ring has
        moved past some of them."""
        # From the newest end: a live stream asks for the last few of up to 10,000 events.
        newer = list(itertools.islice(reversed(self.ring), self.seq - after))
        newer.reverse()
        if newer and newer[0].id != after + 1 or not newer and after < upto:
            return None
        return [e for e in newer if e.id <= upto]


class Metrics:
    """Prometheus text: outcome totals since start, HTTP and fsync latency, and gauges
    read from the broker when scraped."""

    def __init__(self):
        self.totals: dict[tuple[str, str], int] = {}  # (outcome, capability) -> since start
        self.http_seconds: dict[tuple[str, str], Histogram] = {}
        self.event_streams = 0  # open now
        self.stream_drops = dict.fromkeys(STREAM_DROP_REASONS, 0)  # readers dropped, by why

    def count(self, changes: list[Change]) -> None:
        for change in changes:
            outcome = OUTCOME_OPS.get(change.op)
            if outcome is not None and change.task is not None:
                slot = (outcome, change.task.base)
                self.totals[slot] = self.totals.get(slot, 0) + 1

    def observe_http(self, method: str, route: str, seconds: float) -> None:
        histogram = self.http_seconds.get((method, route))
        if histogram is None:
            histogram = self.http_seconds[(method, route)] = Histogram()
        histogram.observe(seconds)

    def text(self, broker: Broker, journal: Journal, now: float) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, text: str, samples: list[tuple[str, Any]]) -> None:
            lines.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        def cap_label(cap: str) -> str:
            escaped = cap.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            return f'{{capability="{escaped}"}}'

        for outcome in OUTCOME_OPS.values():
            family(f"offloadmq_tasks_{outcome}_total", "counter", f"Tasks {outcome} since start.",
                   [(cap_label(cap), n) for (o, cap), n in sorted(self.totals.items()) if o == outcome])
        family("offloadmq_queue_depth", "gauge", "Pending tasks by capability.",
               [(cap_label(cap), n) for cap, n in sorted(broker.pending_by_cap.items()) if n])
        family("offloadmq_queue_oldest_age_seconds", "gauge",
               "Age of the oldest task ready to run, by capability.",
               [(cap_label(cap), round(age, 3)) for cap, age in sorted(broker.queue_ages(now).items())])
        family("offloadmq_tasks_unservable", "gauge", "Pending tasks no online agent serves.",
               [("", sum(n for cap, n in broker.pending_by_cap.items() if cap not in broker.serving))])
        online = broker.online_agents(now)
        family("offloadmq_agents_online", "gauge", "Agents in contact within their online window.",
               [("", len(online))])
        family("offloadmq_agents_capacity", "gauge", "Task slots of online agents.",
               [("", sum(a.capacity for a in online))])
        family("offloadmq_agents_in_flight", "gauge", "Tasks held by online agents.",
               [("", sum(len(a.held) for a in online))])
        family("offloadmq_journal_bytes", "gauge", "Size of the active journal.", [("", journal.size)])
        family("offloadmq_event_streams", "gauge", "Event streams open.", [("", self.event_streams)])
        family("offloadmq_event_stream_drops_total", "counter", "Event stream readers dropped since "
               "start: slow (fell behind while live), stalled (took nothing of their start), "
               "overrun (the event ring moved past them).",
               [(f'{{reason="{reason}"}}', n) for reason, n in self.stream_drops.items()])
        lines += ["# HELP offloadmq_fsync_seconds Journal fdatasync latency.",
                  "# TYPE offloadmq_fsync_seconds histogram",
                  *journal.fsync_seconds.lines("offloadmq_fsync_seconds")]
        lines += ["# HELP offloadmq_http_request_duration_seconds HTTP request time by route.",
                  "# TYPE offloadmq_http_request_duration_seconds histogram"]
        for (method, route), histogram in sorted(self.http_seconds.items()):
            lines += histogram.lines("offloadmq_http_request_duration_seconds",
                                     f'method="{method}",route="{route}"')
        return "\n".join(lines) + "\n"


class Hub:
    """The async shell around the broker: it reads the clock, journals what the broker
    did, wakes waiters, and runs the once-a-second loop (expiry, fsync, compaction).
    Every change goes mutate -> journal -> notify, through `_change()`."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time,
                 store: PostgresStore | None = None):
        self.config = config
        self.clock = clock
        self.broker = Broker(config.client_api_keys, clock())
        # The store (see the store interface): the embedded journal, or PostgreSQL.
        self.journal: Journal | PostgresStore = store or (
            PostgresStore(config.store, config.advertise_url) if config.store
            else Journal(config.data_path, config.fsync))
        self.changed = asyncio.Condition()  # something changed, and it is on disk
        # Tasks agents may take changed: a poll that claims one writes its own record after
        # these, so it need not wait for them to reach the disk (its fdatasync covers both).
        self.offers_changed = asyncio.Condition()
        # Clients waiting for one task to end (poll?wait=, submit_blocking): woken by that
        # task alone, not by every change (with many waiting, that costs each change dearly).
        self.end_waiters: dict[TaskKey, list[asyncio.Future]] = {}
        # Submits with an Idempotency-Key on their way to the disk: a retry waits for them.
        self.submitting: dict[tuple[str, str], asyncio.Future] = {}
        self.recovered = False
        self.stopping = False  # set at shutdown: every wait ends so handlers can finish
        self.ticker: asyncio.Task | None = None
        self.follower: asyncio.Task | None = None  # a standby following the leader's records
        self.started_at = clock()
        self.events = EventLog(self.started_at)
        self.metrics = Metrics()
        # Called with every batch of changes once journaled (the agent sockets push cancels).
        self.change_listeners: list[Callable[[list[Change]], None]] = []
        self.journal.on_fault = self._storage_fault  # disk faults: writes refused
        if isinstance(self.journal, PostgresStore):
            self.journal.on_full = self._back_to_store
        self.files = BucketFiles(config.data_path / BUCKETS_FOLDER)

    # ---------------------------------------------------------------- lifecycle

    def recover(self) -> None:
        started = time.perf_counter()
        replayed = self.journal.recover(self.broker, self.config.repair)
        self.broker.after_recovery(self.clock())
        swept = self.files.sweep(self.broker.buckets)
        if swept:
            log.warning("removed %d bucket file(s) no record names (left by a crash or a delete)", swept)
        self.recovered = True
        log.info("recovered %d tasks, %d agents (%d journal records) in %.2f s from %s",
                 len(self.broker.tasks), len(self.broker.agents), replayed,
                 time.perf_counter() - started, self.config.data_path)

    async def start(self) -> None:
        if isinstance(self.journal, Journal):
            if not self.recovered:
                self.recover()
            self.ticker = asyncio.get_running_loop().create_task(self._tick_loop())
            return
        started = time.perf_counter()
        await self.journal.open()
        applied = await self.journal.load(self.broker)
        self.recovered = True
        log.info("loaded %d tasks, %d agents (%d records) in %.2f s from %s", len(self.broker.tasks),
                 len(self.broker.agents), applied, time.perf_counter() - started,
                 describe_store(self.config.store))
        # One attempt now, so a server alone on its database serves from the start.
        if not await self._lead_or_follow():
            log.info("standby: following the leader (%s)", self.journal.leader_url or "not known yet")
            self.follower = asyncio.get_running_loop().create_task(self._follow())

    # ---------------------------------------------------------------- leader and standbys

    async def _follow(self) -> None:
        """A standby: apply the leader's records as they come, try the lock now and then."""
        try:
            swept_at = time.monotonic()
            while not await self._lead_or_follow():
                if time.monotonic() - swept_at > STANDBY_TIMER_SWEEP_S:
                    self.broker.drop_stale_timers()
                    swept_at = time.monotonic()
                await self.journal.wait_for_news(PG_LOCK_ATTEMPT_S)
        except asyncio.CancelledError:
            raise
        except StoreUnusable as err:
            store_lost("%s", err)
        except Exception as err:
            if not self.stopping:
                store_lost("following the leader in %s failed: %r", describe_store(self.config.store), err)

    async def _lead_or_follow(self) -> bool:
        """One round: try the lock, then apply what the leader wrote (all of it, once the
        lock is ours); True once this server leads."""
        store = self.journal
        leading = await store.try_lead()
        followed = store.seq
        if not await store.catch_up(self.broker):  # compacted past us: start from its snapshot
            log.info("standby: the leader compacted past record %d; loading its snapshot", store.seq)
            fresh = Broker(self.config.client_api_keys, self.clock(), self.broker.rng, self.broker.ids,
                           self.broker.new_secret)
            await store.load(fresh)
            self.broker = fresh
        if not leading:
            return False
        await store.lead()
        now = self.clock()
        self.broker.after_recovery(now)
        # Bucket files are in the data folder (shared by the servers, or each its own): what
        # no record names is what the old leader wrote and never recorded.
        swept = self.files.sweep(self.broker.buckets)
        if swept:
            log.warning("removed %d bucket file(s) no record names (left by the old leader)", swept)
        self.events.renumber(now)
        self.ticker = asyncio.get_running_loop().create_task(self._tick_loop())
        log.warning("leading at record %d (%d applied at takeover), serving as %s", store.seq,
                    store.seq - followed, store.advertise_url)
        return True

    def readiness(self) -> dict:
        """GET /health/ready: may a load balancer send this server traffic now?"""
        store = self.journal
        if not store.leader:  # seq: how far it followed the leader's records
            return {"ready": False, "role": "standby", "leader": store.leader_url, "seq": store.seq}
        if store.fault is not None:
            return {"ready": False, "role": "leader", "reason": store.fault.type}
        return {"ready": True, "role": "leader"}

    async def release_waiters(self) -> None:
        """Shutdown: long polls and event streams answer now instead of holding it up;
        a snapshot being written is abandoned rather than waited for."""
        self.stopping = True
        if self.ticker is not None:
            self.ticker.cancel()
        self.journal.abandon_compaction()
        self._wake_ended(list(self.end_waiters))
        await self._notify()

    async def stop(self) -> None:
        for task in (self.ticker, self.follower):
            if task is not None:
                task.cancel()
        await self.journal.close()

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            try:
                # Disk faults: while writes are refused, only look for room again.
                if self.journal.fault is not None and not self.journal.probe():
                    continue
                await self._change(self.broker.expire)
                await self.reap_buckets()
                await self.drop_retained()
                if self.journal.fsync == "everysec":
                    await loop.run_in_executor(None, self.journal.sync)
                if self.journal.size >= self.config.compact_bytes:
                    await self.compact()
            except (StorageFull, StorageLost):  # logged where it happened; probed next round
                pass
            except Exception:  # the loop must outlive any bug in one round
                log.exception("background round failed")

    async def drop_retained(self) -> int:
        """Retention: a batch of the ended tasks past the configured age or count."""
        return await self._change(self.broker.drop_retained, self.config.retention_s,
                                  self.config.retention_tasks)

    async def compact(self) -> None:
        dropped = 0  # retention first, so that the snapshot does not keep what it drops
        while n := await self.drop_retained():
            dropped += n
        before = self.journal.size
        if await self.journal.compact(self.broker.snapshot, self.clock()):
            log.info("journal compacted: %d -> %d bytes, %d old ended tasks dropped",
                     before, self.journal.size, dropped)

    # ---------------------------------------------------------------- disk faults

    def _storage_fault(self) -> None:
        if isinstance(self.journal.fault, StorageFull):
            self._back_to_disk()
        else:
            self._rescue()

    def _fresh_broker(self) -> Broker:
        old = self.broker
        return Broker(self.config.client_api_keys, self.clock(), old.rng, old.ids, old.new_secret)

    def _back_to_disk(self) -> None:
        """The journal refused a write for want of room: memory goes back to what is on disk."""
        started, fresh = time.perf_counter(), self._fresh_broker()
        try:
            self.journal.reload(fresh)
        except (OSError, JournalCorrupt) as err:
            fatal("after a refused write, reading back %s failed: %s", self.config.data_path, err)
        self._take_back(fresh, started)

    async def _back_to_store(self) -> None:
        """PostgreSQL refused a batch for want of room: memory goes back to what it holds."""
        started, fresh = time.perf_counter(), self._fresh_broker()
        try:
            await self.journal.load(fresh)
        except Exception as err:
            store_lost("after a refused write, reading back %s failed: %r", describe_store(self.config.store), err)
        self._take_back(fresh, started)

    def _take_back(self, fresh: Broker, started: float) -> None:
        """Memory becomes `fresh`, the state as stored, rebuilt as a restart would rebuild it
        but with every connection kept. What never depended on the store stays: urgent
        tasks (same objects, so their waiters keep waiting) and agents' last contact.
        Offers lapse (the agent polls again). Clients waiting on a regular task get the 507
        (what they saw may have been undone: they ask again); event streams get a `reset`
        event and reload."""
        old = self.broker
        for agent in old.online.values():  # oldest contact first, as `online` wants
            if agent.uid in fresh.agents:
                fresh.touch(agent.uid, agent.last_contact)
        fresh.adopt_memory_only(old)
        self.broker = fresh
        for key in [k for k in self.end_waiters if fresh.tasks.get(k) is not old.tasks.get(k)]:
            for waiter in self.end_waiters.pop(key):
                if not waiter.done():
                    waiter.set_exception(self.journal.fault)
        self.events.add(None, None, "reset", {"op": "storage.restored", "uid": None})
        self.events.release(self.events.seq)
        asyncio.get_running_loop().create_task(self._notify())
        log.warning("back to the state on disk: %d tasks, %d agents, in %.2f s",
                    len(fresh.tasks), len(fresh.agents), time.perf_counter() - started)

    def _rescue(self) -> None:
        """The journal is lost (data folder removed, journal replaced), so memory holds
        the only copy of what was acknowledged: save it, in the snapshot format, next to
        the data folder, for the operator to start from."""
        folder = self.config.data_path.absolute()
        path = folder.with_name(f"{folder.name}-rescued-{time.strftime('%Y%m%dT%H%M%S')}.json")
        state = self.broker.snapshot()
        try:
            write_synced(path, orjson.dumps({"seq": self.journal.seq, "at": iso(self.clock()), **state}))
        except (OSError, TypeError) as err:
            log.critical("JOURNAL could not save the state in memory to %s: %s", path, err)
            return
        log.critical("JOURNAL the state in memory (%d tasks, %d agents) is saved in %s: to go on "
                     "from it, stop the server, make it snapshot.json of an empty data folder "
                     "and start", len(state["tasks"]), len(state["agents"]), path)

    # ---------------------------------------------------------------- changing state

    async def _change(self, method: Callable, *args: Any, writes: bool = True,
                      **kwargs: Any) -> Any:
        """Run a broker method with the time now; journal the changes it returned; wake
        waiters; answer once the records are on disk (log text too: an agent does not
        send again what was acknowledged). While the
        disk refuses writes, a change is refused before it touches memory, unless it
        `writes` no record (a contact, an offer let go)."""
        if writes:
            self.journal.check_writable()
        changes: list[Change] = []
        try:
            return method(*args, now=self.clock(), changes=changes, **kwargs)
        finally:
            if changes:
                await self._store_and_notify(changes)

    async def _store_and_notify(self, changes: list[Change]) -> None:
        first = self.events.seq + 1
        ended = self.events.publish(changes)
        published = self.events.seq
        lines = [c.line for c in changes if c.durable]
        on_disk_soon = self.journal.enqueue(lines) if lines else None
        held = on_disk_soon is not None and published >= first
        if held:
            self.events.hold(first)
        try:
            await self._notify(self.offers_changed)  # after the enqueue: a take's record must follow
            if on_disk_soon is not None:
                await on_disk_soon  # a refused write raises here (memory went back to the disk)
        finally:
            if held:
                self.events.unhold(first)
        self.metrics.count(changes)
        self.events.release(published)
        for listener in self.change_listeners:
            listener(changes)
        if ended:
            self._wake_ended(ended)
        if changes[-1].scope == "tasks":  # every task went away: so do their waits
            self._wake_ended(list(self.end_waiters))
        await self._notify(self.changed)  # agents' polls heard of it above

    def _wake_ended(self, keys: list[TaskKey]) -> None:
        for key in keys:
            for waiter in self.end_waiters.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)

    async def _notify(self, condition: asyncio.Condition | None = None) -> None:
        for cond in (condition,) if condition else (self.offers_changed, self.changed):
            async with cond:
                cond.notify_all()

    async def _wait_until(self, ready: Callable[[], bool], timeout_s: float,
                          condition: asyncio.Condition | None = None) -> None:
        """Hold until `ready()` is true or the time is up. `ready` runs with no await
        between its check and what it does, so a check that claims cannot race."""
        condition = condition or self.changed
        async with condition:
            try:
                async with asyncio.timeout(timeout_s):  # no extra task, unlike wait_for
                    await condition.wait_for(lambda: self.stopping or ready())
            except TimeoutError:
                pass

    # ---------------------------------------------------------------- client verbs

    async def submit(self, data: dict, owner: str, max_in_flight: int | None,
                     idempotency_key: str | None, max_queued_bytes: int | None = None) -> tuple[Task, bool]:
        """(task, created): with an Idempotency-Key seen before, the earlier task - once it
        is on disk, and the earlier submit's error if its write failed."""
        if idempotency_key is None:
            return await self._change(self.broker.submit, data, owner, max_in_flight,
                                      max_queued_bytes=max_queued_bytes), True
        earlier = self.broker.find_idempotent(owner, idempotency_key, data, self.clock())
        first = self.submitting.get((owner, idempotency_key))
        if first is not None:
            return await asyncio.shield(first), False
        if earlier is not None:
            return earlier, False
        # A task of its own: the first submit's answer must not depend on its client
        # staying, since a retry waits for it.
        first = asyncio.ensure_future(self._change(self.broker.submit, data, owner, max_in_flight,
                                                   idempotency_key=idempotency_key,
                                                   max_queued_bytes=max_queued_bytes))
        self.submitting[(owner, idempotency_key)] = first
        first.add_done_callback(lambda done: (
            self.submitting.pop((owner, idempotency_key), None),
            done.cancelled() or done.exception()))  # seen, even if its client went away
        return await asyncio.shield(first), True

    async def submit_and_wait(self, data: dict, owner: str, max_in_flight: int | None,
                              max_queued_bytes: int | None = None) -> Task:
        """submit_blocking: the ended task, or the contract's 503/504."""
        task = await self._change(self.broker.submit, data, owner, max_in_flight,
                                  max_queued_bytes=max_queued_bytes)
        await self._wait_for_end(task, self.config.blocking_hold_s)
        if self.broker.tasks.get(task.key) is not task:
            raise NotFound(f"task {task.id} was removed by a reset", id=task_id_json(task))
        if task.status == FAILED and task.agent_id is None:
            raise SchedulingImpossible(f"no agent took task {task.id} within {URGENT_TAKE_S:.0f} s",
                                       id=task_id_json(task))
        if task.status not in ENDED:
            raise WaitTimeout(f"task {task.id} is still {task.status} after "
                              f"{self.config.blocking_hold_s:.0f} s; poll it for the result",
                              id=task_id_json(task))
        return task

    async def poll(self, cap: str, task_id: str, owner: str, wait_s: float) -> Task:
        """A task of `owner`'s, once it ended or `wait_s` passed."""
        task = self.broker.task(cap, task_id, owner)
        await self._wait_for_end(task, wait_s)
        return task

    async def _wait_for_end(self, task: Task, wait_s: float) -> None:
        if task.status in ENDED or self.broker.tasks.get(task.key) is not task \
                or wait_s <= 0 or self.stopping:
            return
        waiter = asyncio.get_running_loop().create_future()
        self.end_waiters.setdefault(task.key, []).append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                await waiter
        except TimeoutError:
            pass
        finally:  # timed out, or the client went away
            waiters = self.end_waiters.get(task.key, [])
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self.end_waiters[task.key]

    async def cancel(self, cap: str, task_id: str, owner: str) -> Task:
        return await self._change(self.broker.cancel, cap, task_id, owner)

    # ---------------------------------------------------------------- agent verbs

    async def register_agent(self, info: dict) -> Agent:
        agent = await self._change(self.broker.register_agent, info)
        log.info("agent %s registered serving %s", agent.uid, ",".join(agent.capabilities))
        return agent

    async def update_agent(self, uid: str, info: dict) -> Agent:
        return await self._change(self.broker.update_agent, uid, info)

    async def ping(self, uid: str, holding: set[TaskKey] | None) -> dict:
        """A contact; with `holding` (what the agent says it holds) the tasks assigned to
        it that it does not hold are released. The health body, plus `released`.
        While the disk refuses writes a ping is a contact only: releases wait for a ping
        after that."""
        reconcile = holding is not None and self.journal.fault is None
        released = await self._change(self.broker.ping, uid, holding if reconcile else None,
                                      writes=reconcile)
        if holding is None:
            return self.health()
        return {**self.health(), "released": [task_id_json(t) for t in released]}

    async def next_task(self, uid: str, wait_s: float, urgent_only: bool,
                        gone: Callable[[], bool], take: bool = False) -> Task | None:
        """Long poll: the next task this agent may take (held for it), or None.
        With `take` it is also assigned to the agent (saves the agent a round trip).
        A poll whose credential is revoked while it waits ends empty: it must not hand a
        task to whoever held the old credential."""
        task = None
        agent = self.broker.agents.get(uid)
        credential = agent.tokens_after if agent is not None else None

        def revoked() -> bool:
            now_agent = self.broker.agents.get(uid)
            return now_agent is not None and now_agent.tokens_after != credential

        def ready() -> bool:
            nonlocal task
            if gone() or revoked():
                return True
            now = self.clock()
            self.broker.touch(uid, now)
            task = self.broker.offer(uid, now, urgent_only)
            return task is not None

        if not ready() and wait_s > 0:
            await self._wait_until(ready, wait_s, self.offers_changed)
        if task is not None and (gone() or revoked()):  # nobody is left to hand it to
            await self._change(self.broker.release_offer, task.key, writes=False)
            return None
        if task is not None and take:
            task = await self._change(self.broker.take, uid, task.cap, task.id)
        return task

    async def take(self, uid: str, cap: str, task_id: str) -> Task:
        task = await self._change(self.broker.take, uid, cap, task_id)
        log.debug("task %s assigned to %s", task_id, uid)
        return task

    async def progress(self, uid: str, cap: str, task_id: str, stage: str | None,
                       log_update: str | None) -> Task:
        return await self._change(self.broker.progress, uid, cap, task_id, stage, log_update)

    async def resolve(self, uid: str, cap: str, task_id: str, outcome: str,
                      message: str | None, output: Any) -> Task:
        return await self._change(self.broker.resolve, uid, cap, task_id, outcome, message, output)

    async def resolve_and_next(self, uid: str, cap: str, task_id: str, outcome: str,
                               message: str | None, output: Any, wait_s: float,
                               gone: Callable[[], bool]) -> Task | None:
        """Resolve, and hand the agent its next task: at once if one is ready, else by a
        long poll of up to `wait_s`."""
        _, nxt = await self._change(self.broker.resolve_and_take_next, uid, cap, task_id,
                                    outcome, message, output)
        if nxt is None and wait_s > 0:
            nxt = await self.next_task(uid, wait_s, False, gone, take=True)
        return nxt

    async def release_unstarted(self, uid: str) -> list[Task]:
        """The agent's push channel closed: its never-started tasks go back to the queue."""
        released = await self._change(self.broker.release_unstarted, uid)
        if released:
            log.info("agent %s disconnected: %d unstarted task(s) back in the queue", uid, len(released))
        return released

    async def cancel_requests(self, uid: str, wait_s: float, gone: Callable[[], bool]) -> list[dict]:
        """Long poll: the held tasks this agent should stop."""
        found: list[dict] = []

        def ready() -> bool:
            nonlocal found
            self.broker.touch(uid, self.clock())
            found = [task_id_json(t) for t in self.broker.cancel_requests(uid)]
            return bool(found) or gone()

        if not ready() and wait_s > 0:
            await self._wait_until(ready, wait_s)
        return found

    # ---------------------------------------------------------------- management verbs

    async def requeue(self, cap: str, task_id: str) -> Task:
        return await self._change(self.broker.requeue, cap, task_id)

    async def reset_tasks(self) -> None:
        await self._change(self.broker.reset_tasks)

    async def drain(self, uid: str) -> tuple[Agent, bool]:
        """(the agent, whether it is online)."""
        agent = await self._change(self.broker.drain_agent, uid, True)
        return agent, self.broker.is_online(agent, self.clock())

    async def resume(self, uid: str) -> tuple[Agent, bool]:
        agent = await self._change(self.broker.drain_agent, uid, False)
        return agent, self.broker.is_online(agent, self.clock())

    async def rotate_agent_key(self, uid: str) -> tuple[Agent, bool]:
        """A new login secret for the agent; its earlier JWTs are refused from now on.
        (the agent, whether it is online)."""
        agent = await self._change(self.broker.rotate_agent_key, uid)
        log.info("agent %s credential rotated", uid)
        return agent, self.broker.is_online(agent, self.clock())

    async def delete_agent(self, uid: str) -> None:
        await self._change(self.broker.delete_agent, uid)
        log.info("agent %s deleted", uid)

    async def reset_agents(self) -> None:
        await self._change(self.broker.reset_agents)

    async def update_key(self, key: str, patterns: list[str], max_in_flight: int | None,
                         max_queued_bytes: int | None) -> ClientKey:
        # A new key must be hard to guess; one that exists (say set at start) keeps its shape.
        if self.broker.client_key(key) is None and not NEW_KEY_PATTERN.fullmatch(key):
            raise BadRequest(KEY_RULE)
        return await self._change(self.broker.update_key, key, patterns, max_in_flight,
                                  max_queued_bytes=max_queued_bytes)

    async def revoke_key(self, key: str) -> ClientKey:
        return await self._change(self.broker.revoke_key, key)

    # ---------------------------------------------------------------- bucket verbs
    # Metadata changes go through the broker and the journal like any other; the bytes
    # go to the disk first (a new file) or after (a removal), so no record names a file
    # that never was complete, and a crash at worst leaves bytes no record names.

    async def create_bucket(self, owner: str, rm_after_task: bool) -> Bucket:
        return await self._change(self.broker.create_bucket, owner,
                                  self.config.storage_max_buckets_per_key, rm_after_task)

    async def store_file(self, bucket_uid: str, name: str, chunks: Any, owner: str | None = None,
                         agent_uid: str | None = None, declared: int | None = None) -> BucketFile:
        """A new file from `chunks` into a bucket of `owner`'s, or into the output bucket
        of a task `agent_uid` holds. A `declared` body size that cannot fit is refused
        before a byte is read."""
        check_file_name(name)
        limit = self.config.storage_bucket_size_bytes
        if agent_uid is not None:
            bucket = self.broker.agent_bucket(agent_uid, bucket_uid, output=True)
        else:
            bucket = self.broker.bucket(bucket_uid, owner)
        room = limit - bucket.used
        if declared is not None and declared > room + MULTIPART_SLACK:
            raise PayloadTooLarge(f"the body ({declared} bytes) is larger than the {room} bytes "
                                  f"left in bucket {bucket.uid} (STORAGE_BUCKET_SIZE_BYTES)")
        self.journal.check_writable()
        file_uid, size, sha256 = await self.files.receive(bucket.uid, chunks, room)
        try:
            return await self._change(self.broker.add_file, bucket.uid, owner, file_uid, name,
                                      size, sha256, limit)
        except BaseException:
            self.files.remove_file(bucket.uid, file_uid)
            raise

    def open_file(self, bucket: Bucket, file_uid: str) -> tuple[BucketFile, int]:
        """(the file, a descriptor of its bytes); NotFound, or Gone when the disk lost it."""
        found = bucket.files.get(file_uid)
        if found is None:
            raise NotFound(f"bucket {bucket.uid} has no file {file_uid[:80]!r}")
        return found, self.files.open(bucket.uid, found)

    def file_present(self, bucket: Bucket, file: BucketFile) -> bool:
        return self.files.present(bucket.uid, file)

    async def delete_file(self, bucket_uid: str, owner: str, file_uid: str) -> BucketFile:
        found = await self._change(self.broker.delete_file, bucket_uid, owner, file_uid)
        self.files.remove_file(bucket_uid, file_uid)
        return found

    async def delete_bucket(self, bucket_uid: str, owner: str | None) -> Bucket:
        bucket = await self._change(self.broker.delete_bucket, bucket_uid, owner)
        await asyncio.to_thread(self.files.remove_buckets, [bucket.uid])
        return bucket

    async def delete_buckets(self, owner: str | None) -> int:
        """Management: every bucket of `owner` (None: everyone's); how many."""
        gone = await self._change(self.broker.delete_buckets, owner)
        await asyncio.to_thread(self.files.remove_buckets, [b.uid for b in gone])
        return len(gone)

    async def reap_buckets(self) -> int:
        """Buckets past their TTL and finished rm_after_task ones; how many went."""
        gone = await self._change(self.broker.reap_buckets, self.config.storage_bucket_ttl_s)
        if gone:
            await asyncio.to_thread(self.files.remove_buckets, [b.uid for b in gone])
            log.info("%d bucket(s) removed (expired or their tasks ended)", len(gone))
        return len(gone)

    # ---------------------------------------------------------------- views

    def task(self, cap: str, task_id: str, owner: str | None = None) -> Task:
        return self.broker.task(cap, task_id, owner)

    def agent(self, uid: str) -> Agent | None:
        return self.broker.agents.get(uid)

    def agents(self, online_only: bool = False) -> list[tuple[Agent, bool]]:
        """(agent, online) pairs."""
        now = self.clock()
        agents = self.broker.online_agents(now) if online_only else self.broker.agents.values()
        return [(a, self.broker.is_online(a, now)) for a in agents]

    def online_capabilities(self, patterns: list[str] | None = None) -> list[str]:
        caps = self.broker.online_capabilities()
        return caps if patterns is None else [c for c in caps if pattern_allows(patterns, c)]

    def client_key(self, key: str) -> ClientKey | None:
        return self.broker.client_key(key)

    def keys(self) -> list[ClientKey]:
        return list(self.broker.keys.values())

    def health(self, **extra: Any) -> dict:
        body = {"status": "healthy", "cached_agents": len(self.broker.agents),
                "timestamp": iso(self.clock()), **extra}
        fault = self.journal.fault  # disk faults: reads go on, writes are refused
        if fault is not None:
            body.update(status="unhealthy", reason=fault.type, message=fault.message)
        return body

    def stats(self, internal: bool = False) -> dict:
        """Counts; `internal` adds the journal (its path, its size): for management only."""
        stats = {**self.broker.stats(self.clock()),
                 "uptimeSecs": round(self.clock() - self.started_at, 3), "version": __version__}
        return {**stats, "journal": self.journal.stats()} if internal else stats

    def summary(self) -> str:
        """The counts the start and stop lines log: tasks by state, agents."""
        stats = self.broker.stats(self.clock())
        counts: dict[str, int] = {}
        for by_status in stats["tasks"].values():
            for status, n in by_status.items():
                state = "ended" if status in ENDED else "pending" if status in (PENDING, "queued") else "running"
                counts[state] = counts.get(state, 0) + n
        agents = stats["agents"]
        return (f"tasks {counts.get('pending', 0)} pending, {counts.get('running', 0)} running, "
                f"{counts.get('ended', 0)} ended; agents {agents['all']} ({agents['online']} online)")

    def metrics_text(self) -> str:
        return self.metrics.text(self.broker, self.journal, self.clock())

    def ended_since(self, at: float) -> list[Task]:
        """The regular tasks (still kept) that ended at or after `at`, in the order they ended."""
        found = []
        for key in reversed(self.broker.ended):
            task = self.broker.tasks[key]
            if task.ended_at < at:
                break
            found.append(task)
        found.reverse()
        return found

    def tasks_by_key(self) -> dict[TaskKey, Task]:
        """Every task, live (read only): for views that walk them a slice at a time."""
        return self.broker.tasks

    def stream_keys(self, names: list[str], owner: str) -> set[TaskKey] | None:
        """`<cap>/<id>` names -> the task keys a stream is limited to (`owner`'s own)."""
        if not names:
            return None
        keys = set()
        for name in names:
            cap, _, task_id = name.rpartition("/")
            if not cap or not task_id:
                raise BadRequest("task must be given as <capability>/<id>")
            keys.add(self.broker.task(cap, task_id, owner).key)
        return keys

    async def task_page(self, query: TaskQuery) -> dict:
        """A page of /management/tasks/list (see the listing section)."""
        if query.client_key is not None and self.broker.client_key(query.client_key) is None:
            raise BadRequest("key must be a client API key of this server")
        return await task_page(self.broker.tasks, query)

    def full_listing(self, status: str | None) -> Any:
        """Every task (or those in `status`) in the original shape, as JSON chunks."""
        return full_listing(self.broker.tasks, status)


# ============================================================================ streams
#
# Server-Sent Events to many readers, slow ones included. A release of new events (see
# EventLog) costs one call to `wake()` whatever the number of streams; within
# STREAM_FLUSH_S one flusher task takes them from the ring, groups them once per
# audience (all of management, each client key, each stream limited to named tasks) and
# writes each group's bytes to its streams, a slice of streams per loop turn. A stream
# that starts (the current state, or a resumption from Last-Event-ID) is written by its
# own handler in slices that wait for the reader to take them, then joins the live set.
# A live reader whose unsent bytes pass `stream_buffer_bytes` is dropped with a last
# event that says why; it resumes with Last-Event-ID.

STREAM_FLUSH_S = 0.005      # live events this close together share one write per stream
FANOUT_SLICE = 32           # live streams written per loop turn
# With many streams a flush is long (a write each): the next one waits this many times
# as long as the last took, so that writing to readers takes at most about a fifth of
# the loop and requests go on being answered at their pace; events then come in bigger
# batches, a little later.
FANOUT_SPACING = 4.0
STREAM_SCAN_SLICE = 250     # tasks looked at per loop turn while a stream sends the current state
STREAM_CHUNK_BYTES = 64 << 10   # a starting stream writes this much at a time...
STREAM_LOW_WATER = 64 << 10     # ...and waits until the reader leaves less than this unsent
SSE_HEARTBEAT_S = 5.0       # a quiet stream gets a comment this often: its reader knows we live
STREAM_SWEEP_S = 1.0        # how often streams are checked for readers gone and heartbeats due
STREAM_DROP_GRACE_S = 10.0  # a dropped reader gets this long to read what was sent, then is cut


class StreamGone(Exception):
    """The stream ended while it was starting: the reader left, or was dropped."""


@dataclass(eq=False, slots=True)
class Subscriber:
    """One open event stream."""
    owner: str
    keys: set | None                # limited to these tasks, or None
    transport: asyncio.Transport
    chunked: bool                   # HTTP/1.1 chunked framing (we write past aiohttp's writer)
    ended: asyncio.Future           # result: None (reader left, server stopping) or (why, reason)
    position: int = 0               # the newest event id this stream has been written up to
    last_write: float = 0.0         # monotonic time of the last write, for heartbeats


class EventStreams:
    """Every open event stream of an app; its limits come from the hub's config."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.events = hub.events
        self.metrics = hub.metrics
        self.max_per_key = hub.config.max_streams_per_key
        self.buffer_bytes = hub.config.stream_buffer_bytes
        self.stall_s = hub.config.stream_stall_s
        self.open_by_owner: dict[str, set[Subscriber]] = {}  # every open stream: the cap
        # Live streams by audience, so that a batch is encoded once per audience.
        self.live_all: dict[Subscriber, None] = {}  # management, no task filter
        self.live_by_owner: dict[str, dict[Subscriber, None]] = {}  # client keys, no filter
        self.live_named: dict[Subscriber, None] = {}  # limited to named tasks
        self.flushed = self.events.released  # events up to this id went to the live streams
        self.flush_due = False
        self.flush_again = False
        self.next_flush_at = 0.0  # loop time before which no flush starts (FANOUT_SPACING)
        self.flusher: asyncio.Task | None = None
        self.sweeper: asyncio.Task | None = None
        self.events.on_publish = self.wake

    async def respond(self, request: web.Request, owner: str, names: list[str],
                      last_id: int | None, current: bool) -> web.StreamResponse:
        """The stream of `owner`'s tasks (or only those `names`d as `<cap>/<id>`; an
        unknown one answers 404 before any text) until the reader goes away."""
        keys = self.hub.stream_keys(names, owner)
        if request.transport is None:  # the reader left before its stream began
            return web.Response(status=204)
        chunked = request.version >= aiohttp.HttpVersion11
        sub = self.open(owner, keys, request.transport, chunked)  # 429 past the cap
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            if chunked:
                response.enable_chunked_encoding()
            await response.prepare(request)
            await self.serve(sub, response, last_id, current)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.close(sub)
        return response

    # ---------------------------------------------------------------- opening and closing

    def open(self, owner: str, keys: set | None, transport: asyncio.Transport, chunked: bool) -> Subscriber:
        mine = self.open_by_owner.setdefault(owner, set())
        if len(mine) >= self.max_per_key:
            raise TooManyRequests(f"this key already has {len(mine)} event streams open, the most "
                                  f"allowed (max_streams_per_key); close one or reuse it")
        loop = asyncio.get_running_loop()
        sub = Subscriber(owner, keys, transport, chunked, loop.create_future(), last_write=time.monotonic())
        mine.add(sub)
        self.metrics.event_streams += 1
        if self.sweeper is None or self.sweeper.done():
            self.sweeper = loop.create_task(self._sweep())
        return sub

    def close(self, sub: Subscriber) -> None:
        self._end(sub)
        mine = self.open_by_owner.get(sub.owner)
        if mine is not None and sub in mine:
            mine.discard(sub)
            self.metrics.event_streams -= 1
            if not mine:
                del self.open_by_owner[sub.owner]

    def _end(self, sub: Subscriber, why: str | None = None, reason: str = "") -> None:
        """Take the stream out of the live set; with `why` (STREAM_DROP_REASONS) its reader
        is dropped, and told `reason`."""
        if not sub.ended.done():
            sub.ended.set_result(None if why is None else (why, reason))
        self.live_all.pop(sub, None)
        self.live_named.pop(sub, None)
        live = self.live_by_owner.get(sub.owner)
        if live is not None:
            live.pop(sub, None)
            if not live:
                del self.live_by_owner[sub.owner]

    def close_all(self) -> None:
        """Shutdown: every stream ends now instead of holding the shutdown up; one whose
        reader is not reading is cut, as it could not take the end of the stream either."""
        for subs in list(self.open_by_owner.values()):
            for sub in list(subs):
                self._end(sub)
                if sub.transport.get_write_buffer_size() > STREAM_LOW_WATER:
                    sub.transport.abort()

    def stop(self) -> None:
        for task in (self.flusher, self.sweeper):
            if task is not None:
                task.cancel()

    # ---------------------------------------------------------------- writing

    def _write(self, sub: Subscriber, data: bytes) -> None:
        # Past aiohttp's writer (its write() is a coroutine): one transport write per
        # stream, no task switch. The headers went out through it first (see serve()).
        sub.transport.write(b"%x\r\n%b\r\n" % (len(data), data) if sub.chunked else data)
        sub.last_write = time.monotonic()

    def _send_live(self, sub: Subscriber, data: bytes) -> None:
        transport = sub.transport
        if transport.is_closing():
            self._end(sub)
            return
        unsent = transport.get_write_buffer_size()
        if unsent > self.buffer_bytes:
            self._end(sub, "slow", f"this reader fell behind: {unsent} bytes were still unsent, "
                                   f"past the limit of {self.buffer_bytes}; reconnect with "
                                   f"Last-Event-ID to resume")
            return
        self._write(sub, data)

    async def _paced_write(self, sub: Subscriber, data: bytes) -> None:
        """A starting stream's write: then wait (yielding to the loop) until the reader has
        taken most of it, so a reader that does not read holds a bounded amount."""
        if sub.transport.is_closing() or sub.ended.done():
            raise StreamGone
        self._write(sub, data)
        waited, pause = 0.0, 0.005
        while sub.transport.get_write_buffer_size() > STREAM_LOW_WATER:
            if sub.transport.is_closing() or sub.ended.done():
                raise StreamGone
            if waited >= self.stall_s:
                self._end(sub, "stalled", f"this reader read nothing for {self.stall_s:.0f} s; "
                                          f"reconnect with Last-Event-ID to resume")
                raise StreamGone
            await asyncio.sleep(pause)
            waited += pause
            pause = min(pause * 2, 0.25)
        await asyncio.sleep(0)  # slices of a long start never hold the loop

    async def _paced_events(self, sub: Subscriber, events: list[Event]) -> None:
        chunk: list[bytes] = []
        size = 0
        for event in events:
            chunk.append(event.frame)
            size += len(event.frame)
            if size >= STREAM_CHUNK_BYTES:
                await self._paced_write(sub, b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            await self._paced_write(sub, b"".join(chunk))

    # ---------------------------------------------------------------- one stream

    async def serve(self, sub: Subscriber, response: web.StreamResponse, last_id: int | None,
                    current: bool) -> None:
        """Write the stream's start, then hold it live until it ends. `response` is
        prepared; its first bytes go through it (so the headers go out first), the rest
        straight to the transport."""
        events = self.events
        # `seen` is read with no await since the events were taken: later events come in
        # the next round, never skipped. A reader whose Last-Event-ID resumes exactly is
        # told so (`: resumed`): it missed nothing and need not ask about its tasks.
        shown, seen = events.after(last_id, sub.owner, sub.keys), events.released
        await response.write(b": resumed\n\n" if shown is not None else b": connected\n\n")
        try:
            if shown is None:  # no usable Last-Event-ID: the current state first
                if last_id is not None:  # another server's (a failover), or too old
                    await self._send_ended_since(sub, seen, last_id)
                if current:
                    await self._send_current(sub, seen)
                shown = events.after(seen, sub.owner, sub.keys)
            while shown is None or shown or seen != events.released:
                if shown is None:  # the ring moved past us while we were writing
                    self._end(sub, "overrun", "this reader fell behind while the stream started; "
                                              "reconnect with Last-Event-ID to resume")
                    raise StreamGone
                await self._paced_events(sub, shown)
                position, seen = seen, events.released
                shown = events.after(position, sub.owner, sub.keys)
            # Caught up, with no await since `seen`: from here the flusher writes to it.
            sub.position = seen
            if sub.keys is not None:
                self.live_named[sub] = None
            elif sub.owner == MGMT_OWNER:
                self.live_all[sub] = None
            else:
                self.live_by_owner.setdefault(sub.owner, {})[sub] = None
            if self.hub.stopping:
                self._end(sub)
            await sub.ended
        except StreamGone:
            pass
        dropped = sub.ended.result() if sub.ended.done() else None
        if dropped is not None:
            why, reason = dropped
            self.metrics.stream_drops[why] += 1
            log.warning("event stream of %s dropped: %s", sub.owner[:8], reason)
            if not sub.transport.is_closing():
                self._write(sub, b"event: closed\ndata: %b\n\n" % orjson.dumps(
                    {"reason": reason, "lastEventId": sub.position or None}))
                response.force_close()
                # A reader that reads nothing would hold what is unsent forever: cut it.
                asyncio.get_running_loop().call_later(STREAM_DROP_GRACE_S, sub.transport.abort)

    async def _send_ended_since(self, sub: Subscriber, seen: int, last_id: int) -> None:
        """A Last-Event-ID this server cannot resume from (the ring moved past it, or another
        server gave it: a restart or a failover) still says when it was given: ids are a
        server's start in ms << 12 plus one per event, so `last_id >> 12` is at or before
        that moment. The `end` of each of the reader's tasks that ended since then comes
        first, all with id `seen`: a reader of results misses none across a failover
        (some it saw already may come again)."""
        since = (last_id >> 12) / 1000.0 - 1.0  # a second of slack for clocks that stepped
        frames = []
        for task in self.hub.ended_since(since):
            if (sub.keys is None or task.key in sub.keys) and (
                    sub.owner == MGMT_OWNER or task.owner == sub.owner):
                frames.append(sse_frame(seen, "end", orjson.dumps(assigned_json(task))))
            if len(frames) >= STREAM_SCAN_SLICE:
                await self._paced_write(sub, b"".join(frames))
                frames = []
        if frames:
            await self._paced_write(sub, b"".join(frames))

    async def _send_current(self, sub: Subscriber, seen: int) -> None:
        """The present state as `status` events, all with id `seen`: named tasks all,
        otherwise those of the reader not yet ended; a slice of tasks per loop turn."""
        tasks = self.hub.tasks_by_key()
        names = list(sub.keys) if sub.keys is not None else list(tasks)
        every = sub.owner == MGMT_OWNER
        for start in range(0, len(names), STREAM_SCAN_SLICE):
            frames = []
            for key in names[start:start + STREAM_SCAN_SLICE]:
                task = tasks.get(key)
                if task is None or sub.keys is None and (
                        task.status in ENDED or not every and task.owner != sub.owner):
                    continue
                frames.append(sse_frame(seen, "status", orjson.dumps(status_event(task, "current"))))
            if frames:
                await self._paced_write(sub, b"".join(frames))
            else:
                await asyncio.sleep(0)

    # ---------------------------------------------------------------- live fan-out

    def wake(self) -> None:
        """After each release of events: schedule one flush (O(1), nothing per stream)."""
        if not (self.live_all or self.live_by_owner or self.live_named):
            self.flushed = self.events.released
            return
        if not self.flush_due:
            self.flush_due = True
            loop = asyncio.get_running_loop()
            loop.call_at(max(loop.time() + STREAM_FLUSH_S, self.next_flush_at), self._start_flush)

    def _start_flush(self) -> None:
        self.flush_due = False
        if self.flusher is not None and not self.flusher.done():
            self.flush_again = True  # the running flush goes round once more
        else:
            self.flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.flush_again = False
            after, upto = self.flushed, self.events.released
            self.flushed = upto
            if upto > after:
                started = loop.time()
                await self._fan_out(after, upto)
                self.next_flush_at = loop.time() + FANOUT_SPACING * (loop.time() - started)
            if not self.flush_again:
                return
            await asyncio.sleep(max(0.0, self.next_flush_at - loop.time()))

    def _live(self) -> list[Subscriber]:
        return [*self.live_all, *self.live_named, *(s for d in self.live_by_owner.values() for s in d)]

    async def _fan_out(self, after: int, upto: int) -> None:
        batch = self.events.between(after, upto)
        if not batch:  # the ring moved past them: every live stream is behind
            for sub in self._live():
                self._end(sub, "overrun", "the server's event buffer moved past this stream; "
                                          "reconnect with Last-Event-ID")
            return
        # One pass groups the batch by audience (and by task, for streams limited to named
        # tasks); each audience's bytes are joined once.
        by_owner: dict[str, list[Event]] = {}
        public: list[Event] = []
        by_key: dict[TaskKey, list[Event]] = {}
        keyless: list[Event] = []  # agents, resets
        for event in batch:
            if event.owner is None:
                public.append(event)
            else:
                by_owner.setdefault(event.owner, []).append(event)
            if event.key is None:
                keyless.append(event)
            elif self.live_named:
                by_key.setdefault(event.key, []).append(event)
        visible = self.events.visible
        jobs: list[tuple[Subscriber, bytes]] = []
        if self.live_all:
            everything = b"".join(e.frame for e in batch)
            jobs += [(sub, everything) for sub in self.live_all]
        for owner, subs in self.live_by_owner.items():
            own = by_owner.get(owner, [])
            if own or public:
                shown = sorted(own + public, key=lambda e: e.id) if own and public else own or public
                data = b"".join(e.frame for e in shown)
                jobs += [(sub, data) for sub in subs]
        for sub in self.live_named:
            shown = [e for key in sub.keys for e in by_key.get(key, ())] + keyless
            if len(sub.keys) > 1 or keyless:
                shown.sort(key=lambda e: e.id)
            data = b"".join(e.frame for e in shown if visible(e, sub.owner, sub.keys))
            if data:
                jobs.append((sub, data))
            else:
                sub.position = upto
        first = batch[0].id
        for n, (sub, data) in enumerate(jobs):
            if n and n % FANOUT_SLICE == 0:
                await asyncio.sleep(0)  # a slice of streams per loop turn
            if sub.ended.done() or sub.position >= upto:
                continue
            if sub.position >= first:  # went live during this batch: only what is newer
                data = b"".join(e.frame for e in batch
                                if e.id > sub.position and visible(e, sub.owner, sub.keys))
            sub.position = upto
            if data:
                self._send_live(sub, data)

    async def _sweep(self) -> None:
        """Once a second: end the streams whose reader left (nothing tells a handler that
        waits), and write a heartbeat to the quiet ones."""
        while self.open_by_owner:
            await asyncio.sleep(STREAM_SWEEP_S)
            due = time.monotonic() - SSE_HEARTBEAT_S
            for sub in self._live():
                if sub.transport.is_closing():
                    self._end(sub)
                elif sub.last_write <= due:
                    self._send_live(sub, b": heartbeat\n\n")


# ============================================================================ auth

TOKEN_CACHE_SIZE = 10_000
# Why an agent's login or token is refused, in the same words on /agent/auth and on
# every private route, so the agent (and its operator) know to register again.
AGENT_GONE = "this agent no longer exists; register again"
AGENT_CREDENTIAL_REVOKED = "this agent's credential was revoked; register again (or log in with its new key)"


def secret_equal(given: str, expected: str) -> bool:
    # surrogateescape: a header with bytes that are not UTF-8 arrives with surrogates
    return hmac.compare_digest(given.encode(errors="surrogateescape"),
                               expected.encode(errors="surrogateescape"))


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class AgentTokens:
    """Agents' JWTs: issued here, and checked once each - later requests find the token
    in a bounded cache, oldest first, so the expired ones leave from the front. A token
    carries its issue time in microseconds (`us`), so a rotation of the agent's key
    refuses exactly the tokens issued before it."""

    def __init__(self, secret: str, lifetime_s: int, clock: Callable[[], float]):
        self.secret, self.lifetime_s, self.clock = secret, lifetime_s, clock
        # JWT -> (uid, exp, issued at in whole microseconds)
        self.cache: OrderedDict[str, tuple[str, float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.cache)

    def issue(self, agent: Agent) -> dict:
        issued = self.clock()
        now = int(issued)
        claims = {"sub": agent.uid, "iat": now, "exp": now + self.lifetime_s, "us": int(issued * 1e6)}
        return {"token": jwt.encode(claims, self.secret, algorithm="HS256"),
                "expiresIn": self.lifetime_s}

    def agent(self, token: str, find: Callable[[str], Agent | None]) -> Agent:
        """The agent (`find` looks it up by id) the token was issued to, or Unauthenticated:
        a bad or expired token, a deleted agent, or a token from before a rotation."""
        now = self.clock()
        cached = self.cache.get(token)
        if cached is None or cached[1] <= now:
            try:
                claims = jwt.decode(token, self.secret, algorithms=["HS256"],
                                    options={"require": ["exp", "iat", "sub"]})
            except jwt.PyJWTError as err:
                raise Unauthenticated(f"invalid agent token: {err}") from None
            issued_us = claims["us"] if isinstance(claims.get("us"), int) else int(claims["iat"]) * 1_000_000
            cached = self.cache[token] = (str(claims["sub"]), float(claims["exp"]), issued_us)
            while self.cache and (len(self.cache) > TOKEN_CACHE_SIZE
                                  or next(iter(self.cache.values()))[1] <= now):
                self.cache.popitem(last=False)
        agent = find(cached[0])
        if agent is None:
            self.cache.pop(token, None)
            raise Unauthenticated(AGENT_GONE)
        if cached[2] < int(agent.tokens_after * 1e6):  # as `issue` counts: whole microseconds
            self.cache.pop(token, None)
            raise Unauthenticated(AGENT_CREDENTIAL_REVOKED)
        return agent


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls /api/*: the owner digest of its key, its capability patterns, and the
    request body already parsed (the key may have come in it)."""
    owner: str
    patterns: list
    body: Any
    max_in_flight: int | None = None
    max_queued_bytes: int | None = None

    def with_body(self, body: Any) -> "Caller":
        """The same caller with the body read after its header credential was checked
        (positional: dataclasses.replace costs more than the rest of the check)."""
        return Caller(self.owner, self.patterns, body, self.max_in_flight, self.max_queued_bytes)


def header_credential(request: web.Request) -> bool:
    """A client credential in the headers: checked before the body is read."""
    headers = request.headers
    return "X-Mgmt-Token" in headers or "X-MGMT-API-KEY" in headers or "X-API-Key" in headers \
        or bearer(request) is not None


def client_caller(hub: Hub, request: web.Request, body: Any) -> Caller:
    # X-MGMT-API-KEY is the original's name for the same management override.
    token = request.headers.get("X-Mgmt-Token") or request.headers.get("X-MGMT-API-KEY")
    if token is not None:
        if secret_equal(token, hub.config.mgmt_token):
            return Caller(MGMT_OWNER, ["*"], body)
        raise Unauthenticated("wrong management token")
    key = request.headers.get("X-API-Key") or bearer(request)
    if key is None and isinstance(body, dict):
        key = body.get("apiKey")
    if not isinstance(key, str) or not key:
        raise Unauthenticated("missing API key: send X-API-Key, Authorization: Bearer, or apiKey")
    found = hub.client_key(key)
    if found is None and secret_equal(key, hub.config.mgmt_token):
        return Caller(MGMT_OWNER, ["*"], body)
    if found is None or found.is_revoked:
        raise Unauthenticated("unknown or revoked API key")
    return Caller(owner_of(key), found.capabilities, body, found.max_in_flight, found.max_queued_bytes)


def check_agent_registration_key(hub: Hub, key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise Unauthenticated("missing agent registration key (apiKey)")
    # Compare against every key so the time taken does not say which one was close.
    if not sum(secret_equal(key, k) for k in hub.config.agent_api_keys):
        raise Unauthenticated("unknown agent registration key")


def agent_caller(hub: Hub, tokens: AgentTokens, request: web.Request) -> Agent:
    """The agent behind `Authorization: Bearer <JWT>`; a deleted or rotated agent's token fails."""
    token = bearer(request)
    if token is None:
        raise Unauthenticated("missing agent token: send Authorization: Bearer <token>")
    return tokens.agent(token, hub.agent)


def check_management(hub: Hub, request: web.Request) -> None:
    token = request.headers.get("X-Mgmt-Token") or bearer(request)
    if not token:
        raise Unauthenticated("missing management token: send X-Mgmt-Token")
    if not secret_equal(token, hub.config.mgmt_token):
        raise Unauthenticated("wrong management token")


def management_credential(request: web.Request) -> bool:
    """A management token was sent (right or wrong): routes open to all show it more."""
    return "X-Mgmt-Token" in request.headers or bearer(request) is not None


# Open routes that check a credential themselves (registration key, agent key, token):
# with client and management routes, those AuthThrottle counts. Agents' JWTs are
# signatures nobody guesses, so agent routes are not counted.
CREDENTIAL_HANDLERS = {"handle_agent_register", "handle_agent_auth", "handle_metrics", "handle_stats"}


class AuthThrottle:
    """Failed authentications per client address, as a token bucket: a burst of
    `per_min` failures, then one more each 60/per_min s. An address out of tokens gets 429
    on every credential check (a right key too: otherwise the 429 would tell a guess
    right from wrong) until a token refills. Pure: the caller passes `now`. The table is
    capped: the address that failed longest ago goes first. IPv6 counts per /64."""
    MAX_ADDRESSES = 10_000

    def __init__(self, per_min: int = 60, window_s: float = 60.0):
        self.burst = float(per_min)
        self.rate = per_min / window_s  # tokens back per second
        self.window_s = window_s
        # address -> [tokens, updated at, failures not yet logged]
        self.table: OrderedDict[str, list] = OrderedDict()

    @staticmethod
    @functools.lru_cache(maxsize=4096)  # asked on every guarded request; callers repeat
    def address_key(addr: str | None) -> str:
        try:
            ip = ipaddress.ip_address(addr or "")
        except ValueError:
            return str(addr)
        if ip.version == 6:
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def _tokens(self, entry: list, now: float) -> float:
        entry[0] = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        entry[1] = now
        return entry[0]

    def wait_s(self, addr: str | None, now: float) -> float:
        """0 when this address may try a credential, else the seconds until it may."""
        if not self.table:  # nobody failed lately: the usual case, kept cheap
            return 0.0
        entry = self.table.get(self.address_key(addr))
        if entry is None:
            return 0.0
        tokens = self._tokens(entry, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def failed(self, addr: str | None, now: float) -> bool:
        """Count a failure; True when it is the address's first since the last summary
        (log it now; the rest are summed up by `summaries`)."""
        key = self.address_key(addr)
        entry = self.table.get(key)
        if entry is None:
            entry = self.table[key] = [self.burst, now, 0]
            if len(self.table) > self.MAX_ADDRESSES:
                self.table.popitem(last=False)
        self.table.move_to_end(key)
        # Failures already past the check when the tokens ran out still count, but never
        # push the wait past one window (Retry-After stays at most 60 s).
        entry[0] = max(self._tokens(entry, now) - 1, 1 - self.burst)
        entry[2] += 1
        return entry[2] == 1

    def summaries(self, now: float) -> list[tuple[str, int]]:
        """(address, failures) since the last call, beyond the first one already logged;
        forgets addresses whose bucket is full again."""
        out = []
        for key, entry in list(self.table.items()):
            if entry[2] > 1:
                out.append((key, entry[2]))
            entry[2] = 0
            if self._tokens(entry, now) >= self.burst:
                del self.table[key]
        return out


# ============================================================================ handlers

HUB = web.AppKey("hub", Hub)
STREAMS = web.AppKey("streams", EventStreams)
TOKENS = web.AppKey("tokens", AgentTokens)
OPENAPI = web.AppKey("openapi", dict)
THROTTLE = web.AppKey("auth_throttle", AuthThrottle)
MAX_HOLDING = 10_000  # task ids an agent may list in one ping
MAX_QUEUED_BYTES = 1 << 50


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, error_type: str, message: str, **extra: Any) -> web.Response:
    return json_response({"error": {"type": error_type, "message": message, "status": status},
                          **extra}, status)


class BodyBudget:
    """Bytes of request bodies being read at once, across all requests: past the limit a
    request is answered 503 `overloaded` instead of being read into memory."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise retry_after(Overloaded("the server is reading too many request bodies at "
                                         "once; retry shortly"), BODY_RETRY_AFTER_S)
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


BODY_BUDGET = web.AppKey("body_budget", BodyBudget)
BODY_RETRY_AFTER_S = 2
# Set on a request whose body is unusable: answer, then close the connection.
CUT = web.RequestKey("cut", bool)


async def read_body(request: web.Request) -> bytes:
    """The whole body, within the body timeout, the size limit and the body budget.
    Content-Length is reserved up front; a chunked or compressed body as it grows."""
    config, budget = request.app[HUB].config, request.app[BODY_BUDGET]
    limit = config.max_body_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=declared)
    reserved, body = 0, bytearray()

    def add(chunk: bytes) -> None:
        nonlocal reserved
        body.extend(chunk)
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
        if len(body) > reserved:
            budget.take(len(body) - reserved)
            reserved = len(body)

    try:
        if declared:
            budget.take(declared)
            reserved = declared
        if request.content.is_eof():  # it all came with the headers: nothing to wait for
            add(request.content.read_nowait())
        else:
            async with asyncio.timeout(config.body_timeout_s):
                while chunk := await request.content.readany():
                    add(chunk)
    except TimeoutError:
        request[CUT] = True
        raise RequestTimeout("the body did not arrive within "
                             f"{plain_number(config.body_timeout_s)} s") from None
    except (aiohttp.http_exceptions.BadHttpMessage, web.RequestPayloadError):  # e.g. a broken gzip body
        request[CUT] = True  # the rest of the stream cannot be read either
        encoding = request.headers.get("Content-Encoding", "identity")
        raise BadRequest(f"the body cannot be read (Content-Encoding: {encoding}, "
                         "Transfer-Encoding or length broken)") from None
    finally:
        budget.give(reserved)
    return bytes(body)


async def read_json(request: web.Request, required: bool = True) -> Any:
    raw = await read_body(request)
    if not raw.strip():
        if required:
            raise BadRequest("a JSON body is required")
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        try:
            raw.decode()
        except UnicodeDecodeError as bad:
            raise BadRequest(f"the body is not valid UTF-8 (byte {bad.start})") from None
        raise BadRequest(f"malformed JSON: {err}") from None
    # Nesting needs one bracket per level: a body with fewer brackets cannot be too deep.
    if raw.count(b"[") + raw.count(b"{") > MAX_BODY_DEPTH and not storable_depth(body):
        raise BadRequest(f"the body is nested more than {MAX_BODY_DEPTH} levels deep")
    return body


def path_task(request: web.Request) -> tuple[str, str]:
    """(capability, id) from the path; the capability arrives percent-encoded. Decoded
    once, from the raw path: match_info is already decoded, and decoding it again would
    turn a capability's literal `%41` into `A`."""
    fixed = request.match_info.route.resource.canonical.split("{", 1)[0].strip("/").count("/") + 1
    segments = request.rel_url.raw_path.split("/")[1 + fixed:]
    raw_cap, raw_id = "/".join(segments[:-1]), segments[-1]
    try:
        cap = unquote(raw_cap, errors="strict")
        task_id = unquote(raw_id, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("bad percent-encoding in the task path") from None
    return check_capability(cap), task_id


def wait_param(request: web.Request, default: float | None, name: str = "wait") -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        wait_s = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number of seconds") from None
    if not 0 <= wait_s <= MAX_WAIT_S:
        raise BadRequest(f"{name} must be between 0 and {MAX_WAIT_S:.0f} seconds")
    return wait_s


def flag_param(request: web.Request, name: str, default: bool = False) -> bool:
    raw = request.query.get(name, "1" if default else "0").lower()
    if raw not in ("0", "1", "true", "false"):
        raise BadRequest(f"{name} must be 1/true or 0/false")
    return raw in ("1", "true")


def connection_gone(request: web.Request) -> Callable[[], bool]:
    return lambda: request.transport is None or request.transport.is_closing()


def last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    try:
        return int(raw) if raw else None
    except ValueError:
        raise BadRequest("Last-Event-ID must be an event id from this stream") from None


# ---------------------------------------------------------------- request bodies

_FILE_REF_FIELDS = ("path", "get", "gitClone", "httpLogin", "httpPassword", "httpAuthHeader")


def _file_refs(value: Any, name: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be a list of file references")
    refs = []
    for i, ref in enumerate(value):
        if not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or not ref["path"]:
            raise BadRequest(f"{name}[{i}] must be an object with a non-empty string 'path'")
        for key in _FILE_REF_FIELDS:
            if ref.get(key) is not None and not isinstance(ref[key], str):
                raise BadRequest(f"{name}[{i}].{key} must be a string")
        if ref.get("customHeader") is not None and not isinstance(ref["customHeader"], dict):
            raise BadRequest(f"{name}[{i}].customHeader must be an object")
        refs.append({k: v for k, v in ref.items() if v is not None})
    return refs


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


def _number(body: dict, name: str, low: float, high: float, integer: bool = False) -> Any:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"{name} must be {kind} from {plain_number(low)} to {plain_number(high)}")
    return value


# Lifecycle extensions of a submission: name -> (low, high, integer).
SUBMIT_LIMITS = {
    "priority": (0, 9, True),
    "maxRetries": (0, 100, True),
    "retryDelaySecs": (0, MAX_RETRY_DELAY_S, False),
    "maxWaitSecs": (0.001, 366 * 86400, False),
    "timeoutSecs": (0.001, 366 * 86400, False),
    "runtimeSecs": (0.001, 366 * 86400, False),
    "delaySecs": (0, 366 * 86400, False),
}


def parse_submission(body: Any) -> dict:
    """A TaskSubmissionRequest as stored and handed to agents (never with its apiKey).
    Extension fields appear only when the client sent them, so original agents see the
    original shape."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    data = {
        "capability": check_capability(body.get("capability")),
        "urgent": _flag(body, "urgent"),
        "restartable": _flag(body, "restartable"),
        "payload": body.get("payload"),
        "fetchFiles": _file_refs(body.get("fetchFiles"), "fetchFiles"),
        "artifacts": _file_refs(body.get("artifacts"), "artifacts"),
    }
    for name, (low, high, integer) in SUBMIT_LIMITS.items():
        if body.get(name) is not None:
            data[name] = _number(body, name, low, high, integer)
    if body.get("retryOnSameNode") is not None:
        data["retryOnSameNode"] = _flag(body, "retryOnSameNode")
    if body.get("runAt") is not None:
        if "delaySecs" in data:
            raise BadRequest("give runAt or delaySecs, not both")
        try:
            parse_iso(body["runAt"])
        except (TypeError, ValueError):
            raise BadRequest("runAt must be an RFC 3339 time like 2026-11-28T10:00:00Z") from None
        data["runAt"] = body["runAt"]
    inputs, output = body.get("file_bucket"), body.get("output_bucket")
    if inputs is not None:
        if not isinstance(inputs, list) or len(inputs) > MAX_TASK_BUCKETS \
                or not all(isinstance(uid, str) and uid for uid in inputs):
            raise BadRequest(f"file_bucket must be a list of at most {MAX_TASK_BUCKETS} bucket ids")
        data["file_bucket"] = list(dict.fromkeys(inputs))
    if output is not None:
        if not isinstance(output, str) or not output:
            raise BadRequest("output_bucket must be a bucket id")
        data["output_bucket"] = output
    if data["urgent"] and ("runAt" in data or "delaySecs" in data or "priority" in data):
        raise BadRequest("urgent tasks run now: runAt, delaySecs and priority are for regular tasks")
    return data


DISPLAY_NAME_MAX, APP_VERSION_MAX = 50, 100


def parse_agent_info(body: Any) -> dict:
    """The agent's self-description from register and info/update."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    caps = body.get("capabilities")
    if not isinstance(caps, list):
        raise BadRequest("capabilities must be a list of strings")
    caps = [check_capability(c, "each capability") for c in caps]
    tier = body.get("tier")
    tier = 0 if tier is None else tier  # null is absent, as the document says
    if not isinstance(tier, int) or isinstance(tier, bool) or not 0 <= tier <= 255:
        raise BadRequest("tier must be an integer from 0 to 255")
    capacity = body.get("capacity")
    capacity = 1 if capacity is None else capacity
    if not isinstance(capacity, int) or isinstance(capacity, bool) or not 1 <= capacity <= MAX_CAPACITY:
        raise BadRequest(f"capacity must be an integer from 1 to {MAX_CAPACITY}")
    system_info = body.get("systemInfo")
    system_info = {} if system_info is None else system_info
    if not isinstance(system_info, dict):
        raise BadRequest("systemInfo must be an object")
    info = {"capabilities": caps, "tier": tier, "capacity": capacity, "systemInfo": system_info}
    if body.get("heartbeatSecs") is not None:  # only then in the record: old agents' stay as they were
        info["heartbeatSecs"] = _number(body, "heartbeatSecs", 1, MAX_HEARTBEAT_S)
    for name, limit in (("displayName", DISPLAY_NAME_MAX), ("appVersion", APP_VERSION_MAX)):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str) or len(value) > limit:
                raise BadRequest(f"{name} must be a string of at most {limit} characters")
            info[name] = value
    return info


def parse_holding(body: Any) -> set[TaskKey] | None:
    """A ping's `holding` list -> task keys; None when the ping reports nothing."""
    if not isinstance(body, dict) or body.get("holding") is None:
        if isinstance(body, dict):
            return None
        raise BadRequest("the body must be a JSON object")
    holding = body["holding"]
    if not isinstance(holding, list) or len(holding) > MAX_HOLDING:
        raise BadRequest(f"holding must be a list of at most {MAX_HOLDING} task ids")
    keys = set()
    for item in holding:
        if not isinstance(item, dict) or not isinstance(item.get("cap"), str) \
                or not isinstance(item.get("id"), str):
            raise BadRequest('each holding entry must be {"cap": "...", "id": "..."}')
        keys.add((item["cap"], item["id"]))
    return keys


def check_body_id(body: Any, cap: str, task_id: str) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    given = body.get("id")
    if isinstance(given, dict):
        same = given.get("id") == task_id and given.get("cap", cap) == cap
    else:
        same = given == task_id
    if not same:
        raise BadRequest("the id in the body does not match the id in the path")
    return body


def optional_text(body: dict, name: str) -> str | None:
    """The original agent sends the string "None" for absent values."""
    value = body.get(name)
    if value is None or value == "None":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return value


RESOLVE_OUTCOMES = ("success", "failure", "notExecuted")


def parse_outcome(status: Any) -> tuple[str, str | None]:
    """API.md's resolve status -> (outcome, message)."""
    if isinstance(status, str) and status in RESOLVE_OUTCOMES:
        return status, None
    if not isinstance(status, dict) or len(status) != 1 or next(iter(status)) not in RESOLVE_OUTCOMES:
        raise BadRequest('status must be {"success": secs}, {"failure": [msg, secs]} '
                         'or {"notExecuted": msg}')
    outcome, detail = next(iter(status.items()))
    if outcome == "failure":
        message = detail[0] if isinstance(detail, list) and detail else detail
    else:
        message = detail if outcome == "notExecuted" else None
    return outcome, None if message is None else str(message)


def parse_key_update(body: Any) -> tuple[str, list[str], int | None, int | None]:
    """(key, capability patterns, maxInFlight, maxQueuedBytes); a new key's own rule is
    the hub's (Hub.update_key), since a key that exists may be shorter."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    key, patterns = body.get("key"), body.get("capabilities")
    if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_CHARS:
        raise BadRequest(KEY_RULE)
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p and not CONTROL_CHARS.search(p)
                                                 for p in patterns):
        raise BadRequest("capabilities must be a list of non-empty strings (patterns like *, llm.*)")
    limit = body.get("maxInFlight")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BadRequest("maxInFlight must be a positive integer or null")
    max_bytes = body.get("maxQueuedBytes")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or not 1 <= max_bytes <= MAX_QUEUED_BYTES):
        raise BadRequest(f"maxQueuedBytes must be an integer from 1 to {MAX_QUEUED_BYTES} or null")
    return key, patterns, limit, max_bytes


def allowed_submission(client: Caller, urgent_only: bool = False) -> dict:
    data = parse_submission(client.body)
    if urgent_only and not data["urgent"]:
        raise BadRequest("submit_blocking takes urgent tasks only: set \"urgent\": true")
    if not pattern_allows(client.patterns, data["capability"]):
        raise Forbidden(f"this key may not submit {data['capability']}")
    return data


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= 255:
        raise BadRequest("Idempotency-Key must be 1 to 255 characters")
    return key


async def write_chunks(request: web.Request, chunks: Any, content_type: str) -> web.StreamResponse:
    """Each chunk written once the reader has taken most of the one before."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    try:
        async for chunk in chunks:
            await response.write(chunk)
    except ConnectionError:  # the reader left: nothing more to make
        pass
    finally:
        await chunks.aclose()
    return response


def task_query(request: web.Request) -> TaskQuery:
    """The filters of /management/tasks/list, and its page if any is asked for."""
    q = request.query
    status, queue, capability = q.get("status"), q.get("queue"), q.get("capability")
    if status is not None and status not in TASK_STATUSES:
        raise BadRequest(f"status must be one of {', '.join(TASK_STATUSES)}")
    if queue not in (None, "urgent", "regular"):
        raise BadRequest("queue must be urgent or regular")
    task = None
    if "task" in q:
        cap, _, task_id = q["task"].rpartition("/")
        if not cap or not task_id:
            raise BadRequest("task must be given as <capability>/<id>")
        task = (cap, task_id)
    raw_limit, cursor = q.get("limit", str(DEFAULT_PAGE)), q.get("cursor")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_PAGE}")
    if cursor is not None and not CURSOR_RE.fullmatch(cursor):
        raise BadRequest("cursor must be the `next` of an earlier page")
    client_key = q.get("key")
    return TaskQuery(status, None if capability is None else check_capability(capability),
                     None if queue is None else queue == "urgent",
                     None if client_key is None else owner_of(client_key), client_key, task,
                     not PAGE_PARAMS.isdisjoint(q.keys()), int(raw_limit), cursor)


# ---------------------------------------------------------------- client API

async def handle_task_submit(request: web.Request, client: Caller) -> web.Response:
    data, key = allowed_submission(client), idempotency_key(request)
    task, created = await request.app[HUB].submit(data, client.owner, client.max_in_flight, key,
                                                  client.max_queued_bytes)
    code = (202 if task.urgent else 201) if created else 200
    # A new task is answered as submitted: an agent's long poll may already have taken it
    # while its record reached the disk.
    return json_response({"id": task_id_json(task), "capability": task.cap,
                          "status": PENDING if created else task.status,
                          "message": "Added to tasks queue" if created else
                          f"An earlier submit with this Idempotency-Key made this task; it is {task.status}"},
                         code)


async def handle_task_submit_blocking(request: web.Request, client: Caller) -> web.Response:
    data = allowed_submission(client, urgent_only=True)
    task = await request.app[HUB].submit_and_wait(data, client.owner, client.max_in_flight,
                                                  client.max_queued_bytes)
    return json_response(assigned_json(task))


async def handle_task_poll(request: web.Request, client: Caller) -> web.Response:
    cap, task_id = path_task(request)
    task = await request.app[HUB].poll(cap, task_id, client.owner, wait_param(request, 0.0))
    return json_response(status_json(task))


async def handle_task_cancel(request: web.Request, client: Caller) -> web.Response:
    """Extension: cancel a task submitted with this key."""
    task = await request.app[HUB].cancel(*path_task(request), client.owner)
    return json_response(status_json(task))


async def events_of(request: web.Request, owner: str) -> web.StreamResponse:
    """With a Last-Event-ID the stream resumes after it; without one (or one too old) it
    starts with the current state, unless `?current=0`. Repeated `?task=<cap>/<id>`
    limits it to those tasks. See EventStreams."""
    names, current = request.query.getall("task", []), flag_param(request, "current", True)
    return await request.app[STREAMS].respond(request, owner, names, last_event_id(request), current)


async def handle_task_events(request: web.Request, client: Caller) -> web.StreamResponse:
    """Extension: the key's tasks as Server-Sent Events."""
    return await events_of(request, client.owner)


async def handle_capabilities_online(request: web.Request, client: Caller) -> web.Response:
    return json_response(request.app[HUB].online_capabilities(client.patterns))


async def handle_health(request: web.Request) -> web.Response:
    body = request.app[HUB].health(cached_tokens=len(request.app[TOKENS]))
    return json_response(body, 200 if body["status"] == "healthy" else 503)


async def handle_ready(request: web.Request) -> web.Response:
    """Readiness: 200 where writes go now (the leader), 503 on a standby or while the
    disk refuses writes; for a load balancer or a Kubernetes readiness probe."""
    body = request.app[HUB].readiness()
    return json_response(body, 200 if body["ready"] else 503)


async def handle_stats(request: web.Request) -> web.Response:
    """Counts for anyone; the journal (its path, its size) only with the management token."""
    hub, internal = request.app[HUB], management_credential(request)
    if internal:
        check_management(hub, request)
    return json_response(hub.stats(internal))


# ---------------------------------------------------------------- agent API

async def handle_agent_register(request: web.Request) -> web.Response:
    hub, body = request.app[HUB], await read_json(request)
    check_agent_registration_key(hub, body.get("apiKey") if isinstance(body, dict) else None)
    agent = await hub.register_agent(parse_agent_info(body))
    return json_response({"agentId": agent.uid, "key": agent.key, "message": "Registered"})


async def handle_agent_auth(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("agentId"), str) \
            or not isinstance(body.get("key"), str):
        raise BadRequest("agentId and key are required strings")
    agent = request.app[HUB].agent(body["agentId"])
    # Saying why tells an agent to register again instead of retrying forever; agent ids
    # are random ULIDs and failed logins are throttled, so it reveals nothing guessable.
    if agent is None:
        raise Unauthenticated(AGENT_GONE)
    if not secret_equal(body["key"], agent.key):
        raise Unauthenticated(AGENT_CREDENTIAL_REVOKED if agent.tokens_after else "wrong key for this agent")
    return json_response(request.app[TOKENS].issue(agent))


async def handle_agent_ping(request: web.Request, agent: Agent) -> web.Response:
    """With `{"holding": [TaskId, ...]}` the tasks the agent no longer holds are released."""
    body = await read_json(request, required=False) if request.method == "POST" else {}
    answer = await request.app[HUB].ping(agent.uid, parse_holding(body))
    return json_response({**answer, "cached_tokens": len(request.app[TOKENS])})


async def handle_agent_rotate_key(request: web.Request, agent: Agent) -> web.Response:
    """Extension: a fresh login secret and a token for it; earlier tokens stop working."""
    agent, _ = await request.app[HUB].rotate_agent_key(agent.uid)
    return json_response({"agentId": agent.uid, "key": agent.key, **request.app[TOKENS].issue(agent)})


async def handle_agent_info_update(request: web.Request, agent: Agent) -> web.Response:
    info = parse_agent_info(await read_json(request))
    await request.app[HUB].update_agent(agent.uid, info)
    return json_response({"agentId": agent.uid, "key": agent.key, "message": "Updated"})


async def _agent_poll(request: web.Request, agent: Agent, urgent_only: bool) -> web.Response:
    """Extension: `?take=1` also takes the task and answers the AssignedTask."""
    take, wait_s = flag_param(request, "take"), wait_param(request, DEFAULT_AGENT_WAIT_S)
    task = await request.app[HUB].next_task(agent.uid, wait_s, urgent_only,
                                            connection_gone(request), take)
    if task is None:
        return json_response(None)
    return json_response(assigned_json(task) if take else unassigned_json(task))


async def handle_agent_task_poll(request: web.Request, agent: Agent) -> web.Response:
    return await _agent_poll(request, agent, urgent_only=False)


async def handle_agent_task_poll_urgent(request: web.Request, agent: Agent) -> web.Response:
    return await _agent_poll(request, agent, urgent_only=True)


async def handle_agent_take(request: web.Request, agent: Agent) -> web.Response:
    task = await request.app[HUB].take(agent.uid, *path_task(request))
    return json_response(assigned_json(task))


async def handle_agent_progress(request: web.Request, agent: Agent) -> web.Response:
    cap, task_id = path_task(request)
    body = check_body_id(await read_json(request), cap, task_id)
    stage, log_update = optional_text(body, "stage"), optional_text(body, "logUpdate")
    task = await request.app[HUB].progress(agent.uid, cap, task_id, stage, log_update)
    if task.cancel_requested_at is not None:  # extension: tell the agent to stop
        return json_response({"message": "task update confirmed", "cancel": True})
    return json_response({"message": "task update confirmed"})


async def handle_agent_cancels(request: web.Request, agent: Agent) -> web.Response:
    """Extension: long poll for the held tasks this agent should stop (ids), or []."""
    wait_s = wait_param(request, DEFAULT_AGENT_WAIT_S)
    return json_response(await request.app[HUB].cancel_requests(agent.uid, wait_s,
                                                                connection_gone(request)))


async def handle_agent_resolve(request: web.Request, agent: Agent) -> web.Response:
    """Extension: `?next=<seconds>` then long-polls and takes the agent's next task,
    answered as `"next": AssignedTask | null` (one round trip per task)."""
    hub, (cap, task_id) = request.app[HUB], path_task(request)
    body = check_body_id(await read_json(request), cap, task_id)
    outcome, message = parse_outcome(body.get("status"))
    next_wait_s = wait_param(request, None, "next")
    if next_wait_s is None:
        await hub.resolve(agent.uid, cap, task_id, outcome, message, body.get("output"))
        return json_response({"message": "task report confirmed"})
    nxt = await hub.resolve_and_next(agent.uid, cap, task_id, outcome, message, body.get("output"),
                                     next_wait_s, connection_gone(request))
    return json_response({"message": "task report confirmed",
                          "next": None if nxt is None else assigned_json(nxt)})


# ---------------------------------------------------------------- management API

async def handle_mgmt_events(request: web.Request) -> web.StreamResponse:
    """Extension: every task and agent change as Server-Sent Events (for the console)."""
    return await events_of(request, MGMT_OWNER)


async def handle_metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    if not hub.config.metrics_public:
        check_management(hub, request)
    return web.Response(text=hub.metrics_text(), content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def handle_mgmt_capabilities_online(request: web.Request) -> web.Response:
    return json_response(request.app[HUB].online_capabilities())


async def handle_mgmt_agents_list(request: web.Request) -> web.Response:
    agents = request.app[HUB].agents()
    return json_response([agent_json_for_management(a, online) for a, online in agents])


async def handle_mgmt_agents_list_online(request: web.Request) -> web.Response:
    agents = request.app[HUB].agents(online_only=True)
    return json_response([agent_json_for_management(a, online) for a, online in agents])


async def handle_version(request: web.Request) -> web.Response:
    return json_response({"version": __version__})


async def handle_mgmt_agent_delete(request: web.Request) -> web.Response:
    await request.app[HUB].delete_agent(request.match_info["agent_id"])
    return json_response("Agent deleted")


async def handle_mgmt_agent_rotate_key(request: web.Request) -> web.Response:
    """Extension: revoke the agent's credential (a new secret, earlier JWTs refused)."""
    return json_response(agent_json(*await request.app[HUB].rotate_agent_key(request.match_info["agent_id"])))


async def handle_mgmt_agents_reset(request: web.Request) -> web.Response:
    await request.app[HUB].reset_agents()
    return json_response({"result": "Reset successful"})


async def handle_mgmt_tasks_list(request: web.Request) -> web.StreamResponse:
    """Extension: filters `status`, `capability`, `queue`, `key`, `task`; with any but
    `status`, or with `limit`/`cursor`, one page newest first plus `next` and `total`.
    Alone or with `status` only (dead letters), every task in the original shape."""
    query, hub = task_query(request), request.app[HUB]
    if not query.paged:
        return await write_chunks(request, hub.full_listing(query.status), "application/json")
    return json_response(await hub.task_page(query))


async def handle_mgmt_task_cancel(request: web.Request) -> web.Response:
    task = await request.app[HUB].cancel(*path_task(request), MGMT_OWNER)
    return json_response(assigned_json(task))


async def handle_mgmt_task_requeue(request: web.Request) -> web.Response:
    task = await request.app[HUB].requeue(*path_task(request))
    return json_response(assigned_json(task))


async def handle_mgmt_agent_drain(request: web.Request) -> web.Response:
    return json_response(agent_json(*await request.app[HUB].drain(request.match_info["agent_id"])))


async def handle_mgmt_agent_resume(request: web.Request) -> web.Response:
    return json_response(agent_json(*await request.app[HUB].resume(request.match_info["agent_id"])))


async def handle_mgmt_tasks_reset(request: web.Request) -> web.Response:
    await request.app[HUB].reset_tasks()
    return json_response({"result": "Reset successful"})


async def handle_mgmt_keys_list(request: web.Request) -> web.Response:
    return json_response([key_json(k) for k in request.app[HUB].keys()])


async def handle_mgmt_key_update(request: web.Request) -> web.Response:
    key, patterns, limit, max_bytes = parse_key_update(await read_json(request))
    return json_response(key_json(await request.app[HUB].update_key(key, patterns, limit, max_bytes)))


async def handle_mgmt_key_revoke(request: web.Request) -> web.Response:
    return json_response(key_json(await request.app[HUB].revoke_key(request.match_info["key"])))


# ---------------------------------------------------------------- storage API
# File buckets (see the bucket files section): the client's routes under /api/storage,
# the agent's under /private/agent/bucket (only buckets a task it holds names), and
# management's under /management/storage.

def storage_limits(config: Config) -> dict:
    minutes = config.storage_bucket_ttl_s / 60
    return {"max_buckets_per_key": config.storage_max_buckets_per_key,
            "bucket_size_bytes": config.storage_bucket_size_bytes,
            "bucket_ttl_minutes": int(minutes) if minutes == int(minutes) else minutes}


async def multipart_file(request: web.Request) -> tuple[str, Any]:
    """The part named `file` of a multipart/form-data body: (its file name, an async
    iterator of its bytes as they arrive; each chunk within the body timeout). The body is
    never read whole: a file may be far larger than any JSON body."""
    if request.content_type != "multipart/form-data":
        raise BadRequest("send the file as multipart/form-data, in a part named `file`")
    timeout_s = request.app[HUB].config.body_timeout_s
    broken = (ValueError, AssertionError, aiohttp.http_exceptions.BadHttpMessage, web.RequestPayloadError)

    async def within(awaitable: Any) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                return await awaitable
        except TimeoutError:
            request[CUT] = True
            raise RequestTimeout(f"the body stalled for {plain_number(timeout_s)} s") from None
        except broken as err:
            request[CUT] = True
            raise BadRequest(f"the multipart body cannot be read: {err}") from None

    reader = await within(request.multipart())
    while True:
        part = await within(reader.next())
        if part is None:
            raise BadRequest("the multipart body has no part named `file`")
        if isinstance(part, aiohttp.BodyPartReader) and part.name == "file":
            break
        await within(part.release())
    if not part.filename:
        raise BadRequest("the `file` part needs a filename (Content-Disposition: form-data; "
                         'name="file"; filename="...")')

    async def chunks() -> Any:
        while chunk := await within(part.read_chunk(FILE_CHUNK)):
            yield chunk
        # The rest must parse up to the closing boundary: a body cut short is not a file.
        while (rest := await within(reader.next())) is not None:
            await within(rest.release())
    return part.filename, chunks()


def content_disposition(name: str) -> str:
    fallback = re.sub(r'[^\x20-\x7e]|["\\]', "_", name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


async def send_file(request: web.Request, bucket: Bucket, file_uid: str) -> web.StreamResponse:
    """The file's bytes, read a chunk at a time as the reader takes them."""
    file, fd = request.app[HUB].open_file(bucket, file_uid)
    loop = asyncio.get_running_loop()
    with open(fd, "rb", buffering=0) as source:
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": content_disposition(file.name), "X-Content-SHA256": file.sha256})
        response.content_length = file.size
        await response.prepare(request)
        try:
            while chunk := await loop.run_in_executor(None, source.read, FILE_CHUNK):
                await response.write(chunk)
        except ConnectionError:  # the reader left
            pass
    return response


def bucket_stat_json(hub: Hub, bucket: Bucket) -> dict:
    limit = hub.config.storage_bucket_size_bytes
    return {"bucket_uid": bucket.uid,
            "files": [bucket_file_json(f, hub.file_present(bucket, f)) for f in bucket.files.values()],
            "used_bytes": bucket.used, "remaining_bytes": max(0, limit - bucket.used)}


async def handle_storage_limits(request: web.Request, client: Caller) -> web.Response:
    return json_response(storage_limits(request.app[HUB].config))


async def handle_storage_buckets(request: web.Request, client: Caller) -> web.Response:
    hub = request.app[HUB]
    limit, ttl_s = hub.config.storage_bucket_size_bytes, hub.config.storage_bucket_ttl_s
    return json_response({"buckets": [bucket_json(b, limit, ttl_s)
                                      for b in hub.broker.owner_buckets(client.owner)]})


async def handle_storage_bucket_create(request: web.Request, client: Caller) -> web.Response:
    """Extension: `{"rm_after_task": true}` deletes the bucket once its tasks have ended."""
    body = client.body if isinstance(client.body, dict) else None
    if body is None:
        raise BadRequest("the body must be a JSON object (or empty)")
    hub = request.app[HUB]
    bucket = await hub.create_bucket(client.owner, _flag(body, "rm_after_task"))
    return json_response({"bucket_uid": bucket.uid, "rm_after_task": bucket.rm_after_task,
                          "expires_at": iso(bucket.created_at + hub.config.storage_bucket_ttl_s)}, 201)


async def handle_storage_upload(request: web.Request, client: Caller) -> web.Response:
    name, chunks = await multipart_file(request)
    file = await request.app[HUB].store_file(request.match_info["bucket_uid"], name, chunks,
                                             owner=client.owner, declared=request.content_length)
    return json_response(uploaded_json(request.match_info["bucket_uid"], file), 201)


async def handle_storage_stat(request: web.Request, client: Caller) -> web.Response:
    hub = request.app[HUB]
    return json_response(bucket_stat_json(hub, hub.broker.bucket(request.match_info["bucket_uid"],
                                                                 client.owner)))


async def handle_storage_download(request: web.Request, client: Caller) -> web.StreamResponse:
    bucket = request.app[HUB].broker.bucket(request.match_info["bucket_uid"], client.owner)
    return await send_file(request, bucket, request.match_info["file_uid"])


async def handle_storage_hash(request: web.Request, client: Caller) -> web.Response:
    bucket = request.app[HUB].broker.bucket(request.match_info["bucket_uid"], client.owner)
    file_uid = request.match_info["file_uid"]
    if file_uid not in bucket.files:
        raise NotFound(f"bucket {bucket.uid} has no file {file_uid[:80]!r}")
    return json_response({"hash": bucket.files[file_uid].sha256})


async def handle_storage_file_delete(request: web.Request, client: Caller) -> web.Response:
    file = await request.app[HUB].delete_file(request.match_info["bucket_uid"], client.owner,
                                              request.match_info["file_uid"])
    return json_response({"deleted_file_uid": file.uid})


async def handle_storage_bucket_delete(request: web.Request, client: Caller) -> web.Response:
    bucket = await request.app[HUB].delete_bucket(request.match_info["bucket_uid"], client.owner)
    return json_response({"deleted_bucket_uid": bucket.uid})


async def handle_agent_bucket_stat(request: web.Request, agent: Agent) -> web.Response:
    hub = request.app[HUB]
    bucket = hub.broker.agent_bucket(agent.uid, request.match_info["bucket_uid"], output=False)
    return json_response(bucket_stat_json(hub, bucket))


async def handle_agent_bucket_download(request: web.Request, agent: Agent) -> web.StreamResponse:
    bucket = request.app[HUB].broker.agent_bucket(agent.uid, request.match_info["bucket_uid"], output=False)
    return await send_file(request, bucket, request.match_info["file_uid"])


async def handle_agent_bucket_upload(request: web.Request, agent: Agent) -> web.Response:
    name, chunks = await multipart_file(request)
    file = await request.app[HUB].store_file(request.match_info["bucket_uid"], name, chunks,
                                             agent_uid=agent.uid, declared=request.content_length)
    return json_response(uploaded_json(request.match_info["bucket_uid"], file), 201)


def owners_by_digest(hub: Hub) -> dict[str, str]:
    """Owner digests -> the client keys they stand for (management shows keys)."""
    return {MGMT_OWNER: MGMT_OWNER, **{owner_of(k.key): k.key for k in hub.keys()}}


def storage_usage(buckets: list[Bucket]) -> dict:
    return {"bucket_count": len(buckets), "total_files": sum(len(b.files) for b in buckets),
            "total_bytes": sum(b.used for b in buckets)}


async def handle_mgmt_storage_buckets(request: web.Request) -> web.Response:
    hub, keys = request.app[HUB], owners_by_digest(request.app[HUB])
    grouped = {}
    for owner in hub.broker.buckets_by_owner:
        buckets = hub.broker.owner_buckets(owner)
        grouped[keys.get(owner, owner)] = {**storage_usage(buckets), "buckets": [
            {"bucket_uid": b.uid, "created_at": iso(b.created_at), "file_count": len(b.files),
             "used_bytes": b.used} for b in buckets]}
    return json_response({"buckets_by_key": grouped})


async def handle_mgmt_storage_quotas(request: web.Request) -> web.Response:
    hub, keys = request.app[HUB], owners_by_digest(request.app[HUB])
    api_key = request.query.get("api_key")
    owners = list(hub.broker.buckets_by_owner) if api_key is None else [owner_of(api_key)]
    usage = {keys.get(owner, owner): storage_usage(hub.broker.owner_buckets(owner))
             for owner in owners if owner in hub.broker.buckets_by_owner}
    return json_response({"limits": storage_limits(hub.config), "usage": usage})


async def handle_mgmt_storage_bucket_delete(request: web.Request) -> web.Response:
    bucket = await request.app[HUB].delete_bucket(request.match_info["bucket_uid"], None)
    return json_response({"deleted_bucket_uid": bucket.uid})


async def handle_mgmt_storage_key_delete(request: web.Request) -> web.Response:
    api_key = request.match_info["api_key"]
    count = await request.app[HUB].delete_buckets(owner_of(api_key))
    return json_response({"api_key": api_key, "deleted_count": count})


async def handle_mgmt_storage_purge(request: web.Request) -> web.Response:
    return json_response({"deleted_count": await request.app[HUB].delete_buckets(None)})


async def handle_mgmt_storage_cleanup(request: web.Request) -> web.Response:
    return json_response({"deleted_count": await request.app[HUB].reap_buckets()})


# ---------------------------------------------------------------- console

PLACEHOLDER_PAGE = b"""<!doctype html><meta charset="utf-8"><title>OffloadMQ</title>
<h1>OffloadMQ</h1><p>This is an OffloadMQ task queue server. Its web console is not
installed next to it: drive it with curl as the API section of README.md shows.</p>"""


async def handle_static(request: web.Request) -> web.StreamResponse:
    """Files under static/ only: no `..`, no symlinks leading out of it."""
    root = request.app[HUB].config.static_path.resolve()
    relative = request.match_info.get("path") or "index.html"
    try:
        target = (root / relative).resolve()
        found = target.is_relative_to(root) and target.is_file()
    except (OSError, ValueError):  # a NUL byte or an over-long name: no such file either
        found = False
    if found:
        return web.FileResponse(target)
    if relative == "index.html":
        return web.Response(body=PLACEHOLDER_PAGE, content_type="text/html")
    raise NotFound(f"no such page: /{relative}")


async def handle_openapi(request: web.Request) -> web.Response:
    """Extension: the OpenAPI 3.1 document of every route (built once, by create_app)."""
    return json_response(request.app[OPENAPI])


# ============================================================================ agent websocket
#
# `GET /private/agent/ws?token=<JWT>`: the original's push channel, a second transport
# over the same hub. Each socket runs a pusher: the same long poll an HTTP agent makes
# (`next_task(take=True)`: tiers with spill-over, priority, fairness, drain, capacity),
# whose task it sends as `{"type": "task", "task": AssignedTask}`; a `heartbeat` frame
# goes out after a fresh random delay. The agent's requests are frames
# `{"req_id", "action", "params"}`; each action maps onto an HTTP agent route and runs
# its handler (so both transports share every rule and error), answered as
# `{"req_id", "type": "response", "status", "data"}` or `{"req_id", "type": "error",
# "status", "error"}`. A cancel asked for a task the agent holds is pushed as
# `{"type": "cancel", "taskId"}`. A socket belongs to one agent: a new one replaces the
# old. When a socket closes, the tasks it was handed and the agent never started
# (no progress yet) go back to the queue at once; started ones wait for its report.

WS_PUSH_WAIT_S = 20.0      # the pusher's long poll, re-armed (each round counts as contact)
WS_PING_S = 30.0           # protocol pings; a socket silent for half of this after one is dropped
WS_MAX_REQUESTS = 64       # requests one socket may have in flight (long polls included)
WS_SUPERSEDED = 4000       # close code of a socket replaced by a newer one of the same agent
WS_CREDENTIAL_GONE = 4001  # close code when the agent's credential was rotated or it was deleted
WS_CLOSE_WAIT_S = 10.0     # how long a new socket waits for the one it replaces to finish


class ActionRoute:
    """How a frame's action becomes a request to an HTTP agent route."""

    def __init__(self, method: str, path: Callable[[dict], str], body: bool = True):
        self.method, self.path, self.body = method, path, body


def _frame_task_path(params: dict) -> str:
    """`cap/id` (percent-encoded) of the task a frame names: `id` as a TaskId, or a
    bare id with `capability`."""
    given = params.get("id")
    if isinstance(given, dict):
        cap, task_id = given.get("cap"), given.get("id")
    else:
        cap, task_id = params.get("capability") or params.get("cap"), given
    if not isinstance(task_id, str) or not task_id:
        raise BadRequest('params.id must be a task id {"cap": "...", "id": "..."}')
    return f"{quote(check_capability(cap), safe='')}/{quote(task_id, safe='')}"


def _frame_poll_query(params: dict) -> str:
    wait, take = params.get("wait", 0), params.get("take", False)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)):
        raise BadRequest("params.wait must be a number of seconds")
    return f"?wait={wait}&take={'1' if take is True else '0'}"


def _frame_generic_path(params: dict) -> str:
    """`get`/`post`: `params.path` lists the segments after /private/agent/."""
    segments = params.get("path")
    if isinstance(segments, str):
        segments = [s for s in segments.strip("/").split("/") if s]
    if not isinstance(segments, list) or not segments \
            or not all(isinstance(s, str) and s for s in segments):
        raise BadRequest("params.path must be a list of path segments after /private/agent/")
    if segments[0] == "ws":
        raise BadRequest("the socket cannot open another socket")
    query = params.get("query") or {}
    if not isinstance(query, dict):
        raise BadRequest("params.query must be an object")
    text = "&".join(f"{quote(str(k), safe='')}={quote(str(v), safe='')}" for k, v in query.items())
    return "/".join(quote(s, safe="") for s in segments) + (f"?{text}" if text else "")


WS_ACTIONS: dict[str, ActionRoute] = {
    "heartbeat": ActionRoute("POST", lambda p: "ping"),
    "ping": ActionRoute("POST", lambda p: "ping"),
    "update_progress": ActionRoute("POST", lambda p: "task/progress/" + _frame_task_path(p)),
    # With the next task taken in the same journal write, pushed as the answer goes out.
    "resolve_task": ActionRoute("POST", lambda p: "task/resolve/" + _frame_task_path(p) + "?next=0"),
    "poll_task": ActionRoute("GET", lambda p: "task/poll" + _frame_poll_query(p), body=False),
    "poll_task_urgent": ActionRoute("GET", lambda p: "task/poll_urgent" + _frame_poll_query(p),
                                    body=False),
    "take_task": ActionRoute("POST", lambda p: "take/" + _frame_task_path(p), body=False),
    "get": ActionRoute("GET", _frame_generic_path, body=False),
    "post": ActionRoute("POST", _frame_generic_path),
}


WS_WAITING_ACTIONS = frozenset({"poll_task", "poll_task_urgent", "get"})  # may hold a long poll
# Routes whose bodies are file bytes: not as JSON frames (uploads take upload_file).
WS_HTTP_ONLY = frozenset({"handle_agent_bucket_download", "handle_agent_bucket_upload"})


def ws_error(req_id: Any, err: OffloadError) -> dict:
    return {"req_id": req_id, "type": "error", "status": err.status,
            "error": {"type": err.type, "message": err.message, "status": err.status, **err.extra}}


class AgentSocket:
    """One agent's open socket: its sends, its requests in flight, its pusher."""

    def __init__(self, ws: web.WebSocketResponse, uid: str, request: web.Request):
        self.ws, self.uid, self.request = ws, uid, request
        self.send_lock = asyncio.Lock()
        self.jobs: set[asyncio.Task] = set()      # requests and pushes in flight
        self.waits: set[asyncio.Task] = set()     # long polls in flight
        self.upload: tuple[Any, Any] | None = None  # (req_id, params) awaiting its binary frame
        self.beats = 0
        self.superseded = False
        self.ended = asyncio.Event()

    async def send(self, message: dict) -> bool:
        if self.ws.closed:
            return False
        try:
            async with self.send_lock:
                await self.ws.send_str(orjson.dumps(message).decode())
            return True
        except (ConnectionError, RuntimeError):  # the peer went away mid-send
            return False

    def spawn(self, coroutine: Any, waits: bool = False) -> None:
        """Run a request or a send; `waits` marks a long poll, dropped when the socket closes."""
        job = asyncio.ensure_future(coroutine)
        jobs = self.waits if waits else self.jobs
        jobs.add(job)
        job.add_done_callback(jobs.discard)

    async def push_loop(self, hub: Hub) -> None:
        """The agent's next tasks, as its capacity frees, and the heartbeat frames."""
        loop = asyncio.get_running_loop()
        config = hub.config

        def next_beat() -> float:
            return loop.time() + random.uniform(config.ws_heartbeat_min_s, config.ws_heartbeat_max_s)

        beat_at = next_beat()
        while not self.ws.closed and not hub.stopping:
            wait_s = max(0.0, min(WS_PUSH_WAIT_S, beat_at - loop.time()))
            try:
                task = await hub.next_task(self.uid, wait_s, False, lambda: self.ws.closed, take=True)
            except Conflict:  # taken by a request of the same agent meanwhile
                continue
            except OffloadError as err:  # the agent was deleted
                await self.ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=err.message.encode())
                return
            if task is not None and not await self.send({"type": "task", "task": assigned_json(task)}):
                return  # the socket's end releases it
            if loop.time() >= beat_at:
                self.beats += 1
                await self.send({"type": "heartbeat", "counter": self.beats,
                                 "timestamp": iso(hub.clock())})
                beat_at = next_beat()

    async def on_text(self, text: str) -> None:
        """Start the request a frame makes; errors are answered here, before the next
        frame is read (so a flood of bad frames waits on its own answers)."""
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError as err:
            await self.send(ws_error(None, BadRequest(f"malformed JSON frame: {err}")))
            return
        req_id = frame.get("req_id") if isinstance(frame, dict) else None
        action = frame.get("action") if isinstance(frame, dict) else None
        if not isinstance(frame, dict) or not isinstance(action, str):
            await self.send(ws_error(req_id, BadRequest(
                'a frame must be {"req_id": ..., "action": "...", "params": {...}}')))
            return
        params = frame.get("params")
        params = {} if params is None else params
        if len(self.jobs) + len(self.waits) >= WS_MAX_REQUESTS:
            await self.send(ws_error(req_id, Overloaded(
                f"more than {WS_MAX_REQUESTS} requests in flight on this socket")))
            return
        if action == "upload_file":
            self.upload = (req_id, params)  # answered when its binary frame comes
            return
        self.spawn(self.answer(req_id, action, params), waits=action in WS_WAITING_ACTIONS)

    async def on_binary(self, data: bytes) -> None:
        if self.upload is None:
            await self.send(ws_error(None, BadRequest("a binary frame must follow an upload_file request")))
            return
        req_id, params = self.upload
        self.upload = None
        self.spawn(self.store_upload(req_id, params, data))

    async def store_upload(self, req_id: Any, params: Any, data: bytes) -> None:
        """`upload_file`: the binary frame is the file, for the output bucket of a task
        this agent holds (as POST /private/agent/bucket/{uid}/upload)."""
        async def chunks() -> Any:
            yield data
        try:
            if not isinstance(params, dict) or not isinstance(params.get("bucket_uid"), str) \
                    or not isinstance(params.get("filename"), str):
                raise BadRequest("upload_file takes params {bucket_uid, filename}")
            hub = self.request.app[HUB]
            file = await hub.store_file(params["bucket_uid"], params["filename"], chunks(),
                                        agent_uid=self.uid)
            message = {"req_id": req_id, "type": "response", "status": 201,
                       "data": uploaded_json(params["bucket_uid"], file)}
        except OffloadError as err:
            message = ws_error(req_id, err)
        except Exception:
            log.exception("bug while storing an upload on agent %s's socket", self.uid)
            message = ws_error(req_id, OffloadError("internal error; the server log has details"))
        await self.send(message)

    async def answer(self, req_id: Any, action: str, params: Any) -> None:
        try:
            data = await self.call(action, params)
            message = {"req_id": req_id, "type": "response", "status": 200, "data": data}
            if action == "resolve_task" and isinstance(data, dict):
                following = data.pop("next", None)
                if following is not None:
                    await self.send({"type": "task", "task": following})
        except OffloadError as err:
            message = ws_error(req_id, err)
        except web.HTTPException as err:  # no such route, or not with this method
            message = ws_error(req_id, BadRequest(f"{err.reason}: {action} {params.get('path')}"))
            message["status"] = message["error"]["status"] = err.status
            message["error"]["type"] = {404: "not_found", 405: "method_not_allowed"}.get(
                err.status, "bad_request")
        except Exception:
            log.exception("bug while answering %s on agent %s's socket", action, self.uid)
            message = ws_error(req_id, OffloadError("internal error; the server log has details"))
        await self.send(message)

    async def call(self, action: str, params: Any) -> Any:
        """Run the HTTP agent route the action maps to, as this agent; its JSON answer."""
        route = WS_ACTIONS.get(action)
        if route is None:
            raise BadRequest(f"unknown action {action!r}; known: upload_file, {', '.join(WS_ACTIONS)}")
        if not isinstance(params, dict):
            raise BadRequest("params must be an object")
        body = params.get("body", {}) if action in ("get", "post") else params
        path = "/private/agent/" + route.path(params)
        request = self.request.clone(method=route.method, rel_url=path)
        # The handler reads the body from the request's stream, as any other.
        raw = orjson.dumps(body) if route.body else b""
        stream = aiohttp.StreamReader(request.protocol, len(raw) + 1, loop=asyncio.get_running_loop())
        stream.feed_data(raw)
        stream.feed_eof()
        request._payload = stream
        app = self.request.app
        match = await app.router.resolve(request)
        match.add_app(app)
        match.freeze()
        request._match_info = match
        if getattr(match.handler, "__name__", "") in WS_HTTP_ONLY:  # it would write on the socket
            raise BadRequest("file bytes go over HTTP: GET /private/agent/bucket/{uid}/file/{file_uid}, "
                             "or upload_file with a binary frame")
        response = await match.handler(request)
        return orjson.loads(response.body) if response.body else None


class AgentSockets:
    """The open sockets by agent; pushes each cancel asked for a task an agent holds."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.by_agent: dict[str, AgentSocket] = {}
        self.closing: set[asyncio.Task] = set()
        hub.change_listeners.append(self.on_changes)

    def on_changes(self, changes: list[Change]) -> None:
        for change in changes:
            if change.op == "task.cancel_requested" and change.task is not None:
                sock = self.by_agent.get(change.task.agent_id or "")
                if sock is not None:
                    sock.spawn(sock.send({"type": "cancel", "taskId": task_id_json(change.task)}))
            elif change.op in ("agent.key_rotated", "agent.deleted") and change.agent_uid in self.by_agent:
                # Its token no longer counts: the socket it opened with it closes too.
                ws = self.by_agent[change.agent_uid].ws
                job = asyncio.ensure_future(ws.close(code=WS_CREDENTIAL_GONE,
                                                     message=b"credential revoked; log in again"))
                self.closing.add(job)
                job.add_done_callback(self.closing.discard)

    async def open(self, sock: AgentSocket) -> None:
        """`sock` replaces the agent's earlier socket, once that one has finished; what
        the agent was handed over that one and never started goes back to the queue
        first. Without an earlier socket here nothing goes back: what the agent holds from
        before a restart (or a takeover) may have started in the moment before the agent
        reports it (the `running` stage waits half a second), and the agent's holding
        report, sent right after it logs in, releases the rest."""
        old = self.by_agent.get(sock.uid)
        self.by_agent[sock.uid] = sock
        if old is None:
            return
        old.superseded = True
        await old.ws.close(code=WS_SUPERSEDED, message=b"replaced by a newer connection")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WS_CLOSE_WAIT_S):
                await old.ended.wait()
        await self.hub.release_unstarted(sock.uid)

    async def close_all(self) -> None:
        for sock in list(self.by_agent.values()):
            await sock.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")


AGENT_SOCKETS = web.AppKey("agent_sockets", AgentSockets)


async def handle_agent_ws(request: web.Request) -> web.StreamResponse:
    """The token is checked before the upgrade: a bad one gets the 401 error body."""
    hub, tokens = request.app[HUB], request.app[TOKENS]
    token = request.query.get("token") or bearer(request)
    if not token:
        raise Unauthenticated("missing agent token: connect to /private/agent/ws?token=<JWT>")
    uid = tokens.agent(token, hub.agent).uid  # a deleted or rotated agent's token fails
    ws = web.WebSocketResponse(max_msg_size=hub.config.max_body_bytes, heartbeat=WS_PING_S)
    if not ws.can_prepare(request).ok:
        raise BadRequest("this route takes a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)")
    await ws.prepare(request)
    sockets = request.app[AGENT_SOCKETS]
    # Requests the socket makes run as this agent, on its HTTP routes.
    sock = AgentSocket(ws, uid, request.clone(headers={"Authorization": f"Bearer {token}"}))
    pusher = None
    try:
        await sockets.open(sock)
        await sock.send({"type": "connected", "agentId": uid, "agent_id": uid,
                         "message": "connected; tasks are pushed as capacity allows"})
        for task in hub.broker.cancel_requests(uid):  # asked while it was away
            await sock.send({"type": "cancel", "taskId": task_id_json(task)})
        pusher = asyncio.ensure_future(sock.push_loop(hub))
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.on_text(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.on_binary(msg.data)
    finally:
        # Reports sent before the close still count: they finish; waits end now.
        for job in [pusher, *sock.waits]:
            if job is not None:
                job.cancel()
        if sock.jobs:
            await asyncio.wait(set(sock.jobs), timeout=WS_CLOSE_WAIT_S)
        for job in sock.jobs:
            job.cancel()
        if sockets.by_agent.get(uid) is sock:
            del sockets.by_agent[uid]
        if not sock.superseded and hub.agent(uid) is not None:
            await hub.release_unstarted(uid)
        sock.ended.set()
    return ws


# ============================================================================ agent logs
#
# Agents send their own log lines (`POST /private/agent/logs`, one record each); the
# server keeps them in memory only: a ring per agent (the newest AGENT_LOG_RING), all of
# them together at most AGENT_LOG_BYTES of text (the oldest go first) and none older
# than 14 days. Management reads them newest first, by severity, by agent or all; its
# event streams get an `agent_log` event (at most two a second per agent) so the console
# shows new lines as they come.

AGENT_LOG_EVENT_S = 0.5  # lines sent within this of an agent's first share one event
AGENT_LOG_SEVERITIES = ("CRITICAL", "ERROR", "INFO")
AGENT_LOG_RING = 1000
AGENT_LOG_BYTES = 16 << 20
AGENT_LOG_TEXT_MAX = 8192
AGENT_LOG_MAX_AGE_DAYS = 14
AGENT_LOG_LIMIT = 100


@dataclass(slots=True)
class AgentLogRecord:
    uid: str          # the agent that sent it (its body's agentId is whatever it said)
    at: float
    body: dict
    size: int
    dropped: bool = False


class AgentLogs:
    def __init__(self, events: EventLog | None = None, ring: int = AGENT_LOG_RING,
                 max_bytes: int = AGENT_LOG_BYTES):
        self.events = events
        self.announcing: set[str] = set()  # agents whose agent_log event is on its way
        self.ring, self.max_bytes = ring, max_bytes
        self.rings: dict[str, deque[AgentLogRecord]] = {}
        self.order: deque[AgentLogRecord] = deque()  # every record, oldest first
        self.bytes = 0
        self.live = 0
        self.ids = UlidFactory()

    def add(self, agent: Agent, body: dict, now: float) -> dict:
        fields = {}
        for name, limit in (("agentId", 100), ("agentName", DISPLAY_NAME_MAX),
                            ("machineFingerprint", 200)):
            value = body.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > limit):
                raise BadRequest(f"{name} must be a string of at most {limit} characters")
            fields[name] = value
        severity, text = body.get("severity"), body.get("text")
        if not isinstance(severity, str) or severity.upper() not in AGENT_LOG_SEVERITIES:
            raise BadRequest(f"severity must be one of {', '.join(AGENT_LOG_SEVERITIES)}")
        if not isinstance(text, str) or len(text) > AGENT_LOG_TEXT_MAX:
            raise BadRequest(f"text must be a string of at most {AGENT_LOG_TEXT_MAX} characters")
        record = {"recordId": self.ids.new(now), "agentId": fields["agentId"] or agent.uid,
                  "agentName": fields["agentName"] or agent.display_name or agent.uid[-6:],
                  "machineFingerprint": fields["machineFingerprint"]
                  or agent.system_info.get("machineId"),
                  "severity": severity.upper(), "text": text, "timestamp": iso(now)}
        kept = AgentLogRecord(agent.uid, now, record, len(text) + 200)
        ring = self.rings.setdefault(agent.uid, deque())
        ring.append(kept)
        self.order.append(kept)
        self.bytes += kept.size
        self.live += 1
        if len(ring) > self.ring:
            self._drop(ring.popleft())
        while self.bytes > self.max_bytes or self._too_old(now):
            self._evict_oldest()
        if len(self.order) > 2 * self.live + 1024:  # mostly records dropped from their rings
            self.order = deque(r for r in self.order if not r.dropped)
        if self.events is not None and agent.uid not in self.announcing:
            self.announcing.add(agent.uid)
            asyncio.get_running_loop().call_later(AGENT_LOG_EVENT_S, self._announce, agent.uid)
        return record

    def _announce(self, uid: str) -> None:
        """One event for the lines of the last AGENT_LOG_EVENT_S: a chatty agent must not
        crowd task events out of the ring that streams resume from."""
        self.announcing.discard(uid)
        self.events.add(MGMT_OWNER, None, "agent_log", {"uid": uid})
        self.events.release(self.events.seq)

    def _too_old(self, now: float) -> bool:
        return bool(self.order) and self.order[0].at < now - AGENT_LOG_MAX_AGE_DAYS * 86400

    def _drop(self, record: AgentLogRecord) -> None:
        record.dropped = True
        self.bytes -= record.size
        self.live -= 1

    def _evict_oldest(self) -> None:
        record = self.order.popleft()
        if not record.dropped:
            ring = self.rings[record.uid]
            ring.popleft()  # its oldest: both keep arrival order
            self._drop(record)
            if not ring:
                del self.rings[record.uid]

    def cleanup(self, now: float) -> int:
        before = self.live
        while self._too_old(now):
            self._evict_oldest()
        return before - self.live

    def newest(self, limit: int, uid: str | None = None, severity: str | None = None) -> list[dict]:
        records = self.rings.get(uid, ()) if uid is not None else self.order
        found = []
        for record in reversed(records):
            if record.dropped or (severity is not None and record.body["severity"] != severity):
                continue
            found.append(record.body)
            if len(found) == limit:
                break
        return found


AGENT_LOGS = web.AppKey("agent_logs", AgentLogs)


def log_limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(AGENT_LOG_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        raise BadRequest("limit must be a positive integer, or -1 for all") from None
    if limit == -1:
        return 0  # no limit: `newest` stops at len(found) == limit, never 0
    if limit < 1:
        raise BadRequest("limit must be a positive integer, or -1 for all")
    return limit


async def handle_agent_logs_post(request: web.Request, agent: Agent) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return json_response(request.app[AGENT_LOGS].add(agent, body, request.app[HUB].clock()))


async def handle_mgmt_agent_logs_by_severity(request: web.Request) -> web.Response:
    severity = (request.query.get("severity") or "").upper()
    if severity not in AGENT_LOG_SEVERITIES:
        raise BadRequest(f"severity must be one of {', '.join(AGENT_LOG_SEVERITIES)}")
    items = request.app[AGENT_LOGS].newest(log_limit(request), severity=severity)
    return json_response({"severity": severity, "count": len(items), "items": items})


async def handle_mgmt_agent_logs_by_agent(request: web.Request) -> web.Response:
    uid = request.query.get("agent_id")
    if not uid:
        raise BadRequest("agent_id is required")
    items = request.app[AGENT_LOGS].newest(log_limit(request), uid=uid)
    return json_response({"agentId": uid, "count": len(items), "items": items})


async def handle_mgmt_agent_logs_latest(request: web.Request) -> web.Response:
    items = request.app[AGENT_LOGS].newest(log_limit(request))
    return json_response({"count": len(items), "items": items})


async def handle_mgmt_agent_logs_cleanup(request: web.Request) -> web.Response:
    deleted = request.app[AGENT_LOGS].cleanup(request.app[HUB].clock())
    return json_response({"deleted": deleted, "max_age_days": AGENT_LOG_MAX_AGE_DAYS})


# ============================================================================ routes
#
# The middleware that turns exceptions into error bodies, refuses paths and headers
# that cannot be decoded (and methods a path does not take) and closes connections
# whose body was unusable; the timing middleware; the security headers and the log filter
# for untrusted text; the auth each kind of route needs, with failed credentials
# throttled; and ROUTES: method, path, kind (client, agent, mgmt, open), handler.

ERROR_TYPES = {400: "bad_request", 401: "authentication_error", 403: "authorization_error",
               404: "not_found", 405: "method_not_allowed", 409: "conflict", 413: "payload_too_large"}


STATIC_PATH = "/{path}"  # the console's catch-all, as the router names it
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Headers the server reads; aiohttp hands bytes that are not UTF-8 over as surrogates.
READ_HEADERS = ("X-API-Key", "X-Mgmt-Token", "Authorization", "Idempotency-Key", "Last-Event-ID")
_SURROGATE = re.compile("[\ud800-\udfff]")


@web.middleware
async def error_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """The one place that turns exceptions into the contract's error bodies; it also
    refuses what cannot be decoded (check_request) and closes the connection after a
    body that never ended or cannot be decoded. (One middleware, not three: each layer
    costs every request a coroutine.)"""
    try:
        await check_request(request)
        response = await handler(request)
    except OffloadError as err:
        response = error_response(err.status, err.type, err.message, **err.extra)
        if getattr(err, "retry_after_s", None):
            response.headers["Retry-After"] = str(err.retry_after_s)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        if err.status == 413:
            message = f"the body is larger than the limit of {request.app[HUB].config.max_body_bytes} bytes"
        elif err.status == 405:
            allowed = err.headers.get("Allow", "another method")
            message = f"{request.method} is not allowed here; use {allowed}"
        else:
            message = f"{err.reason}: {request.method} {request.path}"
        response = error_response(err.status, ERROR_TYPES.get(err.status, "bad_request"), message)
        if "Allow" in err.headers:
            response.headers["Allow"] = err.headers["Allow"]
    except Exception:
        log.exception("bug while handling %s %s", request.method, request.path)
        response = error_response(500, "internal_error", "internal error; the server log has details")
    if request.get(CUT) and request.transport is not None and not response.prepared:
        # A body that never ended or cannot be decoded: answer with `Connection: close`,
        # then close instead of reading on. (A body refused unread, say for a wrong
        # credential, is read and discarded by aiohttp for at most 10 s after the answer,
        # so that closing with data unread does not reset the connection first.)
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
    return response


async def check_request(request: web.Request) -> None:
    """One answer (400) for every path, and every header the server reads, that cannot be
    decoded; and 405 with `Allow` for a method a route does not take, also where the
    console's catch-all GET would match."""
    headers = request.headers
    for name in READ_HEADERS:
        value = headers.get(name)
        if value and not value.isascii() and _SURROGATE.search(value):
            raise BadRequest(f"the {name} header is not valid UTF-8")
    raw = request.rel_url.raw_path
    if "%" in raw:
        if _BAD_ESCAPE.search(raw):
            raise BadRequest("bad percent-encoding in the path (% must be followed by two hex digits)")
        try:
            unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("the path is not UTF-8 once percent-decoded") from None
    match = request.match_info
    refused = getattr(match, "http_exception", None)  # the router found no route
    if getattr(match.route.handler, "__name__", "") == "handle_static" or (
            refused is not None and refused.status == 405):
        # The methods of the API routes for this path; the catch-all's GET counts only
        # where no API route has the path.
        allowed: set[str] = set()
        for route_resource in request.app.router.resources():
            if route_resource.canonical != STATIC_PATH:
                allowed |= (await route_resource.resolve(request))[1]
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)


async def count_failures(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Run `handler`, counting a failed authentication against the caller's address
    (AuthThrottle); an address out of tries gets 429 with Retry-After."""
    throttle, now = request.app[THROTTLE], time.monotonic()
    wait_s = throttle.wait_s(request.remote, now)
    if wait_s > 0:
        raise retry_after(TooManyRequests("too many failed authentications from this address; "
                                          f"retry in {math.ceil(wait_s)} s"), wait_s)
    try:
        return await handler(request)
    except Unauthenticated:
        if throttle.failed(request.remote, now):
            log.warning("failed authentication from %s (%s %s)", throttle.address_key(request.remote),
                        escape_control(request.method), loggable_target(request))
        raise


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Server": "OffloadMQ",  # not aiohttp's version banner
}


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def escape_control(text: str) -> str:
    """Each control character as Python writes it in a string literal (a newline as \\n)."""
    return CONTROL_CHARS.sub(lambda m: repr(m.group())[1:-1], text)


class UntrustedTextFilter(logging.Filter):
    """Log arguments may come from clients and agents: their control characters are
    escaped, so no argument can forge a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(escape_control(a) if isinstance(a, str) else a for a in record.args)
        return True


log.addFilter(UntrustedTextFilter())


STANDBY_PATHS = frozenset({"/health", "/health/ready", "/version"})


@web.middleware
async def leader_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """PostgreSQL store: a standby answers liveness, readiness, its version and the console;
    the rest is the leader's (503 not_leader naming it, so clients move on). So does a
    leader unsure it still leads (PG_LEADER_UNSURE_S): it did nothing with the request."""
    store = request.app[HUB].journal
    if request.path in STANDBY_PATHS \
            or getattr(request.match_info.route.handler, "__name__", "") == "handle_static":
        return await handler(request)
    if store.sure_to_lead:
        response = await handler(request)
        if not store.sure_to_lead and not response.prepared and request.transport is not None:
            # Unsure since (frozen while a poll was held): it may be replaced already, and
            # what it holds in memory be stale. No answer, as from a server gone: the client
            # asks elsewhere, knowing whether its request is safe to send again.
            request.transport.close()
        return response
    if store.leader:
        leader, message = None, "this server cannot confirm that it still leads; try another"
    else:
        leader = store.leader_url
        message = f"this server is a standby; the leader is {leader or 'not known yet'}"
    response = json_response({"error": {"type": "not_leader", "status": 503, "leader": leader,
                                        "message": message}}, 503)
    response.headers["Retry-After"] = "1"
    return response


# Query parameters and path segments with these in their names carry secrets (the agent
# socket's `token`, a key to revoke): the access log shows them as HIDDEN.
SECRET_NAME = re.compile(r"key|token|secret|password|auth", re.IGNORECASE)
HIDDEN = "<hidden>"


def loggable_target(request: web.Request) -> str:
    """The request's path and query as the access log shows them: secrets hidden, control
    characters escaped (the path is the caller's text)."""
    match = request.match_info
    resource = match.route.resource
    if resource is not None and any(SECRET_NAME.search(name) for name in match):
        path = resource.canonical.format_map(
            {name: HIDDEN if SECRET_NAME.search(name) else quote(value, safe="") for name, value in match.items()})
    else:
        path = request.rel_url.raw_path
    query = "&".join(f"{name}={HIDDEN if SECRET_NAME.search(name) else quote(value, safe='')}"
                     for name, value in request.rel_url.query.items())
    return escape_control(f"{path}?{query}" if query else path)


@web.middleware
async def access_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """With --access-log: `<address> <method> <path> <status> <ms> ms` once the request ends."""
    started, status = time.perf_counter(), "-"  # "-": the client left before the answer
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as err:
        status = err.status
        raise
    finally:
        access_log.info("%s %s %s %s %.1f ms", request.remote, escape_control(request.method),
                        loggable_target(request), status, (time.perf_counter() - started) * 1000)


@web.middleware
async def timing_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        return await handler(request)
    finally:
        resource = request.match_info.route.resource
        request.app[HUB].metrics.observe_http(request.method, resource.canonical if resource else "unmatched",
                                      time.perf_counter() - started)


def guarded(kind: str, handler: Callable) -> Callable:
    """Wrap a handler with the auth its route needs (see ROUTES); client and agent
    handlers get the caller as their second argument. Where a credential could be
    guessed, failures count in the AuthThrottle."""
    async def authenticated(request: web.Request) -> web.StreamResponse:
        hub = request.app[HUB]
        if kind == "client":
            # A credential in the headers is checked before the body is read.
            early = client_caller(hub, request, None) if header_credential(request) else None
            body = await read_json(request, required=False) if request.method == "POST" else {}
            client = early.with_body(body) if early else client_caller(hub, request, body)
            return await handler(request, client)
        if kind == "client_stream":  # the body is a file: the credential is in the headers
            return await handler(request, client_caller(hub, request, None))
        if kind == "agent":
            return await handler(request, agent_caller(hub, request.app[TOKENS], request))
        if kind == "mgmt":
            check_management(hub, request)
        return await handler(request)

    async def throttled(request: web.Request) -> web.StreamResponse:
        return await count_failures(request, authenticated)

    counted = kind in ("client", "client_stream", "mgmt") or handler.__name__ in CREDENTIAL_HANDLERS
    wrapper = throttled if counted else authenticated
    wrapper.__name__ = handler.__name__
    return wrapper


TASK_PATH = "{cap:.+}/{id:[^/]+}"  # the capability may carry '/' (sent as %2F)

ROUTES = [
    ("POST", "/api/task/submit", "client", handle_task_submit),
    ("POST", "/api/task/submit_blocking", "client", handle_task_submit_blocking),
    ("POST", f"/api/task/poll/{TASK_PATH}", "client", handle_task_poll),
    ("GET", f"/api/task/poll/{TASK_PATH}", "client", handle_task_poll),
    ("POST", f"/api/task/cancel/{TASK_PATH}", "client", handle_task_cancel),
    ("GET", "/api/task/events", "client", handle_task_events),
    ("POST", "/api/capabilities/online", "client", handle_capabilities_online),
    ("GET", "/api/capabilities/online", "client", handle_capabilities_online),
    ("GET", "/api/storage/limits", "client", handle_storage_limits),
    ("GET", "/api/storage/buckets", "client", handle_storage_buckets),
    ("POST", "/api/storage/bucket/create", "client", handle_storage_bucket_create),
    ("POST", "/api/storage/bucket/{bucket_uid}/upload", "client_stream", handle_storage_upload),
    ("GET", "/api/storage/bucket/{bucket_uid}/stat", "client", handle_storage_stat),
    ("GET", "/api/storage/bucket/{bucket_uid}/file/{file_uid}", "client", handle_storage_download),
    ("GET", "/api/storage/bucket/{bucket_uid}/file/{file_uid}/hash", "client", handle_storage_hash),
    ("DELETE", "/api/storage/bucket/{bucket_uid}/file/{file_uid}", "client", handle_storage_file_delete),
    ("DELETE", "/api/storage/bucket/{bucket_uid}", "client", handle_storage_bucket_delete),
    ("GET", "/api/ping", "open", handle_health),
    ("POST", "/agent/register", "open", handle_agent_register),
    ("POST", "/agent/auth", "open", handle_agent_auth),
    ("GET", "/private/agent/ws", "open", handle_agent_ws),  # checks the token itself
    ("GET", "/private/agent/ping", "agent", handle_agent_ping),
    ("POST", "/private/agent/ping", "agent", handle_agent_ping),
    ("POST", "/private/agent/info/update", "agent", handle_agent_info_update),
    ("POST", "/private/agent/logs", "agent", handle_agent_logs_post),
    ("POST", "/private/agent/rotate_key", "agent", handle_agent_rotate_key),
    ("GET", "/private/agent/task/poll", "agent", handle_agent_task_poll),
    ("POST", "/private/agent/task/poll", "agent", handle_agent_task_poll),
    ("GET", "/private/agent/task/poll_urgent", "agent", handle_agent_task_poll_urgent),
    ("POST", "/private/agent/task/poll_urgent", "agent", handle_agent_task_poll_urgent),
    ("GET", "/private/agent/task/cancels", "agent", handle_agent_cancels),
    ("POST", f"/private/agent/take/{TASK_PATH}", "agent", handle_agent_take),
    ("POST", f"/private/agent/task/progress/{TASK_PATH}", "agent", handle_agent_progress),
    ("POST", f"/private/agent/task/resolve/{TASK_PATH}", "agent", handle_agent_resolve),
    ("GET", "/private/agent/bucket/{bucket_uid}/stat", "agent", handle_agent_bucket_stat),
    ("GET", "/private/agent/bucket/{bucket_uid}/file/{file_uid}", "agent", handle_agent_bucket_download),
    ("POST", "/private/agent/bucket/{bucket_uid}/upload", "agent", handle_agent_bucket_upload),
    ("GET", "/management/events", "mgmt", handle_mgmt_events),
    ("GET", "/management/storage/buckets", "mgmt", handle_mgmt_storage_buckets),
    ("DELETE", "/management/storage/buckets", "mgmt", handle_mgmt_storage_purge),
    ("GET", "/management/storage/quotas", "mgmt", handle_mgmt_storage_quotas),
    ("DELETE", "/management/storage/bucket/{bucket_uid}", "mgmt", handle_mgmt_storage_bucket_delete),
    ("DELETE", "/management/storage/key/{api_key}/buckets", "mgmt", handle_mgmt_storage_key_delete),
    ("POST", "/management/storage/cleanup/trigger", "mgmt", handle_mgmt_storage_cleanup),
    ("GET", "/management/version", "mgmt", handle_version),
    ("GET", "/management/agent_logs/by_severity", "mgmt", handle_mgmt_agent_logs_by_severity),
    ("GET", "/management/agent_logs/by_agent", "mgmt", handle_mgmt_agent_logs_by_agent),
    ("GET", "/management/agent_logs/latest", "mgmt", handle_mgmt_agent_logs_latest),
    ("POST", "/management/agent_logs/cleanup/trigger", "mgmt", handle_mgmt_agent_logs_cleanup),
    ("GET", "/management/capabilities/list/online", "mgmt", handle_mgmt_capabilities_online),
    ("GET", "/management/agents/list", "mgmt", handle_mgmt_agents_list),
    ("GET", "/management/agents/list/online", "mgmt", handle_mgmt_agents_list_online),
    ("POST", "/management/agents/delete/{agent_id}", "mgmt", handle_mgmt_agent_delete),
    ("POST", "/management/agents/drain/{agent_id}", "mgmt", handle_mgmt_agent_drain),
    ("POST", "/management/agents/resume/{agent_id}", "mgmt", handle_mgmt_agent_resume),
    ("POST", "/management/agents/rotate_key/{agent_id}", "mgmt", handle_mgmt_agent_rotate_key),
    ("POST", "/management/agents/reset", "mgmt", handle_mgmt_agents_reset),
    ("GET", "/management/tasks/list", "mgmt", handle_mgmt_tasks_list),
    ("POST", "/management/tasks/reset", "mgmt", handle_mgmt_tasks_reset),
    ("POST", f"/management/tasks/cancel/{TASK_PATH}", "mgmt", handle_mgmt_task_cancel),
    ("POST", f"/management/tasks/requeue/{TASK_PATH}", "mgmt", handle_mgmt_task_requeue),
    ("GET", "/management/client_api_keys/list", "mgmt", handle_mgmt_keys_list),
    ("POST", "/management/client_api_keys/update", "mgmt", handle_mgmt_key_update),
    ("POST", "/management/client_api_keys/revoke/{key}", "mgmt", handle_mgmt_key_revoke),
    ("GET", "/health", "open", handle_health),
    ("GET", "/health/ready", "open", handle_ready),
    ("GET", "/version", "open", handle_version),
    ("GET", "/stats", "open", handle_stats),
    ("GET", "/metrics", "open", handle_metrics),  # checks the token itself unless public
    ("GET", "/openapi.json", "open", handle_openapi),
    ("GET", "/{path:.*}", "open", handle_static),  # last: everything else is the console
]


# ============================================================================ openapi
#
# `GET /openapi.json` describes every route of ROUTES (but the console's catch-all).
# OPENAPI_OPS says what each path takes and answers; `openapi_document()` adds what
# follows from the route's kind: its security scheme, 401 for guarded routes (and open
# ones that check a credential), 400/408/413/503 for routes that read a body, 429 where
# failed credentials are throttled, 400/404 for task paths. Building it is pure: the
# same routes give the same document.

def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: str = "", **props: Any) -> dict:
    """An object schema; `required` names its required properties, space-separated."""
    return {"type": "object", "properties": props, "required": required.split()}


def _opt(kind: str, **extra: Any) -> dict:
    """A field the server also accepts as null (treated as absent)."""
    return {"type": [kind, "null"], **extra}


STR, INT, BOOL, TIME = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "string"}
_STATUS = {"type": "string", "enum": list(TASK_STATUSES)}
_NO_CONTROL = "^[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]+$"  # CONTROL_CHARS, as a JSON Schema pattern
_CAP = {"type": "string", "minLength": 1, "maxLength": CAP_MAX_CHARS, "pattern": _NO_CONTROL}
_SECS = {"type": ["number", "null"], "minimum": 0.001, "maximum": 366 * 86400}
_SUBMISSION_FIELDS = {
    "capability": _CAP, "payload": {}, "urgent": _opt("boolean"), "restartable": _opt("boolean"),
    "fetchFiles": _opt("array", items=_ref("FileReference")),
    "artifacts": _opt("array", items=_ref("FileReference")),
    **{name: {"type": ["integer" if integer else "number", "null"], "minimum": low, "maximum": high}
       for name, (low, high, integer) in SUBMIT_LIMITS.items()},
    "retryOnSameNode": _opt("boolean"), "runAt": _opt("string", format="date-time"),
    "file_bucket": _opt("array", maxItems=MAX_TASK_BUCKETS, items={"type": "string", "minLength": 1},
                        description="buckets whose files the agent fetches into the task folder"),
    "output_bucket": _opt("string", minLength=1, description="a bucket the agent uploads the "
                          "task's output/ files into"),
}
_AGENT_INFO = _obj("capabilities", capabilities={"type": "array", "items": _CAP},
                   displayName=_opt("string", maxLength=DISPLAY_NAME_MAX),
                   appVersion=_opt("string", maxLength=APP_VERSION_MAX),
                   tier=_opt("integer", minimum=0, maximum=255),
                   capacity=_opt("integer", minimum=1, maximum=MAX_CAPACITY),
                   systemInfo=_opt("object"),
                   heartbeatSecs=_opt("number", minimum=1, maximum=MAX_HEARTBEAT_S, description=(
                       "the agent pings at least this often; it is offline after "
                       f"{HEARTBEATS_MISSED} missed beats (without it: after {ONLINE_S:.0f} s)")))
# What parse_submission refuses beyond the fields' own schemas: runAt with delaySecs, and
# an urgent task with runAt, delaySecs or priority (null counts as absent).
_SUBMISSION_RULES = {"allOf": [
    {"not": {"required": ["runAt", "delaySecs"], "properties": {
        "runAt": {"type": "string"}, "delaySecs": {"type": "number"}}}},
    {"if": {"required": ["urgent"], "properties": {"urgent": {"const": True}}},
     "then": {"properties": {name: {"type": "null"} for name in ("runAt", "delaySecs", "priority")}}},
]}

OPENAPI_SCHEMAS = {
    "Error": {**_obj("error", error=_obj("type message status", type=STR, message=STR, status=INT)),
              "description": "Every error; a few carry the task's `id` beside `error`."},
    "TaskId": _obj("cap id", cap=STR, id=STR),
    "FileReference": _obj("path", path={"type": "string", "minLength": 1},
                          **{k: _opt("string") for k in _FILE_REF_FIELDS[1:]},
                          customHeader=_opt("object")),
    "Submission": {**_obj("capability", **_SUBMISSION_FIELDS, apiKey=STR), **_SUBMISSION_RULES},
    "UrgentSubmission": {"allOf": [_ref("Submission"), _obj("urgent", urgent={"const": True})],
                         "description": "runAt, delaySecs and priority are for regular tasks"},
    "TaskData": _obj("capability urgent restartable payload fetchFiles artifacts",
                     **_SUBMISSION_FIELDS),
    "SubmitAnswer": _obj("id capability status message", id=_ref("TaskId"), capability=STR,
                         status=_STATUS, message=STR),
    "TaskStatus": _obj("id status log createdAt", id=_ref("TaskId"), status=_STATUS,
                       stage={**STR, "description": "absent once the task has ended"},
                       output={}, log=STR, createdAt=TIME),
    "UnassignedTask": _obj("id data createdAt", id=_ref("TaskId"), data=_ref("TaskData"),
                           createdAt=TIME),
    "AssignedTask": _obj(
        "id data agentId status history createdAt assignedAt result log stage",
        id=_ref("TaskId"), data=_ref("TaskData"), agentId=_opt("string"), status=_STATUS,
        history={"type": "array", "items": _obj("timestamp description", timestamp=TIME,
                                                  description=STR)},
        createdAt=TIME, assignedAt=_opt("string"), result={}, log=STR,
        stage=_opt("string", description="what the agent last said it is doing; null once ended"),
        endedAt=_opt("string", description="when it ended (completed, failed or canceled)"),
        attempt=INT, cancelRequested=BOOL),
    "AgentInfo": _AGENT_INFO,
    "AgentRegistration": {**_AGENT_INFO, "required": ["capabilities", "apiKey"],
                          "properties": {**_AGENT_INFO["properties"], "apiKey": STR}},
    "AgentIdentity": _obj("agentId key message", agentId=STR, key=STR, message=STR),
    "Agent": _obj("uid uidShort registeredAt lastContact capabilities tier capacity systemInfo online",
                  uid=STR, uidShort=STR, registeredAt=TIME, lastContact=TIME,
                  capabilities={"type": "array", "items": STR}, tier=INT, capacity=INT,
                  systemInfo={"type": "object"}, online=BOOL, draining=BOOL, tasksInFlight=INT,
                  heartbeatSecs=_opt("number"), displayName=_opt("string"), appVersion=_opt("string")),
    "ManagedAgent": {"allOf": [_ref("Agent"), _obj("personalLoginToken", personalLoginToken=STR)],
                     "description": "An agent as management sees it: with its login secret"},
    "Version": _obj("version", version=STR),
    "AgentLogLine": _obj("severity text", severity={"type": "string", "enum": list(AGENT_LOG_SEVERITIES),
                                                       "description": "any case"},
                         text={"type": "string", "maxLength": AGENT_LOG_TEXT_MAX},
                         agentId=_opt("string", maxLength=100),
                         agentName=_opt("string", maxLength=DISPLAY_NAME_MAX),
                         machineFingerprint=_opt("string", maxLength=200)),
    "AgentLogRecord": _obj("recordId agentId agentName severity text timestamp", recordId=STR,
                           agentId=STR, agentName=STR, machineFingerprint=_opt("string"),
                           severity={"type": "string", "enum": list(AGENT_LOG_SEVERITIES)},
                           text=STR, timestamp=TIME),
    "ClientApiKey": _obj("key capabilities isPredefined created isRevoked", key=STR,
                         capabilities={"type": "array", "items": STR}, isPredefined=BOOL,
                         created=TIME, isRevoked=BOOL, maxInFlight=_opt("integer"),
                         maxQueuedBytes=_opt("integer")),
    "AgentCredential": _obj("agentId key token expiresIn", agentId=STR, key=STR, token=STR,
                            expiresIn=INT),
    "Health": _obj("status cached_agents cached_tokens timestamp", status=STR,
                   cached_agents=INT, cached_tokens=INT, timestamp=TIME,
                   reason={"type": "string", "enum": ["storage_full", "storage_lost"]}, message=STR),
    "Ready": _obj("ready role", ready={"type": "boolean"},
                  role={"type": "string", "enum": ["leader", "standby"]},
                  leader={"type": ["string", "null"]}, reason=STR, seq=INT),
    "PingAnswer": {**_obj("status cached_agents cached_tokens timestamp", status=STR,
                          cached_agents=INT, cached_tokens=INT, timestamp=TIME,
                          released={"type": "array", "items": _ref("TaskId")}),
                   "description": "Health; with a holding list also the tasks released: "
                                  "assigned to the agent, not in its list, and taken more than "
                                  f"{HOLD_GRACE_S:g} s ago (never started: back to the queue; "
                                  "started: retried if restartable, else failed)"},
    "StorageLimits": _obj("max_buckets_per_key bucket_size_bytes bucket_ttl_minutes",
                          max_buckets_per_key=INT, bucket_size_bytes=INT,
                          bucket_ttl_minutes={"type": "number"}),
    "Bucket": _obj("bucket_uid created_at file_count used_bytes remaining_bytes tasks",
                   bucket_uid=STR, created_at=TIME, file_count=INT, used_bytes=INT,
                   remaining_bytes=INT, tasks={"type": "array", "items": STR}, rm_after_task=BOOL, expires_at=TIME),
    "BucketStat": _obj("files used_bytes remaining_bytes", bucket_uid=STR, used_bytes=INT,
                       remaining_bytes=INT, files={"type": "array", "items": _obj(
                           "file_uid size_bytes", file_uid=STR, size_bytes=INT, original_name=STR,
                           sha256=STR, created_at=TIME, missing={
                               "type": "boolean",
                               "description": "recorded, but no longer on the server's disk"})}),
    "UploadedFile": _obj("file_uid size sha256", file_uid=STR, bucket_uid=STR, original_name=STR,
                         size=INT, sha256=STR),
    "StorageUsage": _obj("bucket_count total_files total_bytes", bucket_count=INT,
                         total_files=INT, total_bytes=INT),
    "Message": _obj("message", message=STR),
    "Result": _obj("result", result=STR),
    "Queue": _obj("assigned unassigned", assigned={"type": "array", "items": _ref("AssignedTask")},
                  unassigned={"type": "array", "items": _ref("UnassignedTask")}),
}

_ERROR_TEXT = {400: "Malformed request", 401: "Missing or wrong credentials",
               403: "Not allowed", 404: "No such task, agent or key", 409: "Conflicts with the state",
               408: "The body did not arrive within the body timeout",
               413: "Body over the limit",
               429: "Too many failed authentications from this address (see Retry-After), "
                    "the key's maxInFlight or maxQueuedBytes is reached, or its event streams are "
                    "at their limit",
               503: "No online agent serves the capability, nobody took the task in time, or the "
                    "server is reading too many bodies at once (`overloaded`, see Retry-After)",
               504: "The task outlived the hold; it goes on and stays pollable",
               410: "The file is recorded but no longer on the server's disk (file_missing)",
               507: "The disk refused the change (storage_full, storage_lost); nothing changed"}
# The operations that change state: while the disk refuses writes they answer 507.
_WRITES = {"/api/task/submit", "/api/task/submit_blocking", "/api/task/cancel/{cap}/{id}",
           "/agent/register", "/private/agent/info/update", "/private/agent/rotate_key",
           "/private/agent/task/poll",
           "/private/agent/task/poll_urgent", "/private/agent/take/{cap}/{id}",
           "/private/agent/task/progress/{cap}/{id}", "/private/agent/task/resolve/{cap}/{id}",
           "/management/agents/delete/{agent_id}", "/management/agents/drain/{agent_id}",
           "/management/agents/resume/{agent_id}", "/management/agents/rotate_key/{agent_id}",
           "/management/agents/reset",
           "/management/tasks/reset", "/management/tasks/cancel/{cap}/{id}",
           "/management/tasks/requeue/{cap}/{id}", "/management/client_api_keys/update",
           "/management/client_api_keys/revoke/{key}",
           "/api/storage/bucket/create", "/api/storage/bucket/{bucket_uid}/upload",
           "/api/storage/bucket/{bucket_uid}/file/{file_uid}", "/api/storage/bucket/{bucket_uid}",
           "/private/agent/bucket/{bucket_uid}/upload", "/management/storage/buckets",
           "/management/storage/bucket/{bucket_uid}", "/management/storage/key/{api_key}/buckets",
           "/management/storage/cleanup/trigger"}


def _query(name: str, schema: dict, text: str) -> dict:
    return {"name": name, "in": "query", "schema": schema, "description": text}


def _wait(name: str = "wait", text: str = "seconds to hold the request") -> dict:
    return _query(name, {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S}, text)


_TAKE = _query("take", {"type": "boolean"}, "also take the task: answers an AssignedTask")
_EVENT_PARAMS = [
    {**_query("task", {"type": "array", "items": {"type": "string", "pattern": "^.+/.+$"}},
              "only these tasks, as <capability>/<id> (repeatable)"), "explode": True},
    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]+$"},
     "description": "resume after this event id"},
    _query("lastEventId", {"type": "string", "pattern": "^[0-9]+$"}, "the same, for clients that "
           "cannot set headers"),
    _query("current", {"type": "boolean"}, "start with the current state when not resuming "
           "(default true); false: only what happens from now"),
]
_SSE = {"text/event-stream": {"schema": STR}}


def _op(summary: str, ok: Any, errors: str = "", body: str | dict | None = None,
        params: tuple = (), status: tuple = (200,), media: dict | None = None,
        body_required: bool = True, body_media: str = "application/json") -> dict:
    """One path's operation: `ok` is the success schema (a component name or a schema),
    `errors` the error statuses it adds to those its route kind brings."""
    schema = _ref(ok) if isinstance(ok, str) else ok
    return {"summary": summary, "ok": {s: media or {"application/json": {"schema": schema}}
                                       for s in status},
            "errors": {int(e) for e in errors.split()}, "params": list(params),
            "body": _ref(body) if isinstance(body, str) else body, "body_required": body_required,
            "body_media": body_media}


_LOG_LIMIT = _query("limit", {"type": "integer", "minimum": -1}, "at most this many (default "
                    f"{AGENT_LOG_LIMIT}; -1: all)")
_TASK_OR_NULL = {"anyOf": [_ref("UnassignedTask"), _ref("AssignedTask"), {"type": "null"}]}
_STRINGS = {"type": "array", "items": STR}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_UPLOAD = _obj("file", file={"type": "string", "format": "binary"})
OPENAPI_OPS = {
    "/api/task/submit": _op(
        "Submit a task (200: an earlier task with the same Idempotency-Key)", "SubmitAnswer",
        "403 409 429 503", "Submission", status=(200, 201, 202),
        params=({"name": "Idempotency-Key", "in": "header",
                 "schema": {"type": "string", "minLength": 1, "maxLength": 255}},)),
    "/api/task/submit_blocking": _op("Submit an urgent task and wait for its end", "AssignedTask",
                                     "403 404 429 503 504", "UrgentSubmission"),
    "/api/task/poll/{cap}/{id}": _op("A task's status; ?wait holds until it ends", "TaskStatus",
                                     params=(_wait(text="hold until the task ends, at most this"),)),
    "/api/task/cancel/{cap}/{id}": _op("Cancel a task of this key", "TaskStatus", "409"),
    "/api/task/events": _op("The key's tasks as Server-Sent Events", STR, "400 404 429",
                            params=tuple(_EVENT_PARAMS), media=_SSE),
    "/api/capabilities/online": _op("Capabilities online agents serve, that the key may use", _STRINGS),
    "/api/ping": _op("Health; 503 with a reason while the disk refuses writes", "Health",
                     status=(200, 503)),
    "/agent/register": _op("Register an agent", "AgentIdentity", "401", "AgentRegistration"),
    "/agent/auth": _op("Exchange an agent's id and key for a JWT", _obj(
        "token expiresIn", token=STR, expiresIn=INT), "400 401",
        _obj("agentId key", agentId=STR, key=STR)),
    "/private/agent/ws": _op(
        "The agent's WebSocket: tasks and cancels pushed, requests as frames (README)", STR,
        "400 401", status=(101,), media={"text/plain": {"schema": STR}},
        params=(_query("token", STR, "the agent's JWT (from POST /agent/auth)"),)),
    "/private/agent/ping": _op(
        "Counts as contact; POST with `holding` releases the tasks the agent no longer holds",
        "PingAnswer", "400", _obj("", holding={"type": ["array", "null"], "maxItems": MAX_HOLDING,
                                               "items": _ref("TaskId")}), body_required=False),
    "/private/agent/info/update": _op("Update the agent's self-description", "AgentIdentity",
                                      "400", "AgentInfo"),
    "/private/agent/rotate_key": _op("A fresh login secret and token; earlier tokens stop working",
                                     "AgentCredential"),
    "/private/agent/task/poll": _op("Long poll for the next task", _TASK_OR_NULL, "400 409",
                                    params=(_wait(), _TAKE)),
    "/private/agent/task/poll_urgent": _op("Long poll for the next urgent task", _TASK_OR_NULL,
                                           "400 409", params=(_wait(), _TAKE)),
    "/private/agent/task/cancels": _op("Long poll for held tasks to stop", {
        "type": "array", "items": _ref("TaskId")}, "400", params=(_wait(),)),
    "/private/agent/take/{cap}/{id}": _op("Take a task", "AssignedTask", "403 409"),
    "/private/agent/task/progress/{cap}/{id}": _op(
        "Report progress: log lines and stage", _obj("message", message=STR, cancel=BOOL),
        "400 403 409", _obj("id", id={"anyOf": [STR, _ref("TaskId")]}, stage=_opt("string"),
                            logUpdate=_opt("string"))),
    "/private/agent/task/resolve/{cap}/{id}": _op(
        "Report the outcome; ?next also takes the next task",
        _obj("message", message=STR, next={"anyOf": [_ref("AssignedTask"), {"type": "null"}]}),
        "400 403 409", _obj("id status", id={"anyOf": [STR, _ref("TaskId")]}, capability=STR,
                            output={}, status={"anyOf": [
                                {"type": "string", "enum": list(RESOLVE_OUTCOMES)},
                                _obj("success", success={}), _obj("failure", failure={}),
                                _obj("notExecuted", notExecuted={})]}),
        params=(_wait("next", "then long-poll this long for the next task"),)),
    "/management/events": _op("Every change as Server-Sent Events", STR, "400 404 429",
                              params=tuple(_EVENT_PARAMS), media=_SSE),
    "/management/version": _op("The server's version", "Version"),
    "/private/agent/logs": _op("Send one of the agent's own log lines", "AgentLogRecord", "400",
                               "AgentLogLine"),
    "/management/agent_logs/by_severity": _op(
        "Agents' log lines of one severity, newest first", _obj(
            "severity count items", severity=STR, count=INT,
            items={"type": "array", "items": _ref("AgentLogRecord")}), "400",
        params=({**_query("severity", {"type": "string", "enum": list(AGENT_LOG_SEVERITIES)},
                          "which severity"), "required": True}, _LOG_LIMIT)),
    "/management/agent_logs/by_agent": _op(
        "One agent's log lines, newest first", _obj(
            "agentId count items", agentId=STR, count=INT,
            items={"type": "array", "items": _ref("AgentLogRecord")}), "400",
        params=({**_query("agent_id", STR, "the agent's id"), "required": True}, _LOG_LIMIT)),
    "/management/agent_logs/latest": _op(
        "Every agent's log lines, newest first", _obj(
            "count items", count=INT, items={"type": "array", "items": _ref("AgentLogRecord")}),
        "400", params=(_LOG_LIMIT,)),
    "/management/agent_logs/cleanup/trigger": _op(
        "Drop agents' log lines older than 14 days", _obj(
            "deleted max_age_days", deleted=INT, max_age_days=INT)),
    "/version": _op("The server's version", "Version"),
    "/api/storage/limits": _op("The storage limits of a client key", "StorageLimits"),
    "/api/storage/buckets": _op("The key's buckets", _obj("buckets", buckets={
        "type": "array", "items": _ref("Bucket")})),
    "/api/storage/bucket/create": _op(
        "Create a bucket; rm_after_task: deleted once the tasks naming it have ended",
        _obj("bucket_uid", bucket_uid=STR, rm_after_task=BOOL, expires_at=TIME), "400",
        _obj("", rm_after_task=_opt("boolean")), status=(201,), body_required=False),
    "/api/storage/bucket/{bucket_uid}/upload": _op(
        "Upload a file (multipart, part `file`); stored with its SHA-256", "UploadedFile",
        "404 409", _UPLOAD, status=(201,), body_media="multipart/form-data"),
    "/api/storage/bucket/{bucket_uid}/stat": _op("A bucket's files and room", "BucketStat", "404"),
    "/api/storage/bucket/{bucket_uid}/file/{file_uid}": {
        "GET": _op("Download a file", _BINARY["application/octet-stream"]["schema"], "404 410",
                   media=_BINARY),
        "DELETE": _op("Delete a file", _obj("deleted_file_uid", deleted_file_uid=STR), "404")},
    "/api/storage/bucket/{bucket_uid}/file/{file_uid}/hash": _op(
        "A file's SHA-256", _obj("hash", hash=STR), "404"),
    "/api/storage/bucket/{bucket_uid}": _op(
        "Delete a bucket and its files", _obj("deleted_bucket_uid", deleted_bucket_uid=STR), "404"),
    "/private/agent/bucket/{bucket_uid}/stat": _op(
        "The files of a bucket a task this agent holds names", "BucketStat", "404"),
    "/private/agent/bucket/{bucket_uid}/file/{file_uid}": _op(
        "Download a file of a bucket a task this agent holds names", _BINARY[
            "application/octet-stream"]["schema"], "404 410", media=_BINARY),
    "/private/agent/bucket/{bucket_uid}/upload": _op(
        "Upload a file into the output_bucket of a task this agent holds", "UploadedFile",
        "404 409", _UPLOAD, status=(201,), body_media="multipart/form-data"),
    "/management/storage/buckets": {
        "GET": _op("Every bucket, by client key", _obj("buckets_by_key", buckets_by_key={
            "type": "object", "additionalProperties": {"allOf": [_ref("StorageUsage"), _obj(
                "buckets", buckets={"type": "array", "items": _obj(
                    "bucket_uid created_at file_count used_bytes", bucket_uid=STR, created_at=TIME,
                    file_count=INT, used_bytes=INT)})]}})),
        "DELETE": _op("Delete every bucket of every key", _obj("deleted_count", deleted_count=INT))},
    "/management/storage/quotas": _op(
        "Storage limits and usage by client key", _obj("limits usage", limits=_ref("StorageLimits"),
                                                       usage={"type": "object", "additionalProperties": _ref("StorageUsage")}),
        params=(_query("api_key", STR, "only this client key's usage"),)),
    "/management/storage/bucket/{bucket_uid}": _op(
        "Delete any bucket", _obj("deleted_bucket_uid", deleted_bucket_uid=STR), "404"),
    "/management/storage/key/{api_key}/buckets": _op(
        "Delete every bucket of a client key", _obj("api_key deleted_count", api_key=STR,
                                                    deleted_count=INT)),
    "/management/storage/cleanup/trigger": _op(
        "Delete the expired buckets (and finished rm_after_task ones) now",
        _obj("deleted_count", deleted_count=INT)),
    "/management/capabilities/list/online": _op("Capabilities online agents serve", _STRINGS),
    "/management/agents/list": _op("All agents, with their login secrets", {
        "type": "array", "items": _ref("ManagedAgent")}),
    "/management/agents/list/online": _op("Online agents, with their login secrets", {
        "type": "array", "items": _ref("ManagedAgent")}),
    "/management/agents/delete/{agent_id}": _op("Delete an agent", {"const": "Agent deleted"}, "404"),
    "/management/agents/drain/{agent_id}": _op("Give an agent no new tasks", "Agent", "404"),
    "/management/agents/resume/{agent_id}": _op("Undo a drain", "Agent", "404"),
    "/management/agents/rotate_key/{agent_id}": _op(
        "Revoke an agent's credential: a new secret, earlier tokens refused", "Agent", "404"),
    "/management/agents/reset": _op("Delete every agent", "Result"),
    "/management/tasks/list": _op("Tasks by queue; with a filter other than status, or limit/cursor, "
                                  "one page newest first", _obj(
        "urgent regular", urgent=_ref("Queue"), regular=_ref("Queue"),
        next={"type": ["string", "null"], "description": "cursor of the next page (pages only)"},
        total={"type": "integer", "description": "tasks matching the filters (pages only)"}), "400",
        params=(_query("status", _STATUS, "only tasks in this status"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                       f"a page of at most this many tasks (default {DEFAULT_PAGE})"),
                _query("cursor", {"type": "string", "pattern": CURSOR_RE.pattern},
                       "the `next` of the page before"),
                _query("capability", _CAP, "only tasks of this capability (or base capability)"),
                _query("queue", {"type": "string", "enum": ["urgent", "regular"]}, "only this queue"),
                _query("key", STR, "only tasks submitted with this client API key"),
                _query("task", {"type": "string", "pattern": "^.+/.+$"},
                       "only this task, as <capability>/<id>, with its whole log"))),
    "/management/tasks/reset": _op("Delete every task", "Result"),
    "/management/tasks/cancel/{cap}/{id}": _op("Cancel any task", "AssignedTask", "409"),
    "/management/tasks/requeue/{cap}/{id}": _op("Requeue a failed or canceled task",
                                                "AssignedTask", "409"),
    "/management/client_api_keys/list": _op("Client API keys", {
        "type": "array", "items": _ref("ClientApiKey")}),
    "/management/client_api_keys/update": _op(
        "Create or replace a client API key", "ClientApiKey", "400", _obj(
            "key capabilities",
            key={"type": "string", "minLength": MIN_SECRET_CHARS, "maxLength": MAX_KEY_CHARS,
                 "pattern": "^[!-.0-~]+$",
                 "description": "a new key; an existing one (set at start) may be shorter"},
            capabilities={"type": "array", "items": {"type": "string", "minLength": 1,
                                                     "pattern": _NO_CONTROL}},
            maxInFlight=_opt("integer", minimum=1),
            maxQueuedBytes=_opt("integer", minimum=1, maximum=MAX_QUEUED_BYTES))),
    "/management/client_api_keys/revoke/{key}": _op("Revoke a client API key", "ClientApiKey", "404"),
    "/health": _op("Health; 503 with a reason while the disk refuses writes", "Health",
                   status=(200, 503)),
    "/health/ready": _op("Readiness: 200 on the server that takes writes (the leader), 503 on a "
                         "standby or while the disk refuses writes", "Ready", status=(200, 503)),
    "/stats": _op("Counts of agents and tasks; the journal's too with the management token",
                  {"type": "object"}),
    "/metrics": _op("Prometheus metrics", STR, media={"text/plain": {"schema": STR}}),
    "/openapi.json": _op("This document", {"type": "object"}),
}

OPENAPI_SECURITY = {
    "client": [{"ApiKey": []}, {"ClientBearer": []}, {"MgmtToken": []}],
    "client_stream": [{"ApiKey": []}, {"ClientBearer": []}, {"MgmtToken": []}],
    "agent": [{"AgentJWT": []}],
    "mgmt": [{"MgmtToken": []}, {"MgmtBearer": []}],
    "open": [],
}
OPENAPI_SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "A client API key (the body's `apiKey` field works too)."},
    "ClientBearer": {"type": "http", "scheme": "bearer", "description": "A client API key."},
    "MgmtToken": {"type": "apiKey", "in": "header", "name": "X-Mgmt-Token",
                  "description": "The management token (on client routes X-MGMT-API-KEY, the "
                                 "original's name, works too)."},
    "MgmtBearer": {"type": "http", "scheme": "bearer", "description": "The management token."},
    "AgentJWT": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                 "description": "From POST /agent/auth."},
}
_PATH_PARAMS = {
    "cap": "capability, percent-encoded (`/` as `%2F`)", "id": "task id (a ULID)",
    "agent_id": "agent id", "key": "client API key", "api_key": "client API key",
    "bucket_uid": "bucket id (from bucket/create)", "file_uid": "file id (from an upload or stat)",
}


def openapi_path(route_path: str) -> str:
    """`/api/task/poll/{cap:.+}/{id:[^/]+}` -> `/api/task/poll/{cap}/{id}`."""
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route_path)


def openapi_document(routes: list) -> dict:
    """OpenAPI 3.1 document of `routes` (the ROUTES table)."""
    paths: dict[str, dict] = {}
    for method, route_path, kind, handler in routes:
        path = openapi_path(route_path)
        if path == "/{path}":  # the console's static files
            continue
        spec = OPENAPI_OPS[path]
        spec = spec.get(method, spec)  # a path whose methods answer differently: one op each
        names = re.findall(r"\{(\w+)\}", path)
        errors = set(spec["errors"])
        errors |= {401} if kind != "open" or path == "/metrics" else set()
        errors |= {400, 408, 413, 503} if spec["body"] or (kind == "client" and method == "POST") else set()
        credential = handler.__name__ in CREDENTIAL_HANDLERS
        errors |= {429} if kind in ("client", "client_stream", "mgmt") or credential else set()
        errors |= {401} if credential else set()
        errors |= {400, 404} if "cap" in names else set()
        errors |= {507} if path in _WRITES and (method in ("POST", "DELETE") or _TAKE in spec["params"]) else set()
        operation = {
            "operationId": method.lower() + re.sub(r"\W+", "_", path).rstrip("_"),
            "summary": spec["summary"], "tags": [kind],
            "parameters": [{"name": n, "in": "path", "required": True, "description": _PATH_PARAMS[n],
                            "schema": _CAP if n == "cap" else {"type": "string", "minLength": 1}}
                           for n in names] + spec["params"],
            "responses": {**{str(s): {"description": "OK" if s < 400 else "Unhealthy", "content": c}
                             for s, c in spec["ok"].items()},
                          **{str(e): {"description": _ERROR_TEXT[e], "content": {
                              "application/json": {"schema": _ref("Error")}}} for e in sorted(errors)}},
            # /metrics takes the management token, unless the server runs --metrics-public
            "security": [{"MgmtToken": []}, {}] if path == "/metrics" else OPENAPI_SECURITY[kind],
        }
        if spec["body"] is not None and method == "POST":
            operation["requestBody"] = {"required": spec["body_required"], "content": {
                spec["body_media"]: {"schema": spec["body"]}}}
        paths.setdefault(path, {})[method.lower()] = operation
    return {"openapi": "3.1.0",
            "info": {"title": "OffloadMQ", "version": __version__,
                     "description": "Task queue that offloads work to remote agents. "
                                    "`GET /` serves the web console (not described here)."},
            "paths": paths,
            "components": {"schemas": OPENAPI_SCHEMAS, "securitySchemes": OPENAPI_SECURITY_SCHEMES}}


# ============================================================================ app

AUTH_LOG_INTERVAL_S = 60.0


async def log_auth_failures(throttle: AuthThrottle) -> None:
    """Once per interval, one line per address that kept failing (never the secret)."""
    while True:
        await asyncio.sleep(AUTH_LOG_INTERVAL_S)
        for addr, failures in throttle.summaries(time.monotonic()):
            log.warning("%d failed authentications from %s in the last %d s", failures, addr,
                        AUTH_LOG_INTERVAL_S)


async def stop_task(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def create_app(config: Config | None = None, hub: Hub | None = None) -> web.Application:
    config = config or load_config([])
    hub = hub or Hub(config)
    # Only a server that may be a standby pays for the leader check.
    middlewares = [timing_middleware, error_middleware, *([leader_middleware] if config.store else [])]
    if config.access_log:  # outermost, to log the status the client gets; absent, it costs nothing
        middlewares.insert(0, access_middleware)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[HUB] = hub
    app[STREAMS] = streams = EventStreams(hub)
    app[TOKENS] = AgentTokens(config.jwt_secret, config.jwt_lifetime_s, hub.clock)
    app[OPENAPI] = openapi_document(ROUTES)
    app[AGENT_SOCKETS] = AgentSockets(hub)
    app[AGENT_LOGS] = AgentLogs(hub.events)
    app[BODY_BUDGET] = BodyBudget(config.body_budget_bytes)
    app[THROTTLE] = AuthThrottle(config.auth_failures_per_min)
    app.on_response_prepare.append(add_security_headers)
    for method, path, kind, handler in ROUTES:
        app.router.add_route(method, path, guarded(kind, handler))

    async def start(app: web.Application) -> None:
        await hub.start()
        auth_log = asyncio.get_running_loop().create_task(log_auth_failures(app[THROTTLE]))
        app.on_cleanup.insert(0, lambda app: stop_task(auth_log))
        log.info("started: %s", hub.summary())

    async def shutdown(app: web.Application) -> None:
        await app[AGENT_SOCKETS].close_all()
        await hub.release_waiters()
        streams.close_all()

    async def stop(app: web.Application) -> None:
        streams.stop()
        await hub.stop()
        log.info("stopped after %.0f s: %s", hub.clock() - hub.started_at, hub.summary())

    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(stop)
    return app


FD_MARGIN = 64        # descriptors kept for the journal, snapshots, static files, the agent's...
ACCEPT_PAUSE_S = 0.2  # out of descriptors or at the connection limit: stop accepting this long
ACCEPT_LOG_S = 10.0   # at most one log line per reason this often


def connection_limit(configured: int) -> int:
    if configured > 0:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
    return max(16, soft - FD_MARGIN)


class Listener:
    """The listening socket, accepted here rather than by asyncio's own loop: at the
    descriptor limit that one logs a traceback for every accept() that fails and re-arms
    itself once per failure (tens of thousands of lines a second). Here at most
    `max_connections` are open; past it, or when accept() finds no descriptor left
    (EMFILE/ENFILE), new connections wait in the kernel's backlog while accepting pauses
    for a moment; each reason is logged at most once per ACCEPT_LOG_S."""

    def __init__(self, server: web.Server, sock: socket.socket, max_connections: int):
        self.server = server
        self.sock = sock
        self.max_connections = max_connections
        self.starting = 0  # accepted, transport not made yet
        self.paused: asyncio.TimerHandle | None = None
        self.logged_at: dict[str, float] = {}
        self.waits: dict[str, int] = {}  # pauses since the reason was last logged

    def start(self) -> None:
        self.sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self.paused is not None:
            self.paused.cancel()
        loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):
            if len(self.server.connections) + self.starting >= self.max_connections:
                return self._pause("limit", "%d connections open, the limit: new ones wait in the "
                                   "backlog (OFFLOADMQ_MAX_CONNECTIONS, RLIMIT_NOFILE)", self.max_connections)
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return self._pause("descriptors", "accept failed (%s) with %d connections open: "
                                       "new ones wait in the backlog", err.strerror,
                                       len(self.server.connections))
                return self._pause("accept", "accept failed: %s", err)
            conn.setblocking(False)
            self.starting += 1
            loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self.server, conn)
        except OSError:
            conn.close()
        finally:
            self.starting -= 1

    def _pause(self, reason: str, message: str, *args: Any) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self.paused = loop.call_later(ACCEPT_PAUSE_S, self._resume)
        self.waits[reason] = self.waits.get(reason, 0) + 1
        now = loop.time()
        if now - self.logged_at.get(reason, -ACCEPT_LOG_S) >= ACCEPT_LOG_S:
            log.warning(message + " (%d pauses of %.1f s since the last such line)",
                        *args, self.waits.pop(reason), ACCEPT_PAUSE_S)
            self.logged_at[reason] = now

    def _resume(self) -> None:
        self.paused = None
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)


SHUTDOWN_S = 3.0  # SIGTERM to exit, at most (plus closing the journal)


async def serve(app: web.Application, config: Config) -> None:
    """Run the app on `config.host:port` until SIGINT or SIGTERM (see Listener)."""
    # aiohttp waits its shutdown_timeout twice for a handler that does not end (a stream
    # stuck writing to a client that does not read): once for it to finish, once more
    # after cancelling it. Half each keeps the whole shutdown within SHUTDOWN_S.
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.create_server((config.host, config.port), family=family, backlog=128)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_S / 2)
    await runner.setup()
    listener = Listener(runner.server, sock, connection_limit(config.max_connections))
    listener.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        listener.close()
        await runner.cleanup()


def print_first_start(config: Config) -> None:
    """Secrets generated at this start are printed once; they stay in the data folder (or
    the database). Later starts say where they are (the file, never the secrets)."""
    where = f"the database ({describe_store(config.store)})" if config.store \
        else config.data_path / SECRETS_FILE
    if not config.generated:
        if config.store or (config.data_path / SECRETS_FILE).exists():
            print(f"OffloadMQ: the generated secrets are kept in {where}")
            sys.stdout.flush()
        return
    shown = {"AGENT_API_KEYS": ("agent registration key", config.agent_api_keys[0]),
             "CLIENT_API_KEYS": ("client API key", config.client_api_keys[0]),
             "MGMT_TOKEN": ("management token", config.mgmt_token)}
    print(f"OffloadMQ first start: generated secrets, kept in {where}")
    for name in config.generated:
        if name in shown:
            label, value = shown[name]
            print(f"  {label:24} {value}")
    sys.stdout.flush()


def warn_short_secrets(config: Config) -> None:
    """Secrets set at start stay as given; short ones are easy to guess, so say so."""
    named = [("client API key", k) for k in config.client_api_keys] + \
            [("agent registration key", k) for k in config.agent_api_keys] + \
            [("management token", config.mgmt_token)]
    for label, value in named:
        if len(value) < MIN_SECRET_CHARS:
            log.warning("a %s set at start has %d characters; use at least %d (e.g. from "
                        "`python3 -c 'import secrets; print(secrets.token_urlsafe(24))'`)",
                        label, len(value), MIN_SECRET_CHARS)




def unusable_data_folder(err: OSError) -> str:
    """One line naming the file and what to do about it."""
    where, problem = err.filename or "the data folder", err.strerror
    if err.errno in (errno.EACCES, errno.EPERM):
        remedy = "give the server's user read and write access to it, or point --data elsewhere"
    elif err.errno == errno.EROFS:
        remedy = "the file system is mounted read-only: remount it read-write or point --data elsewhere"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST):
        problem = "a file is where a folder should be"
        remedy = ("the data path (--data, DATABASE_ROOT_PATH) must be a folder: move that file away "
                  "or point --data elsewhere")
    elif err.errno in FULL_ERRNOS:
        remedy = "free some room on that disk"
    else:
        remedy = "make the data folder readable and writable, or point --data elsewhere"
    return f"{where}: {problem}. Remedy: {remedy}"


def unusable_address(config: Config, err: OSError) -> str:
    """One line naming the address and how to choose another."""
    where = f"{config.host}:{config.port}"
    if err.errno == errno.EADDRINUSE:
        return (f"{where} is in use by another process. Remedy: stop that process, or choose "
                "another port with --port (or SERVER_ADDRESS=host:port)")
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: {err.strerror}. Remedy: choose a port above 1023 with --port"
    return (f"{where}: {err.strerror}. Remedy: choose an address of this machine with --host "
            "(0.0.0.0 for all of them)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-"):  # a CLI command (submit, status, cancel)
        sys.exit(cli_main(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Past a file size limit (RLIMIT_FSIZE) a write should fail with EFBIG, refused like a
    # full disk, rather than kill the server with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # The cyclic GC would rescan the growing state again and again while replay only
    # adds to it (and makes next to no cyclic garbage): keep it off, then freeze the
    # survivors so later collections skip them too.
    gc.disable()
    try:
        config = load_config(argv)
        if not config.store:  # PostgreSQL: main_postgres, in the event loop
            print_first_start(config)
            warn_short_secrets(config)
            hub = Hub(config)
            hub.recover()
    except JournalCorrupt as err:
        log.critical("cannot start: %s", err)
        sys.exit(2)
    except OSError as err:  # the data folder cannot be opened or written
        log.critical("cannot start: %s", unusable_data_folder(err))
        sys.exit(2)
    finally:
        gc.freeze()
        gc.enable()
    if config.store:
        return main_postgres(config)
    log.info("OffloadMQ %s on http://%s:%d (data in %s, fsync %s)", __version__,
             config.host, config.port, config.data_path, config.fsync)
    try:
        asyncio.run(serve(create_app(config, hub), config))
    except OSError as err:  # binding the address: in use, or not this machine's
        log.critical("cannot start: %s", unusable_address(config, err))
        sys.exit(2)


async def serve_postgres(config: Config) -> None:
    """PostgreSQL store: connect, take the shared secrets, then serve as leader or standby."""
    store = PostgresStore(config.store, config.advertise_url)
    await store.open()
    settings = {"JWT_SECRET": config.jwt_secret, "AGENT_API_KEYS": ",".join(config.agent_api_keys),
                "CLIENT_API_KEYS": ",".join(config.client_api_keys), "MGMT_TOKEN": config.mgmt_token}
    from_database = not all(settings.values())
    settings, generated = await store.load_secrets(settings)
    config = replace(config, jwt_secret=settings["JWT_SECRET"], mgmt_token=settings["MGMT_TOKEN"],
                     agent_api_keys=split_keys(settings["AGENT_API_KEYS"]),
                     client_api_keys=split_keys(settings["CLIENT_API_KEYS"]), generated=generated)
    if from_database:  # where they are, or (at the first start) what they are
        print_first_start(config)
    warn_short_secrets(config)
    log.info("OffloadMQ %s on http://%s:%d (store %s, advertised as %s)", __version__, config.host,
             config.port, describe_store(config.store), config.advertise_url)
    await serve(create_app(config, Hub(config, store=store)), config)


def main_postgres(config: Config) -> None:
    try:
        asyncio.run(serve_postgres(config))
    except StoreUnusable as err:
        log.critical("cannot start: %s", err)
        sys.exit(2)
    except OSError as err:  # binding the address: in use, or not this machine's
        log.critical("cannot start: %s", unusable_address(config, err))
        sys.exit(2)


# ============================================================================ client
#
# `offloadmq.Client` (blocking) and `offloadmq.AsyncClient` (asyncio): the Python client
# of /api/*. Requests go over the agent's lean keep-alive HTTP/1.1 client (`ServerHttp`
# in offload_agent.py, imported on first use: the server never needs that file, and the
# HTTP code exists once). Results of many tasks come through ONE event stream (the
# "watch"), opened the first time they are awaited together (`as_completed`, `map`)
# and kept, resumed with Last-Event-ID after a connection loss; a lone `result()` with
# no watch open long-polls instead (`poll?wait=`), one request per minute of waiting.
#
# A task is "covered" by the watch when its submit was sent while the watch was live
# and no resume has lost events since: its end event cannot be missed. Any other task
# (submitted before the watch opened, or waited for across a resume the server could
# not replay: its stream then starts `: connected`, not `: resumed`) is polled once
# after the watch is live again, 8 polls at a time, so no result is lost either way.

CLIENT_RETRY_S = 30.0      # how long connection errors are retried before raising
CLIENT_REQUEST_S = 30.0    # one request, the held long poll excepted
CLIENT_TRANSFER_S = 3600.0  # a bucket file's whole transfer (a stall ends it sooner: 120 s)
# A result waited for by polling is held this long per poll, and a poll not answered
# CLIENT_POLL_LATE_S after that is taken for a server gone (frozen, cut off): it moves on.
CLIENT_POLL_WAIT_S = 10
CLIENT_POLL_LATE_S = 5.0
CLIENT_STREAM_HEAD_S = 10.0  # an event stream's connect and answer head (the server sends it at once)
CLIENT_STREAM_SILENCE_S = 3 * SSE_HEARTBEAT_S  # an event stream saying nothing this long: its server is gone
ORPHANS_KEPT = 10_000      # end events of tasks whose submit answer is still on its way
CATCH_UP_POLLS = 8         # polls in flight when asking about tasks that may have ended unseen


class Unreachable(OffloadError):
    """The server could not be reached (or kept failing) for the client's retry time."""
    status, type = 0, "unreachable"


class DamagedFile(OffloadError):
    """A downloaded bucket file does not match the SHA-256 recorded at its upload."""
    status, type = 0, "damaged_file"


class TaskFailed(OffloadError):
    """`result()` of a task that ended `failed` or `canceled`: `task` is its final form,
    with `output` (what the agent sent back) and `log`."""
    status, type = 0, "task_failed"

    def __init__(self, task: dict):
        self.task = task
        self.output = task.get("result", task.get("output"))
        self.log = task.get("log") or ""
        ident = task.get("id") or {}
        super().__init__(f"task {ident.get('cap')}/{ident.get('id')} {task.get('status')}: "
                         f"{self.output!r:.300}")


class TaskCanceled(TaskFailed):
    """`result()` of a task that ended `canceled`."""


def server_error(status: int, raw: bytes) -> OffloadError:
    """The OffloadError subclass of the server's error type (its message, status and
    extra fields); an answer without the contract's body becomes a plain OffloadError."""
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        err = OffloadError(f"HTTP {status}: {raw[:300].decode(errors='replace')}")
    else:
        kinds = {cls.type: cls for cls in _error_classes(OffloadError) if cls.status}
        cls = kinds.get(error.get("type"), OffloadError)
        err = cls(str(error.get("message", "")), **{k: v for k, v in body.items() if k != "error"})
        err.type = str(error.get("type", cls.type))
    err.status = status
    return err


def _error_classes(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_error_classes(sub)]
    return found


def _camel(name: str) -> str:
    if name in ("file_bucket", "output_bucket"):  # the wire spells these in snake_case
        return name
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _task_path(cap: str, task_id: str) -> str:
    return f"{quote(cap, safe='')}/{quote(task_id, safe='')}"


def _final_output(task: dict) -> Any:
    """The output of an ended task, from an `end` event (`result`) or a poll (`output`)."""
    if task.get("status") == COMPLETED:
        return task.get("result", task.get("output"))
    raise (TaskCanceled if task.get("status") == CANCELED else TaskFailed)(task)


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One event of `/api/task/events`: `kind` is status, log, end (or agent, reset)."""
    id: str | None
    kind: str
    data: Any


def parse_events(buffer: bytes) -> tuple[list[TaskEvent | str], bytes]:
    """Complete events (and comments, as str) in `buffer`, and the incomplete rest."""
    *blocks, rest = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
    out: list[TaskEvent | str] = []
    for block in blocks:
        fields: dict[str, str] = {}
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                out.append(line[1:].strip().decode(errors="replace"))
                continue
            name, _, value = line.decode(errors="replace").partition(":")
            fields[name] = fields[name] + "\n" + value.removeprefix(" ") \
                if name == "data" and "data" in fields else value.removeprefix(" ")
        if "data" in fields:
            out.append(TaskEvent(fields.get("id"), fields.get("event", "message"),
                                 orjson.loads(fields["data"])))
    return out, rest


class AsyncTaskHandle:
    """A submitted task: `await result()`, `await status()`, `await cancel()`,
    `async for piece in logs()`."""

    def __init__(self, client: AsyncClient, cap: str, task_id: str, answer: dict | None = None,
                 covered_by: int = -1):
        self.client = client
        self.cap, self.id = cap, task_id
        self.answer = answer or {}          # the submit's answer
        self.final: dict | None = None      # the ended task, once seen
        self.covered_by = covered_by        # the watch generation its events are sure in

    @property
    def task_id(self) -> dict:
        return {"cap": self.cap, "id": self.id}

    def __repr__(self) -> str:
        return f"<task {self.cap}/{self.id}{' ' + self.final['status'] if self.final else ''}>"

    async def status(self) -> dict:
        """The task's TaskStatus now: {"id", "status", "stage"?, "output"?, "log", "createdAt"}."""
        return await self.client._poll(self, 0)

    async def cancel(self) -> dict:
        """Cancel it (a running task is asked to stop); its TaskStatus. Conflict if it ended."""
        return await self.client._call("POST", f"/api/task/cancel/{_task_path(self.cap, self.id)}")

    async def result(self, timeout: float | None = None) -> Any:
        """The output once it completed; raises TaskFailed/TaskCanceled when it did not,
        WaitTimeout after `timeout` seconds (the task goes on)."""
        if self.final is None:
            if self.client._watch is not None:
                async for _ in self.client.as_completed([self], timeout):
                    pass
            else:
                await self.client._wait_by_polling(self, timeout)
        return _final_output(self.final)

    async def logs(self) -> Any:
        """The log so far, then each new piece as the agent reports it, until the task
        ends. Each event of the task on its stream brings a poll, whose log (append-only)
        says exactly what is new: deltas alone could repeat a piece reported in the
        instant the stream opened. (Past the server's 1 MiB log window the head is gone
        from the polled log, and pieces stop; `status()["log"]` has the rest.)"""
        async with self.client.events(tasks=[self]) as stream:
            sent = 0
            while True:
                status = await self.status()
                log = status.get("log") or ""
                if len(log) > sent:
                    yield log[sent:]
                    sent = len(log)
                if status["status"] in ENDED:
                    return
                async for event in stream:  # until something happens to the task
                    if event.kind == "gap" or (isinstance(event.data, dict)
                                               and event.data.get("id") == self.task_id
                                               and not (event.kind == "status"
                                                        and event.data.get("op") == "current")):
                        break


class AsyncEventStream:
    """`/api/task/events` as TaskEvents, resumed with Last-Event-ID after a connection
    loss. `async with` returns once the stream is live (later events cannot be missed).
    A resume the server could not replay exactly (it restarted, or the events left its
    ring: its stream starts `: connected`, not `: resumed`) is followed by a `gap` event,
    so whoever waits for tasks asks the server once about them."""

    def __init__(self, client: AsyncClient, tasks: list | None = None,
                 last_event_id: str | None = None, current: bool = True):
        self.client = client
        query = [f"task={quote(t.cap + '/' + t.id if isinstance(t, AsyncTaskHandle) else t['cap'] + '/' + t['id'], safe='')}"
                 for t in tasks or []]
        if not current:
            query.append("current=0")
        self.path = "/api/task/events" + ("?" + "&".join(query) if query else "")
        self.last_id = last_event_id
        self.stream: Any = None
        self.pending: deque = deque()  # parsed, not yet handed out
        self.buffer = b""
        self.closed = False

    async def __aenter__(self) -> AsyncEventStream:
        await self.open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    async def open(self) -> None:
        """Connect (retrying for the client's retry time) and wait until live: the first
        bytes of the stream come once the server has taken its starting point."""
        # Reconnecting before any event came (no id to resume from) can miss events too.
        resuming = self.last_id is not None or self.stream is not None

        async def connect() -> Any:
            headers = dict(self.client.headers)
            if self.last_id:
                headers["Last-Event-ID"] = self.last_id
            stream = await self.client.http.open_stream(self.path, headers, CLIENT_STREAM_HEAD_S)
            if stream.status >= 400:
                raw = await stream.read_all()
                stream.close()
                raise server_error(stream.status, raw)
            self.stream, self.buffer = stream, b""
            if not await self._fill():
                stream.close()
                raise ConnectionResetError("the event stream ended before it began")
        await self.client._retrying(connect)
        if resuming and self.pending[0] != "resumed":  # else the server replayed what we missed
            self.pending.appendleft(TaskEvent(None, "gap", None))

    async def _fill(self) -> bool:
        """Read until at least one item is parsed; False when the connection ended."""
        while not self.pending:
            try:
                piece = await asyncio.wait_for(self.stream.read(), CLIENT_STREAM_SILENCE_S)
            except TimeoutError:  # a live server writes at least a heartbeat: it is gone
                self.client.http.move_from(self.stream.endpoint)  # ends its other exchanges too
                piece = b""
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError):
                piece = b""
            if not piece:
                return False
            items, self.buffer = parse_events(self.buffer + piece)
            self.pending.extend(items)
        return True

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> TaskEvent:
        while True:
            if self.closed:
                raise StopAsyncIteration
            if not self.pending and not await self._fill():
                self.stream.close()
                await asyncio.sleep(0.05)
                await self.open()
                continue
            item = self.pending.popleft()
            if isinstance(item, str):  # a comment (connected, heartbeat)
                continue
            if item.id:
                self.last_id = item.id
            return item

    def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.close()


class _Watch:
    """The client's one event stream for collecting results (see the section comment)."""

    def __init__(self, client: AsyncClient):
        self.client = client
        self.events = AsyncEventStream(client, current=False)  # only what happens from now
        self.generation = 0       # renewed whenever events may have been missed
        self.handles: weakref.WeakValueDictionary[str, AsyncTaskHandle] = weakref.WeakValueDictionary()
        self.orphans: OrderedDict[str, dict] = OrderedDict()  # ends of tasks not yet known
        self.listeners: dict[str, asyncio.Queue] = {}
        self.error: BaseException | None = None
        self.reader: asyncio.Task | None = None

    async def start(self) -> None:
        await self.events.open()
        self.generation = next(self.client._generations)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.events:
                if event.kind == "end":
                    self._ended(event.data)
                elif event.kind == "gap":
                    self.generation = next(self.client._generations)
                    for queue in set(self.listeners.values()):
                        queue.put_nowait(None)  # None: poll the tasks you wait for
        except BaseException as err:  # the key was revoked, the server gone for good
            self.error = err if isinstance(err, Exception) else Unreachable("client closed")
            for queue in set(self.listeners.values()):
                queue.put_nowait(None)
            if not isinstance(err, Exception):
                raise

    def _ended(self, task: dict) -> None:
        task_id = (task.get("id") or {}).get("id")
        handle = self.handles.get(task_id)
        if handle is None:
            self.orphans[task_id] = task
            if len(self.orphans) > ORPHANS_KEPT:
                self.orphans.popitem(last=False)
            return
        handle.final = task
        queue = self.listeners.pop(task_id, None)
        if queue is not None:
            queue.put_nowait(handle)

    def adopt(self, handle: AsyncTaskHandle) -> None:
        self.handles[handle.id] = handle
        task = self.orphans.pop(handle.id, None)
        if task is not None and handle.final is None:
            handle.final = task

    async def close(self) -> None:
        self.events.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


class AsyncClient:
    """An asyncio client of an OffloadMQ server, over one keep-alive connection (more
    only while requests run concurrently) plus, once results are collected together,
    one event stream.

        async with AsyncClient() as mq:   # OFFLOADMQ_URL, OFFLOADMQ_API_KEY
            handle = await mq.submit("shell.bash", {"command": "make"})
            print(await handle.result())

    Errors are the server's (`BadRequest`, `Unauthenticated`, `Forbidden`, `NotFound`,
    `Conflict`, `TooManyRequests`, `SchedulingImpossible`, `WaitTimeout`, ...: subclasses
    of `OffloadError` with the server's `message` and `status`); `Unreachable` after
    connection errors outlast `retry_s`; `TaskFailed` from `result()`.

    `url` may name several servers sharing one PostgreSQL database, comma-separated
    (`http://a:3069,http://b:3069`, as OFFLOADMQ_URL may): requests follow the leader
    (the agent's ServerHttp moves on from a server that is down or a standby), and what
    broke on the way is retried as after any connection error.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 retry_s: float = CLIENT_RETRY_S, request_s: float = CLIENT_REQUEST_S):
        if url is None or api_key is None:
            config = load_client_config()
            url, api_key = url or config.url, api_key if api_key is not None else config.api_key
        try:
            from offload_agent import ServerHttp  # the agent's HTTP/1.1 client; see above
        except ImportError as err:
            raise ImportError("the OffloadMQ client needs offload_agent.py beside offloadmq.py "
                              "(pip install offloadmq installs both)") from err
        self.url = url.rstrip("/")  # one server URL, or several comma-separated: see ServerHttp
        self.http = ServerHttp(self.url, user_agent=f"offloadmq-client/{__version__}")
        self.headers = {"X-API-Key": api_key}
        self.retry_s, self.request_s = retry_s, request_s
        self._watch: _Watch | None = None
        self._generations = itertools.count(1)
        self._files: Any = None  # an aiohttp session, made for the first bucket file

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._watch is not None:
            await self._watch.close()
            self._watch = None
        if self._files is not None:
            await self._files.close()
        await self.http.close()

    # -- requests ---------------------------------------------------------------

    async def _retrying(self, attempt: Callable) -> Any:
        """`attempt()` again after connection errors (doubling pauses) for `retry_s`."""
        deadline, pause = time.monotonic() + self.retry_s, 0.05
        while True:
            try:
                return await attempt()
            except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError) as err:
                if time.monotonic() + pause > deadline:
                    raise Unreachable(f"{self.url}: {type(err).__name__}: {err}") from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _call(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                    timeout_s: float | None = None, retry: bool = True) -> Any:
        """One request, retried after connection errors when `retry` (safe for every call
        but submit_blocking: a submit carries its Idempotency-Key); an error answer raises."""
        data = None if body is None else orjson.dumps(body)
        all_headers = {**self.headers, **headers} if headers else self.headers

        async def attempt() -> tuple[int, bytes]:
            return await self.http.request(method, path, data, all_headers, timeout_s or self.request_s)
        try:
            status, raw = await (self._retrying(attempt) if retry else attempt())
        except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError) as err:
            raise Unreachable(f"{self.url}: {type(err).__name__}: {err}") from None
        if status >= 400:
            raise server_error(status, raw)
        return orjson.loads(raw) if raw else None

    async def _poll(self, handle: AsyncTaskHandle, wait_s: float) -> dict:
        path = f"/api/task/poll/{_task_path(handle.cap, handle.id)}"
        if wait_s:
            path += f"?wait={wait_s:g}"
        status = await self._call("GET", path, timeout_s=wait_s + CLIENT_POLL_LATE_S)
        if status.get("status") in ENDED:
            handle.final = status
        return status

    async def _wait_by_polling(self, handle: AsyncTaskHandle, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while handle.final is None:
            left = CLIENT_POLL_WAIT_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"task {handle.cap}/{handle.id} has not ended after {timeout:g} s")
            await self._poll(handle, max(0.001, min(left, CLIENT_POLL_WAIT_S)))

    # -- the public verbs -------------------------------------------------------

    async def submit(self, capability: str, payload: Any = None, *, urgent: bool = False,
                     idempotency_key: str | None = None, **fields: Any) -> AsyncTaskHandle:
        """Queue a task; its handle. `fields` are the submission's lifecycle fields, in
        snake_case or camelCase (`restartable`, `max_retries`, `timeout_secs`, `priority`,
        `delay_secs`, `run_at`, `fetch_files`, ...). A retry after a connection error
        sends the same Idempotency-Key (one is made unless given): never two tasks."""
        body = {"capability": capability, "payload": payload,
                **{_camel(k): v for k, v in fields.items()}}
        if urgent:
            body["urgent"] = True
        watch = self._watch
        covered_by = watch.generation if watch is not None and watch.error is None else -1
        answer = await self._call("POST", "/api/task/submit", body,
                                  {"Idempotency-Key": idempotency_key or secrets.token_hex(16)})
        handle = AsyncTaskHandle(self, answer["id"]["cap"], answer["id"]["id"], answer, covered_by)
        if watch is not None:
            watch.adopt(handle)
        return handle

    async def submit_blocking(self, capability: str, payload: Any = None, **fields: Any) -> Any:
        """An urgent task, held until it ends: its output. SchedulingImpossible when no
        agent serves it, TaskFailed when it fails, WaitTimeout past the server's hold."""
        body = {"capability": capability, "payload": payload, "urgent": True,
                **{_camel(k): v for k, v in fields.items()}}
        # Not retried: the route takes no Idempotency-Key, a resend could run it twice.
        return _final_output(await self._call("POST", "/api/task/submit_blocking", body,
                                              timeout_s=self.request_s + 600, retry=False))

    def task(self, capability: str, task_id: str) -> AsyncTaskHandle:
        """A handle of a task submitted earlier (by id)."""
        return AsyncTaskHandle(self, capability, task_id)

    async def _watching(self) -> _Watch:
        if self._watch is None or self._watch.error is not None:
            watch = _Watch(self)
            await watch.start()
            self._watch = watch
        return self._watch

    async def as_completed(self, handles: Any, timeout: float | None = None) -> Any:
        """The handles as their tasks end (any order), collected through the client's one
        event stream; WaitTimeout after `timeout` seconds."""
        watch = await self._watching()
        deadline = None if timeout is None else time.monotonic() + timeout
        queue: asyncio.Queue = asyncio.Queue()
        waiting: dict[str, AsyncTaskHandle] = {}
        for handle in handles:
            watch.adopt(handle)
            waiting[handle.id] = handle
            if handle.final is not None:
                queue.put_nowait(handle)
            else:
                watch.listeners[handle.id] = queue
        unsure = [h for h in waiting.values() if h.final is None and h.covered_by != watch.generation]
        try:
            while waiting:
                if unsure:  # they might have ended unseen: ask once each, now the watch is live
                    await self._catch_up(unsure, waiting, queue, watch)
                unsure = []
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    item = queue.get_nowait() if not queue.empty() else \
                        await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    raise WaitTimeout(f"{len(waiting)} tasks have not ended after {timeout:g} s") from None
                if item is None:  # the stream lost events (or failed): ask the server
                    if watch.error is not None:
                        raise watch.error
                    unsure = list(waiting.values())
                elif waiting.pop(item.id, None) is not None:
                    yield item
        finally:
            for task_id in waiting:
                watch.listeners.pop(task_id, None)

    async def _catch_up(self, handles: list[AsyncTaskHandle], waiting: dict, queue: asyncio.Queue,
                        watch: _Watch) -> None:
        """Poll each of `handles` still waited for once, CATCH_UP_POLLS at a time (after a
        resume that can be every task waited for: one at a time, a round trip each)."""
        gate = asyncio.Semaphore(CATCH_UP_POLLS)

        async def ask(handle: AsyncTaskHandle) -> None:
            if handle.id in waiting and handle.final is None:
                async with gate:
                    await self._poll(handle, 0)
            if handle.final is not None:
                watch.listeners.pop(handle.id, None)
                queue.put_nowait(handle)
            handle.covered_by = watch.generation
        await asyncio.gather(*(ask(h) for h in handles))

    async def map(self, capability: str, payloads: Any, *, in_flight: int = 1,
                  **fields: Any) -> Any:
        """Submit one task per payload (`in_flight` submits at a time), then their
        outputs in the payloads' order; a failed task raises TaskFailed there."""
        await self._watching()
        payloads = list(payloads)
        if in_flight <= 1:
            handles = [await self.submit(capability, p, **fields) for p in payloads]
        else:
            gate = asyncio.Semaphore(in_flight)

            async def one(payload: Any) -> AsyncTaskHandle:
                async with gate:
                    return await self.submit(capability, payload, **fields)
            handles = await asyncio.gather(*(one(p) for p in payloads))
        done = 0
        async for _ in self.as_completed(handles):
            while done < len(handles) and handles[done].final is not None:
                yield _final_output(handles[done].final)
                done += 1

    def events(self, tasks: list | None = None, last_event_id: str | None = None,
               current: bool = True) -> AsyncEventStream:
        """The raw event stream (`async with client.events() as stream: async for ev in
        stream`) of this key's tasks, or only `tasks`; it starts with their current
        state (`status` events, op `current`) unless `current=False`. Resumed after a
        connection loss, then a `gap` event: events may be missing from there."""
        return AsyncEventStream(self, tasks, last_event_id, current)

    async def capabilities(self) -> list[str]:
        """The capabilities online agents serve (that this key may use)."""
        return await self._call("GET", "/api/capabilities/online")

    # -- file buckets -----------------------------------------------------------

    async def create_bucket(self, rm_after_task: bool = False) -> str:
        """A new bucket of this key, for `file_bucket=[uid]` / `output_bucket=uid`: its uid.
        `rm_after_task`: removed once every task naming it has ended."""
        answer = await self._call("POST", "/api/storage/bucket/create", {"rm_after_task": rm_after_task})
        return answer["bucket_uid"]

    async def buckets(self) -> list[dict]:
        """This key's buckets (`bucket_uid`, `file_count`, `used_bytes`, `expires_at`, ...)."""
        return (await self._call("GET", "/api/storage/buckets"))["buckets"]

    async def bucket(self, bucket_uid: str) -> dict:
        """A bucket's `files` (`file_uid`, `original_name`, `size_bytes`, `sha256`, ...) and room."""
        return await self._call("GET", f"/api/storage/bucket/{quote(bucket_uid, safe='')}/stat")

    async def upload(self, bucket_uid: str, path: str | os.PathLike, name: str | None = None) -> dict:
        """Store the file at `path` in a bucket as `name` (its own name by default), streamed
        from the disk, never held in memory: the server's answer (`file_uid`, `size`,
        `sha256`). Not retried once sent: a resend would meet its own name (409)."""
        import aiohttp
        source = Path(path)
        opened: list = []

        def body() -> Any:
            form = aiohttp.FormData(quote_fields=False)
            opened.append(source.open("rb"))
            form.add_field("file", opened[-1], filename=name or source.name,
                           content_type="application/octet-stream")
            return form

        async def use(resp: Any) -> dict:
            return await resp.json(content_type=None)
        try:
            return await self._transfer("POST", f"/api/storage/bucket/{quote(bucket_uid, safe='')}/upload",
                                        use, body)
        finally:
            for file in opened:
                file.close()

    async def download(self, bucket_uid: str, file_uid: str, dest: str | os.PathLike) -> Path:
        """Stream a bucket's file into `dest` (written beside it, checked against the SHA-256
        the server recorded at upload, then renamed into place): `dest`."""
        target = Path(dest)
        part = target.with_name(f".{target.name}.part")

        async def use(resp: Any) -> None:
            digest = hashlib.sha256()
            with part.open("wb") as out:
                async for chunk in resp.content.iter_chunked(1 << 16):
                    digest.update(chunk)
                    out.write(chunk)
            expected = resp.headers.get("X-Content-SHA256")
            if expected and digest.hexdigest() != expected:
                raise DamagedFile(f"file {file_uid} arrived damaged: SHA-256 {digest.hexdigest()}, "
                                  f"the server recorded {expected}")
        try:
            await self._transfer("GET", f"/api/storage/bucket/{quote(bucket_uid, safe='')}/file/"
                                        f"{quote(file_uid, safe='')}", use)
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)
        return target

    async def delete_file(self, bucket_uid: str, file_uid: str) -> None:
        await self._call("DELETE", f"/api/storage/bucket/{quote(bucket_uid, safe='')}/file/"
                                   f"{quote(file_uid, safe='')}")

    async def delete_bucket(self, bucket_uid: str) -> None:
        await self._call("DELETE", f"/api/storage/bucket/{quote(bucket_uid, safe='')}")

    async def _transfer(self, method: str, path: str, use: Callable[[Any], Awaitable[Any]],
                        body: Callable[[], Any] | None = None) -> Any:
        """One streamed exchange with the leader (bucket files: the lean client holds a
        whole body); `use` takes a 2xx answer, `body()` makes the body afresh per server."""
        import aiohttp
        from offload_agent import _Unsent, not_leader
        if self._files is None:
            self._files = aiohttp.ClientSession()

        async def attempt(endpoint: Any) -> Any:
            try:
                async with self._files.request(
                        method, endpoint.url + path, headers=self.headers,
                        data=None if body is None else body(),
                        timeout=aiohttp.ClientTimeout(sock_connect=CLIENT_REQUEST_S, sock_read=120)) as resp:
                    if resp.status >= 400:
                        raw = await resp.content.read(1 << 16)
                        if (standby := not_leader(resp.status, raw)) is not None:
                            raise standby
                        raise server_error(resp.status, raw)
                    return await use(resp)
            except aiohttp.ClientConnectorError as err:
                raise _Unsent(err) from None
            except aiohttp.ClientError as err:
                raise ConnectionError(f"{type(err).__name__}: {err}") from None
        try:
            return await self.http.on_leader(attempt, CLIENT_TRANSFER_S)
        except (OSError, EOFError, TimeoutError) as err:
            raise Unreachable(f"{self.url}: {method} {path}: {type(err).__name__}: {err}") from None


class TaskHandle:
    """A submitted task, blocking: `result()`, `status()`, `cancel()`, `logs()`."""

    def __init__(self, client: Client, handle: AsyncTaskHandle):
        self.client, self.handle = client, handle

    cap = property(lambda self: self.handle.cap)
    id = property(lambda self: self.handle.id)
    task_id = property(lambda self: self.handle.task_id)
    answer = property(lambda self: self.handle.answer)
    final = property(lambda self: self.handle.final, doc="the ended task, once seen")

    def __repr__(self) -> str:
        return repr(self.handle)

    def result(self, timeout: float | None = None) -> Any:
        """The output once it completed; TaskFailed/TaskCanceled, or WaitTimeout."""
        return self.client._run(self.handle.result(timeout))

    def status(self) -> dict:
        return self.client._run(self.handle.status())

    def cancel(self) -> dict:
        return self.client._run(self.handle.cancel())

    def logs(self) -> Any:
        """The log so far, then each new piece, until the task ends (a generator)."""
        return self.client._iterate(self.handle.logs())


class EventStream:
    """Blocking `/api/task/events`: `with client.events() as stream: for ev in stream`."""

    def __init__(self, client: Client, stream: AsyncEventStream):
        self.client, self.stream = client, stream

    def __enter__(self) -> EventStream:
        self.client._run(self.stream.open())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> TaskEvent:
        try:
            return self.client._run(self.stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self.client._loop.call_soon_threadsafe(self.stream.close)


class Client:
    """A blocking client of an OffloadMQ server (scripts, CI, notebooks, threads): the
    AsyncClient run on a private event loop thread, so it works inside a running loop
    too. One keep-alive connection for sequential calls.

        from offloadmq import Client
        mq = Client()                     # OFFLOADMQ_URL, OFFLOADMQ_API_KEY
        task = mq.submit("shell.bash", {"command": "uname -a"})
        print(task.result(timeout=60))
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 retry_s: float = CLIENT_RETRY_S, request_s: float = CLIENT_REQUEST_S):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="offloadmq-client",
                                        daemon=True)
        self._thread.start()
        self._async = self._run(self._make(url, api_key, retry_s, request_s))

    @staticmethod
    async def _make(*args: Any) -> AsyncClient:
        url, api_key, retry_s, request_s = args
        return AsyncClient(url, api_key, retry_s=retry_s, request_s=request_s)

    def _run(self, coro: Any) -> Any:
        if not self._thread.is_alive():
            coro.close()
            raise RuntimeError("this Client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: Any) -> Any:
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if self._thread.is_alive():
                self._run(agen.aclose())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    @property
    def url(self) -> str:
        return self._async.url

    def submit(self, capability: str, payload: Any = None, *, urgent: bool = False,
               idempotency_key: str | None = None, **fields: Any) -> TaskHandle:
        """Queue a task; its handle (see AsyncClient.submit for the fields)."""
        return TaskHandle(self, self._run(self._async.submit(
            capability, payload, urgent=urgent, idempotency_key=idempotency_key, **fields)))

    def submit_blocking(self, capability: str, payload: Any = None, **fields: Any) -> Any:
        """An urgent task, held until it ends: its output (TaskFailed if it failed)."""
        return self._run(self._async.submit_blocking(capability, payload, **fields))

    def task(self, capability: str, task_id: str) -> TaskHandle:
        """A handle of a task submitted earlier (by id)."""
        return TaskHandle(self, self._async.task(capability, task_id))

    def as_completed(self, handles: Any, timeout: float | None = None) -> Any:
        """The handles as their tasks end, through one event stream (a generator)."""
        by_inner = {h.handle: h for h in handles}
        for inner in self._iterate(self._async.as_completed(list(by_inner), timeout)):
            yield by_inner[inner]

    def map(self, capability: str, payloads: Any, *, in_flight: int = 1, **fields: Any) -> Any:
        """One task per payload; their outputs in order (a generator)."""
        return self._iterate(self._async.map(capability, payloads, in_flight=in_flight, **fields))

    def events(self, tasks: list | None = None, last_event_id: str | None = None,
               current: bool = True) -> EventStream:
        """The raw event stream; see AsyncClient.events."""
        inner = [t.handle if isinstance(t, TaskHandle) else t for t in tasks or []]
        return EventStream(self, self._async.events(inner, last_event_id, current))

    def capabilities(self) -> list[str]:
        return self._run(self._async.capabilities())

    # File buckets: see AsyncClient.
    def create_bucket(self, rm_after_task: bool = False) -> str:
        return self._run(self._async.create_bucket(rm_after_task))

    def buckets(self) -> list[dict]:
        return self._run(self._async.buckets())

    def bucket(self, bucket_uid: str) -> dict:
        return self._run(self._async.bucket(bucket_uid))

    def upload(self, bucket_uid: str, path: str | os.PathLike, name: str | None = None) -> dict:
        return self._run(self._async.upload(bucket_uid, path, name))

    def download(self, bucket_uid: str, file_uid: str, dest: str | os.PathLike) -> Path:
        return self._run(self._async.download(bucket_uid, file_uid, dest))

    def delete_file(self, bucket_uid: str, file_uid: str) -> None:
        self._run(self._async.delete_file(bucket_uid, file_uid))

    def delete_bucket(self, bucket_uid: str) -> None:
        self._run(self._async.delete_bucket(bucket_uid))


# ============================================================================ cli
#
# `python offloadmq.py submit|status|cancel ...`: the client above for CI runners. It
# prints the task as JSON on stdout and tells how the task ended by its exit status
# (below). While `--wait`ing it follows the key's event stream, copying the task's log
# lines to stderr as they arrive: the stream is live before the submit, so no early line
# is missed.

EXIT_COMPLETED, EXIT_NOT_COMPLETED, EXIT_USAGE, EXIT_HTTP, EXIT_TIMEOUT = 0, 1, 2, 3, 124
CLI_RETRY_S = 3.0  # a CI step should fail fast when the server is not there


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offloadmq", description="Submit and follow OffloadMQ tasks (OFFLOADMQ_URL, "
        "OFFLOADMQ_API_KEY). Without a command it starts the server: see --help of that.",
        epilog="Exit status: 0 the task completed (submit without --wait: accepted; cancel: "
        "cancel accepted), 1 it failed, was canceled or has not ended, 2 usage, 3 HTTP or "
        "connection error, 124 --timeout reached.")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", help="submit a task")
    submit.add_argument("capability")
    submit.add_argument("--payload", default="null", help="JSON, or @file holding JSON")
    submit.add_argument("--urgent", action="store_true", help="urgent queue (an agent must be online)")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the end, streaming the log to stderr")
    submit.add_argument("--timeout", type=float, metavar="S", help="give up waiting after S seconds")
    talking = [submit]  # the commands that talk to a server
    for name, text in (("status", "print a task's status"), ("cancel", "cancel a task")):
        command = commands.add_parser(name, help=text)
        command.add_argument("capability")
        command.add_argument("id")
        talking.append(command)
    for command in talking:
        command.add_argument("--server", metavar="URL[,URL...]",
                             help="the server, or several sharing one database (the leader is "
                                  "followed); default OFFLOADMQ_URL, else http://127.0.0.1:3069")
    keys = commands.add_parser("keys", help="print the secrets the server generated (read from "
                               "its data folder on this machine, or its PostgreSQL store)")
    keys.add_argument("--data", help="the server's data folder (DATABASE_ROOT_PATH; default ./data)")
    keys.add_argument("--store", help="the server's postgresql:// store (OFFLOADMQ_STORE), instead")
    return parser


SECRET_LABELS = (("AGENT_API_KEYS", "agent registration key"), ("CLIENT_API_KEYS", "client API key"),
                 ("MGMT_TOKEN", "management token"))


async def stored_secrets(url: str) -> dict:
    """The secrets kept in a PostgreSQL store ({} before a server has started on it)."""
    store = PostgresStore(url)
    try:
        await store.open()
        value = await store.conn.fetchval("SELECT value FROM offloadmq_meta WHERE name = 'secrets'")
    finally:
        await store.close()
    return orjson.loads(value) if value else {}


def cli_keys(data: str | None, store: str | None) -> int:
    """The generated secrets, from the data folder or the PostgreSQL store: whoever can
    read those has them already, so this shows nothing a network caller could not see."""
    store = store or os.environ.get("OFFLOADMQ_STORE")
    if store:
        try:
            stored, where = asyncio.run(stored_secrets(store)), describe_store(store)
        except StoreUnusable as err:
            print(f"offloadmq: {err}", file=sys.stderr)
            return EXIT_USAGE
    else:
        folder = Path(data or os.environ.get("DATABASE_ROOT_PATH") or "./data")
        where = folder / SECRETS_FILE
        try:
            stored = orjson.loads(where.read_bytes())
        except (OSError, orjson.JSONDecodeError) as err:
            print(f"offloadmq: cannot read {where}: {getattr(err, 'strerror', err)} "
                  "(give the server's --data folder with --data, or its --store)", file=sys.stderr)
            return EXIT_USAGE
    for name, label in SECRET_LABELS:
        if stored.get(name):
            print(f"{label:24} {stored[name]}")
    print(f"(from {where}; keys set in the environment or .env are not shown)")
    return EXIT_COMPLETED


def cli_payload(parser: argparse.ArgumentParser, text: str) -> Any:
    source = "--payload"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text()
        except OSError as err:
            parser.error(f"--payload: cannot read {source}: {err.strerror}")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as err:
        parser.error(f"{source} is not valid JSON: {err}")


def cli_print(data: Any) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


async def cli_follow(stream: AsyncEventStream, handle: AsyncTaskHandle) -> dict:
    """Copy the task's log to stderr until it ends; its final form. A resume that could
    not replay asks the server whether it ended meanwhile."""
    async for event in stream:
        if event.kind == "gap":
            status = await handle.status()
            if status["status"] in ENDED:
                return status
            continue
        if not isinstance(event.data, dict) or event.data.get("id") != handle.task_id:
            continue
        if event.kind == "log" and event.data.get("log"):
            sys.stderr.write(event.data["log"])
            sys.stderr.flush()
        elif event.kind == "end":
            return event.data
    raise Unreachable("the event stream ended")


async def cli_run(args: argparse.Namespace, payload: Any, config: ClientConfig) -> int:
    async with AsyncClient(config.url, config.api_key, retry_s=CLI_RETRY_S) as client:
        if args.command in ("status", "cancel"):
            handle = client.task(args.capability, args.id)
            if args.command == "cancel":
                cli_print(await handle.cancel())
                return EXIT_COMPLETED
            task = await handle.status()
            cli_print(task)
            return EXIT_COMPLETED if task.get("status") == COMPLETED else EXIT_NOT_COMPLETED
        if not args.wait:
            cli_print((await client.submit(args.capability, payload, urgent=args.urgent)).answer)
            return EXIT_COMPLETED
        async with client.events() as stream:
            handle = await client.submit(args.capability, payload, urgent=args.urgent)
            print(f"task {handle.cap}/{handle.id} {handle.answer['status']}", file=sys.stderr)
            try:
                task = await asyncio.wait_for(cli_follow(stream, handle), args.timeout)
            except TimeoutError:
                task = await handle.status()
                cli_print(task)
                print(f"offloadmq: task still {task.get('status')} after {args.timeout:g} s "
                      "(it goes on; cancel it with `offloadmq.py cancel`)", file=sys.stderr)
                return EXIT_TIMEOUT
        cli_print(task)
        return EXIT_COMPLETED if task.get("status") == COMPLETED else EXIT_NOT_COMPLETED


def cli_main(argv: list[str], config: ClientConfig | None = None) -> int:
    """Run one CLI command; answers the exit status."""
    parser = cli_parser()
    args = parser.parse_args(argv)
    if args.command == "keys":
        return cli_keys(args.data, args.store)
    payload = cli_payload(parser, args.payload) if args.command == "submit" else None
    if args.command == "submit" and args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be a positive number of seconds")
    config = config or load_client_config()
    if args.server:
        config = ClientConfig(url=args.server, api_key=config.api_key)
    try:
        from offload_agent import ServerHttp
        ServerHttp(config.url)  # checks the URLs; opens nothing
    except ValueError as err:
        print(f"offloadmq: {err} (--server or OFFLOADMQ_URL)", file=sys.stderr)
        return EXIT_USAGE
    if not config.api_key:
        print("offloadmq: OFFLOADMQ_API_KEY is not set: export a client API key "
              "(CLIENT_API_KEYS of the server)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(cli_run(args, payload, config))
    except Unreachable as err:
        print(f"offloadmq: cannot reach the server: {err}", file=sys.stderr)
        return EXIT_HTTP
    except OffloadError as err:
        print(f"offloadmq: HTTP {err.status} {err.type}: {err.message}", file=sys.stderr)
        return EXIT_HTTP
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    main()
