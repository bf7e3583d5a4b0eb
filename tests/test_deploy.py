"""The deployment artifacts (README, "Deploying"), checked without a container engine or
Helm: the Dockerfile, compose.yaml, the Helm chart rendered here for both modes, and the
systemd units (`systemd-analyze verify` where it exists). Every variable they set must be
in the README's configuration tables and read by the program it is given to; ports and
probe paths must be the server's; secrets come from outside, never written in."""
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, call, free_port, http

import offload_agent
import offloadmq

DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "offloadmq"
SECRET_VARS = {"JWT_SECRET", "AGENT_API_KEYS", "CLIENT_API_KEYS", "MGMT_TOKEN", "OFFLOAD_AGENT_KEY",
               "POSTGRES_PASSWORD"}
PORT = offloadmq.Config().port  # the server's default
ENV_NAME = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")


def readme_variables() -> set[str]:
    """The variables of the README's configuration tables."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row)}


def server_variables() -> set[str]:
    return set(ENV_NAME.findall(inspect.getsource(offloadmq.load_config))) | set(offloadmq.SECRET_NAMES)


def agent_variables() -> set[str]:
    return set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', inspect.getsource(offload_agent)))


def check_variables(names, program: str) -> None:
    names = set(names)
    assert names, "no variables found: the parsing is wrong"
    known = server_variables() if program == "server" else agent_variables()
    assert names <= readme_variables(), f"not in README's configuration tables: {names - readme_variables()}"
    assert names <= known, f"not read by the {program}: {names - known}"


def agent_argv(command: str) -> list[list[str]]:
    """The argument lists of each `offload_agent.py` run in a shell command."""
    runs = []
    for part in re.split(r"[;&|]+", command):
        words = shlex.split(part)
        for n, word in enumerate(words):
            if word.endswith("offload_agent.py"):
                runs.append(words[n + 1:])
    return runs


def parses_as_agent_arguments(argv: list[str], monkeypatch) -> None:
    monkeypatch.setenv("OFFLOAD_AGENT_SERVER", "http://127.0.0.1:1")  # as the artifact sets it
    args = offload_agent._parse_args(argv)  # SystemExit on an option the agent lacks
    assert args.command in ("register", "serve")


# ---------------------------------------------------------------- Dockerfile

def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def test_dockerfile_slim_non_root_volume_and_the_postgres_extra():
    steps = dockerfile()
    assert steps[0][0] == "FROM" and re.fullmatch(r"python:3\.1[1-9]-slim", steps[0][1])
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in steps if i == "ENV")))
    user = [a for i, a in steps if i == "USER"]
    assert user and user[-1] not in ("root", "0"), "the server must not run as root"
    assert "useradd" in " ".join(a for i, a in steps if i == "RUN") and user[-1] in " ".join(
        a for i, a in steps if i == "RUN"), "the user is created in the image"
    assert json.loads(dict(steps)["VOLUME"]) == [env["DATABASE_ROOT_PATH"]]
    assert dict(steps)["EXPOSE"] == str(PORT) and env["SERVER_ADDRESS"].endswith(f":{PORT}")
    install = " ".join(a for i, a in steps if i == "RUN" and "pip install" in a)
    assert "'.[postgres]'" in install
    assert json.loads(dict(steps)["CMD"])[-1] == "/app/offloadmq.py"
    check_variables([name for name in env if not name.startswith("PYTHON")], "server")


def test_the_files_the_image_copies_build_the_package_with_its_postgres_extra(tmp_path):
    """What `pip install '.[postgres]'` starts from in the image: the COPY sources alone.
    Their metadata is built here (setuptools' egg_info; no wheel, no network)."""
    app = tmp_path / "app"
    app.mkdir()
    for instruction, args in dockerfile():
        if instruction == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                copy = shutil.copytree if (ROOT / source).is_dir() else shutil.copy
                copy(ROOT / source, app / source)
    done = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                           "egg_info", "--egg-base", str(tmp_path)], cwd=app, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "cannot be found" not in done.stderr, done.stderr
    info = tmp_path / "offloadmq.egg-info"
    assert (info / "top_level.txt").read_text().split() == ["offload_agent", "offloadmq"]
    extras = (info / "requires.txt").read_text().split("\n\n")
    assert any(part.startswith("[postgres]\nasyncpg") for part in extras), extras
    assert (app / "static" / "index.html").exists(), "the console is served from /app/static"


def in_checkout(text: str, data: Path) -> str:
    """A path of the image (/app, /data) as it is in this checkout and test."""
    return text.replace("/app/", f"{ROOT}/").replace("/data", str(data))


def test_the_images_command_and_environment_start_a_server_its_healthcheck_passes(tmp_path):
    """The image's CMD with its ENV, run here (its port a free one), then its HEALTHCHECK
    command: it passes while the server runs and fails once it is gone."""
    steps = dockerfile()
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in steps if i == "ENV")))
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("OFFLOADMQ_", "DATABASE_"))},
           **env, "SERVER_ADDRESS": env["SERVER_ADDRESS"].replace(f"0.0.0.0:{PORT}", f"127.0.0.1:{port}"),
           "DATABASE_ROOT_PATH": str(tmp_path / "data")}
    command = [sys.executable, *(in_checkout(a, tmp_path) for a in json.loads(dict(steps)["CMD"])[1:])]
    check = next(a for i, a in steps if i == "HEALTHCHECK")
    probe = json.loads(check.split("CMD", 1)[1])
    assert f"127.0.0.1:{PORT}/health'" in probe[-1]
    probe = [sys.executable, *probe[1:-1], probe[-1].replace(f":{PORT}/", f":{port}/")]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        assert (tmp_path / "data" / "journal.jsonl").exists(), "the state goes to the volume"
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0


async def test_the_probe_paths_are_the_servers(client):
    """Liveness /health and readiness /health/ready (an embedded server that can write is ready)."""
    assert (await call(client, "GET", "/health"))["status"] == "healthy"
    assert await call(client, "GET", "/health/ready") == {"ready": True, "role": "leader"}


# ---------------------------------------------------------------- compose.yaml

def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_runs_postgres_two_servers_on_it_and_an_agent_following_both(monkeypatch):
    services = compose()["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    ours = {name: s for name, s in services.items() if s.get("build") == "."}
    servers = {name: s for name, s in ours.items() if "OFFLOADMQ_STORE" in s["environment"]}
    agents = {name: s for name, s in ours.items() if "OFFLOAD_AGENT_SERVER" in s["environment"]}
    assert len(servers) == 2 and len(agents) == 1 and set(ours) == set(servers) | set(agents)
    db = services["postgres"]["environment"]
    for name, srv in servers.items():
        env = srv["environment"]
        store = re.fullmatch(r"postgresql://(\w+):(\$\{\w+[^}]*\})@postgres:5432/(\w+)", env["OFFLOADMQ_STORE"])
        assert store, env["OFFLOADMQ_STORE"]
        assert store[1] == db["POSTGRES_USER"] and store[3] == db["POSTGRES_DB"]
        assert env["OFFLOADMQ_ADVERTISE_URL"] == f"http://{name}:{PORT}"
        assert all(port.endswith(f":{PORT}") for port in srv["ports"])
        assert srv["depends_on"]["postgres"]["condition"] == "service_healthy"
        check_variables(env, "server")
    # One data folder for every server: in PostgreSQL mode it holds the bucket files.
    data = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in dockerfile() if i == "ENV")))["DATABASE_ROOT_PATH"]
    (volume,) = {tuple(srv["volumes"]) for srv in servers.values()}
    assert [v.split(":")[1] for v in volume] == [data]
    agent = next(iter(agents.values()))
    urls = agent["environment"]["OFFLOAD_AGENT_SERVER"].split(",")
    # Each server's advertised URL is in the agent's list: it follows the leader by name.
    assert sorted(urls) == sorted(s["environment"]["OFFLOADMQ_ADVERTISE_URL"] for s in servers.values())
    check_variables(agent["environment"], "agent")
    runs = agent_argv(agent["command"][-1])
    assert [argv[0] for argv in runs] == ["register", "serve"]
    for argv in runs:
        parses_as_agent_arguments(argv, monkeypatch)


def test_the_compose_agents_command_registers_once_then_serves(server, tmp_path):
    """The agent service's command, run here by sh with its environment (its first
    server URL one where nothing listens): it registers, serves a task, and run again
    after a kill it serves under the same identity without registering again."""
    agent = next(s for s in compose()["services"].values() if "OFFLOAD_AGENT_SERVER" in s.get("environment", {}))
    command = in_checkout(agent["command"][-1], tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1", "OFFLOAD_AGENT_KEY": server.agent_key,
           "OFFLOAD_AGENT_SERVER": f"http://127.0.0.1:{free_port()},{server.url}"}
    identities = []
    for run in range(2):
        log_path = tmp_path / f"agent{run}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*agent["command"][:-1], command], env=env, cwd=tmp_path,
                                    stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 30
                while "online, serving" not in log_path.read_text():
                    assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.05)
                status, answer = http("POST", server.url + "/api/task/submit_blocking", {
                    "capability": "debug.echo", "urgent": True, "payload": {"run": run}}, server.client)
                assert status == 200 and answer["result"] == {"run": run}, answer
            finally:
                proc.kill()
                proc.wait(10)
        identities.append(json.loads((tmp_path / "agent.json").read_text())["agentId"])
        assert ("registered agent" in log_path.read_text()) == (run == 0)
    assert identities[0] == identities[1]


def test_compose_writes_no_secret_in():
    for name, service in compose()["services"].items():
        for var, value in service.get("environment", {}).items():
            if var in SECRET_VARS:
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), f"{name}: {var} is written in"
    example = (DEPLOY / "compose.env.example").read_text()
    assert all(re.fullmatch(r"\w+=", line) for line in example.splitlines() if not line.startswith("#"))


# ---------------------------------------------------------------- the Helm chart

CONTROL = re.compile(r"\s*\{\{-?\s*(if|end)\b\s*(.*?)\s*-?\}\}\s*")
EXPRESSION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")


def helm_value(expr: str, scope: dict):
    if expr.startswith("not "):
        return not helm_value(expr[4:], scope)
    assert expr.startswith("."), f"not a simple substitution: {expr!r}"
    value = scope
    for part in expr[1:].split("."):
        assert isinstance(value, dict) and part in value, f"{expr}: no such value"
        value = value[part]
    return value


def render(template: str, values: dict) -> str:
    """Helm's rendering of the only template syntax the chart uses: `{{ .Values.x }}`,
    `{{ .Release.Name }}` and whole-line `{{- if [not] … }}` / `{{- end }}` blocks."""
    scope = {"Values": values, "Release": {"Name": "mq"}}
    out, shown = [], []
    for line in template.splitlines():
        control = CONTROL.fullmatch(line)
        if control:
            if control[1] == "if":
                shown.append(bool(helm_value(control[2], scope)))
            else:
                shown.pop()
            continue
        if all(shown):
            out.append(EXPRESSION.sub(lambda m: str(helm_value(m[1], scope)), line))
    assert not shown, "an if without its end"
    return "\n".join(out)


def chart(**changes) -> dict[str, list]:
    """Kind -> manifests, rendered with values.yaml plus `changes` (dotted names)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for dotted, value in changes.items():
        where = values
        *head, last = dotted.split("__")
        for part in head:
            where = where[part]
        where[last] = value
    kinds: dict[str, list] = {}
    for template in sorted((CHART / "templates").glob("*.yaml")):
        for doc in yaml.safe_load_all(render(template.read_text(), values)):
            if doc:
                kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container_env(workload: dict) -> dict:
    return {e["name"]: e for e in pod(workload)["containers"][0]["env"]}


def check_pod(workload: dict, service: dict, values: dict) -> None:
    spec = pod(workload)
    main = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert main["ports"] == [{"name": "http", "containerPort": PORT}] and values["port"] == PORT
    assert main["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"] \
        == workload["spec"]["template"]["metadata"]["labels"]
    env = container_env(workload)
    assert env["SERVER_ADDRESS"]["value"].endswith(f":{PORT}")
    mount = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert mount["data"] == env["DATABASE_ROOT_PATH"]["value"]
    for name, entry in env.items():
        if name in SECRET_VARS or name == "OFFLOADMQ_STORE":  # from the Secret, never written in
            assert "value" not in entry and entry["valueFrom"]["secretKeyRef"]["name"] == values["secretName"]
    # A variable only other values refer to, $(NAME), is Kubernetes plumbing (the pod IP).
    helpers = {n for e in env.values() for n in re.findall(r"\$\((\w+)\)", e.get("value", ""))}
    check_variables(set(env) - helpers, "server")


def test_helm_embedded_mode_is_one_replica_statefulset_with_a_claim():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["postgres"]["enabled"] is False, "embedded is the default"
    kinds = chart()
    assert sorted(kinds) == ["Service", "StatefulSet"]
    (sts,), (service,) = kinds["StatefulSet"], kinds["Service"]
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == service["metadata"]["name"]
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == values["persistence"]["size"]
    assert "OFFLOADMQ_STORE" not in container_env(sts)
    check_pod(sts, service, values)


def test_helm_postgres_mode_is_a_deployment_of_several_ready_only_when_leading():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    kinds = chart(postgres__enabled=True, replicas=3)
    assert sorted(kinds) == ["Deployment", "Service"]
    (deployment,), (service,) = kinds["Deployment"], kinds["Service"]
    assert deployment["spec"]["replicas"] == 3 > 1
    assert chart(postgres__enabled=True)["Deployment"][0]["spec"]["replicas"] == values["replicas"] > 1
    env = container_env(deployment)
    assert env["OFFLOADMQ_STORE"]["valueFrom"]["secretKeyRef"]["key"] == "store-url"
    assert env["OFFLOADMQ_ADVERTISE_URL"]["value"] == f"http://$(POD_IP):{PORT}"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert pod(deployment)["volumes"] == [{"name": "data", "emptyDir": {}}]
    check_pod(deployment, service, values)
    # Bucket files want one data folder for all replicas: a ReadWriteMany claim, on request.
    shared = chart(postgres__enabled=True, sharedFiles=True)
    (claim,) = shared["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod(shared["Deployment"][0])["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}]
    assert "PersistentVolumeClaim" not in chart(sharedFiles=True), "embedded mode has its own claim"


def start_pod(workload: dict, secrets: dict, folder: Path) -> tuple[subprocess.Popen, str]:
    """One pod of `workload` as a process here: its container's environment (secret
    references filled from `secrets`, the pod IP 127.0.0.1, a free port for the pod's
    port), the image's command; /data is `folder`. Answers the process and its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOADMQ_", "DATABASE_"))}
    for name, entry in container_env(workload).items():
        if "value" in entry:  # the manifest's own: the pod's address, port and volume
            (mount,) = pod(workload)["containers"][0]["volumeMounts"]
            env[name] = (entry["value"].replace("$(POD_IP)", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
                         .replace(f":{PORT}", f":{port}").replace(mount["mountPath"], str(folder)))
        elif "secretKeyRef" in entry["valueFrom"]:
            env[name] = secrets[entry["valueFrom"]["secretKeyRef"]["key"]]
        else:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            env[name] = "127.0.0.1"
    folder.mkdir(parents=True)
    command = [sys.executable, *(in_checkout(a, folder) for a in json.loads(dict(dockerfile())["CMD"])[1:])]
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, f"http://127.0.0.1:{port}"


def probe(url: str, path: str) -> tuple[int, dict | None]:
    try:
        return http("GET", url + path, timeout=2)
    except OSError:
        return 0, None


def test_helm_postgres_pods_run_here_one_is_ready_and_a_standby_takes_over(pg_url, tmp_path):
    """Two pods of the rendered Deployment, run as processes on a throwaway PostgreSQL:
    both live, only the leader ready (so the Service sends it all); kill -9 the leader
    and the other's readiness probe turns 200."""
    (deployment,) = chart(postgres__enabled=True)["Deployment"]
    main = pod(deployment)["containers"][0]
    ready_path, live_path = main["readinessProbe"]["httpGet"]["path"], main["livenessProbe"]["httpGet"]["path"]
    secrets = {"store-url": pg_url, "agent-api-keys": "ak-" + os.urandom(8).hex(),
               "client-api-keys": "ck-" + os.urandom(8).hex(), "mgmt-token": "mt-" + os.urandom(8).hex(),
               "jwt-secret": os.urandom(32).hex()}
    pods = []
    try:
        for n in range(2):
            pods.append(start_pod(deployment, secrets, tmp_path / f"pod{n}"))
            deadline = time.monotonic() + 30
            while probe(pods[-1][1], ready_path)[0] != (200 if n == 0 else 503):
                assert pods[-1][0].poll() is None and time.monotonic() < deadline, \
                    (tmp_path / f"pod{n}" / "server.log").read_text()
                time.sleep(0.05)
        (leader, leader_url), (_, standby_url) = pods
        assert probe(standby_url, live_path)[0] == 200, "a standby is alive: no restarts"
        status, body = probe(standby_url, ready_path)
        assert body["leader"] == leader_url, "the leader advertises the pod's URL"
        leader.kill()
        deadline = time.monotonic() + 30
        while probe(standby_url, ready_path)[0] != 200:
            assert time.monotonic() < deadline, "the standby never became ready"
            time.sleep(0.05)
    finally:
        for proc, _ in pods:
            proc.kill()
            proc.wait(10)


def test_the_helm_renderer_refuses_what_it_does_not_know():
    """So a template using more of Helm than this test renders fails here, not in a cluster."""
    with pytest.raises(AssertionError):
        render("a: {{ .Values.missing }}", {})
    with pytest.raises(AssertionError):
        render('a: {{ .Values.x | quote }}', {"x": 1})
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["name"] == "offloadmq"


# ---------------------------------------------------------------- systemd

UNITS = {"offloadmq.service": "server", "offload-agent.service": "agent"}


def unit_lines(name: str) -> list[tuple[str, str]]:
    return [tuple(line.split("=", 1)) for line in (DEPLOY / "systemd" / name).read_text().splitlines()
            if "=" in line and not line.startswith("#")]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_units_set_known_variables_and_run_known_options(name, monkeypatch):
    program = UNITS[name]
    lines = unit_lines(name)
    settings = dict(lines)
    assert settings["User"] not in ("root", "0") and settings["Restart"] == "on-failure"
    names = [v.split("=", 1)[0] for k, v in lines if k == "Environment"]
    example = (DEPLOY / "systemd" / f"{program}.env.example").read_text()
    names += re.findall(r"^#?([A-Z][A-Z0-9_]+)=", example, re.M)
    check_variables(names, program)
    assert settings["EnvironmentFile"] == f"-/etc/offloadmq/{program}.env"
    exec_start = shlex.split(settings["ExecStart"])
    assert exec_start[0] == "/opt/offloadmq/.venv/bin/python"
    if program == "agent":
        assert settings["KillMode"] == "mixed"  # SIGTERM to the agent alone: its grace period
        parses_as_agent_arguments(exec_start[2:], monkeypatch)
    else:
        assert exec_start[1:] == ["/opt/offloadmq/offloadmq.py"]
        assert dict(v.split("=", 1) for k, v in lines if k == "Environment")["SERVER_ADDRESS"].endswith(f":{PORT}")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_finds_nothing_to_say(name, tmp_path):
    """The unit as installed, but for the checkout's place: this one instead of /opt/offloadmq."""
    unit = tmp_path / name
    unit.write_text((DEPLOY / "systemd" / name).read_text().replace("/opt/offloadmq", str(ROOT)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    said = [line for line in (done.stdout + done.stderr).splitlines() if name in line]
    assert done.returncode == 0 and not said, done.stdout + done.stderr


# ---------------------------------------------------------------- README

def test_the_readme_shows_every_artifact():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]
    for artifact in ("Dockerfile", "compose.yaml", "deploy/helm/offloadmq", "deploy/systemd/offloadmq.service",
                     "deploy/systemd/offload-agent.service", "/health/ready", "OFFLOAD_AGENT_SERVER",
                     "OFFLOADMQ_URL"):
        assert artifact in section, artifact
