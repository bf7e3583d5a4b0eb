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

export function idOf(task) {
  return (task && task.id && task.id.id) || "";
}

// ULIDs share their leading time part; the random tail tells tasks apart at a glance.
export function shortId(id) {
  return id ? `…${String(id).slice(-8)}` : "—";
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
