// Overview: server health, agents, capabilities online, tasks by status, queue depth.

import { api } from "./api.js";
import { poll } from "./poll.js";
import { follow, pace } from "./events.js";
import { h, mountTemplate, fillTable, fillFacts, showError, badge, absTime, numCell, duration, plural } from "./dom.js";
import { STATUSES, IN_FLIGHT, WAITING } from "./model.js";

export function mount(root) {
  const refs = mountTemplate(root, "overview");

  const loop = poll(
    async () => {
      const [health, stats, capabilities] = await Promise.all([
        api.health(),
        api.stats(),
        api.capabilitiesOnline(),
      ]);
      render(refs, health || {}, stats || {}, capabilities || []);
      showError(refs.error, null);
    },
    { everyMs: pace(10000, 2000), onError: (err) => showError(refs.error, err) },
  );
  // Any change moves a count: refresh on events, at most once a second.
  const unfollow = follow(loop, (e) => e.type !== "log" && e.type !== "agent_log", 1000);
  return () => {
    unfollow();
    loop.stop();
  };
}

function render(refs, health, stats, capabilities) {
  refs.health.textContent = health.status || "unknown";
  refs.health.dataset.state = health.status === "healthy" ? "up" : "down";
  refs["health-note"].textContent = [
    stats.version ? `v${stats.version}` : null,
    typeof stats.uptimeSecs === "number" ? `up ${duration(stats.uptimeSecs * 1000)}` : null,
    typeof health.cached_agents === "number" ? `${plural(health.cached_agents, "agent")} cached` : null,
    health.message || null, // why it is unhealthy
  ]
    .filter(Boolean)
    .join(" · ");

  const agents = stats.agents || {};
  refs["agents-online"].textContent = num(agents.online);
  refs["agents-all"].textContent = `of ${num(agents.all)} registered`;

  const byQueue = stats.tasks || {};
  const urgent = byQueue.urgent || {};
  const regular = byQueue.regular || {};
  const total = (set) =>
    [urgent, regular].reduce((sum, q) => sum + [...set].reduce((s, status) => s + (Number(q[status]) || 0), 0), 0);
  refs["in-flight"].textContent = String(total(IN_FLIGHT));
  refs.waiting.textContent = String(total(WAITING));

  refs.capabilities.replaceChildren(
    ...(capabilities.length
      ? capabilities.map((c) => h("span", { class: "chip" }, c))
      : [h("span", { class: "muted" }, "No agent is online.")]),
  );

  // Known statuses in lifecycle order, then any the server adds.
  const extra = Object.keys({ ...urgent, ...regular }).filter((s) => !STATUSES.includes(s));
  const statusRows = [...STATUSES, ...extra]
    .filter((s) => urgent[s] || regular[s])
    .map((s) => [badge(s), numCell(num(urgent[s] || 0)), numCell(num(regular[s] || 0))]);
  if (statusRows.length) fillTable(refs["by-status"], statusRows);
  else refs["by-status"].replaceChildren(emptyRow(3, "No tasks yet."));

  const queues = Object.entries(stats.queues || {}).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  const deepest = Math.max(1, ...queues.map(([, n]) => Number(n) || 0));
  if (queues.length) {
    fillTable(
      refs.queues,
      queues.map(([cap, n]) => [
        h("span", { class: "mono" }, cap),
        numCell(num(n)),
        h("td", { class: "bar-col" }, h("span", { class: "bar" }, h("span", { style: `width:${Math.round(((Number(n) || 0) / deepest) * 100)}%` }))),
      ]),
    );
  } else refs.queues.replaceChildren(emptyRow(3, "Every queue is empty."));

  const journal = stats.journal;
  refs["journal-card"].hidden = !journal || typeof journal !== "object";
  if (journal && typeof journal === "object") {
    fillFacts(
      refs.journal,
      Object.entries(journal).map(([k, v]) => [label(k), typeof v === "object" && v !== null ? JSON.stringify(v) : fact(k, v)]),
    );
  }
  refs.updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
  refs.updated.title = absTime(health.timestamp);
}

function emptyRow(span, text) {
  return h("tr", { class: "empty-row" }, h("td", { colspan: String(span) }, text));
}

function num(n) {
  return typeof n === "number" ? n.toLocaleString() : n === undefined || n === null ? "—" : String(n);
}

// journalBytes → "Journal bytes"
function label(key) {
  const words = key.replace(/([a-z])([A-Z])/g, "$1 $2").replace(/_/g, " ").toLowerCase();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function fact(key, value) {
  if (value === null || value === undefined) return /At$|_at$/.test(key) ? "never" : "—";
  if (typeof value === "number" && /bytes/i.test(key)) {
    if (value >= 1048576) return `${(value / 1048576).toFixed(1)} MiB`;
    if (value >= 1024) return `${(value / 1024).toFixed(1)} KiB`;
    return `${value} B`;
  }
  if (typeof value === "string" && /_at$|At$/.test(key)) return absTime(value);
  return typeof value === "number" ? value.toLocaleString() : String(value);
}
