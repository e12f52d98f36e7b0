/**
 * Abandoned private-CA uploads through the real programs: `kmi ctl ca discard` against a KDC
 * process, and a pending version that expires (the KDC started with `--pending-ttl 2s`): shown as
 * expired in `ca history`, refused on upload with the fix in the message, then discarded.
 */
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { cleanup, clients, ctl, initDataDir, makePrivateCa, startKdc, type DataDir, type KdcProcess } from "../kdc/harness.js";

let data: DataDir;
let kdc: KdcProcess;

beforeAll(async () => {
  data = await initDataDir();
  kdc = await startKdc(data.dataDir, ["--pending-ttl", "2s"]);
  await clients(kdc.url, await readFile(data.caFile, "utf8"), { token: data.token })(KdcAdminService).createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
});

afterAll(async () => {
  await kdc?.stop("SIGKILL");
  await cleanup(data?.dir);
});

interface Version {
  version: number;
  state: string;
  pendingExpired: boolean;
}

async function versions(): Promise<Version[]> {
  const r = await ctl(kdc, data, ["ca", "history", "--tenant", "acme", "--json"]);
  expect(r.code, r.stderr).toBe(0);
  return (JSON.parse(r.stdout) as { versions: Version[] }).versions;
}

describe("kmi ctl ca discard", () => {
  it("discards a pending version (exit 0), refuses it again and a non-pending version (exit 5); history shows it discarded", async () => {
    const csr = await ctl(kdc, data, ["ca", "csr", "--tenant", "acme", "--out", join(data.dir, "v2.csr")]);
    expect(csr.code, csr.stderr).toBe(0);
    const r = await ctl(kdc, data, ["ca", "discard", "--tenant", "acme", "--version", "2", "--reason", "CSR lost"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe("version 2 is discarded; its key is erased\n");
    const again = await ctl(kdc, data, ["ca", "discard", "--tenant", "acme", "--version", "2"]);
    expect(again.code).toBe(5);
    expect(again.stderr).toContain("version 2 is discarded, not pending");
    const active = await ctl(kdc, data, ["ca", "discard", "--tenant", "acme", "--version", "1", "--json"]);
    expect(active.code).toBe(5);
    expect(JSON.parse(active.stderr)).toEqual({ error: { code: "FailedPrecondition", message: expect.stringContaining("version 1 is active, not pending") } });
    const table = await ctl(kdc, data, ["ca", "history", "--tenant", "acme"]);
    expect(table.stdout).toMatch(/^2\s+discarded\s+private-ca/m);
    const audit = await ctl(kdc, data, ["audit", "tail", "--json"]);
    const entries = (JSON.parse(audit.stdout) as { entries: { action: string; target: string; outcome: string }[] }).entries;
    expect(entries.filter((e) => e.action === "ca.version.discard").map((e) => [e.target, e.outcome])).toEqual([
      ["tenant/acme/version/2", "ok"],
      ["tenant/acme/version/2", "refused: failed_precondition"],
      ["tenant/acme/version/1", "refused: failed_precondition"],
    ]);
  });

  it("a pending version past --pending-ttl shows as expired and its upload is refused with the fix; discard clears it", async () => {
    const csr = await ctl(kdc, data, ["ca", "csr", "--tenant", "acme", "--out", join(data.dir, "v3.csr")]);
    expect(csr.code, csr.stderr).toBe(0);
    const privateCa = await makePrivateCa(data.dir, "corp");
    const signed = join(data.dir, "v3.pem");
    await writeFile(signed, await privateCa.sign(await readFile(join(data.dir, "v3.csr"), "utf8")));
    // The KDC's TTL is 2 s: wait (bounded) until it reports the version expired.
    for (let i = 0; i < 100 && !(await versions()).find((v) => v.version === 3)?.pendingExpired; i++) await new Promise((r) => setTimeout(r, 200));
    expect((await versions()).find((v) => v.version === 3)).toMatchObject({ state: "VERSION_STATE_PENDING", pendingExpired: true });
    const table = await ctl(kdc, data, ["ca", "history", "--tenant", "acme"]);
    expect(table.stdout).toMatch(/^3\s+pending \(expired\)\s+private-ca/m);
    const up = await ctl(kdc, data, ["ca", "upload", "--tenant", "acme", "--cert", signed, "--root", privateCa.rootFile]);
    expect(up.code).toBe(5);
    expect(up.stderr).toMatch(/version 3: its CSR expired on \S+ \(pending versions expire 2 seconds after `ca csr`\); discard it \(`kmi ctl ca discard --tenant acme --version 3`\) and make a new CSR/);
    expect((await versions()).find((v) => v.version === 3)?.state).toBe("VERSION_STATE_PENDING");
    expect((await ctl(kdc, data, ["ca", "discard", "--tenant", "acme", "--version", "3"])).code).toBe(0);
    expect((await versions()).find((v) => v.version === 3)?.state).toBe("VERSION_STATE_DISCARDED");
  });

  it("kmi kdc refuses a --pending-ttl out of range, naming the flag", async () => {
    const r = await startKdc(data.dataDir, ["--pending-ttl", "400d"]).then(
      () => "started",
      (e: unknown) => String(e),
    );
    expect(r).toMatch(/pending-ttl.*out of range; use 1s to 365d/);
  });
});
