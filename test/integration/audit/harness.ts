/**
 * A real mesh for the Auditserver's integration suites: a KDC process (`kmi kdc init` +
 * `kmi kdc`) and an Auditserver process (`kmi audit init` + `kmi audit`), both on 127.0.0.1
 * port 0 with temp data dirs; gRPC clients over TLS and mutual TLS; machines with their own
 * P-256 keys; `kmi ctl` runs; and a reader of the Auditserver's store for byte-level checks
 * (only while the process is stopped: LevelDB allows one opener).
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { X509Certificate, createPublicKey, generateKeyPairSync, type KeyObject } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { toBinary } from "@bufbuild/protobuf";
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type { DescService } from "@bufbuild/protobuf";
import { createAttestRequest, type MeasurementValue } from "../../../src/attest/index.js";
import { AuditService, type AttestResponse } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { AuditAdminService } from "../../../src/gen/kmi/audit/v1/admin_pb.js";
import { createCsr, csrToPem } from "../../../src/pki/csr.js";
import { openAuditStore } from "../../../src/audit/init.js";
import { Tables } from "../../../src/audit/store.js";
import type { Table } from "../../../src/storage/store.js";

const run = promisify(execFile);

/** Repository root and the built CLI. */
export const ROOT = resolve(import.meta.dirname, "../../..");
export const KMI = join(ROOT, "dist/cmd/kmi.js");

/** The environment without any KMI_* variable of the caller. */
export function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("KMI_")) env[k] = v;
  return { ...env, ...extra };
}

/** A running server process. */
export interface ServerProcess {
  proc: ChildProcess;
  url: string;
  stderr: () => string;
  stop(): Promise<void>;
}

async function startServer(args: string[], ready: RegExp, what: string): Promise<ServerProcess> {
  const proc = spawn(process.execPath, [KMI, ...args], { env: cleanEnv(), stdio: ["ignore", "pipe", "pipe"] });
  let err = "";
  const exited = new Promise<void>((res) => proc.once("exit", () => res()));
  const address = await new Promise<string>((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`${what} did not start in 20 s: ${err}`)), 20_000);
    proc.stderr!.on("data", (b: Buffer) => {
      err += b.toString();
      const m = ready.exec(err);
      if (m) {
        clearTimeout(timer);
        res(m[1]!);
      }
    });
    void exited.then(() => {
      clearTimeout(timer);
      rej(new Error(`${what} exited before serving: ${err}`));
    });
  });
  return {
    proc,
    url: `https://${address}`,
    stderr: () => err,
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill("SIGTERM");
      await exited;
    },
  };
}

/** The KDC and the Auditserver, running. */
export interface Mesh {
  dir: string;
  kdcDataDir: string;
  auditDataDir: string;
  /** The infrastructure CA file (from `kmi kdc init`). */
  caFile: string;
  caPem: string;
  tokenFile: string;
  token: string;
  kdc: ServerProcess;
  audit: ServerProcess;
  /** Restarts the Auditserver (new port) with extra flags, e.g. a clock offset. */
  restartAudit(extra?: string[]): Promise<void>;
  /** Stops the Auditserver (for store reads); `restartAudit` brings it back. */
  stopAudit(): Promise<void>;
  close(): Promise<void>;
}

/** Inits and starts a KDC and an Auditserver. */
export async function startMesh(): Promise<Mesh> {
  const dir = await mkdtemp(join(tmpdir(), "kmi-audit-it-"));
  const kdcDataDir = join(dir, "kdc");
  const auditDataDir = join(dir, "audit");
  const tokenFile = join(dir, "operator.token");
  await run(process.execPath, [KMI, "kdc", "init", "--data-dir", kdcDataDir, "--token-file", tokenFile], { env: cleanEnv() });
  const kdc = await startServer(["kdc", "--data-dir", kdcDataDir, "--listen", "127.0.0.1:0"], /"msg":"kdc serving".*?"address":"([^"]+)"/, "kdc");
  const caFile = join(kdcDataDir, "infra-ca.pem");
  await run(process.execPath, [KMI, "audit", "init", "--data-dir", auditDataDir, "--kdc", kdc.url, "--kdc-ca-file", caFile, "--token-file", tokenFile], { env: cleanEnv() });
  const startAudit = (extra: string[] = []) =>
    startServer(["audit", "--data-dir", auditDataDir, "--listen", "127.0.0.1:0", "--kdc", kdc.url, ...extra], /"msg":"audit serving".*?"address":"([^"]+)"/, "audit");
  const mesh: Mesh = {
    dir,
    kdcDataDir,
    auditDataDir,
    caFile,
    caPem: await readFile(caFile, "utf8"),
    tokenFile,
    token: (await readFile(tokenFile, "utf8")).trim(),
    kdc,
    audit: await startAudit(),
    async restartAudit(extra = []) {
      await mesh.audit.stop();
      mesh.audit = await startAudit(extra);
    },
    async stopAudit() {
      await mesh.audit.stop();
    },
    async close() {
      await mesh.audit.stop();
      await kdc.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
  return mesh;
}

/** gRPC clients of the Auditserver over TLS, with an optional client certificate and bearer token. */
export function auditClients(mesh: Mesh, opts: { token?: string; cert?: string; key?: string; url?: string } = {}) {
  const auth: Interceptor = (next) => async (req) => {
    if (opts.token !== undefined) req.header.set("authorization", `Bearer ${opts.token}`);
    return next(req);
  };
  const transport = createGrpcTransport({
    baseUrl: opts.url ?? mesh.audit.url,
    interceptors: [auth],
    nodeOptions: { ca: mesh.caPem, ...(opts.cert !== undefined ? { cert: opts.cert, key: opts.key } : {}) },
  });
  const get = <S extends DescService>(s: S): Client<S> => createClient(s, transport);
  return { audit: get(AuditService), admin: get(AuditAdminService) };
}

/** A machine: its own key, and once enrolled its certificate and clients over mutual TLS. */
export class TestMachine {
  readonly key: KeyObject = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
  machineId = "";
  certPem = "";

  constructor(private readonly mesh: Mesh) {}

  /** A PEM CSR for the machine key. */
  csrPem(): string {
    return csrToPem(createCsr({ subject: { commonName: "machine" }, privateKey: this.key }));
  }

  get keyPem(): string {
    return this.key.export({ format: "pem", type: "pkcs8" }).toString();
  }

  /** SHA-256 of the certificate, lowercase hex. */
  get certSha256(): string {
    return new X509Certificate(this.certPem).fingerprint256.replaceAll(":", "").toLowerCase();
  }

  /** Clients over mutual TLS with the machine certificate (made afresh: the URL may change on restarts). */
  mtls() {
    return auditClients(this.mesh, { cert: this.certPem, key: this.keyPem });
  }

  /** Enrolls with `joinToken` over TLS only. */
  async enroll(joinToken: string, hostname = "proxy-1") {
    const res = await auditClients(this.mesh).audit.enroll({ joinToken, csrPem: this.csrPem(), hostname });
    this.machineId = res.machineId;
    this.certPem = res.certificatePem;
    return res;
  }

  /** Gets a nonce and attests, signing with `signer` (default the machine key). */
  async attest(measurements: MeasurementValue[], opts: { signer?: KeyObject; replay?: { nonce: Uint8Array } } = {}): Promise<AttestResponse> {
    const c = this.mtls().audit;
    const nonce = opts.replay?.nonce ?? (await c.getAttestationNonce({})).nonce;
    const req = createAttestRequest({ machineId: this.machineId, nonce, measurements, softwareVersion: "0.1.0", time: new Date() }, opts.signer ?? this.key);
    return c.attest(req);
  }

  /** The public key, SPKI DER. */
  spki(): Buffer {
    return createPublicKey(this.key).export({ type: "spki", format: "der" });
  }
}

/** Result of a `kmi ctl` run. */
export interface CtlResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `kmi ctl <args>` against the mesh, with the operator token and the CA file. */
export async function ctl(mesh: Mesh, args: string[]): Promise<CtlResult> {
  const env = cleanEnv({ KMI_CTL_KDC: mesh.kdc.url, KMI_CTL_AUDIT: mesh.audit.url, KMI_CTL_CA_FILE: mesh.caFile, KMI_CTL_TOKEN_FILE: mesh.tokenFile });
  try {
    const r = await run(process.execPath, [KMI, "ctl", ...args], { env, encoding: "utf8" });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const x = err as { code?: number; stdout?: string; stderr?: string };
    if (typeof x.code !== "number") throw err;
    return { code: x.code, stdout: x.stdout ?? "", stderr: x.stderr ?? "" };
  }
}

/** Runs a command; resolves with its exit code and output, never rejects on a non-zero exit. */
export async function sh(cmd: string, args: string[], input?: string): Promise<{ code: number; out: string }> {
  return new Promise((resolvePromise) => {
    const child = execFile(cmd, args, { encoding: "utf8" }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof (err as { code?: unknown }).code === "number" ? ((err as { code: number }).code) : 1;
      resolvePromise({ code, out: stdout + stderr });
    });
    if (input !== undefined) child.stdin?.end(input);
  });
}

/**
 * Every record of the Auditserver's state tables, serialized (hex), keyed "table/key". The
 * Auditserver must be stopped.
 */
export async function readAuditState(mesh: Mesh): Promise<Map<string, string>> {
  const store = await openAuditStore(mesh.auditDataDir, false);
  try {
    const out = new Map<string, string>();
    for (const table of Object.values(Tables)) {
      for await (const [k, v] of store.iterate(table as Table)) out.set(`${table.name}/${k}`, Buffer.from(toBinary(table.schema, v as never)).toString("hex"));
    }
    return out;
  } finally {
    await store.close();
  }
}
