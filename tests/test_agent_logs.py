"""Agents' own log lines: sent over HTTP or the socket, kept in a bounded ring per agent,
read by management newest first."""
import asyncio
import time

import orjson

from conftest import MGMT, call, fails, new_agent
from offloadmq import AGENT_LOG_EVENT_S, AGENT_LOG_MAX_AGE_DAYS, HUB, AgentLogs, Broker


async def send_log(client, agent, severity="INFO", text="hello", **extra):
    return await call(client, "POST", "/private/agent/logs", headers=agent.h,
                      json={"severity": severity, "text": text, **extra})


async def test_a_log_line_is_kept_with_what_the_server_knows_of_its_agent(client):
    agent = await new_agent(client, displayName="box-1", systemInfo={"machineId": "m-7"})
    record = await send_log(client, agent, "error", "ollama: connection refused")
    assert record["severity"] == "ERROR" and record["text"] == "ollama: connection refused"
    assert (record["agentId"], record["agentName"], record["machineFingerprint"]) == (agent.uid, "box-1", "m-7")
    assert record["recordId"] and record["timestamp"].endswith("Z")
    named = await send_log(client, agent, agentName="other name", machineFingerprint="fp_1")
    assert (named["agentName"], named["machineFingerprint"]) == ("other name", "fp_1")


async def test_management_reads_logs_newest_first_by_agent_severity_or_all(client):
    first, second = await new_agent(client), await new_agent(client)
    for n in range(3):
        await send_log(client, first, "INFO", f"first {n}")
    await send_log(client, second, "CRITICAL", "second down")
    latest = await call(client, "GET", "/management/agent_logs/latest", headers=MGMT)
    assert [r["text"] for r in latest["items"]] == ["second down", "first 2", "first 1", "first 0"]
    assert latest["count"] == 4
    mine = await call(client, "GET", f"/management/agent_logs/by_agent?agent_id={first.uid}&limit=2",
                      headers=MGMT)
    assert mine["agentId"] == first.uid and [r["text"] for r in mine["items"]] == ["first 2", "first 1"]
    every = await call(client, "GET", f"/management/agent_logs/by_agent?agent_id={first.uid}&limit=-1",
                       headers=MGMT)
    assert every["count"] == 3
    critical = await call(client, "GET", "/management/agent_logs/by_severity?severity=critical",
                          headers=MGMT)
    assert critical["severity"] == "CRITICAL" and [r["text"] for r in critical["items"]] == ["second down"]
    cleaned = await call(client, "POST", "/management/agent_logs/cleanup/trigger", headers=MGMT)
    assert cleaned == {"deleted": 0, "max_age_days": AGENT_LOG_MAX_AGE_DAYS}


async def test_bad_log_lines_and_queries_are_refused(client):
    agent = await new_agent(client)
    for body in ({"severity": "DEBUG", "text": "x"}, {"severity": "INFO"}, {"severity": "INFO", "text": 5},
                 {"severity": "INFO", "text": "x" * 8193}, {"severity": "INFO", "text": "x", "agentName": "n" * 51},
                 [1]):
        await fails(client, "POST", "/private/agent/logs", 400, headers=agent.h, json=body)
    await fails(client, "POST", "/private/agent/logs", 401, json={"severity": "INFO", "text": "x"})
    for query in ("by_severity", "by_severity?severity=LOUD", "by_agent", "latest?limit=0", "latest?limit=x"):
        await fails(client, "GET", f"/management/agent_logs/{query}", 400, headers=MGMT)
    await fails(client, "GET", "/management/agent_logs/latest", 401)
    assert (await call(client, "GET", "/management/agent_logs/latest", headers=MGMT))["items"] == []


async def test_log_lines_bring_an_agent_log_event_not_one_per_line(client):
    """The console learns of new lines from the management stream; a chatty agent must
    not fill the ring that streams resume from with one event per line."""
    agent = await new_agent(client)
    events = client.app[HUB].events
    for n in range(50):
        await send_log(client, agent, text=f"line {n}")
    await asyncio.sleep(2 * AGENT_LOG_EVENT_S)
    announced = [e for e in events.ring if b"event: agent_log" in e.frame]
    assert 1 <= len(announced) <= 3, len(announced)  # one per half second of lines
    assert all(e.id <= events.released and e.owner == "management" for e in announced)
    data = announced[-1].frame.split(b"data: ")[1].split(b"\n")[0]
    assert orjson.loads(data) == {"uid": agent.uid}


async def test_a_log_line_goes_over_the_socket_too(client):
    from test_agent_ws import connect
    sock = await connect(client)
    record = await sock.ok("post", {"path": ["logs"], "body": {"severity": "INFO", "text": "via socket"}})
    assert record["agentId"] == sock.handle.uid
    latest = await call(client, "GET", "/management/agent_logs/latest", headers=MGMT)
    assert latest["items"][0]["text"] == "via socket"


def test_each_agent_keeps_its_newest_lines_and_all_together_stay_under_the_byte_bound():
    broker = Broker()
    noisy = broker.register_agent({"capabilities": ["a"], "tier": 0, "capacity": 1, "systemInfo": {}}, 0.0)
    quiet = broker.register_agent({"capabilities": ["a"], "tier": 0, "capacity": 1, "systemInfo": {}}, 0.0)
    logs = AgentLogs(ring=5, max_bytes=20 * 300)
    logs.add(quiet, {"severity": "INFO", "text": "quiet 0"}, 1.0)
    for n in range(12):
        logs.add(noisy, {"severity": "INFO", "text": f"noisy {n}"}, 2.0 + n)
    assert [r["text"] for r in logs.newest(0, uid=noisy.uid)] == [f"noisy {n}" for n in range(11, 6, -1)]
    assert [r["text"] for r in logs.newest(0, uid=quiet.uid)] == ["quiet 0"]
    # The byte bound: big lines push out the oldest of all, whoever sent them.
    loud = broker.register_agent({"capabilities": ["a"], "tier": 0, "capacity": 1, "systemInfo": {}}, 0.0)
    for n in range(3):
        logs.add(loud, {"severity": "ERROR", "text": "x" * 1500 + str(n)}, 20.0 + n)
    assert logs.bytes <= 20 * 300
    assert logs.newest(0, uid=quiet.uid) == []
    assert logs.live == len(logs.newest(0))


def test_lines_older_than_the_retention_are_dropped():
    broker = Broker()
    agent = broker.register_agent({"capabilities": ["a"], "tier": 0, "capacity": 1, "systemInfo": {}}, 0.0)
    logs = AgentLogs()
    now = time.time()
    logs.add(agent, {"severity": "INFO", "text": "old"}, now - AGENT_LOG_MAX_AGE_DAYS * 86400 - 10)
    logs.add(agent, {"severity": "INFO", "text": "new"}, now - 5)
    assert [r["text"] for r in logs.newest(0)] == ["new"]  # the add swept the old one
    logs.add(agent, {"severity": "INFO", "text": "newer"}, now)
    assert logs.cleanup(now + AGENT_LOG_MAX_AGE_DAYS * 86400 + 1) == 2
    assert logs.newest(0) == []
