// DOM helpers shared by the pages. Values reach the page only as text nodes or
// textContent: a task payload or an agent's system info may contain HTML.

// h("td", {class: "num", title: "…", dataset: {label: "Tier"}}, "3") → <td class="num" …>3</td>
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = String(value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "on") for (const [type, fn] of Object.entries(value)) el.addEventListener(type, fn);
    // Through the CSSOM: a style attribute would be an inline style, which the CSP refuses.
    else if (name === "style") el.style.cssText = String(value);
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// Clones <template id="tpl-NAME"> into root and returns its data-ref elements by name.
export function mountTemplate(root, name) {
  const tpl = document.getElementById(`tpl-${name}`);
  root.replaceChildren(tpl.content.cloneNode(true));
  const refs = {};
  for (const el of root.querySelectorAll("[data-ref]")) refs[el.dataset.ref] = el;
  return refs;
}

// Replaces a table body's rows. A row is a <tr> or a list of cells; a cell is a <td>
// or its content. Labels name the cells for the stacked phone layout.
export function fillTable(tbody, rows, labels = []) {
  tbody.replaceChildren(...rows.map((row) => (row instanceof Node ? row : tr(row, labels))));
}

export function tr(cells, labels = [], props = {}) {
  return h(
    "tr",
    props,
    cells.map((cell, i) => {
      // Several parts go in one <div>: the phone layout makes each cell a two-column grid.
      const content = Array.isArray(cell) ? h("div", {}, cell) : cell;
      const el = cell instanceof HTMLTableCellElement ? cell : h("td", {}, content);
      if (labels[i] && !el.dataset.label) el.dataset.label = labels[i];
      return el;
    }),
  );
}

// A right-aligned number cell.
export function numCell(value) {
  return h("td", { class: "num" }, value === undefined || value === null ? "—" : String(value));
}

export function showError(el, err) {
  if (!el) return;
  if (!err) {
    el.hidden = true;
    el.textContent = "";
    return;
  }
  el.hidden = false;
  el.textContent = errorText(err);
}

export function errorText(err) {
  if (!err) return "";
  if (typeof err === "string") return err;
  if (err.message) return err.message;
  return String(err);
}

export function badge(status) {
  return h("span", { class: "badge", dataset: { status: status || "unknown" } }, status || "unknown");
}

export function chips(values, cls = "chip") {
  return h("span", { class: "chips" }, (values || []).map((v) => h("span", { class: cls }, v)));
}

export function mono(text, title) {
  return h("span", { class: "mono", title }, text);
}

export function pretty(value) {
  if (value === undefined || value === null) return "—";
  if (typeof value === "string") return value;
  return JSON.stringify(value, null, 2);
}

// Sets a <pre>'s text and keeps it scrolled to the end if the reader was at the end.
export function setLog(pre, text) {
  if (pre.textContent === text) return;
  const atEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
  pre.textContent = text;
  if (atEnd) pre.scrollTop = pre.scrollHeight;
}

export function relTime(iso, now = Date.now()) {
  if (!iso) return "—";
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return String(iso);
  const s = Math.round((now - then) / 1000);
  const future = s < 0;
  const a = Math.abs(s);
  let text;
  if (a < 5) return "just now";
  if (a < 60) text = `${a} s`;
  else if (a < 3600) text = `${Math.floor(a / 60)} min`;
  else if (a < 86400) text = `${Math.floor(a / 3600)} h`;
  else text = `${Math.floor(a / 86400)} d`;
  return future ? `in ${text}` : `${text} ago`;
}

// 42 → "42 ms", 4200 → "4.2 s", 75000 → "1 min 15 s": how long something took.
export function duration(ms) {
  const s = Math.max(0, ms) / 1000;
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

// plural(1, "agent") → "1 agent", plural(3, "agent") → "3 agents"
export function plural(n, word) {
  return `${n} ${n === 1 ? word : `${word}s`}`;
}

export function absTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export function timeCell(iso) {
  return h("time", { datetime: iso || undefined, title: absTime(iso) || undefined }, relTime(iso));
}

export function memory(mb) {
  if (typeof mb !== "number" || !Number.isFinite(mb)) return null;
  return mb >= 1024 ? `${(mb / 1024).toFixed(mb >= 10240 ? 0 : 1)} GB` : `${mb} MB`;
}

// Definition list from [term, value] pairs; values may be nodes; empty values are skipped.
export function fillFacts(dl, pairs) {
  dl.replaceChildren(
    ...pairs
      .filter(([, v]) => v !== undefined && v !== null && v !== "")
      .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
  );
}

// A button that copies `text` (an id, a new key) to the clipboard and says so.
export function copyButton(text, what) {
  return h("button", {
    type: "button", class: "btn btn-small btn-ghost copy", dataset: { action: "copy" },
    title: `Copy ${what}`, "aria-label": `Copy ${what}`,
    on: { click: () => copyText(text, what) },
  }, "Copy");
}

export async function copyText(text, what) {
  try {
    // The clipboard API needs a secure context (https or localhost); elsewhere the
    // older selection copy still works.
    if (navigator.clipboard && window.isSecureContext) await navigator.clipboard.writeText(text);
    else selectionCopy(text);
    toast(`Copied ${what}.`);
  } catch (err) {
    toast(`Could not copy ${what}: ${errorText(err)}`, "error");
  }
}

function selectionCopy(text) {
  const area = h("textarea", { class: "sr-only", readonly: true, "aria-hidden": "true" });
  area.value = text;
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  if (!copied) throw new Error("the browser refused");
}

export function toast(message, kind = "ok") {
  const box = document.getElementById("toasts");
  const el = h("div", { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  box.append(el);
  setTimeout(() => el.classList.add("toast-out"), 3500);
  setTimeout(() => el.remove(), 4000);
}

// Asks through the page's <dialog>; resolves true when the user confirms.
export function confirmAction(title, text, okLabel = "Confirm") {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    document.getElementById("confirm-cancel").focus();
  });
}

// Runs an action from a button: disables it meanwhile, reports the outcome as a toast.
export async function act(button, fn, doneMessage) {
  if (button) button.disabled = true;
  try {
    const result = await fn();
    if (doneMessage) toast(doneMessage);
    return result;
  } catch (err) {
    toast(errorText(err), "error");
    return undefined;
  } finally {
    if (button && button.isConnected) button.disabled = false;
  }
}
