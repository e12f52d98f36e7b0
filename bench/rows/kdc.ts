/**
 * Row 5: the KDC. Certificate-menu operations per second (a tenant admin's CreateVersion
 * KMI-signed, ListVersions, GetCaCertificates) and secret releases per second (FetchSecrets
 * by an enrolled, attested machine over mutual TLS: attestation checks, the key wrapped to the
 * machine, the audit entry), against a no-op RPC (grpc.health.v1.Health/Check) on the same
 * KDC server stack, all in the same run.
 */
import { Health } from "../../src/gen/grpc/health/v1/health_pb.js";
import { Role, KdcAdminService } from "../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KeyAlgorithm } from "../../src/gen/kmi/common/v1/common_pb.js";
import { DistributionService } from "../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { CertificateFormat, KdcService, Signer } from "../../src/gen/kmi/kdc/v1/kdc_pb.js";
import type { Env } from "../lib/env.js";
import { ROW_TITLES } from "./titles.js";
import { CallError, type LeanClient } from "../../src/clients/grpc-client.js";
import { closedLoop, type LoopResult } from "../lib/loop.js";
import { Mesh, type Machine } from "../lib/mesh.js";
import { RowBuilder, type Figure } from "../lib/results.js";
import { fmt } from "../lib/stats.js";

/** The KDC rows' tenant and machine group. */
export const KDC_TENANT = "acme";
export const KDC_GROUP = "bench";
/** A second tenant whose version list grows with the CreateVersion benchmark. */
const MENU_TENANT = "menu-bench";

/** The mesh of the run (KDC + Auditserver), bootstrapped with the tenant and group. */
export function meshOf(env: Env): Promise<Mesh> {
  return env.memo(
    "mesh",
    async () => {
      env.log("starting kmi kdc and kmi audit");
      let mesh: Mesh;
      try {
        mesh = await Mesh.start(`${env.dir}/mesh`);
      } catch (err) {
        // A failure of the bench, not "not measured": these are kmi's own servers, built with it.
        throw new Error(`the KDC and Auditserver did not start: ${(err as Error).message.trim()}`, { cause: err });
      }
      return bootstrapped(mesh);
    },
    (m) => m.stop(),
  );
}

/** `mesh` bootstrapped with the KDC rows' tenant and group; stopped when that fails. */
export async function bootstrapped(mesh: Mesh): Promise<Mesh> {
  try {
    await mesh.bootstrap(KDC_TENANT, KDC_GROUP);
  } catch (err) {
    await mesh.stop();
    throw err;
  }
  return mesh;
}

/** True when the error says the method is not implemented in this build. */
export function isUnimplemented(err: unknown): boolean {
  return err instanceof CallError && err.code === 12;
}

/** A machine enrolled and attested in the bench group (made once per run). */
export function machineOf(env: Env, mesh: Mesh): Promise<Machine> {
  return env.memo("machine", () => mesh.enrollMachine(KDC_GROUP, "bench-proxy-1"), async () => {});
}

/** gRPC ABORTED: a concurrent change won; the call may be retried. */
const ABORTED = 10;
/** Retries of one call that keeps losing to concurrent changes, at most. */
const MAX_RETRIES = 5;

/** Runs `call`, again when the KDC answers ABORTED (up to MAX_RETRIES times); counts the retries. */
async function retryAborted<T>(call: () => Promise<T>, retried: { n: number }): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await call();
    } catch (err) {
      if (!(err instanceof CallError) || err.code !== ABORTED || attempt >= MAX_RETRIES) throw err;
      retried.n++;
    }
  }
}

/** Runs row 5. */
export async function runKdc(env: Env): Promise<RowBuilder> {
  const row = new RowBuilder(
    "5",
    ROW_TITLES["5"]!,
    "The real KDC (`kmi kdc init` + `kmi kdc`, LevelDB in a temp dir, TLS on 127.0.0.1, default log level) and Auditserver (`kmi audit`) as processes. A lean grpc-js client over TLS in the bench process, with a tenant-admin token for the Certificate menu and, for releases, an enrolled machine's certificate (mutual TLS) and an attestation token from the Auditserver, keeps 1 or 16 calls in flight per window. Baseline: grpc.health.v1.Health/Check on the same KDC server (same TLS and server stack). CreateVersion runs on a tenant of its own, whose version list grows as it runs; ListVersions and GetCaCertificates read the bench tenant (3 versions).",
  );
  const b = env.budget;
  const mesh = await meshOf(env);
  const op = mesh.kdcClient();
  const clients: LeanClient[] = [op];
  try {
    await op.unary(KdcAdminService.method.createTenant, { tenantId: MENU_TENANT, displayName: "menu bench", bootstrapKmiSigned: true });
    const tok = await op.unary(KdcAdminService.method.createToken, { role: Role.TENANT_ADMIN, tenantId: KDC_TENANT, description: "bench", ttlSeconds: 3600n });
    const tok2 = await op.unary(KdcAdminService.method.createToken, { role: Role.TENANT_ADMIN, tenantId: MENU_TENANT, description: "bench", ttlSeconds: 3600n });
    const admin = mesh.kdcClient(tok.secret);
    const menuAdmin = mesh.kdcClient(tok2.secret);
    clients.push(admin, menuAdmin);
    // Two more versions of the bench tenant, so lists have something to list.
    for (let i = 0; i < 2; i++) {
      await admin.unary(KdcService.method.createVersion, { tenantId: KDC_TENANT, signer: Signer.KMI_ROOT, keyAlgorithm: KeyAlgorithm.ECDSA_P256, subject: { commonName: `acme bench v${i + 2}` }, validityDays: 365 });
    }
    const retried = { n: 0 };
    const ops: Record<string, { run: () => Promise<unknown>; c: number[] }> = {
      noop: { run: () => admin.unary(Health.method.check, { service: "" }), c: [1, 16] },
      create: {
        // Concurrent versions of one tenant conflict in the store; the KDC answers ABORTED and
        // says to retry, and the bench does, as a client would (the retries are counted).
        run: () => retryAborted(() => menuAdmin.unary(KdcService.method.createVersion, { tenantId: MENU_TENANT, signer: Signer.KMI_ROOT, keyAlgorithm: KeyAlgorithm.ECDSA_P256, subject: { commonName: "menu bench" }, validityDays: 365 }), retried),
        c: [1, 16],
      },
      list: { run: () => admin.unary(KdcService.method.listVersions, { tenantId: KDC_TENANT }), c: [16] },
      getca: { run: () => admin.unary(KdcService.method.getCaCertificates, { tenantId: KDC_TENANT, format: CertificateFormat.PEM }), c: [16] },
    };

    // Releases: an attested machine's FetchSecrets (a build without it fails the row).
    const m = await machineOf(env, mesh);
    const mc = mesh.machineKdcClient(m);
    clients.push(mc);
    const fetch = () => mc.unary(DistributionService.method.fetchSecrets, { attestationToken: m.token });
    try {
      const first = await fetch();
      if (first.secrets.length === 0) throw new Error("it released no secret to the bench machine");
    } catch (err) {
      const why = isUnimplemented(err) ? `the KDC's DistributionService answers UNIMPLEMENTED (${(err as CallError).details})` : (err as Error).message;
      throw new Error(`FetchSecrets by the bench machine failed: ${why}`, { cause: err });
    }
    ops["fetch"] = { run: fetch, c: [1, 16] };

    const results = new Map<string, LoopResult[]>();
    for (let r = 0; r < b.repeats; r++) {
      for (const [name, o] of Object.entries(ops)) {
        for (const c of o.c) {
          env.log(`kdc ${name} c=${c} repeat ${r + 1}`);
          const res = await closedLoop(o.run, { concurrency: c, durationMs: b.windowMs, ...(name === "create" ? { maxOps: 2000 } : {}) });
          if (res.errors > 0) throw new Error(`kdc ${name} c=${c}: ${res.errors} calls failed: ${res.firstError}`);
          results.set(`${name}:${c}`, [...(results.get(`${name}:${c}`) ?? []), res]);
        }
      }
    }
    const fig = (name: string, c: number, label: string, baseline = false): Figure => {
      const rs = results.get(`${name}:${c}`)!;
      return row.figure(`kdc.${name}.c${c}`, `${label}, c=${c}`, "ops/s", rs.map((x) => x.perSecond), { p50: rs.map((x) => x.p50), p99: rs.map((x) => x.p99) }, baseline);
    };
    const noop1 = fig("noop", 1, "no-op RPC (Health/Check), same KDC stack", true);
    const noop16 = fig("noop", 16, "no-op RPC (Health/Check), same KDC stack", true);
    const base = (c: number) => (c === 1 ? noop1 : noop16);
    const labels: Record<string, string> = {
      create: "CreateVersion (KMI-signed, ECDSA P-256, tenant admin)",
      list: "ListVersions (tenant admin)",
      getca: "GetCaCertificates PEM (tenant admin)",
      fetch: "FetchSecrets: secret releases with attestation checks (machine, mutual TLS)",
    };
    for (const [name, o] of Object.entries(ops)) {
      if (name === "noop") continue;
      for (const c of o.c) {
        const f = fig(name, c, labels[name]!);
        row.ratio(f, base(c), `of no-op c=${c}`);
      }
    }
    const f = results.get("fetch:16")!;
    row.note(`A release costs the KDC about ${fmt(1e6 / Math.max(...f.map((x) => x.perSecond)))} µs of wall time at c=16 (attestation token check, unseal, wrap to the machine key, audit entry written before the response).`);
    row.note(`CreateVersion calls retried after ABORTED (a concurrent version of the same tenant won; at most ${MAX_RETRIES} retries per call, each counted once in the figures): ${retried.n.toLocaleString("en-US")} over the row.`);
    row.note("Issue 8 sets no target for the KDC; these figures are for capacity planning.");
  } finally {
    for (const c of clients) c.close();
  }
  return row;
}
