/**
 * The portal end to end in a real browser: Debian's Chromium (playwright-core, started once for
 * the suite) trusting the KDC's infrastructure CA through an NSS database, against the whole
 * mesh as real processes (KDC, Auditserver, agent). Downloads are judged by openssl, the
 * private CA is openssl's, and each page is saved as a screenshot in test/.screenshots/.
 */
import { execFile } from "node:child_process";
import { createServer, type Server } from "node:https";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { BrowserContext, Page } from "playwright-core";
import { issueService } from "../../fixtures/kdc/mesh.js";
import { Mesh } from "../../fixtures/mesh/mesh.js";
import { launchTrusting, type TrustingBrowser } from "../../fixtures/portal/browser.js";
import { makePrivateCa, type PrivateCa } from "../kdc/harness.js";

const run = promisify(execFile);
const SHOTS = resolve(import.meta.dirname, "../../.screenshots");

let mesh: Mesh;
let chrome: TrustingBrowser;
let work: string;
let priv: PrivateCa;
let caPem: string;
let operatorToken: string;
/** Every URL the portal's pages requested (the attacker's page of the CSRF test is not one). */
const requested: string[] = [];

/** A fresh login link from `kmi ctl portal login-link`. */
async function loginLink(args: string[]): Promise<string> {
  const r = await mesh.ctlOk(["portal", "login-link", ...args]);
  return r.stdout.split("\n")[0]!.trim();
}

/** A new browser context (its own cookies) signed in with a login link for `args`. */
async function signedIn(args: string[], viewport = { width: 1280, height: 900 }): Promise<{ ctx: BrowserContext; page: Page }> {
  const ctx = await chrome.browser.newContext({ acceptDownloads: true, viewport });
  const page = await ctx.newPage();
  page.on("request", (r) => requested.push(r.url()));
  await page.goto(await loginLink(args));
  await page.locator("#who-label").waitFor();
  return { ctx, page };
}

/** Saves a full-page screenshot as test/.screenshots/portal-<name>.png. */
async function shot(page: Page, name: string): Promise<void> {
  await page.screenshot({ path: join(SHOTS, `portal-${name}.png`), fullPage: true });
}

/** Every visible control's missing accessible name (button, link, field): none expected. */
async function unnamedControls(page: Page): Promise<string[]> {
  return page.evaluate(() => {
    const out: string[] = [];
    for (const el of document.querySelectorAll<HTMLElement>("button, a[href], input, select, textarea")) {
      if (el.closest("[hidden]") !== null || (el.offsetParent === null && el.getAttribute("type") !== "file")) continue;
      const label = el.id === "" ? null : document.querySelector(`label[for="${el.id}"]`);
      const name = el.getAttribute("aria-label") ?? label?.textContent ?? el.textContent ?? "";
      if (name.trim() === "") out.push(el.outerHTML.slice(0, 120));
    }
    return out;
  });
}

/** Clicks `button` and saves the download it starts into the work dir; returns the file. */
async function downloadBy(page: Page, name: string, file: string): Promise<string> {
  const [dl] = await Promise.all([page.waitForEvent("download"), page.getByRole("button", { name, exact: true }).click()]);
  const path = join(work, file);
  await dl.saveAs(path);
  return path;
}

/** openssl's SHA-256 fingerprint of a certificate file ("AA:BB:..."). */
async function fingerprint(file: string, der = false): Promise<string> {
  const r = await run("openssl", ["x509", "-noout", "-fingerprint", "-sha256", "-in", file, ...(der ? ["-inform", "DER"] : [])]);
  return r.stdout.trim().replace(/^sha256 Fingerprint=/i, "");
}

/** Types the confirmation phrase into the open dialog and submits it with the keyboard. */
async function confirm(page: Page, phrase: string): Promise<void> {
  const dialog = page.getByRole("dialog");
  await dialog.getByLabel(`Type “${phrase}” to confirm`).fill(phrase);
  await page.keyboard.press("Enter");
  await dialog.waitFor({ state: "detached" });
}

/** The tenant's history as `kmi ctl ca history --json` prints it (to show that nothing changed). */
async function history(tenant: string): Promise<string> {
  return (await mesh.ctlOk(["ca", "history", "--tenant", tenant, "--json"])).stdout;
}

beforeAll(async () => {
  await mkdir(SHOTS, { recursive: true });
  work = await mkdtemp(join(tmpdir(), "kmi-portal-"));
  mesh = await Mesh.start({ tenant: "acme" });
  await mesh.ctlOk(["tenant", "create", "globex"]);
  caPem = await readFile(mesh.infraCaFile, "utf8");
  operatorToken = (await readFile(mesh.tokenFile, "utf8")).trim();
  priv = await makePrivateCa(work, "globex-root");
  chrome = await launchTrusting(caPem);
}, 180_000);

afterAll(async () => {
  await chrome?.close();
  await mesh?.close();
  if (work !== undefined) await rm(work, { recursive: true, force: true });
});

describe("the portal in Chromium", () => {
  it("signs in with a login link: the code leaves the address bar and nothing is kept in storage", async () => {
    const ctx = await chrome.browser.newContext({ viewport: { width: 1280, height: 900 } });
    try {
      const page = await ctx.newPage();
      await page.goto(mesh.kdcUrl + "/");
      await page.getByRole("heading", { name: "Sign in to kmi" }).waitFor();
      await shot(page, "sign-in");
      const link = await loginLink(["--tenant", "acme"]);
      await page.goto(link);
      await page.getByRole("heading", { name: "Certificate menu — acme" }).waitFor();
      expect(page.url()).not.toContain("login=");
      expect(page.url()).toBe(`${mesh.kdcUrl}/#/t/acme/ca`);
      const kept = await page.evaluate(() => ({ local: localStorage.length, session: sessionStorage.length, cookie: document.cookie }));
      expect(kept).toEqual({ local: 0, session: 0, cookie: "" }); // the session cookie is HttpOnly
      const cookies = await ctx.cookies();
      expect(cookies.map((c) => [c.name, c.httpOnly, c.secure, c.sameSite])).toEqual([["__Host-kmi_session", true, true, "Strict"]]);
      // The link worked once: opening it again signs nobody in.
      const again = await chrome.browser.newContext();
      const p2 = await again.newPage();
      await p2.goto(link);
      await p2.getByText("this login link is invalid, used or expired").waitFor();
      await again.close();
    } finally {
      await ctx.close();
    }
  });

  it("shows the active CA; its fingerprints equal openssl's of the downloaded PEM and DER", async () => {
    const { ctx, page } = await signedIn(["--tenant", "acme"]);
    try {
      await page.locator("#fp-intermediate").waitFor();
      const shown = (await page.locator("#fp-intermediate").textContent())!.trim();
      const shownRoot = (await page.locator("#fp-root").textContent())!.trim();
      expect(shown).toMatch(/^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
      expect(await page.locator("#ca-source").textContent()).toBe("KMI-signed");
      expect(await page.locator("#ca-custody").textContent()).toMatch(/^escrowed by the KDC/);
      expect(await page.locator("#ca-validity").textContent()).toMatch(/\(\d+ days left\)/);
      expect(await fingerprint(await downloadBy(page, "Download the intermediate certificate as PEM", "acme-int.pem"))).toBe(shown);
      expect(await fingerprint(await downloadBy(page, "Download the intermediate certificate as DER", "acme-int.der"), true)).toBe(shown);
      expect(await fingerprint(await downloadBy(page, "Download the root certificate as PEM", "acme-root.pem"))).toBe(shownRoot);
      // The root is the KMI root that `kmi ctl` hands out, and the chain verifies with openssl.
      expect(await fingerprint(await mesh.download("root"))).toBe(shownRoot);
      const chain = await downloadBy(page, "Download the chain as PEM", "acme-chain.pem");
      const v = await run("openssl", ["verify", "-CAfile", join(work, "acme-root.pem"), join(work, "acme-int.pem")]);
      expect(v.stdout).toContain("OK");
      expect((await readFile(chain, "utf8")).match(/BEGIN CERTIFICATE/g)).toHaveLength(2);
      expect(await unnamedControls(page)).toEqual([]);
      await shot(page, "active-ca");
    } finally {
      await ctx.close();
    }
  });

  it("runs the private-CA flow: CSR from the page, signed by openssl, wrong uploads refused next to their field, the right one activated", async () => {
    const { ctx, page } = await signedIn(["--tenant", "globex"]);
    try {
      await page.getByText("no active version").or(page.getByRole("link", { name: /Make a first version/ })).first().waitFor();
      await page.getByRole("link", { name: "Rotate / CSR" }).click();
      await page.getByLabel("Signed by").selectOption({ label: "my private CA (make a CSR)" });
      await page.getByLabel("Common name").fill("Globex MITM CA");
      await page.getByLabel("Organization", { exact: true }).fill("Globex");
      await page.getByLabel("Country (two letters)").fill("DE");
      expect(await unnamedControls(page)).toEqual([]);
      await shot(page, "rotate-csr");
      await page.getByRole("button", { name: "Rotate…" }).click();
      await confirm(page, "rotate globex");
      const csrFile = await downloadBy(page, "Download the CSR of version 1", "globex-v1.csr");
      const csrPem = await readFile(csrFile, "utf8");
      expect((await run("openssl", ["req", "-in", csrFile, "-noout", "-verify", "-subject"])).stdout + "").toContain("Globex MITM CA");
      const intermediate = await priv.sign(csrPem);
      const leaf = await priv.sign(csrPem, { ca: false });
      const before = await history("globex");

      await page.getByRole("link", { name: "Upload the signed certificate" }).click();
      const cert = page.getByLabel("Signed intermediate certificate (PEM), pasted");
      const root = page.getByLabel("Your private CA's root certificate (PEM), pasted — optional");
      const certError = page.locator(".field", { has: cert }).locator(".field-error");
      const rootError = page.locator(".field", { has: root }).locator(".field-error");
      // 1. A leaf instead of the intermediate.
      await cert.fill(leaf);
      await page.getByRole("button", { name: "Upload", exact: true }).click();
      await expect.poll(() => certError.textContent()).toContain("certificate: not a CA (basicConstraints cA is false)");
      expect(await cert.getAttribute("aria-invalid")).toBe("true");
      await shot(page, "upload-error");
      expect(await history("globex")).toBe(before);
      // 2. The right intermediate with a leaf as its "root".
      await cert.fill(intermediate);
      await root.fill(leaf);
      await page.getByRole("button", { name: "Upload", exact: true }).click();
      await expect.poll(() => rootError.textContent()).toContain("customer_root: not a CA");
      expect(await certError.textContent()).toBe("");
      expect(await history("globex")).toBe(before);
      // 3. The right one, with its root, from files, activated at once.
      await cert.fill("");
      await root.fill("");
      await page.getByLabel("…or as a file (PEM or DER)").first().setInputFiles({ name: "int.pem", mimeType: "application/x-pem-file", buffer: Buffer.from(intermediate) });
      await page.getByLabel("…or as a file (PEM or DER)").nth(1).setInputFiles(priv.rootFile);
      await page.getByLabel("Activate it at once").check();
      await page.getByRole("button", { name: "Upload", exact: true }).click();
      await page.locator('#versions tr[data-version="1"][data-state="active"]').waitFor();
      await shot(page, "history");

      await page.getByRole("link", { name: "Active CA" }).click();
      await page.locator("#fp-intermediate").waitFor();
      expect(await page.locator("#ca-source").textContent()).toBe("private CA");
      await writeFile(join(work, "globex-int.pem"), intermediate);
      expect((await page.locator("#fp-intermediate").textContent())!.trim()).toBe(await fingerprint(join(work, "globex-int.pem")));
      expect((await page.locator("#fp-root").textContent())!.trim()).toBe(await fingerprint(priv.rootFile));
    } finally {
      await ctx.close();
    }
  });

  it("discards a pending version from the history with the typed confirmation; the KDC has it DISCARDED", async () => {
    await mesh.ctlOk(["ca", "csr", "--tenant", "globex", "--out", join(work, "globex-v2.csr")]);
    const { ctx, page } = await signedIn(["--tenant", "globex"]);
    try {
      await page.getByRole("link", { name: "History" }).click();
      const row = page.locator('#versions tr[data-version="2"]');
      await row.waitFor();
      expect(await row.getAttribute("data-state")).toBe("pending");
      expect(await row.locator("td").first().textContent()).toBe("pending");
      expect(await row.textContent()).toMatch(/CSR expires \d{4}-\d\d-\d\d/);
      const before = await history("globex");
      // A reason the KDC refuses: its words next to the reason field, the dialog stays, nothing changes.
      await page.getByRole("button", { name: "Discard version 2" }).click();
      const dialog = page.getByRole("dialog");
      const reason = dialog.getByLabel("Reason (optional)");
      await reason.fill("x".repeat(300));
      await dialog.getByLabel("Type “discard 2” to confirm").fill("discard 2");
      await page.keyboard.press("Enter");
      const reasonError = page.locator("dialog .field", { has: page.getByLabel("Reason (optional)") }).locator(".field-error");
      await expect.poll(() => reasonError.textContent()).toBe("reason: too long (300 characters); at most 256");
      expect(await page.locator("dialog .field", { has: page.getByLabel("Type “discard 2” to confirm") }).locator(".field-error").textContent()).toBe("");
      expect(await reason.getAttribute("aria-invalid")).toBe("true");
      await shot(page, "discard-confirm");
      expect(await history("globex")).toBe(before);
      await reason.fill("portal test: CSR lost");
      await confirm(page, "discard 2");
      await page.locator('#versions tr[data-version="2"][data-state="discarded"]').waitFor();
      expect(await row.locator("td").first().textContent()).toBe("discarded");
      expect(await row.textContent()).toContain("(discarded: portal test: CSR lost)");
      expect(await row.getByRole("button").count()).toBe(0); // nothing left to do to it: no CSR, upload, discard or revoke
      expect(await unnamedControls(page)).toEqual([]);
      await shot(page, "history-discarded");
      // The KDC's ListVersions (through kmi ctl): version 2 DISCARDED with its reason, version 1 still active.
      const h = JSON.parse(await history("globex")) as { versions: { version: number; state: string; discardReason?: string }[] };
      const byVersion = new Map(h.versions.map((v) => [v.version, v]));
      expect(byVersion.get(2)?.state).toBe("VERSION_STATE_DISCARDED");
      expect(byVersion.get(2)?.discardReason).toBe("portal test: CSR lost");
      expect(byVersion.get(1)?.state).toBe("VERSION_STATE_ACTIVE");
    } finally {
      await ctx.close();
    }
  });

  it("rotates with the typed confirmation and watches the rollout reach the agent", async () => {
    const { ctx, page } = await signedIn(["--tenant", "acme"]);
    try {
      await page.getByRole("link", { name: "Rollout" }).click();
      const row = page.locator(`#rollout tr[data-machine="${mesh.machineId}"]`);
      await expect.poll(() => row.getAttribute("data-held"), { timeout: 30_000 }).toBe("1");
      await page.getByRole("link", { name: "Rotate / CSR" }).click();
      await page.getByLabel("Activate at once (KMI-signed only)").check();
      await page.getByRole("button", { name: "Rotate…" }).click();
      // A wrong phrase leaves the button disabled.
      await page.getByRole("dialog").getByLabel("Type “rotate acme” to confirm").fill("rotate acme!");
      expect(await page.getByRole("dialog").getByRole("button", { name: "Rotate" }).isDisabled()).toBe(true);
      await shot(page, "confirm");
      await confirm(page, "rotate acme");
      await page.getByRole("heading", { name: "Version 2 made" }).waitFor();
      await page.getByRole("link", { name: "Rollout" }).click();
      // The page follows WatchRolloutStatus; the agent gets version 2 on its watch stream and reports it.
      await expect.poll(() => page.locator("#rollout-live").textContent()).toContain("Live");
      await expect.poll(() => page.locator(`#rollout tr[data-machine="${mesh.machineId}"]`).getAttribute("data-held"), { timeout: 60_000, interval: 500 }).toBe("2");
      await expect.poll(async () => (await mesh.agentClient().unary("getStatus", {})).keys.some((k) => k.tenantId === "acme" && k.version === 2), { timeout: 10_000 }).toBe(true);
      await shot(page, "rollout");
      // History: revoke the retired version 1 (with a reason), renew version 2 (same key,
      // KMI-signed: ready at once) and activate the renewal — each behind its typed confirmation.
      await page.getByRole("link", { name: "History" }).click();
      await page.getByRole("button", { name: "Revoke version 1" }).click();
      await page.getByRole("dialog").getByLabel("Reason").fill("portal test: retired and unused");
      await confirm(page, "revoke 1");
      await page.locator('#versions tr[data-version="1"][data-state="revoked"]').waitFor();
      await page.getByRole("button", { name: "Renew version 2" }).click();
      await confirm(page, "renew 2");
      await page.locator('#versions tr[data-version="3"][data-state="ready"]').waitFor();
      await page.getByRole("button", { name: "Activate version 3" }).click();
      await confirm(page, "activate 3");
      await page.locator('#versions tr[data-version="3"][data-state="active"]').waitFor();
      const h = JSON.parse(await history("acme")) as { versions: { version: number; state: string; keyId: string; revokeReason?: string }[] };
      const byVersion = new Map(h.versions.map((v) => [v.version, v]));
      expect(byVersion.get(1)?.state).toBe("VERSION_STATE_REVOKED");
      expect(byVersion.get(1)?.revokeReason).toBe("portal test: retired and unused");
      expect(byVersion.get(2)?.state).toBe("VERSION_STATE_RETIRED");
      expect(byVersion.get(3)?.keyId).toBe(byVersion.get(2)?.keyId);
      await page.getByRole("link", { name: "Audit trail" }).click();
      await page.locator("#audit").getByText("ca.version.create").first().waitFor();
      const targets = await page.locator("#audit tbody tr td:nth-child(5)").allTextContents();
      expect(targets.length).toBeGreaterThan(0);
      expect(targets.every((t) => t === "tenant/acme" || t.startsWith("tenant/acme/"))).toBe(true);
      await shot(page, "audit");
    } finally {
      await ctx.close();
    }
  });

  it("a tenant admin never sees another tenant", async () => {
    const { ctx, page } = await signedIn(["--tenant", "acme"]);
    try {
      expect(await page.getByRole("link", { name: "Tenants" }).count()).toBe(0);
      await page.goto(`${mesh.kdcUrl}/#/t/globex/ca`);
      await page.getByText('may not act on tenant "globex"').waitFor();
      expect(await page.locator("#fp-intermediate").count()).toBe(0);
      await page.goto(`${mesh.kdcUrl}/#/t/globex/versions`);
      await page.getByText('may not act on tenant "globex"').waitFor();
      expect(await page.locator("#versions").count()).toBe(0);
      await page.goto(`${mesh.kdcUrl}/#/tenants`);
      await page.getByText("operator role required").waitFor();
      // The relayed Auditserver pages: the Auditserver itself refuses a tenant admin's session.
      await page.goto(`${mesh.kdcUrl}/#/machines`);
      await page.getByText("not an operator token").waitFor();
      expect(await page.locator("#machines").count()).toBe(0);
    } finally {
      await ctx.close();
    }
  });

  it("refuses a request from another origin (CSRF) even though the browser sends the cookie", async () => {
    const { ctx, page } = await signedIn(["--tenant", "acme"]);
    // An attacker's page on another origin of the same site (https://127.0.0.1, another port):
    // SameSite=Strict does not stop the cookie here, the KDC's checks must.
    const id = await issueService(mesh.kdcUrl, caPem, operatorToken, "evil");
    const evil: Server = createServer({ cert: id.certPem, key: id.keyPem }, (_req, res) => {
      res.writeHead(200, { "content-type": "text/html" });
      res.end("<!doctype html><title>evil</title><p>evil</p>");
    });
    await new Promise<void>((r) => evil.listen(0, "127.0.0.1", r));
    try {
      const before = await history("acme");
      const port = (evil.address() as { port: number }).port;
      const ev = await ctx.newPage();
      await ev.goto(`https://127.0.0.1:${port}/`);
      const kdcUrl = mesh.kdcUrl;
      const outcome = await ev.evaluate(async (url) => {
        const body = JSON.stringify({ tenantId: "acme", signer: "SIGNER_KMI_ROOT", activate: true });
        const target = `${url}/kmi.kdc.v1.KdcService/CreateVersion`;
        const r: Record<string, string> = {};
        // A script that sends the Connect header: the browser needs a CORS preflight, which fails.
        try {
          const res = await fetch(target, { method: "POST", credentials: "include", headers: { "content-type": "application/json", "connect-protocol-version": "1" }, body });
          r["connect"] = `status ${res.status}`;
        } catch (e) {
          r["connect"] = `blocked: ${(e as Error).name}`;
        }
        // A "simple" request (no preflight): it reaches the KDC with the cookie, without the header.
        try {
          await fetch(target, { method: "POST", mode: "no-cors", credentials: "include", headers: { "content-type": "text/plain" }, body });
          r["simple"] = "sent";
        } catch (e) {
          r["simple"] = `blocked: ${(e as Error).name}`;
        }
        return r;
      }, kdcUrl);
      expect(outcome["connect"]).toBe("blocked: TypeError");
      expect(outcome["simple"]).toBe("sent");
      expect(await history("acme")).toBe(before);
      // The same call from the portal's own page works (the session is fine).
      const own = await page.evaluate(async (url) => {
        const res = await fetch(`${url}/kmi.kdc.v1.KdcService/ListVersions`, { method: "POST", headers: { "content-type": "application/json", "connect-protocol-version": "1" }, body: JSON.stringify({ tenantId: "acme" }) });
        return res.status;
      }, kdcUrl);
      expect(own).toBe(200);
      // And what the KDC says to a cross-origin call that carries both the cookie and the header.
      const cookie = (await ctx.cookies()).find((c) => c.name === "__Host-kmi_session")!.value;
      const r = await run("curl", ["-s", "--cacert", mesh.infraCaFile, "-H", "content-type: application/json", "-H", "connect-protocol-version: 1", "-H", `origin: https://127.0.0.1:${port}`, "-H", `cookie: __Host-kmi_session=${cookie}`, "-d", '{"tenantId":"acme","signer":"SIGNER_KMI_ROOT"}', `${kdcUrl}/kmi.kdc.v1.KdcService/CreateVersion`]);
      expect(JSON.parse(r.stdout)).toEqual({ code: "unauthenticated", message: "the request's Origin is not the portal's; the session cookie is accepted only from the portal itself" });
      expect(await history("acme")).toBe(before);
    } finally {
      evil.close();
      await ctx.close();
    }
  });

  it("operator pages: tenants and the mesh status; readable at phone width", async () => {
    const { ctx, page } = await signedIn(["--operator"]);
    try {
      await page.locator("#tenants").getByRole("link", { name: "globex" }).waitFor();
      await shot(page, "tenants");
      await page.getByRole("link", { name: "Mesh status" }).click();
      await expect.poll(() => page.locator("#connected-agents").textContent()).toBe("1");
      await shot(page, "mesh");
      expect(await unnamedControls(page)).toEqual([]);
      await page.getByRole("link", { name: "Join tokens" }).click();
      await page.getByLabel("Description").fill("portal test");
      await page.getByRole("button", { name: "Make a join token" }).click();
      expect((await page.locator("#join-token-secret").inputValue()).length).toBeGreaterThan(20);
      expect((await mesh.ctlOk(["audit", "tail", "--server", "audit"])).stdout).toMatch(/token:[0-9a-f]{16} +join_token\.create/);
      await shot(page, "join-tokens");
    } finally {
      await ctx.close();
    }
    const phone = await signedIn(["--tenant", "acme"], { width: 390, height: 844 });
    try {
      await phone.page.locator("#fp-intermediate").waitFor();
      const overflow = await phone.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      expect(overflow).toBeLessThanOrEqual(0);
      await shot(phone.page, "active-ca-phone");
      // Keyboard only: Tab reaches the download buttons and Enter downloads.
      const wanted = "Download the root certificate as DER";
      let stops = 0;
      while ((await phone.page.evaluate(() => document.activeElement?.getAttribute("aria-label") ?? "")) !== wanted) {
        expect(++stops, `Tab did not reach "${wanted}"`).toBeLessThan(40);
        await phone.page.keyboard.press("Tab");
      }
      const [dl] = await Promise.all([phone.page.waitForEvent("download"), phone.page.keyboard.press("Enter")]);
      expect(dl.suggestedFilename()).toMatch(/^acme-root-v\d+\.der$/);
    } finally {
      await phone.ctx.close();
    }
  });

  it("quarantines a machine with a reason and sees it on the page, then releases it (through the KDC's relay to the Auditserver)", async () => {
    const { ctx, page } = await signedIn(["--operator"]);
    try {
      await page.getByRole("link", { name: "Machines", exact: true }).click();
      const row = page.locator(`#machines tr[data-machine="${mesh.machineId}"]`);
      await row.waitFor();
      expect(await row.getAttribute("data-status")).toBe("active");
      expect(await row.locator("td").nth(4).textContent()).toMatch(/acme v[23]/);
      expect(await unnamedControls(page)).toEqual([]);
      await shot(page, "machines");
      await page.getByRole("button", { name: `Quarantine ${mesh.machineId}` }).click();
      await page.getByRole("dialog").getByLabel("Reason").fill("portal test: disk image leaked");
      await confirm(page, `quarantine ${mesh.machineId}`);
      await expect.poll(() => row.getAttribute("data-status")).toBe("quarantined");
      expect(await row.textContent()).toContain("portal test: disk image leaked");
      await shot(page, "machines-quarantined");
      // The same state through kmi ctl, and the KDC refuses the machine: its agent drops its keys.
      expect((await mesh.ctlOk(["machine", "show", mesh.machineId])).stdout).toMatch(/^status: +QUARANTINED$/m);
      // The Auditserver's log names the portal session (made from a login link), as the KDC's does.
      const sessionId = await page.evaluate(async () => {
        const res = await fetch("/kmi.kdc.v1.PortalService/GetSession", { method: "POST", headers: { "content-type": "application/json", "connect-protocol-version": "1" }, body: "{}" });
        return ((await res.json()) as { session: { sessionId: string } }).session.sessionId;
      });
      const tail = await mesh.ctlJson<{ entries: { action: string; actor: string; target: string }[] }>(["audit", "tail", "--server", "audit", "--limit", "1000"]);
      expect(tail.entries.filter((e) => e.action === "machine.quarantine" && e.target === `machine/${mesh.machineId}`).at(-1)?.actor).toBe(`session:${sessionId}`);
      await expect.poll(async () => (await mesh.agentClient().unary("getStatus", {})).keys.filter((k) => k.tenantId === "acme").length, { timeout: 30_000 }).toBe(0);
      await page.getByRole("link", { name: "Mesh status" }).click();
      await expect.poll(() => page.locator("#machines-quarantined").textContent()).toBe("1");
      await page.getByRole("link", { name: "Machines", exact: true }).click();
      await page.getByRole("button", { name: `Release ${mesh.machineId}` }).click();
      await page.getByRole("dialog").getByLabel("Reason").fill("portal test: reimaged");
      await confirm(page, `release ${mesh.machineId}`);
      await expect.poll(() => page.locator(`#machines tr[data-machine="${mesh.machineId}"]`).getAttribute("data-status")).toBe("active");
    } finally {
      await ctx.close();
    }
  });

  it("loaded nothing from elsewhere: every request of the portal's pages went to the KDC", () => {
    expect(requested.length).toBeGreaterThan(50);
    const origin = new URL(mesh.kdcUrl).origin;
    expect(requested.filter((u) => new URL(u).origin !== origin && !u.startsWith("blob:"))).toEqual([]);
  });

  it("signs out: the session is gone and the page asks to sign in", async () => {
    const { ctx, page } = await signedIn(["--tenant", "acme"]);
    try {
      const id = await page.evaluate(async () => {
        const res = await fetch("/kmi.kdc.v1.PortalService/GetSession", { method: "POST", headers: { "content-type": "application/json", "connect-protocol-version": "1" }, body: "{}" });
        return ((await res.json()) as { session: { sessionId: string } }).session.sessionId;
      });
      expect((await mesh.ctlOk(["portal", "sessions"])).stdout).toContain(id);
      await page.getByRole("button", { name: "Sign out" }).click();
      await page.getByRole("heading", { name: "Sign in to kmi" }).waitFor();
      expect(await ctx.cookies()).toEqual([]);
      expect((await mesh.ctlOk(["portal", "sessions"])).stdout).not.toContain(id);
    } finally {
      await ctx.close();
    }
  });
});
