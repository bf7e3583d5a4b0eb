// The console's one live connection: GET /management/events, Server-Sent Events read
// through api.js (fetch streaming, since EventSource cannot send the token header).
// Pages subscribe to events and to the connection's state; while the stream is down they
// keep polling at their normal pace, which is the fallback.
//
//   start() / stop()            with sign-in and sign-out (app.js)
//   subscribe(fn)               fn({id, type, data}) for each event; returns unsubscribe
//   onState(fn)                 fn(state) on "connecting" | "live" | "down" | "off"
//   follow(loop, match, ms)     refresh a poll loop (debounced) on matching events
//   pace(liveMs, pollMs)        an everyMs for poll(): slow while live, normal when not

import { api } from "./api.js";

const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 30000;
// The server sends a heartbeat comment after 5 s of quiet; three missed mean a dead link.
const SILENCE_MS = 15000;

const listeners = new Set();
const stateListeners = new Set();
let state = "off";
let lastId = null; // resumes the stream without gaps after a reconnect
let abort = null;
let retryTimer = null;
let watchdog = null;
let retryMs = RETRY_MIN_MS;

export function getState() {
  return state;
}

export function isLive() {
  return state === "live";
}

function setState(next) {
  if (next === state) return;
  state = next;
  for (const fn of [...stateListeners]) fn(state);
}

export function subscribe(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export function onState(fn) {
  stateListeners.add(fn);
  return () => stateListeners.delete(fn);
}

export function start() {
  if (state !== "off") return;
  retryMs = RETRY_MIN_MS;
  connect();
}

export function stop() {
  clearTimeout(retryTimer);
  clearTimeout(watchdog);
  retryTimer = watchdog = null;
  if (abort) abort.abort();
  abort = null;
  lastId = null;
  setState("off");
}

async function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  const mine = new AbortController();
  abort = mine;
  if (state !== "down") setState("connecting");
  try {
    const reader = await api.events({ lastEventId: lastId, signal: mine.signal });
    setState("live");
    await read(reader, mine);
    if (!mine.signal.aborted) throw new Error("the server closed the event stream");
  } catch (err) {
    clearTimeout(watchdog);
    if (mine.signal.aborted && abort !== mine) return; // stopped, or replaced by a newer connection
    setState("down");
    if (err && err.status === 401) return; // app.js asks for the token again
    retryTimer = setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
  }
}

// Reads the stream line by line: "id:", "event:", "data:" fields, ":" comments, and a
// blank line that dispatches the event gathered so far.
async function read(reader, mine) {
  let buffer = "";
  let event = { id: null, type: "message", data: [] };
  const alive = () => {
    clearTimeout(watchdog);
    watchdog = setTimeout(() => mine.abort(), SILENCE_MS);
  };
  alive();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    alive();
    retryMs = RETRY_MIN_MS; // data flowed: the next drop retries quickly again
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop(); // an unfinished line waits for the next chunk
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) dispatch(event);
        event = { id: null, type: "message", data: [] };
        continue;
      }
      if (line.startsWith(":")) continue; // heartbeat or comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "id") event.id = value;
      else if (field === "event") event.type = value;
      else if (field === "data") event.data.push(value);
    }
  }
}

function dispatch(event) {
  if (event.id) lastId = event.id;
  let data;
  try {
    data = JSON.parse(event.data.join("\n"));
  } catch {
    data = event.data.join("\n");
  }
  const message = { id: event.id, type: event.type, data };
  for (const fn of [...listeners]) {
    try {
      fn(message);
    } catch (err) {
      // One page's bug must not stop the others from hearing the stream.
      setTimeout(() => {
        throw err;
      });
    }
  }
}

export function pace(liveMs, pollMs) {
  return () => (state === "live" ? liveMs : pollMs);
}

// Refreshes a poll loop when a matching event arrives (at most once per waitMs, so a
// burst of events costs one request), and at once when the stream comes up or goes down.
export function follow(loop, match = () => true, waitMs = 500) {
  let timer = null;
  const offEvent = subscribe((event) => {
    if (timer || !match(event)) return;
    timer = setTimeout(() => {
      timer = null;
      loop.now();
    }, waitMs);
  });
  const offState = onState(() => loop.now());
  return () => {
    clearTimeout(timer);
    offEvent();
    offState();
  };
}

// The event's task id, for matching: {cap, id} or null.
export function taskOf(event) {
  const d = event && event.data;
  return d && typeof d === "object" && d.id && typeof d.id === "object" ? d.id : null;
}
