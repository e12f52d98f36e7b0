/** What every page gets, and helpers pages share. */
import { errorText, h, type Field } from "../dom.js";
import type { Who } from "../api.js";

/** A page's inputs: where to draw, who is signed in, the route's parameters, and a signal that ends with the page. */
export interface PageContext {
  main: HTMLElement;
  who: Who;
  params: string[];
  signal: AbortSignal;
  /** Redraws the current page. */
  refresh(): void;
}

/** A page: draws itself into `ctx.main`. */
export type Page = (ctx: PageContext) => Promise<void>;

/**
 * Shows a server error next to the field it names ("subject.country: ..."); an error that names
 * no field of the form goes to `fallback`. The words are the server's, as `kmi ctl` prints them.
 */
export function showError(err: unknown, fields: Record<string, Field<HTMLElement>>, fallback: Field<HTMLElement> | HTMLElement): void {
  if (showFieldError(err, fields)) return;
  const text = errorText(err);
  if ("error" in fallback) fallback.error(text);
  else fallback.textContent = text;
}

/** Shows a server error next to the field of `fields` it names; false (nothing shown) when it names none of them. */
export function showFieldError(err: unknown, fields: Record<string, Field<HTMLElement>>): boolean {
  const text = errorText(err);
  const name = /^([a-z_.]+):/.exec(text)?.[1];
  const target = name !== undefined ? fields[name] : undefined;
  target?.error(text);
  return target !== undefined;
}

/** A paragraph for an error that belongs to the whole page. */
export function pageError(err: unknown): HTMLElement {
  return h("p", { class: "error", role: "alert" }, errorText(err));
}

/** The tenant pages' heading and sub-navigation. */
export function tenantHeader(tenant: string, current: string): HTMLElement {
  const links: [string, string][] = [
    ["ca", "Active CA"],
    ["versions", "History"],
    ["new", "Rotate / CSR"],
    ["rollout", "Rollout"],
    ["audit", "Audit trail"],
  ];
  return h(
    "div",
    {},
    h("h1", {}, `Certificate menu — ${tenant}`),
    h(
      "nav",
      { class: "subnav", "aria-label": "Certificate menu" },
      ...links.map(([p, label]) => h("a", { href: `#/t/${tenant}/${p}`, ...(p === current ? { "aria-current": "page" } : {}) }, label)),
    ),
  );
}
