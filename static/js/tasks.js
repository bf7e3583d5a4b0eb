// Tasks: urgent and regular tasks with filters (#/tasks), and one task's detail with its
// log growing live (#/tasks/<cap>/<id>).

import { api } from "./api.js";
import { poll } from "./poll.js";
import { h, mountTemplate, fillTable, fillFacts, tr, showError, badge, mono, pretty, setLog, timeCell, confirmAction, act } from "./dom.js";
import { STATUSES, ENDED, flattenTasks, idOf, shortId, taskHref } from "./model.js";

const LABELS = ["Task", "Capability", "Queue", "Status", "Stage", "Agent", "Created"];
// Enough to scan; the filters narrow down the rest. Keeps each refresh cheap.
const MAX_ROWS = 200;

// The filters outlive the page so that coming back from a task's detail keeps them.
const filters = { queue: "", status: "", capability: "" };

export function mount(root, params) {
  if (params.length >= 2) return mountDetail(root, { cap: params[0], id: params[1] });
  return mountList(root);
}

function mountList(root) {
  const refs = mountTemplate(root, "tasks");
  let last = [];

  refs["f-status"].append(...STATUSES.map((s) => h("option", { value: s }, s)));
  refs["f-queue"].value = filters.queue;
  refs["f-status"].value = filters.status;
  refs.filters.addEventListener("change", () => {
    filters.queue = refs["f-queue"].value;
    filters.status = refs["f-status"].value;
    filters.capability = refs["f-capability"].value;
    render(refs, last);
  });
  refs.filters.addEventListener("submit", (e) => e.preventDefault());

  refs.rows.addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-href]");
    if (row && !event.target.closest("a")) location.hash = row.dataset.href;
  });

  const loop = poll(
    async () => {
      last = flattenTasks(await api.tasks());
      render(refs, last);
      showError(refs.error, null);
    },
    { everyMs: 2000, onError: (err) => showError(refs.error, err) },
  );

  refs.reset.addEventListener("click", async () => {
    const ok = await confirmAction(
      "Reset all tasks?",
      "Every task, urgent and regular, in any state, is removed. Agents working on one will have their reports refused.",
      "Reset tasks",
    );
    if (ok) await act(refs.reset, () => api.resetTasks(), "All tasks were reset.");
    loop.now();
  });

  return () => loop.stop();
}

function render(refs, tasks) {
  syncCapabilityOptions(refs["f-capability"], tasks);
  const shown = tasks.filter(
    (t) =>
      (!filters.queue || t.queue === filters.queue) &&
      (!filters.status || t.status === filters.status) &&
      (!filters.capability || t.capability === filters.capability),
  );
  refs.count.textContent = shown.length === tasks.length ? String(tasks.length) : `${shown.length} of ${tasks.length}`;
  refs.empty.hidden = shown.length > 0;
  refs.empty.textContent = tasks.length ? "No task matches these filters." : "No tasks yet. Submit one from the Sandbox.";
  refs.more.hidden = shown.length <= MAX_ROWS;
  refs.more.textContent = `Showing the newest ${MAX_ROWS} of ${shown.length} tasks; the filters narrow the list down.`;
  const none = () => h("td", { class: "is-empty" }, h("span", { class: "muted" }, "—"));
  fillTable(
    refs.rows,
    shown.slice(0, MAX_ROWS).map((t) =>
      tr(
        [
          h("a", { href: taskHref(t.id), class: "mono", title: idOf(t) }, shortId(idOf(t))),
          mono(t.capability),
          h("span", { class: `queue queue-${t.queue}` }, t.queue),
          badge(t.status),
          t.stage || none(),
          t.agentId ? mono(String(t.agentId).slice(-6), t.agentId) : none(),
          timeCell(t.createdAt),
        ],
        LABELS,
        { dataset: { href: taskHref(t.id), task: idOf(t) } },
      ),
    ),
  );
}

function syncCapabilityOptions(select, tasks) {
  const caps = [...new Set(tasks.map((t) => t.capability))].sort();
  if (filters.capability && !caps.includes(filters.capability)) caps.push(filters.capability);
  const have = [...select.options].slice(1).map((o) => o.value);
  if (have.join("\n") !== caps.join("\n")) {
    select.replaceChildren(h("option", { value: "" }, "Any capability"), ...caps.map((c) => h("option", { value: c }, c)));
  }
  select.value = filters.capability;
}

function mountDetail(root, id) {
  const refs = mountTemplate(root, "task");
  refs.title.textContent = id.id;
  refs.title.title = `${id.cap} / ${id.id}`;

  const loop = poll(
    async () => {
      const task = flattenTasks(await api.tasks()).find((t) => idOf(t) === id.id);
      if (!task) {
        showError(refs.error, "This task is not in the server's listing: it may have been reset, or the link is wrong.");
        return;
      }
      showError(refs.error, null);
      renderDetail(refs, task);
    },
    { everyMs: 1500, onError: (err) => showError(refs.error, err) },
  );
  return () => loop.stop();
}

function renderDetail(refs, task) {
  const data = task.data || {};
  refs.status.textContent = task.status;
  refs.status.dataset.status = task.status;
  fillFacts(refs.facts, [
    ["Capability", mono(task.capability)],
    ["Queue", task.queue],
    ["Stage", task.stage],
    ["Agent", task.agentId ? mono(task.agentId) : "not assigned yet"],
    ["Created", timeCell(task.createdAt)],
    ["Assigned", task.assignedAt ? timeCell(task.assignedAt) : null],
    ["Restartable", data.restartable ? "yes" : "no"],
    ["Files to fetch", data.fetchFiles && data.fetchFiles.length ? data.fetchFiles.map((f) => f.path).join(", ") : null],
    ["Artifacts", data.artifacts && data.artifacts.length ? data.artifacts.map((f) => f.path).join(", ") : null],
  ]);
  setText(refs.payload, pretty(data.payload));
  setText(refs.output, task.result === undefined || task.result === null ? (ENDED.has(task.status) ? "—" : "Not finished yet.") : pretty(task.result));
  setLog(refs.log, task.log || (task.agentId ? "" : "Waiting for an agent to take this task."));
  refs["log-note"].textContent = ENDED.has(task.status) ? "" : "· live";
  const history = task.history || [];
  refs.history.replaceChildren(
    ...(history.length
      ? history.map((entry) => h("li", {}, timeCell(entry.timestamp), " ", h("span", {}, entry.description)))
      : [h("li", { class: "muted" }, "Nothing has happened to this task yet.")]),
  );
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}
