// Tasks: urgent and regular tasks with filters and a dead-letter view (#/tasks), and one
// task's detail with its log growing live (#/tasks/<cap>/<id>). Both follow the event
// stream; while it is down they poll.

import { api } from "./api.js";
import { poll } from "./poll.js";
import { follow, pace, subscribe, taskOf } from "./events.js";
import { h, mountTemplate, fillTable, fillFacts, tr, showError, badge, mono, pretty, setLog, timeCell, confirmAction, act } from "./dom.js";
import {
  STATUSES, ENDED, flattenTasks, rowOf, idOf, shortId, taskHref,
  priorityOf, attemptText, waitingUntil, canCancel, canRequeue,
} from "./model.js";

const LABELS = ["Task", "Capability", "Queue", "Status", "Stage", "Agent", "Attempt", "Created", ""];
// Enough to scan; the filters narrow down the rest. Keeps each refresh cheap.
const MAX_ROWS = 200;

// The filters outlive the page so that coming back from a task's detail keeps them.
const filters = { queue: "", status: "", capability: "", dead: false };

const isTaskEvent = (e) => e.type === "status" || e.type === "end" || e.type === "reset";

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
    render(refs, last, loop);
  });
  refs.filters.addEventListener("submit", (e) => e.preventDefault());

  // Dead letters come from the server's own filter (?status=failed).
  const syncDead = () => {
    refs.dead.setAttribute("aria-pressed", String(filters.dead));
    refs["f-status"].disabled = filters.dead;
    refs["f-status"].closest("label").classList.toggle("is-off", filters.dead);
  };
  syncDead();
  refs.dead.addEventListener("click", () => {
    filters.dead = !filters.dead;
    syncDead();
    last = [];
    render(refs, last, loop);
    loop.now();
  });

  refs.rows.addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-href]");
    if (row && !event.target.closest("a, button")) location.hash = row.dataset.href;
  });

  const loop = poll(
    async () => {
      const dead = filters.dead;
      const listing = await api.tasks(dead ? "failed" : undefined);
      if (dead !== filters.dead) return; // the view was switched meanwhile
      last = flattenTasks(listing);
      render(refs, last, loop);
      showError(refs.error, null);
    },
    { everyMs: pace(15000, 2000), onError: (err) => showError(refs.error, err) },
  );
  const unfollow = follow(loop, isTaskEvent, 1000);

  refs.reset.addEventListener("click", async () => {
    const ok = await confirmAction(
      "Reset all tasks?",
      "Every task, urgent and regular, in any state, is removed. Agents working on one will have their reports refused.",
      "Reset tasks",
    );
    if (ok) await act(refs.reset, () => api.resetTasks(), "All tasks were reset.");
    loop.now();
  });

  return () => {
    unfollow();
    loop.stop();
  };
}

function render(refs, tasks, loop) {
  syncCapabilityOptions(refs["f-capability"], tasks);
  const shown = tasks.filter(
    (t) =>
      (!filters.queue || t.queue === filters.queue) &&
      (filters.dead || !filters.status || t.status === filters.status) &&
      (!filters.capability || t.capability === filters.capability),
  );
  const what = filters.dead ? "dead letters" : "tasks";
  refs.count.textContent = shown.length === tasks.length ? String(tasks.length) : `${shown.length} of ${tasks.length}`;
  refs.empty.hidden = shown.length > 0;
  refs.empty.textContent = filters.dead
    ? tasks.length
      ? "No dead letter matches these filters."
      : "No dead letters: no task has failed for good."
    : tasks.length
      ? "No task matches these filters."
      : "No tasks yet. Submit one from the Sandbox.";
  refs.more.hidden = shown.length <= MAX_ROWS;
  refs.more.textContent = `Showing the newest ${MAX_ROWS} of ${shown.length} ${what}; the filters narrow the list down.`;
  const none = () => h("td", { class: "is-empty" }, h("span", { class: "muted" }, "—"));
  const now = Date.now();
  fillTable(
    refs.rows,
    shown.slice(0, MAX_ROWS).map((t) => {
      const attempt = attemptText(t);
      return tr(
        [
          h("a", { href: taskHref(t.id), class: "mono", title: idOf(t) }, shortId(idOf(t))),
          mono(t.capability),
          queueCell(t),
          statusCell(t, now),
          t.stage || none(),
          t.agentId ? mono(String(t.agentId).slice(-6), t.agentId) : none(),
          attempt ? h("td", { class: "num attempt" }, attempt) : h("td", { class: "num is-empty" }, h("span", { class: "muted" }, "—")),
          timeCell(t.createdAt),
          h("td", { class: "actions" }, taskActions(t, () => loop.now(), true)),
        ],
        LABELS,
        { dataset: { href: taskHref(t.id), task: idOf(t), status: t.status } },
      );
    }),
  );
}

function queueCell(t) {
  const p = priorityOf(t);
  return [
    h("span", { class: `queue queue-${t.queue}` }, t.queue),
    p === null ? null : h("span", { class: `prio${p === 5 ? "" : " prio-set"}`, title: `priority ${p} of 0–9 (higher runs first)` }, `p${p}`),
  ];
}

function statusCell(t, now) {
  const until = waitingUntil(t, now);
  return [
    badge(t.status),
    t.cancelRequested && !ENDED.has(t.status) ? h("span", { class: "tag tag-warn" }, "cancel requested") : null,
    until ? h("span", { class: "tag", title: new Date(until).toLocaleString() }, "waiting until ", timeOfDay(until)) : null,
  ];
}

// Cancel (with confirmation) for a task that has not ended, Requeue for a dead letter.
function taskActions(t, refresh, small = false) {
  const cls = small ? "btn btn-small" : "btn";
  if (canCancel(t)) {
    const button = h("button", { type: "button", class: `${cls} btn-danger-ghost`, dataset: { action: "cancel" } }, "Cancel");
    if (t.cancelRequested) {
      button.disabled = true;
      button.title = "Cancel requested; waiting for the agent";
    }
    button.addEventListener("click", async () => {
      if (await confirmCancel(t)) await act(button, () => api.cancelTask(t.id), `Task ${shortId(idOf(t))}: cancel sent.`);
      refresh();
    });
    return button;
  }
  if (canRequeue(t)) {
    const button = h("button", { type: "button", class: `${cls}`, dataset: { action: "requeue" } }, "Requeue");
    button.addEventListener("click", async () => {
      await act(button, () => api.requeueTask(t.id), `Task ${shortId(idOf(t))} is back in its queue.`);
      refresh();
    });
    return button;
  }
  return null;
}

function confirmCancel(t) {
  const running = t.status !== "pending";
  return confirmAction(
    `Cancel task ${shortId(idOf(t))}?`,
    running
      ? `It is ${t.status} on an agent, which is asked to stop it; if the agent does not answer within a minute it ends canceled anyway.`
      : "It is still waiting in its queue and ends canceled at once.",
    "Cancel task",
  );
}

function timeOfDay(iso) {
  const d = new Date(iso);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay ? d.toLocaleTimeString() : d.toLocaleString();
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

// ------------------------------------------------------------------ one task

function mountDetail(root, id) {
  const refs = mountTemplate(root, "task");
  refs.title.textContent = id.id;
  refs.title.title = `${id.cap} / ${id.id}`;
  let current = null; // the task as last shown: the listing's row plus the events since
  const mine = (e) => {
    const t = taskOf(e);
    return !!t && t.id === id.id && t.cap === id.cap;
  };

  const show = () => {
    renderDetail(refs, current);
    syncActions(refs, current);
  };

  let deltas = 0; // log events applied so far
  const loop = poll(
    async () => {
      const before = deltas;
      const task = flattenTasks(await api.tasks()).find((t) => idOf(t) === id.id);
      if (!task) {
        showError(refs.error, "This task is not in the server's listing: it may have been reset, or the link is wrong.");
        return;
      }
      showError(refs.error, null);
      // Log deltas that arrived while this listing was on its way may be newer than it;
      // any other difference is settled by the listing.
      if (current && deltas > before && (current.log || "").startsWith(task.log || "")) task.log = current.log;
      current = task;
      show();
    },
    { everyMs: pace(10000, 1500), onError: (err) => showError(refs.error, err) },
  );
  // A status change may bring an agent, an attempt or history: fetch the task again.
  const unfollow = follow(loop, (e) => mine(e) && e.type === "status", 300);
  const unsubscribe = subscribe((e) => {
    if (!current) return;
    if (e.type === "reset") loop.now();
    if (!mine(e)) return;
    const d = e.data;
    if (e.type === "log") {
      deltas += 1;
      current = { ...current, log: (current.log || "") + (d.log || ""), stage: d.stage ?? current.stage };
    } else if (e.type === "status") {
      current = { ...current, status: d.status, stage: d.stage ?? current.stage, attempt: d.attempt ?? current.attempt, cancelRequested: !!d.cancelRequested };
    } else if (e.type === "end") {
      current = rowOf(d);
    } else return;
    show();
  });

  refs.cancel.addEventListener("click", async () => {
    if (!current || !(await confirmCancel(current))) return;
    const answer = await act(refs.cancel, () => api.cancelTask(id), "Cancel sent.");
    if (answer && typeof answer === "object" && answer.status) {
      current = { ...current, status: answer.status, cancelRequested: !!answer.cancelRequested };
      show();
    }
    loop.now();
  });
  refs.requeue.addEventListener("click", async () => {
    const answer = await act(refs.requeue, () => api.requeueTask(id), "The task is back in its queue.");
    if (answer) loop.now();
  });

  return () => {
    unsubscribe();
    unfollow();
    loop.stop();
  };
}

function syncActions(refs, task) {
  refs.cancel.hidden = !canCancel(task);
  refs.cancel.disabled = !!task.cancelRequested;
  refs.cancel.title = task.cancelRequested ? "Cancel requested: waiting for the agent to stop the task" : "";
  refs.requeue.hidden = !canRequeue(task);
  refs["cancel-note"].hidden = !(task.cancelRequested && !ENDED.has(task.status));
}

function renderDetail(refs, task) {
  const data = task.data || {};
  refs.status.textContent = task.status;
  refs.status.dataset.status = task.status;
  const until = waitingUntil(task);
  const secs = (name) => (typeof data[name] === "number" ? `${data[name]} s` : null);
  fillFacts(refs.facts, [
    ["Capability", mono(task.capability)],
    ["Queue", task.queue],
    ["Priority", priorityOf(task) === null ? null : `${priorityOf(task)}${typeof data.priority === "number" ? "" : " (default)"}`],
    ["Stage", task.stage],
    ["Agent", task.agentId ? mono(task.agentId) : "not assigned yet"],
    ["Attempt", attemptText(task)],
    ["Cancel", task.cancelRequested && !ENDED.has(task.status) ? "requested; waiting for the agent to stop" : null],
    ["Created", timeCell(task.createdAt)],
    ["Assigned", task.assignedAt ? timeCell(task.assignedAt) : null],
    ["Waiting until", until ? h("span", {}, timeCell(until), ` (${new Date(until).toLocaleString()})`) : null],
    ["Run at", data.runAt && !until ? data.runAt : null],
    ["Restartable", data.restartable ? `yes, up to ${typeof data.maxRetries === "number" ? data.maxRetries : 3} retries${secs("retryDelaySecs") ? `, first after ${secs("retryDelaySecs")}` : ""}` : "no"],
    ["Timeouts", [
      secs("maxWaitSecs") && `wait ${secs("maxWaitSecs")}`,
      secs("timeoutSecs") && `total ${secs("timeoutSecs")}`,
      secs("runtimeSecs") && `runtime ${secs("runtimeSecs")}`,
    ].filter(Boolean).join(" · ")],
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
