/**
 * `kmi kdc rekey` on LevelDB with real processes: a KDC with a tenant, tokens and 1200 extra
 * sealed signing keys is stopped; a rekey with `--batch-size 1` is killed with SIGKILL once its
 * progress shows it partway. The KDC then starts on the half-rewrapped store and reads every
 * record (under either key), renews and rotates a CA, and its audit log verifies against a
 * checkpoint exported before the rotation. A second rekey resumes and finishes: the old key
 * file is gone, every record is under the new key, the log keys are the same. No private key
 * is in the LevelDB files before or after.
 */
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openKdcStore } from "../../../src/kdc/init.js";
import { AUDIT_LOG_TABLE, deriveAuditKey, keyedHash } from "../../../src/storage/audit-log.js";
import { deriveCheckpointKey } from "../../../src/storage/audit-checkpoint.js";
import { readMasterKeyFile } from "../../../src/storage/master-key.js";
import { masterKeyId } from "../../../src/storage/seal.js";
import { addBulkSigningKeys, openEverything, runRekey } from "../../fixtures/kdc/rekey.js";
import { findInFiles, keyNeedles, readTree, unsealIntermediates, type Needle } from "../../fixtures/mesh/secrets.js";
import { cleanup, ctl, initDataDir, startKdc, type DataDir } from "./harness.js";

const BULK = 1200;
let data: DataDir;
let keyFile: string;
let needles: Needle[];
let oldKey: Buffer;
let checkpointFile: string;

beforeAll(async () => {
  data = await initDataDir();
  keyFile = join(data.dataDir, "master.key");
  oldKey = await readMasterKeyFile(keyFile);
  const kdc = await startKdc(data.dataDir);
  try {
    expect((await ctl(kdc, data, ["tenant", "create", "acme", "--bootstrap"])).code).toBe(0);
    expect((await ctl(kdc, data, ["token", "create", "--role", "tenant-admin", "--tenant", "acme"])).code).toBe(0);
    checkpointFile = join(data.dir, "before.checkpoint");
    const cp = await ctl(kdc, data, ["audit", "checkpoint", "--out", checkpointFile]);
    expect(cp.code, cp.stderr).toBe(0);
  } finally {
    await kdc.stop();
  }
  needles = [...(await unsealIntermediates(data.dataDir, "acme")).flatMap(keyNeedles), ...(await addBulkSigningKeys(data.dataDir, BULK))];
}, 120_000);

afterAll(async () => {
  if (data !== undefined) await cleanup(data.dir);
});

describe("kmi kdc rekey (LevelDB, real processes)", () => {
  it("has no private key in plaintext in the store before", () => {
    expect(findInFiles(readTree(data.dataDir), needles)).toEqual([]);
  });

  it("killed with SIGKILL partway, leaves a store that opens with either key", async () => {
    const oldId = masterKeyId(oldKey);
    const r = await runRekey(data.dataDir, ["--batch-size", "1", "--progress"], true);
    expect(r.code, r.stderr).toBe("SIGKILL");
    expect(r.killedAt, r.stderr).toBeDefined();
    // Both key files are there, the old one unchanged and the new one 0600.
    expect(masterKeyId(await readMasterKeyFile(keyFile))).toBe(oldId);
    const next = await readMasterKeyFile(`${keyFile}.next`);
    expect((await stat(`${keyFile}.next`)).mode & 0o777).toBe(0o600);
    const seen = await openEverything(data.dataDir);
    expect(seen.byKey[oldId], JSON.stringify(seen.byKey)).toBeGreaterThan(0);
    expect(seen.byKey[masterKeyId(next)], JSON.stringify(seen.byKey)).toBeGreaterThan(0);
  }, 120_000);

  it("the KDC starts on the half-rewrapped store: CA renew and rotate, audit verify against the old checkpoint", async () => {
    const kdc = await startKdc(data.dataDir);
    try {
      const renew = await ctl(kdc, data, ["ca", "renew", "--tenant", "acme", "--version", "1", "--json"]);
      expect(renew.code, renew.stderr).toBe(0);
      const rotate = await ctl(kdc, data, ["ca", "rotate", "--tenant", "acme", "--activate", "--json"]);
      expect(rotate.code, rotate.stderr).toBe(0);
      const sk = await ctl(kdc, data, ["signing-key", "list", "--tenant", "acme", "--json"]);
      expect(sk.code, sk.stderr).toBe(0);
      expect(sk.stdout).toContain("bulk-01199");
      const verify = await ctl(kdc, data, ["audit", "verify", "--checkpoint", checkpointFile]);
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
    } finally {
      await kdc.stop();
    }
  }, 120_000);

  it("rekey run again resumes and finishes: the old key file is gone, every record is under the new key", async () => {
    const next = await readMasterKeyFile(`${keyFile}.next`);
    const r = await runRekey(data.dataDir, ["--json"]);
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { old_key_id: string; new_key_id: string; resumed: boolean; rewrapped: number; sealed_records: number };
    expect(out).toMatchObject({ old_key_id: masterKeyId(oldKey), new_key_id: masterKeyId(next), resumed: true });
    expect(out.rewrapped).toBeGreaterThan(0);
    expect(out.sealed_records).toBeGreaterThan(BULK);
    await expect(stat(`${keyFile}.next`)).rejects.toThrow(/ENOENT/);
    expect(masterKeyId(await readMasterKeyFile(keyFile))).toBe(masterKeyId(next));
    const seen = await openEverything(data.dataDir);
    expect(Object.keys(seen.byKey)).toEqual([masterKeyId(next)]);
    // The audit log's keys are still those of the first master key.
    expect(seen.hmacKey.equals(deriveAuditKey(oldKey))).toBe(true);
    expect(seen.checkpointKeyId).toBe(deriveCheckpointKey(oldKey).keyId);
    // The old key, in any form, is in no file of the data dir; no private key in plaintext either.
    const files = readTree(data.dataDir);
    expect(findInFiles(files, [{ name: "old master key", bytes: oldKey }, { name: "old master key base64", bytes: Buffer.from(oldKey.toString("base64")) }])).toEqual([]);
    expect(findInFiles(files, needles)).toEqual([]);
  }, 120_000);

  it("after the rotation: the KDC starts, audit verify passes, keyed hashes match the first key's, retire is audited", async () => {
    const kdc = await startKdc(data.dataDir);
    try {
      const verify = await ctl(kdc, data, ["audit", "verify", "--checkpoint", checkpointFile]);
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
      const rotate = await ctl(kdc, data, ["ca", "rotate", "--tenant", "acme", "--activate"]);
      expect(rotate.code, rotate.stderr).toBe(0);
    } finally {
      await kdc.stop();
    }
    const store = await openKdcStore(data.dataDir, false);
    try {
      const entries = (await store.list(AUDIT_LOG_TABLE)).records.map((r) => r.value);
      const init = entries.find((e) => e.action === "kdc.init");
      expect(init?.details["operator_token"]).toBe(keyedHash(deriveAuditKey(oldKey), data.token));
      const retire = entries.filter((e) => e.action === "master_key.retire");
      expect(retire).toHaveLength(1);
      expect(retire[0]!.target).toBe(`master-key/${masterKeyId(oldKey)}`);
      expect(entries.filter((e) => e.action === "master_key.rekey").map((e) => e.details["resumed"])).toEqual(["false", "true"]);
    } finally {
      await store.close();
    }
    expect((await readFile(keyFile, "utf8")).trim()).not.toBe(oldKey.toString("base64"));
  }, 120_000);
});
