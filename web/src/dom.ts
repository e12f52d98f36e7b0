/**
 * Small DOM helpers: build elements, labelled fields with their error slot, typed
 * confirmations in a modal dialog, downloads of bytes, and polite announcements.
 */

type Child = Node | string | false | null | undefined;
type Attrs = Record<string, string | boolean | ((ev: Event) => void) | undefined>;

/** An element with attributes (`on…` are listeners, booleans toggle) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attrs = {}, ...children: (Child | Child[])[]): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) continue;
    if (typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== undefined && c !== null && c !== false) el.append(c);
  return el;
}

let fieldSeq = 0;

/** A labelled control with a hint and an error slot tied to it (aria-describedby). */
export interface Field<E extends HTMLElement> {
  wrap: HTMLElement;
  control: E;
  /** Shows `msg` next to the control (or clears it with ""). */
  error(msg: string): void;
}

/** Wraps `control` in a label, a hint and an error slot. */
export function field<E extends HTMLInputElement | HTMLTextAreaElement | HTMLSelectElement>(label: string, control: E, hint?: string): Field<E> {
  const id = control.id || `f${++fieldSeq}`;
  control.id = id;
  const err = h("p", { class: "field-error", id: `${id}-err`, role: "alert" });
  const hintEl = hint === undefined ? undefined : h("p", { class: "hint", id: `${id}-hint` }, hint);
  control.setAttribute("aria-describedby", [hintEl ? `${id}-hint` : "", `${id}-err`].filter(Boolean).join(" "));
  const wrap = h("div", { class: "field" }, h("label", { for: id }, label), control, hintEl, err);
  return {
    wrap,
    control,
    error(msg) {
      err.textContent = msg;
      if (msg === "") control.removeAttribute("aria-invalid");
      else control.setAttribute("aria-invalid", "true");
    },
  };
}

/** A select with `options` as [value, label]. */
export function select(name: string, options: [string, string][], value?: string): HTMLSelectElement {
  const s = h("select", { name }, ...options.map(([v, l]) => h("option", { value: v }, l)));
  if (value !== undefined) s.value = value;
  return s;
}

/** Tells screen readers about a change that happened without focus moving. */
export function announce(text: string): void {
  const s = document.getElementById("status");
  if (s !== null) s.textContent = text;
}

/** Saves `data` as a file named `name`. */
export function download(name: string, data: Uint8Array | string, type: string): void {
  const blob = new Blob([typeof data === "string" ? data : new Uint8Array(data)], { type });
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: name, class: "sr-only" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/**
 * Asks for a typed confirmation in a modal dialog: the action runs only once the person typed
 * `phrase` exactly. `run` may throw; its message is shown in the dialog, which stays open.
 */
export function confirmTyped(p: {
  title: string;
  body: string;
  phrase: string;
  button: string;
  extra?: HTMLElement[];
  run: () => Promise<void>;
  /** Shows an error of `run` next to one of the `extra` fields it names; false leaves it to the confirmation field. */
  fieldError?: (err: unknown) => boolean;
}): void {
  const input = h("input", { type: "text", autocomplete: "off", spellcheck: "false", name: "confirm" });
  const f = field(`Type “${p.phrase}” to confirm`, input);
  const ok = h("button", { type: "submit", class: "danger", disabled: true }, p.button);
  const cancel = h("button", { type: "button" }, "Cancel");
  const form = h("form", { method: "dialog" }, h("h2", {}, p.title), h("p", {}, p.body), ...(p.extra ?? []), f.wrap, h("div", { class: "row" }, ok, cancel));
  const dialog = h("dialog", { "aria-label": p.title }, form);
  input.addEventListener("input", () => (ok.disabled = input.value.trim() !== p.phrase));
  cancel.addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => dialog.remove());
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (input.value.trim() !== p.phrase) return;
    ok.disabled = true;
    p.run().then(
      () => dialog.close(),
      (err: unknown) => {
        f.error(p.fieldError?.(err) === true ? "" : errorText(err));
        ok.disabled = false;
      },
    );
  });
  document.body.append(dialog);
  dialog.showModal();
  input.focus();
}

/** The words of an error: a ConnectError's server message as the CLI prints it. */
export function errorText(err: unknown): string {
  const e = err as { rawMessage?: unknown; message?: unknown };
  if (typeof e.rawMessage === "string") return e.rawMessage;
  return typeof e.message === "string" ? e.message : String(err);
}

/** "12 Mar 2027, 10:00 UTC" */
export function when(d: Date | undefined): string {
  if (d === undefined) return "—";
  return d.toISOString().replace("T", " ").replace(/:\d\d\.\d{3}Z$/, " UTC");
}

/** Whole days from now to `d` (negative when past). */
export function daysLeft(d: Date, now = new Date()): number {
  return Math.floor((d.getTime() - now.getTime()) / 86_400_000);
}
