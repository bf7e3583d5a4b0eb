"""Shared fixtures and helpers, by layer: the pure core (explicit `now`), the HTTP API
in-process (`create_app(config)` under aiohttp's test client), and real server
processes on a free 127.0.0.1 port with a temp data folder; and a throwaway PostgreSQL
cluster (one per test process, a fresh schema per test) for the PostgreSQL store.

Tests that need no server process, browser or agent process are marked `unit`
(`make test-unit` runs only them)."""
import asyncio
import ctypes
import dataclasses
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from offloadmq import Config, Hub, create_app, parse_submission

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=30):
    """A tiny stdlib client so black-box tests share no code with the project.
    Returns (status, parsed JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, raw.decode(errors="replace")


class ServerProcess:
    """`python offloadmq.py` as a child process; stopped by its pid."""

    def __init__(self, data_dir: Path, extra_env=None, extra_args=(), script=None, preexec_fn=None):
        self.data = Path(data_dir)
        self.script = script or ROOT / "offloadmq.py"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.agent_key = "ak-" + secrets.token_hex(8)
        self.client_key = "ck-" + secrets.token_hex(8)
        self.mgmt_token = "mt-" + secrets.token_hex(8)
        self.extra_env = extra_env or {}
        self.extra_args = list(extra_args)
        self.preexec_fn = preexec_fn  # runs in the child before the server (e.g. setrlimit)
        self.log_path = self.data.parent / f"server-{self.port}.log"
        self.proc = None

    def start(self, timeout=15):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOADMQ_")}
        env.update(
            AGENT_API_KEYS=self.agent_key,
            CLIENT_API_KEYS=self.client_key,
            MGMT_TOKEN=self.mgmt_token,
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), "--host", "127.0.0.1",
             "--port", str(self.port), "--data", str(self.data), *self.extra_args],
            cwd=str(self.data.parent), env=env, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=self.preexec_fn,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _ = http("GET", self.url + "/health", timeout=1)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not start:\n" + self.output())

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=15)
        if getattr(self, "log", None):
            self.log.close()

    def stop(self):
        self.kill(signal.SIGTERM)

    def restart(self):
        self.kill()
        return self.start()

    def submit(self, capability, payload=None, **fields):
        """Submit over HTTP with the client key; the TaskId."""
        status, answer = http("POST", self.url + "/api/task/submit",
                              {"capability": capability, "payload": payload, **fields}, self.client)
        assert status in (201, 202), answer
        return answer["id"]

    def new_agent(self, caps, capacity=1, **extra):
        """Register and log in an agent over HTTP; its Authorization header."""
        status, reg = http("POST", self.url + "/agent/register", {
            "apiKey": self.agent_key, "capabilities": list(caps), "tier": 0,
            "capacity": capacity, "systemInfo": {"os": "linux"}, **extra})
        assert status == 200, reg
        status, auth = http("POST", self.url + "/agent/auth",
                            {"agentId": reg["agentId"], "key": reg["key"]})
        assert status == 200, auth
        return {"Authorization": "Bearer " + auth["token"]}

    # Convenience headers for the three auth schemes.
    @property
    def client(self):
        return {"X-API-Key": self.client_key}

    @property
    def mgmt(self):
        return {"X-Mgmt-Token": self.mgmt_token}



def server_role(srv) -> str | None:
    """"leader" or "standby" as `/health/ready` says; None when it does not answer."""
    try:
        status, body = http("GET", srv.url + "/health/ready", timeout=2)
    except OSError:
        return None
    return body.get("role") if status in (200, 503) and isinstance(body, dict) and \
        (status == 200) == bool(body.get("ready")) else None


def first_2xx_after(since: float, srv, timeout=30) -> float:
    """Seconds from `since` (a kill) to the first 2xx of an API route, which standbys refuse."""
    while time.monotonic() < since + timeout:
        try:
            status, _ = http("GET", srv.url + "/api/capabilities/online", headers=srv.client, timeout=2)
            if 200 <= status < 300:
                return time.monotonic() - since
        except OSError:
            pass
        time.sleep(0.005)
    raise AssertionError(f"no 2xx from {srv.url} within {timeout} s of the kill")

@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path):
    """Factory for tests that need custom env/args or several restarts."""
    started = []

    def factory(extra_env=None, extra_args=(), data_dir=None, script=None, preexec_fn=None):
        srv = ServerProcess(data_dir or tmp_path / "data", extra_env, extra_args, script, preexec_fn)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()


# ---------------------------------------------------------------- a small disk, filled for real

def mount_tmpfs(path: Path, size: str) -> None:
    """A tmpfs of `size` at `path`: a disk that fills up for real (ENOSPC). Skips, saying
    so, where mounting is not permitted (it needs root, as in CI)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}); "
                    "these tests need root, as in CI")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def mounted_disk(tmp_path: Path, size: str):
    """A tmpfs of `size` at tmp_path/disk, for a fixture to yield; unmounted after."""
    mnt = tmp_path / "disk"
    mount_tmpfs(mnt, size)
    try:
        yield mnt
    finally:
        unmount(mnt)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs to keep a data folder on."""
    yield from mounted_disk(tmp_path, "1m")


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(folder: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free."""
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, free_bytes(folder) - leave))
    return filler


# ---------------------------------------------------------------- the core's changes

def recorded(broker):
    """The broker, keeping from now on every change its methods make (see take_records)."""
    broker.out = []
    return broker


def take_records(broker) -> list:
    """The durable records of the changes since the last call, as the journal gets them."""
    records = [c.record for c in broker.out if c.durable]
    broker.out.clear()
    return records


# ---------------------------------------------------------------- the core (explicit now)

T0 = 1_800_000_000.0
OWNER = "o1"


def core_agent(broker, caps=("debug.echo",), tier=0, capacity=1, now=T0, **info):
    """Register an agent with the broker; its uid."""
    return broker.register_agent({"capabilities": list(caps), "tier": tier, "capacity": capacity,
                                  "systemInfo": {}, **info}, now).uid


def core_submit(broker, cap="debug.echo", now=T0, owner=OWNER, limit=None, **fields):
    """Submit a task as the edge would parse it; the Task."""
    return broker.submit(parse_submission({"capability": cap, **fields}), owner, limit, now)


def claim(broker, uid, now=T0):
    """Poll and take, as an agent does: the task taken, or None."""
    task = broker.offer(uid, now)
    return None if task is None else broker.take(uid, task.cap, task.id, now)


# ---------------------------------------------------------------- the HTTP API, in-process

AGENT_KEY, CLIENT_KEY, MGMT_TOKEN = "ak-test", "ck-test", "mt-test"
JWT_SECRET = "jwt-secret-for-tests-" + "0123456789abcdef" * 4  # 64+ bytes, so HS512 forging is quiet
CLIENT = {"X-API-Key": CLIENT_KEY}
MGMT = {"X-Mgmt-Token": MGMT_TOKEN}
ERROR_TYPES = {400: "bad_request", 401: "authentication_error", 403: "authorization_error",
               404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 409: "conflict",
               413: "payload_too_large", 429: "too_many_requests", 503: "scheduling_impossible",
               504: "timeout"}


def api_config(folder: Path, **changes) -> Config:
    return Config(data_path=folder, jwt_secret=JWT_SECRET, agent_api_keys=(AGENT_KEY,),
                  client_api_keys=(CLIENT_KEY,), mgmt_token=MGMT_TOKEN, **changes)


@pytest.fixture
def store_url():
    """The store of the in-process app: "" for the embedded journal (test_api.py runs its
    tests on PostgreSQL too by overriding this)."""
    return ""


@pytest.fixture
def config(tmp_path, store_url):
    return api_config(tmp_path / "data", store=store_url)


@pytest.fixture
def make_client(aiohttp_client, config):
    """A test client for a config variant (`max_body_bytes=…`) and an optional fake clock."""
    async def factory(clock=None, **changes):
        cfg = dataclasses.replace(config, **changes)
        hub = Hub(cfg, clock) if clock else None
        return await aiohttp_client(create_app(cfg, hub))
    return factory


@pytest.fixture
async def client(make_client):
    return await make_client()


async def call(client, method, path, status=200, **kw):
    """Send a request, check its status, return the parsed JSON body."""
    resp = await client.request(method, path, **kw)
    text = await resp.text()
    assert resp.status == status, f"{method} {path}: {resp.status} {text}"
    return json.loads(text) if text else None


async def fails(client, method, path, status, error_type=None, **kw):
    """Send a request that must fail with the contract's error body (of `error_type`, by
    default the status's usual one); return that body."""
    body = await call(client, method, path, status, **kw)
    assert set(body["error"]) == {"type", "message", "status"}, body
    assert body["error"]["type"] == (error_type or ERROR_TYPES[status]), body
    assert body["error"]["status"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


class AgentHandle:
    def __init__(self, uid, key, token):
        self.uid, self.key, self.token = uid, key, token
        self.h = {"Authorization": f"Bearer {token}"}


async def new_agent(client, caps=("echo",), tier=0, capacity=1, **extra):
    """Register and log in an agent over HTTP."""
    reg = await call(client, "POST", "/agent/register", json={
        "capabilities": list(caps), "tier": tier, "capacity": capacity,
        "systemInfo": {"os": "linux", "client": "test", "runtime": "py", "cpuArch": "x86_64",
                       "totalMemoryMb": 1024, "gpu": None},
        "apiKey": AGENT_KEY, **extra})
    auth = await call(client, "POST", "/agent/auth", json={"agentId": reg["agentId"], "key": reg["key"]})
    return AgentHandle(reg["agentId"], reg["key"], auth["token"])


async def submit(client, cap="echo", status=201, headers=CLIENT, **fields):
    """Submit over HTTP; the TaskId (or, for an expected error status, the error body)."""
    body = await call(client, "POST", "/api/task/submit", status, headers=headers,
                      json={"capability": cap, **fields})
    return body["id"] if status < 300 else body


# ---------------------------------------------------------------- a throwaway PostgreSQL

def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (Debian keeps them off the PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child may no longer read Python's files


def die_with_parent():
    """In the child: SIGQUIT (PostgreSQL's immediate shutdown) when the test process dies,
    so that a killed test run leaves no cluster running."""
    LIBC.prctl(1, int(signal.SIGQUIT))  # PR_SET_PDEATHSIG


class PostgresCluster:
    """initdb in a temp folder and `postgres` on a free 127.0.0.1 port, run as an
    unprivileged user (PostgreSQL refuses root, and CI runs as root); stopped by its pid."""

    def __init__(self, bin_dir: Path, folder: Path | None = None):
        """`folder`: where the cluster lives (made; it must be reachable by `postgres`)."""
        self.bin = bin_dir
        self.port = free_port()
        self.password = secrets.token_hex(16)
        if folder is not None:
            folder.mkdir()
        self.folder = folder or Path(tempfile.mkdtemp(prefix="offloadmq-pg-"))
        self.user = self.group = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam(self.run_as()).pw_uid
            self.group = pwd.getpwnam(self.run_as()).pw_gid
            os.chown(self.folder, self.user, self.group)
        self.proc = None

    @staticmethod
    def run_as() -> str:
        """Debian's `postgres` user, created (without a login) where it is missing."""
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            "postgres"], check=True, capture_output=True)
        return "postgres"

    def run(self, *args, **kw):
        return subprocess.run(args, user=self.user, group=self.group, check=True,
                              capture_output=True, text=True, **kw)

    def start(self):
        pwfile = self.folder / "pw"
        pwfile.write_text(self.password)
        if self.user is not None:
            os.chown(pwfile, self.user, self.group)
        data = self.folder / "data"
        self.run(str(self.bin / "initdb"), "-D", str(data), "-U", "offloadmq", "--pwfile", str(pwfile),
                 "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-instructions")
        pwfile.unlink()
        self.log = open(self.folder / "postgres.log", "ab")
        for attempt in range(5):  # another process may take the free port first
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}",
                 "-c", "max_connections=300"],
                user=self.user, group=self.group, stdout=self.log, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent)
            if self.wait_ready():
                return self
            self.port = free_port()
        raise RuntimeError("postgres did not start:\n" + (self.folder / "postgres.log").read_text())

    def wait_ready(self) -> bool:
        """True once it answers; False when it exited for want of its port."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = (self.folder / "postgres.log").read_text()
                if "could not bind" in text.rsplit("starting PostgreSQL", 1)[-1]:
                    return False
                raise RuntimeError("postgres exited:\n" + text)
            try:
                self.execute("SELECT 1")
                return True
            except OSError:
                time.sleep(0.1)
            except Exception as err:  # starting up: "the database system is starting up"
                if "starting up" not in str(err):
                    raise
                time.sleep(0.1)
        raise RuntimeError("postgres did not start:\n" + (self.folder / "postgres.log").read_text())

    def url(self, schema: str | None = None) -> str:
        base = f"postgresql://offloadmq:{self.password}@127.0.0.1:{self.port}/postgres"
        return base + (f"?search_path={schema}" if schema else "")

    def execute(self, sql: str, schema: str | None = None):
        import asyncpg

        async def run():
            conn = await asyncpg.connect(self.url(schema), timeout=5)
            try:
                return await conn.fetch(sql)
            finally:
                await conn.close()
        return asyncio.run(run())

    def new_schema(self) -> str:
        """A fresh schema: each test its own OffloadMQ state (and its own leader lock)."""
        name = "t_" + secrets.token_hex(6)
        self.execute(f"CREATE SCHEMA {name}")
        return name

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """One throwaway cluster per test process (each pytest-xdist worker its own)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (`make test` installs Debian's postgresql)")
    pytest.importorskip("asyncpg")
    cluster = PostgresCluster(bin_dir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(postgres):
    """The URL of a fresh schema of the throwaway cluster."""
    return postgres.url(postgres.new_schema())


# ---------------------------------------------------------------- markers

IN_PROCESS_MODULES = {"test_core", "test_journal", "test_api", "test_agent_ws", "test_head_additions",
                      "test_agent_logs", "test_buckets"}
PROCESS_FIXTURES = {"server", "make_server", "postgres"}  # postgres: a PostgreSQL server process


def pytest_collection_modifyitems(items):
    """`unit`: the in-process layers, but for their tests that start a server process."""
    for item in items:
        on_postgres = getattr(item, "callspec", None) and item.callspec.params.get("store_url") == "postgres"
        if item.module.__name__ in IN_PROCESS_MODULES and not on_postgres \
                and not PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.unit)
