import { afterEach, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { SealedBlobSchema } from "../../../src/gen/kmi/store/v1/envelope_pb.js";
import { openLevelStore, type LevelStore } from "../../../src/storage/level-store.js";
import { defineTable, putOp, type FeedEvent } from "../../../src/storage/store.js";
import { describeStoreContract } from "./store-contract.js";
import { tempDir } from "./tmp-dir.js";

const open: LevelStore[] = [];
afterEach(async () => {
  await Promise.all(open.splice(0).map((s) => s.close()));
});

async function openStore(dir: string, feedRetention?: number): Promise<LevelStore> {
  const s = await openLevelStore(dir, { sync: false, ...(feedRetention ? { feedRetention } : {}) });
  open.push(s);
  return s;
}

describeStoreContract("LevelDB", () => ({
  async fresh() {
    const s = await openStore(await tempDir());
    // One process owns a LevelDB: the "two clients" are one instance.
    return { a: s, b: s };
  },
}));

const Blobs = defineTable("blobs", SealedBlobSchema);
const blob = (aad: string) => create(SealedBlobSchema, { format: 1, aad });

describe("LevelDB revisions and change log", () => {
  it("keeps revisions, the change log and the compaction point across a reopen; a watch resumes from before it", async () => {
    const dir = await tempDir();
    const s1 = await openStore(dir);
    const r1 = await s1.commit({ ops: [putOp(Blobs, "a", blob("1"))] });
    const r2 = await s1.commit({ ops: [putOp(Blobs, "b", blob("2"))] });
    await s1.close();
    const s2 = await openStore(dir);
    expect(await s2.revision()).toBe(r2.revision);
    expect((await s2.read(Blobs, "a")).modRevision).toBe(r1.revision);
    const r3 = await s2.commit({ ops: [putOp(Blobs, "c", blob("3"))] });
    expect(r3.revision).toBe(r2.revision + 1n);
    const got: string[] = [];
    for await (const ev of s2.watch(Blobs, { fromRevision: r1.revision })) {
      if (ev.type === "changes") got.push(...ev.changes.map((c) => c.key));
      if (got.length === 3) break;
    }
    expect(got).toEqual(["a", "b", "c"]);
  });

  it("bounds the change log: a watch from before the retained window gets resync", async () => {
    const s = await openStore(await tempDir(), 3);
    const first = await s.commit({ ops: [putOp(Blobs, "k", blob("0"))] });
    let last = first.revision;
    for (let i = 1; i <= 5; i++) last = (await s.commit({ ops: [putOp(Blobs, "k", blob(String(i)))] })).revision;
    const events: FeedEvent<unknown>[] = [];
    for await (const ev of s.watch(Blobs, { fromRevision: first.revision })) {
      events.push(ev);
      break;
    }
    expect(events).toEqual([{ type: "resync", compactRevision: last - 2n }]);
    const kept: bigint[] = [];
    for await (const ev of s.watch(Blobs, { fromRevision: last - 2n })) {
      if (ev.type === "changes") kept.push(ev.revision);
      if (kept.length === 3) break;
    }
    expect(kept).toEqual([last - 2n, last - 1n, last]);
  });

  it("ends a watch with Unavailable when the store closes", async () => {
    const s = await openStore(await tempDir());
    const it = s.watch(Blobs)[Symbol.asyncIterator]();
    const next = it.next().then(
      () => undefined,
      (e: unknown) => e,
    );
    await new Promise((r) => setTimeout(r, 20));
    await s.close();
    expect(String(await next)).toMatch(/store is closed/);
  });

  it("reads a record written before revisions existed as revision 1, and the first commit after as 2", async () => {
    const dir = await tempDir();
    const s1 = await openStore(dir);
    await s1.commit({ ops: [putOp(Blobs, "old", blob("legacy"))] });
    await s1.close();
    // Make the dir look like an older kmi's: no revision bookkeeping.
    const { Level } = await import("level");
    const raw = new Level<string, Buffer>(dir, { keyEncoding: "utf8", valueEncoding: "buffer" });
    for (const sub of ["_state", "_rev", "_log"]) await raw.sublevel(sub).clear();
    await raw.close();
    const s2 = await openStore(dir);
    expect((await s2.read(Blobs, "old")).modRevision).toBe(1n);
    const r = await s2.commit({ compares: [{ table: Blobs, key: "old", modRevision: 1n }], ops: [putOp(Blobs, "old", blob("new"))] });
    expect(r.revision).toBe(2n);
  });
});
