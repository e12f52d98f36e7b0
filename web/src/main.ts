/**
 * The portal's entry: signs in with a login link (the code is taken out of the address bar
 * before anything else happens), finds out who is signed in, and routes `#/…` to a page.
 */
import { api, isUnauthenticated, whoAmI, type Who } from "./api.js";
import { errorText, h } from "./dom.js";
import { auditPage } from "./pages/audit.js";
import { caPage } from "./pages/ca.js";
import type { Page } from "./pages/common.js";
import { newVersionPage } from "./pages/new-version.js";
import { joinTokensPage, machinesPage } from "./pages/machines.js";
import { meshPage, tenantsPage } from "./pages/operator.js";
import { rolloutPage } from "./pages/rollout.js";
import { signInPage } from "./pages/signin.js";
import { uploadPage, versionsPage } from "./pages/versions.js";

const main = document.getElementById("main")!;
const nav = document.getElementById("nav")!;
const whoEl = document.getElementById("who")!;

/** Routes: a pattern over the hash's path and its page. */
const ROUTES: [RegExp, Page][] = [
  [/^\/t\/([a-z][a-z0-9-]*)\/ca$/, caPage],
  [/^\/t\/([a-z][a-z0-9-]*)\/versions$/, versionsPage],
  [/^\/t\/([a-z][a-z0-9-]*)\/new$/, newVersionPage],
  [/^\/t\/([a-z][a-z0-9-]*)\/upload\/(\d+)$/, uploadPage],
  [/^\/t\/([a-z][a-z0-9-]*)\/rollout$/, rolloutPage],
  [/^\/t\/([a-z][a-z0-9-]*)\/audit$/, auditPage],
  [/^\/tenants$/, tenantsPage],
  [/^\/mesh$/, meshPage],
  [/^\/machines$/, machinesPage],
  [/^\/join-tokens$/, joinTokensPage],
  [/^\/audit$/, auditPage],
];

let who: Who | undefined;
let current: AbortController | undefined;

function home(w: Who): string {
  return w.operator ? "#/tenants" : `#/t/${w.tenant}/ca`;
}

function drawChrome(w: Who | undefined): void {
  if (w === undefined) {
    nav.replaceChildren();
    whoEl.replaceChildren();
    return;
  }
  const links: [string, string][] = w.operator
    ? [["#/tenants", "Tenants"], ["#/machines", "Machines"], ["#/join-tokens", "Join tokens"], ["#/mesh", "Mesh status"], ["#/audit", "Audit log"]]
    : [[`#/t/${w.tenant}/ca`, "Certificate menu"]];
  nav.replaceChildren(...links.map(([href, label]) => h("a", { href }, label)));
  const out = h("button", { type: "button", class: "link", onclick: () => void signOut() }, "Sign out");
  whoEl.replaceChildren(h("span", { id: "who-label" }, w.operator ? "operator" : `tenant admin · ${w.tenant}`), out);
}

async function signOut(): Promise<void> {
  await api.portal.signOut({}).catch(() => undefined);
  who = undefined;
  location.hash = "";
  void start();
}

/** Draws the page of the current hash. */
async function route(): Promise<void> {
  current?.abort();
  const ctl = new AbortController();
  current = ctl;
  if (who === undefined) return;
  const path = location.hash.replace(/^#/, "");
  for (const [re, page] of ROUTES) {
    const m = re.exec(path);
    if (m === null) continue;
    main.replaceChildren(h("p", {}, "Loading…"));
    try {
      await page({ main, who, params: m.slice(1), signal: ctl.signal, refresh: () => void route() });
    } catch (err) {
      if (isUnauthenticated(err)) return void start("Your session ended; sign in again.");
      main.replaceChildren(h("p", { class: "error", role: "alert" }, errorText(err)));
    }
    document.title = `${main.querySelector("h1")?.textContent ?? "kmi"} · kmi portal`;
    if (!ctl.signal.aborted) main.focus();
    return;
  }
  location.replace(home(who));
}

/** Signs in with the login link's code, if the address carries one; removes it at once. */
async function useLoginLink(): Promise<string | undefined> {
  const m = /^#login=([A-Za-z0-9_-]+)$/.exec(location.hash);
  if (m === null) return undefined;
  // The code must not stay in the address bar or the history, used or not.
  history.replaceState(null, "", location.pathname);
  try {
    await api.portal.signIn({ credential: { case: "loginCode", value: m[1]! } });
    return undefined;
  } catch (err) {
    return errorText(err);
  }
}

async function start(message?: string): Promise<void> {
  const linkError = await useLoginLink();
  who = await whoAmI();
  drawChrome(who);
  if (who === undefined) {
    signInPage(main, () => void start(), linkError ?? message);
    return;
  }
  if (!location.hash.startsWith("#/")) location.replace(home(who));
  else await route();
}

// The skip link moves focus; it must not change the hash the pages are routed by.
document.querySelector(".skip")?.addEventListener("click", (ev) => {
  ev.preventDefault();
  main.focus();
});
// A login link opened in a tab that shows the portal already changes only the hash.
window.addEventListener("hashchange", () => void (location.hash.startsWith("#login=") ? start() : route()));
void start();
