import { execFile } from "node:child_process";
import { createPublicKey, randomBytes } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { clone, create } from "@bufbuild/protobuf";
import { afterEach, describe, expect, it } from "vitest";
import { FailedPrecondition, InvalidArgument, Unavailable } from "../../../src/common/errors.js";
import { toConnectError } from "../../../src/common/error-mapping.js";
import { createLogger } from "../../../src/common/logger.js";
import { AuditCheckpointSchema } from "../../../src/gen/kmi/common/v1/checkpoint_pb.js";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { AuditEntryRecordSchema, AuditHeadRecordSchema } from "../../../src/gen/kmi/store/v1/audit_log_pb.js";
import {
  AUDIT_CHECKPOINTS_TABLE,
  CheckpointWitness,
  MAX_CHECKPOINT_ENTRIES,
  checkpointProblem,
  checkpointSignedBytes,
  deriveCheckpointKey,
  requireCheckpoint,
  signCheckpoint,
  type AuditCheckpoint,
} from "../../../src/storage/audit-checkpoint.js";
import { AuditCheckpointer, MAX_CHECKPOINTS_PER_COMMIT, type CheckpointWitnessPeer } from "../../../src/storage/audit-checkpointer.js";
import { AUDIT_FORMAT, AUDIT_HEAD_KEY, AUDIT_LOG_TABLE, AUDIT_META_TABLE, auditEntryHash, createAuditLog, type AuditEntryInput } from "../../../src/storage/audit-log.js";
import { openLevelStore, type LevelStore } from "../../../src/storage/level-store.js";
import { MAX_TXN_OPS, delOp, numericKey, putOp, type Store } from "../../../src/storage/store.js";
import { tempDir } from "./tmp-dir.js";

const run = promisify(execFile);
/** The checkpoint key of the checkpointer tests' log. */
const cpKey = deriveCheckpointKey(randomBytes(32));
const logger = createLogger({ level: "error", write: () => {} });
const clock = { now: () => new Date(Date.UTC(2026, 0, 2, 3, 4, 5)) };

const stores: LevelStore[] = [];
afterEach(async () => {
  await Promise.all(stores.splice(0).map((s) => s.close()));
});
async function openStore(dir?: string) {
  const s = await openLevelStore(dir ?? (await tempDir()), { sync: false });
  stores.push(s);
  return s;
}

const entry = (i: number, outcome = "ok"): AuditEntryInput => ({ actor: "system", action: "test.change", target: `thing/${i}`, outcome });

function checkpoint(masterKey = randomBytes(32), seq = 5n) {
  const key = deriveCheckpointKey(masterKey);
  const hashes = Array.from({ length: Number(seq) }, () => randomBytes(32));
  return { key, cp: signCheckpoint(key, { origin: "kdc/0011223344556677", seq, hash: hashes.at(-1)!, fromSeq: 0n, entryHashes: hashes, time: clock.now() }) };
}

describe("the checkpoint key", () => {
  it("is derived from the master key: the same key for the same master key, another for another", () => {
    const mk = randomBytes(32);
    expect(deriveCheckpointKey(mk).keyId).toBe(deriveCheckpointKey(Buffer.from(mk)).keyId);
    expect(deriveCheckpointKey(randomBytes(32)).keyId).not.toBe(deriveCheckpointKey(mk).keyId);
    const k = deriveCheckpointKey(mk);
    expect(k.privateKey.asymmetricKeyType).toBe("ed25519");
    expect(createPublicKey(k.privateKey).export({ type: "spki", format: "der" }).equals(Buffer.from(k.publicKeyDer))).toBe(true);
  });

  it("refuses a master key of the wrong size", () => {
    expect(() => deriveCheckpointKey(randomBytes(31))).toThrow(InvalidArgument);
  });
});

describe("a signed checkpoint", () => {
  it("verifies with openssl over the documented encoding", async () => {
    const { cp } = checkpoint();
    const dir = await tempDir();
    await writeFile(join(dir, "msg"), checkpointSignedBytes(cp));
    await writeFile(join(dir, "sig"), cp.signature);
    await writeFile(join(dir, "pub.pem"), createPublicKey({ key: Buffer.from(cp.publicKeyDer), format: "der", type: "spki" }).export({ type: "spki", format: "pem" }));
    const r = await run("openssl", ["pkeyutl", "-verify", "-pubin", "-inkey", join(dir, "pub.pem"), "-rawin", "-in", join(dir, "msg"), "-sigfile", join(dir, "sig")], { encoding: "utf8" });
    expect(r.stdout).toMatch(/Signature Verified Successfully/);
    expect(checkpointSignedBytes(cp).subarray(0, 24).toString()).toBe("kmi.audit.checkpoint.v1\n");
  });

  const other = deriveCheckpointKey(randomBytes(32));
  it.each<[string, (cp: AuditCheckpoint) => void, RegExp]>([
    ["seq changed", (cp) => void (cp.seq += 1n), /signature does not verify/],
    ["hash changed", (cp) => void (cp.hash = randomBytes(32)), /signature does not verify/],
    ["origin changed", (cp) => void (cp.origin = "kdc/ffffffffffffffff"), /signature does not verify/],
    ["entries digest changed", (cp) => void (cp.entriesDigest = randomBytes(32)), /signature does not verify/],
    ["another key put in", (cp) => void ((cp.publicKeyDer = other.publicKeyDer), (cp.keyId = other.keyId)), /signature does not verify/],
    ["key id not the key's", (cp) => void (cp.keyId = other.keyId), /^key_id: /],
    ["a P-256 key", (cp) => void (cp.publicKeyDer = new Uint8Array(createPublicKey(Buffer.from("-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEVs/o5+uQbTjL3chynL4wXgUg2R9\nq9UU8I5mEovUf86QZ7kOBIjJwqnzD1omageEHWwHdBO6B+dFabmdT9POxg==\n-----END PUBLIC KEY-----\n")).export({ type: "spki", format: "der" }))), /^public_key_der: not an Ed25519 key/],
    ["from_seq not below seq", (cp) => void (cp.fromSeq = cp.seq), /^from_seq: /],
    ["seq 0", (cp) => void ((cp.seq = 0n), (cp.fromSeq = 0n)), /^seq: /],
    ["short hash", (cp) => void (cp.hash = randomBytes(31)), /^hash: must be 32 bytes/],
    ["no signature", (cp) => void (cp.signature = new Uint8Array()), /^signature: must be 64 bytes/],
    ["unknown format", (cp) => void (cp.format = 2), /^format 2 is unknown/],
  ])("is refused when %s", (_name, edit, problem) => {
    const { cp } = checkpoint();
    expect(checkpointProblem(cp)).toBeUndefined();
    const bad = clone(AuditCheckpointSchema, cp);
    edit(bad);
    expect(checkpointProblem(bad)).toMatch(problem);
    expect(() => requireCheckpoint(bad, "checkpoint")).toThrow(InvalidArgument);
  });

  it("of another log or key is named as such", () => {
    const { cp, key } = checkpoint();
    expect(checkpointProblem(cp, { keyId: key.keyId, origin: "kdc/0011223344556677" })).toBeUndefined();
    expect(checkpointProblem(cp, { keyId: other.keyId, origin: "kdc/0011223344556677" })).toMatch(/^signed by key [0-9a-f]{16}…, not by this log's checkpoint key/);
    expect(checkpointProblem(cp, { keyId: key.keyId, origin: "audit/0011223344556677" })).toMatch(/^origin "kdc\/0011223344556677" is not this log/);
  });
});

describe("the witness", () => {
  const mk = randomBytes(32);
  const key = deriveCheckpointKey(mk);
  const at = (seq: bigint, hash = new Uint8Array(32).fill(Number(seq)), origin = "kdc/0011223344556677", k = key) =>
    signCheckpoint(k, { origin, seq, hash, fromSeq: seq - 1n, entryHashes: [hash], time: clock.now() });

  it.each<[string, AuditCheckpoint, RegExp]>([
    ["an older seq (truncated or rolled back)", at(4n), /^checkpoint: seq 4 is older than the witnessed seq 5: the kdc's audit log was truncated or rolled back/],
    ["the same seq with another hash (rewritten)", at(5n, new Uint8Array(32).fill(99)), /^checkpoint: seq 5 has another hash than the witnessed one: the kdc's audit log was rewritten/],
    ["another origin", at(6n, undefined, "kdc/ffffffffffffffff"), /^checkpoint: origin "kdc\/ffffffffffffffff" is not the kdc's log/],
  ])("refuses %s and keeps the copy it holds", async (_name, cp, message) => {
    const w = new CheckpointWitness(await openStore(), clock);
    await w.accept("kdc", at(3n));
    await w.accept("kdc", at(5n));
    const err = await w.accept("kdc", cp).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FailedPrecondition);
    expect((err as Error).message).toMatch(message);
    expect((await w.get("kdc", key.keyId))?.seq).toBe(5n);
  });

  it("keeps a peer installed afresh (another checkpoint key) apart, leaving the old record as it was", async () => {
    const w = new CheckpointWitness(await openStore(), clock);
    await w.accept("kdc", at(5n));
    const fresh = deriveCheckpointKey(randomBytes(32));
    expect((await w.accept("kdc", at(1n, undefined, undefined, fresh))).seq).toBe(1n);
    expect((await w.get("kdc", fresh.keyId))?.seq).toBe(1n);
    expect((await w.get("kdc", key.keyId))?.seq).toBe(5n);
    await expect(w.get("kdc", "not-a-key-id")).rejects.toThrow(/^key_id: must be 64 lowercase hex characters/);
  });

  it("accepts a newer checkpoint and the same one again, and refuses a forged one as INVALID_ARGUMENT", async () => {
    const w = new CheckpointWitness(await openStore(), clock);
    expect(await w.get("kdc", key.keyId)).toBeUndefined();
    await w.accept("kdc", at(5n));
    expect((await w.accept("kdc", at(5n))).seq).toBe(5n);
    expect((await w.accept("kdc", at(9n))).seq).toBe(9n);
    const forged = at(12n);
    forged.seq = 20n;
    await expect(w.accept("kdc", forged)).rejects.toThrow(/^checkpoint: signature does not verify/);
    await expect(w.accept("kdc", undefined)).rejects.toThrow(/^checkpoint: missing/);
    expect((await w.get("kdc", key.keyId))?.seq).toBe(9n);
  });
});

/** Deletes every stored checkpoint, as a writer of the store may; resolves with how many. */
async function deleteCheckpoints(store: Store): Promise<number> {
  const keys: string[] = [];
  for await (const [k] of store.iterate(AUDIT_CHECKPOINTS_TABLE)) keys.push(k);
  await store.batch(keys.map((k) => delOp(AUDIT_CHECKPOINTS_TABLE, k)));
  return keys.length;
}

/** Polls `cond` every 10 ms, at most 5 s. */
async function until(cond: () => Promise<boolean>): Promise<void> {
  const end = Date.now() + 5000;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error("condition not met within 5 s");
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A witness peer over a `CheckpointWitness` in another store, that can be switched off. */
function witnessPeer(w: CheckpointWitness): CheckpointWitnessPeer & { up: boolean } {
  const peer = {
    name: "the witness",
    up: true,
    submit: async (cp: AuditCheckpoint) => {
      if (!peer.up) throw new Unavailable("connection refused");
      return w.accept("kdc", cp);
    },
    fetch: async () => {
      if (!peer.up) throw new Unavailable("connection refused");
      return w.get("kdc", cpKey.keyId);
    },
  };
  return peer;
}

describe("the checkpointer", () => {
  async function setup(dir?: string, witness?: CheckpointWitnessPeer) {
    const store = await openStore(dir);
    const log = createAuditLog(store, { clock });
    const cp = new AuditCheckpointer(store, log, { key: cpKey, origin: "kdc/0011223344556677", clock, logger });
    if (witness !== undefined) cp.setWitness(witness);
    await cp.start();
    return { store, log: cp.log, cp };
  }

  it("signs every entry, at most 1000 per checkpoint, chained without gaps", async () => {
    const { store, log, cp } = await setup();
    for (let i = 1; i <= 1003; i++) await log.append(entry(i, "refused: invalid_argument"));
    const newest = await cp.checkpoint();
    expect(newest?.seq).toBe(1003n);
    const records = [];
    for await (const [k, r] of store.iterate(AUDIT_CHECKPOINTS_TABLE)) records.push([k, r.checkpoint!.fromSeq, r.checkpoint!.seq, r.entryHashes.length]);
    expect(records).toEqual([
      [numericKey(1000), 0n, 1000n, 1000],
      [numericKey(1003), 1000n, 1003n, 3],
    ]);
    expect(await cp.verify()).toMatchObject({ ok: true, entries: 1003, checkpointSeq: 1003n, headSeq: 1003n, witness: "not configured" });
    await cp.close();
  });

  it("signs a backlog too long for one commit (etcd's ops and bytes per transaction) in several, chained without gaps", async () => {
    const { store, cp } = await setup();
    // A log that grew while nothing was signed (say, before checkpoints existed): 33 001 entries
    // written as the log writes them, then one checkpoint call.
    const total = MAX_CHECKPOINT_ENTRIES * MAX_CHECKPOINTS_PER_COMMIT + 1001;
    let prevHash: Uint8Array = new Uint8Array(32);
    let ops = [];
    for (let seq = 1; seq <= total; seq++) {
      const r = create(AuditEntryRecordSchema, { format: AUDIT_FORMAT, seq: BigInt(seq), time: timestampFromDate(clock.now()), actor: "system", action: "test.change", target: `thing/${seq}`, outcome: "ok", prevHash });
      r.hash = auditEntryHash(r);
      prevHash = r.hash;
      ops.push(putOp(AUDIT_LOG_TABLE, numericKey(seq), r));
      if (ops.length === MAX_TXN_OPS - 1 || seq === total) {
        if (seq === total) ops.push(putOp(AUDIT_META_TABLE, AUDIT_HEAD_KEY, create(AuditHeadRecordSchema, { format: AUDIT_FORMAT, seq: BigInt(seq), hash: r.hash })));
        await store.batch(ops);
        ops = [];
      }
    }
    const newest = await cp.checkpoint();
    expect(newest?.seq).toBe(BigInt(total));
    const spans: [bigint, bigint][] = [];
    for await (const [, r] of store.iterate(AUDIT_CHECKPOINTS_TABLE)) spans.push([r.checkpoint!.fromSeq, r.checkpoint!.seq]);
    expect(spans).toHaveLength(MAX_CHECKPOINTS_PER_COMMIT + 2);
    expect(spans.every(([from], i) => from === (i === 0 ? 0n : spans[i - 1]![1]))).toBe(true);
    expect(spans.at(-1)![1]).toBe(BigInt(total));
    expect(await cp.verify()).toMatchObject({ ok: true, entries: total, checkpointSeq: BigInt(total), headSeq: BigInt(total) });
    await cp.close();
  }, 120_000);

  it("two replicas on one store: a late push of an older checkpoint, refused by the witness for holding the other replica's newer one, does not stop signing", async () => {
    const store = await openStore();
    const w = new CheckpointWitness(await openStore(), clock);
    const make = (peer: CheckpointWitnessPeer) => {
      const cp = new AuditCheckpointer(store, createAuditLog(store, { clock }), { key: cpKey, origin: "kdc/0011223344556677", clock, logger });
      cp.setWitness(peer);
      return cp;
    };
    // Replica A's pushes wait until the gate opens, so B's newer checkpoint reaches the witness first.
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    const plain = witnessPeer(w);
    // Errors as the real peer client sees them: a ConnectError with the gRPC code.
    const slow: CheckpointWitnessPeer = {
      name: "the witness",
      submit: async (cp) => {
        await gate;
        return plain.submit(cp).catch((e: unknown) => Promise.reject(toConnectError(e, logger)));
      },
      fetch: () => plain.fetch(),
    };
    const a = make(slow);
    const b = make(plain);
    await Promise.all([a.start(), b.start()]);
    await a.log.append(entry(1));
    expect((await a.checkpoint())?.seq).toBe(1n);
    await b.log.append(entry(2));
    expect((await b.checkpoint())?.seq).toBe(2n);
    await until(async () => (await w.get("kdc", cpKey.keyId))?.seq === 2n);
    open();
    // A's push of seq 1 is refused (older than the witnessed 2); the witness's copy extends A's log.
    await a.log.append(entry(3));
    expect((await a.checkpoint())?.seq).toBe(3n);
    expect(a.broken).toBeUndefined();
    await Promise.all([a.close(), b.close()]);
    expect(a.broken).toBeUndefined();
    expect((await w.get("kdc", cpKey.keyId))?.seq).toBe(3n);
    expect(await b.verify()).toMatchObject({ ok: true, checkpointSeq: 3n, headSeq: 3n });
  });

  it("proves the log still extends an exported checkpoint, and names the seq when it does not", async () => {
    const dir = await tempDir();
    const first = await setup(dir);
    for (let i = 1; i <= 6; i++) await first.log.append(entry(i));
    const exported = (await first.cp.checkpoint())!;
    expect(await first.cp.verify(exported)).toMatchObject({ ok: true, checkpointSeq: 6n });
    await first.cp.close();
    await first.store.close();
    // An attacker drops the last two entries and every stored checkpoint, then the log grows again.
    const store = await openStore(dir);
    await deleteCheckpoints(store);
    const four = (await store.get(AUDIT_LOG_TABLE, numericKey(4)))!;
    await store.batch([
      delOp(AUDIT_LOG_TABLE, numericKey(5)),
      delOp(AUDIT_LOG_TABLE, numericKey(6)),
      putOp(AUDIT_META_TABLE, AUDIT_HEAD_KEY, create(AuditHeadRecordSchema, { format: 1, seq: 4n, hash: four.hash })),
    ]);
    await store.close();
    const again = await setup(dir);
    await again.log.append(entry(7));
    await again.log.append(entry(8));
    await again.cp.checkpoint();
    // Without the exported copy the rewritten log looks whole: it was signed afresh.
    expect((await again.cp.verify()).ok).toBe(true);
    expect(await again.cp.verify(exported)).toMatchObject({ ok: false, firstBadSeq: 6n, problem: expect.stringMatching(/^entry 6 differs from the given checkpoint/) });
    await expect(again.cp.verify(checkpoint().cp)).rejects.toThrow(/^checkpoint: signed by key/);
    await again.cp.close();
  });

  it("waits for an unreachable witness before its first signature, and stops for a store that lost its checkpoints", async () => {
    const w = new CheckpointWitness(await openStore(), clock);
    const peer = witnessPeer(w);
    const dir = await tempDir();
    const first = await setup(dir, peer);
    for (let i = 1; i <= 3; i++) await first.log.append(entry(i));
    expect((await first.cp.checkpoint())?.seq).toBe(3n);
    await first.cp.close();
    expect((await w.get("kdc", cpKey.keyId))?.seq).toBe(3n);
    await first.store.close();

    // The store loses its checkpoints (deleted, or an older copy put back).
    const raw = await openStore(dir);
    expect(await deleteCheckpoints(raw)).toBeGreaterThan(0);
    await raw.close();

    peer.up = false;
    const again = await setup(dir, peer);
    await expect(again.cp.checkpoint()).rejects.toThrow(Unavailable);
    let stored = 0;
    for await (const _ of again.store.iterate(AUDIT_CHECKPOINTS_TABLE)) stored++;
    expect(stored).toBe(0);
    peer.up = true;
    await expect(again.cp.checkpoint()).rejects.toThrow(/^audit checkpoints stopped: the witness holds a checkpoint at seq 3, but the store's checkpoints end at seq 0/);
    expect(again.cp.broken).toMatch(/checkpoints were deleted/);
    expect(await again.cp.verify()).toMatchObject({ ok: false, firstBadSeq: 3n, witness: "checked at seq 3" });
    await again.cp.close();
  });
});
