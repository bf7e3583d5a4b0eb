// API keys: the client keys, creating one with capability patterns, revoking one.

import { api } from "./api.js";
import { poll } from "./poll.js";
import { h, mountTemplate, fillTable, tr, showError, chips, mono, timeCell, confirmAction, act, toast } from "./dom.js";

const LABELS = ["Key", "Capabilities", "Kind", "Created", "State", ""];

export function mount(root) {
  const refs = mountTemplate(root, "keys");

  const loop = poll(
    async () => {
      render(refs, (await api.keys()) || [], loop);
      showError(refs.error, null);
    },
    { everyMs: 5000, onError: (err) => showError(refs.error, err) },
  );

  refs.generate.addEventListener("click", () => {
    refs.key.value = newKey();
    refs.capabilities.focus();
  });

  refs.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = refs.key.value.trim();
    const patterns = parsePatterns(refs.capabilities.value);
    if (!key || !patterns.length) return;
    const saved = await act(refs.create, () => api.saveKey(key, patterns));
    if (saved) {
      toast(`Key ${key} saved with ${patterns.join(", ")}.`);
      refs.form.reset();
      loop.now();
    }
  });

  return () => loop.stop();
}

function render(refs, keys, loop) {
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
          mono(k.key),
          chips(k.capabilities),
          k.isPredefined ? "predefined" : "created here",
          timeCell(k.created),
          h("span", { class: "badge", dataset: { status: k.isRevoked ? "revoked" : "active" } }, k.isRevoked ? "revoked" : "active"),
          h("td", { class: "actions" }, k.isRevoked ? null : revokeButton(k, loop)),
        ],
        LABELS,
        { dataset: { key: k.key }, class: k.isRevoked ? "is-revoked" : undefined },
      ),
    ),
  );
}

function revokeButton(k, loop) {
  const button = h("button", { type: "button", class: "btn btn-small btn-danger-ghost" }, "Revoke");
  button.addEventListener("click", async () => {
    const ok = await confirmAction(
      "Revoke this key?",
      `Clients using ${k.key} will get 401 from now on. This cannot be undone; create a new key instead.`,
      "Revoke key",
    );
    if (!ok) return;
    await act(button, () => api.revokeKey(k.key), `Key ${k.key} revoked.`);
    loop.now();
  });
  return button;
}

// "llm.*, shell.bash" → ["llm.*", "shell.bash"]
function parsePatterns(text) {
  return [...new Set(text.split(/[,\n]/).map((p) => p.trim()).filter(Boolean))];
}

function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `ck-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}
