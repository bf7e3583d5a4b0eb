"""OffloadMQ agent: runs on a worker machine and serves tasks from an OffloadMQ server.

One file, aiohttp its only dependency. It speaks the wire contract of API.md: registers
with an agent key, logs in for a JWT, gets its tasks pushed over the agent WebSocket (or,
with `--transport http` or against a server without the socket, long-polls and takes
them), runs up to `capacity` at once, streams progress and reports each result. Our server's extensions
(take on poll, the next task with a result, cancel requests, `runtimeSecs`, the holding
report) are used when the server answers them; any other server gets the original
protocol (`serve --original-protocol` forces it).

    python offload_agent.py register --server http://HOST:3069 --key AGENT_KEY \\
        --caps debug.echo shell.bash [--tier 0] [--capacity 1]
        # --server http://A:3069,http://B:3069: servers on one database, the leader followed
    python offload_agent.py serve            # until SIGINT/SIGTERM
    python offload_agent.py rotate-key       # a fresh login secret from the server
    python offload_agent.py sysinfo          # what it reports about this machine

The identity (agent id and its login secret) is kept in `.offload-agent.json` in the
working directory (`--config PATH` moves it), written with mode 0600 and synced.

Nothing the server or a task sends is trusted: task ids must be ULIDs, files are opened
inside the task folder without following links, fetches reach only public addresses
unless `--allow-fetch` lists more, tasks get an allowlisted environment and (with
`--task-user`, agent as root) another account; the README's threat model says what each
option leaves reachable.

Sections (`grep '^# ===' offload_agent.py`):
  1. imports, version, logger
  2. config        — the saved identity, runtime settings, system info
  3. server client — keep-alive HTTP/1.1 that follows the leader among several server
                     URLs (ServerHttp.on_leader), the agent WebSocket (PushChannel),
                     re-auth on 401 (re-registration), backoff to 30 s
  4. executors     — confinement (ids, environment, reaper), the executor table, files
                     through descriptors, guarded fetches, artifacts
  5. serve loop    — pushed tasks (or long poll and take), run up to `capacity` tasks,
                     heartbeat with the holding report, graceful stop
  6. CLI           — register, serve, rotate-key, sysinfo; `main()`
"""

# ============================================================================ imports, version, logger
from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import collections
import contextlib
import dataclasses
import errno
import hashlib
import ipaddress
import json
import logging
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
import aiohttp.abc

__version__ = "0.1.0"

log = logging.getLogger("offload_agent")

# ============================================================================ config

DEFAULT_CONFIG_PATH = ".offload-agent.json"
DEFAULT_CAPABILITIES = ["debug.echo"]
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"

POLL_WAIT_S = 20                  # long-poll hold asked of the server
REQUEST_TIMEOUT_S = 30.0          # any other call to the server
# A server that stops answering (frozen, cut off) while its connections stay open: a ping
# (the heartbeat) gets PING_TIMEOUT_S, the socket's WebSocket pings (after WS_PING_S with
# nothing received) WS_PING_S / 2; then the agent moves to the next URL.
PING_TIMEOUT_S = 5.0
WS_PING_S = 5.0
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
BUCKET_TRANSFER_S = 3600.0        # a bucket file's whole transfer (stalls end sooner: 120 s read timeout)
STANDBY_RETRY_S = 0.5             # every server URL answered "not the leader": ask again this soon
PROGRESS_INTERVAL_S = 0.5         # log updates are batched at most this often
RUNNING_AFTER_S = 0.5             # a task running this long is reported running, watched for cancels
HEARTBEAT_S = 8.0                 # declared to the server; the holding report goes out this often
GRACE_S = 30.0                    # SIGTERM: how long running tasks may still finish
FINAL_REPORT_S = 10.0             # after the grace: time left to deliver the last reports
ARTIFACT_MAX_BYTES = 10 * 1024 * 1024
OUTPUT_MAX_BYTES = 1024 * 1024    # captured stdout/stderr per stream; the tail is kept
LOG_BUFFER_MAX_CHARS = 1024 * 1024  # unsent log kept while the server is unreachable
FETCH_MAX_BYTES = 1024 * 1024 * 1024  # what one task's fetchFiles may bring in, all files together
FETCH_TIMEOUT_S = 600.0           # the fetch phase of one task, all files together
FETCH_MAX_REDIRECTS = 5
WS_UPLOAD_MAX_BYTES = 4 * 1024 * 1024  # larger output files go over HTTP, streamed
OUTPUT_FOLDER = "output"          # with an output_bucket, its files are uploaded after the task
LLM_MAX_CTX = 32768               # Ollama options a task may set are capped (see LLM_OPTIONS)
LLM_MAX_PREDICT = 8192
EXIT_CREDENTIAL_REVOKED = 3       # serve: the server no longer knows this agent's credential


@dataclass
class AgentIdentity:
    """What `register` saves and `serve` loads: who this agent is and what it serves."""

    server: str
    agent_id: str
    key: str
    capabilities: list[str]
    tier: int = 0
    capacity: int = 1

    def to_json(self) -> dict:
        return {"server": self.server, "agentId": self.agent_id, "key": self.key,
                "capabilities": self.capabilities, "tier": self.tier,
                "capacity": self.capacity}

    @classmethod
    def from_json(cls, raw: dict) -> AgentIdentity:
        return cls(server=raw["server"], agent_id=raw["agentId"], key=raw["key"],
                   capabilities=list(raw["capabilities"]), tier=int(raw.get("tier", 0)),
                   capacity=int(raw.get("capacity", 1)))


def save_identity(path: Path, identity: AgentIdentity) -> None:
    """Write the identity atomically with mode 0600: it holds the agent's login secret.
    Synced (file, then folder) before it counts: a crash must not leave an agent whose
    only copy of a fresh credential was lost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)  # a leftover could be a link planted to redirect the write
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # whatever the umask
        json.dump(identity.to_json(), out, indent=2)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_identity(path: Path) -> AgentIdentity:
    return AgentIdentity.from_json(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class TaskUser:
    """`--task-user`: the account tasks run as when the agent runs as root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def lookup(cls, name: str) -> TaskUser:
        import grp
        import pwd
        entry = pwd.getpwnam(name)  # KeyError when there is no such user
        groups = tuple(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)
        return cls(name, entry.pw_uid, entry.pw_gid, groups)


@dataclass(frozen=True)
class Settings:
    """Runtime knobs of `serve`; only the CLI section fills them from argv and the environment."""

    work_root: Path
    ollama_url: str = DEFAULT_OLLAMA_URL
    grace_s: float = GRACE_S
    poll_wait_s: int = POLL_WAIT_S
    artifact_max_bytes: int = ARTIFACT_MAX_BYTES
    progress_interval_s: float = PROGRESS_INTERVAL_S
    # A task done sooner sends no "running" stage (a round trip and a journal record that
    # tell nobody anything) and is not watched for cancel requests.
    running_after_s: float = RUNNING_AFTER_S
    # file:// clones let a task read any local repository the agent can, so they are opt-in.
    allow_local_git: bool = False
    # Our server's extensions (take on poll, next task on resolve, cancel requests); each
    # falls back to the original protocol on a server that does not know it.
    use_extensions: bool = True
    # What fetchFiles may reach beyond public addresses: host names, IPs, CIDRs.
    allow_fetch: tuple[str, ...] = ()
    fetch_max_bytes: int = FETCH_MAX_BYTES
    fetch_timeout_s: float = FETCH_TIMEOUT_S
    task_user: TaskUser | None = None
    heartbeat_s: float = HEARTBEAT_S
    # "ws": tasks pushed over the agent WebSocket (HTTP polling when the server has none);
    # "http": long polls.
    transport: str = "ws"
    llm_max_ctx: int = LLM_MAX_CTX
    llm_max_predict: int = LLM_MAX_PREDICT


def base_capability(capability: str) -> str:
    """`vision[gpu;cuda12]` is registered with attributes but served as `vision`."""
    return capability.split("[", 1)[0]


def _total_memory_mb() -> int:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        # macOS has no SC_PHYS_PAGES.
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True,
                             text=True, timeout=5).stdout
        return int(out.strip()) // (1024 * 1024)
    return 0


def _gpu_info() -> dict | None:
    if not shutil.which("nvidia-smi"):
        return None
    with contextlib.suppress(OSError, ValueError, IndexError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True).stdout
        name, vram = out.strip().splitlines()[0].rsplit(",", 1)
        return {"vendor": "NVIDIA", "model": name.strip(), "vramMb": int(float(vram))}
    return None


def system_info() -> dict:
    """The `systemInfo` of register and info/update, read from the OS (no psutil)."""
    return {
        "os": f"{platform.system()} {platform.release()}".strip(),
        "client": f"offload-agent/{__version__}",
        "runtime": f"{platform.python_implementation()} {platform.python_version()}",
        "cpuArch": platform.machine(),
        "totalMemoryMb": _total_memory_mb(),
        "gpu": _gpu_info(),
    }


# ============================================================================ server client

class ServerUnavailable(Exception):
    """The server could not be reached or failed (connection error, timeout, 5xx): retry later."""


class ServerRefused(Exception):
    """The server answered with a 4xx error body: retrying the same call will not help."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(f"{status} {type_}: {message}")
        self.status = status
        self.type = type_
        self.message = message


class Backoff:
    """Delays between failed attempts: doubling from `start_s` up to `cap_s`, reset on success."""

    def __init__(self, start_s: float = BACKOFF_START_S, cap_s: float = BACKOFF_CAP_S):
        self.start_s = start_s
        self.cap_s = cap_s
        self.delay_s = start_s

    def next_delay(self) -> float:
        delay = self.delay_s
        self.delay_s = min(self.delay_s * 2, self.cap_s)
        return delay

    def reset(self) -> None:
        self.delay_s = self.start_s


def task_path(task_id: dict) -> str:
    """`{cap}/{id}` for a URL; a capability may hold `/`, so it is percent-encoded."""
    return f"{quote(task_id['cap'], safe='')}/{quote(task_id['id'], safe='')}"


class NotLeader(ConnectionError):
    """A standby answered `503 not_leader` (WIRE.md): it did nothing with the request;
    `leader` is the URL it names as the leader's (or None)."""

    def __init__(self, message: str, leader: str | None = None):
        super().__init__(message)
        self.leader = leader


class _Unsent(Exception):
    """Connecting failed, so nothing reached that server: trying another URL is safe."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def not_leader(status: int, body: bytes) -> NotLeader | None:
    """The NotLeader of a standby's answer; None for any other answer."""
    if status != 503 or b"not_leader" not in body:
        return None
    with contextlib.suppress(ValueError):
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("type") == "not_leader":
            leader = error.get("leader")
            return NotLeader(str(error.get("message") or "not the leader"),
                             leader if isinstance(leader, str) else None)
    return None


def url_key(url: str) -> tuple:
    """What makes two spellings of a server URL the same server."""
    parts = urlsplit(url.strip())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")


class Endpoint:
    """One configured server URL, its idle keep-alive connections and those in use."""

    def __init__(self, url: str, user_agent: str):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the server URL must be http(s)://host[:port]: {url!r}")
        self.url = url.rstrip("/")
        self.key = url_key(url)
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.ssl else 80)
        self.prefix = parts.path.rstrip("/")
        self.fixed_headers = (f"Host: {parts.netloc.rpartition('@')[2]}\r\n"
                              f"User-Agent: {user_agent}\r\n")
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.busy: set[asyncio.StreamWriter] = set()  # an exchange is under way on each
        self.left = 0  # how many times requests moved away from this server

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_connection(self.host, self.port, ssl=self.ssl or None)
        except OSError as err:
            raise _Unsent(err) from err

    def close_idle(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()

    def leave(self) -> None:
        """Requests go elsewhere: the exchanges still open here end now (their callers
        see a broken exchange and resend where it is safe) rather than each waiting out
        its own timeout on a server found gone, a report held by a frozen leader for
        minutes. Closing a socket wakes its reader with an end of file."""
        self.left += 1
        self.close_idle()
        for writer in self.busy:
            writer.close()


class ServerHttp:
    """HTTP/1.1 with keep-alive to the server, on asyncio streams. The agent's calls are
    small JSON exchanges, and a capacity-1 agent running short tasks waits on each one:
    this sends a request in one write and reads the answer with no per-request objects,
    about half of aiohttp's round trip on loopback. Everything else the agent fetches
    (files, LLM servers) goes through aiohttp.

    It is given one server URL or several (`URL1,URL2`: servers on one PostgreSQL
    database, one leader and standbys) and is the one place that follows the leader
    (`on_leader`): a URL that cannot be connected to, or whose server answers
    `503 not_leader`, is left for the leader that answer names when it is one of the
    given URLs (credentials go to no other), else for the next URL. Requests that
    reached no server, or a standby, are sent again at once; what broke mid-exchange is
    raised, and the caller, who knows whether a resend is safe, retries it (to the next
    URL)."""

    def __init__(self, base_urls: str | list[str], user_agent: str = f"offload-agent/{__version__}"):
        urls = base_urls.split(",") if isinstance(base_urls, str) else list(base_urls)
        urls = [u.strip() for u in urls if u.strip()]
        if not urls:
            raise ValueError("no server URL given (http(s)://host[:port], comma-separated for several)")
        self.endpoints: list[Endpoint] = []
        for url in urls:
            endpoint = Endpoint(url, user_agent)
            if all(e.key != endpoint.key for e in self.endpoints):
                self.endpoints.append(endpoint)
        self.at = 0  # the endpoint in use: the last one that answered as a leader
        # After following a standby's word to a leader that then fails, the round goes on
        # after that standby (a stale word must not keep the other URLs from their turn).
        self.resume_at: int | None = None
        self.on_move: Callable[[], None] | None = None  # a server was left: its exchanges are cut

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self.at]

    @property
    def base_url(self) -> str:
        """The server URL requests go to now."""
        return self.endpoints[self.at].url

    @property
    def idle(self) -> list:
        return self.endpoints[self.at].idle

    def move_from(self, endpoint: Endpoint, leader: str | None = None) -> None:
        """Requests go elsewhere than `endpoint` from now: to `leader` when it is a
        configured URL, else to the next URL. Nothing moves when another request has
        moved already, so a burst of failures against one server moves once."""
        if self.endpoints[self.at] is not endpoint:
            return
        endpoint.leave()
        named = leader and next((e for e in self.endpoints if e.key == url_key(leader)), None)
        following = self.at + 1
        if named is not None and named is not endpoint:
            self.resume_at, self.at = following % len(self.endpoints), self.endpoints.index(named)
        else:
            if leader and named is None:
                log.warning("%s names %s as the leader, which is not a configured server URL: "
                            "not following it", endpoint.url, leader)
            resume_at, self.resume_at = self.resume_at, None
            self.at = resume_at if resume_at not in (None, self.at) else following % len(self.endpoints)
        if len(self.endpoints) > 1:
            log.info("server %s unavailable or not the leader; trying %s", endpoint.url, self.base_url)
        if self.on_move is not None:
            self.on_move()

    async def on_leader(self, attempt: Callable[[Endpoint], Awaitable[Any]], timeout_s: float) -> Any:
        """`attempt(endpoint)` on the server that leads, within `timeout_s`. An attempt
        raises _Unsent when it could not connect and NotLeader for a standby's answer:
        both go on to another URL at once; once every URL has been tried, the connection
        error is raised when no server answered, else (standbys only: a failover is
        under way) it tries again after STANDBY_RETRY_S until the time is up. Any other
        error moves away from that server when it is a broken exchange, and is raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        misses, standby, failure = 0, None, None
        while True:
            endpoint = self.endpoints[self.at]
            try:
                async with asyncio.timeout_at(deadline):
                    answer = await attempt(endpoint)
                self.resume_at = None
                return answer
            except NotLeader as err:
                standby = err
                self.move_from(endpoint, err.leader)
            except _Unsent as err:
                failure = err.error
                self.move_from(endpoint)
            except (OSError, EOFError, ValueError):  # TimeoutError and IncompleteReadError too
                self.move_from(endpoint)
                raise
            misses += 1
            if misses % len(self.endpoints):
                continue
            if standby is None:
                raise failure
            if loop.time() + STANDBY_RETRY_S >= deadline:
                raise NotLeader(f"no server leads yet ({standby}); tried "
                                f"{', '.join(e.url for e in self.endpoints)}", standby.leader)
            standby = None
            await asyncio.sleep(STANDBY_RETRY_S)

    async def request(self, method: str, path: str, body: bytes | None, headers: dict,
                      timeout_s: float) -> tuple[int, bytes]:
        lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        rest = "".join(lines).encode("latin-1") + b"\r\n" + (body or b"")

        async def attempt(endpoint: Endpoint) -> tuple[int, bytes]:
            message = (f"{method} {endpoint.prefix}{path} HTTP/1.1\r\n{endpoint.fixed_headers}"
                       ).encode("latin-1") + rest
            left = endpoint.left
            while True:
                reused = bool(endpoint.idle)
                reader, writer = endpoint.idle.pop() if reused else await endpoint.connect()
                endpoint.busy.add(writer)
                try:
                    writer.write(message)
                    status_line = await reader.readline()
                    if not status_line and endpoint.left != left:
                        raise ConnectionAbortedError(f"{endpoint.url} was found unavailable")
                    if not status_line and reused:
                        # The server closed this idle connection before reading the request.
                        writer.close()
                        continue
                    status, answer, keep = await self._response(reader, status_line, method)
                except BaseException:  # an error, a timeout or a cancel mid-exchange
                    writer.close()
                    raise
                finally:
                    endpoint.busy.discard(writer)
                if keep:
                    endpoint.idle.append((reader, writer))
                else:
                    writer.close()
                if (standby := not_leader(status, answer)) is not None:
                    raise standby
                return status, answer
        return await self.on_leader(attempt, timeout_s)

    @staticmethod
    async def _head(reader: asyncio.StreamReader, status_line: bytes) -> tuple[int, dict, bool]:
        """Status code, headers (lower-cased) and whether the connection stays open."""
        version, status, *_ = status_line.split(None, 2) or [b"", b""]
        if not version.startswith(b"HTTP/1."):
            raise ConnectionError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        return int(status), headers, version == b"HTTP/1.1" and headers.get("connection") != "close"

    @classmethod
    async def _response(cls, reader: asyncio.StreamReader, status_line: bytes,
                        method: str) -> tuple[int, bytes, bool]:
        code, headers, keep = await cls._head(reader, status_line)
        if method == "HEAD" or code in (204, 304):
            return code, b"", keep
        body, ended = await cls._body(reader, headers)
        return code, body, keep and not ended

    @staticmethod
    async def _body(reader: asyncio.StreamReader, headers: dict) -> tuple[bytes, bool]:
        """The body, and whether it ended with the connection."""
        if "chunked" in headers.get("transfer-encoding", ""):
            chunks = []
            while chunk := await _read_chunk(reader):
                chunks.append(chunk)
            return b"".join(chunks), False
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"])), False
        return await reader.read(), True

    async def open_stream(self, path: str, headers: dict, timeout_s: float) -> "ServerStream":
        """A GET whose answer is read piece by piece as it comes (Server-Sent Events), on
        a connection of its own; `timeout_s` bounds the connect and the answer's head."""
        rest = "".join([*(f"{name}: {value}\r\n" for name, value in headers.items()),
                        "\r\n"]).encode("latin-1")

        async def attempt(endpoint: Endpoint) -> ServerStream:
            reader, writer = await endpoint.connect()
            try:
                writer.write(f"GET {endpoint.prefix}{path} HTTP/1.1\r\n{endpoint.fixed_headers}"
                             .encode("latin-1") + rest)
                code, answer_headers, _ = await self._head(reader, await reader.readline())
                if code == 503:  # a standby's answer, or another refusal: read it whole
                    body, _ = await self._body(reader, answer_headers)
                    if (standby := not_leader(code, body)) is not None:
                        raise standby
                    writer.close()
                    return ServerStream(endpoint, code, reader, writer, False, body)
            except BaseException:
                writer.close()
                raise
            endpoint.busy.add(writer)  # cut, as requests are, when this server is left
            return ServerStream(endpoint, code, reader, writer,
                                "chunked" in answer_headers.get("transfer-encoding", ""))
        return await self.on_leader(attempt, timeout_s)

    async def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close_idle()


async def _read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One piece of a chunked body; b"" after the last (trailers skipped)."""
    size = int((await reader.readline()).split(b";")[0], 16)
    if size:
        chunk = await reader.readexactly(size)
        await reader.readexactly(2)
        return chunk
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass  # trailers
    return b""


class ServerStream:
    """The body of one answer of `ServerHttp.open_stream`, as it arrives."""

    def __init__(self, endpoint: Endpoint, status: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, chunked: bool, body: bytes | None = None):
        self.endpoint, self.status = endpoint, status
        self.reader, self.writer, self.chunked = reader, writer, chunked
        self.body = body  # the whole body, when it was read already

    async def read(self) -> bytes:
        """The next piece of the body; b"" once it ended."""
        if self.body is not None:
            body, self.body = self.body, b""
            return body
        if self.chunked:
            return await _read_chunk(self.reader)
        return await self.reader.read(65536)

    async def read_all(self, limit: int = 1 << 20) -> bytes:
        pieces, size = [], 0
        while size < limit and (piece := await self.read()):
            pieces.append(piece)
            size += len(piece)
        return b"".join(pieces)

    def close(self) -> None:
        self.writer.close()
        self.endpoint.busy.discard(self.writer)


class NoPushChannel(Exception):
    """The server has no agent WebSocket (it answered the upgrade 404/405): poll over HTTP."""


class PushChannel:
    """The agent WebSocket (`GET /private/agent/ws?token=<JWT>`): the server pushes tasks
    and cancels, and this agent's reports go as request frames answered by `req_id`."""

    def __init__(self, http: ServerHttp):
        self.http = http  # whose URL leads: the socket opens where the requests go
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.pending: dict[str, asyncio.Future] = {}
        self.pushes: asyncio.Queue = asyncio.Queue()
        self.reader: asyncio.Task | None = None
        self.endpoint: Endpoint | None = None  # where the socket is open
        self.ids = (f"r{n}" for n in range(1, 1 << 62))
        self.upload_lock = asyncio.Lock()  # an upload_file frame and its binary frame go together

    @property
    def is_open(self) -> bool:
        return self.ws is not None and not self.ws.closed

    async def open(self, token: str) -> None:
        """Connect; ServerRefused(401) for a refused token, NoPushChannel when the server
        has no socket, ServerUnavailable when it cannot be reached."""
        if self.session is None:
            self.session = aiohttp.ClientSession()

        async def attempt(endpoint: Endpoint) -> aiohttp.ClientWebSocketResponse:
            parts = urlsplit(endpoint.url)
            url = f"{'wss' if endpoint.ssl else 'ws'}://{parts.netloc}{endpoint.prefix}/private/agent/ws"
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S / 2):  # a frozen server: next
                    ws = await self.session.ws_connect(
                        f"{url}?token={quote(token, safe='')}", heartbeat=WS_PING_S, autoping=True,
                        max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                        headers={"User-Agent": f"offload-agent/{__version__}"})
                self.endpoint = endpoint
                return ws
            except aiohttp.WSServerHandshakeError as err:
                if err.status == 503:  # a standby (its body, naming the leader, is not at hand)
                    raise NotLeader(f"WebSocket upgrade: HTTP {err.status}") from None
                if err.status in (404, 405):
                    raise NoPushChannel(f"the server answered the upgrade {err.status}") from None
                if 400 <= err.status < 500:
                    raise ServerRefused(err.status, "", err.message) from None
                raise ConnectionError(f"WebSocket upgrade: HTTP {err.status}") from None
            except aiohttp.ClientConnectorError as err:
                raise _Unsent(err) from None
            except aiohttp.ClientError as err:
                raise ConnectionError(f"{type(err).__name__}: {err}") from None
        try:
            self.ws = await self.http.on_leader(attempt, REQUEST_TIMEOUT_S)
        except OSError as err:
            raise ServerUnavailable(f"WebSocket: {type(err).__name__}: {err}") from None
        self.pushes = asyncio.Queue()
        self.reader = asyncio.create_task(self._read(self.ws, self.pushes))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, pushes: asyncio.Queue) -> None:
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(frame, dict):
                    continue
                waiter = self.pending.pop(frame.get("req_id"), None) \
                    if frame.get("type") in ("response", "error") else None
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result(frame)
                elif frame.get("type") in ("task", "cancel", "heartbeat", "connected"):
                    pushes.put_nowait(frame)
        finally:
            if isinstance(ws.exception(), aiohttp.ServerTimeoutError):  # no pong: gone quiet
                log.warning("the server at %s stopped answering on the socket", self.endpoint.url)
                self.http.move_from(self.endpoint)
            self._fail_pending(f"the socket closed ({ws.close_code})")
            pushes.put_nowait(None)  # the end, for whoever reads the pushes

    def _fail_pending(self, why: str) -> None:
        pending, self.pending = self.pending, {}
        for waiter in pending.values():
            if not waiter.done():
                waiter.set_exception(ServerUnavailable(why))

    async def request(self, action: str, params: Any, timeout_s: float = REQUEST_TIMEOUT_S,
                      binary: bytes | None = None) -> Any:
        """The answer's data; ServerRefused for an error answer, ServerUnavailable when the
        socket is gone or silent. `binary` follows the request as a binary frame (upload_file)."""
        if not self.is_open:
            raise ServerUnavailable("the socket is not open")
        req_id = next(self.ids)
        waiter = asyncio.get_running_loop().create_future()
        self.pending[req_id] = waiter
        try:
            frame = json.dumps({"req_id": req_id, "action": action, "params": params})
            if binary is None:
                await self.ws.send_str(frame)
            else:
                async with self.upload_lock:
                    await self.ws.send_str(frame)
                    await self.ws.send_bytes(binary)
            async with asyncio.timeout(timeout_s):
                answer = await waiter
        except (ConnectionError, RuntimeError, asyncio.TimeoutError) as err:
            raise ServerUnavailable(f"{action} over the socket: {type(err).__name__}: {err}") from None
        finally:
            self.pending.pop(req_id, None)
        if answer.get("type") == "error":
            error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
            status = answer.get("status") if isinstance(answer.get("status"), int) else 400
            if status == 401:  # the token no longer counts: a new socket logs in again
                with contextlib.suppress(Exception):
                    await self.ws.close()
            if status >= 500 or status == 401:
                raise ServerUnavailable(f"{action}: {status} {error.get('message', '')}")
            raise ServerRefused(status, str(error.get("type", "")), str(error.get("message", "")))
        return answer.get("data")

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self.reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        self.ws = self.reader = None

    async def shut(self) -> None:
        await self.close()
        if self.session is not None:
            await self.session.close()
            self.session = None


class CredentialRevoked(ServerRefused):
    """The server refuses this agent's login and no registration key is at hand (or the new
    registration is refused too): only the operator can fix it, so serve stops."""

    def __init__(self, message: str):
        super().__init__(401, "authentication_error", message)

    def __str__(self) -> str:
        return self.message


class ServerClient:
    """The agent side of API.md: calls over `ServerHttp`.

    Every private call carries the JWT; a 401 logs in again with the saved identity and
    retries once, so an expired token or a server with a new secret costs one round trip.
    A login the server refuses (agent deleted, credential revoked) registers again when a
    registration key was given, and `on_new_identity` gets the new identity to save.
    """

    def __init__(self, server_url: str, identity: AgentIdentity | None = None, *,
                 registration_key: str | None = None, heartbeat_s: float | None = None,
                 on_new_identity: Callable[[AgentIdentity], None] | None = None):
        self.http = ServerHttp(server_url)
        self.identity = identity
        self.registration_key = registration_key
        self.heartbeat_s = heartbeat_s
        self.on_new_identity = on_new_identity
        self.on_login: Callable[[], None] | None = None
        self.on_revoked: Callable[[CredentialRevoked], None] | None = None
        self.register_hint = ""   # extra `register` arguments the operator needs (--config)
        self.token: str | None = None
        self.login_lock = asyncio.Lock()
        self.post_ping = True   # the holding report; False once the server showed it lacks it
        self.channel: PushChannel | None = None  # while open, reports go over the socket
        self.last_contact_at = time.monotonic()  # last exchange the server answered

    async def _send(self, method: str, path: str, body: Any = None, *,
                    token: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S):
        """One HTTP exchange; returns (status, parsed body) or raises ServerUnavailable."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None if body is None else json.dumps(body).encode()
        try:
            status, raw = await self.http.request(method, path, data, headers, timeout_s)
        except (asyncio.TimeoutError, OSError, EOFError, ValueError) as err:
            raise ServerUnavailable(f"{method} {path}: {type(err).__name__}: {err}") from err
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        if status >= 500:
            raise ServerUnavailable(f"{method} {path}: HTTP {status} {_error_message(parsed)}")
        self.last_contact_at = time.monotonic()
        return status, parsed

    async def _call_public(self, method: str, path: str, body: Any = None) -> Any:
        status, parsed = await self._send(method, path, body)
        if status >= 400:
            raise _refusal(status, parsed)
        return parsed

    async def _fresh_token(self, refused: str | None) -> str:
        """The current token, logging in first when there is none or it is the one just
        refused; concurrent calls that were all refused log in once."""
        async with self.login_lock:
            if self.token is None or self.token == refused:
                await self.authenticate()
            return self.token

    async def _call_private(self, method: str, path: str, body: Any = None,
                            timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        token = self.token or await self._fresh_token(None)
        status, parsed = await self._send(method, path, body, token=token, timeout_s=timeout_s)
        if status == 401:
            log.info("token refused, logging in again")
            token = await self._fresh_token(token)
            status, parsed = await self._send(method, path, body, token=token,
                                              timeout_s=timeout_s)
        if status >= 400:
            raise _refusal(status, parsed)
        return parsed

    # -- public agent routes --------------------------------------------------

    async def register(self, api_key: str, capabilities: list[str], tier: int,
                       capacity: int, info: dict, display_name: str | None = None) -> dict:
        body = {"capabilities": capabilities, "tier": tier, "capacity": capacity,
                "systemInfo": info, "apiKey": api_key, "appVersion": __version__}
        if display_name:
            body["displayName"] = display_name
        if self.heartbeat_s:
            body["heartbeatSecs"] = self.heartbeat_s
        return await self._call_public("POST", "/agent/register", body)

    async def authenticate(self) -> None:
        if self.identity is None:
            raise RuntimeError("authenticate needs a registered identity")
        status, answer = await self._send("POST", "/agent/auth", {
            "agentId": self.identity.agent_id, "key": self.identity.key})
        if status == 401:
            if not self.registration_key:
                raise self._revoked(
                    f"the server refuses agent {self.identity.agent_id}'s credential "
                    f"({_error_message(answer) or 'unknown agent or wrong key'}): register it again "
                    f"with `{shlex.join([sys.executable, os.path.abspath(__file__)])} register --server {self.http_url} --key <agent key> "
                    f"--caps {' '.join(self.identity.capabilities)}{self.register_hint}`, or serve with "
                    f"OFFLOAD_AGENT_KEY set to re-register by itself")
            await self._register_again()
            status, answer = await self._send("POST", "/agent/auth", {
                "agentId": self.identity.agent_id, "key": self.identity.key})
            if status == 401:
                raise self._revoked(f"the server refuses the credential it has just "
                                        f"issued to agent {self.identity.agent_id}")
        if status >= 400:
            raise _refusal(status, answer)
        if not isinstance(answer, dict) or not isinstance(answer.get("token"), str):
            raise ServerUnavailable("POST /agent/auth: the answer carries no token")
        self.token = answer["token"]
        if self.on_login is not None:
            self.on_login()

    def _revoked(self, message: str) -> CredentialRevoked:
        err = CredentialRevoked(message)
        if self.on_revoked is not None:
            self.on_revoked(err)
        return err

    async def _register_again(self) -> None:
        old = self.identity
        try:
            answer = await self.register(self.registration_key, old.capabilities, old.tier,
                                         old.capacity, system_info())
        except ServerRefused as err:
            if err.status not in (401, 403):
                raise
            raise self._revoked(f"the server no longer accepts agent {old.agent_id} and refuses "
                                f"the registration key too ({err.message}): check OFFLOAD_AGENT_KEY "
                                f"against the server's AGENT_API_KEYS") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("agentId"), str) \
                or not isinstance(answer.get("key"), str):
            raise ServerUnavailable("POST /agent/register: the answer carries no identity")
        self.identity = dataclasses.replace(old, agent_id=answer["agentId"], key=answer["key"])
        log.warning("the server no longer accepts agent %s (deleted or credential revoked); "
                    "registered again as %s", old.agent_id, self.identity.agent_id)
        if self.on_new_identity is not None:
            self.on_new_identity(self.identity)

    @property
    def http_url(self) -> str:
        return self.identity.server if self.identity else ""

    # -- private agent routes -------------------------------------------------

    def _socket(self) -> PushChannel | None:
        return self.channel if self.channel is not None and self.channel.is_open else None

    async def open_channel(self) -> PushChannel:
        """The agent WebSocket, logged in (again, if the token is refused)."""
        if self.channel is None:
            self.channel = PushChannel(self.http)
        token = self.token or await self._fresh_token(None)
        try:
            await self.channel.open(token)
        except ServerRefused as err:
            if err.status != 401:
                raise
            log.info("token refused, logging in again")
            await self.channel.open(await self._fresh_token(token))
        return self.channel

    async def ping(self, holding: list[dict] | None = None) -> dict:
        """A contact; with `holding` (WIRE.md) also tells the server which tasks this agent
        holds, so it releases the rest. A server without it (404/405) gets GET pings.
        Over the socket it is a `heartbeat` frame."""
        if (channel := self._socket()) is not None:
            return await channel.request("heartbeat", {} if holding is None else {"holding": holding})
        if holding is not None and self.post_ping:
            try:
                return await self._call_private("POST", "/private/agent/ping",
                                                {"holding": holding}, timeout_s=PING_TIMEOUT_S)
            except ServerRefused as err:
                if err.status not in (404, 405):
                    raise
                self.post_ping = False
                log.info("server takes no holding report; pinging with GET")
        return await self._call_private("GET", "/private/agent/ping", timeout_s=PING_TIMEOUT_S)

    async def update_info(self, capabilities: list[str], info: dict) -> dict:
        ident = self.identity
        body = {"capabilities": capabilities, "tier": ident.tier,
                "capacity": ident.capacity, "systemInfo": info, "appVersion": __version__}
        if self.heartbeat_s:
            body["heartbeatSecs"] = self.heartbeat_s
        return await self._call_private("POST", "/private/agent/info/update", body)

    async def poll_task(self, wait_s: int, take: bool = False) -> dict | None:
        """An UnassignedTask or None. With `take` (extension) a server that knows it also
        assigns the task and answers the AssignedTask; one that does not ignores it."""
        query = f"wait={wait_s}" + ("&take=1" if take else "")
        # The server may hold the request for wait_s; allow that plus a margin.
        return await self._call_private("GET", f"/private/agent/task/poll?{query}",
                                        timeout_s=wait_s + REQUEST_TIMEOUT_S)

    async def take_task(self, task_id: dict) -> dict | None:
        """The AssignedTask, or None when another agent got it first (409)."""
        try:
            return await self._call_private("POST", f"/private/agent/take/{task_path(task_id)}")
        except ServerRefused as err:
            if err.status == 409:
                return None
            raise

    async def report_progress(self, task_id: dict, stage: str | None = None,
                              log_update: str | None = None) -> dict | None:
        body: dict[str, Any] = {"id": task_id}
        if stage is not None:
            body["stage"] = stage
        if log_update is not None:
            body["logUpdate"] = log_update
        if (channel := self._socket()) is not None:
            return await channel.request("update_progress", body)
        return await self._call_private(
            "POST", f"/private/agent/task/progress/{task_path(task_id)}", body)

    async def resolve_task(self, task_id: dict, status: dict, output: Any,
                           take_next: bool = False) -> dict | None:
        """Reports a result. With `take_next` (extension) a server that knows it answers a
        task it has already assigned to this agent, if one is waiting, in `next`."""
        report = {"id": task_id, "capability": task_id["cap"], "status": status, "output": output}
        if (channel := self._socket()) is not None:  # the server pushes the next task itself
            await channel.request("resolve_task", report, timeout_s=REQUEST_TIMEOUT_S * 4)
            return None
        query = "?next=0" if take_next else ""
        answer = await self._call_private(
            "POST", f"/private/agent/task/resolve/{task_path(task_id)}{query}",
            {"id": task_id, "capability": task_id["cap"], "status": status, "output": output},
            timeout_s=REQUEST_TIMEOUT_S * 4)  # artifacts can make this body large
        return answer.get("next") if isinstance(answer, dict) else None

    async def send_log(self, severity: str, text: str) -> None:
        """One of this agent's own log lines, for the server's agent logs."""
        body = {"severity": severity, "text": text}
        if (channel := self._socket()) is not None:
            await channel.request("post", {"path": ["logs"], "body": body})
        else:
            await self._call_private("POST", "/private/agent/logs", body)

    async def rotate_key(self) -> dict:
        """Extension (WIRE.md): a fresh login secret; tokens issued before stop working."""
        return await self._call_private("POST", "/private/agent/rotate_key")

    async def cancel_requests(self, wait_s: int) -> list[dict]:
        """Extension: ids of held tasks the server wants stopped (long poll)."""
        answer = await self._call_private("GET", f"/private/agent/task/cancels?wait={wait_s}",
                                          timeout_s=wait_s + REQUEST_TIMEOUT_S)
        return answer if isinstance(answer, list) else []

    # -- buckets: a task's input and output files ------------------------------

    @staticmethod
    def _bucket_path(bucket_uid: str, *rest: str) -> str:
        return "/private/agent/bucket/" + "/".join(quote(p, safe="") for p in (bucket_uid, *rest))

    async def bucket_stat(self, bucket_uid: str) -> Any:
        if (channel := self._socket()) is not None:
            return await channel.request("get", {"path": ["bucket", bucket_uid, "stat"]})
        return await self._call_private("GET", f"/private/agent/bucket/{quote(bucket_uid, safe='')}/stat")

    async def _transfer(self, session: aiohttp.ClientSession, method: str, path: str,
                        use: Callable[[aiohttp.ClientResponse], Awaitable[Any]],
                        body: Callable[[], Any] | None = None) -> Any:
        """One streamed exchange with the leader, with the token (logging in again once on
        401); `use` takes the answer of a 2xx. `body()` makes the request body afresh for
        each try. A stall is caught by the read timeout, so the whole may take long."""
        token = self.token or await self._fresh_token(None)

        async def attempt(endpoint: Endpoint) -> Any:
            nonlocal token
            url = endpoint.url + path
            for last in (False, True):
                try:
                    async with session.request(method, url, headers={"Authorization": f"Bearer {token}"},
                                               data=None if body is None else body(),
                                               timeout=aiohttp.ClientTimeout(sock_connect=30, sock_read=120)) as resp:
                        if resp.status == 401 and not last:
                            token = await self._fresh_token(token)
                            continue
                        if resp.status >= 400:
                            raw = await resp.content.read(1 << 16)
                            if (standby := not_leader(resp.status, raw)) is not None:
                                raise standby
                            try:
                                parsed = json.loads(raw)
                            except ValueError:
                                parsed = None
                            if resp.status >= 500 and resp.status != 507:
                                raise ServerUnavailable(f"{method} {url}: HTTP {resp.status} {_error_message(parsed)}")
                            raise _refusal(resp.status, parsed)
                        self.last_contact_at = time.monotonic()
                        return await use(resp)
                except aiohttp.ClientConnectorError as err:
                    raise _Unsent(err) from None
                except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                    raise ServerUnavailable(f"{method} {url}: {type(err).__name__}: {err}") from None
        try:
            return await self.http.on_leader(attempt, BUCKET_TRANSFER_S)
        except (_Unsent, NotLeader, OSError) as err:
            raise ServerUnavailable(f"{method} {path}: {err}") from None

    async def download_bucket_file(self, session: aiohttp.ClientSession, bucket_uid: str,
                                   file_uid: str, receive: Callable[[aiohttp.StreamReader], Awaitable[None]]) -> None:
        async def use(resp: aiohttp.ClientResponse) -> None:
            await receive(resp.content)
        await self._transfer(session, "GET", self._bucket_path(bucket_uid, "file", file_uid), use)

    async def upload_bucket_file(self, session: aiohttp.ClientSession, bucket_uid: str, name: str,
                                 opener: Callable[[], Any], size: int) -> Any:
        """Stores a file in an output bucket: over the socket when it is open and the file
        small, else as a streamed multipart POST. `opener()` gives the file afresh."""
        if (channel := self._socket()) is not None and size <= WS_UPLOAD_MAX_BYTES:
            with opener() as source:
                data = source.read(WS_UPLOAD_MAX_BYTES + 1)
            log.info("uploading %r (%d bytes) to bucket %s over the socket", name, size, bucket_uid)
            return await channel.request("upload_file", {"bucket_uid": bucket_uid, "filename": name},
                                         timeout_s=REQUEST_TIMEOUT_S * 4, binary=data)
        log.info("uploading %r (%d bytes) to bucket %s over HTTP", name, size, bucket_uid)
        opened: list = []

        def body() -> aiohttp.FormData:
            form = aiohttp.FormData(quote_fields=False)  # the name as it is (checked plain)
            opened.append(opener())
            form.add_field("file", opened[-1], filename=name, content_type="application/octet-stream")
            return form

        async def use(resp: aiohttp.ClientResponse) -> Any:
            return await resp.json(content_type=None)
        try:
            return await self._transfer(session, "POST", self._bucket_path(bucket_uid, "upload"), use, body)
        finally:
            for source in opened:
                source.close()


def _error_message(parsed: Any) -> str:
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return str(parsed["error"].get("message", ""))
    return ""


def _refusal(status: int, parsed: Any) -> ServerRefused:
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(err, dict):
        return ServerRefused(status, str(err.get("type", "")), str(err.get("message", "")))
    return ServerRefused(status, "", "")


# ============================================================================ executors

class TaskFailed(Exception):
    """Raised by executors: the task ran and failed; `output` still goes back to the client."""

    def __init__(self, message: str, output: Any = None):
        super().__init__(message)
        self.message = message
        self.output = output


class NotExecuted(Exception):
    """The task was never started here (no executor); the server may give it to another agent."""


SendProgress = Callable[[str | None, str | None], Awaitable[None]]


class ProgressReporter:
    """Collects a task's log text and stage, sending them at most every `interval_s`.

    A deferred stage (`set_stage(..., deferred=True)`) waits `stage_delay_s`: it goes out
    then, or earlier with any log text or other stage, and is dropped if the task ends
    first. Sending is best effort: a failed send keeps the text for the next one
    (bounded), and never fails the task.
    """

    def __init__(self, send: SendProgress, interval_s: float = PROGRESS_INTERVAL_S,
                 stage_delay_s: float = 0.0):
        self._send = send
        self._interval_s = interval_s
        self._stage_delay_s = stage_delay_s
        self._pending_log: list[str] = []
        self._pending_chars = 0
        self._pending_stage: str | None = None
        self._deferred_stage: str | None = None   # pending, not yet due
        self._deferral: asyncio.TimerHandle | None = None
        self._wakeup: asyncio.Event | None = None  # made on first use: most tasks send nothing
        self._flusher: asyncio.Task | None = None
        self._sending = asyncio.Lock()  # one send at a time, so text goes out in order
        self._refused = False

    def write(self, text: str) -> None:
        if not text or self._refused:
            return
        self._pending_log.append(text)
        self._pending_chars += len(text)
        if self._pending_chars > LOG_BUFFER_MAX_CHARS:
            joined = "".join(self._pending_log)[-LOG_BUFFER_MAX_CHARS:]
            self._pending_log, self._pending_chars = [joined], len(joined)
        self._kick()

    def set_stage(self, stage: str, deferred: bool = False) -> None:
        if self._refused:
            return
        self._pending_stage = stage
        if deferred and self._stage_delay_s > 0:
            self._deferred_stage = stage
            if self._deferral is None:
                self._deferral = asyncio.get_running_loop().call_later(
                    self._stage_delay_s, self._kick)
            return
        self._deferred_stage = None
        self._kick()

    def _kick(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Shielded: a close() during a send lets that send finish, so its text is
            # neither lost nor sent twice; close() then waits for it (the lock).
            await asyncio.shield(self.flush())
            await asyncio.sleep(self._interval_s)

    async def flush(self) -> None:
        async with self._sending:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending_log and self._pending_stage is None:
            return
        text = "".join(self._pending_log) or None
        stage = self._pending_stage
        self._pending_log, self._pending_chars, self._pending_stage = [], 0, None
        self._deferred_stage = None
        try:
            await self._send(stage, text)
        except ServerRefused as err:
            # The task is no longer this agent's to report on (it ended or was taken
            # away); retrying would only repeat the refusal, so stop sending.
            log.warning("progress refused, sending no more for this task: %s", err)
            self._refused = True
        except ServerUnavailable as err:
            log.warning("progress not delivered: %s", err)
            if text:
                self._pending_log.insert(0, text)
                self._pending_chars += len(text)
            if self._pending_stage is None:
                self._pending_stage = stage

    @property
    def pending(self) -> bool:
        return bool(self._pending_log) or self._pending_stage is not None

    async def close(self) -> None:
        """Stops the batching and sends whatever is left, so the log is complete before the
        result. A deferred stage not yet due is dropped: the result says more."""
        if self._deferral is not None:
            self._deferral.cancel()
            self._deferral = None
        if self._deferred_stage is not None and self._pending_stage == self._deferred_stage:
            self._pending_stage = None
        self._deferred_stage = None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush()


@dataclass
class TaskRun:
    """Everything an executor gets: the task, its private folder, and a way to report progress.
    `fetch_http` is the session for fetchFiles (its resolver refuses internal addresses);
    `http` reaches the operator's own services (Ollama). `reaper` holds task processes."""

    task_id: dict
    data: dict
    folder: Path
    settings: Settings
    http: aiohttp.ClientSession
    progress: ProgressReporter
    fetch_http: aiohttp.ClientSession | None = None
    reaper: TaskReaper | None = None
    executor_started: bool = False
    server: ServerClient | None = None  # for the task's buckets (file_bucket, output_bucket)

    @property
    def capability(self) -> str:
        return self.task_id["cap"]

    @property
    def payload(self) -> Any:
        return self.data.get("payload")

    def log(self, text: str) -> None:
        self.progress.write(text)


# -- what a task may reach: ids, environment, processes -------------------------
# Everything the server sends is untrusted: a task id becomes a folder name, file paths
# become opens, URLs become connections. Each is checked where it is used.

ULID_RE = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
TASK_ENV_NAMES = frozenset({"PATH", "HOME", "LANG", "TERM", "TZ"})


def valid_task_id(task_id: Any) -> bool:
    """`{"cap": str, "id": ULID}`: the id names a folder, so nothing else is accepted."""
    return (isinstance(task_id, dict) and isinstance(task_id.get("cap"), str)
            and isinstance(task_id.get("id"), str) and ULID_RE.fullmatch(task_id["id"]) is not None)


def task_environment(folder: Path, user: TaskUser | None) -> dict[str, str]:
    """What a task's processes see of the agent's environment: an allowlist, so no key,
    token or secret of the agent's; under --task-user HOME is the task folder."""
    env = {name: value for name, value in os.environ.items()
           if name in TASK_ENV_NAMES or name.startswith("LC_")}
    env.setdefault("PATH", os.defpath)
    if user is not None:
        env.update(HOME=str(folder), USER=user.name, LOGNAME=user.name)
    return env


def _as_user(user: TaskUser | None) -> dict:
    if user is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}


REAPER_CODE = """\
import os, sys
held = set()
for line in sys.stdin:
    (held.add if line[0] == "+" else held.discard)(int(line[1:]))
for group in held:
    try:
        os.killpg(group, 9)
    except OSError:
        pass
"""


class TaskReaper:
    """A small process that outlives the agent by a moment: it is told the process group of
    each running task, and when its pipe from the agent closes (the agent exited, kill -9
    included) it kills those groups. PR_SET_PDEATHSIG would reach only direct children."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", REAPER_CODE], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, start_new_session=True)  # Ctrl-C does not reach it

    def _tell(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()

    def hold(self, group: int) -> None:
        self._tell(f"+{group}\n")

    def release(self, group: int) -> None:
        self._tell(f"-{group}\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


async def _spawn(run: TaskRun, argv: list[str], **kwargs) -> asyncio.subprocess.Process:
    """A task process: in the task folder, with the task's environment, as --task-user,
    in a session (and so a process group) of its own that the reaper holds."""
    kwargs.setdefault("env", task_environment(run.folder, run.settings.task_user))
    kwargs.setdefault("cwd", run.folder)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        **_as_user(run.settings.task_user), **kwargs)
    if run.reaper is not None:
        run.reaper.hold(proc.pid)
    return proc


async def _end_group(run: TaskRun, proc: asyncio.subprocess.Process) -> None:
    """Kills what is left of a task's processes and collects the exit status. Waiting here,
    on a cancel too, keeps the child ours to reap: left to garbage collection, another
    subprocess call could reap it first ("Unknown child process pid" from asyncio)."""
    _kill_group(proc.pid)
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(proc.wait()), 5)
    if run.reaper is not None:
        run.reaper.release(proc.pid)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# -- shell.bash / shellcmd.bash ----------------------------------------------

def _shell_command(payload: Any) -> tuple[str, float | None]:
    if isinstance(payload, str):
        return payload, None
    if isinstance(payload, dict) and isinstance(payload.get("command"), str):
        timeout = payload.get("timeoutSecs")
        if timeout is not None and (not isinstance(timeout, (int, float))
                                    or isinstance(timeout, bool) or timeout <= 0):
            raise TaskFailed("payload.timeoutSecs must be a positive number")
        return payload["command"], timeout
    raise TaskFailed('payload must be a command string or {"command": "...", "timeoutSecs"?: N}')


class _CapturedStream:
    """Keeps the last OUTPUT_MAX_BYTES of a stream and hands complete lines to `on_line`."""

    def __init__(self, on_line: Callable[[str], None] | None):
        self.chunks: list[bytes] = []
        self.size = 0
        self.dropped = 0
        self._on_line = on_line
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""

    def feed(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        while self.size - len(self.chunks[0]) >= OUTPUT_MAX_BYTES:
            first = self.chunks.pop(0)
            self.size -= len(first)
            self.dropped += len(first)
        if self._on_line:
            text = self._partial + self._decoder.decode(chunk)
            complete, newline, self._partial = text.rpartition("\n")
            if newline:
                self._on_line(complete + newline)

    def finish(self) -> str:
        if self._on_line:
            rest = self._partial + self._decoder.decode(b"", final=True)
            if rest:
                self._on_line(rest)
        kept = b"".join(self.chunks)
        dropped = self.dropped + max(0, len(kept) - OUTPUT_MAX_BYTES)
        text = kept[-OUTPUT_MAX_BYTES:].decode(errors="replace")
        if dropped:
            text = f"[... {dropped} earlier bytes dropped ...]\n" + text
        return text


async def _run_bash(run: TaskRun, stream: bool) -> dict:
    command, timeout_s = _shell_command(run.payload)
    on_line = run.log if stream else None
    stdout, stderr = _CapturedStream(on_line), _CapturedStream(on_line)
    # A session of its own makes the process group killable as a whole: children
    # started by the command die with it on timeout or shutdown.
    proc = await _spawn(run, ["bash", "-c", command], stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE)

    async def pump(reader: asyncio.StreamReader, sink: _CapturedStream) -> None:
        while chunk := await reader.read(65536):
            sink.feed(chunk)

    pumps = asyncio.gather(pump(proc.stdout, stdout), pump(proc.stderr, stderr))
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
            _kill_group(proc.pid)
            await proc.wait()
        # Leftover background children would hold the pipes open; the task is over.
        _kill_group(proc.pid)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(pumps), 5)
    finally:
        # Cancelled (agent shutdown, a cancel request): leave nothing behind. The group
        # kill reaches the shell too; asyncio's watcher collects its exit status.
        await _end_group(run, proc)
        pumps.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pumps

    output: dict[str, Any] = {"stdout": stdout.finish(), "stderr": stderr.finish()}
    if timed_out:
        output["return_code"] = proc.returncode
        raise TaskFailed(f"command timed out after {timeout_s} s; its process group was killed",
                         output)
    if proc.returncode != 0:
        output["return_code"] = proc.returncode
        raise TaskFailed(f"command exited with code {proc.returncode}", output)
    return output


async def run_shell_streaming(run: TaskRun) -> dict:
    """`shell.bash`: stdout/stderr lines stream to the task log while the command runs."""
    return await _run_bash(run, stream=True)


async def run_shell_quiet(run: TaskRun) -> dict:
    """`shellcmd.bash`: the same command semantics, output only at the end."""
    return await _run_bash(run, stream=False)


async def run_echo(run: TaskRun) -> Any:
    """`debug.echo`: the payload comes back as the output."""
    return run.payload


# -- llm.<model> (Ollama) ------------------------------------------------------

# What a task may put in the Ollama request. Options that pick hardware or hold memory
# (num_gpu, num_thread, use_mlock, keep_alive...) are the operator's, and the context and
# output lengths are capped (--llm-max-ctx, --llm-max-predict).
LLM_BODY_FIELDS = frozenset({"messages", "prompt", "system", "format", "options", "stream",
                             "tools", "think", "model"})
LLM_NUMBER_OPTIONS = frozenset({
    "temperature", "top_k", "top_p", "min_p", "typical_p", "tfs_z", "repeat_last_n",
    "repeat_penalty", "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau",
    "mirostat_eta", "seed"})
LLM_OPTIONS = LLM_NUMBER_OPTIONS | {"stop", "penalize_newline", "num_ctx", "num_predict"}


def _refuse_unknown(given: dict, allowed: frozenset | set, what: str, also: tuple = ()) -> None:
    """An allowlist: names beyond `allowed` (and `also`, accepted but not advertised) fail."""
    unknown = sorted(set(given) - set(allowed) - set(also))
    if unknown:
        raise TaskFailed(f"{what} {', '.join(unknown)} not allowed on this agent; "
                         f"allowed: {', '.join(sorted(allowed))}")


def _llm_options(options: Any, max_ctx: int, max_predict: int) -> dict:
    if not isinstance(options, dict):
        raise TaskFailed("payload.options must be an object")
    _refuse_unknown(options, LLM_OPTIONS, "payload.options")
    for name in LLM_NUMBER_OPTIONS & set(options):
        value = options[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TaskFailed(f"payload.options.{name} must be a number")
    for name, cap in (("num_ctx", max_ctx), ("num_predict", max_predict)):
        value = options.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 1 <= value <= cap):
            raise TaskFailed(f"payload.options.{name} must be an integer from 1 to {cap} on this agent")
    stop = options.get("stop")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise TaskFailed("payload.options.stop must be a list of strings")
    if "penalize_newline" in options and not isinstance(options["penalize_newline"], bool):
        raise TaskFailed("payload.options.penalize_newline must be true or false")
    return dict(options)


def ollama_chat_request(model: str, payload: Any, max_ctx: int = LLM_MAX_CTX,
                        max_predict: int = LLM_MAX_PREDICT) -> dict:
    """Turns a task payload into an Ollama /api/chat body: a prompt string, a
    `{"prompt", "system"?}` object, or a chat body with `messages` are all accepted.
    The model is the capability's; fields beyond LLM_BODY_FIELDS are refused."""
    if isinstance(payload, str):
        payload = {"prompt": payload}
    if not isinstance(payload, dict):
        raise TaskFailed('payload must be a prompt string or an object with "messages" or "prompt"')
    _refuse_unknown(payload, LLM_BODY_FIELDS - {"model"}, "payload field(s)", also=("model",))
    body = {k: v for k, v in payload.items() if k not in ("prompt", "system", "model")}
    if "options" in body:
        body["options"] = _llm_options(body["options"], max_ctx, max_predict)
    if "messages" not in body:
        if not payload.get("prompt"):
            raise TaskFailed('payload needs "messages" or "prompt"')
        messages = []
        if payload.get("system"):
            messages.append({"role": "system", "content": payload["system"]})
        messages.append({"role": "user", "content": payload["prompt"]})
        body["messages"] = messages
    body["model"] = model
    body["stream"] = bool(payload.get("stream", False))
    return body


async def run_llm(run: TaskRun) -> dict:
    """`llm.<model>`: one chat completion from the local Ollama.

    The output has the shape of Ollama's non-streaming answer either way; when the payload
    asks for `stream`, the text also streams into the task log as it is generated.
    """
    model = run.capability.removeprefix("llm.")
    request = ollama_chat_request(model, run.payload, run.settings.llm_max_ctx,
                                  run.settings.llm_max_predict)
    base = run.settings.ollama_url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    try:
        async with run.http.post(base + "/api/chat", json=request, timeout=timeout) as resp:
            if resp.status != 200:
                text = await resp.text()
                raise TaskFailed(f"Ollama answered HTTP {resp.status}: {_ollama_error(text)}",
                                 {"error": _ollama_error(text)})
            if not request["stream"]:
                return await resp.json(content_type=None)
            pieces: list[str] = []
            final: dict | None = None
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    final = _ollama_stream_line(line, pieces, run) or final
                if final:
                    break
            if not final and buffer.strip():
                final = _ollama_stream_line(buffer, pieces, run)
    except aiohttp.ClientError as err:
        raise TaskFailed(f"Ollama is not reachable at {base}: {err}") from err
    if final is None:
        raise TaskFailed("Ollama's stream ended before it was done", {"partial": "".join(pieces)})
    final["message"] = {"role": "assistant", "content": "".join(pieces)}
    return final


def _ollama_stream_line(line: bytes, pieces: list[str], run: TaskRun) -> dict | None:
    """Handles one NDJSON line; returns it when it is the last (`done`)."""
    if not line.strip():
        return None
    try:
        chunk = json.loads(line)
    except ValueError:
        raise TaskFailed(f"Ollama sent a line that is not JSON: {line[:200]!r}") from None
    if "error" in chunk:
        raise TaskFailed(f"Ollama: {chunk['error']}", {"error": chunk["error"], "partial": "".join(pieces)})
    text = (chunk.get("message") or {}).get("content") or ""
    if text:
        pieces.append(text)
        run.log(text)
    return chunk if chunk.get("done") else None


def _ollama_error(text: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(text)["error"])
    return text[:500]


# -- the executor table --------------------------------------------------------

Executor = Callable[[TaskRun], Awaitable[Any]]

EXECUTORS: dict[str, Executor] = {
    "debug.echo": run_echo,
    "shell.bash": run_shell_streaming,
    "shellcmd.bash": run_shell_quiet,
}
PREFIX_EXECUTORS: dict[str, Executor] = {
    "llm.": run_llm,
}


# Executors that run in the task folder; fetchFiles and artifacts need one with any executor.
FOLDER_EXECUTORS: frozenset[Executor] = frozenset({run_shell_streaming, run_shell_quiet})


def needs_folder(executor: Executor | None, data: dict) -> bool:
    """Most tasks (echo, llm) never touch a folder: making and removing one per task cost
    more than running them."""
    if executor is None:
        return False
    return executor in FOLDER_EXECUTORS or bool(
        data.get("fetchFiles") or data.get("artifacts") or data.get("file_bucket") or data.get("output_bucket"))


def task_folders(work_root: Path, uid: str) -> tuple[Path, Path]:
    """(private parent, task folder). The parent (mode 0700, the agent's) is what a task
    run as --task-user cannot list or cross: no other task's folder and nothing of the
    agent's is reachable by walking up from its own."""
    parent = work_root / uid
    return parent, parent / "task"


def _fresh_folder(parent: Path, folder: Path, user: TaskUser | None) -> None:
    shutil.rmtree(parent, ignore_errors=True)  # a retried task starts afresh
    os.mkdir(parent, 0o700)
    os.chmod(parent, 0o700)  # whatever the umask
    os.mkdir(folder, 0o700)
    if user is not None:
        os.chown(folder, user.uid, user.gid)


def find_executor(capability: str) -> Executor | None:
    capability = base_capability(capability)
    if capability in EXECUTORS:
        return EXECUTORS[capability]
    for prefix, executor in PREFIX_EXECUTORS.items():
        if capability.startswith(prefix) and len(capability) > len(prefix):
            return executor
    return None


# -- files in and out: never through a symbolic link ------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def relative_parts(relative: Any) -> list[str]:
    """The components of a path relative to the task folder; absolute paths and `..` are
    refused before anything is touched (links are dealt with at each use, TaskFolder)."""
    if not isinstance(relative, str) or not relative.strip():
        raise TaskFailed(f"file path {relative!r} must be a non-empty relative path")
    if os.path.isabs(relative) or re.match(r"^[A-Za-z]:[\\/]", relative) or "\x00" in relative:
        raise TaskFailed(f"file path {relative!r} is absolute; paths are relative to the task folder")
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise TaskFailed(f"file path {relative!r} escapes the task folder")
    if not parts:
        raise TaskFailed(f"file path {relative!r} names the task folder itself")
    return parts


class TaskFolder:
    """Paths inside a task folder, opened one component at a time with O_NOFOLLOW from a
    descriptor of the folder: whatever a cloned repository or the task placed there, a
    path cannot leave it, and the check happens at the moment of the write or read."""

    def __init__(self, root: Path, owner: TaskUser | None):
        self.root = root
        self.owner = owner

    def own(self, name: str, dir_fd: int) -> None:
        if self.owner is not None:
            os.chown(name, self.owner.uid, self.owner.gid, dir_fd=dir_fd, follow_symlinks=False)

    def open_root(self) -> int:
        return os.open(self.root, _DIR_FLAGS)

    def open_parent(self, relative: str, parts: list[str], create: bool) -> int:
        """A descriptor of the folder that holds `parts[-1]`, made on the way if `create`."""
        fd = self.open_root()
        try:
            for name in parts[:-1]:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                        self.own(name, fd)
                try:
                    inner = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    raise self._refusal(relative, name, fd, err) from None
                os.close(fd)
                fd = inner
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _refusal(relative: str, name: str, dir_fd: int, err: OSError) -> Exception:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    return TaskFailed(f"file path {relative!r} escapes the task folder "
                                      f"through the symbolic link {name!r}")
            return TaskFailed(f"file path {relative!r}: {name!r} is not a folder")
        return err

    def open_regular(self, relative: str, what: str = "artifact") -> tuple[int, int]:
        """(descriptor, size) of a regular file: not through a link, not a FIFO or device,
        not a file with other hard links (it could be one outside, linked in by the task)."""
        parts = relative_parts(relative)
        try:
            parent = self.open_parent(relative, parts, create=False)
        except FileNotFoundError:
            raise TaskFailed(f"{what} {relative!r} was not produced") from None
        try:
            name = parts[-1]
            try:
                before = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                raise TaskFailed(f"{what} {relative!r} was not produced") from None
            if stat.S_ISLNK(before.st_mode):
                raise TaskFailed(f"file path {relative!r} escapes the task folder "
                                 f"through the symbolic link {name!r}")
            if not stat.S_ISREG(before.st_mode):
                raise TaskFailed(f"{what} {relative!r} is not a regular file")
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=parent)
        except OSError as err:
            raise self._refusal(relative, parts[-1], parent, err) from None
        finally:
            os.close(parent)
        now = os.fstat(fd)
        problem = None
        if (now.st_ino, now.st_dev) != (before.st_ino, before.st_dev) or not stat.S_ISREG(now.st_mode):
            problem = f"{what} {relative!r} changed while it was read"
        elif now.st_nlink > 1:
            problem = (f"{what} {relative!r} has other hard links; "
                       f"only files made in the task folder are sent back")
        if problem:
            os.close(fd)
            raise TaskFailed(problem)
        return fd, now.st_size

    def read(self, relative: str, max_bytes: int) -> bytes:
        fd, size = self.open_regular(relative)
        with open(fd, "rb") as source:
            if size > max_bytes:
                raise TaskFailed(f"artifact {relative!r} is {size} bytes, "
                                 f"over the limit of {max_bytes} bytes")
            content = source.read(max_bytes + 1)
        if len(content) > max_bytes:
            raise TaskFailed(f"artifact {relative!r} is over the limit of {max_bytes} bytes")
        return content


# -- fetching: only what the operator allows ---------------------------------------

class FetchRefused(OSError):
    """A fetch would reach an address this agent does not fetch from."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4): it reaches that host."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def internal_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not a public one (None when it is)."""
    if ip.version == 6 and (inner := _embedded_ipv4(ip)) is not None:
        return internal_reason(inner)
    for kind in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global or (ip.version == 6 and ip.is_site_local):
        return "not a public address"
    return None


class FetchPolicy:
    """Public addresses are fetched from; loopback, link-local, private, multicast,
    unspecified and reserved ones only when `--allow-fetch` lists them (an IP, a CIDR,
    or a host name, which then may resolve to anything)."""

    def __init__(self, allowed: tuple[str, ...] = ()):
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for entry in allowed:
            entry = entry.strip()
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not re.fullmatch(r"[A-Za-z0-9.-]+", entry):
                    raise ValueError(f"--allow-fetch {entry!r} is neither a host name, an IP "
                                     f"nor a CIDR") from None
                self.hosts.add(entry.lower().rstrip("."))

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def refusal(self, address: str) -> str | None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        plain = _embedded_ipv4(ip) if ip.version == 6 else None
        if any((plain or ip) in net for net in self.networks if net.version == (plain or ip).version):
            return None
        reason = internal_reason(ip)
        return None if reason is None else f"{address} is {reason} (see --allow-fetch)"

    def literal(self, host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address of a host written as one (aiohttp connects to such hosts without
        its resolver, so they are checked here); None for a name."""
        host = host.strip("[]")
        if not (":" in host or host.replace(".", "").isdigit()):
            return None
        with contextlib.suppress(ValueError):
            return ipaddress.ip_address(host.split("%", 1)[0])
        try:  # the legacy forms the C library still accepts: 2130706433, 127.1
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise FetchRefused(f"{host!r} is not an address this agent can check") from None

    def check_literal(self, host: str) -> None:
        ip = self.literal(host)
        if ip is not None and not self.host_allowed(host) and (why := self.refusal(str(ip))):
            raise FetchRefused(why)

    async def addresses(self, host: str, port: int) -> list[str]:
        """The resolved addresses of `host` this agent may connect to; FetchRefused if none."""
        ip = self.literal(host)
        if ip is not None:
            self.check_literal(host)
            return [str(ip)]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found = list(dict.fromkeys(info[4][0] for info in infos))
        if self.host_allowed(host):
            return found
        kept = [address for address in found if self.refusal(address) is None]
        if not kept:
            raise FetchRefused(f"{host} resolves to {self.refusal(found[0]) if found else 'nothing'}")
        return kept


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp connects to what its resolver answers: answering only checked addresses
    means the address checked is the one connected to (no DNS rebinding between)."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self.inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[dict]:
        found = await self.inner.resolve(host, port, family)
        if self.policy.host_allowed(host):
            return found
        kept = [info for info in found if self.policy.refusal(info["host"]) is None]
        if not kept:
            raise FetchRefused(f"{host.rstrip('.')} resolves to "
                               f"{self.policy.refusal(found[0]['host']) if found else 'nothing'}")
        return kept

    async def close(self) -> None:
        await self.inner.close()


def make_fetch_session(settings: Settings) -> aiohttp.ClientSession:
    """The session every `get` goes through: no proxies from the environment, no cookies
    kept between tasks, and the guarded resolver."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(FetchPolicy(settings.allow_fetch)),
                                     force_close=True)
    return aiohttp.ClientSession(connector=connector, trust_env=False,
                                 cookie_jar=aiohttp.DummyCookieJar())


class FetchBudget:
    """The bytes one task's fetchFiles may still bring in."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, count: int, path: str) -> None:
        self.used += count
        if self.used > self.max_bytes:
            raise TaskFailed(f"fetchFiles {path!r}: over this agent's limit of "
                             f"{self.max_bytes} fetched bytes per task")


def _request_headers(ref: dict) -> dict[str, str]:
    """Headers a FileReference asks for: `customHeader`, then `httpAuthHeader` as the
    Authorization value, else HTTP basic auth from `httpLogin`/`httpPassword`."""
    custom = ref.get("customHeader") or {}
    if not isinstance(custom, dict):
        raise TaskFailed(f"fetchFiles {ref.get('path')!r}: customHeader must be an object")
    headers = {str(k): str(v) for k, v in custom.items()}
    if ref.get("httpAuthHeader"):
        headers["Authorization"] = str(ref["httpAuthHeader"])
    elif ref.get("httpLogin") is not None:
        pair = f"{ref['httpLogin']}:{ref.get('httpPassword') or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    for name, value in headers.items():
        # A line break would add headers of the task's choosing (and, for git, config lines).
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or re.search(r"[\r\n\0]", value):
            raise TaskFailed(f"fetchFiles {ref.get('path')!r}: header {name[:40]!r} is not a valid header")
    return headers


def _origin(url: str) -> tuple:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port


async def _fetch_http(run: TaskRun, ref: dict, budget: FetchBudget) -> None:
    """One `get` into a part file renamed over `path` (the rename replaces the name itself,
    so a link or hard link planted there is never written through). Redirects are followed here, each hop checked like the first, and the
    request's credentials go only to the origin they were given for."""
    path, url, headers = ref["path"], ref["get"], _request_headers(ref)
    policy = FetchPolicy(run.settings.allow_fetch)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    try:
        for _ in range(FETCH_MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                raise TaskFailed(f"fetchFiles {path!r}: only http(s) URLs can be fetched with get")
            policy.check_literal(parts.hostname)
            async with run.fetch_http.get(url, headers=headers, timeout=timeout,
                                          allow_redirects=False) as resp:
                location = resp.headers.get("Location")
                if resp.status in (301, 302, 303, 307, 308) and location:
                    following = urljoin(url, location)
                    if _origin(following) != _origin(url):
                        headers = {}
                    url = following
                    continue
                if resp.status >= 400:
                    raise TaskFailed(f"fetchFiles {path!r}: HTTP {resp.status} from {_safe_url(url)}")
                if (resp.content_length or 0) > budget.max_bytes - budget.used:
                    budget.take(resp.content_length, path)
                await _receive(run, path, resp.content, budget)
                return
        raise TaskFailed(f"fetchFiles {path!r}: more than {FETCH_MAX_REDIRECTS} redirects")
    except FetchRefused as err:
        raise TaskFailed(f"fetchFiles {path!r}: refused: {err}") from None
    except aiohttp.ClientConnectorError as err:
        if isinstance(err.os_error, FetchRefused):
            raise TaskFailed(f"fetchFiles {path!r}: refused: {err.os_error}") from None
        raise TaskFailed(f"fetchFiles {path!r}: {_safe_url(url)}: {err}") from err
    except aiohttp.ClientError as err:
        raise TaskFailed(f"fetchFiles {path!r}: {_safe_url(url)}: {err}") from err


def _check_placeable(run: TaskRun, path: str) -> None:
    """Fails now, before a download, when `path` cannot be reached without a link."""
    parts = relative_parts(path)
    os.close(TaskFolder(run.folder, run.settings.task_user).open_parent(path, parts, create=True))


async def _receive(run: TaskRun, path: str, content: aiohttp.StreamReader,
                   budget: FetchBudget, digest: Any = None, what: str = "fetchFiles") -> None:
    parts = relative_parts(path)
    folder = TaskFolder(run.folder, run.settings.task_user)
    parent = folder.open_parent(path, parts, create=True)
    temp = f".offload-part-{secrets.token_hex(8)}"
    placed = False
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=parent)
        folder.own(temp, parent)
        with open(fd, "wb") as out:
            async for chunk in content.iter_chunked(65536):
                budget.take(len(chunk), path)
                if digest is not None:
                    digest.update(chunk)
                out.write(chunk)
        os.rename(temp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        placed = True
    except OSError as err:
        raise TaskFailed(f"{what} {path!r}: cannot be written: {err.strerror}") from None
    finally:
        if not placed:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=parent)
        os.close(parent)


async def _git_pins(run: TaskRun, path: str, url: str) -> tuple[str, list[str]]:
    """(GIT_ALLOW_PROTOCOL, http.curloptResolve entries). git resolves names itself, so
    the addresses checked here are pinned for it: it connects to no other."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file" and run.settings.allow_local_git:
        return "file", []
    if scheme not in ("http", "https"):
        raise TaskFailed(f"fetchFiles {path!r}: git URL scheme not allowed: {_safe_url(url)}; "
                         f"this agent clones over http(s)")
    parts = urlsplit(url)
    if not parts.hostname:
        raise TaskFailed(f"fetchFiles {path!r}: git URL without a host: {_safe_url(url)}")
    port = parts.port or (443 if scheme == "https" else 80)
    addresses = await FetchPolicy(run.settings.allow_fetch).addresses(parts.hostname, port)
    pinned = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
    return "http:https", [f"{parts.hostname}:{port}:{pinned}"]


def _tree_size(top: str) -> int:
    total = 0
    for folder, _, files in os.walk(top):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


async def _fetch_git(run: TaskRun, ref: dict, budget: FetchBudget) -> None:
    """A shallow clone into a fresh folder of the agent's making, then renamed into place
    through descriptors (no link on the way is followed); bounded by the byte budget."""
    path, url = ref["path"], ref["gitClone"]
    try:
        protocols, pins = await _git_pins(run, path, url)
    except FetchRefused as err:
        raise TaskFailed(f"fetchFiles {path!r}: refused: {err}") from None
    except OSError as err:
        raise TaskFailed(f"fetchFiles {path!r}: {_safe_url(url)}: {err}") from None
    parts = relative_parts(path)
    folder = TaskFolder(run.folder, run.settings.task_user)
    await asyncio.to_thread(_check_placeable, run, path)
    temp = f".offload-clone-{secrets.token_hex(8)}"
    root = folder.open_root()
    try:
        os.mkdir(temp, 0o755, dir_fd=root)
        folder.own(temp, root)
        # Credentials go to git through GIT_CONFIG_* variables, not argv: argv is public in
        # ps. No system or user config: no credential helpers, url rewrites or proxies of
        # the agent's user apply to a task's clone. No redirects: each hop would need a check.
        config = [("http.followRedirects", "false")]
        config += [("http.curloptResolve", pin) for pin in pins]
        config += [("http.extraHeader", f"{k}: {v}") for k, v in _request_headers(ref).items()]
        env = {**task_environment(run.folder, run.settings.task_user),
               "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1",
               "GIT_CONFIG_GLOBAL": os.devnull, "GIT_ALLOW_PROTOCOL": protocols,
               "GIT_CONFIG_COUNT": str(len(config))}
        for index, (key, value) in enumerate(config):
            env[f"GIT_CONFIG_KEY_{index}"] = key
            env[f"GIT_CONFIG_VALUE_{index}"] = value
        proc = await _spawn(run, ["git", "clone", "--quiet", "--depth", "1", "--no-recurse-submodules",
                                  "--", url, temp], env=env, stdout=asyncio.subprocess.DEVNULL,
                            stderr=asyncio.subprocess.PIPE)
        errors = asyncio.ensure_future(proc.stderr.read())
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), 0.5)
                    break
                except asyncio.TimeoutError:
                    pass
                size = await asyncio.to_thread(_tree_size, str(run.folder / temp))
                if size + budget.used > budget.max_bytes:
                    budget.take(size, path)  # raises
            err = await errors
        finally:
            await _end_group(run, proc)
            errors.cancel()
        if proc.returncode != 0:
            message = err.decode(errors="replace").strip()[-500:]
            raise TaskFailed(f"fetchFiles {path!r}: git clone failed: {message}")
        budget.take(await asyncio.to_thread(_tree_size, str(run.folder / temp)), path)
        parent = folder.open_parent(path, parts, create=True)
        try:
            os.rename(temp, parts[-1], src_dir_fd=root, dst_dir_fd=parent)
        except OSError as err:
            raise TaskFailed(f"fetchFiles {path!r}: cannot be placed: {err.strerror}") from None
        finally:
            os.close(parent)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(temp, dir_fd=root)
        os.close(root)


def _safe_url(url: str) -> str:
    """The URL without inline credentials, for messages."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()
    return url


async def fetch_files(run: TaskRun) -> None:
    """Downloads `fetchFiles` into the task folder; every path is checked before any
    fetch, and again (through descriptors) at the moment it is written."""
    refs = run.data.get("fetchFiles") or []
    if not refs:
        return
    if not isinstance(refs, list):
        raise TaskFailed("fetchFiles must be a list")
    for ref in refs:
        if not isinstance(ref, dict):
            raise TaskFailed("fetchFiles entries must be objects with a path")
        relative_parts(ref.get("path"))
        if not (isinstance(ref.get("gitClone"), str) or isinstance(ref.get("get"), str)):
            raise TaskFailed(f"fetchFiles {ref['path']!r} has neither get nor gitClone")
    run.progress.set_stage("fetching files")
    budget = FetchBudget(run.settings.fetch_max_bytes)
    try:
        async with asyncio.timeout(run.settings.fetch_timeout_s) as deadline:
            for ref in refs:
                if isinstance(ref.get("gitClone"), str):
                    await _fetch_git(run, ref, budget)
                else:
                    await _fetch_http(run, ref, budget)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise TaskFailed(f"fetchFiles took longer than this agent's limit of "
                         f"{run.settings.fetch_timeout_s:g} s") from None


def _read_artifact(run: TaskRun, ref: Any) -> dict:
    relative = ref.get("path") if isinstance(ref, dict) else None
    content = TaskFolder(run.folder, None).read(relative, run.settings.artifact_max_bytes)
    return {"path": relative, "size": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
            "contentBase64": base64.b64encode(content).decode("ascii")}


async def collect_artifacts(run: TaskRun) -> list[dict]:
    refs = run.data.get("artifacts") or []
    if not refs:
        return []
    if not isinstance(refs, list):
        raise TaskFailed("artifacts must be a list")
    run.progress.set_stage("collecting artifacts")
    return await asyncio.to_thread(lambda: [_read_artifact(run, ref) for ref in refs])

# -- buckets: input files before the task, output files after -----------------------
# The server is untrusted here too: the names it gives input files become file names in
# the task folder, so each must be one plain name, and every byte is checked against the
# SHA-256 it recorded.

BUCKET_UID_RE = re.compile(r"[0-9A-Za-z-]{1,64}")


def plain_file_name(name: Any, what: str = "the server named an input file") -> str:
    """One file name, never a path: what the server names an input file must be this (and
    what a task names an output file, as the server takes no other)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name \
            or any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in name) \
            or len(name.encode(errors="surrogateescape")) > 255:
        raise TaskFailed(f"{what} {str(name)[:80]!r}: not a plain file name")
    return name


def _bucket_uids(run: TaskRun) -> tuple[list[str], str | None]:
    inputs, output = run.data.get("file_bucket") or [], run.data.get("output_bucket")
    if not isinstance(inputs, list) or not all(isinstance(u, str) and BUCKET_UID_RE.fullmatch(u)
                                               for u in inputs):
        raise TaskFailed("file_bucket must be a list of bucket ids")
    if output is not None and not (isinstance(output, str) and BUCKET_UID_RE.fullmatch(output)):
        raise TaskFailed("output_bucket must be a bucket id")
    return inputs, output


async def prepare_buckets(run: TaskRun) -> None:
    """Every file of the input buckets into the task folder, by its name; an `output`
    folder when there is an output bucket."""
    inputs, output = _bucket_uids(run)
    if output is not None:
        folder = TaskFolder(run.folder, run.settings.task_user)
        os.close(folder.open_parent(f"{OUTPUT_FOLDER}/x", [OUTPUT_FOLDER, "x"], create=True))
    if not inputs:
        return
    if run.server is None:
        raise NotExecuted("this agent cannot reach the server's buckets")
    run.progress.set_stage("fetching input files")
    budget, seen = FetchBudget(run.settings.fetch_max_bytes), set()
    try:
        for bucket_uid in inputs:
            listing = await run.server.bucket_stat(bucket_uid)
            files = listing.get("files") if isinstance(listing, dict) else None
            if not isinstance(files, list):
                raise TaskFailed(f"bucket {bucket_uid}: the server's listing has no files")
            for entry in files:
                entry = entry if isinstance(entry, dict) else {}
                name, file_uid = plain_file_name(entry.get("original_name")), entry.get("file_uid")
                if not isinstance(file_uid, str) or not BUCKET_UID_RE.fullmatch(file_uid):
                    raise TaskFailed(f"bucket {bucket_uid}: the server gave {name!r} no usable file id")
                if name in seen:
                    raise TaskFailed(f"two input files are named {name!r}; names must differ")
                seen.add(name)
                digest = hashlib.sha256()

                async def receive(content: aiohttp.StreamReader) -> None:
                    await _receive(run, name, content, budget, digest, "file_bucket")
                await run.server.download_bucket_file(run.http, bucket_uid, file_uid, receive)
                if digest.hexdigest() != entry.get("sha256"):
                    raise TaskFailed(f"input file {name!r} arrived with SHA-256 {digest.hexdigest()}, "
                                     f"not the {entry.get('sha256')!r} the server recorded")
    except ServerRefused as err:
        raise TaskFailed(f"input files of bucket {bucket_uid}: the server refused: {err}") from None
    except ServerUnavailable as err:
        raise TaskFailed(f"input files of bucket {bucket_uid}: {err}") from None


async def upload_outputs(run: TaskRun) -> list[dict]:
    """Every regular file in the task folder's `output` folder into the output bucket;
    what the server answered for each (file_uid, size, sha256, ...)."""
    _, output = _bucket_uids(run)
    if output is None or run.server is None:
        return []
    folder = TaskFolder(run.folder, None)
    try:
        parent = folder.open_parent(f"{OUTPUT_FOLDER}/x", [OUTPUT_FOLDER, "x"], create=False)
    except FileNotFoundError:
        return []
    try:
        names = sorted(os.listdir(parent))
    finally:
        os.close(parent)
    if names:
        run.progress.set_stage("uploading output files")
    uploaded = []
    for name in names:
        plain_file_name(name, f"the task named an output file in {OUTPUT_FOLDER}/")
        relative = f"{OUTPUT_FOLDER}/{name}"
        fd, size = folder.open_regular(relative, "output file")

        def opener(fd: int = fd) -> Any:
            return os.fdopen(os.dup(fd), "rb")
        try:
            answer = await run.server.upload_bucket_file(run.http, output, name, opener, size)
        except ServerRefused as err:
            raise TaskFailed(f"output file {relative!r}: the server refused it: {err}") from None
        except ServerUnavailable as err:
            raise TaskFailed(f"output file {relative!r}: {err}") from None
        finally:
            os.close(fd)
        uploaded.append({"name": name, "bucket_uid": output,
                         **{k: answer.get(k) for k in ("file_uid", "size", "sha256")
                            if isinstance(answer, dict)}})
    return uploaded


def _positive_number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def _with_files(output: Any, **files: list[dict]) -> Any:
    """Artifacts go in `output.artifacts`, uploaded bucket files in `output.output_files`
    (the client downloads them by id); an output that is not an object is kept under `result`."""
    files = {name: listed for name, listed in files.items() if listed}
    if not files:
        return output
    if not isinstance(output, dict):
        output = {"result": output}
    return {**output, **files}


@dataclass
class Outcome:
    """A finished task as the resolve call wants it: the wire `status` and the `output`.
    `note` replaces the kind in the agent's own log (a cancel is reported as a failure)."""

    status: dict
    output: Any = None
    note: str | None = None

    @property
    def kind(self) -> str:
        return next(iter(self.status))


def _without_paths(text: str, run: TaskRun) -> str:
    """A message as the client sees it: paths relative to the task folder, never where the
    agent keeps its work."""
    folder, root = str(run.folder), str(run.settings.work_root)
    return text.replace(folder + "/", "").replace(folder, ".").replace(root, "<work>")


async def execute_task(run: TaskRun, executor: Executor | None) -> Outcome:
    """Runs one task to an Outcome. This is the one place where exceptions become results,
    so a task can fail in any way without the agent noticing beyond a log line.
    `runtimeSecs` (extension) bounds fetching and running; cancelling kills what started."""
    started = time.monotonic()
    runtime_s = _positive_number(run.data.get("runtimeSecs"))
    try:
        if executor is None:
            raise NotExecuted(f"this agent has no executor for {run.capability!r}")
        try:
            async with asyncio.timeout(runtime_s) as deadline:
                await fetch_files(run)
                await prepare_buckets(run)
                run.progress.set_stage("running", deferred=True)
                run.executor_started = True
                output = await executor(run)
        except TimeoutError:
            if not deadline.expired():
                raise  # the executor's own timeout, not ours
            raise TaskFailed(f"ran past runtimeSecs ({runtime_s:g} s) and was stopped") from None
        artifacts = await collect_artifacts(run)
        uploaded = await upload_outputs(run)
        return Outcome({"success": time.monotonic() - started},
                       _with_files(output, artifacts=artifacts, output_files=uploaded))
    except NotExecuted as err:
        return Outcome({"notExecuted": str(err)})
    except TaskFailed as err:
        return Outcome({"failure": [_without_paths(err.message, run), time.monotonic() - started]},
                       err.output)
    except asyncio.CancelledError:
        raise
    except Exception as err:  # an executor bug must not take the agent down
        log.exception("task %s/%s: executor raised", run.capability, run.task_id["id"])
        message = _without_paths(f"{type(err).__name__}: {err}", run)
        return Outcome({"failure": [message, time.monotonic() - started]})
    finally:
        await run.progress.close()


# ============================================================================ serve loop

class Agent:
    """Serves tasks until told to stop: long-polls while a slot is free, takes what comes,
    runs each task as an asyncio task, and reports it."""

    def __init__(self, client: ServerClient, identity: AgentIdentity, settings: Settings,
                 session: aiohttp.ClientSession, fetch_session: aiohttp.ClientSession | None = None,
                 reaper: TaskReaper | None = None):
        self.client = client
        self.identity = identity
        self.settings = settings
        self.session = session
        self.fetch_session = fetch_session
        self.reaper = reaper
        # Announcing a capability without an executor would draw its tasks here only to
        # hand them back as notExecuted (and a restartable one could come straight back).
        self.announced = [c for c in identity.capabilities if find_executor(c)]
        for capability in identity.capabilities:
            if capability not in self.announced:
                log.warning("no executor for %s: not announcing it", capability)
        self.served = {base_capability(c) for c in self.announced}
        self.slots = asyncio.Semaphore(identity.capacity)
        self.handlers: set[asyncio.Task] = set()
        self.executions: dict[str, asyncio.Task] = {}
        self.cancel_reasons: dict[str, str] = {}   # task id -> why the server stopped it
        self.long_running: set[str] = set()        # executing for over running_after_s
        self.busy = asyncio.Event()                # set while long_running has any: watch cancels
        # Task folders are removed in a thread, off the path to the next task; `folders`
        # holds those not yet gone, so a stop can finish the job.
        self.folders: set[Path] = set()
        self.cleanups: dict[str, asyncio.Future] = {}  # task id -> its folder's removal
        self.stopping = asyncio.Event()
        self.forced = asyncio.Event()
        self.report_deadline: float | None = None   # set once the grace period is over
        # Tasks the server assigned here and not yet resolved (id -> cap): the holding report.
        self.holding: dict[str, str] = {}
        self.logged_in = asyncio.Event()           # a (re)login happened: report at once
        self.revoked: str | None = None            # why serve stopped: the credential is gone
        client.on_login = self.logged_in.set
        client.on_revoked = self.credential_revoked
        self.poll: asyncio.Future | None = None    # the long poll in flight
        save = client.on_new_identity

        def identity_changed(new: AgentIdentity) -> None:
            # A poll sent with the old credential could still be handed a task for the old
            # agent record, one this identity could never report: drop it (the server hands
            # back a task whose poll went away).
            if save is not None:
                save(new)
            self.identity = new
            self._drop_poll()
        client.on_new_identity = identity_changed
        # A long poll cut because its server was found gone (a ping timed out) is sent
        # again at once, with no warning and no backoff: nothing went wrong with it.
        client.http.on_move = self._drop_poll

    def _drop_poll(self) -> None:
        if self.poll is not None:
            self.poll.cancel()

    def request_stop(self) -> None:
        """First call: stop taking work and let tasks finish. Second call: do not wait."""
        if self.stopping.is_set():
            log.info("second stop signal: not waiting for running tasks")
            self.forced.set()
        else:
            log.info("stop signal: taking no new tasks")
        self.stopping.set()

    async def _retry_later(self, err: Exception, backoff: Backoff) -> bool:
        """After a server error: False when this agent's credential is revoked (give up),
        else waits the next backoff delay (or until a stop) and answers True."""
        if self.revoked:
            return False
        delay = backoff.next_delay()
        log.warning("server: %s; retrying in %.1f s", err, delay)
        await self._until_stopped(asyncio.sleep(delay))
        return True

    async def _until_stopped(self, awaitable: Awaitable) -> tuple[bool, Any]:
        """Awaits `awaitable` unless a stop comes first; returns (finished, result)."""
        work = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if work.done():
            return True, work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        return False, None

    def credential_revoked(self, err: CredentialRevoked) -> None:
        """Only the operator can help now: stop at once and say what to run."""
        if self.revoked is None:
            self.revoked = str(err)
            log.error("%s", err)
        self.stopping.set()
        self.forced.set()

    async def serve(self) -> None:
        backoff = Backoff()
        await self._announce(backoff)
        if self.revoked:
            return
        helpers = [asyncio.create_task(self._heartbeat())]
        try:
            pushed = self.settings.transport == "ws" and await self._push_loop(backoff)
            if not pushed and not self.stopping.is_set():
                if self.settings.use_extensions:
                    helpers.append(asyncio.create_task(self._watch_cancels()))
                await self._poll_loop(backoff)
            await self._drain()
            if self.cleanups:
                await asyncio.wait(set(self.cleanups.values()), timeout=FINAL_REPORT_S)
        finally:
            for helper in helpers:
                helper.cancel()
            if self.client.channel is not None:
                await self.client.channel.shut()
            for folder in list(self.folders):  # cleanups cut short by the stop: finish them here
                shutil.rmtree(folder, ignore_errors=True)
            self.folders.clear()

    async def _push_loop(self, backoff: Backoff) -> bool:
        """Serve what the server pushes over the agent WebSocket, reconnecting with backoff
        until a stop. False at once when the server has no socket (the caller polls)."""
        while not self.stopping.is_set():
            try:
                finished, channel = await self._until_stopped(self.client.open_channel())
            except NoPushChannel as err:
                log.info("server has no agent WebSocket (%s); polling over HTTP", err)
                return False
            except (ServerUnavailable, ServerRefused) as err:
                if not await self._retry_later(err, backoff):
                    break
                continue
            if not finished:
                break
            backoff.reset()
            self.logged_in.set()  # a holding report at once: what this agent still runs
            log.info("connected to the server's agent WebSocket")
            await self._until_stopped(self._serve_pushes(channel))
            # A stop closes the socket, and the server takes back what never started here.
            await channel.close()
            if not self.stopping.is_set():
                log.warning("agent WebSocket closed; reconnecting")
                await self._until_stopped(asyncio.sleep(backoff.next_delay()))
        return True

    async def _serve_pushes(self, channel: PushChannel) -> None:
        while (frame := await channel.pushes.get()) is not None:
            kind = frame.get("type")
            if kind == "task" and isinstance(frame.get("task"), dict):
                self._start_pushed(channel, frame["task"])
            elif kind == "cancel" and isinstance(frame.get("taskId"), dict):
                self._cancel_execution(frame["taskId"].get("id"))

    def _start_pushed(self, channel: PushChannel, task: dict) -> None:
        """A pushed task runs at once (the server pushes only as capacity allows); its
        first report marks it started, so a dropped socket does not hand it to another
        agent. One already running here (pushed again after a reconnect) is only marked."""
        task_id = task.get("id")
        if not (isinstance(task_id, dict) and isinstance(task_id.get("cap"), str)
                and isinstance(task_id.get("id"), str)) or self.stopping.is_set():
            return  # not started: the server takes it back when the socket closes
        self._mark_started(channel, task_id)
        if task_id["id"] in self.holding:
            return
        handler = asyncio.create_task(self._handle(task))
        self.handlers.add(handler)
        handler.add_done_callback(self.handlers.discard)

    def _mark_started(self, channel: PushChannel, task_id: dict) -> None:
        async def send() -> None:
            with contextlib.suppress(ServerUnavailable, ServerRefused):
                await channel.request("update_progress", {"id": task_id, "stage": "starting"})
        # In order on the socket, ahead of the task's other reports.
        self.handlers.add(marker := asyncio.ensure_future(send()))
        marker.add_done_callback(self.handlers.discard)

    async def _watch_cancels(self) -> None:
        """Extension: while tasks run, long-poll for the ones the server wants stopped (a
        quiet task sends no progress, so the progress answers alone would not tell it)."""
        backoff = Backoff()
        while True:
            await self.busy.wait()
            try:
                requested = await self.client.cancel_requests(self.settings.poll_wait_s)
                backoff.reset()
            except ServerRefused as err:
                if err.status in (404, 405):
                    log.info("server has no cancel requests route; relying on progress answers")
                    return
                await asyncio.sleep(backoff.next_delay())
                continue
            except ServerUnavailable:
                await asyncio.sleep(backoff.next_delay())
                continue
            fresh = [t for t in requested if isinstance(t, dict) and t.get("id") in self.executions
                     and t["id"] not in self.cancel_reasons]
            for task_id in fresh:
                self._cancel_execution(task_id["id"])
            if requested and not fresh:
                # Already stopping those; their reports end the requests. Do not spin.
                await asyncio.sleep(PROGRESS_INTERVAL_S)

    def _cancel_execution(self, task_id: str) -> None:
        execution = self.executions.get(task_id)
        # An execution that is already reporting (the progress answer can arrive during its
        # final flush) has a result worth keeping.
        if execution is None or execution.done() or execution is asyncio.current_task():
            return
        if task_id not in self.cancel_reasons:
            log.info("task %s: the server asked to stop it", task_id)
            self.cancel_reasons[task_id] = "stopped at the server's request (canceled or timed out)"
            execution.cancel()

    async def _heartbeat(self) -> None:
        """Every heartbeat (whatever else runs, all slots busy included) and right after
        each (re)login: a ping that says which tasks this agent holds, so the server
        releases any it thinks we hold but we do not (a take whose answer was lost)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.logged_in.wait(), self.settings.heartbeat_s)
            self.logged_in.clear()
            holding = [{"cap": cap, "id": uid} for uid, cap in self.holding.items()]
            try:
                answer = await self.client.ping(holding)
            except (ServerUnavailable, ServerRefused) as err:
                log.debug("heartbeat: %s", err)
                continue
            released = answer.get("released") if isinstance(answer, dict) else None
            if released:
                log.info("server released %d task(s) this agent does not hold", len(released))

    async def _poll_loop(self, backoff: Backoff) -> None:
        while not self.stopping.is_set():
            finished, _ = await self._until_stopped(self.slots.acquire())
            if not finished:
                break
            poll = self.poll = asyncio.ensure_future(
                self.client.poll_task(self.settings.poll_wait_s, take=self.settings.use_extensions))
            try:
                try:
                    finished, task = await self._until_stopped(poll)
                finally:
                    self.poll = None
                if not finished or not task:
                    task = None
                elif "agentId" not in task:  # unassigned: the original two-step protocol
                    task = None if self.stopping.is_set() else await self.client.take_task(task["id"])
            except asyncio.CancelledError:
                if not poll.cancelled() or asyncio.current_task().cancelling():
                    raise
                self.slots.release()  # dropped after a new registration: poll again
                continue
            except (ServerUnavailable, ServerRefused) as err:
                self.slots.release()
                if not await self._retry_later(err, backoff):
                    break
                continue
            backoff.reset()
            if task is None:
                self.slots.release()
                continue
            handler = asyncio.create_task(self._handle(task))
            self.handlers.add(handler)
            handler.add_done_callback(self._handler_done)

    def _handler_done(self, handler: asyncio.Task) -> None:
        self.handlers.discard(handler)
        self.slots.release()

    async def _announce(self, backoff: Backoff) -> None:
        """Refreshes capabilities and systemInfo on the server; also proves the login works."""
        while not self.stopping.is_set():
            try:
                await self.client.update_info(self.announced, system_info())
                log.info("agent %s online, serving %s (capacity %d)", self.client.identity.agent_id,
                         ", ".join(sorted(self.served)), self.identity.capacity)
                backoff.reset()
                return
            except (ServerUnavailable, ServerRefused) as err:
                if not await self._retry_later(err, backoff):
                    return

    async def _handle(self, assigned: dict | None) -> None:
        """Runs a taken task and reports it; a report may bring the next task (extension),
        which then runs in the same slot."""
        while assigned is not None:
            task_id = assigned.get("id") if isinstance(assigned, dict) else None
            if not (isinstance(task_id, dict) and isinstance(task_id.get("cap"), str)
                    and isinstance(task_id.get("id"), str)):
                log.warning("the server handed over a task without a usable id; ignored")
                return
            self.holding[task_id["id"]] = task_id["cap"]
            try:
                outcome, progress = await self._execute(assigned)
                assigned = await self._report(task_id, outcome, progress)
            finally:
                self.holding.pop(task_id["id"], None)

    async def _execute(self, assigned: dict) -> tuple[Outcome, ProgressReporter]:
        task_id = assigned["id"]
        uid = task_id["id"]
        log.debug("task %s/%s taken", task_id["cap"], uid)
        started = time.monotonic()
        progress = ProgressReporter(self._progress_sender(task_id),
                                    self.settings.progress_interval_s,
                                    self.settings.running_after_s)
        if not valid_task_id(task_id):  # it would name a folder: `../victim` must not
            log.warning("task id %r from the server is not a ULID; not run", uid[:64])
            return Outcome({"notExecuted": "the task id is not a ULID; this agent did not run it"}), progress
        parent, folder = task_folders(self.settings.work_root, uid)
        data = assigned.get("data")
        data = data if isinstance(data, dict) else {}
        run = TaskRun(task_id=task_id, data=data, folder=folder, settings=self.settings,
                      http=self.session, progress=progress, fetch_http=self.fetch_session,
                      reaper=self.reaper, server=self.client)
        executor = find_executor(task_id["cap"]) if task_id["cap"] in self.served else None
        with_folder = needs_folder(executor, data)
        if with_folder:
            earlier = self.cleanups.get(uid)
            if earlier is not None:  # the same task ran here before: let its removal finish
                await asyncio.wait({earlier})
            self.folders.add(parent)
            try:
                await asyncio.to_thread(_fresh_folder, parent, folder, self.settings.task_user)
            except OSError as err:
                self._remove_folder_later(uid, parent)
                reason = f"cannot create the task folder: {err.strerror}"
                return Outcome({"failure": [reason, 0.0]}), progress
        execution = asyncio.create_task(execute_task(run, executor))
        self.executions[uid] = execution
        # Only a task that runs for a while is worth watching for cancel requests.
        watch = asyncio.get_running_loop().call_later(
            self.settings.running_after_s, self._mark_long_running, uid)
        try:
            return await execution, progress
        except asyncio.CancelledError:
            # Executions are cancelled by the drain (grace over) or at the server's request.
            elapsed = time.monotonic() - started
            reason = self.cancel_reasons.get(task_id["id"])
            if reason:
                outcome = Outcome({"failure": [reason, elapsed]}, note="stopped as the server asked")
            elif run.executor_started:
                outcome = Outcome({"failure": ["agent shut down before the task finished", elapsed]})
            else:
                outcome = Outcome({"notExecuted": "agent shut down before the task started"})
            with contextlib.suppress(Exception):
                await asyncio.wait_for(progress.close(), 2)
            return outcome, progress
        finally:
            watch.cancel()
            self.executions.pop(uid, None)
            self.cancel_reasons.pop(uid, None)
            self.long_running.discard(uid)
            if not self.long_running:
                self.busy.clear()
            if with_folder:
                self._remove_folder_later(uid, parent)

    def _mark_long_running(self, uid: str) -> None:
        if uid in self.executions:
            self.long_running.add(uid)
            self.busy.set()

    def _remove_folder_later(self, uid: str, folder: Path) -> None:
        """Removes a task folder in a thread: the next task need not wait for it."""
        cleanup = asyncio.ensure_future(
            asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True))
        self.cleanups[uid] = cleanup

        def removed(_: asyncio.Future) -> None:
            self.folders.discard(folder)
            if self.cleanups.get(uid) is cleanup:
                del self.cleanups[uid]
        cleanup.add_done_callback(removed)

    def _progress_sender(self, task_id: dict) -> SendProgress:
        async def send(stage: str | None, text: str | None) -> None:
            answer = await self.client.report_progress(task_id, stage, text)
            if isinstance(answer, dict) and answer.get("cancel"):  # extension
                self._cancel_execution(task_id["id"])
        return send

    async def _report(self, task_id: dict, outcome: Outcome,
                      progress: ProgressReporter | None = None) -> dict | None:
        """Delivers a result, retrying through server outages until the shutdown deadline.
        Log text the outage held back goes first: the server refuses progress after a result.
        Returns the next task when the server handed one over with the answer."""
        label = f"{task_id['cap']}/{task_id['id']}"
        backoff = Backoff()
        sent_before = False
        while True:
            resolving = False
            try:
                if progress is not None and progress.pending:
                    await progress.flush()
                    if progress.pending:  # the server is still away: the log goes first
                        raise ServerUnavailable("the log text held back by the outage is not delivered yet")
                resolving = True
                take_next = self.settings.use_extensions and not self.stopping.is_set()
                following = await self.client.resolve_task(task_id, outcome.status,
                                                            outcome.output, take_next)
                log.info("task %s resolved: %s", label, outcome.note or outcome.kind)
                return following if isinstance(following, dict) else None
            except ServerRefused as err:
                if err.status == 413 and outcome.kind == "success":
                    message = "the output is larger than the server accepts"
                    outcome = Outcome({"failure": [message, outcome.status["success"]]},
                                      {"error": message})
                    continue
                if err.status == 409 and sent_before:
                    # An earlier send may have landed with its answer lost (the server
                    # died after writing it, a failover): a report sent again finds the
                    # task ended. Not a refusal of this agent's result.
                    log.info("task %s ended before its report was sent again (%s)", label, err.message)
                    return None
                log.warning("task %s: result refused: %s", label, err)
                return None
            except ServerUnavailable as err:
                sent_before = sent_before or resolving
                delay = backoff.next_delay()
                if self.report_deadline is not None and time.monotonic() + delay > self.report_deadline:
                    log.error("task %s: result not delivered before shutdown: %s", label, err)
                    return None
                log.warning("task %s: result not delivered (%s); retrying in %.1f s", label, err, delay)
                await asyncio.sleep(delay)

    async def _drain(self) -> None:
        """After a stop: running tasks get the grace period, then are cancelled and reported."""
        if self.handlers:
            log.info("waiting up to %.0f s for %d running task(s)", self.settings.grace_s,
                     len(self.handlers))
            all_done = asyncio.ensure_future(asyncio.wait(set(self.handlers)))
            forced = asyncio.ensure_future(self.forced.wait())
            await asyncio.wait({all_done, forced}, timeout=self.settings.grace_s,
                               return_when=asyncio.FIRST_COMPLETED)
            all_done.cancel()
            forced.cancel()
        self.report_deadline = time.monotonic() + FINAL_REPORT_S
        for execution in list(self.executions.values()):
            execution.cancel()
        if self.handlers:
            await asyncio.wait(set(self.handlers), timeout=FINAL_REPORT_S + 1)
        log.info("agent stopped")


class LogShipper(logging.Handler):
    """Sends the agent's own log lines at `level` and above to the server (its agent
    logs), from a bounded queue: when the server is away the oldest lines go first,
    and a server without the route (404/405) ends the shipping."""

    SEVERITY = {logging.CRITICAL: "CRITICAL", logging.ERROR: "ERROR", logging.WARNING: "ERROR"}
    KEEP = 500
    TEXT_MAX = 8000

    def __init__(self, client: ServerClient, level: int):
        super().__init__(level)
        self.client = client
        self.lines: collections.deque[tuple[str, str]] = collections.deque(maxlen=self.KEEP)
        self.ready = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        severity = self.SEVERITY.get(record.levelno, "INFO")
        self.lines.append((severity, self.format(record)[-self.TEXT_MAX:]))
        self.loop.call_soon_threadsafe(self.ready.set)  # a line may come from a worker thread

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.lines:
                severity, text = self.lines[0]
                try:
                    await self.client.send_log(severity, text)
                except ServerRefused as err:
                    if err.status in (404, 405):
                        return  # this server keeps no agent logs
                except ServerUnavailable:
                    await asyncio.sleep(backoff.next_delay())
                    continue
                backoff.reset()
                if self.lines and self.lines[0] == (severity, text):
                    self.lines.popleft()


# ============================================================================ CLI

def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="offload-agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=DEFAULT_CONFIG_PATH,
                       help=f"identity file (default {DEFAULT_CONFIG_PATH})")

    register = commands.add_parser("register", help="register this machine with a server")
    server_env = os.environ.get("OFFLOAD_AGENT_SERVER")
    register.add_argument("--server", required=not server_env, default=server_env,
                          help="server URL, e.g. http://host:3069; several comma-separated "
                               "(servers sharing a PostgreSQL database: the agent follows the "
                               "leader); or env OFFLOAD_AGENT_SERVER")
    register.add_argument("--key", default=os.environ.get("OFFLOAD_AGENT_KEY"),
                          help="agent registration key (or env OFFLOAD_AGENT_KEY)")
    register.add_argument("--caps", nargs="+", action="extend", metavar="CAP",
                          help=f"capabilities to serve (default: {' '.join(DEFAULT_CAPABILITIES)})")
    register.add_argument("--tier", type=int, default=0, help="0-255; higher tiers are preferred")
    register.add_argument("--capacity", type=int, default=1, help="tasks run at once")
    register.add_argument("--name", default=platform.node()[:50] or None,
                          help="name shown in the console (at most 50 characters; default: "
                               "this machine's host name)")
    add_config(register)

    serve = commands.add_parser("serve", help="serve tasks until SIGINT/SIGTERM")
    serve.add_argument("--server", default=server_env,
                       help="override the saved server URL(s), comma-separated (or env "
                            "OFFLOAD_AGENT_SERVER)")
    serve.add_argument("--work-dir", help="where per-task folders go (default: a temp folder)")
    serve.add_argument("--grace", type=float, default=GRACE_S,
                       help=f"seconds running tasks may finish after SIGTERM (default {GRACE_S:.0f})")
    serve.add_argument("--poll-wait", type=int, default=POLL_WAIT_S,
                       help=f"long-poll seconds asked of the server (default {POLL_WAIT_S})")
    serve.add_argument("--artifact-max-bytes", type=int, default=ARTIFACT_MAX_BYTES)
    serve.add_argument("--allow-local-git", action="store_true",
                       help="let gitClone use file:// URLs (tasks could read local repositories)")
    serve.add_argument("--original-protocol", action="store_true",
                       help="use only the original January protocol over HTTP: poll then take, "
                            "no cancel requests (implies --transport http)")
    serve.add_argument("--ship-logs", choices=("warning", "info", "off"), default="warning",
                       help="send this agent's own log lines at this level and above to the "
                            "server's agent logs (default warning)")
    serve.add_argument("--transport", choices=("ws", "http"), default="ws",
                       help="ws (default): the server pushes tasks over the agent WebSocket, "
                            "falling back to HTTP when it has none; http: long polls")
    serve.add_argument("--key", default=os.environ.get("OFFLOAD_AGENT_KEY"),
                       help="agent registration key (or env OFFLOAD_AGENT_KEY): lets the agent "
                            "register again by itself when the server no longer knows it; "
                            "never saved")
    serve.add_argument("--heartbeat", type=float, default=HEARTBEAT_S, metavar="S",
                       help=f"seconds between holding reports, declared to the server (1-60, "
                            f"default {HEARTBEAT_S:g})")
    serve.add_argument("--allow-fetch", action="append", metavar="HOST|CIDR",
                       default=os.environ.get("OFFLOAD_AGENT_ALLOW_FETCH", "").replace(",", " ").split(),
                       help="let fetchFiles reach this non-public host or network (repeatable; "
                            "or env OFFLOAD_AGENT_ALLOW_FETCH, comma-separated)")
    serve.add_argument("--fetch-max-bytes", type=int, default=FETCH_MAX_BYTES,
                       help=f"bytes one task's fetchFiles may bring in (default {FETCH_MAX_BYTES})")
    serve.add_argument("--fetch-timeout", type=float, default=FETCH_TIMEOUT_S, metavar="S",
                       help=f"seconds one task's fetchFiles may take (default {FETCH_TIMEOUT_S:g})")
    serve.add_argument("--task-user", metavar="USER",
                       help="run tasks as this user (the agent must run as root)")
    serve.add_argument("--llm-max-ctx", type=int, default=LLM_MAX_CTX,
                       help=f"largest options.num_ctx an llm task may ask (default {LLM_MAX_CTX})")
    serve.add_argument("--llm-max-predict", type=int, default=LLM_MAX_PREDICT,
                       help=f"largest options.num_predict (default {LLM_MAX_PREDICT})")
    add_config(serve)

    rotate = commands.add_parser("rotate-key", help="replace this agent's login secret with a "
                                                     "fresh one from the server")
    add_config(rotate)

    commands.add_parser("sysinfo", help="print the system info this agent reports")
    return parser.parse_args(argv)


def hide_from_proc(secret: str | None) -> None:
    """Overwrites `secret` where /proc/<pid>/environ and /proc/<pid>/cmdline read it: the
    process's original argument and environment areas. Removing it from os.environ alone
    leaves those bytes there for anyone who may read this process's /proc entries."""
    if not secret or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        # /proc/self/stat fields 48-51 (after the command name, field 3 is at index 0)
        bounds = [int(fields[n - 3]) for n in (48, 49, 50, 51)]
    except (OSError, ValueError, IndexError):
        return
    needle = secret.encode()
    for start, end in ((bounds[0], bounds[1]), (bounds[2], bounds[3])):
        if not 0 < start < end:
            continue
        area = ctypes.string_at(start, end - start)
        at = area.find(needle)
        while at != -1:
            ctypes.memset(start + at, ord("*"), len(needle))
            at = area.find(needle, at + len(needle))


def take_registration_key(args: argparse.Namespace) -> str | None:
    """The registration key, then gone from this process's environment and /proc entries:
    tasks and other local users must not find it there."""
    key = args.key
    os.environ.pop("OFFLOAD_AGENT_KEY", None)
    hide_from_proc(key)
    return key


async def _register(args: argparse.Namespace) -> int:
    args.key = take_registration_key(args)
    if not args.key:
        print("register needs --key or OFFLOAD_AGENT_KEY", file=sys.stderr)
        return 2
    if not 0 <= args.tier <= 255 or args.capacity < 1:
        print("--tier must be 0-255 and --capacity at least 1", file=sys.stderr)
        return 2
    if args.name is not None and len(args.name) > 50:
        print("--name must be at most 50 characters", file=sys.stderr)
        return 2
    capabilities = list(dict.fromkeys(args.caps or DEFAULT_CAPABILITIES))
    for capability in capabilities:
        if find_executor(capability) is None:
            log.warning("no executor for %s: its tasks will be reported notExecuted", capability)
    try:
        client = ServerClient(args.server)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        answer = await client.register(args.key, capabilities, args.tier, args.capacity,
                                       system_info(), args.name)
        identity = AgentIdentity(server=args.server, agent_id=answer["agentId"],
                                 key=answer["key"], capabilities=capabilities,
                                 tier=args.tier, capacity=args.capacity)
        client.identity = identity
        await client.authenticate()
        await client.ping()
    except (ServerUnavailable, ServerRefused) as err:
        print(f"registration failed: {err}", file=sys.stderr)
        return 1
    finally:
        await client.http.close()
    save_identity(Path(args.config), identity)
    print(f"registered agent {identity.agent_id} serving {', '.join(capabilities)}; "
          f"identity saved to {args.config}")
    return 0


async def _rotate_key(args: argparse.Namespace) -> int:
    """The server replaces the secret at once, so the new one is saved (synced) before
    anything else; a server without the route changes nothing."""
    config_path = Path(args.config)
    try:
        identity = load_identity(config_path)
        client = ServerClient(identity.server, identity)
    except (OSError, ValueError, KeyError) as err:
        print(f"cannot use {args.config} ({err}); run `register` first", file=sys.stderr)
        return 2
    try:
        answer = await client.rotate_key()
    except ServerRefused as err:
        if err.status in (404, 405):
            print("this server cannot rotate an agent's key; `register` again for a new identity",
                  file=sys.stderr)
        else:
            print(f"key rotation refused: {err}", file=sys.stderr)
        return 1
    except ServerUnavailable as err:
        print(f"key rotation failed: {err}", file=sys.stderr)
        return 1
    finally:
        await client.http.close()
    if not isinstance(answer, dict) or answer.get("agentId") != identity.agent_id \
            or not isinstance(answer.get("key"), str):
        print("key rotation: the server's answer carries no key for this agent", file=sys.stderr)
        return 1
    save_identity(config_path, dataclasses.replace(identity, key=answer["key"]))
    print(f"agent {identity.agent_id}: new login secret saved to {args.config}")
    return 0


def _serve_settings(args: argparse.Namespace, work_root: Path) -> Settings:
    """Settings from argv; ValueError with a message for the operator when one is wrong."""
    if not 1 <= args.heartbeat <= 60:
        raise ValueError("--heartbeat must be from 1 to 60 seconds")
    FetchPolicy(tuple(args.allow_fetch))  # refuses an entry it cannot read
    task_user = None
    if args.task_user:
        if os.geteuid() != 0:
            raise ValueError("--task-user needs the agent to run as root")
        try:
            task_user = TaskUser.lookup(args.task_user)
        except KeyError:
            raise ValueError(f"--task-user {args.task_user!r}: no such user") from None
        if task_user.uid == 0:
            raise ValueError("--task-user must not be root")
    elif os.geteuid() == 0:
        log.warning("running as root without --task-user: tasks run as root")
    return Settings(
        work_root=work_root, ollama_url=os.environ.get("OLLAMA_URL", DEFAULT_OLLAMA_URL),
        grace_s=args.grace, poll_wait_s=args.poll_wait,
        artifact_max_bytes=args.artifact_max_bytes, allow_local_git=args.allow_local_git,
        use_extensions=not args.original_protocol,
        transport="http" if args.original_protocol else args.transport, allow_fetch=tuple(args.allow_fetch),
        fetch_max_bytes=args.fetch_max_bytes, fetch_timeout_s=args.fetch_timeout,
        task_user=task_user, heartbeat_s=args.heartbeat, llm_max_ctx=args.llm_max_ctx,
        llm_max_predict=args.llm_max_predict)


async def _serve(args: argparse.Namespace) -> int:
    registration_key = take_registration_key(args)
    config_path = Path(args.config)
    try:
        identity = load_identity(config_path)
    except (OSError, ValueError, KeyError) as err:
        print(f"cannot read {args.config} ({err}); run `register` first", file=sys.stderr)
        return 2
    if args.server:
        identity = dataclasses.replace(identity, server=args.server)

    def saved(new: AgentIdentity) -> None:
        save_identity(config_path, new)
        log.info("new identity saved to %s", config_path)

    try:
        client = ServerClient(identity.server, identity, registration_key=registration_key,
                              heartbeat_s=args.heartbeat, on_new_identity=saved)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if args.config != DEFAULT_CONFIG_PATH:
        client.register_hint = f" --config {args.config}"
    if not any(find_executor(c) for c in identity.capabilities):
        print(f"none of {', '.join(identity.capabilities)} has an executor here; "
              f"register with some of: {', '.join([*EXECUTORS, 'llm.<model>'])}", file=sys.stderr)
        return 2
    temp_root = None if args.work_dir else Path(tempfile.mkdtemp(prefix="offload-agent-"))
    work_root = Path(args.work_dir).resolve() if args.work_dir else temp_root
    try:
        settings = _serve_settings(args, work_root)
    except ValueError as err:
        print(err, file=sys.stderr)
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
        return 2
    work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    reaper = TaskReaper()
    agent = None
    try:
        async with aiohttp.ClientSession() as session, make_fetch_session(settings) as fetch_session:
            shipper = shipping = None
            if args.ship_logs != "off":
                shipper = LogShipper(client, logging.INFO if args.ship_logs == "info" else logging.WARNING)
                log.addHandler(shipper)
                shipping = asyncio.create_task(shipper.run())
            agent = Agent(client, identity, settings, session, fetch_session, reaper)
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, agent.request_stop)
            try:
                await agent.serve()
            finally:
                if shipper is not None:
                    log.removeHandler(shipper)
                    shipping.cancel()
                await client.http.close()
    finally:
        reaper.close()
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
    if agent is not None and agent.revoked:
        print(agent.revoked, file=sys.stderr)
        return EXIT_CREDENTIAL_REVOKED
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "sysinfo":
        print(json.dumps(system_info(), indent=2))
        return 0
    if args.command == "register":
        return asyncio.run(_register(args))
    if args.command == "rotate-key":
        return asyncio.run(_rotate_key(args))
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
