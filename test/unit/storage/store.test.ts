import { join } from "node:path";
import { stat, writeFile } from "node:fs/promises";
import { create } from "@bufbuild/protobuf";
import { Level } from "level";
import { afterEach, describe, expect, it } from "vitest";
import { FailedPrecondition, InvalidArgument } from "../../../src/common/errors.js";
import { SealedBlobSchema } from "../../../src/gen/kmi/store/v1/envelope_pb.js";
import { StoreRecordSchema, type StoreRecord } from "../../../src/gen/kmi/store/v1/store_pb.js";
import { openLevelStore, type LevelStore, type LevelStoreOptions } from "../../../src/storage/level-store.js";
import {
  defineTable,
  delOp,
  normalizeRange,
  numericKey,
  parseNumericKey,
  prefixUpperBound,
  putOp,
  type BatchOp,
} from "../../../src/storage/store.js";
import { tempDir } from "./tmp-dir.js";

const Blobs = defineTable("blobs", SealedBlobSchema);
const Records = defineTable("records", StoreRecordSchema);

const blob = (aad: string) => create(SealedBlobSchema, { format: 1, aad });
const rec = (key: string) => create(StoreRecordSchema, { table: "t", key, value: new Uint8Array([1, 2, 3]) });

const open: LevelStore[] = [];
async function openStore(dir: string, options?: LevelStoreOptions): Promise<LevelStore> {
  const s = await openLevelStore(dir, { sync: false, ...options });
  open.push(s);
  return s;
}
afterEach(async () => {
  await Promise.all(open.splice(0).map((s) => s.close()));
});

async function all<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

describe("tables", () => {
  it("round-trips values, has/get of missing keys, and deletes", async () => {
    const store = await openStore(await tempDir());
    await store.batch([putOp(Blobs, "a", blob("x")), putOp(Records, "a", rec("k"))]);
    expect((await store.get(Blobs, "a"))?.aad).toBe("x");
    expect((await store.get(Records, "a"))?.key).toBe("k");
    expect(await store.has(Blobs, "a")).toBe(true);
    expect(await store.has(Blobs, "b")).toBe(false);
    expect(await store.get(Blobs, "b")).toBeUndefined();
    await store.batch([delOp(Blobs, "a")]);
    expect(await store.has(Blobs, "a")).toBe(false);
    expect(await store.has(Records, "a")).toBe(true);
  });

  it("iterates in numeric order with fixed-width keys, with ranges, prefix, reverse and limit", async () => {
    const store = await openStore(await tempDir());
    const ops: BatchOp[] = [];
    for (const n of [1, 2, 9, 10, 11, 100]) ops.push(putOp(Blobs, `t/${numericKey(n, 10)}`, blob(String(n))));
    ops.push(putOp(Blobs, "t0", blob("other")), putOp(Blobs, "u/1", blob("u")));
    await store.batch(ops);
    const aads = async (range: Parameters<LevelStore["iterate"]>[1]) =>
      (await all(store.iterate(Blobs, range))).map(([, v]) => v.aad);
    expect(await aads({ prefix: "t/" })).toEqual(["1", "2", "9", "10", "11", "100"]);
    expect(await aads({ prefix: "t/", reverse: true, limit: 2 })).toEqual(["100", "11"]);
    expect(await aads({ prefix: "t/", gt: `t/${numericKey(9, 10)}` })).toEqual(["10", "11", "100"]);
    expect(await aads({ prefix: "t/", lte: `t/${numericKey(10, 10)}` })).toEqual(["1", "2", "9", "10"]);
    expect(await aads({ gte: "t0" })).toEqual(["other", "u"]);
    expect(await aads({ limit: 0 })).toEqual([]);
  });

  it("refuses a second definition of a table with another message", async () => {
    const store = await openStore(await tempDir());
    await store.batch([putOp(Blobs, "a", blob("x"))]);
    const Clash = defineTable("blobs", StoreRecordSchema);
    await expect(store.get(Clash, "a")).rejects.toThrow(/defined with kmi.store.v1.StoreRecord but this store holds kmi.store.v1.SealedBlob/);
  });

  it.each([
    ["reserved name", () => defineTable("_meta", SealedBlobSchema), /table name/],
    ["upper case", () => defineTable("Blobs", SealedBlobSchema), /table name/],
    ["negative numeric key", () => numericKey(-1), /does not fit/],
    ["too wide numeric key", () => numericKey(123, 2), /does not fit/],
    ["unsafe number", () => numericKey(2 ** 60), /safe integer/],
  ])("refuses %s", (_name, fn, message) => {
    expect(fn).toThrow(InvalidArgument);
    expect(fn).toThrow(message);
  });

  it("makes fixed-width numeric keys that sort numerically and parse back", () => {
    expect(numericKey(42)).toBe("00000000000000000042");
    expect(numericKey(18446744073709551615n)).toBe("18446744073709551615");
    expect(parseNumericKey(numericKey(7n))).toBe(7n);
    const keys = [3, 30, 200, 1].map((n) => numericKey(n));
    expect([...keys].sort()).toEqual([1, 3, 30, 200].map((n) => numericKey(n)));
  });

  it("computes prefix upper bounds on code points", () => {
    expect(prefixUpperBound("ab")).toBe("ac");
    expect(prefixUpperBound("a\u{10ffff}")).toBe("b");
    expect(prefixUpperBound("a\ud7ff")).toBe("a\ue000");
    expect(prefixUpperBound("\u{10ffff}")).toBeUndefined();
    expect(normalizeRange({ prefix: "t/", gte: "t/5" })).toEqual({ gte: "t/5", lt: "t0" });
    expect(normalizeRange({ prefix: "t/", gte: "a" })).toEqual({ gte: "t/", lt: "t0" });
  });
});

describe("batch", () => {
  it("commits puts and deletes across two tables together", async () => {
    const store = await openStore(await tempDir());
    await store.batch([putOp(Blobs, "old", blob("old"))]);
    await store.batch([putOp(Blobs, "a", blob("a")), putOp(Records, "a", rec("a")), delOp(Blobs, "old")]);
    expect(await store.has(Blobs, "a")).toBe(true);
    expect(await store.has(Records, "a")).toBe(true);
    expect(await store.has(Blobs, "old")).toBe(false);
  });

  it.each<[string, BatchOp]>([
    ["a value of the wrong message", putOp(Records, "b", blob("wrong") as never)],
    ["an empty key", putOp(Records, "", rec("b"))],
    ["a lone surrogate in a key", putOp(Records, "x\ud800", rec("b"))],
    ["a key over 1024 bytes", putOp(Records, "k".repeat(1025), rec("b"))],
    ["a reserved table", { type: "put", table: { name: "_meta", schema: StoreRecordSchema }, key: "store", value: rec("b") }],
    ["an unknown op type", { type: "merge", table: Records, key: "b" } as unknown as BatchOp],
  ])("applies nothing when one op is invalid: %s", async (_name, bad) => {
    const store = await openStore(await tempDir());
    await store.batch([putOp(Blobs, "keep", blob("keep"))]);
    await expect(
      store.batch([putOp(Blobs, "b", blob("b")), delOp(Blobs, "keep"), bad, putOp(Records, "c", rec("c"))]),
    ).rejects.toThrow(InvalidArgument);
    expect(await store.has(Blobs, "b")).toBe(false);
    expect(await store.has(Blobs, "keep")).toBe(true);
    expect(await store.has(Records, "c")).toBe(false);
  });

  it("rejects every call with Unavailable once closed", async () => {
    const store = await openLevelStore(await tempDir(), { sync: false });
    await store.close();
    await store.close(); // idempotent
    await expect(store.get(Blobs, "a")).rejects.toThrow(/store is closed/);
    await expect(store.batch([putOp(Blobs, "a", blob("a"))])).rejects.toThrow(/store is closed/);
  });
});

describe("open", () => {
  it("keeps everything across close and reopen (with fsync on), in a data dir made 0700", async () => {
    const dir = join(await tempDir(), "data");
    const a = await openLevelStore(dir, { owner: "kdc" });
    expect((await stat(dir)).mode & 0o777).toBe(0o700);
    await a.batch([putOp(Blobs, "a", blob("a")), putOp(Records, "r", rec("r"))]);
    await a.close();
    const b = await openStore(dir, { owner: "kdc" });
    expect((await b.get(Blobs, "a"))?.aad).toBe("a");
    expect((await b.get(Records, "r"))?.key).toBe("r");
    expect(b.schemaVersion).toBe(1);
  });

  it("refuses a store written by a newer schema, naming both versions", async () => {
    const dir = await tempDir();
    await (await openLevelStore(dir, { schemaVersion: 3 })).close();
    const err = await openLevelStore(dir, { schemaVersion: 2 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FailedPrecondition);
    expect((err as Error).message).toMatch(/written by schema v3, newer than v2 that this kmi knows; run the newer kmi/);
    // The refusal released the lock: the right version still opens.
    await openStore(dir, { schemaVersion: 3 });
  });

  it("upgrades an older store step by step, committing each step's ops with its version bump", async () => {
    const dir = await tempDir();
    const v1 = await openLevelStore(dir, { schemaVersion: 1 });
    await v1.batch([putOp(Blobs, "a", blob("v1"))]);
    await v1.close();
    const steps: number[] = [];
    const store = await openStore(dir, {
      schemaVersion: 3,
      upgrade: async (s, from) => {
        steps.push(from);
        const old = await s.get(Blobs, "a");
        return [putOp(Blobs, "a", blob(`${old?.aad}>v${from + 1}`))];
      },
    });
    expect(steps).toEqual([1, 2]);
    expect((await store.get(Blobs, "a"))?.aad).toBe("v1>v2>v3");
    await store.close();
    // Already at v3: no step runs again.
    const again = await openStore(dir, { schemaVersion: 3, upgrade: async () => { throw new Error("must not run"); } });
    expect((await again.get(Blobs, "a"))?.aad).toBe("v1>v2>v3");
  });

  it("refuses an older store when no upgrade is registered", async () => {
    const dir = await tempDir();
    await (await openLevelStore(dir, { schemaVersion: 1 })).close();
    await expect(openLevelStore(dir, { schemaVersion: 2 })).rejects.toThrow(/schema v1, older than v2, and no upgrade is registered/);
  });

  it("says the data dir is locked when another opener holds it", async () => {
    const dir = await tempDir();
    await openStore(dir, { owner: "kdc" });
    await expect(openLevelStore(dir, { owner: "kdc" })).rejects.toThrow(
      `data dir ${dir} is locked by another process (is a kdc already running?)`,
    );
  });

  it("refuses another program's store, a foreign LevelDB, a missing store with create off, and a file", async () => {
    const dir = await tempDir();
    await (await openLevelStore(join(dir, "audit"), { owner: "audit" })).close();
    await expect(openLevelStore(join(dir, "audit"), { owner: "kdc" })).rejects.toThrow(/belongs to kmi audit, not kmi kdc/);

    const foreign = new Level(join(dir, "foreign"));
    await foreign.put("x", "y");
    await foreign.close();
    await expect(openLevelStore(join(dir, "foreign"))).rejects.toThrow(/not a kmi store/);

    await expect(openLevelStore(join(dir, "none"), { create: false, owner: "kdc" })).rejects.toThrow(
      /does not exist; run kmi kdc init first/,
    );
    await writeFile(join(dir, "file"), "x");
    await expect(openLevelStore(join(dir, "file"))).rejects.toThrow(/is not a directory/);
  });
});

describe("snapshot export and import", () => {
  it("exports one consistent snapshot (meta first) while writes go on, and restores it into an empty store", async () => {
    const src = await openStore(await tempDir(), { owner: "kdc" });
    const ops: BatchOp[] = [];
    for (let i = 0; i < 1200; i++) ops.push(putOp(Blobs, numericKey(i), blob(`b${i}`)), putOp(Records, numericKey(i), rec(`r${i}`)));
    // One commit holds at most MAX_TXN_OPS ops (etcd's limit, kept by every backend).
    for (let i = 0; i < ops.length; i += 120) await src.batch(ops.slice(i, i + 120));

    const exported: StoreRecord[] = [];
    let wroteDuring = false;
    for await (const r of src.exportSnapshot()) {
      exported.push(r);
      if (!wroteDuring) {
        // Written after the snapshot was taken: must not appear in the export.
        await src.batch([putOp(Blobs, "zz-late", blob("late")), delOp(Records, numericKey(5))]);
        wroteDuring = true;
      }
    }
    expect(exported[0]).toMatchObject({ table: "_meta", key: "store" });
    expect(exported.filter((r) => r.table === "blobs")).toHaveLength(1200);
    expect(exported.filter((r) => r.table === "records")).toHaveLength(1200);
    expect(exported.some((r) => r.key === "zz-late")).toBe(false);

    const dst = await openStore(await tempDir(), { owner: "kdc" });
    expect(await dst.importSnapshot(exported)).toEqual({ records: 2400 });
    expect((await dst.get(Blobs, numericKey(1199)))?.aad).toBe("b1199");
    expect((await dst.get(Records, numericKey(5)))?.key).toBe("r5");
    expect(await dst.has(Blobs, "zz-late")).toBe(false);

    // Into a store that holds data: refused, and nothing changes.
    await expect(src.importSnapshot(exported)).rejects.toThrow(/already holds records; restore into an empty data dir/);
  });

  it("refuses a newer backup before writing, and a restore cut short is refused at the next open", async () => {
    const dir = await tempDir();
    const v2 = await openStore(join(dir, "v2"), { schemaVersion: 2, upgrade: async () => {} });
    await v2.batch([putOp(Blobs, "a", blob("a")), putOp(Blobs, "b", blob("b"))]);
    const backup = await (async () => { const out: StoreRecord[] = []; for await (const r of v2.exportSnapshot()) out.push(r); return out; })();

    const v1 = await openStore(join(dir, "v1"), { schemaVersion: 1 });
    await expect(v1.importSnapshot(backup)).rejects.toThrow(/backup is schema v2, newer than v1/);
    await v1.close();
    await openStore(join(dir, "v1"), { schemaVersion: 1 }); // nothing was marked

    const target = join(dir, "cut");
    const store = await openLevelStore(target, { schemaVersion: 2, sync: false });
    async function* cutShort() {
      yield backup[0]!;
      yield backup[1]!;
      throw new Error("backup file truncated");
    }
    await expect(store.importSnapshot(cutShort())).rejects.toThrow(/truncated/);
    await store.close();
    await expect(openLevelStore(target, { schemaVersion: 2 })).rejects.toThrow(
      /holds an unfinished restore; delete the data dir and run the restore again/,
    );
  });
});
