/**
 * The master keyring (storage/keyring.ts), the pinned log keys (storage/log-keys.ts) and the
 * rewrap engine (storage/rekey.ts) on a real LevelStore: which key seals and opens what, a
 * concurrent write during a rekey batch that must win, and refusals.
 */
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { readdir, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterEach, describe, expect, it } from "vitest";
import { FailedPrecondition, InvalidArgument } from "../../../src/common/errors.js";
import { SigningKeyRecordSchema, TokenRecordSchema } from "../../../src/gen/kmi/store/v1/kdc_pb.js";
import { AuditLog, deriveAuditKey } from "../../../src/storage/audit-log.js";
import { deriveCheckpointKey } from "../../../src/storage/audit-checkpoint.js";
import { MasterKeyring, loadMasterKeyring, nextKeyFile } from "../../../src/storage/keyring.js";
import { openLevelStore, type LevelStore } from "../../../src/storage/level-store.js";
import { loadLogKeys } from "../../../src/storage/log-keys.js";
import { createMasterKeyFile, readMasterKeyFile } from "../../../src/storage/master-key.js";
import { rekeyStore, sealedTables } from "../../../src/storage/rekey.js";
import { SealError, masterKeyId } from "../../../src/storage/seal.js";
import { AUDIT_LOG_TABLE } from "../../../src/storage/audit-log.js";
import { defineTable, putOp, type Store, type Txn } from "../../../src/storage/store.js";
import { tempDir } from "./tmp-dir.js";

const things = defineTable("things", SigningKeyRecordSchema);
const plain = defineTable("plain", TokenRecordSchema);
const stores: LevelStore[] = [];
afterEach(async () => {
  await Promise.all(stores.splice(0).map((s) => s.close()));
});

async function setup(n: number) {
  const dir = await tempDir();
  const keyFile = join(dir, "master.key");
  const { key } = await createMasterKeyFile(keyFile);
  const store = await openLevelStore(join(dir, "store"), { sync: false });
  stores.push(store);
  const ring = new MasterKeyring(key);
  await store.batch(Array.from({ length: n }, (_, i) => putOp(things, `t${i}`, thing(ring, i))));
  return { dir, keyFile, key, store };
}

function thing(ring: MasterKeyring, i: number, reason = "") {
  return create(SigningKeyRecordSchema, { recordVersion: 1, name: `t${i}`, revokeReason: reason, privateKey: ring.seal(Buffer.from(`secret ${i}`), `things/t${i}`) });
}

describe("MasterKeyring", () => {
  it("seals under the next key and opens under either; an unknown key is refused naming it", () => {
    const [a, b, c] = [randomBytes(32), randomBytes(32), randomBytes(32)];
    const old = new MasterKeyring(a).seal(Buffer.from("x"), "r/1");
    const ring = new MasterKeyring(a, b);
    const sealed = ring.seal(Buffer.from("y"), "r/2");
    expect([old.masterKeyId, sealed.masterKeyId]).toEqual([masterKeyId(a), masterKeyId(b)]);
    expect(Buffer.from(ring.open(old, "r/1")).toString()).toBe("x");
    expect(Buffer.from(ring.open(sealed, "r/2")).toString()).toBe("y");
    const stranger = new MasterKeyring(c).seal(Buffer.from("z"), "r/3");
    expect(() => ring.open(stranger, "r/3")).toThrow(SealError);
    expect(() => ring.open(stranger, "r/3")).toThrow(masterKeyId(c));
  });

  it("learns a next key a rekey made after it was loaded, from the file beside the key file", async () => {
    const dir = await tempDir();
    const keyFile = join(dir, "master.key");
    await createMasterKeyFile(keyFile);
    const ring = await loadMasterKeyring({}, "KMI_TEST_MASTER_KEY", keyFile);
    const { key: next } = await createMasterKeyFile(nextKeyFile(keyFile));
    const blob = new MasterKeyring(next).seal(Buffer.from("new"), "r/1");
    expect(Buffer.from(ring.open(blob, "r/1")).toString()).toBe("new");
    expect(ring.sealingId).toBe(masterKeyId(next));
  });

  it("seals under the next key only once it met a record under it (a prepared file alone changes nothing), and under the rotated key once the rekey ended, never the old one", async () => {
    const dir = await tempDir();
    const keyFile = join(dir, "master.key");
    const { id: oldId } = await createMasterKeyFile(keyFile);
    const ring = await loadMasterKeyring({}, "KMI_TEST_MASTER_KEY", keyFile);
    expect(ring.seal(Buffer.from("a"), "r/1").masterKeyId).toBe(oldId);
    // `kmi kdc rekey --prepare` (or a rekey that has not rewrapped anything yet): still the old key,
    // so replicas on hosts that have no copy of the file yet can open what this one writes.
    const { key: next, id: nextId } = await createMasterKeyFile(nextKeyFile(keyFile));
    expect(ring.seal(Buffer.from("b"), "r/2").masterKeyId).toBe(oldId);
    // The rekey proper: a record under the next key is met.
    ring.open(new MasterKeyring(next).seal(Buffer.from("moved"), "r/0"), "r/0");
    expect(ring.seal(Buffer.from("c"), "r/3").masterKeyId).toBe(nextId);
    await rename(nextKeyFile(keyFile), keyFile);
    const after = ring.seal(Buffer.from("d"), "r/4");
    expect(after.masterKeyId).toBe(nextId);
    // A later rotation that ended before this ring opened or sealed anything: the key file alone names the key.
    const { id: thirdId } = await createMasterKeyFile(nextKeyFile(keyFile));
    await rename(nextKeyFile(keyFile), keyFile);
    expect(ring.seal(Buffer.from("e"), "r/5").masterKeyId).toBe(thirdId);
    expect(Buffer.from(ring.open(after, "r/4")).toString()).toBe("d");
  });

  it("a key file changed into something unreadable fails the seal without naming the file", async () => {
    const dir = await tempDir();
    const keyFile = join(dir, "master.key");
    await createMasterKeyFile(keyFile);
    const ring = await loadMasterKeyring({}, "KMI_TEST_MASTER_KEY", keyFile);
    ring.seal(Buffer.from("a"), "r/1");
    await writeFile(keyFile, "not a key", { mode: 0o600 });
    expect(() => ring.seal(Buffer.from("b"), "r/2")).toThrow(SealError);
    expect(() => ring.seal(Buffer.from("b"), "r/2")).not.toThrow(new RegExp(dir));
  });

  it("refuses a next key file others can read", async () => {
    const dir = await tempDir();
    const keyFile = join(dir, "master.key");
    await createMasterKeyFile(keyFile);
    await writeFile(nextKeyFile(keyFile), randomBytes(32).toString("base64"), { mode: 0o644 });
    await expect(loadMasterKeyring({}, "KMI_TEST_MASTER_KEY", keyFile)).rejects.toThrow(/chmod 600/);
  });
});

describe("rekeyStore", () => {
  it("sweeps once more after retiring the old key: a record a replica sealed under it meanwhile is rewrapped", async () => {
    const { keyFile, key, store } = await setup(3);
    const replica = new MasterKeyring(key); // a server that never saw the rotation
    let sawNext = false;
    let injected = false;
    // The store as the rekey sees it: once the next key file has come and gone (renamed), a
    // replica writes a record under the old key before the rekey lists again.
    const watched = new Proxy(store, {
      get(target, prop) {
        const value = Reflect.get(target, prop, target) as unknown;
        if (prop !== "list") return typeof value === "function" ? (value as (...a: unknown[]) => unknown).bind(target) : value;
        return async (...args: Parameters<LevelStore["list"]>) => {
          if (existsSync(nextKeyFile(keyFile))) sawNext = true;
          else if (sawNext && !injected) {
            injected = true;
            await target.batch([putOp(things, "late", thing(replica, 99))]);
          }
          return target.list(...args);
        };
      },
    });
    const r = await rekeyStore({ store: watched, tables: [things], keyFile, audit: new AuditLog(store), actor: "system:test" });
    expect(injected).toBe(true);
    const late = (await store.get(things, "late"))!;
    expect(late.privateKey!.masterKeyId).toBe(r.newKeyId);
    const ring = await loadMasterKeyring({}, "KMI_TEST_MASTER_KEY", keyFile);
    expect(Buffer.from(ring.open(late.privateKey!, "things/t99")).toString()).toBe("secret 99");
  });

  it("rewraps every sealed record, pins the log keys of the first key, audits, and retires the old key file", async () => {
    const { dir, keyFile, key, store } = await setup(10);
    await store.batch([putOp(plain, "p", create(TokenRecordSchema, { tokenId: "p" }))]);
    const progress: string[] = [];
    const r = await rekeyStore({ store, tables: [things, plain], keyFile, audit: new AuditLog(store), actor: "system:test", batchSize: 3, onProgress: (d, t, p) => progress.push(`${p}:${d}/${t}`) });
    // 10 things + the pinned log keys; batches of 3; the second pass verifies; a third sweeps after the rename.
    expect(r).toMatchObject({ oldKeyId: masterKeyId(key), resumed: false, passes: 3, rewrapped: 11, sealedRecords: 11 });
    expect(progress).toEqual(["1:0/11", "1:3/11", "1:6/11", "1:9/11", "1:11/11"]);
    const newKey = await readMasterKeyFile(keyFile);
    expect(masterKeyId(newKey)).toBe(r.newKeyId);
    expect((await readdir(dir)).sort()).toEqual(["master.key", "store"]);
    const ring = new MasterKeyring(newKey);
    for (let i = 0; i < 10; i++) expect(Buffer.from(ring.open((await store.get(things, `t${i}`))!.privateKey!, `things/t${i}`)).toString()).toBe(`secret ${i}`);
    const logKeys = await loadLogKeys(store, ring);
    expect(logKeys.hmacKey.equals(deriveAuditKey(key))).toBe(true);
    expect(logKeys.checkpointKey.keyId).toBe(deriveCheckpointKey(key).keyId);
    const actions = (await store.list(AUDIT_LOG_TABLE)).records.map((e) => `${e.value.action} ${e.value.target}`);
    expect(actions).toEqual([`master_key.rekey master-key/${r.newKeyId}`, `master_key.retire master-key/${r.oldKeyId}`]);
    expect(sealedTables([things, plain]).map((t) => t.name)).toEqual(["things", "log_keys"]);
  });

  it("a write that lands between the listing and the batch wins: the batch is read again and retried", async () => {
    const { keyFile, key, store } = await setup(4);
    let raced = false;
    const racing: Store = {
      get: (t, k) => store.get(t, k),
      read: (t, k) => store.read(t, k),
      has: (t, k) => store.has(t, k),
      iterate: (t, r) => store.iterate(t, r),
      list: (t, r) => store.list(t, r),
      batch: (ops) => store.batch(ops),
      revision: () => store.revision(),
      watch: (t, o) => store.watch(t, o),
      compact: (r) => store.compact(r),
      keepsHistorySince: (r) => store.keepsHistorySince(r),
      close: () => store.close(),
      commit: async (txn: Txn) => {
        if (!raced && txn.ops.some((op) => op.table.name === "things")) {
          raced = true; // another replica revokes t1 with the old key, after the rekey listed it
          await store.batch([putOp(things, "t1", thing(new MasterKeyring(key), 1, "revoked meanwhile"))]);
        }
        return store.commit(txn);
      },
    };
    const r = await rekeyStore({ store: racing, tables: [things], keyFile, audit: new AuditLog(store), actor: "system:test", batchSize: 2 });
    expect(raced).toBe(true);
    const t1 = (await store.get(things, "t1"))!;
    expect(t1.revokeReason).toBe("revoked meanwhile");
    expect(t1.privateKey!.masterKeyId).toBe(r.newKeyId);
  });

  it("with prepareOnly makes the next key and rewraps nothing; the rekey after it takes that key up", async () => {
    const { keyFile, key, store } = await setup(3);
    const audit = new AuditLog(store);
    const prepared = await rekeyStore({ store, tables: [things], keyFile, audit, actor: "a", prepareOnly: true });
    expect(prepared).toMatchObject({ prepared: true, oldKeyId: masterKeyId(key), rewrapped: 0 });
    expect(masterKeyId(await readMasterKeyFile(nextKeyFile(keyFile)))).toBe(prepared.newKeyId);
    expect((await store.get(things, "t0"))!.privateKey!.masterKeyId).toBe(masterKeyId(key));
    const done = await rekeyStore({ store, tables: [things], keyFile, audit, actor: "a" });
    expect(done).toMatchObject({ prepared: false, resumed: true, newKeyId: prepared.newKeyId, rewrapped: 4 });
  });

  it("a record that does not open stops the rekey before the old key is retired", async () => {
    const { keyFile, key, store } = await setup(3);
    const bad = (await store.get(things, "t2"))!;
    bad.privateKey!.ciphertext[0]! ^= 1;
    await store.batch([putOp(things, "t2", bad)]);
    await expect(rekeyStore({ store, tables: [things], keyFile, audit: new AuditLog(store), actor: "a" })).rejects.toThrow(SealError);
    expect(masterKeyId(await readMasterKeyFile(keyFile))).toBe(masterKeyId(key));
    expect((await store.list(AUDIT_LOG_TABLE)).records.map((e) => e.value.action)).not.toContain("master_key.retire");
  });

  it("resumes with the next key a stopped rekey left, and refuses a bad batch size or a next key equal to the key", async () => {
    const { keyFile, store } = await setup(2);
    const { key: next } = await createMasterKeyFile(nextKeyFile(keyFile));
    const audit = new AuditLog(store);
    await expect(rekeyStore({ store, tables: [things], keyFile, audit, actor: "a", batchSize: 0 })).rejects.toThrow(InvalidArgument);
    const r = await rekeyStore({ store, tables: [things], keyFile, audit, actor: "a" });
    expect(r).toMatchObject({ resumed: true, newKeyId: masterKeyId(next) });
    await writeFile(nextKeyFile(keyFile), next.toString("base64"), { mode: 0o600 });
    await expect(rekeyStore({ store, tables: [things], keyFile, audit, actor: "a" })).rejects.toThrow(FailedPrecondition);
  });
});
