// The only module that calls fetch. It adds the management token, sends and reads JSON,
// and turns the contract's error body {"error": {"type", "message", "status"}} into an
// ApiError whose message is the server's own sentence.

const TOKEN_KEY = "offloadmq.mgmtToken";

export class ApiError extends Error {
  constructor(status, type, message, body = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.body = body; // the parsed error body, for fields beyond the message
  }
}

export function getToken() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  localStorage.setItem(TOKEN_KEY, token);
}

export function clearToken() {
  localStorage.removeItem(TOKEN_KEY);
}

// Fired on window when the server refuses the stored token, so the app can ask again.
export const UNAUTHORIZED_EVENT = "offloadmq:unauthorized";

async function errorFrom(response) {
  let text = "";
  try {
    text = await response.text();
  } catch {
    // The body is unreadable; the status line below still says something useful.
  }
  try {
    const body = JSON.parse(text);
    if (body && body.error && typeof body.error.message === "string") {
      return new ApiError(response.status, body.error.type || "error", body.error.message, body);
    }
    if (body && typeof body.message === "string") {
      return new ApiError(response.status, "error", body.message, body);
    }
  } catch {
    // Not JSON (a proxy's HTML page, say): fall through to the status line.
  }
  const detail = text && text.length < 200 && !text.trimStart().startsWith("<") ? `: ${text.trim()}` : "";
  return new ApiError(response.status, "http_error", `HTTP ${response.status} ${response.statusText}${detail}`);
}

// request("GET", "/stats") → parsed JSON. Options: body (sent as JSON), token (overrides
// the stored one, used by sign-in), signal (AbortSignal).
export async function request(method, path, { body, token, signal } = {}) {
  const headers = { Accept: "application/json" };
  const auth = token ?? getToken();
  if (auth) headers["X-Mgmt-Token"] = auth;
  const init = { method, headers, signal, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "network_error", "Cannot reach the server. Is it running?");
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401 && token === undefined) {
      window.dispatchEvent(new CustomEvent(UNAUTHORIZED_EVENT, { detail: error }));
    }
    throw error;
  }
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

// The management event stream (Server-Sent Events read through fetch, because
// EventSource cannot send the token header). Resolves once the server has answered with
// the stream's headers, to a reader of its text chunks; errors as request() does.
export async function openEventStream(path, { lastEventId, signal } = {}) {
  const headers = { Accept: "text/event-stream" };
  const auth = getToken();
  if (auth) headers["X-Mgmt-Token"] = auth;
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  let response;
  try {
    response = await fetch(path, { method: "GET", headers, signal, cache: "no-store" });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "network_error", "Cannot reach the server's event stream.");
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401) window.dispatchEvent(new CustomEvent(UNAUTHORIZED_EVENT, { detail: error }));
    throw error;
  }
  if (!response.body) throw new ApiError(0, "no_stream", "This browser cannot read a streamed answer.");
  return response.body.pipeThrough(new TextDecoderStream()).getReader();
}

const seg = encodeURIComponent;
const taskPath = (id) => `${seg(id.cap)}/${seg(id.id)}`;

// Every route the console uses, named after what it does.
export const api = {
  // A 503 is still the health body: the server is up but refuses writes (a full or lost disk).
  health: () =>
    request("GET", "/health").catch((err) => {
      if (err.status === 503 && err.body && err.body.status) return err.body;
      throw err;
    }),
  stats: () => request("GET", "/stats"),
  // Sign-in checks a candidate token without storing it first.
  checkToken: (token) => request("GET", "/management/capabilities/list/online", { token }),

  capabilitiesOnline: () => request("GET", "/management/capabilities/list/online"),
  agents: () => request("GET", "/management/agents/list"),
  deleteAgent: (uid) => request("POST", `/management/agents/delete/${seg(uid)}`),
  resetAgents: () => request("POST", "/management/agents/reset"),

  drainAgent: (uid) => request("POST", `/management/agents/drain/${seg(uid)}`),
  resumeAgent: (uid) => request("POST", `/management/agents/resume/${seg(uid)}`),
  // A new login secret for the agent; its earlier tokens stop working (it registers again).
  rotateAgentKey: (uid) => request("POST", `/management/agents/rotate_key/${seg(uid)}`),

  // status: only tasks in that status ("failed" lists the dead letters). Every task at
  // once: the Tasks page asks for pages instead.
  tasks: (status) => request("GET", `/management/tasks/list${status ? `?status=${seg(status)}` : ""}`),
  // One page, newest first: {urgent, regular, next, total}. Filters (empty ones left
  // out): status, capability, queue, cursor (the `next` of the page before), limit.
  taskPage: (filters = {}) => {
    const query = new URLSearchParams({ limit: "200" });
    for (const [name, value] of Object.entries(filters)) if (value) query.set(name, String(value));
    return request("GET", `/management/tasks/list?${query}`);
  },
  // One task with its whole log, in the listing's shape (empty when it is gone).
  task: (id) => request("GET", `/management/tasks/list?task=${seg(`${id.cap}/${id.id}`)}`),
  resetTasks: () => request("POST", "/management/tasks/reset"),
  cancelTask: (id) => request("POST", `/management/tasks/cancel/${taskPath(id)}`),
  requeueTask: (id) => request("POST", `/management/tasks/requeue/${taskPath(id)}`),
  // Only what happens from now: pages load the present state themselves, a page at a time.
  events: (options) => openEventStream("/management/events?current=0", options),

  keys: () => request("GET", "/management/client_api_keys/list"),
  // maxInFlight: a positive integer, or null for no limit (the server clears it when absent).
  saveKey: (key, capabilities, maxInFlight = null) =>
    request("POST", "/management/client_api_keys/update", { body: { key, capabilities, maxInFlight } }),
  revokeKey: (key) => request("POST", `/management/client_api_keys/revoke/${seg(key)}`),

  // The sandbox acts as a client; the server accepts the management token there too.
  clientCapabilities: () => request("GET", "/api/capabilities/online"),
  submit: (task) => request("POST", "/api/task/submit", { body: task }),
  submitBlocking: (task, signal) => request("POST", "/api/task/submit_blocking", { body: task, signal }),
  pollTask: (id, waitS = 0, signal) =>
    request("GET", `/api/task/poll/${taskPath(id)}${waitS ? `?wait=${waitS}` : ""}`, { signal }),
  cancelClientTask: (id) => request("POST", `/api/task/cancel/${taskPath(id)}`),
};
