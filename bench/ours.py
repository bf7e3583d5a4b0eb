"""Starting OffloadMQ for the benchmark: a server on a free port with a temp data folder
and random secrets, plus optionally the real offload_agent.py serving debug.echo."""
from __future__ import annotations

import json
import secrets
import urllib.request
from pathlib import Path

from bench.common import HOST, PY, ROOT, Proc, free_port, http_ok, run_json, wait_for


class OursServer:
    def __init__(self, tmp: Path, fsync: str = "always", name: str = "offloadmq",
                 trace_out: Path | None = None, extra_env: dict | None = None,
                 client_key: str | None = None, extra_args: tuple = ()):
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.agent_key = "ak_" + secrets.token_urlsafe(16)
        self.client_key = client_key or "ck_" + secrets.token_urlsafe(16)
        self.mgmt_token = "mt_" + secrets.token_urlsafe(16)
        env = {"AGENT_API_KEYS": self.agent_key, "CLIENT_API_KEYS": self.client_key,
               "MGMT_TOKEN": self.mgmt_token, "JWT_SECRET": secrets.token_urlsafe(32), **(extra_env or {})}
        data = tmp / f"{name}-data"
        # trace_out: run bench/trace_server.py (the same app plus timers) instead.
        program = [PY, "-m", "bench.trace_server"] if trace_out else [PY, str(ROOT / "offloadmq.py")]
        if trace_out:
            env["BENCH_TRACE_OUT"] = str(trace_out)
            env["PYTHONPATH"] = str(ROOT)
        self.proc = Proc(name, [*program, "--host", HOST, "--port",
                                str(self.port), "--data", str(data), "--fsync", fsync, *extra_args],
                         tmp, env=env, cwd=tmp)
        wait_for(lambda: http_ok(self.url + "/health"), 30, "the OffloadMQ server", self.proc)
        self.agents: list[Proc] = []

    def online_caps(self) -> list[str]:
        req = urllib.request.Request(self.url + "/api/capabilities/online",
                                     headers={"X-API-Key": self.client_key})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def start_agent(self, caps: str = "debug.echo", capacity: int = 1, serve_args: tuple = ()) -> Proc:
        n = len(self.agents)
        config = self.tmp / f"agent{n}.json"
        register = Proc(f"agent{n}-register",
                        [PY, str(ROOT / "offload_agent.py"), "register", "--server", self.url,
                         "--key", self.agent_key, "--caps", caps, "--capacity", str(capacity),
                         "--config", str(config)], self.tmp, cwd=self.tmp)
        if register.popen.wait(60) != 0:
            raise RuntimeError(f"agent register failed:\n{register.tail()}")
        register.stop()
        agent = Proc(f"agent{n}", [PY, str(ROOT / "offload_agent.py"), "serve", "--config",
                                   str(config), *serve_args], self.tmp, cwd=self.tmp)
        self.agents.append(agent)
        wait_for(lambda: caps.split()[0] in self.online_caps(), 30, "the agent online", agent)
        return agent

    def http_requests(self) -> int:
        """Requests the server has answered so far: the sum of
        offloadmq_http_request_duration_seconds_count over routes from /metrics (the
        management token), leaving out the /metrics route itself."""
        req = urllib.request.Request(self.url + "/metrics", headers={"X-Mgmt-Token": self.mgmt_token})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        total = 0
        for line in text.splitlines():
            if line.startswith("offloadmq_http_request_duration_seconds_count{") \
                    and 'route="/metrics"' not in line:
                total += int(float(line.rsplit(" ", 1)[1]))
        return total

    def client(self, *args: str, timeout_s: float = 900) -> dict:
        return run_json([PY, "-m", "bench.ours_workload", *args, "--url", self.url,
                         "--key", self.client_key], timeout_s)

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.proc.stop()
