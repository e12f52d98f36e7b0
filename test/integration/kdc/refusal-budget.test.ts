/**
 * The audit log's refusal budget on a real `kmi kdc` process: a flood of calls without a valid
 * token from one address writes at most the address's burst of refusals, one summary entry
 * records the flood, and the KDC's /metrics counts what was not written. An operator's own
 * refused calls are all written.
 */
import { request } from "node:http";
import { join } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, expect, it } from "vitest";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, Signer } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { cleanup, clients, initDataDir, startKdc, type DataDir, type KdcProcess } from "./harness.js";
import { readFile } from "node:fs/promises";

let data: DataDir;
let kdc: KdcProcess;
let caPem: string;
let metricsSocket: string;

beforeAll(async () => {
  data = await initDataDir();
  caPem = await readFile(data.caFile, "utf8");
  metricsSocket = join(data.dir, "metrics.sock");
  kdc = await startKdc(data.dataDir, ["--metrics-listen", `unix:${metricsSocket}`]);
}, 60_000);

afterAll(async () => {
  await kdc?.stop();
  if (data !== undefined) await cleanup(data.dir);
});

function metrics(): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: metricsSocket, path: "/metrics" }, (res) => {
      let body = "";
      res.on("data", (c: Buffer) => (body += c.toString()));
      res.on("end", () => resolve(body));
    });
    req.on("error", reject);
    req.end();
  });
}

async function code(p: Promise<unknown>): Promise<Code | undefined> {
  return p.then(
    () => undefined,
    (e: unknown) => ConnectError.from(e).code,
  );
}

it("writes at most the address's burst of a flood of unauthenticated refusals, summarises it, and counts the rest in /metrics", async () => {
  const admin = clients(kdc.url, caPem, { token: data.token })(KdcAdminService);
  await admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  const head = (await admin.tailAuditLog({ last: true, limit: 1 })).headSeq;
  expect(await metrics()).toMatch(/^kmi_kdc_audit_refusals_suppressed 0$/m);

  const anonymous = clients(kdc.url, caPem, { token: "kmit_not_a_real_token" })(KdcService);
  const t0 = performance.now();
  for (let i = 0; i < 50; i++) expect(await code(anonymous.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT }))).toBe(Code.Unauthenticated);
  const floodMs = performance.now() - t0;
  // The operator's own refusals are never budgeted.
  const operator = clients(kdc.url, caPem, { token: data.token })(KdcService);
  for (let i = 0; i < 5; i++) expect(await code(operator.createVersion({ tenantId: "acme", signer: Signer.UNSPECIFIED }))).toBe(Code.InvalidArgument);

  const entries = (await admin.tailAuditLog({ afterSeq: head, limit: 1000 })).entries;
  // The burst of 30, plus one more for every 2 s the flood took (30 a minute refill).
  const written = entries.filter((e) => e.outcome === "refused: unauthenticated").length;
  expect(written).toBeGreaterThanOrEqual(30);
  expect(written).toBeLessThanOrEqual(30 + Math.ceil(floodMs / 2000));
  expect(entries.filter((e) => e.outcome === "refused: invalid_argument")).toHaveLength(5);
  const summaries = entries.filter((e) => e.action === "audit.refusals_suppressed");
  expect(summaries).toHaveLength(1);
  expect(summaries[0]!.details).toMatchObject({ suppressed_refusals: "1", sources: "1" });
  expect(await metrics()).toMatch(new RegExp(`^kmi_kdc_audit_refusals_suppressed ${50 - written}$`, "m"));
  expect((await admin.verifyAuditLog({})).ok).toBe(true);
});
