// Agents: every registered agent with its state, load and machine; delete one, reset all.

import { api } from "./api.js";
import { poll } from "./poll.js";
import { h, mountTemplate, fillTable, tr, numCell, showError, chips, timeCell, memory, confirmAction, act } from "./dom.js";
import { flattenTasks, inFlightByAgent } from "./model.js";

const LABELS = ["Agent", "State", "Tier", "In flight", "Capabilities", "System", "Last contact", ""];

export function mount(root) {
  const refs = mountTemplate(root, "agents");

  const loop = poll(
    async () => {
      const [agents, listing] = await Promise.all([api.agents(), api.tasks()]);
      render(refs, agents || [], inFlightByAgent(flattenTasks(listing)), loop);
      showError(refs.error, null);
    },
    { everyMs: 3000, onError: (err) => showError(refs.error, err) },
  );

  refs.reset.addEventListener("click", async () => {
    const ok = await confirmAction(
      "Reset all agents?",
      "Every agent is forgotten and must register again. Their tasks are handled as for lost agents.",
      "Reset agents",
    );
    if (ok) await act(refs.reset, () => api.resetAgents(), "All agents were reset.");
    loop.now();
  });

  return () => loop.stop();
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
            h("div", {}, h("strong", { class: "mono", title: agent.uid }, agent.uidShort || String(agent.uid).slice(-6))),
            h("div", { class: "small muted" }, "registered ", timeCell(agent.registeredAt)),
          ],
          h("span", { class: "badge", dataset: { status: agent.online ? "online" : "offline" } }, agent.online ? "online" : "offline"),
          numCell(agent.tier),
          numCell(`${inFlight.get(agent.uid) || 0} / ${agent.capacity ?? "—"}`),
          chips(agent.capabilities),
          system(agent.systemInfo),
          timeCell(agent.lastContact),
          h("td", { class: "actions" }, deleteButton(agent, loop)),
        ],
        LABELS,
        { dataset: { agent: agent.uid }, class: agent.online ? undefined : "is-offline" },
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

function deleteButton(agent, loop) {
  const button = h("button", { type: "button", class: "btn btn-small btn-danger-ghost" }, "Delete");
  button.addEventListener("click", async () => {
    const ok = await confirmAction(
      `Delete agent ${agent.uidShort || agent.uid}?`,
      "It must register again to get work. Tasks it holds go back to their queue if restartable, otherwise they fail.",
      "Delete agent",
    );
    if (!ok) return;
    await act(button, () => api.deleteAgent(agent.uid), `Agent ${agent.uidShort || agent.uid} deleted.`);
    loop.now();
  });
  return button;
}
