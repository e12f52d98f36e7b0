/**
 * `kmi kdc backup` / `kmi kdc restore` with real processes: a KDC with tenants, a KMI-signed and
 * a private-CA version (openssl as the private CA), a revoked version and tokens is stopped,
 * backed up, wiped and restored; the restored KDC answers byte for byte as before, its audit log
 * verifies and the old tokens work. A running KDC's store, a truncated or edited file, a newer
 * format, a non-empty data dir and a wrong master key are refused; the file is 0600 and holds no
 * private key in plaintext.
 */
import { execFile } from "node:child_process";
import { createHash, createPrivateKey, createPublicKey, X509Certificate } from "node:crypto";
import { mkdir, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { KdcAdminService, Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, Signer } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { openKdc } from "../../../src/kdc/init.js";
import { CREDENTIAL, credentialAad, intermediateKeyAad } from "../../../src/kdc/kdc-store.js";
import { cleanEnv, cleanup, clients, ctl, KMI, makePrivateCa, startKdc, tempDir, type KdcProcess } from "./harness.js";

const exec = promisify(execFile);

/** Runs `kmi kdc <args>`; never throws for a non-zero exit. */
async function kmiKdc(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await exec(process.execPath, [KMI, "kdc", ...args], { env: cleanEnv(env), encoding: "utf8" });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const x = err as { code?: number; stdout?: string; stderr?: string };
    if (typeof x.code !== "number") throw err;
    return { code: x.code, stdout: x.stdout ?? "", stderr: x.stderr ?? "" };
  }
}

let dir: string;
let dataDir: string;
let keyFile: string;
let data: { caFile: string; tokenFile: string };
let kdc: KdcProcess | undefined;
let adminSecret: string;
let revokedSecret: string;
const backupFile = () => join(dir, "backups", "kdc.kbk");

/** What the operator sees; compared byte for byte before the backup and after the restore. */
const VIEWS: string[][] = [
  ["tenant", "list"],
  ["tenant", "list", "--json"],
  ["token", "list"],
  ["ca", "history", "--tenant", "acme"],
  ["ca", "history", "--tenant", "globex", "--json"],
  ["ca", "download", "--tenant", "acme"],
  ["ca", "download", "--tenant", "acme", "--version", "2", "--part", "root"],
  ["ca", "download", "--tenant", "globex", "--json"],
  ["audit", "tail", "--limit", "1000"],
  ["audit", "tail", "--limit", "1000", "--json"],
  ["audit", "verify"],
];
let before: { code: number; stdout: string; stderr: string }[];
let publicFiles: Map<string, Buffer>;

beforeAll(async () => {
  dir = await tempDir("kmi-backup-");
  dataDir = join(dir, "data");
  // The master key lives apart from the data dir, as operations.md says: the wipe keeps it.
  await mkdir(join(dir, "keys"), { mode: 0o700 });
  await mkdir(join(dir, "backups"), { mode: 0o700 });
  keyFile = join(dir, "keys", "master.key");
  data = { caFile: join(dataDir, "infra-ca.pem"), tokenFile: join(dir, "operator.token") };
  const init = await kmiKdc(["init", "--data-dir", dataDir, "--master-key-file", keyFile, "--token-file", data.tokenFile]);
  expect(init.code, init.stderr).toBe(0);
  kdc = await startKdc(dataDir, ["--master-key-file", keyFile]);
  const op = clients(kdc.url, await readFile(data.caFile, "utf8"), { token: (await readFile(data.tokenFile, "utf8")).trim() });
  const ca = op(KdcService);
  // acme: v1 KMI-signed (bootstrap), v2 private CA (openssl) activated, v3 KMI-signed revoked.
  await op(KdcAdminService).createTenant({ tenantId: "acme", displayName: "ACME Corp", bootstrapKmiSigned: true });
  const pending = await ca.createVersion({ tenantId: "acme", signer: Signer.PRIVATE_CA, subject: { organization: "ACME" } });
  expect(pending.version!.version).toBe(2);
  const priv = await makePrivateCa(dir, "acme-private-root");
  const signed = await priv.sign(pending.csrPem);
  await ca.uploadIntermediate({ tenantId: "acme", version: 2, certificate: Buffer.from(signed), customerRoot: Buffer.from(priv.rootPem), activate: true });
  const v3 = (await ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT })).version!.version;
  await ca.revokeVersion({ tenantId: "acme", version: v3, reason: "drill" });
  // globex: a KMI-signed rotation activated over its bootstrap version.
  await op(KdcAdminService).createTenant({ tenantId: "globex", bootstrapKmiSigned: true });
  await ca.createVersion({ tenantId: "globex", signer: Signer.KMI_ROOT, activate: true });
  adminSecret = (await op(KdcAdminService).createToken({ role: Role.TENANT_ADMIN, tenantId: "acme", description: "acme admin" })).secret;
  const revoked = await op(KdcAdminService).createToken({ role: Role.OPERATOR, description: "old ci" });
  revokedSecret = revoked.secret;
  await op(KdcAdminService).revokeToken({ tokenId: revoked.token!.tokenId });

  before = [];
  for (const v of VIEWS) before.push(await ctl(kdc, data, v));
  publicFiles = new Map();
  for (const f of ["kmi-root.pem", "infra-ca.pem"]) publicFiles.set(f, await readFile(join(dataDir, f)));
});

afterAll(async () => {
  await kdc?.stop("SIGKILL");
  await cleanup(dir);
});

describe("kmi kdc backup", () => {
  it("says in --help that the master key is not in the backup", async () => {
    const h = await kmiKdc(["backup", "--help"]);
    expect(h.code).toBe(0);
    expect(h.stdout).toContain("the master key is NOT in the backup: keep the master key separately");
  });

  it("refuses the store of a running KDC (exit 3), says what to do, and writes nothing", async () => {
    const r = await kmiKdc(["backup", "--data-dir", dataDir, "--out", backupFile()]);
    expect(r.code).toBe(3);
    expect(r.stderr).toContain(`data dir ${dataDir} is in use by a running KDC`);
    expect(r.stderr).toContain("stop the KDC");
    expect(r.stderr).toContain("filesystem snapshot");
    expect(await readdir(join(dir, "backups"))).toEqual([]);
  });

  it("backs up the stopped KDC: mode 0600, progress on stderr, a --json summary that matches the file", async () => {
    expect(await kdc!.stop("SIGTERM")).toBe(0);
    kdc = undefined;
    const people = await kmiKdc(["backup", "--data-dir", dataDir, "--out", join(dir, "backups", "people.kbk")]);
    expect(people.code, people.stderr).toBe(0);
    expect(people.stderr).toMatch(/kmi kdc backup: \d+ records written to /);
    expect(people.stdout).toContain("which is NOT in the backup: keep the master key separately");

    const r = await kmiKdc(["backup", "--data-dir", dataDir, "--out", backupFile(), "--json"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe("");
    const j = JSON.parse(r.stdout) as { records: number; sha256: string; bytes: number; tables: Record<string, number>; format: number; kmi_version: string; master_key_included: boolean };
    expect((await stat(backupFile())).mode & 0o777).toBe(0o600);
    const bytes = await readFile(backupFile());
    expect(j.bytes).toBe(bytes.length);
    expect(bytes.subarray(0, 8).toString("latin1")).toBe("KMIBKUP\n");
    // The footer's SHA-256 covers every byte before it; the summary reports the same.
    const sum = createHash("sha256").update(bytes.subarray(0, bytes.length - 48)).digest("hex");
    expect(Buffer.from(bytes.subarray(bytes.length - 32)).toString("hex")).toBe(sum);
    expect(j.sha256).toBe(sum);
    expect(j).toMatchObject({ format: 1, kmi_version: "0.1.0", master_key_included: false });
    expect(j.tables).toMatchObject({ _meta: 1, credentials: 3, tenants: 2, versions: 5 });
    expect(j.tables["audit_log"]).toBeGreaterThan(8);
    expect(j.records).toBe(Object.values(j.tables).reduce((a, b) => a + b, 0));
    // It never overwrites a backup.
    const again = await kmiKdc(["backup", "--data-dir", dataDir, "--out", backupFile()]);
    expect(again.code).toBe(5);
    expect(again.stderr).toContain("exists already");
  });

  it("holds no private key in plaintext: not one key read out through the unsealing path", async () => {
    const { ctx, store } = await openKdc({ dataDir, masterKeyFile: keyFile, logger: createNopLogger() });
    const secrets: { what: string; der: Buffer }[] = [];
    let rootCertDer: Uint8Array;
    try {
      for (const r of await ctx.store.listAllVersions()) {
        secrets.push({ what: `version ${r.tenantId}/${r.version}`, der: Buffer.from(ctx.sealer.open(r.privateKey!, intermediateKeyAad(r.tenantId, r.keyId))) });
      }
      for (const name of Object.values(CREDENTIAL)) {
        const c = (await ctx.store.getCredential(name))!;
        secrets.push({ what: `credential ${name}`, der: Buffer.from(ctx.sealer.open(c.privateKey!, credentialAad(name))) });
      }
      rootCertDer = (await ctx.store.getCredential(CREDENTIAL.kmiRoot))!.certificateDer;
    } finally {
      await store.close();
    }
    expect(secrets).toHaveLength(5 + 3);
    // They are the real keys: the KMI root's private key matches kmi-root.pem.
    const rootKey = createPrivateKey({ key: secrets.find((s) => s.what === "credential kmi-root")!.der, format: "der", type: "pkcs8" });
    const rootPub = new X509Certificate(publicFiles.get("kmi-root.pem")!).publicKey.export({ format: "der", type: "spki" });
    expect(Buffer.from(createPublicKey(rootKey).export({ format: "der", type: "spki" })).equals(Buffer.from(rootPub))).toBe(true);

    const bytes = await readFile(backupFile());
    // Positive control: the search sees the records' bytes (a public certificate is found).
    expect(bytes.includes(Buffer.from(rootCertDer!))).toBe(true);
    expect(bytes.includes("PRIVATE KEY")).toBe(false);
    for (const s of secrets) expect(bytes.indexOf(s.der), s.what).toBe(-1);
  });
});

describe("kmi kdc restore", () => {
  it("backup, wipe, restore: the restored KDC serves the same tenants, versions, CA files and audit log, byte for byte; audit verify passes; old tokens work", async () => {
    await rm(dataDir, { recursive: true, force: true });
    const r = await kmiKdc(["restore", "--data-dir", dataDir, "--in", backupFile(), "--master-key-file", keyFile]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain("the master key given opens it");
    expect(r.stderr).toMatch(/kmi kdc restore: \d+ records restored into /);
    expect((await stat(dataDir)).mode & 0o777).toBe(0o700);
    for (const [f, content] of publicFiles) expect((await readFile(join(dataDir, f))).equals(content), f).toBe(true);

    kdc = await startKdc(dataDir, ["--master-key-file", keyFile]);
    for (const [i, v] of VIEWS.entries()) {
      const after = await ctl(kdc, data, v);
      expect(after, v.join(" ")).toEqual(before[i]);
    }
    // Not vacuous: the views hold what was made.
    expect(before[0]!.code).toBe(0);
    expect(before[0]!.stdout).toMatch(/acme\s+ACME Corp\s+2/);
    expect(before[3]!.stdout).toMatch(/3\s+revoked\s+kmi-root/);
    expect(before[3]!.stdout).toMatch(/2\s+active\s+private-ca/);
    expect(before[6]!.stdout).toContain("BEGIN CERTIFICATE");
    expect(before[10]!.stdout).toMatch(/^audit log ok: (\d+) entries, head [0-9a-f]{64}\nsigned checkpoint: seq \1; witness: not configured\n$/);

    // The old operator token (the ctl runs above) and the tenant admin's still work; the revoked one is still refused.
    const admin = await ctl(kdc, { caFile: data.caFile }, ["ca", "history", "--tenant", "acme"], { KMI_CTL_TOKEN: adminSecret });
    expect(admin.code, admin.stderr).toBe(0);
    expect(admin.stdout).toBe(before[3]!.stdout);
    const revoked = await ctl(kdc, { caFile: data.caFile }, ["tenant", "list"], { KMI_CTL_TOKEN: revokedSecret });
    expect(revoked.code).toBe(4);
  });

  const corrupt: [string, (b: Buffer) => Buffer, string][] = [
    ["a truncated file", (b) => b.subarray(0, b.length - 100), "is truncated: it does not end with the backup's end marker"],
    ["one edited byte", (b) => Buffer.concat([b.subarray(0, 700), Buffer.from([b[700]! ^ 0x01]), b.subarray(701)]), "does not match its checksum"],
    ["a newer format", (b) => Buffer.from(b.toString("latin1").replace('"format":1', '"format":2'), "latin1"), "is format 2 (written by kmi 0.1.0), newer than format 1"],
    ["not a backup", () => Buffer.from("-----BEGIN CERTIFICATE-----\n"), "is not a kmi backup"],
  ];
  it.each(corrupt)("refuses %s (exit 4) and writes nothing", async (name, edit, message) => {
    const file = join(dir, "backups", `${name.replace(/\W+/g, "-")}.kbk`);
    const original = await readFile(backupFile());
    const edited = edit(original);
    expect(edited.equals(original)).toBe(false);
    await writeFile(file, edited, { mode: 0o600 });
    const target = join(dir, `restore-${name.replace(/\W+/g, "-")}`);
    const r = await kmiKdc(["restore", "--data-dir", target, "--in", file]);
    expect(r.code, r.stderr).toBe(4);
    expect(r.stderr).toContain(message);
    await expect(stat(target)).rejects.toThrow(/ENOENT/);
  });

  it("refuses a data dir that is not empty, and a master key that does not open the backup (exit 5)", async () => {
    const full = await kmiKdc(["restore", "--data-dir", dataDir, "--in", backupFile()]);
    expect(full.code).toBe(5);
    expect(full.stderr).toContain(`data dir ${dataDir} is not empty`);

    const wrongKey = join(dir, "keys", "wrong.key");
    await writeFile(wrongKey, Buffer.alloc(32, 7).toString("base64") + "\n", { mode: 0o600 });
    const target = join(dir, "restore-wrong-key");
    const wrong = await kmiKdc(["restore", "--data-dir", target, "--in", backupFile(), "--master-key-file", wrongKey]);
    expect(wrong.code).toBe(5);
    expect(wrong.stderr).toContain("the master key given does not open this backup");
    await expect(stat(target)).rejects.toThrow(/ENOENT/);
  });
});
