// What the console knows about the contract's shapes: task statuses and the flattening
// of /management/tasks/list into one list of rows.

export const STATUSES = ["pending", "queued", "assigned", "starting", "running", "completed", "failed", "canceled"];
export const ENDED = new Set(["completed", "failed", "canceled"]);
export const IN_FLIGHT = new Set(["assigned", "starting", "running"]);
export const WAITING = new Set(["pending", "queued"]);

// {"urgent": {"assigned": [...], "unassigned": [...]}, "regular": {...}} → one list, newest
// first. An unassigned task carries no status of its own: it is waiting in its queue.
export function flattenTasks(listing) {
  const rows = [];
  for (const queue of ["urgent", "regular"]) {
    const part = (listing && listing[queue]) || {};
    for (const kind of ["assigned", "unassigned"]) {
      for (const task of part[kind] || []) {
        rows.push({
          ...task,
          queue,
          status: task.status || "pending",
          capability: (task.data && task.data.capability) || (task.id && task.id.cap) || "",
        });
      }
    }
  }
  rows.sort((a, b) => (idOf(b) < idOf(a) ? -1 : idOf(b) > idOf(a) ? 1 : 0));
  return rows;
}

// One task as the listing would show it, from an AssignedTask (an `end` event, an action's
// answer) and the queue it is in.
export function rowOf(task) {
  const data = task.data || {};
  return {
    ...task,
    queue: data.urgent ? "urgent" : "regular",
    status: task.status || "pending",
    capability: data.capability || (task.id && task.id.cap) || "",
  };
}

export function idOf(task) {
  return (task && task.id && task.id.id) || "";
}

// ULIDs share their leading time part; the random tail tells tasks apart at a glance.
export function shortId(id) {
  return id ? `…${String(id).slice(-8)}` : "—";
}

// Agent ids are ULIDs too: their last 12 characters (60 random bits) tell agents apart,
// where the 6 of the wire's uidShort may not.
export function agentShortId(uid) {
  return uid ? `…${String(uid).slice(-12)}` : "—";
}

export function taskHref(id) {
  return `#/tasks/${encodeURIComponent(id.cap)}/${encodeURIComponent(id.id)}`;
}

// Agent id → number of its tasks that have not ended.
export function inFlightByAgent(tasks) {
  const counts = new Map();
  for (const t of tasks) {
    if (t.agentId && !ENDED.has(t.status)) counts.set(t.agentId, (counts.get(t.agentId) || 0) + 1);
  }
  return counts;
}

// Lifecycle extensions. An assigned task carries `attempt` and `cancelRequested`; what
// was asked at submission (priority, delays, retries) is in its data.
export const DEFAULT_PRIORITY = 5;
export const DEFAULT_MAX_RETRIES = 3;

export function priorityOf(task) {
  if (task.queue === "urgent" || (task.data && task.data.urgent)) return null;
  const p = task.data && task.data.priority;
  return typeof p === "number" ? p : DEFAULT_PRIORITY;
}

// "2 of 4" for a restartable task, "1" otherwise; null before the first attempt.
export function attemptText(task) {
  const n = task.attempt;
  if (typeof n !== "number" || n < 1) return null;
  const data = task.data || {};
  if (!data.restartable) return String(n);
  const max = (typeof data.maxRetries === "number" ? data.maxRetries : DEFAULT_MAX_RETRIES) + 1;
  return `${n} of ${max}`;
}

// When a waiting task may be handed out, if that is still ahead: runAt, or createdAt +
// delaySecs. The listing does not carry a retry's backoff, so that cannot be shown.
export function waitingUntil(task, now = Date.now()) {
  if (task.status !== "pending") return null;
  const data = task.data || {};
  let at = null;
  if (typeof data.runAt === "string") at = Date.parse(data.runAt);
  else if (typeof data.delaySecs === "number" && task.createdAt) at = Date.parse(task.createdAt) + data.delaySecs * 1000;
  return at && !Number.isNaN(at) && at > now ? new Date(at).toISOString() : null;
}

// How long a task waited and ran, in ms: waited from creation to its (last) assignment,
// or to its end if it never ran; ran from that assignment to its end, or to `now`.
// `ran` is null for a task no agent holds; `ongoing` while the task has not ended.
export function timing(task, now = Date.now()) {
  const at = (iso) => (typeof iso === "string" && !Number.isNaN(Date.parse(iso)) ? Date.parse(iso) : null);
  const created = at(task.createdAt);
  if (created === null) return null;
  const ended = ENDED.has(task.status) ? at(task.endedAt) : null;
  // A task back in its queue keeps the assignment of its earlier attempt: not this one.
  const assigned = task.status === "pending" ? null : at(task.assignedAt);
  const end = ended ?? now;
  return {
    waited: (assigned ?? end) - created,
    ran: assigned === null ? null : end - assigned,
    ongoing: !ENDED.has(task.status),
  };
}

export function canCancel(task) {
  return !ENDED.has(task.status);
}

export function canRequeue(task) {
  return (task.status === "failed" || task.status === "canceled") && task.queue !== "urgent";
}
