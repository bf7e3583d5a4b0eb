"""Shared fixtures: real server processes on a free 127.0.0.1 port with a temp data folder."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

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

    def __init__(self, data_dir: Path, extra_env=None, extra_args=(), script=None):
        self.data = Path(data_dir)
        self.script = script or ROOT / "offloadmq.py"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.agent_key = "ak-" + secrets.token_hex(8)
        self.client_key = "ck-" + secrets.token_hex(8)
        self.mgmt_token = "mt-" + secrets.token_hex(8)
        self.extra_env = extra_env or {}
        self.extra_args = list(extra_args)
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

    # Convenience headers for the three auth schemes.
    @property
    def client(self):
        return {"X-API-Key": self.client_key}

    @property
    def mgmt(self):
        return {"X-Mgmt-Token": self.mgmt_token}


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path):
    """Factory for tests that need custom env/args or several restarts."""
    started = []

    def factory(extra_env=None, extra_args=(), data_dir=None, script=None):
        srv = ServerProcess(data_dir or tmp_path / "data", extra_env, extra_args, script)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()


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
