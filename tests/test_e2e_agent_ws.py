"""End to end over the agent WebSocket: the real server and the real agent as processes,
the agent on its default transport (the socket), beside polling agents, and against a
server that has no socket."""
import time

from conftest import ROOT, http
from test_e2e_agent import requests_served, start_agent, submit, task_status, wait_done  # noqa: F401


def test_the_agent_serves_pushed_tasks_without_polling(server, start_agent):
    agent = start_agent(caps=["debug.echo", "shellcmd.bash"], capacity=2)
    agent.wait_for_log("connected to the server's agent WebSocket")
    ids = [submit(server, "debug.echo", {"n": n}) for n in range(20)]
    ids.append(submit(server, "shellcmd.bash", "echo over the socket"))
    results = [wait_done(server, task_id) for task_id in ids]
    assert [r["output"] for r in results[:20]] == [{"n": n} for n in range(20)]
    assert results[20]["output"]["stdout"] == "over the socket\n"
    # Everything went over the socket: no poll, take, progress or resolve over HTTP.
    for method, route in (("GET", "/private/agent/task/poll"), ("POST", "/private/agent/take/"),
                          ("POST", "/private/agent/task/progress/"),
                          ("POST", "/private/agent/task/resolve/")):
        assert requests_served(server, method, route) == 0, route
    assert results[0]["status"] == "completed"


def test_socket_and_polling_agents_share_the_queue_and_run_each_task_once(server, start_agent):
    pushed = start_agent(caps=["shellcmd.bash"])
    polling = start_agent(caps=["shellcmd.bash"], serve_args=["--transport", "http"])
    ids = [submit(server, "shellcmd.bash", f"sleep 0.2; echo {n}") for n in range(10)]
    assert [wait_done(server, t)["output"]["stdout"] for t in ids] == [f"{n}\n" for n in range(10)]
    def counts():  # an agent logs a result once its answer is back: after the task ended
        return [sum("resolved: success" in line for line in a.output().splitlines())
                for a in (pushed, polling)]
    deadline = time.monotonic() + 10
    while sum(counts()) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(counts()) == 10 and all(counts()), counts()


def test_the_agent_falls_back_to_polling_when_the_server_has_no_socket(make_server, tmp_path):
    from test_e2e_agent import AgentProcess
    server = make_server(script=ROOT / "tests" / "server_without_ws.py").start()
    agent = AgentProcess(server, tmp_path / "agent", ["debug.echo"]).register().start()
    try:
        agent.wait_for_log("server has no agent WebSocket")
        task_id = submit(server, "debug.echo", {"x": 1})
        assert wait_done(server, task_id)["output"] == {"x": 1}
        assert requests_served(server, "GET", "/private/agent/task/poll") >= 1
    finally:
        agent.kill()


def test_the_agent_reconnects_after_a_server_restart_and_serves_again(server, start_agent):
    agent = start_agent(caps=["debug.echo"])
    agent.wait_for_log("connected to the server's agent WebSocket")
    server.restart()
    agent.wait_for_log("agent WebSocket closed; reconnecting", timeout=15)
    task_id = submit(server, "debug.echo", {"after": "restart"})
    assert wait_done(server, task_id, timeout=30)["output"] == {"after": "restart"}
    assert agent.output().count("connected to the server's agent WebSocket") >= 2


def test_a_dropped_agent_leaves_its_started_task_running_not_requeued(server, start_agent):
    """kill -9 of an agent mid-task: the task had been marked started (first frame), so
    it is not handed to another agent as unstarted; it stays running for its agent."""
    first = start_agent(caps=["shellcmd.bash"])
    task_id = submit(server, "shellcmd.bash", "sleep 30")
    deadline = time.monotonic() + 10
    while task_status(server, task_id)["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.kill()
    time.sleep(0.5)
    assert task_status(server, task_id)["status"] == "running"


def test_the_agents_warnings_reach_the_servers_agent_logs(server, start_agent):
    agent = start_agent(caps=["debug.echo", "no.such.executor"])
    agent.wait_for_log("no executor for no.such.executor")
    deadline = time.monotonic() + 10
    while True:
        status, logs = http("GET", f"{server.url}/management/agent_logs/by_agent?agent_id="
                                   f"{agent.identity['agentId']}", headers=server.mgmt)
        assert status == 200, logs
        texts = [r["text"] for r in logs["items"]]
        if any("no executor for no.such.executor" in t for t in texts):
            break
        assert time.monotonic() < deadline, texts
        time.sleep(0.1)
    assert logs["items"][0]["severity"] == "ERROR"
    assert server.agent_key not in str(logs) and agent.identity["key"] not in str(logs)


def test_a_socket_opened_after_a_restart_sends_back_nothing_the_agent_may_have_started(server):
    """A task handed over before a restart may have started in the half second before the
    agent reports it (the `running` stage is deferred). The agent's first socket on the
    restarted server must not send it back to the queue (it did: another run started, and
    the agent's log text was refused as "not held"); its report is still accepted."""
    import asyncio

    import aiohttp
    bearer = server.new_agent(["debug.echo"])
    task_id = submit(server, "debug.echo", "held across the restart")
    assert http("POST", server.url + f"/private/agent/take/debug.echo/{task_id['id']}", {}, bearer)[0] == 200
    server.restart()
    url = server.url.replace("http", "ws", 1) + "/private/agent/ws?token=" + \
        bearer["Authorization"].removeprefix("Bearer ")

    async def answer_to(ws, req_id):
        pushed = []
        while (frame := await ws.receive_json(timeout=5)).get("req_id") != req_id:
            pushed.append(frame)
        return frame, pushed

    async def reconnect_and_report():
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "connected"
            await ws.send_json({"req_id": "p", "action": "ping", "params": {}})
            _, pushed = await answer_to(ws, "p")  # the open is done
            assert pushed == [], "the held task went back to the queue and was pushed again"
            assert task_status(server, task_id)["status"] == "assigned"
            await ws.send_json({"req_id": "r", "action": "resolve_task", "params": {
                "id": task_id, "capability": "debug.echo", "status": {"success": 0.1}, "output": "ran once"}})
            return (await answer_to(ws, "r"))[0]
    answer = asyncio.run(reconnect_and_report())
    assert answer["type"] == "response", answer
    assert wait_done(server, task_id)["output"] == "ran once"
