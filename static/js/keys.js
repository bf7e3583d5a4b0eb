// API keys: the client keys, creating one with capability patterns and an optional limit
// of tasks in flight, changing that limit, revoking a key. A key is its client's secret:
// it is shown in full once, when created, and by its first characters after that.

import { api } from "./api.js";
import { poll } from "./poll.js";
import { h, mountTemplate, fillTable, tr, showError, chips, mono, timeCell, confirmAction, act, toast, copyText } from "./dom.js";

const LABELS = ["Key", "Capabilities", "Max in flight", "Kind", "Created", "State", ""];

export function mount(root) {
  const refs = mountTemplate(root, "keys");
  const state = { keys: [], editing: null }; // editing: the key whose limit is being changed
  const redraw = () => render(refs, state, loop);

  const loop = poll(
    async () => {
      state.keys = (await api.keys()) || [];
      // A refresh must not throw away a limit being typed.
      if (!state.editing) redraw();
      showError(refs.error, null);
    },
    { everyMs: 5000, onError: (err) => showError(refs.error, err) },
  );
  state.refresh = () => loop.now();
  state.redraw = redraw;

  refs.generate.addEventListener("click", () => {
    refs.key.value = newKey();
    refs.capabilities.focus();
  });

  refs.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = refs.key.value.trim();
    const patterns = parsePatterns(refs.capabilities.value);
    if (!key || !patterns.length) return;
    const limit = parseLimit(refs["max-in-flight"].value);
    if (limit === undefined) {
      toast("Max in flight must be a whole number of at least 1, or empty for no limit.", "error");
      refs["max-in-flight"].focus();
      return;
    }
    const saved = await act(refs.create, () => api.saveKey(key, patterns, limit));
    if (saved) {
      toast(`Key ${keyPrefix(key)} saved with ${patterns.join(", ")}${limit ? `, at most ${limit} in flight` : ""}.`);
      refs.form.reset();
      refs["created-key"].value = key;
      refs.created.hidden = false;
      refs["copy-created"].focus();
      loop.now();
    }
  });
  refs["copy-created"].addEventListener("click", () => copyText(refs["created-key"].value, "the new key"));
  refs["dismiss-created"].addEventListener("click", () => {
    refs["created-key"].value = "";
    refs.created.hidden = true;
  });

  return () => loop.stop();
}

function render(refs, state) {
  const keys = state.keys;
  refs.count.textContent = String(keys.length);
  refs.empty.hidden = keys.length > 0;
  // Active keys first, newest first within each group.
  const sorted = [...keys].sort(
    (a, b) => Number(!!a.isRevoked) - Number(!!b.isRevoked) || String(b.created).localeCompare(String(a.created)),
  );
  fillTable(
    refs.rows,
    sorted.map((k) =>
      tr(
        [
          mono(keyPrefix(k.key)),
          chips(k.capabilities),
          limitCell(k, state),
          k.isPredefined ? "predefined" : "created here",
          timeCell(k.created),
          h("span", { class: "badge", dataset: { status: k.isRevoked ? "revoked" : "active" } }, k.isRevoked ? "revoked" : "active"),
          h("td", { class: "actions" }, k.isRevoked ? null : revokeButton(k, state)),
        ],
        LABELS,
        { dataset: { key: k.key }, class: k.isRevoked ? "is-revoked" : undefined },
      ),
    ),
  );
}

// The limit, with a Change button; while changing: a number field, Save and Cancel.
function limitCell(k, state) {
  const limit = typeof k.maxInFlight === "number" ? k.maxInFlight : null;
  const shown = h("span", { class: limit === null ? "muted" : "", dataset: { ref: "limit" } }, limit === null ? "no limit" : String(limit));
  if (k.isRevoked) return h("td", { class: "num limit" }, shown);
  if (state.editing !== k.key) {
    const change = h("button", { type: "button", class: "btn btn-small btn-ghost", dataset: { action: "limit" }, "aria-label": `Change max in flight of ${keyPrefix(k.key)}` }, "Change");
    change.addEventListener("click", () => {
      state.editing = k.key;
      state.redraw();
      const input = document.querySelector(`tr[data-key="${CSS.escape(k.key)}"] input[name=limit]`);
      if (input) input.focus();
    });
    return h("td", { class: "num limit" }, h("div", { class: "limit-row" }, shown, change));
  }
  const input = h("input", {
    name: "limit", type: "number", min: "1", step: "1", inputmode: "numeric", placeholder: "no limit",
    value: limit === null ? "" : String(limit), "aria-label": `Max in flight of ${keyPrefix(k.key)}`,
  });
  const save = h("button", { type: "submit", class: "btn btn-small btn-primary" }, "Save");
  const cancel = h("button", { type: "button", class: "btn btn-small btn-ghost" }, "Cancel");
  const close = () => {
    state.editing = null;
    state.redraw();
  };
  cancel.addEventListener("click", close);
  const form = h("form", { class: "limit-form" }, input, save, cancel);
  form.addEventListener("keydown", (event) => {
    if (event.key === "Escape") close();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = parseLimit(input.value);
    if (value === undefined) {
      toast("Max in flight must be a whole number of at least 1, or empty for no limit.", "error");
      input.focus();
      return;
    }
    // The update names the capabilities again: they stay as they are.
    const saved = await act(save, () => api.saveKey(k.key, k.capabilities, value));
    if (!saved) return;
    toast(value === null ? `Key ${keyPrefix(k.key)} has no limit now.` : `Key ${keyPrefix(k.key)}: at most ${value} tasks in flight.`);
    state.keys = state.keys.map((x) => (x.key === k.key ? saved : x));
    close();
    state.refresh();
  });
  return h("td", { class: "num limit" }, form);
}

function revokeButton(k, state) {
  const button = h("button", { type: "button", class: "btn btn-small btn-danger-ghost" }, "Revoke");
  button.addEventListener("click", async () => {
    const ok = await confirmAction(
      "Revoke this key?",
      `Clients using ${keyPrefix(k.key)} will get 401 from now on. This cannot be undone; create a new key instead.`,
      "Revoke key",
    );
    if (!ok) return;
    await act(button, () => api.revokeKey(k.key), `Key ${keyPrefix(k.key)} revoked.`);
    state.refresh();
  });
  return button;
}

// The first characters of a key: enough to tell keys apart, too few to use one (a third
// of it, at most 8).
function keyPrefix(key) {
  const k = String(key);
  return `${k.slice(0, Math.min(8, Math.floor(k.length / 3)))}…`;
}

// "" → null (no limit); "12" → 12; anything else → undefined (invalid).
function parseLimit(text) {
  const t = String(text).trim();
  if (!t) return null;
  const n = Number(t);
  return Number.isInteger(n) && n >= 1 ? n : undefined;
}

// "llm.*, shell.bash" → ["llm.*", "shell.bash"]
function parsePatterns(text) {
  return [...new Set(text.split(/[,\n]/).map((p) => p.trim()).filter(Boolean))];
}

function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `ck-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}
