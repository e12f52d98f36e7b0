/**
 * The KDC killed with SIGKILL in the middle of a burst of concurrent rotations and
 * activations restarts with a consistent store: every version whole or absent, at most one
 * ACTIVE per tenant (the one the tenant names), every acknowledged change present, and an
 * audit log that verifies and holds exactly one entry per committed version.
 */
import { createPrivateKey, createPublicKey } from "node:crypto";
import { readFile } from "node:fs/promises";
import { ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, Signer, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { certificateInfo } from "../../../src/pki/inspect.js";
import { openKdc } from "../../../src/kdc/init.js";
import { intermediateKeyAad } from "../../../src/kdc/kdc-store.js";
import { cleanup, clients, ctl, initDataDir, startKdc, type DataDir, type KdcProcess } from "./harness.js";

const TENANTS = ["t1", "t2"];
let data: DataDir;
let kdc: KdcProcess;

beforeAll(async () => {
  data = await initDataDir();
  kdc = await startKdc(data.dataDir);
});

afterAll(async () => {
  await kdc?.stop("SIGKILL");
  await cleanup(data?.dir);
});

describe("SIGKILL during a burst of rotations", () => {
  it("restarts consistent: versions whole or absent, one active at most, acknowledged changes kept, audit verifies", async () => {
    const caPem = await readFile(data.caFile, "utf8");
    const c = clients(kdc.url, caPem, { token: data.token });
    for (const t of TENANTS) await c(KdcAdminService).createTenant({ tenantId: t, bootstrapKmiSigned: true });

    const acked = new Map<string, Set<number>>(TENANTS.map((t) => [t, new Set<number>([1])]));
    let okCalls = 0;
    let failedCalls = 0;
    let stop = false;
    let inFlight = 0;
    const worker = async (tenantId: string, n: number) => {
      for (let i = 0; !stop; i++) {
        inFlight++;
        try {
          if ((i + n) % 3 === 2) {
            const known = [...acked.get(tenantId)!];
            await c(KdcService).activateVersion({ tenantId, version: known[(i * 7 + n) % known.length]! });
          } else {
            const r = await c(KdcService).createVersion({
              tenantId,
              signer: (i + n) % 4 === 3 ? Signer.PRIVATE_CA : Signer.KMI_ROOT,
              activate: (i + n) % 4 === 0,
            });
            acked.get(tenantId)!.add(r.version!.version);
          }
          okCalls++;
        } catch (err) {
          if (!(err instanceof ConnectError)) throw err;
          failedCalls++; // refused activations (pending, already active) and calls cut by the kill
          if (stop) return;
        } finally {
          inFlight--;
        }
      }
    };
    const workers = TENANTS.flatMap((t) => [0, 1, 2, 3].map((n) => worker(t, n)));
    // Kill it once the burst is well under way, with calls in flight.
    while (okCalls < 40) await new Promise((r) => setTimeout(r, 10));
    const inFlightAtKill = inFlight;
    expect(await kdc.stop("SIGKILL")).toBe("SIGKILL");
    expect(inFlightAtKill).toBeGreaterThan(0);
    stop = true;
    await Promise.all(workers);
    expect(failedCalls).toBeGreaterThan(0);

    const { ctx, store } = await openKdc({ dataDir: data.dataDir, logger: createNopLogger() });
    let committed = 0;
    try {
      for (const t of TENANTS) {
        const tenant = (await ctx.store.getTenant(t))!;
        const versions = await ctx.store.listVersions(t);
        // Whole or absent: numbers 1..last without holes (counter and record move together).
        expect(versions.map((v) => v.version).sort((a, b) => a - b)).toEqual(Array.from({ length: tenant.lastVersion }, (_, i) => i + 1));
        for (const v of versions) {
          const pkcs8 = ctx.sealer.open(v.privateKey!, intermediateKeyAad(t, v.keyId));
          const spki = createPublicKey(createPrivateKey({ key: Buffer.from(pkcs8), format: "der", type: "pkcs8" })).export({ format: "der", type: "spki" });
          expect(Buffer.from(spki).equals(Buffer.from(v.publicKeyDer)), `${t}/${v.version} key`).toBe(true);
          if (v.state === VersionState.PENDING) expect(v.csrDer.length, `${t}/${v.version} csr`).toBeGreaterThan(0);
          else expect(Buffer.from(certificateInfo(v.certificateDer).spkiDer).equals(Buffer.from(v.publicKeyDer)), `${t}/${v.version} cert`).toBe(true);
        }
        const active = versions.filter((v) => v.state === VersionState.ACTIVE);
        expect(active.length).toBeLessThanOrEqual(1);
        expect(tenant.activeVersion).toBe(active[0]?.version ?? 0);
        // Every version the client was told about survived the kill.
        for (const n of acked.get(t)!) expect(versions.some((v) => v.version === n), `${t}/${n} acknowledged`).toBe(true);
        committed += versions.length - 1;
      }
      const check = await ctx.audit.verify();
      expect(check).toMatchObject({ ok: true, problem: "" });
      // Fail-closed: exactly one "ok" audit entry per committed version, no more, no less.
      const entries = await ctx.audit.tail({ limit: 1000 });
      expect(entries.filter((e) => e.action === "ca.version.create" && e.outcome === "ok")).toHaveLength(committed);
    } finally {
      await store.close();
    }
    expect(committed).toBeGreaterThan(20);

    kdc = await startKdc(data.dataDir);
    const v = await ctl(kdc, data, ["audit", "verify"]);
    expect(v.code).toBe(0);
    expect(v.stdout).toContain("audit log ok");
    const h = await ctl(kdc, data, ["ca", "history", "--tenant", "t1", "--json"]);
    expect(JSON.parse(h.stdout).versions.length).toBeGreaterThan(1);
  });
});
