// Entry point: sign-in, the header, and hash routing (#/agents, #/tasks/<cap>/<id>, …).
// Each page module exports mount(root, params) and returns a function that stops it.

import { api, getToken, setToken, clearToken, UNAUTHORIZED_EVENT } from "./api.js";
import { poll } from "./poll.js";
import * as live from "./events.js";
import * as overview from "./overview.js";
import * as agents from "./agents.js";
import * as tasks from "./tasks.js";
import * as keys from "./keys.js";
import * as sandbox from "./sandbox.js";

const PAGES = { overview, agents, tasks, keys, sandbox };
const TITLES = { overview: "Overview", agents: "Agents", tasks: "Tasks", keys: "API keys", sandbox: "Sandbox" };

const $ = (id) => document.getElementById(id);
const view = $("view");

let unmountPage = null;
let healthLoop = null;

function parseHash() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const name = PAGES[parts[0]] ? parts[0] : "overview";
  return { name, params: parts.slice(1) };
}

function route() {
  if ($("topbar").hidden) return; // signed out: the sign-in form owns the screen
  const { name, params } = parseHash();
  if (unmountPage) unmountPage();
  unmountPage = null;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${TITLES[name]} · OffloadMQ`;
  view.dataset.page = name;
  unmountPage = PAGES[name].mount(view, params) || null;
}

function showApp() {
  $("signin").hidden = true;
  $("topbar").hidden = false;
  view.hidden = false;
  startHealth();
  live.start();
  route();
}

// The header says whether pages hear changes as they happen or poll for them.
const LIVE_TEXT = {
  live: ["live", "Live: changes arrive over the server's event stream as they happen."],
  connecting: ["connecting…", "Opening the server's event stream."],
  down: ["polling", "The event stream is unavailable: pages refresh every few seconds and the stream is retried."],
  off: ["", ""],
};
live.onState((state) => {
  const [text, title] = LIVE_TEXT[state] || LIVE_TEXT.off;
  $("live").dataset.state = state;
  $("live-text").textContent = text;
  $("live").title = title;
});

function showSignIn(message) {
  if (unmountPage) unmountPage();
  unmountPage = null;
  if (healthLoop) healthLoop.stop();
  healthLoop = null;
  live.stop();
  view.replaceChildren();
  view.hidden = true;
  $("topbar").hidden = true;
  $("signin").hidden = false;
  const error = $("signin-error");
  error.hidden = !message;
  error.textContent = message || "";
  document.title = "Sign in · OffloadMQ";
  $("signin-token").value = "";
  $("signin-token").focus();
}

function startHealth() {
  if (healthLoop) return;
  const box = $("health");
  const text = $("health-text");
  healthLoop = poll(
    async () => {
      const health = await api.health();
      const ok = health && health.status === "healthy";
      box.dataset.state = ok ? "up" : "down";
      text.textContent = ok ? "healthy" : String((health && health.status) || "unknown");
      box.title = (health && health.message) || ""; // why it is unhealthy
    },
    {
      everyMs: 5000,
      onError: (err) => {
        box.dataset.state = "down";
        text.textContent = "unreachable";
        box.title = err.message;
      },
    },
  );
}

async function signIn(event) {
  event.preventDefault();
  const input = $("signin-token");
  const button = $("signin-submit");
  const error = $("signin-error");
  const token = input.value.trim();
  if (!token) return;
  button.disabled = true;
  error.hidden = true;
  try {
    await api.checkToken(token);
    setToken(token);
    showApp();
  } catch (err) {
    error.hidden = false;
    error.textContent =
      err.status === 401 || err.status === 403
        ? `Wrong token: the server refused it (${err.message}).`
        : err.message;
    input.select();
  } finally {
    button.disabled = false;
  }
}

function signOut() {
  clearToken();
  showSignIn();
}

$("signin-form").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
window.addEventListener(UNAUTHORIZED_EVENT, (event) => {
  clearToken();
  showSignIn(`The server no longer accepts the stored token (${event.detail.message}). Sign in again.`);
});

// Signing in or out in another tab of this console follows here.
window.addEventListener("storage", () => {
  const signedIn = !$("topbar").hidden;
  if (getToken() && !signedIn) showApp();
  else if (!getToken() && signedIn) showSignIn();
});

if (getToken()) showApp();
else showSignIn();
