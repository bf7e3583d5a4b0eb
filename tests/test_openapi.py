"""GET /openapi.json: a valid OpenAPI 3.1 document of every route, and schemathesis run
from it against a live server finds no 5xx and no answer that contradicts it."""
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from conftest import http
from openapi_spec_validator import validate

from offloadmq import ROUTES, openapi_document, openapi_path

# Streams never end, so schemathesis cannot judge them; tests/test_interfaces.py covers them.
STREAMS = ("/api/task/events", "/management/events")
# These hold the request for `?wait=` seconds (default 20): fuzz them with wait=0.
# Workers stay at 1: hypothesis' lambda descriptions are not thread-safe on Python 3.11.
LONG_POLLS = ("/private/agent/task/poll", "/private/agent/task/poll_urgent",
              "/private/agent/task/cancels", "/api/task/poll/{cap}/{id}")


def test_document_is_valid_openapi_3_1():
    document = openapi_document(ROUTES)
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_document_names_every_route():
    paths = openapi_document(ROUTES)["paths"]
    for method, path, kind, _ in ROUTES:
        if path == "/{path:.*}":  # the console's static files
            continue
        operation = paths[openapi_path(path)][method.lower()]
        if kind != "open":
            assert "401" in operation["responses"], (method, path)
        for status, answer in operation["responses"].items():
            if int(status) >= 400:
                assert answer["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"}


def test_served_document_is_the_built_one(server):
    status, body = http("GET", server.url + "/openapi.json")
    assert status == 200
    assert body == json.loads(json.dumps(openapi_document(ROUTES)))
    assert "/api/task/poll/{cap}/{id}" in body["paths"]
    schemes = body["components"]["securitySchemes"]
    assert schemes["ApiKey"]["name"] == "X-API-Key" and schemes["MgmtToken"]["name"] == "X-Mgmt-Token"
    assert schemes["AgentJWT"]["bearerFormat"] == "JWT"


def agent_token(server) -> str:
    status, reg = http("POST", server.url + "/agent/register", {
        "apiKey": server.agent_key, "capabilities": ["schemathesis.only"], "tier": 0,
        "capacity": 1, "systemInfo": {}})
    assert status == 200, reg
    status, auth = http("POST", server.url + "/agent/auth", {"agentId": reg["agentId"], "key": reg["key"]})
    assert status == 200, auth
    return auth["token"]


def schemathesis_config(server, token: str) -> str:
    long_polls = "\n".join(f"""
[[operations]]
include-path = "{path}"
parameters = {{ "query.wait" = 0 }}
""" for path in LONG_POLLS)
    return f"""
[generation]
max-examples = 8

[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_schema_conformance.enabled = true

[auth.openapi.ApiKey]
api_key = "{server.client_key}"
[auth.openapi.MgmtToken]
api_key = "{server.mgmt_token}"
[auth.openapi.AgentJWT]
bearer = "{token}"
{long_polls}
# The contract's 503 scheduling_impossible (urgent task, no agent online) and 504 timeout
# are answers, not server faults: the only 5xx allowed, and only where documented.
[[operations]]
include-path-regex = "^/api/task/submit"
checks = {{ not_a_server_error = {{ expected-statuses = ["2XX", "4XX", 503, 504] }} }}

# Keep the test agent on a capability fuzzed submissions never name: an urgent task an
# online agent serves would hold submit_blocking for a minute.
[[operations]]
include-path = "/private/agent/info/update"
parameters = {{ "body.capabilities" = ["schemathesis.only"] }}

[[operations]]
include-path = "/agent/register"
parameters = {{ "body.apiKey" = "{server.agent_key}", "body.capabilities" = ["schemathesis.only"] }}
"""


def run_schemathesis(server, config: Path, *filters: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", server.url + "/openapi.json",
               "--phases", "examples,coverage,fuzzing", "--seed", "1", "--request-timeout", "10",
               "--workers", "1", "--no-color",
               *[f"--exclude-path={path}" for path in STREAMS], *filters]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)


def test_schemathesis_finds_no_5xx_and_no_contract_mismatch(server, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(schemathesis_config(server, agent_token(server)))
    # Management resets and deletes would pull the agent and tasks from under the rest,
    # so the management routes run second.
    runs = [run_schemathesis(server, config, "--exclude-path-regex=^/management/"),
            run_schemathesis(server, config, "--include-path-regex=^/management/")]
    for done in runs:
        assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]
    assert "Internal Server Error" not in server.output()
    assert not re.search(r"bug while handling", server.output()), server.output()[-5000:]


class Conformance:
    """Calls the live server and checks each answer against the document's schema for
    its operation and status: the happy paths fuzzing rarely reaches."""

    def __init__(self, server, document):
        from jsonschema import Draft202012Validator
        self.server, self.document, self.validator = server, document, Draft202012Validator
        self.seen = set()

    def __call__(self, method, template, values=None, body=None, headers=None, query="", expect=200):
        path = template.format(**{k: quote(v, safe="") for k, v in (values or {}).items()})
        status, answer = http(method, self.server.url + path + query, body, headers)
        assert status == expect, (method, path, status, answer)
        response = self.document["paths"][template][method.lower()]["responses"][str(status)]
        schema = response["content"]["application/json"]["schema"]
        self.validator({**schema, "components": self.document["components"]}).validate(answer)
        self.seen.add((method, template))
        return answer


def test_happy_paths_answer_the_documented_shapes(server):
    check = Conformance(server, openapi_document(ROUTES))
    client, mgmt = server.client, server.mgmt
    reg = check("POST", "/agent/register", body={"apiKey": server.agent_key, "capabilities": ["a/b"],
                                                 "tier": 1, "capacity": 2, "systemInfo": {"os": "linux"}})
    token = check("POST", "/agent/auth", body={"agentId": reg["agentId"], "key": reg["key"]})["token"]
    agent = {"Authorization": "Bearer " + token}
    check("GET", "/private/agent/ping", headers=agent)
    check("POST", "/private/agent/info/update", headers=agent,
          body={"capabilities": ["a/b"], "tier": 1, "capacity": 2, "systemInfo": {}})
    sub = check("POST", "/api/task/submit", headers={**client, "Idempotency-Key": "k1"}, expect=201,
                body={"capability": "a/b", "payload": {"n": 1}, "priority": 7, "maxRetries": 0})
    check("POST", "/api/task/submit", headers={**client, "Idempotency-Key": "k1"},
          body={"capability": "a/b", "payload": {"n": 1}, "priority": 7, "maxRetries": 0})
    ids = {"cap": sub["id"]["cap"], "id": sub["id"]["id"]}
    check("GET", "/api/task/poll/{cap}/{id}", ids, headers=client)
    check("GET", "/management/tasks/list", headers=mgmt)
    offered = check("GET", "/private/agent/task/poll", headers=agent, query="?wait=0")
    assert offered["id"] == sub["id"]
    check("POST", "/private/agent/take/{cap}/{id}", ids, headers=agent)
    check("GET", "/management/tasks/list", headers=mgmt)
    check("POST", "/private/agent/task/progress/{cap}/{id}", ids, headers=agent,
          body={"id": ids["id"], "stage": "build", "logUpdate": "line\n"})
    check("GET", "/api/task/poll/{cap}/{id}", ids, headers=client)
    check("GET", "/private/agent/task/cancels", headers=agent, query="?wait=0")
    second = check("POST", "/api/task/submit", headers=client, expect=202,
                   body={"capability": "a/b", "urgent": True, "restartable": True})
    done = check("POST", "/private/agent/task/resolve/{cap}/{id}", ids, headers=agent, query="?next=0",
                 body={"id": ids["id"], "capability": "a/b", "status": {"failure": ["boom", 1]},
                       "output": [1, "x"]})
    assert done["next"]["id"] == second["id"]
    check("GET", "/api/task/poll/{cap}/{id}", ids, headers=client)
    check("POST", "/management/tasks/requeue/{cap}/{id}", ids, headers=mgmt)
    check("POST", "/management/tasks/cancel/{cap}/{id}", ids, headers=mgmt)
    check("POST", "/api/task/cancel/{cap}/{id}", {"cap": "a/b", "id": second["id"]["id"]}, headers=client)
    check("POST", "/api/capabilities/online", headers=client, body={})
    for path in ("/management/agents/list", "/management/agents/list/online",
                 "/management/capabilities/list/online", "/management/client_api_keys/list"):
        check("GET", path, headers=mgmt)
    check("POST", "/management/agents/drain/{agent_id}", {"agent_id": reg["agentId"]}, headers=mgmt)
    check("POST", "/management/agents/resume/{agent_id}", {"agent_id": reg["agentId"]}, headers=mgmt)
    check("POST", "/management/client_api_keys/update", headers=mgmt,
          body={"key": "ck-extra", "capabilities": ["llm.*"], "maxInFlight": 3})
    check("POST", "/management/client_api_keys/revoke/{key}", {"key": "ck-extra"}, headers=mgmt)
    for path in ("/health", "/stats", "/api/ping"):
        check("GET", path)
    check("GET", "/api/task/poll/{cap}/{id}", {"cap": "a/b", "id": "nope"}, headers=client, expect=404)
    check("POST", "/api/task/submit", body={"capability": "a/b"}, expect=401)
    check("POST", "/management/agents/delete/{agent_id}", {"agent_id": reg["agentId"]}, headers=mgmt)
    check("POST", "/management/tasks/reset", headers=mgmt)
    check("POST", "/management/agents/reset", headers=mgmt)
    assert len(check.seen) >= 30
