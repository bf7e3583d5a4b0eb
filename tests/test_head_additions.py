"""What the original added after January, besides the agent socket: the X-MGMT-API-KEY
override on client routes, /version, displayName and appVersion, the agents' login
secrets in the management listing, and POST as well as GET on the client poll route."""

from conftest import CLIENT, MGMT, MGMT_TOKEN, call, fails, new_agent, submit
from offloadmq import __version__

OVERRIDE = {"X-MGMT-API-KEY": MGMT_TOKEN}


async def test_the_management_override_reaches_every_key_and_task(client):
    mine = await submit(client, "echo")
    path = f"{mine['cap']}/{mine['id']}"
    await call(client, "POST", "/management/client_api_keys/update", headers=MGMT,
               json={"key": "ck-narrow-0123456789", "capabilities": ["other"]})
    # With a key in the body, as the original's console sends it: the override wins.
    body = {"apiKey": "ignored", "capability": "anything.at.all"}
    assert (await call(client, "POST", "/api/task/submit", 201, headers=OVERRIDE, json=body))["id"]
    assert (await call(client, "POST", f"/api/task/poll/{path}", headers=OVERRIDE, json={}))["status"] == "pending"
    assert (await call(client, "GET", f"/api/task/poll/{path}", headers=OVERRIDE))["status"] == "pending"
    await fails(client, "POST", f"/api/task/poll/{path}", 404, json={"apiKey": "ck-narrow-0123456789"})
    assert (await call(client, "POST", f"/api/task/cancel/{path}", headers=OVERRIDE, json={}))["status"] == "canceled"
    await fails(client, "POST", "/api/task/submit", 401, headers={"X-MGMT-API-KEY": "wrong"},
                json={"capability": "echo", "apiKey": "ck-narrow-0123456789"})


async def test_client_poll_takes_post_and_get(client):
    task_id = await submit(client, "echo")
    path = f"/api/task/poll/{task_id['cap']}/{task_id['id']}"
    assert (await call(client, "POST", path, json={"apiKey": CLIENT["X-API-Key"]}))["id"] == task_id
    assert (await call(client, "GET", path, headers=CLIENT))["id"] == task_id


async def test_version_open_and_for_management(client):
    assert await call(client, "GET", "/version") == {"version": __version__}
    assert await call(client, "GET", "/management/version", headers=MGMT) == {"version": __version__}
    await fails(client, "GET", "/management/version", 401)


async def test_display_name_and_app_version_are_kept_and_listed(client):
    agent = await new_agent(client, displayName="Lab GPU box", appVersion="2.1.0")
    [listed] = await call(client, "GET", "/management/agents/list", headers=MGMT)
    assert listed["displayName"] == "Lab GPU box" and listed["appVersion"] == "2.1.0"
    # An update that does not name them keeps them; one that does changes them.
    info = {"capabilities": ["echo"], "systemInfo": {}}
    await call(client, "POST", "/private/agent/info/update", headers=agent.h, json=info)
    [listed] = await call(client, "GET", "/management/agents/list", headers=MGMT)
    assert listed["displayName"] == "Lab GPU box"
    await call(client, "POST", "/private/agent/info/update", headers=agent.h,
               json={**info, "appVersion": "2.2.0"})
    [listed] = await call(client, "GET", "/management/agents/list/online", headers=MGMT)
    assert listed["appVersion"] == "2.2.0" and listed["displayName"] == "Lab GPU box"
    plain = await new_agent(client)
    by_uid = {a["uid"]: a for a in await call(client, "GET", "/management/agents/list", headers=MGMT)}
    assert by_uid[plain.uid]["displayName"] is None and by_uid[plain.uid]["appVersion"] is None


async def test_bad_display_name_or_app_version_is_refused(client):
    base = {"capabilities": ["echo"], "apiKey": "ak-test"}
    for extra in ({"displayName": "x" * 51}, {"displayName": 5}, {"appVersion": ["1"]},
                  {"appVersion": "v" * 101}):
        await fails(client, "POST", "/agent/register", 400, json={**base, **extra})
    assert await call(client, "GET", "/management/agents/list", headers=MGMT) == []


async def test_management_listing_shows_the_login_secret_that_logs_the_agent_in(client):
    agent = await new_agent(client)
    for path in ("/management/agents/list", "/management/agents/list/online"):
        [listed] = await call(client, "GET", path, headers=MGMT)
        assert listed["personalLoginToken"] == agent.key
    auth = await call(client, "POST", "/agent/auth", json={"agentId": agent.uid, "key": agent.key})
    assert auth["token"]
    # Nowhere else: not to the agent's peers, not in the client's or the public views.
    for path, headers in (("/stats", {}), ("/health", {}), ("/api/capabilities/online", CLIENT)):
        text = await (await client.get(path, headers=headers)).text()
        assert agent.key not in text


def test_display_name_and_app_version_survive_a_restart(server):
    from conftest import http
    server.new_agent(["echo"], displayName="kept", appVersion="1.0")
    server.restart()
    status, [listed] = http("GET", server.url + "/management/agents/list", headers=server.mgmt)
    assert status == 200 and (listed["displayName"], listed["appVersion"]) == ("kept", "1.0")
