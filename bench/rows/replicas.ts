/**
 * Row 9: KDC replicas on etcd (issue 13). Two measurements, each against the one-KDC LevelDB
 * setup of rows 4 and 5 measured in the same run:
 *
 * - rotation reaching S watch sessions (S = 5,000 on a full run) spread round-robin over 3
 *   `kmi kdc --store etcd` replicas, rotations made on each replica in turn, against the same S
 *   sessions on the one LevelDB KDC: p50, p99 and max over the sessions;
 * - Certificate-menu operations per second (CreateVersion, ListVersions, GetCaCertificates, as in
 *   row 5) on one etcd replica against the LevelDB KDC.
 */
import { KeyAlgorithm } from "../../src/gen/kmi/common/v1/common_pb.js";
import { Role, KdcAdminService } from "../../src/gen/kmi/kdc/v1/admin_pb.js";
import { CertificateFormat, KdcService, Signer } from "../../src/gen/kmi/kdc/v1/kdc_pb.js";
import type { LeanClient } from "../../src/clients/grpc-client.js";
import type { Env } from "../lib/env.js";
import { startEtcdCluster, type EtcdCluster } from "../lib/etcd.js";
import { closedLoop, type LoopResult } from "../lib/loop.js";
import { Mesh, type Machine } from "../lib/mesh.js";
import { RowBuilder, type Figure } from "../lib/results.js";
import { fmt, percentiles } from "../lib/stats.js";
import { bootstrapped, KDC_GROUP, KDC_TENANT, machineOf, meshOf } from "./kdc.js";
import { closeSessions, openSessions, rotateOnce, type RotationSample } from "./rotation.js";
import { ROW_TITLES } from "./titles.js";

/** KDC replicas on etcd. */
export const REPLICAS = 3;
/** Watch sessions of the rotation figures: the 5,000 on a full run, a few under `--quick` (npm test's smoke run); `--sessions N` sets another. */
const SESSIONS = { full: 5000, quick: 30 } as const;
/** Sessions opened before their snapshots are awaited (the listen backlog is 511). */
const WAVE = 250;
/**
 * The tenants whose version lists grow with CreateVersion, on each setup: calls take them in
 * turn, so 16 in flight are mostly on different tenants (16 on one tenant conflict with each
 * other: that is row 4's concurrent rotation, not the store's cost).
 */
const MENU_TENANTS = Array.from({ length: 16 }, (_, i) => `menu-replicas-${String(i).padStart(2, "0")}`);
/** The tenant the reads read, with 3 versions on each setup (the bench tenant's list differs: rotations add to it). */
const READ_TENANT = "read-replicas";

/** The etcd flags of KDC replica `i`: every member, starting with member `i` (replicas spread over them). */
export function etcdFlags(cluster: EtcdCluster, i: number): string[] {
  const n = cluster.endpoints.length;
  const endpoints = Array.from({ length: n }, (_, k) => cluster.endpoints[(i + k) % n]!);
  return ["--store", "etcd", "--etcd-endpoints", endpoints.join(","), "--etcd-ca", cluster.files.ca, "--etcd-cert", cluster.files.cert, "--etcd-key", cluster.files.key, "--etcd-prefix", "bench/kdc"];
}

/** The run's 3-member etcd cluster (rows 7, 8, 9 and 11 share it). */
export function etcdClusterOf(env: Env): Promise<EtcdCluster> {
  return env.memo("etcd", () => startEtcdCluster(3), (c) => c.stop());
}

/** Three KDC replicas on the run's etcd cluster (the one row 7 uses), with an Auditserver, bootstrapped as row 5's mesh is (rows 9 and 11). */
export function haMeshOf(env: Env): Promise<Mesh> {
  return env.memo(
    "ha-mesh",
    async () => {
      const cluster = await etcdClusterOf(env);
      env.log(`starting ${REPLICAS} kmi kdc replicas on etcd and kmi audit`);
      const mesh = await Mesh.start(`${env.dir}/ha-mesh`, { replicas: REPLICAS, kdcStoreFlags: (i) => etcdFlags(cluster, i) }).catch((err: unknown) => {
        throw new Error(`the KDC replicas on etcd did not start: ${(err as Error).message.trim()}`, { cause: err });
      });
      return bootstrapped(mesh);
    },
    (m) => m.stop(),
  );
}

/** The enrolled machine of the replicas' mesh (rows 9 and 11). */
export function haMachineOf(env: Env, ha: Mesh): Promise<Machine> {
  return env.memo("ha-machine", () => ha.enrollMachine(KDC_GROUP, "bench-proxy-ha"), async () => {});
}

/** Tenant-admin clients of the bench tenant, one per replica. */
async function tenantAdmins(mesh: Mesh, replicas: number): Promise<LeanClient[]> {
  const op = mesh.kdcClient();
  try {
    const tok = await op.unary(KdcAdminService.method.createToken, { role: Role.TENANT_ADMIN, tenantId: KDC_TENANT, description: "bench replicas", ttlSeconds: 3600n });
    return Array.from({ length: replicas }, (_, i) => mesh.kdcClient(tok.secret, i));
  } finally {
    op.close();
  }
}

/** Opens `n` sessions over `replicas` replicas of `mesh`, runs `rotations` rotations (made on each replica in turn), closes them. */
async function rotationRun(env: Env, mesh: Mesh, m: Machine, admins: LeanClient[], n: number, rotations: number, label: string): Promise<RotationSample[]> {
  // A fresh token: a stream ends when its token does, and opening thousands of sessions takes minutes.
  await mesh.attest(m);
  env.log(`replicas: opening ${n} watch sessions on ${label}`);
  const sessions = await openSessions(mesh, m, n, { replicas: admins.length, wave: WAVE, waveTimeoutMs: 120_000, log: (line) => env.log(`replicas: ${line}`) });
  try {
    const out: RotationSample[] = [];
    for (let r = 0; r < rotations; r++) out.push(await rotateOnce(admins[r % admins.length]!, sessions, `${label}, rotation ${r + 1}`));
    return out;
  } finally {
    closeSessions(sessions);
  }
}

/** Runs row 9. */
export async function runReplicas(env: Env): Promise<RowBuilder> {
  const sessions = env.sessions ?? (env.mode === "quick" ? SESSIONS.quick : SESSIONS.full);
  const row = new RowBuilder(
    "9",
    ROW_TITLES["9"]!,
    `A 3-member etcd cluster on 127.0.0.1 (the system's etcd, TLS with client certificates; the cluster of row 7), ${REPLICAS} \`kmi kdc --store etcd\` replicas on it (replica i given every member, starting with member i) and a \`kmi audit\`, as processes; baseline: the one LevelDB KDC of rows 4 and 5, in the same run. Rotation: one enrolled, attested machine opens ${sessions.toLocaleString("en-US")} DistributionService.WatchSecrets sessions from the bench process, each on a mutual-TLS connection of its own (in waves of ${WAVE}), spread round-robin over the replicas (all on the one KDC for the baseline); a tenant admin creates a KMI-signed version (not timed) and activates it, each rotation on the next replica; the clock starts as ActivateVersion is sent and stops, per session, when its ACTIVATED event naming the new key arrives. Per rotation p50, p99 and max over the sessions; figures are medians over the rotations. Certificate menu: the operations of row 5, 1 or 16 calls in flight, against one etcd replica and against the LevelDB KDC, interleaved: CreateVersion by the operator on 16 tenants of its own taken in turn (16 on one tenant would measure their conflicts), ListVersions and GetCaCertificates by a tenant admin of a tenant with 3 versions.`,
  );
  const b = env.budget;
  const level = await meshOf(env);
  const ha = await haMeshOf(env);
  const levelMachine = await machineOf(env, level);
  const haMachine = await haMachineOf(env, ha);
  const clients: LeanClient[] = [];
  try {
    const levelAdmins = await tenantAdmins(level, 1);
    const haAdmins = await tenantAdmins(ha, REPLICAS);
    clients.push(...levelAdmins, ...haAdmins);

    // Rotation reaching S sessions.
    const rotations = b.repeats === 1 ? 2 : 3;
    const base = await rotationRun(env, level, levelMachine, levelAdmins, sessions, rotations, "the LevelDB KDC");
    const spread = await rotationRun(env, ha, haMachine, haAdmins, sessions, rotations, `${REPLICAS} replicas on etcd`);
    const fig = (id: string, label: string, xs: RotationSample[], baseline = false): Figure =>
      row.figure(id, label, "ms", xs.map((x) => x.max), { p50: xs.map((x) => x.p50), p99: xs.map((x) => x.p99) }, baseline);
    const fLevel = fig("replicas.rotation.level", `${sessions.toLocaleString("en-US")} watch sessions on one KDC (LevelDB): until the last one holds the new version (max)`, base, true);
    const fHa = fig("replicas.rotation.etcd", `${sessions.toLocaleString("en-US")} watch sessions over ${REPLICAS} KDC replicas (etcd): until the last one holds the new version (max)`, spread);
    row.ratio(fHa, fLevel, "of one LevelDB KDC");
    if (sessions === SESSIONS.full) row.target(fHa, "< 2 s p99 at 5,000 sessions over 3 replicas", fHa.p99!.median < 2000);
    else row.note(`Measured with ${sessions.toLocaleString("en-US")} sessions, not the 5,000 of issue 13's goal (p99 < 2 s), which is therefore not judged here.`);
    const med = (xs: number[]) => percentiles(xs, [0.5])[0]!;
    row.note(`ActivateVersion itself returned after ${fmt(med(base.map((x) => x.activateMs)))} ms on the LevelDB KDC and ${fmt(med(spread.map((x) => x.activateMs)))} ms on an etcd replica (medians over ${rotations} rotations).`);

    // Certificate-menu operations per second.
    const menu = await menuOps(level, ha, clients);
    const results = new Map<string, LoopResult[]>();
    for (let r = 0; r < b.repeats; r++) {
      for (const [name, o] of Object.entries(menu)) {
        for (const c of o.c) {
          for (const store of ["level", "etcd"] as const) {
            env.log(`replicas menu ${name} ${store} c=${c} repeat ${r + 1}`);
            const res = await closedLoop(o[store], { concurrency: c, durationMs: b.windowMs, ...(name === "create" ? { maxOps: 2000 } : {}) });
            if (res.errors > 0) throw new Error(`menu ${name} on ${store} c=${c}: ${res.errors} calls failed: ${res.firstError}`);
            results.set(`${name}:${store}:${c}`, [...(results.get(`${name}:${store}:${c}`) ?? []), res]);
          }
        }
      }
    }
    const labels: Record<string, string> = { create: "CreateVersion (KMI-signed, ECDSA P-256)", list: "ListVersions", getca: "GetCaCertificates PEM" };
    for (const [name, o] of Object.entries(menu)) {
      for (const c of o.c) {
        const f = (store: "level" | "etcd", baseline: boolean) => {
          const rs = results.get(`${name}:${store}:${c}`)!;
          const where = store === "level" ? "one KDC on LevelDB" : "one of 3 KDC replicas on etcd";
          return row.figure(`replicas.menu.${name}.${store}.c${c}`, `${labels[name]}, ${where}, c=${c}`, "ops/s", rs.map((x) => x.perSecond), { p50: rs.map((x) => x.p50), p99: rs.map((x) => x.p99) }, baseline);
        };
        const lv = f("level", true);
        row.ratio(f("etcd", false), lv, `of LevelDB c=${c}`);
      }
    }
    row.note("Issue 13's goal for the rotation figure is p99 under 2 s for 5,000 sessions over 3 replicas (one KDC measured 8.5 s max before); it sets no target for the Certificate menu on etcd: a write there commits through Raft (see row 7).");
  } finally {
    for (const c of clients) c.close();
  }
  return row;
}

/** The Certificate-menu calls on each setup: tenants of their own for CreateVersion, another with 3 versions for the reads. */
async function menuOps(level: Mesh, ha: Mesh, clients: LeanClient[]): Promise<Record<string, { level: () => Promise<unknown>; etcd: () => Promise<unknown>; c: number[] }>> {
  const setUp = async (mesh: Mesh) => {
    const op = mesh.kdcClient();
    try {
      for (const tenantId of [...MENU_TENANTS, READ_TENANT]) await op.unary(KdcAdminService.method.createTenant, { tenantId, displayName: "bench (replicas)", bootstrapKmiSigned: true });
      const read = await op.unary(KdcAdminService.method.createToken, { role: Role.TENANT_ADMIN, tenantId: READ_TENANT, description: "bench replicas", ttlSeconds: 3600n });
      // The operator's token: it may act on every menu tenant (authorization is the same check).
      const menuAdmin = mesh.kdcClient();
      const admin = mesh.kdcClient(read.secret);
      clients.push(menuAdmin, admin);
      let turn = 0;
      for (let i = 0; i < 2; i++) await admin.unary(KdcService.method.createVersion, { tenantId: READ_TENANT, signer: Signer.KMI_ROOT, keyAlgorithm: KeyAlgorithm.ECDSA_P256, subject: { commonName: `read bench v${i + 2}` }, validityDays: 365 });
      return {
        create: () => menuAdmin.unary(KdcService.method.createVersion, { tenantId: MENU_TENANTS[turn++ % MENU_TENANTS.length]!, signer: Signer.KMI_ROOT, keyAlgorithm: KeyAlgorithm.ECDSA_P256, subject: { commonName: "menu bench" }, validityDays: 365 }),
        list: () => admin.unary(KdcService.method.listVersions, { tenantId: READ_TENANT }),
        getca: () => admin.unary(KdcService.method.getCaCertificates, { tenantId: READ_TENANT, format: CertificateFormat.PEM }),
      };
    } finally {
      op.close();
    }
  };
  const [lv, et] = await Promise.all([setUp(level), setUp(ha)]);
  return {
    create: { level: lv.create, etcd: et.create, c: [1, 16] },
    list: { level: lv.list, etcd: et.list, c: [16] },
    getca: { level: lv.getca, etcd: et.getca, c: [16] },
  };
}
