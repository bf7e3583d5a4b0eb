"""The management console (static/) in a real headless Chromium against a real server.

Each test starts `python offloadmq.py` (the `server` fixture), opens the console in a
fresh browser context and drives it like a person would. Agents are scripted over HTTP.
Every test fails on a JavaScript error (an uncaught exception or a console error); the
only console errors allowed are the browser's own lines for HTTP errors a test provokes
on purpose. When a test fails, screenshots of every page land in its tmp folder.
"""
import json
import os
import re
import shutil
import threading
import time
import urllib.parse

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import http

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PAGES = ["overview", "agents", "tasks", "keys", "sandbox"]
HTTP_ERROR_LINE = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")
SYSTEM_INFO = {
    "os": "linux", "client": "scripted-agent", "runtime": "python", "cpuArch": "x86_64",
    "totalMemoryMb": 16384, "gpu": {"vendor": "NVIDIA", "model": "RTX 4090", "vramMb": 24576},
}

expect.set_options(timeout=10_000)


def chromium_path():
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        pytest.fail(f"Chromium not found at {path}: run `make browser` (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# ----------------------------------------------------------------------------- agents

def quoted(task_id):
    return f"{urllib.parse.quote(task_id['cap'], safe='')}/{urllib.parse.quote(task_id['id'], safe='')}"


class Agent:
    """An agent spoken over HTTP, step by step, from the test itself."""

    def __init__(self, server, capabilities, capacity=2, tier=1):
        self.url = server.url
        status, reg = http("POST", self.url + "/agent/register", {
            "capabilities": capabilities, "tier": tier, "capacity": capacity,
            "systemInfo": SYSTEM_INFO, "apiKey": server.agent_key,
        })
        assert status == 200, reg
        self.id = reg["agentId"]
        status, auth = http("POST", self.url + "/agent/auth", {"agentId": self.id, "key": reg["key"]})
        assert status == 200, auth
        self.headers = {"Authorization": f"Bearer {auth['token']}"}
        assert http("GET", self.url + "/private/agent/ping", headers=self.headers)[0] == 200

    def poll(self, wait=5):
        status, task = http("GET", f"{self.url}/private/agent/task/poll?wait={wait}", headers=self.headers)
        assert status == 200, task
        return task

    def take(self, task_id):
        status, task = http("POST", f"{self.url}/private/agent/take/{quoted(task_id)}", headers=self.headers)
        assert status == 200, task
        return task

    def progress(self, task_id, stage=None, log=None):
        body = {"id": task_id, "stage": stage, "logUpdate": log}
        status, answer = http("POST", f"{self.url}/private/agent/task/progress/{quoted(task_id)}", body, self.headers)
        assert status == 200, answer

    def resolve(self, task_id, output, seconds=0.1):
        body = {"id": task_id, "capability": task_id["cap"], "status": {"success": seconds}, "output": output}
        status, answer = http("POST", f"{self.url}/private/agent/task/resolve/{quoted(task_id)}", body, self.headers)
        assert status == 200, answer


class CancelAwareAgent(Agent):
    """An agent in a thread that works until told to stop: it takes each task, reports a
    log line every quarter second until a progress answer says "cancel": true, waits
    `linger` seconds (as a process being killed would), then resolves with a failure."""

    def __init__(self, server, capabilities, linger=1.0):
        super().__init__(server, capabilities)
        self.linger = linger
        self.stopping = threading.Event()
        self.canceled = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopping.is_set():
            task = self.poll(wait=1)
            if not task:
                continue
            task_id = task["id"]
            self.take(task_id)
            tick = 0
            while not self.stopping.is_set():
                tick += 1
                body = {"id": task_id, "stage": "ticking", "logUpdate": f"tick {tick}\n"}
                status, answer = http("POST", f"{self.url}/private/agent/task/progress/{quoted(task_id)}",
                                      body, self.headers)
                assert status == 200, answer
                if answer.get("cancel") is True:
                    break
                time.sleep(0.25)
            self.canceled.append(task_id)
            time.sleep(self.linger)
            body = {"id": task_id, "capability": task_id["cap"], "status": {"failure": ["killed", 0.1]},
                    "output": None}
            status, answer = http("POST", f"{self.url}/private/agent/task/resolve/{quoted(task_id)}",
                                  body, self.headers)
            assert status == 200, answer

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=5)


class ScriptedAgent(Agent):
    """An agent in a thread: takes every task it gets, reports two log lines, answers
    shell.bash like bash, llm.* like Ollama, and anything else by echoing the payload."""

    def __init__(self, server, capabilities):
        super().__init__(server, capabilities)
        self.stopping = threading.Event()
        self.done = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopping.is_set():
            task = self.poll(wait=1)
            if not task:
                continue
            task_id, payload = task["id"], task["data"].get("payload") or {}
            self.take(task_id)
            self.progress(task_id, stage="working", log="working: step 1\n")
            self.progress(task_id, log="working: step 2\n")
            if task_id["cap"] == "shell.bash":
                output = {"stdout": f"ran {payload['command']}\n", "stderr": "", "exit_code": 0}
            elif task_id["cap"].startswith("llm."):
                said = payload["messages"][-1]["content"]
                output = {"model": task_id["cap"], "message": {"role": "assistant", "content": f"pong: {said}"}}
            else:
                output = {"echo": payload}
            self.resolve(task_id, output)
            self.done.append(task_id)

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=5)


@pytest.fixture
def scripted_agent(server):
    agents = []

    def start(capabilities, cls=None, **options):
        agents.append((cls or ScriptedAgent)(server, capabilities, **options))
        return agents[-1]

    yield start
    for agent in agents:
        agent.stop()


# ----------------------------------------------------------------------------- the console

class Console:
    """One browser tab on the console, with the JavaScript errors it has seen."""

    def __init__(self, context, server):
        self.context = context
        self.server = server
        self.page = context.new_page()
        self.errors = []
        self.allowed_http = set()
        self.allow_blocked = False
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("console", self.on_console)

    def on_console(self, message):
        if message.type != "error":
            return
        http_error = HTTP_ERROR_LINE.search(message.text)
        if http_error and int(http_error.group(1)) in self.allowed_http:
            return
        if self.allow_blocked and "net::ERR_FAILED" in message.text:
            return
        self.errors.append(f"console.error: {message.text}")

    def expect_http_errors(self, *statuses):
        """The browser logs a console error for every 4xx/5xx; allow the provoked ones."""
        self.allowed_http.update(statuses)

    def block(self, pattern):
        """Fail the browser's requests to these URLs, as a proxy that drops them would."""
        self.allow_blocked = True
        self.page.route(pattern, lambda route: route.abort())

    def open(self, route=""):
        self.page.goto(f"{self.server.url}/{route}")
        return self.page

    def sign_in(self, token=None):
        page = self.open()
        page.fill("#signin-token", token or self.server.mgmt_token)
        page.press("#signin-token", "Enter")
        expect(page.locator("#topbar")).to_be_visible()
        return page

    def go(self, route):
        self.page.click(f"#nav a[data-page={route}]")
        expect(self.page.locator("#view")).to_have_attribute("data-page", route)
        return self.page

    def screenshots(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(folder / "at-failure.png"), full_page=True)
        for name in PAGES:
            self.page.goto(f"{self.server.url}/#/{name}")
            self.page.wait_for_timeout(600)
            self.page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


@pytest.fixture
def console_factory(browser, server, request, tmp_path):
    consoles = []
    failed_before = request.session.testsfailed

    def make(**context_options):
        context = browser.new_context(**{"viewport": {"width": 1280, "height": 800}, **context_options})
        consoles.append(Console(context, server))
        return consoles[-1]

    yield make
    # The call phase has been reported by now, so testsfailed tells whether it failed.
    failed = request.session.testsfailed > failed_before
    errors = [e for c in consoles for e in c.errors]
    for i, c in enumerate(consoles):
        if failed or errors:
            try:
                c.screenshots(tmp_path / "screenshots" / f"console-{i}")
            except Exception as exc:  # a dead page must not hide the real failure
                print(f"screenshots failed: {exc}")
        c.context.close()
    if failed or errors:
        print(f"screenshots in {tmp_path / 'screenshots'}")
    assert not errors, "JavaScript errors in the console:\n" + "\n".join(errors)


@pytest.fixture
def console(console_factory):
    return console_factory()


# ----------------------------------------------------------------------------- tests

def test_sign_in_refuses_a_wrong_token_and_keeps_the_right_one(console, server):
    console.expect_http_errors(401)
    page = console.open()
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#topbar")).to_be_hidden()

    page.fill("#signin-token", "not-the-token")
    page.press("#signin-token", "Enter")
    expect(page.locator("#signin-error")).to_contain_text("Wrong token")
    expect(page.locator("#topbar")).to_be_hidden()
    assert page.evaluate("localStorage.length") == 0

    page.fill("#signin-token", server.mgmt_token)
    page.press("#signin-token", "Enter")
    expect(page.locator("#topbar")).to_be_visible()
    expect(page.locator("#view h1")).to_have_text("Overview")
    expect(page.locator("#nav a")).to_have_text(["Overview", "Agents", "Tasks", "API keys", "Sandbox"])

    page.reload()  # the token is remembered
    expect(page.locator("#topbar")).to_be_visible()
    expect(page.locator("#health")).to_have_attribute("data-state", "up")

    page.click("#sign-out")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("localStorage.length") == 0


def test_overview_shows_online_agents_capabilities_and_queue_depth(console, server):
    Agent(server, ["echo.test", "vision[gpu;cuda12]"])
    for n in range(2):
        server.submit("train/big", {"n": n})
    page = console.sign_in()

    view = page.locator("#view")
    expect(view.locator("[data-ref=health]")).to_have_text("healthy")
    expect(view.locator("[data-ref=agents-online]")).to_have_text("1")
    expect(view.locator("[data-ref=capabilities] .chip")).to_have_text(["echo.test", "vision"])
    expect(view.locator("[data-ref=queues] tr", has_text="train/big")).to_contain_text("2")
    expect(view.locator("[data-ref=by-status] tr", has_text="pending")).to_contain_text("2")
    expect(view.locator("[data-ref=waiting]")).to_have_text("2")
    expect(view.locator("[data-ref=health-note]")).to_contain_text("1 agent cached")


def test_health_says_unhealthy_and_why_while_the_disk_refuses_writes(console, server):
    """The journal replaced under the running server (storage_lost, for real): /health
    answers 503 with the reason, and the console shows the server up but unhealthy, with
    that reason, rather than unreachable; the overview still shows the counts."""
    server.submit("train/big", {"n": 1})
    journal = server.data / "journal.jsonl"
    replacement = server.data / "journal.jsonl.new"
    replacement.write_bytes(journal.read_bytes())
    os.replace(replacement, journal)
    deadline = time.monotonic() + 10
    while http("GET", server.url + "/health")[0] != 503:  # the next background round sees it
        assert time.monotonic() < deadline, "the lost journal was not noticed"
        time.sleep(0.1)
    console.expect_http_errors(503)
    page = console.sign_in()

    expect(page.locator("#health-text")).to_have_text("unhealthy")
    expect(page.locator("#health")).to_have_attribute("title", re.compile("no longer the journal"))
    view = page.locator("#view")
    expect(view.locator("[data-ref=health]")).to_have_text("unhealthy")
    expect(view.locator("[data-ref=health-note]")).to_contain_text("restart the server")
    expect(view.locator("[data-ref=waiting]")).to_have_text("1")


def test_agents_page_shows_an_agent_and_deletes_it_after_confirmation(console, server):
    agent = Agent(server, ["shell.bash", "llm.test"], capacity=2, tier=3)
    task_id = server.submit("shell.bash", {"command": "sleep 1"})
    agent.take(agent.poll()["id"])
    page = console.sign_in()
    console.go("agents")

    row = page.locator(f"tr[data-agent='{agent.id}']")
    expect(row).to_contain_text(agent.id[-6:])
    expect(row.locator(".badge")).to_have_text("online")
    expect(row.locator("td[data-label=Tier]")).to_have_text("3")
    expect(row.locator("td[data-label='In flight']")).to_have_text("1 / 2")
    expect(row.locator(".chip")).to_have_text(["shell.bash", "llm.test"])
    expect(row.locator("td[data-label=System]")).to_contain_text("linux · x86_64 · 16 GB")
    expect(row.locator("td[data-label=System]")).to_contain_text("RTX 4090")
    expect(row.locator("td[data-label='Last contact']")).to_contain_text(re.compile(r"just now|s ago"))

    row.get_by_role("button", name="Delete").click()
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm-cancel")
    expect(page.locator("#confirm")).to_be_hidden()
    expect(row).to_be_visible()

    row.get_by_role("button", name="Delete").click()
    page.click("#confirm-ok")
    expect(row).to_have_count(0)
    expect(page.locator("[data-ref=empty]")).to_be_visible()
    assert http("GET", server.url + "/management/agents/list", headers=server.mgmt)[1] == []
    assert task_id  # its task is the server's business now (lost-agent rules)


def test_tasks_page_filters_and_shows_a_task_growing_live(console, server):
    agent = Agent(server, ["render.html"])
    hostile = "<img src=x onerror='window.__pwned = 1'><b>bold</b>"
    task_id = server.submit("render.html", {"html": hostile})
    server.submit("other.cap", {"n": 1})
    page = console.sign_in()
    console.go("tasks")

    rows = page.locator("#view tbody tr")
    expect(rows).to_have_count(2)
    page.select_option("[data-ref=f-capability]", "render.html")
    expect(rows).to_have_count(1)
    page.select_option("[data-ref=f-status]", "completed")
    expect(rows).to_have_count(0)
    expect(page.locator("[data-ref=empty]")).to_contain_text("No task matches")
    page.select_option("[data-ref=f-status]", "")
    expect(rows).to_have_count(1)

    rows.first.click()
    expect(page.locator("#view [data-ref=title]")).to_have_text(task_id["id"])
    payload = page.locator("[data-ref=payload]")
    expect(payload).to_contain_text(hostile)  # shown as text, not as markup
    assert payload.locator("img, b").count() == 0

    agent.take(agent.poll()["id"])
    agent.progress(task_id, stage="rendering", log="first line\n")
    expect(page.locator("[data-ref=log]")).to_have_text("first line\n")
    expect(page.locator("[data-ref=status]")).to_have_text("running")
    expect(page.locator("[data-ref=facts]")).to_contain_text("rendering")
    agent.progress(task_id, log="second line\n")
    expect(page.locator("[data-ref=log]")).to_have_text("first line\nsecond line\n")
    agent.resolve(task_id, {"pixels": 42})
    expect(page.locator("[data-ref=status]")).to_have_text("completed")
    expect(page.locator("[data-ref=output]")).to_contain_text('"pixels": 42')
    expect(page.locator("[data-ref=history] li").first).to_be_visible()
    assert page.evaluate("window.__pwned") is None


def test_api_keys_can_be_created_and_revoked(console, server):
    page = console.sign_in()
    console.go("keys")
    expect(page.locator(f"tr[data-key='{server.client_key}']")).to_contain_text("predefined")

    page.click("[data-ref=generate]")
    expect(page.locator("[data-ref=key]")).to_have_value(re.compile(r"^ck-[0-9a-f]{32}$"))
    page.fill("[data-ref=key]", "ck-console-test-key")
    page.fill("[data-ref=capabilities]", "llm.*, shell.bash")
    page.click("[data-ref=create]")
    row = page.locator("tr[data-key='ck-console-test-key']")
    expect(row.locator(".chip")).to_have_text(["llm.*", "shell.bash"])
    expect(row.locator(".badge")).to_have_text("active")
    keys = {k["key"]: k for k in http("GET", server.url + "/management/client_api_keys/list", headers=server.mgmt)[1]}
    assert keys["ck-console-test-key"]["capabilities"] == ["llm.*", "shell.bash"]

    row.get_by_role("button", name="Revoke").click()
    expect(page.locator("#confirm-text")).to_contain_text("ck-con…")  # its first characters only
    page.click("#confirm-ok")
    expect(row.locator(".badge")).to_have_text("revoked")
    expect(row.get_by_role("button", name="Revoke")).to_have_count(0)
    keys = {k["key"]: k for k in http("GET", server.url + "/management/client_api_keys/list", headers=server.mgmt)[1]}
    assert keys["ck-console-test-key"]["isRevoked"] is True


def test_sandbox_submit_completes_with_a_scripted_agent(console, server, scripted_agent):
    agent = scripted_agent(["echo"])
    page = console.sign_in()
    console.go("sandbox")
    expect(page.locator("#sandbox-capabilities option")).to_have_count(1)

    page.fill("[data-ref=capability]", "echo")
    page.fill("[data-ref=payload]", '{"text": ')
    expect(page.locator("[data-ref=payload-state]")).to_contain_text("Invalid JSON")
    expect(page.locator("[data-ref=submit]")).to_be_disabled()
    page.fill("[data-ref=payload]", '{"text": "<i>hello</i>"}')
    expect(page.locator("[data-ref=submit]")).to_be_enabled()
    page.click("[data-ref=submit]")

    expect(page.locator("[data-ref=run-status]")).to_have_text("completed")
    expect(page.locator("[data-ref=run-log]")).to_contain_text("working: step 2")
    expect(page.locator("[data-ref=run-output]")).to_contain_text('"text": "<i>hello</i>"')
    assert len(agent.done) == 1

    # The same task blocking: one request held until the agent has answered.
    page.check("[data-ref=blocking]")
    expect(page.locator("[data-ref=urgent]")).to_be_checked()
    page.click("[data-ref=submit]")
    expect(page.locator("[data-ref=run-status]")).to_have_text("completed")
    expect(page.locator("[data-ref=run-output]")).to_contain_text("hello")
    assert len(agent.done) == 2

    page.click("[data-ref=run-link]")
    expect(page.locator("#view [data-ref=status]")).to_have_text("completed")


def test_sandbox_bash_console_and_llm_chat_talk_to_agents(console, server, scripted_agent):
    scripted_agent(["shell.bash", "llm.tiny"])
    page = console.sign_in()
    console.open("#/sandbox/bash")

    terminal = page.locator("[data-ref=term-out]")
    expect(terminal).to_contain_text("shell.bash is online")
    page.fill("[data-ref=term-input]", "echo '<b>hi</b>'")
    page.press("[data-ref=term-input]", "Enter")
    expect(terminal.locator(".term-cmd")).to_have_text("echo '<b>hi</b>'")
    expect(terminal).to_contain_text("ran echo '<b>hi</b>'")
    expect(terminal.locator(".term-meta").last).to_have_text("completed · exit 0")
    expect(page.locator("[data-ref=term-input]")).to_be_enabled()

    page.click("[data-tab=chat]")
    expect(page.locator("[data-ref=chat-model]")).to_have_value("llm.tiny")
    page.fill("[data-ref=chat-input]", "ping")
    page.press("[data-ref=chat-input]", "Enter")
    expect(page.locator(".msg-user .msg-text")).to_have_text("ping")
    expect(page.locator(".msg-assistant:not(.is-pending) .msg-text")).to_have_text("pong: ping")
    page.fill("[data-ref=chat-input]", "again")
    page.press("[data-ref=chat-input]", "Enter")
    expect(page.locator(".msg-assistant:not(.is-pending) .msg-text")).to_have_text(["pong: ping", "pong: again"])


def test_server_errors_show_the_servers_own_message(console, server):
    console.expect_http_errors(503)
    status, body = http("POST", server.url + "/api/task/submit",
                        {"capability": "nobody.serves.this", "urgent": True}, server.mgmt)
    assert status == 503, body
    page = console.sign_in()
    console.go("sandbox")
    page.fill("[data-ref=capability]", "nobody.serves.this")
    page.check("[data-ref=urgent]")
    page.click("[data-ref=submit]")
    error = page.locator("[data-ref=run-error]")
    expect(error).to_have_text(body["error"]["message"])
    expect(page.locator("#view")).not_to_contain_text("[object Object]")


def test_console_fits_a_phone_screen(console_factory, server):
    Agent(server, ["echo"])
    console = console_factory(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = console.sign_in()
    for link in page.locator("#nav a").all():
        box = link.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, link.text_content()
    console.go("agents")
    for thead in page.locator("#view thead").all():  # the agents' and the logs' tables
        expect(thead).to_be_hidden()  # rows become labelled cards
    row = page.locator("#view tbody tr").first
    expect(row).to_contain_text("online")
    assert row.bounding_box()["width"] <= 390
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_live_data_pauses_while_the_tab_is_hidden(console, server):
    page = console.sign_in()  # the overview refreshes /stats every 2 s
    expect(page.locator("[data-ref=agents-online]")).to_have_text("0")
    set_hidden = """hidden => {
        Object.defineProperty(document, "hidden", {configurable: true, get: () => hidden});
        document.dispatchEvent(new Event("visibilitychange"));
    }"""
    asked = []
    page.on("request", lambda r: "/stats" in r.url and asked.append(r.url))
    page.evaluate(set_hidden, True)
    page.wait_for_timeout(300)  # a request already on its way may still land
    asked.clear()
    page.wait_for_timeout(4500)
    assert asked == [], "the console kept polling in a hidden tab"

    Agent(server, ["echo"])
    with page.expect_request(lambda r: "/stats" in r.url, timeout=1500):
        page.evaluate(set_hidden, False)  # shown again: refreshes at once, not after a delay
    expect(page.locator("[data-ref=agents-online]")).to_have_text("1")


# ----------------------------------------------------------------------------- lifecycle and live updates

def task_in_listing(server, task_id):
    listing = http("GET", server.url + "/management/tasks/list", headers=server.mgmt)[1]
    for queue in listing.values():
        for task in queue["assigned"] + queue["unassigned"]:
            if task["id"] == task_id:
                return {"status": "pending", **task}
    return None


def test_a_running_task_is_canceled_from_its_page_while_its_log_streams_live(console, server, scripted_agent):
    agent = scripted_agent(["job.long"], cls=CancelAwareAgent, linger=1.5)
    page = console.sign_in()
    expect(page.locator("#live")).to_have_text("live")
    task_id = server.submit("job.long", {"n": 1})
    console.open(f"#/tasks/job.long/{task_id['id']}")

    log = page.locator("[data-ref=log]")
    expect(log).to_contain_text("tick 1")
    # While the stream is live the page does not poll the listing for the log: it grows
    # from the stream's `log` events.
    listed = []
    page.on("request", lambda r: "/management/tasks/list" in r.url and listed.append(r.url))
    expect(log).to_contain_text("tick 5")
    assert len(listed) <= 1, listed  # at most the slow safety refresh
    expect(page.locator("[data-ref=status]")).to_have_text("running")
    expect(page.locator("[data-ref=facts]")).to_contain_text("ticking")
    expect(page.locator("[data-ref=facts]")).to_contain_text("Attempt")

    cancel = page.locator("#view [data-ref=cancel]")
    cancel.click()
    expect(page.locator("#confirm-text")).to_contain_text("asked to stop")
    page.click("#confirm-cancel")  # not yet: nothing happens
    assert task_in_listing(server, task_id)["cancelRequested"] is False
    cancel.click()
    page.click("#confirm-ok")
    expect(page.locator("[data-ref=cancel-note]")).to_be_visible()
    expect(cancel).to_be_disabled()
    expect(page.locator("[data-ref=status]")).to_have_text("canceled")
    expect(cancel).to_be_hidden()
    expect(page.locator("[data-ref=cancel-note]")).to_be_hidden()
    expect(page.locator("[data-ref=history]")).to_contain_text("cancel requested")
    assert agent.canceled == [task_id]
    assert task_in_listing(server, task_id)["status"] == "canceled"


def test_dead_letters_show_and_requeue_with_priority_and_delays(console, server):
    agent = Agent(server, ["job.flaky"])
    dead = server.submit("job.flaky", {"n": 1}, priority=8)
    agent.take(agent.poll()["id"])
    body = {"id": dead, "capability": "job.flaky", "status": {"failure": ["boom", 0.1]}, "output": None}
    assert http("POST", f"{server.url}/private/agent/task/resolve/{quoted(dead)}", body, agent.headers)[0] == 200
    later = server.submit("job.flaky", {"n": 2}, delaySecs=600)
    page = console.sign_in()
    console.go("tasks")

    rows = page.locator("#view tbody tr")
    expect(rows).to_have_count(2)
    delayed = page.locator(f"tr[data-task='{later['id']}']")
    expect(delayed).to_contain_text("waiting until")
    expect(delayed).to_contain_text("p5")
    expect(delayed.locator("[data-action=cancel]")).to_be_visible()
    failed = page.locator(f"tr[data-task='{dead['id']}']")
    expect(failed).to_contain_text("p8")
    expect(failed.locator("td[data-label=Attempt]")).to_have_text("1")

    page.click("[data-ref=dead]")
    expect(page.locator("[data-ref=dead]")).to_have_attribute("aria-pressed", "true")
    expect(rows).to_have_count(1)
    expect(failed.locator(".badge")).to_have_text("failed")
    failed.locator("[data-action=requeue]").click()
    expect(page.locator(".toast")).to_contain_text("back in its queue")
    expect(page.locator("[data-ref=empty]")).to_contain_text("No dead letters")
    assert task_in_listing(server, dead)["status"] == "pending"

    page.click("[data-ref=dead]")
    expect(rows).to_have_count(2)
    expect(failed.locator(".badge")).to_have_text("pending")
    failed.locator("a").click()
    expect(page.locator("[data-ref=facts]")).to_contain_text("8")
    expect(page.locator("#view [data-ref=cancel]")).to_be_visible()
    expect(page.locator("#view [data-ref=requeue]")).to_be_hidden()


def test_agents_drain_and_resume_and_a_key_gets_a_limit(console, server):
    agent = Agent(server, ["echo"])
    page = console.sign_in()
    console.go("agents")
    row = page.locator(f"tr[data-agent='{agent.id}']")
    expect(row.locator(".badge")).to_have_text(["online"])
    row.get_by_role("button", name="Drain").click()
    expect(row.locator(".badge")).to_have_text(["online", "draining"])
    assert http("GET", server.url + "/management/agents/list", headers=server.mgmt)[1][0]["draining"] is True
    row.get_by_role("button", name="Resume").click()
    expect(row.locator(".badge")).to_have_text(["online"])
    assert http("GET", server.url + "/management/agents/list", headers=server.mgmt)[1][0]["draining"] is False

    console.go("keys")
    key_row = page.locator(f"tr[data-key='{server.client_key}']")
    limit = key_row.locator("td[data-label='Max in flight']")
    expect(limit).to_contain_text("no limit")
    key_row.locator("[data-action=limit]").click()
    key_row.locator("input[name=limit]").fill("3")
    key_row.get_by_role("button", name="Save").click()
    expect(limit).to_contain_text("3")
    keys = {k["key"]: k for k in http("GET", server.url + "/management/client_api_keys/list", headers=server.mgmt)[1]}
    assert keys[server.client_key]["maxInFlight"] == 3
    assert keys[server.client_key]["isRevoked"] is False

    key_row.locator("[data-action=limit]").click()
    key_row.locator("input[name=limit]").fill("")
    key_row.locator("input[name=limit]").press("Enter")
    expect(limit).to_contain_text("no limit")
    keys = {k["key"]: k for k in http("GET", server.url + "/management/client_api_keys/list", headers=server.mgmt)[1]}
    assert keys[server.client_key]["maxInFlight"] is None


def test_pages_fall_back_to_polling_when_the_event_stream_is_blocked(console, server):
    page = console.page
    console.block("**/management/events*")
    console.sign_in()
    expect(page.locator("#live")).to_have_text("polling")
    console.go("tasks")
    expect(page.locator("[data-ref=empty]")).to_be_visible()
    task_id = server.submit("job.quiet", {"n": 1})
    expect(page.locator(f"tr[data-task='{task_id['id']}']")).to_be_visible(timeout=5000)

    page.unroute("**/management/events*")  # the stream comes back: retried with backoff
    expect(page.locator("#live")).to_have_text("live")
    other = server.submit("job.quiet", {"n": 2})
    expect(page.locator(f"tr[data-task='{other['id']}']")).to_be_visible(timeout=3000)


def test_sandbox_sends_lifecycle_fields_and_stops_a_bash_command(console, server, scripted_agent):
    agent = scripted_agent(["shell.bash"], cls=CancelAwareAgent, linger=0.3)
    page = console.sign_in()
    console.go("sandbox")
    page.fill("[data-ref=capability]", "nobody.here")
    page.select_option("[data-ref=priority]", "7")
    page.fill("[data-ref=timeout]", "60")
    page.fill("[data-ref=retries]", "2")
    page.click("[data-ref=submit]")
    expect(page.locator("[data-ref=run-status]")).to_have_text("pending")
    task = task_in_listing(server, {"cap": "nobody.here", "id": page.locator("[data-ref=run]").get_attribute("data-task")})
    assert {k: task["data"].get(k) for k in ("priority", "timeoutSecs", "maxRetries", "restartable")} == {
        "priority": 7, "timeoutSecs": 60, "maxRetries": 2, "restartable": True}
    page.click("[data-ref=run-cancel]")
    expect(page.locator("[data-ref=run-status]")).to_have_text("canceled")
    expect(page.locator("[data-ref=run-cancel]")).to_be_hidden()

    page.check("[data-ref=urgent]")
    expect(page.locator("[data-ref=priority]")).to_be_disabled()
    expect(page.locator("[data-ref=delay]")).to_be_disabled()

    page.click("[data-tab=bash]")
    terminal = page.locator("[data-ref=term-out]")
    page.fill("[data-ref=term-input]", "sleep 30")
    page.press("[data-ref=term-input]", "Enter")
    expect(terminal).to_contain_text("tick 2")
    expect(page.locator("[data-ref=term-stop]")).to_be_visible()
    page.press("[data-ref=term-input]", "Control+c")
    expect(terminal).to_contain_text("^C · cancel requested")
    expect(terminal.locator(".term-error").last).to_have_text("canceled")
    expect(page.locator("[data-ref=term-stop]")).to_be_hidden()
    assert len(agent.canceled) == 1


def test_an_agents_credential_is_revoked_from_its_row(console, server):
    agent = Agent(server, ["echo"])
    task_id = server.submit("echo", {"n": 1})
    agent.take(agent.poll()["id"])
    page = console.sign_in()
    console.go("agents")
    row = page.locator(f"tr[data-agent='{agent.id}']")
    row.get_by_role("button", name="Revoke credential").click()
    expect(page.locator("#confirm-text")).to_contain_text("stops working")
    page.click("#confirm-ok")
    expect(page.locator(".toast")).to_contain_text("credential revoked")
    status, answer = http("GET", server.url + "/private/agent/ping", headers=agent.headers)
    assert status == 401 and "revoked" in answer["error"]["message"]
    # Same agent, same task: only its credential changed.
    expect(row.locator("td[data-label='In flight']")).to_have_text("1 / 2")
    [listed] = http("GET", server.url + "/management/agents/list", headers=server.mgmt)[1]
    assert listed["uid"] == agent.id and listed["tasksInFlight"] == 1
    assert task_id


def test_the_console_works_under_its_content_security_policy(console, server):
    """Every page renders with no inline script or style refused; the fixture fails the
    test on any console error, which is how Chromium reports a CSP violation too."""
    Agent(server, ["echo"])
    server.submit("train/big", {"n": 1})
    page = console.page
    page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation',"
                         " (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
    response = page.goto(server.url + "/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    console.sign_in()
    bar = page.locator("[data-ref=queues] .bar > span").first
    expect(bar).to_be_visible()
    assert bar.evaluate("el => el.style.width") == "100%"  # set through the CSSOM, allowed
    for name in PAGES:
        console.go(name)
        page.wait_for_timeout(200)
    assert page.evaluate("window.__csp") == []


def test_tasks_page_loads_a_page_and_adds_new_tasks_from_the_event_stream(console, server):
    for n in range(250):
        server.submit("bulk.job", {"n": n})
    page = console.page
    listings = []
    page.on("request", lambda r: listings.append(r.url) if "/management/tasks/list" in r.url else None)
    console.sign_in()
    console.go("tasks")
    rows = page.locator("#view tbody tr")
    expect(rows).to_have_count(200)
    expect(page.locator("#view [data-ref=count]")).to_have_text("250")
    expect(page.locator("[data-ref=more]")).to_contain_text("newest 200 of 250")
    expect(page.locator("#live")).to_have_text("live")
    assert listings and all("limit=" in url for url in listings), listings  # never the whole list
    asked = len(listings)

    task_id = server.submit("bulk.job", {"n": "new"})
    expect(rows.first).to_have_attribute("data-task", task_id["id"])
    expect(rows.first).to_contain_text("pending")
    expect(page.locator("#view [data-ref=count]")).to_have_text("251")
    http("POST", f"{server.url}/management/tasks/cancel/bulk.job/{task_id['id']}", headers=server.mgmt)
    expect(rows.first).to_contain_text("canceled")
    assert len(listings) == asked, listings[asked:]  # applied from the events, not fetched

    page.locator("[data-ref=load-more]").click()
    expect(rows).to_have_count(251)
    expect(page.locator("[data-ref=load-more]")).to_be_hidden()


def test_agents_page_shows_the_agents_display_name_and_version(console, server):
    status, reg = http("POST", server.url + "/agent/register", {
        "capabilities": ["debug.echo"], "systemInfo": SYSTEM_INFO, "apiKey": server.agent_key,
        "displayName": "Lab GPU box", "appVersion": "9.9.1"})
    assert status == 200, reg
    page = console.sign_in()
    console.go("agents")
    row = page.locator(f"tr[data-agent='{reg['agentId']}']")
    expect(row.locator("[data-ref=agent-name]")).to_have_text("Lab GPU box")
    expect(row).to_contain_text(reg["agentId"][-6:])
    expect(row.locator("[data-ref=agent-version]")).to_have_text(" · v9.9.1")


def test_agents_page_shows_the_agents_log_lines_as_they_come(console, server):
    agent = Agent(server, ["debug.echo"])
    page = console.sign_in()
    console.go("agents")
    expect(page.locator("[data-ref=logs-empty]")).to_be_visible()
    status, record = http("POST", server.url + "/private/agent/logs",
                          {"severity": "error", "text": "ollama: <b>connection</b> refused"}, agent.headers)
    assert status == 200, record
    row = page.locator(f"tr[data-log='{record['recordId']}']")
    # Within 5 s: the page's slow poll (10 s while live) would be too late; the stream's
    # agent_log event brings it.
    expect(row).to_contain_text("ollama: <b>connection</b> refused", timeout=5000)  # as text, not markup
    expect(row.locator(".badge")).to_have_text("ERROR")
    expect(row).to_contain_text(agent.id[-6:])


# ----------------------------------------------------------------------------- a new user's first hour

def clipboard_console(console_factory):
    """A console whose page may read the clipboard, to check what a Copy button put there."""
    console = console_factory(permissions=["clipboard-read", "clipboard-write"])
    return console, console.page


TOOK = r"(\d+ ms|[\d.]+ s|\d+ min \d+ s)"  # how the console writes a duration


def test_an_ended_task_shows_no_stage_and_how_long_it_waited_and_ran(console, server):
    agent = Agent(server, ["job.timed"])
    task_id = server.submit("job.timed", {"n": 1})
    page = console.sign_in()
    console.go("tasks")
    row = page.locator(f"tr[data-task='{task_id['id']}']")
    took = row.locator("td[data-label=Duration]")
    expect(took).to_have_text(re.compile(rf"^waited {TOOK}$"))

    agent.take(agent.poll()["id"])
    agent.progress(task_id, stage="running", log="x\n")
    expect(row.locator("td[data-label=Stage]")).to_have_text("running")
    expect(took).to_have_text(re.compile(rf"^waited {TOOK} · running {TOOK}$"))
    agent.resolve(task_id, {"ok": 1})
    expect(row.locator(".badge")).to_have_text("completed")
    expect(row.locator("td[data-label=Stage]")).to_have_text("—")
    expect(took).to_have_text(re.compile(rf"^waited {TOOK} · ran {TOOK}$"))

    page.reload()  # the same from the listing as from the events
    expect(row.locator("td[data-label=Stage]")).to_have_text("—")
    expect(took).to_have_text(re.compile(rf"^waited {TOOK} · ran {TOOK}$"))
    row.locator("a").click()
    facts = page.locator("[data-ref=facts]")
    expect(page.locator("[data-ref=status]")).to_have_text("completed")
    expect(facts.locator("dt")).to_contain_text(["Waited", "Ran"])
    expect(facts.locator("dt", has_text="Stage")).to_have_count(0)
    expect(facts).not_to_contain_text("running")
    expect(facts).not_to_contain_text("so far")


def test_llm_chat_says_so_when_no_llm_agent_is_online(console, server):
    page = console.sign_in()
    console.open("#/sandbox/chat")
    none = page.locator("[data-ref=chat-none]")
    expect(none).to_be_visible()
    expect(none).to_contain_text("No llm.* capability is online")
    expect(page.locator("[data-ref=chat-model]")).to_be_disabled()
    expect(page.locator("[data-ref=chat-send]")).to_be_disabled()

    Agent(server, ["llm.tiny"])
    expect(page.locator("[data-ref=chat-model] option")).to_have_text(["llm.tiny"])
    expect(none).to_be_hidden()
    expect(page.locator("[data-ref=chat-model]")).to_be_enabled()


def test_a_new_key_is_shown_in_full_once_with_copy_and_then_by_its_first_characters(console_factory, server):
    console, page = clipboard_console(console_factory)
    console.sign_in()
    console.go("keys")
    predefined = page.locator(f"tr[data-key='{server.client_key}']")
    expect(predefined.locator("td[data-label=Key]")).to_have_text(server.client_key[:6] + "…")

    page.click("[data-ref=generate]")
    key = page.locator("[data-ref=key]").input_value()
    page.fill("[data-ref=capabilities]", "debug.echo")
    page.click("[data-ref=create]")
    created = page.locator("[data-ref=created]")
    expect(created).to_be_visible()
    expect(created.locator("[data-ref=created-key]")).to_have_value(key)
    created.locator("[data-ref=copy-created]").click()
    expect(page.locator(".toast").last).to_contain_text("Copied the new key")
    assert page.evaluate("navigator.clipboard.readText()") == key

    row = page.locator(f"tr[data-key='{key}']")
    expect(row.locator("td[data-label=Key]")).to_have_text(key[:8] + "…")
    created.locator("[data-ref=dismiss-created]").click()
    expect(created).to_be_hidden()
    assert page.locator("[data-ref=created-key]").input_value() == ""
    for secret in (key, server.client_key):
        assert secret not in page.locator("body").inner_text()

    page.reload()  # and never again in full
    expect(row.locator("td[data-label=Key]")).to_have_text(key[:8] + "…")
    expect(created).to_be_hidden()
    row.get_by_role("button", name="Revoke").click()
    expect(page.locator("#confirm-text")).to_contain_text(key[:8] + "…")
    assert key not in page.locator("#confirm-text").inner_text()
    page.click("#confirm-ok")
    expect(page.locator(".toast").last).to_contain_text("revoked")
    assert key not in page.locator("body").inner_text()


def test_the_toast_leaves_the_last_api_key_row_visible(console, server):
    for n in range(20):  # more rows than fit: the page scrolls
        status, answer = http("POST", server.url + "/management/client_api_keys/update",
                              {"key": f"ck-many-keys-{n:02d}-padding", "capabilities": ["debug.echo"]}, server.mgmt)
        assert status == 200, answer
    page = console.sign_in()
    console.go("keys")
    rows = page.locator("#view tbody tr")
    expect(rows).to_have_count(21)
    last = rows.last
    last.locator("[data-action=limit]").click()
    last.locator("input[name=limit]").fill("3")
    last.get_by_role("button", name="Save").click()
    toast = page.locator(".toast").last
    expect(toast).to_contain_text("at most 3 tasks in flight")
    page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
    row_box, toast_box = rows.last.bounding_box(), toast.bounding_box()
    assert row_box["y"] + row_box["height"] <= toast_box["y"], (row_box, toast_box)


def test_agents_page_offers_no_drain_for_an_offline_agent_and_copies_its_id(console_factory, server):
    online = Agent(server, ["echo"])
    status, reg = http("POST", server.url + "/agent/register", {
        "capabilities": ["echo"], "systemInfo": SYSTEM_INFO, "apiKey": server.agent_key, "heartbeatSecs": 1})
    assert status == 200, reg
    deadline = time.monotonic() + 15  # offline after three missed heartbeats
    while any(a["uid"] == reg["agentId"] and a["online"]
              for a in http("GET", server.url + "/management/agents/list", headers=server.mgmt)[1]):
        assert time.monotonic() < deadline, "the silent agent stayed online"
        time.sleep(0.2)
    console, page = clipboard_console(console_factory)
    console.sign_in()
    console.go("agents")

    offline_row = page.locator(f"tr[data-agent='{reg['agentId']}']")
    expect(offline_row.locator(".badge")).to_have_text("offline")
    expect(offline_row.get_by_role("button", name="Delete")).to_be_visible()
    expect(offline_row.get_by_role("button", name="Drain")).to_have_count(0)
    online_row = page.locator(f"tr[data-agent='{online.id}']")
    expect(online_row.get_by_role("button", name="Drain")).to_be_visible()

    shown = online_row.locator("[data-ref=agent-id]")
    expect(shown).to_have_text("…" + online.id[-12:])
    online_row.locator("[data-action=copy]").click()
    expect(page.locator(".toast").last).to_contain_text("Copied agent id")
    assert page.evaluate("navigator.clipboard.readText()") == online.id
