/**
 * Row 6: the store. Conditional batches per second — the read-check-write every change of kmi
 * is: a read with its revision, then a commit conditional on that revision — on LevelDB (a temp
 * dir, fsync on each commit, as the servers run it) and on a 3-member etcd cluster on loopback
 * (TLS with client certificates), in the same run, at 1 and 16 in flight; etcd against LevelDB
 * as a ratio.
 */
import { create } from "@bufbuild/protobuf";
import { AuditHeadRecordSchema } from "../../src/gen/kmi/store/v1/audit_log_pb.js";
import { openEtcdStore } from "../../src/storage/etcd-store.js";
import { openLevelStore } from "../../src/storage/level-store.js";
import { defineTable, putOp, type Store } from "../../src/storage/store.js";
import type { Env } from "../lib/env.js";
import { startEtcdCluster } from "../lib/etcd.js";
import { closedLoop, type LoopResult } from "../lib/loop.js";
import { RowBuilder, type Figure } from "../lib/results.js";
import { fmt } from "../lib/stats.js";
import { ROW_TITLES } from "./titles.js";

const Counters = defineTable("bench_counters", AuditHeadRecordSchema);

/** One conditional batch on a key of its own: read (absent, revision 0), then create it only if still absent. */
function conditionalBatch(store: Store, prefix: string): () => Promise<unknown> {
  let n = 0;
  return async () => {
    const key = `${prefix}/${n++}`;
    const read = await store.read(Counters, key);
    await store.commit({ compares: [{ table: Counters, key, modRevision: read.modRevision }], ops: [putOp(Counters, key, create(AuditHeadRecordSchema, { format: 1, seq: 1n }))] });
  };
}

/** Runs row 7. */
export async function runStore(env: Env): Promise<RowBuilder> {
  const row = new RowBuilder(
    "7",
    ROW_TITLES["7"]!,
    "One conditional batch = `read(key)` then `commit({ compares: [key at the revision read], ops: [put key] })` on a fresh key (no conflicts), in the bench process. LevelDB: `openLevelStore` in a temp dir, fsync on every commit (the servers' setting). etcd: `openEtcdStore` (etcd3 1.1.2 over grpc-js) on a 3-member cluster of the system's etcd on 127.0.0.1 with TLS and client certificates, each member's data in a temp dir (same disk), the client given every member. The same loop at 1 and 16 in flight.",
  );
  const b = env.budget;
  env.log("starting a 3-member etcd cluster");
  const cluster = await env.memo("etcd", () => startEtcdCluster(3), (c) => c.stop());
  const level = await openLevelStore(`${env.dir}/store-bench`, { owner: "bench" });
  const etcd = await openEtcdStore({ endpoints: cluster.endpoints, ca: cluster.ca, cert: cluster.cert, key: cluster.key, prefix: "bench/store", owner: "bench" });
  try {
    const backends = { level, etcd } as const;
    const results = new Map<string, LoopResult[]>();
    for (let r = 0; r < b.repeats; r++) {
      for (const [name, store] of Object.entries(backends)) {
        for (const c of [1, 16]) {
          env.log(`store ${name} c=${c} repeat ${r + 1}`);
          const res = await closedLoop(conditionalBatch(store, `r${r}c${c}`), { concurrency: c, durationMs: b.windowMs, maxOps: 200_000 });
          if (res.errors > 0) throw new Error(`store ${name} c=${c}: ${res.errors} batches failed: ${res.firstError}`);
          results.set(`${name}:${c}`, [...(results.get(`${name}:${c}`) ?? []), res]);
        }
      }
    }
    const fig = (name: string, c: number, label: string, baseline = false): Figure => {
      const rs = results.get(`${name}:${c}`)!;
      return row.figure(`store.${name}.c${c}`, `${label}, c=${c}`, "batches/s", rs.map((x) => x.perSecond), { p50: rs.map((x) => x.p50), p99: rs.map((x) => x.p99) }, baseline);
    };
    for (const c of [1, 16]) {
      const lv = fig("level", c, "LevelDB conditional batch (read + compare-and-put, fsync)", true);
      const et = fig("etcd", c, "etcd conditional batch (read + Txn, 3 members, TLS)");
      row.ratio(et, lv, `of LevelDB c=${c}`);
    }
    const e16 = results.get("etcd:16")!;
    row.note(`etcd commits through Raft (a majority of 3 members fsyncs each entry); at c=16 it did ${fmt(Math.max(...e16.map((x) => x.perSecond)))} batches/s on this machine, shared by every replica of a server.`);
    row.note("Issue 13 sets no target for this row; it tells what a replica pays per change against the embedded store.");
  } finally {
    await etcd.close();
    await level.close();
  }
  return row;
}
