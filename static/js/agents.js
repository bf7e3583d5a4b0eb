// Agents: every registered agent with its state, load and machine; drain one before
// maintenance and resume it, revoke its credential, delete one, reset all; the agents'
// latest log lines. Follows the event stream (agent_log events bring new lines).

import { api } from "./api.js";
import { poll } from "./poll.js";
import { follow, pace } from "./events.js";
import { h, mountTemplate, fillTable, tr, numCell, showError, chips, timeCell, memory, confirmAction, act, copyButton } from "./dom.js";
import { flattenTasks, inFlightByAgent, agentShortId } from "./model.js";

const LABELS = ["Agent", "State", "Tier", "In flight", "Capabilities", "System", "Last contact", ""];
const LOG_LABELS = ["Time", "Agent", "Severity", "Line"];
const LOG_LINES = 50;

export function mount(root) {
  const refs = mountTemplate(root, "agents");

  const loop = poll(
    async () => {
      const agents = (await api.agents()) || [];
      // Servers before tasksInFlight: count from the task listing.
      const counted = agents.every((a) => typeof a.tasksInFlight === "number");
      const inFlight = counted
        ? new Map(agents.map((a) => [a.uid, a.tasksInFlight]))
        : inFlightByAgent(flattenTasks(await api.tasks()));
      render(refs, agents, inFlight, loop);
      // Servers without agent logs answer 404: the section stays empty.
      const logs = await api.agentLogs(LOG_LINES).catch(() => null);
      renderLogs(refs, (logs && logs.items) || []);
      showError(refs.error, null);
    },
    // Going offline is a matter of time, not an event: keep a slow pace while live.
    { everyMs: pace(10000, 3000), onError: (err) => showError(refs.error, err) },
  );
  const unfollow = follow(loop, (e) => ["agent", "agent_log", "status", "end"].includes(e.type), 800);

  refs.reset.addEventListener("click", async () => {
    const ok = await confirmAction(
      "Reset all agents?",
      "Every agent is forgotten and must register again. Their tasks are handled as for lost agents.",
      "Reset agents",
    );
    if (ok) await act(refs.reset, () => api.resetAgents(), "All agents were reset.");
    loop.now();
  });

  return () => {
    unfollow();
    loop.stop();
  };
}

function render(refs, agents, inFlight, loop) {
  refs.count.textContent = String(agents.length);
  refs.empty.hidden = agents.length > 0;
  refs.table.hidden = agents.length === 0;
  const sorted = [...agents].sort(
    (a, b) => Number(!!b.online) - Number(!!a.online) || String(b.lastContact).localeCompare(String(a.lastContact)),
  );
  fillTable(
    refs.rows,
    sorted.map((agent) =>
      tr(
        [
          [
            agent.displayName ? h("div", {}, h("strong", { "data-ref": "agent-name" }, agent.displayName)) : null,
            h("div", { class: "agent-id" },
              h(agent.displayName ? "span" : "strong", { class: `mono${agent.displayName ? " small muted" : ""}`, title: agent.uid, dataset: { ref: "agent-id" } }, agentShortId(agent.uid)),
              copyButton(agent.uid, `agent id ${agentShortId(agent.uid)}`)),
            h("div", { class: "small muted" }, "registered ", timeCell(agent.registeredAt),
              agent.appVersion ? h("span", { "data-ref": "agent-version" }, ` · v${agent.appVersion}`) : null),
          ],
          [
            h("span", { class: "badge", dataset: { status: agent.online ? "online" : "offline" } }, agent.online ? "online" : "offline"),
            agent.draining ? h("span", { class: "badge", dataset: { status: "draining" }, title: "Gets no new tasks; keeps its running ones" }, "draining") : null,
          ],
          numCell(agent.tier),
          numCell(`${inFlight.get(agent.uid) || 0} / ${agent.capacity ?? "—"}`),
          chips(agent.capabilities),
          system(agent.systemInfo),
          timeCell(agent.lastContact),
          // An offline agent takes no tasks anyway: Drain would say nothing (Resume stays).
          h("td", { class: "actions" }, agent.online || agent.draining ? drainButton(agent, loop) : null,
            revokeButton(agent, loop), deleteButton(agent, loop)),
        ],
        LABELS,
        { dataset: { agent: agent.uid, draining: String(!!agent.draining) }, class: agent.online ? undefined : "is-offline" },
      ),
    ),
  );
}

function renderLogs(refs, items) {
  refs["logs-empty"].hidden = items.length > 0;
  refs["logs-table"].hidden = items.length === 0;
  fillTable(
    refs.logs,
    items.map((line) =>
      tr(
        [
          timeCell(line.timestamp),
          h("span", { title: line.agentId, class: line.agentName ? undefined : "mono" }, line.agentName || agentShortId(line.agentId)),
          h("span", { class: "badge", dataset: { severity: String(line.severity).toLowerCase() } }, line.severity),
          h("span", { class: "mono" }, line.text),
        ],
        LOG_LABELS,
        { dataset: { log: line.recordId } },
      ),
    ),
  );
}

function system(info) {
  if (!info || typeof info !== "object") return h("span", { class: "muted" }, "—");
  const main = [info.os, info.cpuArch, memory(info.totalMemoryMb)].filter(Boolean).join(" · ");
  const gpu = info.gpu && typeof info.gpu === "object"
    ? `GPU: ${[info.gpu.vendor, info.gpu.model].filter(Boolean).join(" ")}${memory(info.gpu.vramMb) ? ` (${memory(info.gpu.vramMb)})` : ""}`
    : "no GPU";
  const client = [info.client, info.runtime].filter(Boolean).join(" · ");
  return h("div", { class: "system", title: client || undefined },
    h("div", {}, main || "—"),
    h("div", { class: "small muted" }, gpu),
  );
}

// Drain: no new tasks, running ones finish. Reversible, so no confirmation.
function drainButton(agent, loop) {
  const name = agentShortId(agent.uid);
  const draining = !!agent.draining;
  const button = h(
    "button",
    { type: "button", class: "btn btn-small", title: draining ? "Hand it new tasks again" : "Give it no new tasks; its running ones finish" },
    draining ? "Resume" : "Drain",
  );
  button.addEventListener("click", async () => {
    const done = await act(
      button,
      () => (draining ? api.resumeAgent(agent.uid) : api.drainAgent(agent.uid)),
      draining ? `Agent ${name} gets tasks again.` : `Agent ${name} is draining: no new tasks.`,
    );
    if (done) loop.now();
  });
  return button;
}

// Revoke credential: for a machine that may be compromised. The agent keeps its id and
// tasks; it must register again (our agent does so by itself with a registration key).
function revokeButton(agent, loop) {
  const name = agentShortId(agent.uid);
  const button = h("button", { type: "button", class: "btn btn-small btn-danger-ghost", dataset: { action: "revoke" } }, "Revoke credential");
  button.addEventListener("click", async () => {
    const ok = await confirmAction(
      `Revoke the credential of agent ${name}?`,
      "Its login secret is replaced and every token it holds stops working at once. It keeps its id and its tasks; it must register again to get a new credential.",
      "Revoke credential",
    );
    if (!ok) return;
    const done = await act(button, () => api.rotateAgentKey(agent.uid), `Agent ${name}: credential revoked.`);
    if (done) loop.now();
  });
  return button;
}

function deleteButton(agent, loop) {
  const button = h("button", { type: "button", class: "btn btn-small btn-danger-ghost" }, "Delete");
  button.addEventListener("click", async () => {
    const ok = await confirmAction(
      `Delete agent ${agentShortId(agent.uid)}?`,
      "It must register again to get work. Tasks it holds go back to their queue if restartable, otherwise they fail.",
      "Delete agent",
    );
    if (!ok) return;
    await act(button, () => api.deleteAgent(agent.uid), `Agent ${agentShortId(agent.uid)} deleted.`);
    loop.now();
  });
  return button;
}
