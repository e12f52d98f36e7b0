import { randomBytes } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Level } from "level";
import { afterEach, describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import { AuditEntryRecordSchema } from "../../../src/gen/kmi/store/v1/audit_log_pb.js";
import { StoreRecordSchema } from "../../../src/gen/kmi/store/v1/store_pb.js";
import {
  AUDIT_HEAD_KEY,
  AUDIT_LOG_TABLE,
  AUDIT_META_TABLE,
  auditEntryHash,
  createAuditLog,
  deriveAuditKey,
  keyedHash,
  type AuditEntryInput,
} from "../../../src/storage/audit-log.js";
import { openLevelStore, type LevelStore } from "../../../src/storage/level-store.js";
import { Conflict, defineTable, delOp, numericKey, putOp } from "../../../src/storage/store.js";
import { tempDir } from "./tmp-dir.js";

const Items = defineTable("items", StoreRecordSchema);
const item = (key: string) => create(StoreRecordSchema, { table: "items", key, value: new Uint8Array([7]) });

const stores: LevelStore[] = [];
afterEach(async () => {
  await Promise.all(stores.splice(0).map((s) => s.close()));
});
async function openStore(dir: string) {
  const s = await openLevelStore(dir, { sync: false });
  stores.push(s);
  return s;
}

function fixedClock(start = Date.UTC(2025, 0, 2, 3, 4, 5, 678)) {
  let t = start;
  return { now: () => new Date((t += 1000)) };
}

const entry = (i: number): AuditEntryInput => ({
  actor: "token:0123456789abcdef",
  action: "ca.version.activate",
  target: `tenant/acme/version/${i}`,
  outcome: "ok",
  details: { version: String(i), previous: String(i - 1) },
});

/** Writes `n` entries into a fresh store, closes it and returns the dir. */
async function logWith(n: number): Promise<string> {
  const dir = await tempDir();
  const store = await openLevelStore(dir, { sync: false });
  const log = createAuditLog(store, { clock: fixedClock() });
  for (let i = 1; i <= n; i++) await log.append(entry(i), [putOp(Items, String(i), item(String(i)))]);
  await store.close();
  return dir;
}

/** Edits the raw LevelDB behind a closed store, the way an attacker with disk access would. */
async function tamper(dir: string, fn: (db: Level<string, Buffer>, seqKey: (n: number) => string) => Promise<void>) {
  const db = new Level<string, Buffer>(dir, { keyEncoding: "utf8", valueEncoding: "buffer" });
  await db.open();
  await fn(db, (n) => `!audit_log!${numericKey(n)}`);
  await db.close();
}

async function verifyDir(dir: string) {
  return createAuditLog(await openStore(dir)).verify();
}

describe("append", () => {
  it("chains entries: seq from 1, prev_hash = previous hash, head in the meta table, clock injected", async () => {
    const store = await openStore(await tempDir());
    const log = createAuditLog(store, { clock: fixedClock() });
    const a = await log.append(entry(1));
    const b = await log.append(entry(2), [putOp(Items, "2", item("2"))]);
    expect(a.seq).toBe(1n);
    expect(a.prevHash).toBe("0".repeat(64));
    expect(b.seq).toBe(2n);
    expect(b.prevHash).toBe(a.hash);
    expect(b.time.toISOString()).toBe("2025-01-02T03:04:07.678Z");
    expect(b.details).toEqual({ version: "2", previous: "1" });
    expect(await log.head()).toEqual({ seq: 2n, hash: b.hash });
    const head = await store.get(AUDIT_META_TABLE, AUDIT_HEAD_KEY);
    expect(Buffer.from(head!.hash).toString("hex")).toBe(b.hash);
    expect(await store.has(Items, "2")).toBe(true);
    expect(await log.verify()).toEqual({ ok: true, entries: 2, firstBadSeq: 0n, problem: "", headHash: b.hash });
  });

  it("keeps seq and chain consistent under 200 concurrent appends", async () => {
    const store = await openStore(await tempDir());
    const log = createAuditLog(store);
    const written = await Promise.all(
      Array.from({ length: 200 }, (_, i) => log.append(entry(i), [putOp(Items, String(i), item(String(i)))])),
    );
    expect(written.map((e) => e.seq).sort((x, y) => Number(x - y))).toEqual(Array.from({ length: 200 }, (_, i) => BigInt(i + 1)));
    expect(await log.verify()).toMatchObject({ ok: true, entries: 200 });
  });

  it("keeps one linear chain when two logs (no shared lock, as two replicas) append to one store at once", async () => {
    const store = await openStore(await tempDir());
    const [one, two] = [createAuditLog(store), createAuditLog(store)];
    const written = await Promise.all(Array.from({ length: 60 }, (_, i) => (i % 2 === 0 ? one : two).append(entry(i), [putOp(Items, String(i), item(String(i)))])));
    expect(written.map((e) => e.seq).sort((x, y) => Number(x - y))).toEqual(Array.from({ length: 60 }, (_, i) => BigInt(i + 1)));
    expect(await one.verify()).toMatchObject({ ok: true, entries: 60 });
  });

  it("gives the caller's failed compare back as a Conflict, writing neither the entry nor the change", async () => {
    const store = await openStore(await tempDir());
    const log = createAuditLog(store);
    const { revision } = await store.commit({ ops: [putOp(Items, "x", item("x"))] });
    await store.commit({ ops: [putOp(Items, "x", item("x2"))] });
    const err = await log.append(entry(1), [putOp(Items, "y", item("y"))], [{ table: Items, key: "x", modRevision: revision }]).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Conflict);
    expect((err as Conflict).keys).toEqual(["items/x"]);
    expect(await store.has(Items, "y")).toBe(false);
    expect(await log.head()).toEqual({ seq: 0n, hash: "" });
  });

  it("is fail-closed: when the batch is refused neither the entry nor the change is written", async () => {
    const store = await openStore(await tempDir());
    const log = createAuditLog(store);
    await log.append(entry(1));
    const bad = putOp(Items, "", item("x")); // invalid key: the whole batch is refused
    await expect(log.append(entry(2), [putOp(Items, "good", item("good")), bad])).rejects.toThrow(InvalidArgument);
    expect(await store.has(Items, "good")).toBe(false);
    expect(await log.head()).toMatchObject({ seq: 1n });
    // The chain goes on from the last entry that was written.
    expect((await log.append(entry(3))).seq).toBe(2n);
    expect(await log.verify()).toMatchObject({ ok: true, entries: 2 });
  });

  it("is fail-closed when the store cannot write: the change does not happen", async () => {
    const dir = await tempDir();
    const store = await openLevelStore(dir, { sync: false });
    const log = createAuditLog(store);
    await log.append(entry(1));
    await store.close();
    await expect(log.append(entry(2), [putOp(Items, "after-close", item("x"))])).rejects.toThrow(/store is closed/);
    const again = await openStore(dir);
    expect(await again.has(Items, "after-close")).toBe(false);
    expect(await createAuditLog(again).verify()).toMatchObject({ ok: true, entries: 1 });
  });

  it.each<[string, AuditEntryInput, unknown[], RegExp]>([
    ["an empty actor", { ...entry(1), actor: "" }, [], /actor: must be 1 to 256 bytes/],
    ["an empty outcome", { ...entry(1), outcome: "" }, [], /outcome: must be 1 to 256 bytes/],
    ["a huge detail", { ...entry(1), details: { x: "y".repeat(5000) } }, [], /details\[x\]: must be 0 to 4096 bytes/],
    ["a change op on the audit log", entry(1), [delOp(AUDIT_LOG_TABLE, numericKey(1))], /may not write the audit tables \(audit_log\)/],
    ["a change op on the head", entry(1), [delOp(AUDIT_META_TABLE, "head")], /may not write the audit tables \(audit_meta\)/],
  ])("refuses %s", async (_name, input, ops, message) => {
    const store = await openStore(await tempDir());
    const log = createAuditLog(store);
    await expect(log.append(input, ops as never)).rejects.toThrow(message);
    expect(await log.head()).toEqual({ seq: 0n, hash: "" });
  });
});

describe("tail", () => {
  it("returns the first, the after-seq and the last entries, oldest first", async () => {
    const store = await openStore(await tempDir());
    const log = createAuditLog(store);
    for (let i = 1; i <= 12; i++) await log.append(entry(i));
    const seqs = async (o: Parameters<typeof log.tail>[0]) => (await log.tail(o)).map((e) => Number(e.seq));
    expect(await seqs({ limit: 3 })).toEqual([1, 2, 3]);
    expect(await seqs({ afterSeq: 10 })).toEqual([11, 12]);
    expect(await seqs({ last: true, limit: 3 })).toEqual([10, 11, 12]);
    expect(await seqs({ afterSeq: 8n, last: true, limit: 10 })).toEqual([9, 10, 11, 12]);
    await expect(log.tail({ limit: 0 })).rejects.toThrow(/limit: must be 1 to 1000/);
  });
});

describe("verify", () => {
  it("passes on an untouched log, reporting the head hash", async () => {
    const dir = await logWith(6);
    const result = await verifyDir(dir);
    expect(result).toMatchObject({ ok: true, entries: 6, firstBadSeq: 0n, problem: "" });
    expect(result.headHash).toMatch(/^[0-9a-f]{64}$/);
  });

  it("passes on an empty log", async () => {
    expect(await verifyDir(await tempDir())).toEqual({ ok: true, entries: 0, firstBadSeq: 0n, problem: "", headHash: "" });
  });

  it("finds an edited entry (a field changed in the raw LevelDB value)", async () => {
    const dir = await logWith(6);
    await tamper(dir, async (db, k) => {
      const record = fromBinary(AuditEntryRecordSchema, (await db.get(k(4)))!);
      record.outcome = "refused: permission_denied";
      await db.put(k(4), Buffer.from(toBinary(AuditEntryRecordSchema, record)));
    });
    expect(await verifyDir(dir)).toMatchObject({ ok: false, entries: 3, firstBadSeq: 4n, problem: "hash mismatch (entry edited)" });
  });

  it("finds an edited entry whose hash was recomputed too (the next link breaks)", async () => {
    const dir = await logWith(6);
    await tamper(dir, async (db, k) => {
      const record = fromBinary(AuditEntryRecordSchema, (await db.get(k(4)))!);
      record.details = { ...record.details, version: "99" };
      record.hash = auditEntryHash(record);
      await db.put(k(4), Buffer.from(toBinary(AuditEntryRecordSchema, record)));
    });
    expect(await verifyDir(dir)).toMatchObject({ ok: false, firstBadSeq: 5n, problem: expect.stringMatching(/^prev-hash break/) });
  });

  it("finds a value that no longer decodes", async () => {
    const dir = await logWith(4);
    await tamper(dir, async (db, k) => db.put(k(2), Buffer.from([0xff, 0xff, 0xff])));
    expect(await verifyDir(dir)).toMatchObject({ ok: false, firstBadSeq: 2n, problem: "entry 2 does not decode (edited or corrupt)" });
  });

  it("finds an entry deleted in the middle", async () => {
    const dir = await logWith(6);
    await tamper(dir, async (db, k) => db.del(k(3)));
    expect(await verifyDir(dir)).toMatchObject({ ok: false, entries: 2, firstBadSeq: 3n, problem: "gap: seq 3 missing (entry dropped)" });
  });

  it("finds the last entry deleted (through the head record)", async () => {
    const dir = await logWith(6);
    await tamper(dir, async (db, k) => db.del(k(6)));
    expect(await verifyDir(dir)).toMatchObject({
      ok: false,
      entries: 5,
      firstBadSeq: 6n,
      problem: "log ends at seq 5 but the head says 6: the last entries were dropped",
    });
  });

  it("finds the last entry replaced by a re-chained forgery (head hash mismatch)", async () => {
    const dir = await logWith(6);
    await tamper(dir, async (db, k) => {
      const record = fromBinary(AuditEntryRecordSchema, (await db.get(k(6)))!);
      record.actor = "system";
      record.hash = auditEntryHash(record);
      await db.put(k(6), Buffer.from(toBinary(AuditEntryRecordSchema, record)));
    });
    expect(await verifyDir(dir)).toMatchObject({ ok: false, firstBadSeq: 6n, problem: expect.stringMatching(/^head hash does not match entry 6/) });
  });

  it("finds two entries swapped", async () => {
    const dir = await logWith(6);
    await tamper(dir, async (db, k) => {
      const [three, four] = [(await db.get(k(3)))!, (await db.get(k(4)))!];
      await db.batch([{ type: "put", key: k(3), value: four }, { type: "put", key: k(4), value: three }]);
    });
    expect(await verifyDir(dir)).toMatchObject({
      ok: false,
      entries: 2,
      firstBadSeq: 3n,
      problem: "entry stored as seq 3 says it is seq 4 (entries reordered or moved)",
    });
  });

  it("finds two entries swapped with their seq fields rewritten to fit", async () => {
    const dir = await logWith(6);
    await tamper(dir, async (db, k) => {
      const three = fromBinary(AuditEntryRecordSchema, (await db.get(k(3)))!);
      const four = fromBinary(AuditEntryRecordSchema, (await db.get(k(4)))!);
      [three.seq, four.seq] = [4n, 3n];
      await db.put(k(3), Buffer.from(toBinary(AuditEntryRecordSchema, four)));
      await db.put(k(4), Buffer.from(toBinary(AuditEntryRecordSchema, three)));
    });
    expect(await verifyDir(dir)).toMatchObject({ ok: false, firstBadSeq: 3n, problem: "hash mismatch (entry edited)" });
  });
});

describe("hashing", () => {
  it("encodes unambiguously: moving bytes between fields or details changes the hash", () => {
    const base = create(AuditEntryRecordSchema, { format: 1, seq: 1n, actor: "ab", action: "c", target: "", outcome: "ok", prevHash: new Uint8Array(32) });
    const moved = create(AuditEntryRecordSchema, { ...base, actor: "a", action: "bc" });
    const d1 = create(AuditEntryRecordSchema, { ...base, details: { a: "bc" } });
    const d2 = create(AuditEntryRecordSchema, { ...base, details: { ab: "c" } });
    const hex = (r: typeof base) => Buffer.from(auditEntryHash(r)).toString("hex");
    expect(hex(base)).not.toBe(hex(moved));
    expect(hex(d1)).not.toBe(hex(d2));
    // Detail order does not matter (sorted), the values do.
    const o1 = create(AuditEntryRecordSchema, { ...base, details: { x: "1", y: "2" } });
    const o2 = create(AuditEntryRecordSchema, { ...base, details: { y: "2", x: "1" } });
    expect(hex(o1)).toBe(hex(o2));
  });

  it("matches the encoding written down in audit_log.proto (vector computed independently, in Python)", () => {
    const record = create(AuditEntryRecordSchema, {
      format: 1,
      seq: 7n,
      time: { seconds: 1735787045n, nanos: 678_000_000 },
      actor: "token:0123456789abcdef",
      action: "ca.version.activate",
      target: "tenant/acme/version/3",
      outcome: "ok",
      // U+FF5A sorts before U+1F600 by UTF-8 bytes (the specified order) but after it by
      // UTF-16 code units (JavaScript's default sort), so this vector tells the two apart.
      details: { "\u{1f600}": "x", "\uff5a": "1", version: "3" },
      prevHash: Uint8Array.from({ length: 32 }, (_, i) => i),
    });
    expect(Buffer.from(auditEntryHash(record)).toString("hex")).toBe(
      "633b68b64000e3010df15ceee51e6b0c7b3581e2f5df65cd1cb0e4445d9228f6",
    );
  });

  it("keyed-hashes sensitive values under a key derived from the master key", () => {
    const master = randomBytes(32);
    const auditKey = deriveAuditKey(master);
    expect(auditKey).toHaveLength(32);
    expect(auditKey.equals(master)).toBe(false);
    expect(deriveAuditKey(master).equals(auditKey)).toBe(true);
    const h = keyedHash(auditKey, "kmi_0123456789abcdef_secret");
    expect(h).toMatch(/^hmac:[0-9a-f]{32}$/);
    expect(keyedHash(auditKey, "kmi_0123456789abcdef_secret")).toBe(h);
    expect(keyedHash(deriveAuditKey(randomBytes(32)), "kmi_0123456789abcdef_secret")).not.toBe(h);
    // HKDF-SHA256, info "kmi audit hmac v1", no salt, for an all-zero master key; the value is from
    // `openssl kdf -keylen 32 -kdfopt digest:SHA256 -kdfopt hexkey:00…00 -kdfopt info:"kmi audit hmac v1" HKDF`.
    expect(deriveAuditKey(new Uint8Array(32)).toString("hex")).toBe("b4bf6b3a1e99fe7a8360da47f2f8b1e9ec31c2bfc626fc24690bafddc6d672b1");
  });
});
