// Sandbox: run tasks by hand. Three tabs: submit any task and watch it; a Bash console
// for shell.bash; an LLM chat for llm.* capabilities. The console acts as a client here,
// with the management token, which the server accepts on /api/*.

import { api } from "./api.js";
import { poll } from "./poll.js";
import { follow, pace, subscribe, taskOf, isLive } from "./events.js";
import { h, mountTemplate, fillFacts, showError, errorText, mono, pretty, setLog, toast, act } from "./dom.js";
import { ENDED, taskHref } from "./model.js";

const TABS = ["submit", "bash", "chat"];
const BASH_CAP = "shell.bash";

export function mount(root, params) {
  const refs = mountTemplate(root, "sandbox");
  const parts = [setupSubmit(refs), setupBash(refs), setupChat(refs)];

  // Tabs switch in place (replaceState fires no hashchange), so a running command survives.
  const show = (name) => {
    for (const b of root.querySelectorAll("[data-tab]")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
    for (const p of root.querySelectorAll("[data-panel]")) p.hidden = p.dataset.panel !== name;
    history.replaceState(null, "", `#/sandbox/${name}`);
    const focus = { bash: refs["term-input"], chat: refs["chat-input"] }[name];
    if (focus) focus.focus();
  };
  for (const b of root.querySelectorAll("[data-tab]")) b.addEventListener("click", () => show(b.dataset.tab));
  show(TABS.includes(params[0]) ? params[0] : "submit");

  const capsLoop = poll(
    async () => {
      const caps = ((await api.clientCapabilities()) || []).slice().sort();
      refs["online-note"].textContent = caps.length
        ? `${caps.length} ${caps.length === 1 ? "capability" : "capabilities"} online`
        : "No agent is online: urgent tasks will be refused.";
      for (const part of parts) part.capabilities(caps);
    },
    { everyMs: 4000, onError: (err) => (refs["online-note"].textContent = errorText(err)) },
  );

  return () => {
    capsLoop.stop();
    for (const part of parts) part.stop();
  };
}

// Follows one task until it ends. With the event stream live, its log, status and end
// arrive as events and a plain poll every few seconds settles the rest; without it,
// long-polls ?wait=2 so the log refreshes at least every two seconds and the end shows at
// once. onUpdate gets each TaskStatus ({status, stage, log, output}).
function watchTask(id, onUpdate, onError) {
  const abort = new AbortController();
  let state = null;
  let deltas = 0; // log events applied so far
  let stopped = false;
  const loop = poll(
    async () => {
      const before = deltas;
      const status = await api.pollTask(id, isLive() ? 0 : 2, abort.signal);
      if (stopped || !status) return;
      // Log deltas that came while this answer was on its way are newer than it.
      if (state && deltas > before && !ENDED.has(status.status) && (state.log || "").startsWith(status.log || "")) {
        status.log = state.log;
      }
      update(status);
    },
    { everyMs: pace(5000, 250), maxMs: 10000, onError },
  );
  const unfollow = follow(loop, () => false); // the pace changes with the stream
  const unsubscribe = subscribe((e) => {
    const t = taskOf(e);
    if (stopped || !state || !t || t.cap !== id.cap || t.id !== id.id) return;
    const d = e.data;
    if (e.type === "log") {
      deltas += 1;
      update({ ...state, log: (state.log || "") + (d.log || ""), stage: d.stage ?? state.stage });
    } else if (e.type === "status") {
      if (ENDED.has(d.status)) return; // the `end` event that follows carries the output
      update({ ...state, status: d.status, stage: "stage" in d ? d.stage : state.stage, cancelRequested: !!d.cancelRequested });
    } else if (e.type === "end") {
      update({ id: d.id, status: d.status, stage: d.stage, log: d.log || "", output: d.result });
    }
  });
  function update(status) {
    state = status;
    onUpdate(status);
    if (ENDED.has(status.status)) stop();
  }
  function stop() {
    if (stopped) return;
    stopped = true;
    unsubscribe();
    unfollow();
    loop.stop();
    abort.abort();
  }
  return { stop };
}

// ------------------------------------------------------------------ submit a task

const EXAMPLES = {
  [BASH_CAP]: { command: "uname -a" },
  llm: { messages: [{ role: "user", content: "Say hello in five words." }] },
};

function setupSubmit(refs) {
  let watch = null;
  let abort = null;
  let payloadTouched = false;

  const validate = () => {
    const text = refs.payload.value.trim();
    try {
      JSON.parse(text || "null");
      refs["payload-state"].textContent = text ? "Valid JSON." : "Empty: the payload will be null.";
      refs["payload-state"].classList.remove("hint-error");
      refs.payload.removeAttribute("aria-invalid");
      refs.submit.disabled = false;
      return true;
    } catch (err) {
      refs["payload-state"].textContent = `Invalid JSON: ${err.message}`;
      refs["payload-state"].classList.add("hint-error");
      refs.payload.setAttribute("aria-invalid", "true");
      refs.submit.disabled = true;
      return false;
    }
  };
  refs.payload.addEventListener("input", () => {
    payloadTouched = true;
    validate();
  });
  validate();

  // An untouched payload follows the capability with an example the agents understand.
  refs.capability.addEventListener("change", () => {
    if (payloadTouched) return;
    const cap = refs.capability.value.trim();
    const example = cap === BASH_CAP ? EXAMPLES[BASH_CAP] : cap.startsWith("llm.") ? EXAMPLES.llm : {};
    refs.payload.value = JSON.stringify(example, null, 2);
    validate();
  });

  // Priority and delays are for the regular queue; the server refuses them on urgent tasks.
  const syncBlocking = () => {
    if (refs.blocking.checked) refs.urgent.checked = true;
    refs.urgent.disabled = refs.blocking.checked;
    refs.priority.disabled = refs.delay.disabled = refs.urgent.checked;
  };
  refs.blocking.addEventListener("change", syncBlocking);
  refs.urgent.addEventListener("change", syncBlocking);

  let running = null; // the id of the task the result card follows, until it ends
  const syncCancel = (s) => {
    const open = !!running && !!s && !ENDED.has(s.status);
    refs["run-cancel"].hidden = !open;
    refs["run-cancel"].disabled = !!(s && s.cancelRequested);
    refs["run-cancel-note"].hidden = !(open && s.cancelRequested);
  };
  const followRun = (id) => {
    running = id;
    watch = watchTask(
      id,
      (s) => {
        renderRun(refs, s);
        syncCancel(s);
      },
      (e) => showError(refs["run-error"], e),
    );
  };
  refs["run-cancel"].addEventListener("click", async () => {
    if (!running) return;
    const answer = await act(refs["run-cancel"], () => api.cancelClientTask(running), "Cancel sent.");
    if (answer) {
      renderRun(refs, { ...answer, cancelRequested: !ENDED.has(answer.status) });
      syncCancel({ ...answer, cancelRequested: !ENDED.has(answer.status) });
    }
  });

  refs["submit-form"].addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!validate()) return;
    const capability = refs.capability.value.trim();
    if (!capability) return;
    const text = refs.payload.value.trim();
    const task = { capability, payload: text ? JSON.parse(text) : null, urgent: refs.urgent.checked, ...lifecycle(refs) };
    if (watch) watch.stop();
    running = null;
    syncCancel(null);
    if (abort) abort.abort();
    watch = null;
    abort = null;
    resetRun(refs, capability, task.urgent);
    refs.submit.disabled = true;
    try {
      if (refs.blocking.checked) {
        abort = new AbortController();
        setStatus(refs, "pending", "Blocking: waiting for the task to end…");
        let done;
        try {
          done = await api.submitBlocking(task, abort.signal);
        } catch (err) {
          // 504: the task is still running; its id comes back so we can keep watching.
          const id = err.status === 504 && err.body && (err.body.id || (err.body.error && err.body.error.id));
          if (!id) throw err;
          showRunId(refs, id);
          followRun(id);
          return;
        }
        showRunId(refs, done.id);
        renderRun(refs, { ...done, output: done.result });
      } else {
        const accepted = await api.submit(task);
        showRunId(refs, accepted.id);
        setStatus(refs, accepted.status || "pending");
        syncCancel({ status: accepted.status || "pending" });
        followRun(accepted.id);
      }
    } catch (err) {
      if (err.name === "AbortError") return;
      setStatus(refs, "failed", "Not submitted");
      showError(refs["run-error"], err);
    } finally {
      refs.submit.disabled = false;
      validate();
    }
  });

  return {
    capabilities(caps) {
      const current = [...refs["capability-list"].options].map((o) => o.value).join("\n");
      if (current !== caps.join("\n")) {
        refs["capability-list"].replaceChildren(...caps.map((c) => h("option", { value: c })));
      }
      refs["capability-hint"].textContent = caps.length
        ? `Online: ${caps.join(", ")}. Any other capability is accepted for the regular queue.`
        : "No capability is online; a regular task waits in its queue until an agent comes.";
    },
    stop() {
      if (watch) watch.stop();
      if (abort) abort.abort();
    },
  };
}

// The optional lifecycle fields, as the submission's extension fields.
function lifecycle(refs) {
  const fields = {};
  const number = (el) => (el.disabled || el.value.trim() === "" ? null : Number(el.value));
  const priority = refs.priority.disabled || refs.priority.value === "" ? null : Number(refs.priority.value);
  if (priority !== null) fields.priority = priority;
  const delay = number(refs.delay);
  if (delay !== null) fields.delaySecs = delay;
  const timeout = number(refs.timeout);
  if (timeout !== null) fields.timeoutSecs = timeout;
  const retries = number(refs.retries);
  if (retries !== null) {
    fields.restartable = true;
    fields.maxRetries = retries;
  }
  return fields;
}

function resetRun(refs, capability, urgent) {
  refs.run.hidden = false;
  refs.run.dataset.capability = capability;
  refs.run.dataset.urgent = String(urgent);
  fillFacts(refs["run-facts"], [
    ["Capability", mono(capability)],
    ["Queue", urgent ? "urgent" : "regular"],
  ]);
  refs["run-log"].textContent = "";
  refs["run-output"].textContent = "—";
  refs["run-link"].hidden = true;
  showError(refs["run-error"], null);
}

function showRunId(refs, id) {
  refs.run.dataset.task = id.id;
  fillFacts(refs["run-facts"], [
    ["Task", mono(id.id)],
    ["Capability", mono(id.cap)],
    ["Queue", refs.run.dataset.urgent === "true" ? "urgent" : "regular"],
    ["Stage", h("span", { "data-ref": "run-stage" }, "—")],
  ]);
  refs["run-link"].href = taskHref(id);
  refs["run-link"].hidden = false;
}

function setStatus(refs, status, label) {
  refs["run-status"].dataset.status = status;
  refs["run-status"].textContent = label || status;
}

function renderRun(refs, s) {
  if (!s) return;
  setStatus(refs, s.status);
  const stage = refs["run-facts"].querySelector("[data-ref=run-stage]");
  if (stage) stage.textContent = s.stage || "—";
  setLog(refs["run-log"], s.log || (ENDED.has(s.status) ? "" : "Waiting for the agent's first report…"));
  const output = s.output === undefined || s.output === null ? (ENDED.has(s.status) ? "—" : "Not finished yet.") : pretty(s.output);
  if (refs["run-output"].textContent !== output) refs["run-output"].textContent = output;
}

// ------------------------------------------------------------------ Bash console

function setupBash(refs) {
  const out = refs["term-out"];
  const input = refs["term-input"];
  const history = [];
  let cursor = 0;
  let watch = null;
  let online = null;

  const line = (cls, text) => {
    const el = h("div", { class: `term-${cls}` }, text);
    out.append(el);
    out.scrollTop = out.scrollHeight;
    return el;
  };
  line("meta", `Commands run as urgent ${BASH_CAP} tasks. Type clear to clear the screen.`);

  let running = null; // the id of the command's task while it runs
  let stopping = false;
  // While a command runs the line stays focusable (read-only) so that Ctrl-C reaches it.
  const busy = (on) => {
    input.readOnly = on;
    refs.term.classList.toggle("is-busy", on);
    refs["term-stop"].hidden = !on;
    refs["term-stop"].disabled = false;
  };
  const finish = () => {
    watch = null;
    running = null;
    stopping = false;
    busy(false);
    input.focus();
  };
  // Ctrl-C: cancel the running command's task (the agent kills its process).
  const interrupt = async () => {
    if (!running || stopping) return;
    stopping = true;
    refs["term-stop"].disabled = true;
    line("meta", "^C · cancel requested");
    try {
      await api.cancelClientTask(running);
    } catch (err) {
      stopping = false;
      refs["term-stop"].disabled = false;
      line("error", errorText(err));
    }
  };
  refs["term-stop"].addEventListener("click", (event) => {
    event.stopPropagation();
    interrupt();
    input.focus();
  });

  refs["term-form"].addEventListener("submit", async (event) => {
    event.preventDefault();
    const command = input.value;
    if (!command.trim() || watch || input.readOnly) return;
    if (history[history.length - 1] !== command) history.push(command);
    cursor = history.length;
    input.value = "";
    if (command.trim() === "clear") {
      out.replaceChildren();
      return;
    }
    line("cmd", command);
    busy(true);
    let accepted;
    try {
      accepted = await api.submit({ capability: BASH_CAP, payload: { command }, urgent: true });
    } catch (err) {
      line("error", errorText(err));
      finish();
      return;
    }
    running = accepted.id;
    const stream = line("stream", "");
    watch = watchTask(
      accepted.id,
      (s) => {
        if (stream.textContent !== (s.log || "")) stream.textContent = s.log || "";
        out.scrollTop = out.scrollHeight;
        if (!ENDED.has(s.status)) return;
        showBashResult(line, stream, s);
        finish();
      },
      (err) => line("error", errorText(err)),
    );
  });

  input.addEventListener("keydown", (event) => {
    if (event.key === "ArrowUp" && cursor > 0) {
      cursor -= 1;
      input.value = history[cursor];
      event.preventDefault();
    } else if (event.key === "ArrowDown" && cursor < history.length) {
      cursor += 1;
      input.value = history[cursor] ?? "";
      event.preventDefault();
    } else if (event.key === "l" && event.ctrlKey) {
      out.replaceChildren();
      event.preventDefault();
    } else if (event.key === "c" && event.ctrlKey && !event.shiftKey && input.selectionStart === input.selectionEnd) {
      // Without a selection to copy, Ctrl-C interrupts, as in a terminal.
      event.preventDefault();
      if (running) interrupt();
      else if (!input.readOnly) {
        line("cmd", `${input.value}^C`);
        input.value = "";
        cursor = history.length;
      }
    }
  });
  refs.term.addEventListener("click", () => {
    if (!window.getSelection().toString()) input.focus();
  });

  return {
    capabilities(caps) {
      const now = caps.includes(BASH_CAP);
      if (now === online) return;
      online = now;
      if (!now) line("meta", `No online agent serves ${BASH_CAP} right now.`);
      else line("meta", `${BASH_CAP} is online.`);
    },
    stop() {
      if (watch) watch.stop();
    },
  };
}

// The final output is authoritative: {stdout, stderr, exit_code} replaces what the log
// streamed; any other output shape is shown as it is.
function showBashResult(line, stream, s) {
  const o = s.output;
  if (o && typeof o === "object" && ("stdout" in o || "stderr" in o)) {
    stream.textContent = o.stdout || "";
    if (o.stderr) line("stderr", o.stderr);
  } else if (o !== undefined && o !== null) {
    const text = pretty(o);
    if (!stream.textContent.includes(text)) line("stream", text);
  }
  if (!stream.textContent) stream.remove();
  if (o && typeof o === "object" && typeof o.error === "string") line("stderr", o.error);
  const code = o && typeof o === "object" ? o.exit_code ?? o.return_code ?? o.exitCode ?? o.returncode : undefined;
  const failed = s.status !== "completed" || (typeof code === "number" && code !== 0);
  line(failed ? "error" : "meta", [s.status, code !== undefined ? `exit ${code}` : null].filter(Boolean).join(" · "));
}

// ------------------------------------------------------------------ LLM chat

function setupChat(refs) {
  const log = refs["chat-log"];
  const input = refs["chat-input"];
  const select = refs["chat-model"];
  let messages = [];
  let watch = null;

  const bubble = (role, text, cls = "") =>
    h("div", { class: `msg msg-${role} ${cls}`.trim() }, h("div", { class: "msg-role" }, role === "user" ? "You" : select.value || "assistant"), h("div", { class: "msg-text" }, text));
  const add = (el) => {
    log.append(el);
    log.scrollTop = log.scrollHeight;
    return el;
  };
  const intro = () =>
    log.replaceChildren(h("p", { class: "muted chat-empty" }, "Messages go to the chosen llm.* capability as an urgent task with the whole conversation as its payload."));
  intro();

  const busy = (on) => {
    refs["chat-send"].disabled = on || !select.value;
    input.disabled = on;
  };

  refs["chat-form"].addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    const capability = select.value;
    if (!text || !capability || watch) return;
    if (log.querySelector(".chat-empty")) log.replaceChildren();
    input.value = "";
    messages.push({ role: "user", content: text });
    add(bubble("user", text));
    const reply = add(bubble("assistant", "…", "is-pending"));
    const replyText = reply.querySelector(".msg-text");
    busy(true);
    const fail = (err) => {
      messages.pop();
      reply.classList.remove("is-pending");
      reply.classList.add("is-error");
      replyText.textContent = errorText(err);
      watch = null;
      busy(false);
      input.focus();
    };
    let accepted;
    try {
      // stream: the agent copies the words into the task log as they come.
      accepted = await api.submit({ capability, payload: { messages, stream: true }, urgent: true });
    } catch (err) {
      fail(err);
      return;
    }
    watch = watchTask(
      accepted.id,
      (s) => {
        if (!ENDED.has(s.status)) {
          replyText.textContent = s.log ? s.log : `${s.status}…`;
          return;
        }
        if (s.status !== "completed") {
          const why = s.output && typeof s.output.error === "string" ? s.output.error : textOf(s.output);
          fail(`The task ${s.status}${why ? `: ${why}` : "."}`);
          return;
        }
        const answer = textOf(s.output);
        messages.push({ role: "assistant", content: answer });
        reply.classList.remove("is-pending");
        replyText.textContent = answer;
        log.scrollTop = log.scrollHeight;
        watch = null;
        busy(false);
        input.focus();
      },
      (err) => (replyText.textContent = `${errorText(err)} (retrying)`),
    );
  });

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      refs["chat-form"].requestSubmit();
    }
  });

  refs["chat-clear"].addEventListener("click", () => {
    if (watch) watch.stop();
    watch = null;
    messages = [];
    intro();
    busy(false);
    input.focus();
  });

  // The models listed, joined; null before the first list, so that an empty first list
  // (no llm.* online) is shown too rather than compared equal to the empty dropdown.
  let listed = null;

  return {
    capabilities(caps) {
      const models = caps.filter((c) => c.startsWith("llm."));
      refs["chat-none"].hidden = models.length > 0;
      if (listed !== models.join("\n")) {
        listed = models.join("\n");
        const keep = select.value;
        select.replaceChildren(
          ...(models.length ? models.map((m) => h("option", { value: m }, m)) : [h("option", { value: "" }, "no llm.* capability online")]),
        );
        if (models.includes(keep)) select.value = keep;
        select.disabled = !models.length;
      }
      busy(!!watch);
    },
    stop() {
      if (watch) watch.stop();
    },
  };
}

// Agents answer in several shapes (Ollama, OpenAI, plain text); find the words.
function textOf(output) {
  if (output === undefined || output === null) return "";
  if (typeof output === "string") return output;
  const o = output;
  const found = o.message?.content ?? o.choices?.[0]?.message?.content ?? o.response ?? o.content ?? o.text ?? o.output;
  return typeof found === "string" ? found : JSON.stringify(o, null, 2);
}
