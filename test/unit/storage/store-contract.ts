/**
 * The Store contract: what every backend (LevelDB, etcd) must do, as one suite that each
 * backend's test file runs with its own factory. Revisions, conditional batches, conflicts,
 * atomicity, limits, the change feed (order, replay, resync after compaction) and concurrent
 * conditional increments from two clients.
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import { AuditHeadRecordSchema } from "../../../src/gen/kmi/store/v1/audit_log_pb.js";
import { SealedBlobSchema } from "../../../src/gen/kmi/store/v1/envelope_pb.js";
import { retryOnConflict } from "../../../src/storage/retry.js";
import {
  Conflict,
  MAX_TXN_OPS,
  defineTable,
  delOp,
  numericKey,
  putOp,
  type FeedEvent,
  type Store,
} from "../../../src/storage/store.js";

/** Two clients of one fresh, empty store (LevelDB: one process, so the same instance twice). */
export interface ContractStores {
  a: Store;
  b: Store;
}

/** A backend under test. */
export interface ContractBackend {
  /** Opens a fresh, empty store; closed by the suite's caller. */
  fresh(): Promise<ContractStores>;
  /** Compacts the history before `revision` the backend's own way (etcdctl for etcd). */
  compactExternally?(revision: bigint): Promise<void>;
}

const Blobs = defineTable("blobs", SealedBlobSchema);
const Counters = defineTable("counters", AuditHeadRecordSchema);
const blob = (aad: string) => create(SealedBlobSchema, { format: 1, aad });
const counter = (seq: bigint) => create(AuditHeadRecordSchema, { format: 1, seq });

/** Collects a watch's events until `count` changes arrived (bounded by the abort of the caller). */
async function collect<V>(feed: AsyncIterable<FeedEvent<V>>, changes: number): Promise<FeedEvent<V>[]> {
  const out: FeedEvent<V>[] = [];
  let seen = 0;
  for await (const ev of feed) {
    out.push(ev);
    if (ev.type === "resync") break;
    seen += ev.changes.length;
    if (seen >= changes) break;
  }
  return out;
}

/** Registers the contract tests for `backend()` (called inside each test, after the caller's beforeAll). */
export function describeStoreContract(name: string, backend: () => ContractBackend): void {
  describe(`Store contract: ${name}`, () => {
    it("reads return the value, its mod revision and the store revision; an absent key reads as revision 0", async () => {
      const { a } = await backend().fresh();
      const absent = await a.read(Blobs, "k");
      expect(absent.value).toBeUndefined();
      expect(absent.modRevision).toBe(0n);
      const { revision } = await a.commit({ ops: [putOp(Blobs, "k", blob("one"))] });
      const r = await a.read(Blobs, "k");
      expect(r.value?.aad).toBe("one");
      expect(r.modRevision).toBe(revision);
      expect(r.revision).toBeGreaterThanOrEqual(revision);
      expect(await a.revision()).toBeGreaterThanOrEqual(revision);
    });

    it("revisions only grow: each commit gets a greater one, and only the keys it wrote move", async () => {
      const { a } = await backend().fresh();
      const revs: bigint[] = [];
      for (let i = 0; i < 5; i++) revs.push((await a.commit({ ops: [putOp(Blobs, `k${i % 2}`, blob(String(i)))] })).revision);
      for (let i = 1; i < revs.length; i++) expect(revs[i]!).toBeGreaterThan(revs[i - 1]!);
      expect((await a.read(Blobs, "k0")).modRevision).toBe(revs[4]);
      expect((await a.read(Blobs, "k1")).modRevision).toBe(revs[3]);
      await a.commit({ ops: [delOp(Blobs, "k1")] });
      expect((await a.read(Blobs, "k1")).modRevision).toBe(0n);
      const again = await a.commit({ ops: [putOp(Blobs, "k1", blob("back"))] });
      expect(again.revision).toBeGreaterThan(revs[4]!);
      expect((await a.read(Blobs, "k1")).modRevision).toBe(again.revision);
    });

    it("a conditional batch whose compare fails writes nothing and rejects with a retryable Conflict naming the key", async () => {
      const { a, b } = await backend().fresh();
      await a.commit({ ops: [putOp(Blobs, "k", blob("v1"))] });
      const seen = await a.read(Blobs, "k");
      await b.commit({ ops: [putOp(Blobs, "k", blob("v2"))] });
      const err = await a
        .commit({ compares: [{ table: Blobs, key: "k", modRevision: seen.modRevision }], ops: [putOp(Blobs, "k", blob("v3")), putOp(Blobs, "other", blob("x"))] })
        .catch((e: unknown) => e);
      expect(err).toBeInstanceOf(Conflict);
      expect((err as Conflict).code).toBe("aborted");
      expect((err as Conflict).keys).toEqual(["blobs/k"]);
      expect((await a.get(Blobs, "k"))?.aad).toBe("v2");
      expect(await a.has(Blobs, "other")).toBe(false);
      const fresh = await a.read(Blobs, "k");
      await a.commit({ compares: [{ table: Blobs, key: "k", modRevision: fresh.modRevision }], ops: [putOp(Blobs, "k", blob("v3"))] });
      expect((await b.get(Blobs, "k"))?.aad).toBe("v3");
    });

    it("compares on absence: the first create wins, the second conflicts", async () => {
      const { a, b } = await backend().fresh();
      const absent = { table: Blobs, key: "new", modRevision: 0n };
      await a.commit({ compares: [absent], ops: [putOp(Blobs, "new", blob("a"))] });
      await expect(b.commit({ compares: [absent], ops: [putOp(Blobs, "new", blob("b"))] })).rejects.toBeInstanceOf(Conflict);
      expect((await b.get(Blobs, "new"))?.aad).toBe("a");
    });

    it("names only the compares that failed", async () => {
      const { a } = await backend().fresh();
      const r1 = await a.commit({ ops: [putOp(Blobs, "x", blob("x")), putOp(Blobs, "y", blob("y"))] });
      await a.commit({ ops: [putOp(Blobs, "y", blob("y2"))] });
      const err = (await a
        .commit({ compares: [{ table: Blobs, key: "x", modRevision: r1.revision }, { table: Blobs, key: "y", modRevision: r1.revision }], ops: [putOp(Blobs, "z", blob("z"))] })
        .catch((e: unknown) => e)) as Conflict;
      expect(err.keys).toEqual(["blobs/y"]);
    });

    it("is atomic across tables, and an invalid op rejects the whole batch before anything is written", async () => {
      const { a, b } = await backend().fresh();
      const { revision } = await a.commit({ ops: [putOp(Blobs, "p", blob("p")), putOp(Counters, "c", counter(7n))] });
      expect((await b.read(Blobs, "p")).modRevision).toBe(revision);
      expect((await b.read(Counters, "c")).modRevision).toBe(revision);
      const bad = { type: "put", table: Blobs, key: "q", value: counter(1n) } as const;
      await expect(a.commit({ ops: [putOp(Blobs, "ok", blob("ok")), bad] })).rejects.toBeInstanceOf(InvalidArgument);
      expect(await b.has(Blobs, "ok")).toBe(false);
    });

    it.each([
      ["too many ops", () => ({ ops: Array.from({ length: MAX_TXN_OPS + 1 }, (_, i) => putOp(Blobs, `k${i}`, blob(""))) }), /more than 128/],
      ["one key twice", () => ({ ops: [putOp(Blobs, "k", blob("1")), delOp(Blobs, "k")] }), /written twice/],
      ["too many bytes", () => ({ ops: Array.from({ length: 3 }, (_, i) => putOp(Blobs, `k${i}`, blob("x".repeat(600_000)))) }), /bytes of keys and values/],
      ["a negative compare", () => ({ compares: [{ table: Blobs, key: "k", modRevision: -1n }], ops: [putOp(Blobs, "k", blob(""))] }), /non-negative/],
    ])("refuses %s with InvalidArgument (etcd's limits, on every backend)", async (_n, txn, message) => {
      const { a } = await backend().fresh();
      const err = await a.commit(txn()).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidArgument);
      expect((err as Error).message).toMatch(message);
      expect(await a.has(Blobs, "k0")).toBe(false);
    });

    it("lists with mod revisions at one store revision, across pages, forward and reverse", async () => {
      const { a } = await backend().fresh();
      for (let chunk = 0; chunk < 5; chunk++) {
        await a.commit({ ops: Array.from({ length: 120 }, (_, i) => putOp(Counters, numericKey(chunk * 120 + i, 4), counter(BigInt(chunk)))) });
      }
      const listed = await a.list(Counters);
      expect(listed.records.map((r) => r.key)).toEqual(Array.from({ length: 600 }, (_, i) => numericKey(i, 4)));
      expect(listed.records[599]!.modRevision).toBe(listed.revision);
      expect(listed.records[0]!.modRevision).toBeLessThan(listed.revision);
      const reverse = await a.list(Counters, { reverse: true, limit: 550, gte: "0010" });
      expect(reverse.records).toHaveLength(550);
      expect(reverse.records[0]!.key).toBe("0599");
      expect(reverse.records[549]!.key).toBe("0050");
      const keys: string[] = [];
      for await (const [k] of a.iterate(Counters, { prefix: "05" })) keys.push(k);
      expect(keys).toHaveLength(100);
    });

    it("watch delivers each commit's changes in commit order, filtered by table and prefix, deletes included", async () => {
      const { a, b } = await backend().fresh();
      const start = await a.revision();
      const ac = new AbortController();
      const got = collect(a.watch(Blobs, { prefix: "t/", fromRevision: start + 1n, signal: ac.signal }), 5);
      const revs: bigint[] = [];
      revs.push((await b.commit({ ops: [putOp(Blobs, "t/1", blob("1")), putOp(Blobs, "u/1", blob("not watched"))] })).revision);
      revs.push((await b.commit({ ops: [putOp(Counters, "t/1", counter(1n))] })).revision);
      revs.push((await b.commit({ ops: [putOp(Blobs, "t/2", blob("2")), putOp(Blobs, "t/3", blob("3"))] })).revision);
      revs.push((await b.commit({ ops: [delOp(Blobs, "t/1")] })).revision);
      revs.push((await b.commit({ ops: [putOp(Blobs, "t/1", blob("again"))] })).revision);
      const events = await got;
      ac.abort();
      expect(events.map((e) => (e.type === "changes" ? e.revision : -1n))).toEqual([revs[0], revs[2], revs[3], revs[4]]);
      const flat = events.flatMap((e) => (e.type === "changes" ? e.changes.map((c) => `${c.type}:${c.key}:${c.value?.aad ?? ""}:${c.modRevision === e.revision}`) : []));
      expect(flat).toEqual(["put:t/1:1:true", "put:t/2:2:true", "put:t/3:3:true", "del:t/1::true", "put:t/1:again:true"]);
    });

    it("a watch from a past revision replays the history from there, then follows live", async () => {
      const { a } = await backend().fresh();
      const first = await a.commit({ ops: [putOp(Blobs, "h/1", blob("1"))] });
      await a.commit({ ops: [putOp(Blobs, "h/2", blob("2"))] });
      const ac = new AbortController();
      const got = collect(a.watch(Blobs, { fromRevision: first.revision, signal: ac.signal }), 3);
      await a.commit({ ops: [putOp(Blobs, "h/3", blob("3"))] });
      const events = await got;
      ac.abort();
      expect(events.flatMap((e) => (e.type === "changes" ? e.changes.map((c) => c.key) : []))).toEqual(["h/1", "h/2", "h/3"]);
    });

    it("answers a watch from a compacted revision with resync, and watches from the compaction point on", async () => {
      const { a } = await backend().fresh();
      const old = await a.commit({ ops: [putOp(Blobs, "c/1", blob("1"))] });
      await a.commit({ ops: [putOp(Blobs, "c/2", blob("2"))] });
      const now = await a.commit({ ops: [putOp(Blobs, "c/3", blob("3"))] });
      const be = backend();
      if (be.compactExternally) await be.compactExternally(now.revision);
      else await a.compact(now.revision);
      const events = await collect(a.watch(Blobs, { fromRevision: old.revision }), 1);
      expect(events).toEqual([{ type: "resync", compactRevision: now.revision }]);
      // The relist-then-watch that a resync asks for.
      const listed = await a.list(Blobs);
      expect(listed.records.map((r) => r.key)).toEqual(["c/1", "c/2", "c/3"]);
      const ac = new AbortController();
      const got = collect(a.watch(Blobs, { fromRevision: listed.revision + 1n, signal: ac.signal }), 1);
      await a.commit({ ops: [putOp(Blobs, "c/4", blob("4"))] });
      const after = await got;
      ac.abort();
      expect(after.flatMap((e) => (e.type === "changes" ? e.changes.map((c) => c.key) : []))).toEqual(["c/4"]);
    });

    it("tells whether the history after a revision is kept (for a watcher to resume from it)", async () => {
      const { a, b } = await backend().fresh();
      const old = await a.commit({ ops: [putOp(Blobs, "k/1", blob("1"))] });
      const now = await a.commit({ ops: [putOp(Blobs, "k/2", blob("2"))] });
      expect(await a.keepsHistorySince(old.revision)).toBe(true);
      expect(await b.keepsHistorySince(now.revision)).toBe(true);
      expect(await a.keepsHistorySince(0n)).toBe(false);
      expect(await a.keepsHistorySince(now.revision + 1000n)).toBe(false);
      const be = backend();
      if (be.compactExternally) await be.compactExternally(now.revision);
      else await a.compact(now.revision);
      expect(await a.keepsHistorySince(old.revision)).toBe(false);
      expect(await b.keepsHistorySince(old.revision)).toBe(false);
      expect(await a.keepsHistorySince(now.revision)).toBe(true);
    });

    it("loses no update: parallel conditional increments of one counter from two clients all count", async () => {
      const { a, b } = await backend().fresh();
      const n = 24;
      let conflicts = 0;
      const increment = (s: Store) =>
        retryOnConflict(
          async () => {
            const cur = await s.read(Counters, "n");
            const next = (cur.value?.seq ?? 0n) + 1n;
            await s.commit({ compares: [{ table: Counters, key: "n", modRevision: cur.modRevision }], ops: [putOp(Counters, "n", counter(next))] });
          },
          { attempts: 100, onConflict: () => conflicts++ },
        );
      await Promise.all(Array.from({ length: n }, (_, i) => increment(i % 2 === 0 ? a : b)));
      expect((await a.get(Counters, "n"))?.seq).toBe(BigInt(n));
      // Interleaved read-check-writes did collide and were retried, not lost.
      expect(conflicts).toBeGreaterThan(0);
    });

    it("retryOnConflict gives up after its attempts with the last Conflict", async () => {
      const { a, b } = await backend().fresh();
      await a.commit({ ops: [putOp(Counters, "n", counter(0n))] });
      let runs = 0;
      const err = await retryOnConflict(
        async () => {
          runs++;
          const cur = await a.read(Counters, "n");
          await b.commit({ ops: [putOp(Counters, "n", counter(BigInt(runs)))] });
          await a.commit({ compares: [{ table: Counters, key: "n", modRevision: cur.modRevision }], ops: [putOp(Counters, "n", counter(99n))] });
        },
        { attempts: 3, baseMs: 1 },
      ).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(Conflict);
      expect(runs).toBe(3);
      expect((await a.get(Counters, "n"))?.seq).toBe(3n);
    });
  });
}
