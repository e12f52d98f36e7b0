/**
 * What survives a restart, what is on disk (no private key in plaintext anywhere), and the
 * audit log's tamper evidence (entries edited and removed in LevelDB while the KDC is down).
 */
import { createPrivateKey, createPublicKey, randomBytes } from "node:crypto";
import { execFile } from "node:child_process";
import { readdir, readFile, stat } from "node:fs/promises";
import { promisify } from "node:util";
import { join } from "node:path";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { Level } from "level";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { KeyAlgorithm } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { KdcAdminService, ListTenantsResponseSchema, ListTokensResponseSchema, Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, ListVersionsResponseSchema, Signer } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { AuditEntryRecordSchema } from "../../../src/gen/kmi/store/v1/audit_log_pb.js";
import type { SealedBlob } from "../../../src/gen/kmi/store/v1/envelope_pb.js";
import { openKdc } from "../../../src/kdc/init.js";
import { CREDENTIAL, credentialAad, intermediateKeyAad, signingKeyAad } from "../../../src/kdc/kdc-store.js";
import { KdcOperations } from "../../../src/kdc/operations.js";
import { open as openSealed, SealError } from "../../../src/storage/seal.js";
import { numericKey } from "../../../src/storage/store.js";
import { cleanEnv, cleanup, clients, ctl, initDataDir, KMI, startKdc, tempDir, type DataDir, type KdcProcess } from "./harness.js";

const run = promisify(execFile);

let data: DataDir;
let kdc: KdcProcess;
let caPem: string;
let rsaVersion: number;

async function snapshot(url: string) {
  const c = clients(url, caPem, { token: data.token });
  return {
    versions: toBinary(ListVersionsResponseSchema, await c(KdcService).listVersions({ tenantId: "acme" })),
    tenants: toBinary(ListTenantsResponseSchema, await c(KdcAdminService).listTenants({})),
    tokens: toBinary(ListTokensResponseSchema, await c(KdcAdminService).listTokens({})),
    keys: (await c(KdcService).listSigningKeys({ tenantId: "acme" })).keys.map((k) => k.keyId),
    head: (await c(KdcAdminService).tailAuditLog({ last: true, limit: 1 })).headSeq,
  };
}

async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await filesUnder(p)));
    else out.push(p);
  }
  return out;
}

/** Every record of the store, decoded by LevelDB (so compression cannot hide a plaintext). */
async function allValues(storeDir: string): Promise<Buffer[]> {
  const db = new Level<string, Buffer>(storeDir, { keyEncoding: "utf8", valueEncoding: "buffer" });
  await db.open();
  const out: Buffer[] = [];
  try {
    for await (const [k, v] of db.iterator()) out.push(Buffer.concat([Buffer.from(k), v]));
  } finally {
    await db.close();
  }
  return out;
}

beforeAll(async () => {
  data = await initDataDir();
  kdc = await startKdc(data.dataDir);
  caPem = await readFile(data.caFile, "utf8");
  const c = clients(kdc.url, caPem, { token: data.token });
  await c(KdcAdminService).createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  rsaVersion = (await c(KdcService).createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, keyAlgorithm: KeyAlgorithm.RSA_2048 })).version!.version;
  await c(KdcService).createVersion({ tenantId: "acme", signer: Signer.PRIVATE_CA, keyAlgorithm: KeyAlgorithm.ECDSA_P256 });
  await c(KdcService).renewVersion({ tenantId: "acme", version: rsaVersion, signer: Signer.KMI_ROOT });
  await c(KdcService).createSigningKey({ tenantId: "acme", name: "sign-1" });
  await c(KdcAdminService).createToken({ role: Role.TENANT_ADMIN, tenantId: "acme" });
});

afterAll(async () => {
  await kdc?.stop("SIGKILL");
  await cleanup(data?.dir);
});

describe("restart", () => {
  it("SIGTERM shuts down cleanly (store closed, exit 0) and all state is there after a restart", async () => {
    const before = await snapshot(kdc.url);
    expect(await kdc.stop("SIGTERM")).toBe(0);
    expect(kdc.stderr()).toContain('"msg":"store closed"');
    kdc = await startKdc(data.dataDir);
    const after = await snapshot(kdc.url);
    expect(after).toEqual(before);
    expect(after.keys).toHaveLength(1);
  });
});

describe("no private key in plaintext on disk", () => {
  it("the data dir holds no key's PKCS#8 DER or PEM, and every key record is a SealedBlob that a wrong master key cannot open", async () => {
    expect(await kdc.stop("SIGTERM")).toBe(0);
    // Read the keys out through the KDC's own unsealing path, in-process.
    const { ctx, store } = await openKdc({ dataDir: data.dataDir, logger: createNopLogger() });
    const secrets: { what: string; der: Buffer }[] = [];
    const blobs: { what: string; blob: SealedBlob; aad: string }[] = [];
    let rsaCertDer: Uint8Array;
    try {
      const ops = new KdcOperations(ctx);
      const rsaKey = Buffer.from(await ops.unsealVersionKey("acme", rsaVersion));
      // It is the real key of that version: its public half is the certificate's.
      const v = (await ctx.store.getVersion("acme", rsaVersion))!;
      rsaCertDer = v.certificateDer;
      const pub = createPublicKey(createPrivateKey({ key: rsaKey, format: "der", type: "pkcs8" })).export({ format: "der", type: "spki" });
      expect(Buffer.from(pub).equals(Buffer.from(v.publicKeyDer))).toBe(true);
      expect(createPrivateKey({ key: rsaKey, format: "der", type: "pkcs8" }).asymmetricKeyDetails?.modulusLength).toBe(2048);
      secrets.push({ what: `acme v${rsaVersion} (RSA)`, der: rsaKey });

      for (const r of await ctx.store.listAllVersions()) {
        const aad = intermediateKeyAad(r.tenantId, r.keyId);
        blobs.push({ what: `version ${r.tenantId}/${r.version}`, blob: r.privateKey!, aad });
        secrets.push({ what: `version ${r.tenantId}/${r.version}`, der: Buffer.from(ctx.sealer.open(r.privateKey!, aad)) });
      }
      for (const k of await ctx.store.listSigningKeys("acme")) {
        const aad = signingKeyAad(k.tenantId, k.name);
        blobs.push({ what: `signing key ${k.name}`, blob: k.privateKey!, aad });
        secrets.push({ what: `signing key ${k.name}`, der: Buffer.from(ctx.sealer.open(k.privateKey!, aad)) });
      }
      for (const name of Object.values(CREDENTIAL)) {
        const c = (await ctx.store.getCredential(name))!;
        blobs.push({ what: `credential ${name}`, blob: c.privateKey!, aad: credentialAad(name) });
        secrets.push({ what: `credential ${name}`, der: Buffer.from(ctx.sealer.open(c.privateKey!, credentialAad(name))) });
      }
    } finally {
      await store.close();
    }
    expect(blobs.length).toBeGreaterThanOrEqual(8); // 4 versions + 1 signing key + 3 credentials

    // Every key record is a SealedBlob under this master key that a wrong key cannot open.
    const wrong = randomBytes(32);
    for (const { what, blob, aad } of blobs) {
      expect(blob.format, what).toBe(1);
      expect(blob.ciphertext.length, what).toBeGreaterThan(0);
      let err: unknown;
      try {
        openSealed(wrong, blob, aad);
      } catch (e) {
        err = e;
      }
      expect(err, what).toBeInstanceOf(SealError);
      expect((err as SealError).reason, what).toBe("wrong_key");
      // Even with the right key id forged in, the wrong key does not authenticate.
      expect(() => openSealed(wrong, { ...blob, masterKeyId: blob.masterKeyId }, aad)).toThrow();
    }

    // No file of the data dir contains a key's DER or a PEM private key.
    const files = await filesUnder(data.dataDir);
    expect(files.some((f) => f.endsWith(".log") || f.endsWith(".ldb"))).toBe(true);
    for (const f of files) {
      if (f.endsWith("master.key")) continue;
      const bytes = await readFile(f);
      expect(bytes.includes("PRIVATE KEY"), f).toBe(false);
      for (const s of secrets) expect(bytes.indexOf(s.der), `${s.what} in ${f}`).toBe(-1);
    }
    // Nor does any record as LevelDB hands it back (decompressed). Positive control: a public
    // certificate is found the same way, so the search does see record contents.
    const values = await allValues(join(data.dataDir, "store"));
    expect(values.some((v) => v.includes(Buffer.from(rsaCertDer!)))).toBe(true);
    for (const v of values) {
      expect(v.includes("PRIVATE KEY")).toBe(false);
      for (const s of secrets) expect(v.indexOf(s.der), s.what).toBe(-1);
    }
    kdc = await startKdc(data.dataDir);
  });
});

describe("master key from the environment", () => {
  it("init with KMI_MASTER_KEY writes no key file; the KDC starts only with that key", async () => {
    const dir = await tempDir();
    const dataDir = join(dir, "data");
    const key = randomBytes(32).toString("base64");
    try {
      await run(process.execPath, [KMI, "kdc", "init", "--data-dir", dataDir], { env: cleanEnv({ KMI_MASTER_KEY: key }) });
      await expect(stat(join(dataDir, "master.key"))).rejects.toThrow(/ENOENT/);
      const wrong = await run(process.execPath, [KMI, "kdc", "--data-dir", dataDir, "--listen", "127.0.0.1:0"], {
        env: cleanEnv({ KMI_KDC_MASTER_KEY: randomBytes(32).toString("base64") }),
      }).then(
        () => ({ code: 0, stderr: "" }),
        (e: { code: number; stderr: string }) => e,
      );
      expect(wrong.code).toBe(1);
      expect(wrong.stderr).toContain("load the master key this store was made with");
      const k = await startKdc(dataDir, [], { KMI_KDC_MASTER_KEY: key });
      expect(await k.stop("SIGTERM")).toBe(0);
    } finally {
      await cleanup(dir);
    }
  });
});

/** The three calls the tamper test makes on the KDC's audit_log sublevel. */
interface AuditLogTable {
  get(key: string): Promise<Buffer | undefined>;
  put(key: string, value: Buffer): Promise<void>;
  del(key: string): Promise<void>;
}

describe("audit log tamper evidence", () => {
  it("kmi ctl audit verify passes untouched, fails naming the entry when one is edited, and when one is removed", async () => {
    const ok = await ctl(kdc, data, ["audit", "verify"]);
    expect(ok.code).toBe(0);
    expect(ok.stdout).toMatch(/audit log ok: \d+ entries/);
    const tail = await ctl(kdc, data, ["audit", "tail", "--json"]);
    expect(JSON.parse(tail.stdout).entries.length).toBeGreaterThan(5);

    const storeDir = join(data.dataDir, "store");
    const edit = async (fn: (log: AuditLogTable) => Promise<void>) => {
      expect(await kdc.stop("SIGTERM")).toBe(0);
      const db = new Level<string, Buffer>(storeDir, { keyEncoding: "utf8", valueEncoding: "buffer" });
      await db.open();
      try {
        await fn(db.sublevel<string, Buffer>("audit_log", { keyEncoding: "utf8", valueEncoding: "buffer" }));
      } finally {
        await db.close();
      }
      kdc = await startKdc(data.dataDir);
    };

    // One entry edited: its target changed, hash left as it was.
    let original: Buffer | undefined;
    await edit(async (log) => {
      original = (await log.get(numericKey(3)))!;
      const rec = fromBinary(AuditEntryRecordSchema, original);
      rec.target = "tenant/someone-else";
      await log.put(numericKey(3), Buffer.from(toBinary(AuditEntryRecordSchema, rec)));
    });
    const edited = await ctl(kdc, data, ["audit", "verify"]);
    expect(edited.code).not.toBe(0);
    expect(edited.stdout + edited.stderr).toContain("entry 3");
    expect(edited.stdout + edited.stderr).toContain("hash mismatch");
    const ej = await ctl(kdc, data, ["audit", "verify", "--json"]);
    expect(JSON.parse(ej.stdout)).toMatchObject({ ok: false, firstBadSeq: "3" });

    // Restored, it passes again; then one entry removed.
    await edit(async (log) => {
      await log.put(numericKey(3), original!);
    });
    expect((await ctl(kdc, data, ["audit", "verify"])).code).toBe(0);
    await edit(async (log) => {
      await log.del(numericKey(4));
    });
    const removed = await ctl(kdc, data, ["audit", "verify"]);
    expect(removed.code).not.toBe(0);
    expect(removed.stdout + removed.stderr).toContain("entry 4");
    expect(removed.stdout + removed.stderr).toContain("gap: seq 4 missing");
  });
});
