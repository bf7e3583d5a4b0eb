// Tasks: urgent and regular tasks with filters and a dead-letter view (#/tasks), and one
// task's detail with its log growing live (#/tasks/<cap>/<id>). Both follow the event
// stream; while it is down they poll.

import { api } from "./api.js";
import { poll } from "./poll.js";
import { follow, onState, pace, subscribe, taskOf } from "./events.js";
import { h, mountTemplate, fillTable, fillFacts, tr, showError, badge, mono, pretty, setLog, timeCell, confirmAction, act, duration } from "./dom.js";
import {
  STATUSES, ENDED, flattenTasks, rowOf, idOf, shortId, taskHref,
  priorityOf, attemptText, waitingUntil, canCancel, canRequeue, timing, agentShortId,
} from "./model.js";

const LABELS = ["Task", "Capability", "Queue", "Status", "Stage", "Agent", "Attempt", "Created", "Duration", ""];
const TICK_MS = 1000; // how often the durations of tasks that have not ended move on

// The filters outlive the page so that coming back from a task's detail keeps them.
const filters = { queue: "", status: "", capability: "", dead: false };

export function mount(root, params) {
  if (params.length >= 2) return mountDetail(root, { cap: params[0], id: params[1] });
  return mountList(root);
}

// The list shows the server's pages (newest first, filtered by the server) and keeps them
// current from the event stream: a new task, or a change, is applied to the rows shown
// without asking for the list again. Pages are asked for again only when the filters
// change, after a reset, when the stream (re)connects, and at the polling pace while it
// is down.
function mountList(root) {
  const refs = mountTemplate(root, "tasks");
  let rows = []; // the loaded pages, newest first
  let next = null; // cursor of the page after the loaded ones; null: all are loaded
  let total = 0; // tasks the server counts for these filters
  let loaded = false;
  let pending = null; // events that arrive while a page is on its way, applied after it
  let generation = 0; // a newer load makes an older answer stale
  let drawTimer = null;
  const caps = new Set();

  refs["f-status"].append(...STATUSES.map((s) => h("option", { value: s }, s)));
  refs["f-queue"].value = filters.queue;
  refs["f-status"].value = filters.status;
  refs.filters.addEventListener("change", () => {
    filters.queue = refs["f-queue"].value;
    filters.status = refs["f-status"].value;
    filters.capability = refs["f-capability"].value;
    reload();
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
    reload();
  });

  refs.rows.addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-href]");
    if (row && !event.target.closest("a, button")) location.hash = row.dataset.href;
  });

  const matches = (t) =>
    (filters.dead ? t.status === "failed" : !filters.status || t.status === filters.status) &&
    (!filters.queue || t.queue === filters.queue) &&
    (!filters.capability || t.capability === filters.capability || t.capability.split("[")[0] === filters.capability);

  async function load(more) {
    const mine = more ? generation : ++generation;
    if (!more) pending = [];
    let listing;
    try {
      listing = await api.taskPage({
        status: filters.dead ? "failed" : filters.status,
        capability: filters.capability,
        queue: filters.queue,
        cursor: more ? next : "",
      });
    } catch (err) {
      if (!more && mine === generation) pending = null; // events apply to the rows shown again
      throw err;
    }
    if (mine !== generation) return; // the filters changed meanwhile
    const page = flattenTasks(listing);
    if (more) {
      const have = new Set(rows.map(keyOf));
      rows = rows.concat(page.filter((t) => !have.has(keyOf(t))));
    } else {
      rows = page;
    }
    next = listing.next;
    total = listing.total;
    loaded = true;
    if (!more) {
      const later = pending || [];
      pending = null;
      for (const event of later) apply(event);
    }
    draw();
    showError(refs.error, null);
  }

  function reload() {
    rows = [];
    loaded = false;
    draw();
    loop.now();
  }

  function apply(event) {
    if (pending) {
      pending.push(event);
      return;
    }
    if (event.type === "reset") return reload();
    if (event.type !== "status" && event.type !== "end") return;
    const d = event.data;
    if (!d || !d.id || typeof d.id !== "object" || !loaded) return;
    const key = `${d.id.cap}/${d.id.id}`;
    const at = rows.findIndex((t) => keyOf(t) === key);
    const old = at >= 0 ? rows[at] : null;
    let row;
    if (event.type === "end") {
      row = rowOf(d);
    } else if (old) {
      // A task that ended leaves that state only by a requeue.
      if (ENDED.has(old.status) && d.op !== "task.requeued") return;
      row = {
        ...old, status: d.status, stage: d.stage, attempt: d.attempt, cancelRequested: !!d.cancelRequested,
        agentId: d.agentId ?? old.agentId, assignedAt: d.assignedAt ?? old.assignedAt, endedAt: d.endedAt ?? null,
      };
    } else {
      row = rowFromStatus(d);
    }
    caps.add(row.capability);
    if (old) {
      if (matches(row)) rows[at] = row;
      else {
        rows.splice(at, 1);
        total = Math.max(0, total - 1);
      }
    } else if (matches(row) && (next === null || idOf(row) > idOf(rows[rows.length - 1]))) {
      // Within the pages loaded (a later page would bring an older one).
      let i = 0;
      while (i < rows.length && idOf(rows[i]) > idOf(row)) i += 1;
      rows.splice(i, 0, row);
      total += 1;
    } else return;
    scheduleDraw();
  }

  function scheduleDraw() {
    if (!drawTimer) drawTimer = setTimeout(draw, 100); // a burst of events costs one render
  }

  function draw() {
    clearTimeout(drawTimer);
    drawTimer = null;
    for (const t of rows) caps.add(t.capability);
    render(refs, { rows, total, next, loaded }, caps, () => loop.now());
  }

  const loop = poll(() => load(false), {
    everyMs: pace(60000, 3000),
    onError: (err) => showError(refs.error, err),
  });
  const ticker = setInterval(() => tickDurations(refs.rows), TICK_MS);
  const unsubscribe = subscribe(apply);
  const offState = onState((state) => {
    if (state === "live") loop.now(); // what happened while it was down
  });
  api.capabilitiesOnline().then(
    (online) => {
      for (const c of online || []) caps.add(c);
      if (loaded) draw();
    },
    () => {}, // the list still offers the capabilities of its rows
  );

  refs["load-more"].addEventListener("click", () => act(refs["load-more"], () => load(true)));

  refs.reset.addEventListener("click", async () => {
    const ok = await confirmAction(
      "Reset all tasks?",
      "Every task, urgent and regular, in any state, is removed. Agents working on one will have their reports refused.",
      "Reset tasks",
    );
    if (ok) await act(refs.reset, () => api.resetTasks(), "All tasks were reset.");
    reload();
  });

  return () => {
    clearTimeout(drawTimer);
    clearInterval(ticker);
    unsubscribe();
    offState();
    loop.stop();
  };
}

const keyOf = (t) => `${t.id.cap}/${t.id.id}`;

// A new task as a row, from its `status` event (which carries what the list shows).
function rowFromStatus(d) {
  return rowOf({
    id: d.id,
    status: d.status,
    stage: d.stage,
    attempt: d.attempt,
    cancelRequested: !!d.cancelRequested,
    agentId: d.agentId || null,
    createdAt: d.createdAt,
    assignedAt: d.assignedAt || null,
    endedAt: d.endedAt || null,
    data: { capability: d.id.cap, urgent: !!d.urgent, priority: d.priority },
  });
}

function render(refs, { rows, total, next, loaded }, caps, refresh) {
  syncCapabilityOptions(refs["f-capability"], caps);
  const what = filters.dead ? "dead letters" : "tasks";
  const filtered = filters.dead || filters.status || filters.queue || filters.capability;
  refs.count.textContent = loaded ? String(total) : "";
  refs.empty.hidden = !loaded || rows.length > 0;
  refs.empty.textContent = filters.dead
    ? "No dead letters: no task has failed for good."
    : filtered
      ? "No task matches these filters."
      : "No tasks yet. Submit one from the Sandbox.";
  refs.more.hidden = next === null;
  refs["load-more"].hidden = next === null;
  refs.more.textContent = `Showing the newest ${rows.length} of ${total} ${what}.`;
  const none = () => h("td", { class: "is-empty" }, h("span", { class: "muted" }, "—"));
  const now = Date.now();
  fillTable(
    refs.rows,
    rows.map((t) => {
      const attempt = attemptText(t);
      return tr(
        [
          h("a", { href: taskHref(t.id), class: "mono", title: idOf(t) }, shortId(idOf(t))),
          mono(t.capability),
          queueCell(t),
          statusCell(t, now),
          t.stage || none(),
          t.agentId ? mono(agentShortId(t.agentId), t.agentId) : none(),
          attempt ? h("td", { class: "num attempt" }, attempt) : h("td", { class: "num is-empty" }, h("span", { class: "muted" }, "—")),
          timeCell(t.createdAt),
          durationCell(t, now),
          h("td", { class: "actions" }, taskActions(t, refresh, true)),
        ],
        LABELS,
        { dataset: { href: taskHref(t.id), task: idOf(t), status: t.status } },
      );
    }),
  );
}

// "waited 2.0 s · ran 14 s"; the cells of tasks that have not ended are kept moving.
function durationCell(t, now) {
  const cell = h("td", { class: "duration small", dataset: { ref: "duration" } }, durationText(timing(t, now)));
  if (!ENDED.has(t.status)) cell.dataset.ongoing = "";
  cell.task = t;
  return cell;
}

function durationText(times) {
  if (!times) return "—";
  const parts = [`waited ${duration(times.waited)}`];
  if (times.ran !== null) parts.push(`${times.ongoing ? "running" : "ran"} ${duration(times.ran)}`);
  return parts.join(" · ");
}

function tickDurations(root) {
  const now = Date.now();
  for (const cell of root.querySelectorAll("td[data-ongoing]")) {
    if (cell.task) cell.textContent = durationText(timing(cell.task, now));
  }
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

function syncCapabilityOptions(select, known) {
  const caps = [...known].sort();
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
      const task = flattenTasks(await api.task(id))[0];
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
      // A status event always says the stage: null once the task has left its agent.
      current = {
        ...current, status: d.status, stage: "stage" in d ? d.stage : current.stage, attempt: d.attempt ?? current.attempt,
        cancelRequested: !!d.cancelRequested, assignedAt: d.assignedAt ?? current.assignedAt, endedAt: d.endedAt ?? null,
      };
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

  // While the task has not ended its durations move on.
  const ticker = setInterval(() => {
    if (current && !ENDED.has(current.status)) renderFacts(refs, current);
  }, TICK_MS);

  return () => {
    clearInterval(ticker);
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
  renderFacts(refs, task);
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

function renderFacts(refs, task) {
  const data = task.data || {};
  const until = waitingUntil(task);
  const times = timing(task);
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
    ["Assigned", task.assignedAt && task.status !== "pending" ? timeCell(task.assignedAt) : null],
    ["Ended", ENDED.has(task.status) && task.endedAt ? timeCell(task.endedAt) : null],
    ["Waited", times ? `${duration(times.waited)}${times.ongoing && times.ran === null ? " so far" : ""}` : null],
    ["Ran", times && times.ran !== null ? `${duration(times.ran)}${times.ongoing ? " so far" : ""}` : null],
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
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}
