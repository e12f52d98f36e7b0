/**
 * A real KDC and Auditserver for the KDC rows: `kmi kdc init` + `kmi kdc` and `kmi audit init`
 * + `kmi audit` (dist/cmd/kmi.js) on 127.0.0.1 port 0 with temp data dirs; an operator's
 * clients; a tenant bootstrapped KMI-signed; a machine group with approved measurements; and
 * machines that enroll with a join token and attest, as the key agent does. With
 * `MeshOptions.replicas` and store flags (`--store etcd …`), several KDC replicas share one store.
 */
import { execFile, type ChildProcess } from "node:child_process";
import { createHash, generateKeyPairSync, type KeyObject } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { createAttestRequest, type MeasurementValue } from "../../src/attest/index.js";
import { AuditAdminService } from "../../src/gen/kmi/audit/v1/admin_pb.js";
import { AuditService } from "../../src/gen/kmi/audit/v1/audit_pb.js";
import { KdcAdminService } from "../../src/gen/kmi/kdc/v1/admin_pb.js";
import { createCsr, csrToPem } from "../../src/pki/csr.js";
import { LeanClient } from "../../src/clients/grpc-client.js";
import { cleanEnv, KMI, startKmi } from "./kmi-process.js";

const run = promisify(execFile);

/** The measurements the bench's machines report (and their group approves). */
export const BENCH_MEASUREMENTS: MeasurementValue[] = [
  { name: "agent", sha256: createHash("sha256").update("kmi bench agent").digest("hex") },
  { name: "proxy", sha256: createHash("sha256").update("kmi bench proxy").digest("hex") },
];

/** The KDC's log line once it serves, with its address. */
const KDC_READY = /"msg":"kdc serving".*?"address":"([^"]+)"/;

/** A running kmi server process. */
export interface ServerProcess {
  readonly proc: ChildProcess;
  readonly address: string;
  readonly url: string;
  stop(): Promise<void>;
}

async function startServer(args: string[], ready: RegExp, what: string): Promise<ServerProcess> {
  const p = await startKmi(args, what, ready);
  const address = ready.exec(p.started)![1]!;
  return {
    proc: p.child,
    address,
    url: `https://${address}`,
    async stop() {
      const t = setTimeout(() => p.child.kill("SIGKILL"), 10_000);
      await p.kill("SIGTERM");
      clearTimeout(t);
    },
  };
}

/** A machine: its key, certificate and attestation token. */
export interface Machine {
  readonly machineId: string;
  readonly key: KeyObject;
  readonly keyPem: string;
  readonly certPem: string;
  token: string;
  tokenExpiresAt: number;
}

/** Options of `Mesh.start`. */
export interface MeshOptions {
  /** KDC replicas (default 1); more than one needs a shared store in `kdcStoreFlags`. */
  replicas?: number;
  /** Store flags of `kmi kdc init` and of replica `i` (e.g. `--store etcd --etcd-endpoints …`); default LevelDB. */
  kdcStoreFlags?: (replica: number) => string[];
}

/** KDC + Auditserver, running, with an operator. */
export class Mesh {
  private constructor(
    readonly dir: string,
    /** Every KDC replica; `kdc` is the first. */
    readonly kdcs: ServerProcess[],
    readonly audit: ServerProcess,
    /** Infrastructure CA, PEM. */
    readonly caPem: string,
    /** Operator token. */
    readonly token: string,
  ) {}

  /** The first KDC replica. */
  get kdc(): ServerProcess {
    return this.kdcs[0]!;
  }

  /** Inits and starts both servers under `dir`. */
  static async start(dir: string, options: MeshOptions = {}): Promise<Mesh> {
    const kdcData = join(dir, "kdc");
    const auditData = join(dir, "audit");
    const tokenFile = join(dir, "operator.token");
    const storeFlags = options.kdcStoreFlags ?? (() => []);
    await run(process.execPath, [KMI, "kdc", "init", "--data-dir", kdcData, "--token-file", tokenFile, ...storeFlags(0)], { env: cleanEnv() });
    const kdcReady = KDC_READY;
    let kdc = await startServer(["kdc", "--data-dir", kdcData, "--listen", "127.0.0.1:0", ...storeFlags(0)], kdcReady, "kdc");
    try {
      const caFile = join(kdcData, "infra-ca.pem");
      await run(process.execPath, [KMI, "audit", "init", "--data-dir", auditData, "--kdc", kdc.url, "--kdc-ca-file", caFile, "--token-file", tokenFile], { env: cleanEnv() });
      const audit = await startServer(["audit", "--data-dir", auditData, "--listen", "127.0.0.1:0", "--kdc", kdc.url], /"msg":"audit serving".*?"address":"([^"]+)"/, "audit");
      try {
        // The KDC verifies attestation tokens with the Auditserver's key, fetched from it: restart
        // it on the same address, now pointed at the Auditserver (whose peer calls go there).
        const help = await run(process.execPath, [KMI, "kdc", "--help"], { env: cleanEnv() }).then((r) => r.stdout);
        const auditUrl = help.includes("--audit-url") ? ["--audit-url", audit.url] : [];
        if (auditUrl.length > 0) {
          await kdc.stop();
          kdc = await startServer(["kdc", "--data-dir", kdcData, "--listen", kdc.address, ...auditUrl, ...storeFlags(0)], kdcReady, "kdc");
        }
        const kdcs = [kdc];
        try {
          for (let i = 1; i < (options.replicas ?? 1); i++) kdcs.push(await startServer(["kdc", "--data-dir", kdcData, "--listen", "127.0.0.1:0", ...auditUrl, ...storeFlags(i)], kdcReady, `kdc replica ${i}`));
        } catch (err) {
          await Promise.all(kdcs.slice(1).map((k) => k.stop()));
          throw err;
        }
        return new Mesh(dir, kdcs, audit, await readFile(caFile, "utf8"), (await readFile(tokenFile, "utf8")).trim());
      } catch (err) {
        await audit.stop();
        throw err;
      }
    } catch (err) {
      await kdc.stop();
      throw err;
    }
  }

  /**
   * Starts one more KDC replica on the mesh's data dir and the Auditserver, with `storeFlags`
   * (the shared store of the others); returns its index in `kdcs`. `stop()` stops it too.
   */
  async addReplica(storeFlags: string[]): Promise<number> {
    const i = this.kdcs.length;
    this.kdcs.push(await startServer(["kdc", "--data-dir", join(this.dir, "kdc"), "--listen", "127.0.0.1:0", "--audit-url", this.audit.url, ...storeFlags], KDC_READY, `kdc replica ${i}`));
    return i;
  }

  /** A client of KDC replica `replica` (default the first) with the operator token (or `token`). */
  kdcClient(token = this.token, replica = 0): LeanClient {
    return new LeanClient({ target: this.kdcs[replica]!.address, serverName: "localhost", caPem: this.caPem, metadata: { authorization: `Bearer ${token}` } });
  }

  /** A client of the Auditserver with the operator token. */
  auditClient(): LeanClient {
    return new LeanClient({ target: this.audit.address, serverName: "localhost", caPem: this.caPem, metadata: { authorization: `Bearer ${this.token}` } });
  }

  /** A mutual-TLS client of KDC replica `replica` (default the first) as `m`; `own` gives it its own connection. */
  machineKdcClient(m: Machine, own = false, replica = 0): LeanClient {
    return new LeanClient({ target: this.kdcs[replica]!.address, serverName: "localhost", caPem: this.caPem, cert: { cert: m.certPem, key: m.keyPem }, ...(own ? { ownConnection: true } : {}) });
  }

  /** Creates tenant `tenantId` with a KMI-signed active intermediate, and group `group` serving it. */
  async bootstrap(tenantId: string, group: string): Promise<void> {
    const kdc = this.kdcClient();
    const audit = this.auditClient();
    try {
      await kdc.unary(KdcAdminService.method.createTenant, { tenantId, displayName: `${tenantId} (bench)`, bootstrapKmiSigned: true });
      await audit.unary(AuditAdminService.method.createGroup, { name: group, tenantIds: [tenantId] });
      await audit.unary(AuditAdminService.method.approveMeasurements, { group, approved: BENCH_MEASUREMENTS.map((m) => ({ name: m.name, sha256: [m.sha256] })) });
    } finally {
      kdc.close();
      audit.close();
    }
  }

  /** Enrolls a new machine in `group` (join token, CSR) and attests it. */
  async enrollMachine(group: string, hostname: string): Promise<Machine> {
    const admin = this.auditClient();
    const plain = new LeanClient({ target: this.audit.address, serverName: "localhost", caPem: this.caPem });
    try {
      const jt = await admin.unary(AuditAdminService.method.createJoinToken, { group, ttlSeconds: 600, description: "bench" });
      const key = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
      const csrPem = csrToPem(createCsr({ subject: { commonName: hostname }, privateKey: key }));
      const res = await plain.unary(AuditService.method.enroll, { joinToken: jt.secret, csrPem, hostname });
      const m: Machine = { machineId: res.machineId, key, keyPem: key.export({ format: "pem", type: "pkcs8" }).toString(), certPem: res.certificatePem, token: "", tokenExpiresAt: 0 };
      await this.attest(m);
      return m;
    } finally {
      admin.close();
      plain.close();
    }
  }

  /** Gets a fresh attestation token for `m`. */
  async attest(m: Machine): Promise<void> {
    const c = new LeanClient({ target: this.audit.address, serverName: "localhost", caPem: this.caPem, cert: { cert: m.certPem, key: m.keyPem } });
    try {
      const nonce = (await c.unary(AuditService.method.getAttestationNonce, {})).nonce;
      const req = createAttestRequest({ machineId: m.machineId, nonce, measurements: BENCH_MEASUREMENTS, softwareVersion: "0.1.0", time: new Date() }, m.key);
      const res = await c.unaryMessage(AuditService.method.attest, req);
      m.token = res.attestationToken;
      m.tokenExpiresAt = res.expiresAt === undefined ? 0 : Number(res.expiresAt.seconds) * 1000;
    } finally {
      c.close();
    }
  }

  /** Stops every server. */
  async stop(): Promise<void> {
    await this.audit.stop();
    await Promise.all(this.kdcs.map((k) => k.stop()));
  }
}

