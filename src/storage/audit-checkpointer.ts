/**
 * The checkpointer of one server's audit log, and the verify that checks the log against its
 * checkpoints (./audit-checkpoint.ts has the format).
 *
 * - **When**: after every security-relevant change (an entry whose outcome is "ok": a state
 *   change or a release of a secret; requests are coalesced), every `intervalMs` while the
 *   head moved (refusals), at start and at a clean shutdown, and when an operator exports one.
 * - **What**: the entries since the last checkpoint (at most 1000 per checkpoint), signed;
 *   the record keeps their hashes, so checkpoints chain without gaps and together sign every
 *   entry. It never signs a head that does not extend its last checkpoint (an entry edited or
 *   dropped under it): then it stops signing and says so, and verify names the entry.
 * - **Witness**: each new checkpoint goes to the other server (`CheckpointWitnessPeer`), which
 *   keeps the latest; the first push after start is preceded by a pull, and the log must
 *   extend the witness's copy, so a rewrite made while the server was stopped is never blessed.
 * - **Verify**: the chain (AuditLog.verify), then every stored checkpoint against the entries
 *   it signed, then the newest checkpoint this process signed, the witness's copy, and an
 *   exported one; the smallest seq at which anything differs is named.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { FailedPrecondition, isKmiError, Unavailable } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { AuditCheckpointRecordSchema, type AuditEntryRecord } from "../gen/kmi/store/v1/audit_log_pb.js";
import { AUDIT_HEAD_KEY, AUDIT_LOG_TABLE, AUDIT_META_TABLE, auditEntryHash, type AuditEntry, type AuditEntryInput, type AuditTailOptions, type AuditVerifyResult } from "./audit-log.js";
import {
  AUDIT_CHECKPOINTS_TABLE,
  MAX_CHECKPOINT_ENTRIES,
  checkpointProblem,
  entriesDigest,
  requireCheckpoint,
  signCheckpoint,
  type AuditCheckpoint,
  type CheckpointKey,
} from "./audit-checkpoint.js";
import { Mutex } from "./mutex.js";
import { retryOnConflict } from "./retry.js";
import { bytesEqual } from "./seal.js";
import { numericKey, putOp, type BatchOp, type Compare, type Store } from "./store.js";

/**
 * Most checkpoints signed in one commit: each record holds up to `MAX_CHECKPOINT_ENTRIES` entry
 * hashes (~33 KB), so 32 of them stay within `MAX_TXN_BYTES` and `MAX_TXN_OPS` (etcd's limits).
 */
export const MAX_CHECKPOINTS_PER_COMMIT = 32;

function bigMin(a: bigint, b: bigint): bigint {
  return a < b ? a : b;
}

/** The other server, as a witness of this server's log (over mutual TLS). */
export interface CheckpointWitnessPeer {
  /** Who it is, for messages: "the KDC" or "the Auditserver". */
  readonly name: string;
  /** Hands `cp` over; resolves with the copy the witness holds after. Rejects FAILED_PRECONDITION when it refuses it. */
  submit(cp: AuditCheckpoint): Promise<AuditCheckpoint | undefined>;
  /** The witness's copy of this log's checkpoint, or undefined when it has none. */
  fetch(): Promise<AuditCheckpoint | undefined>;
}

/** The audit log as the checkpointer wraps it (./audit-log.ts's AuditLog). */
export interface CheckpointedLog {
  /** Appends `entry` with `changeOps`, conditional on `compares` (a Conflict when one fails). */
  append(entry: AuditEntryInput, changeOps?: readonly BatchOp[], compares?: readonly Compare[]): Promise<AuditEntry>;
  appendUnauthenticated(entry: AuditEntryInput, source: string): Promise<AuditEntry | undefined>;
  readonly suppressedRefusals: number;
  tail(options?: AuditTailOptions): Promise<AuditEntry[]>;
  verify(): Promise<AuditVerifyResult>;
  head(): Promise<{ seq: bigint; hash: string }>;
}

/** What `AuditCheckpointer.verify` found: the chain's result, plus the checkpoints'. */
export interface CheckpointedVerifyResult extends AuditVerifyResult {
  /** Seq of the newest signed checkpoint checked (stored, this process's, the witness's or given); 0n if none. */
  checkpointSeq: bigint;
  /** What the witness holds: "checked at seq N", "none yet", "not configured" or "unreachable: …". */
  witness: string;
  /** Seq of the head record. */
  headSeq: bigint;
}

/** The fields of a VerifyAuditLogResponse (the KDC's and the Auditserver's have the same) from a verify result. */
export function verifyResponseFields(r: AuditVerifyResult & Partial<CheckpointedVerifyResult>) {
  const checked = r.checkpointSeq !== undefined ? { checkpointSeq: r.checkpointSeq, headSeq: r.headSeq ?? 0n } : {};
  return { ok: r.ok, entries: BigInt(r.entries), firstBadSeq: r.firstBadSeq, problem: r.problem, headHash: r.headHash, witness: r.witness ?? "not configured", ...checked };
}

/** Options of `AuditCheckpointer`. */
export interface AuditCheckpointerOptions {
  /** The signing key (./audit-checkpoint.ts `deriveCheckpointKey`). */
  key: CheckpointKey;
  /** This log's name in its checkpoints, e.g. "kdc/<kdc_id>". */
  origin: string;
  clock?: { now(): Date };
  logger: Logger;
  /** Sign the moved head this often, ms (default 60 000). */
  intervalMs?: number;
  /** How long a witness call may take, ms (default 5 000). */
  witnessTimeoutMs?: number;
}

interface Finding {
  seq: bigint;
  problem: string;
}

/** Signs checkpoints of one store's audit log and checks the log against them. One per store. */
export class AuditCheckpointer {
  readonly #store: Store;
  readonly #log: CheckpointedLog;
  readonly #o: Required<Omit<AuditCheckpointerOptions, "clock">> & { clock: { now(): Date } };
  readonly #mutex = new Mutex();
  #witness: CheckpointWitnessPeer | undefined;
  #last: AuditCheckpoint | undefined;
  #broken: string | undefined;
  #witnessChecked = false;
  #witnessState = "not configured";
  #timer: NodeJS.Timeout | undefined;
  #requested: Promise<void> | undefined;
  #again = false;
  #pushing: Promise<void> | undefined;
  #pushAgain = false;
  #closed = false;
  #started = false;

  constructor(store: Store, log: CheckpointedLog, options: AuditCheckpointerOptions) {
    this.#store = store;
    this.#log = log;
    this.#o = { intervalMs: 60_000, witnessTimeoutMs: 5_000, clock: { now: () => new Date() }, ...options };
  }

  /** The public key and origin that checkpoints of this log carry. */
  get identity(): { keyId: string; origin: string } {
    return { keyId: this.#o.key.keyId, origin: this.#o.origin };
  }

  /** Seq of the newest checkpoint signed or loaded; 0n when none yet. */
  get lastSeq(): bigint {
    return this.#last?.seq ?? 0n;
  }

  /** Why signing stopped (the log does not extend its last checkpoint), or undefined. */
  get broken(): string | undefined {
    return this.#broken;
  }

  /** What the witness holds, as last seen: "holds seq N", "unreachable: …", "not configured", … */
  get witnessState(): string {
    return this.#witnessState;
  }

  /** Waits for the checkpoints handed to the witness so far, then says what it holds. */
  async witnessed(): Promise<string> {
    await this.#pushing;
    return this.#witnessState;
  }

  /** Sets the other server as witness (it may only exist after the store was opened). */
  setWitness(witness: CheckpointWitnessPeer): void {
    this.#witness = witness;
    this.#witnessState = "not checked yet";
  }

  /**
   * The audit log with a checkpoint requested after every entry whose outcome is "ok" (a
   * security-relevant change), and verify checking the checkpoints too; entries are written
   * exactly as before.
   */
  get log(): CheckpointedLog {
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const cp = this;
    const log = this.#log;
    return {
      async append(entry, changeOps, compares) {
        // The compares ride along: they are what makes a change conditional on what it read.
        const written = await log.append(entry, changeOps, compares);
        if (written.outcome === "ok") cp.request();
        return written;
      },
      appendUnauthenticated: (entry, source) => log.appendUnauthenticated(entry, source),
      get suppressedRefusals() {
        return log.suppressedRefusals;
      },
      tail: (options) => log.tail(options),
      verify: () => cp.verify(),
      head: () => log.head(),
    };
  }

  /**
   * Loads the newest stored checkpoint, checks that the log still extends it, and starts the
   * checkpoints: the head is signed in the background (after the witness answered), then
   * periodically. Never throws for a tampered log: it logs why and stops signing (verify
   * reports the entry).
   */
  async start(): Promise<void> {
    await this.#mutex.runExclusive(async () => {
      let newest: AuditCheckpoint | undefined;
      for await (const [, r] of this.#store.iterate(AUDIT_CHECKPOINTS_TABLE, { reverse: true, limit: 1 })) newest = r.checkpoint;
      if (newest !== undefined) {
        const p = checkpointProblem(newest, this.identity);
        if (p !== undefined) return this.#stop(`the newest stored checkpoint (seq ${newest.seq}): ${p}`);
        const mismatch = await this.#extends(newest, "the newest stored checkpoint");
        if (mismatch !== undefined) return this.#stop(mismatch.problem);
        this.#last = newest;
      }
    });
    this.#started = true;
    // Not awaited: a witness that does not answer must not hold up the server's start.
    this.request();
    this.#timer = setInterval(() => this.request(), this.#o.intervalMs);
    this.#timer.unref();
  }

  /** Asks for a checkpoint soon; several requests while one runs make one more. Never rejects. */
  request(): void {
    // Before start() (a CLI that only opened the store) nothing is signed: the last
    // checkpoint is not loaded yet, and signing from seq 0 would overlap the stored ones.
    if (this.#closed || !this.#started) return;
    if (this.#requested !== undefined) {
      this.#again = true;
      return;
    }
    this.#requested = (async () => {
      do {
        this.#again = false;
        await this.checkpoint().catch((err: unknown) => this.#failed(err));
      } while (this.#again && !this.#closed);
    })().finally(() => (this.#requested = undefined));
  }

  /**
   * Signs the entries since the last checkpoint (when the head moved), stores the checkpoints,
   * pushes the newest to the witness in the background, and resolves with the newest one;
   * undefined for an empty log. FAILED_PRECONDITION when signing stopped.
   */
  async checkpoint(): Promise<AuditCheckpoint | undefined> {
    if (!this.#started) throw new FailedPrecondition("audit checkpoints: not started");
    // Why the witness first: a store whose checkpoints were deleted would otherwise be signed
    // afresh, rewritten tail and all, before anyone compared it with the copy kept elsewhere.
    if (this.#witness !== undefined && !this.#witnessChecked) await this.#checkWitness(this.#witness);
    const newest = await this.#mutex.runExclusive(() => this.#signNew());
    if (this.#broken !== undefined) throw new FailedPrecondition(`audit checkpoints stopped: ${this.#broken}; run \`kmi ctl audit verify\``);
    if (newest !== undefined && this.#witness !== undefined) {
      const witness = this.#witness;
      this.#schedulePush(witness);
    }
    return newest;
  }

  /** Stops the timer, signs the head a last time and waits for the witness push. */
  async close(): Promise<void> {
    if (!this.#started || this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    await this.#requested;
    await this.checkpoint().catch((err: unknown) => this.#failed(err));
    await this.#pushing;
  }

  /** Hands the newest checkpoint to the witness; pushes asked for while one runs make one more (of the newest then). */
  #schedulePush(witness: CheckpointWitnessPeer): void {
    this.#pushAgain = true;
    if (this.#pushing !== undefined) return;
    this.#pushing = (async () => {
      while (this.#pushAgain) {
        this.#pushAgain = false;
        await this.#pushTo(witness);
      }
    })().finally(() => (this.#pushing = undefined));
  }

  /**
   * Signs the entries past the newest checkpoint. Replicas of a server share one store and one
   * checkpoint key, so the newest checkpoint is read from the store (another replica may have
   * signed since), and the commit is conditional on the audit head as read and touches it: two
   * replicas signing at once conflict, and the loser signs again from the winner's checkpoint,
   * so the stored checkpoints stay one chain.
   */
  async #signNew(): Promise<AuditCheckpoint | undefined> {
    // A long backlog (a log that grew while checkpoints could not be signed) takes several commits.
    for (;;) {
      const r = await retryOnConflict(() => this.#signOnce());
      if (r === undefined || r.caughtUp) return r?.newest;
    }
  }

  /** Adopts a newer checkpoint another replica stored, after checking it; false when signing stopped. */
  async #adoptStored(): Promise<boolean> {
    let newest: AuditCheckpoint | undefined;
    for await (const [, r] of this.#store.iterate(AUDIT_CHECKPOINTS_TABLE, { reverse: true, limit: 1 })) newest = r.checkpoint;
    if (newest === undefined || newest.seq <= (this.#last?.seq ?? 0n)) return true;
    const p = checkpointProblem(newest, this.identity);
    const problem = p !== undefined ? `the newest stored checkpoint (seq ${newest.seq}): ${p}` : (await this.#extends(newest, "the newest stored checkpoint"))?.problem;
    if (problem !== undefined) {
      this.#stop(problem);
      return false;
    }
    this.#last = newest;
    return true;
  }

  /**
   * One commit of new checkpoints: at most `MAX_CHECKPOINTS_PER_COMMIT` of them (etcd's limits on
   * ops and bytes per transaction); `caughtUp` is false when more entries are left to sign.
   */
  async #signOnce(): Promise<{ newest: AuditCheckpoint | undefined; caughtUp: boolean } | undefined> {
    if (this.#broken !== undefined) throw new FailedPrecondition(`audit checkpoints stopped: ${this.#broken}; run \`kmi ctl audit verify\``);
    if (!(await this.#adoptStored())) return undefined;
    const read = await this.#store.read(AUDIT_META_TABLE, AUDIT_HEAD_KEY);
    const head = read.value;
    const last = this.#last;
    const lastSeq = last?.seq ?? 0n;
    if (head === undefined || head.seq === 0n) return { newest: last, caughtUp: true };
    if (head.seq < lastSeq) return this.#stop(`the head (seq ${head.seq}) is behind the last checkpoint (seq ${lastSeq}): entries were dropped`);
    if (head.seq === lastSeq) {
      if (!bytesEqual(head.hash, last!.hash)) return this.#stop(`the head's hash differs from the last checkpoint at seq ${lastSeq}: the log was rewritten`);
      return { newest: last, caughtUp: true };
    }
    const upTo = bigMin(head.seq, lastSeq + BigInt(MAX_CHECKPOINT_ENTRIES * MAX_CHECKPOINTS_PER_COMMIT));
    const ops: BatchOp[] = [];
    let from = lastSeq;
    let prev = last?.hash;
    let hashes: Uint8Array[] = [];
    let newest = last;
    const flush = () => {
      const cp = signCheckpoint(this.#o.key, { origin: this.#o.origin, seq: from + BigInt(hashes.length), hash: hashes.at(-1)!, fromSeq: from, entryHashes: hashes, time: this.#o.clock.now() });
      ops.push(putOp(AUDIT_CHECKPOINTS_TABLE, numericKey(cp.seq), create(AuditCheckpointRecordSchema, { format: 1, checkpoint: cp, entryHashes: hashes })));
      newest = cp;
      from = cp.seq;
      hashes = [];
    };
    let expected = lastSeq + 1n;
    for await (const [, r] of this.#store.iterate(AUDIT_LOG_TABLE, { gt: numericKey(lastSeq), lte: numericKey(upTo) })) {
      // Why check before signing: a signature over an edited entry would bless the edit.
      const bad = entryProblem(r, expected, prev);
      if (bad !== undefined) return this.#stop(`entry ${expected}: ${bad}`);
      hashes.push(r.hash);
      prev = r.hash;
      expected++;
      if (hashes.length === MAX_CHECKPOINT_ENTRIES) flush();
    }
    if (expected - 1n !== upTo) return this.#stop(`entry ${expected} is missing below the head (seq ${head.seq})`);
    if (upTo === head.seq && !bytesEqual(prev!, head.hash)) return this.#stop(`the head's hash is not entry ${head.seq}'s`);
    if (hashes.length > 0) flush();
    const headGuard: Compare = { table: AUDIT_META_TABLE, key: AUDIT_HEAD_KEY, modRevision: read.modRevision };
    await this.#store.commit({ compares: [headGuard], ops: [...ops, putOp(AUDIT_META_TABLE, AUDIT_HEAD_KEY, head)] });
    this.#last = newest;
    return { newest, caughtUp: upTo === head.seq };
  }

  /** Logs a failed background checkpoint; waiting for the witness and a stopped signer were logged already. */
  #failed(err: unknown): void {
    if (err instanceof Unavailable || (err instanceof FailedPrecondition && this.#broken !== undefined)) return;
    this.#o.logger.warn("audit checkpoint failed", { err });
  }

  #stop(why: string): undefined {
    if (this.#broken === undefined) {
      this.#broken = why;
      this.#o.logger.error("audit log does not extend its signed checkpoints; no more checkpoints are signed (run `kmi ctl audit verify`)", { problem: why });
    }
    return undefined;
  }

  /**
   * Compares the log and the stored checkpoints with the witness's copy, once per process
   * before the first signature: the copy must verify, the store's checkpoints must reach it,
   * and the entry at its seq must have its hash. A mismatch stops signing; an unreachable
   * witness is UNAVAILABLE (signing waits for it).
   */
  async #checkWitness(witness: CheckpointWitnessPeer): Promise<void> {
    let held: AuditCheckpoint | undefined;
    try {
      held = await this.#withTimeout(witness.fetch());
    } catch (err) {
      this.#unreachable(witness, err);
      throw new Unavailable(`audit checkpoints wait for ${witness.name}, which keeps this log's last checkpoint: ${this.#witnessState}`);
    }
    await this.#mutex.runExclusive(async () => {
      if (this.#witnessChecked || held === undefined) return;
      const p = checkpointProblem(held, this.identity);
      const storedSeq = this.#last?.seq ?? 0n;
      const mismatch =
        p !== undefined
          ? { seq: held.seq, problem: `${witness.name}'s copy: ${p}` }
          : held.seq > storedSeq
            ? { seq: held.seq, problem: `${witness.name} holds a checkpoint at seq ${held.seq}, but the store's checkpoints end at seq ${storedSeq}: checkpoints were deleted, or the store was restored from an older copy` }
            : await this.#extends(held, `${witness.name}'s copy`);
      if (mismatch !== undefined) {
        this.#stop(mismatch.problem);
        this.#witnessState = `mismatch at seq ${mismatch.seq}`;
      }
    });
    this.#witnessChecked = true;
    if (this.#witnessState.startsWith("unreachable") || this.#witnessState === "not checked yet") this.#witnessState = held === undefined ? "none yet" : `holds seq ${held.seq}`;
  }

  #unreachable(witness: CheckpointWitnessPeer, err: unknown): void {
    const ce = ConnectError.from(err);
    const state = `unreachable: ${ce.rawMessage}`;
    if (state !== this.#witnessState) this.#o.logger.warn("audit checkpoint witness unreachable; will retry with the next checkpoint", { witness: witness.name, error: ce.rawMessage });
    this.#witnessState = state;
  }

  async #pushTo(witness: CheckpointWitnessPeer): Promise<void> {
    try {
      const last = this.#last;
      if (last === undefined || this.#broken !== undefined) return;
      const held = await this.#withTimeout(witness.submit(last));
      this.#witnessState = `holds seq ${held?.seq ?? last.seq}`;
    } catch (err) {
      const ce = ConnectError.from(err);
      if (ce.code === Code.FailedPrecondition) {
        const newer = await this.#newerHeld(witness).catch(() => undefined);
        if (newer !== undefined) {
          this.#witnessState = `holds seq ${newer.seq}`;
          return;
        }
        this.#stop(`${witness.name} refused the checkpoint: ${ce.rawMessage}`);
        this.#witnessState = `refused: ${ce.rawMessage}`;
        return;
      }
      this.#unreachable(witness, err);
    }
  }

  /**
   * The witness's copy when it is a newer checkpoint of this log that the log extends: another
   * replica (same store, same key) pushed it first, and this one's late push of an older one was
   * refused for that. Not a rollback, so signing goes on. Undefined in every other case.
   */
  async #newerHeld(witness: CheckpointWitnessPeer): Promise<AuditCheckpoint | undefined> {
    const held = await this.#withTimeout(witness.fetch());
    const last = this.#last;
    if (held === undefined || last === undefined || held.seq < last.seq) return undefined;
    if (checkpointProblem(held, this.identity) !== undefined) return undefined;
    return (await this.#extends(held, "the witness's copy")) === undefined ? held : undefined;
  }

  #withTimeout<T>(p: Promise<T>): Promise<T> {
    let t: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, rej) => {
      t = setTimeout(() => rej(new ConnectError(`no answer within ${this.#o.witnessTimeoutMs} ms`, Code.DeadlineExceeded)), this.#o.witnessTimeoutMs);
    });
    return Promise.race([p, timeout]).finally(() => clearTimeout(t));
  }

  /** Where the log stops extending `cp` (checked for its seq only), or undefined. */
  async #extends(cp: AuditCheckpoint, label: string): Promise<Finding | undefined> {
    const head = await this.#store.get(AUDIT_META_TABLE, AUDIT_HEAD_KEY);
    const headSeq = head?.seq ?? 0n;
    const entry = await this.#store.get(AUDIT_LOG_TABLE, numericKey(cp.seq));
    if (cp.seq > headSeq || entry === undefined) {
      const first = headSeq + 1n < cp.seq ? headSeq + 1n : cp.seq;
      const dropped = first === cp.seq ? `entry ${first} was` : `entries ${first} to ${cp.seq} were`;
      return { seq: first, problem: `${label} signed seq ${cp.seq}, beyond the log's head (seq ${headSeq}): ${dropped} dropped` };
    }
    if (!bytesEqual(entry.hash, cp.hash)) return { seq: cp.seq, problem: `entry ${cp.seq} differs from ${label} (the log was rewritten at or before seq ${cp.seq})` };
    return undefined;
  }

  /**
   * Signs the head when it moved, then verifies the log's chain and checks it against every
   * stored checkpoint, this process's newest, the witness's copy and `exported` (an
   * operator's, checked first: a checkpoint of another log or with a bad signature is
   * INVALID_ARGUMENT naming `checkpoint`). Names the smallest seq at which anything differs.
   */
  async verify(exported?: AuditCheckpoint): Promise<CheckpointedVerifyResult> {
    if (exported !== undefined) requireCheckpoint(exported, "checkpoint", this.identity);
    // The head is signed first (when it extends the last checkpoint), so the newest checkpoint
    // is the head; a log that does not extend it is not signed, and is reported below.
    if (this.#started && !this.#closed) await this.checkpoint().catch(() => undefined);
    const chain = await this.#log.verify();
    const head = await this.#store.get(AUDIT_META_TABLE, AUDIT_HEAD_KEY);
    const findings: Finding[] = chain.ok ? [] : [{ seq: chain.firstBadSeq, problem: chain.problem }];
    const stored = await this.#checkStored(findings);
    let checkpointSeq = stored?.seq ?? 0n;
    const anchors: [AuditCheckpoint, string][] = [];
    if (this.#last !== undefined) anchors.push([this.#last, "the newest checkpoint this server signed"]);
    if (exported !== undefined) anchors.push([exported, "the given checkpoint"]);
    const witness = await this.#witnessCopy();
    if (witness.copy !== undefined) {
      const p = checkpointProblem(witness.copy, this.identity);
      if (p !== undefined) findings.push({ seq: witness.copy.seq, problem: `${this.#witness!.name}'s copy: ${p}` });
      else anchors.push([witness.copy, `${this.#witness!.name}'s copy (the witness)`]);
    }
    for (const [cp, label] of anchors) {
      if (cp.seq > checkpointSeq) checkpointSeq = cp.seq;
      const mismatch = await this.#extends(cp, label);
      if (mismatch !== undefined) findings.push(mismatch);
      else if (cp.seq > (stored?.seq ?? 0n)) {
        // Named at the checkpoint's seq: the entries up to it still match it.
        findings.push({ seq: cp.seq, problem: `${label} signed seq ${cp.seq}, but the store's checkpoints end at seq ${stored?.seq ?? 0n}: checkpoints were deleted, or the store was restored from an older copy` });
      }
    }
    const headSeq = head?.seq ?? 0n;
    const result = { checkpointSeq, witness: witness.state, headSeq };
    if (findings.length === 0) return { ...chain, ...result };
    const first = findings.reduce((a, b) => (b.seq < a.seq ? b : a));
    return { ...chain, ok: false, firstBadSeq: first.seq, problem: first.problem, ...result };
  }

  async #witnessCopy(): Promise<{ copy?: AuditCheckpoint; state: string }> {
    if (this.#witness === undefined) return { state: "not configured" };
    try {
      const copy = await this.#withTimeout(this.#witness.fetch());
      return copy === undefined ? { state: "none yet" } : { copy, state: `checked at seq ${copy.seq}` };
    } catch (err) {
      if (isKmiError(err) && !(err instanceof ConnectError)) return { state: `unreachable: ${err.message}` };
      return { state: `unreachable: ${ConnectError.from(err).rawMessage}` };
    }
  }

  /** Walks the stored checkpoints against the entries they signed; pushes the first finding. Returns the newest good one. */
  async #checkStored(findings: Finding[]): Promise<AuditCheckpoint | undefined> {
    let prevSeq = 0n;
    let newest: AuditCheckpoint | undefined;
    for await (const [, r] of this.#store.iterate(AUDIT_CHECKPOINTS_TABLE)) {
      const cp = r.checkpoint;
      const p = checkpointProblem(cp, this.identity);
      if (p !== undefined) {
        findings.push({ seq: prevSeq + 1n, problem: `the stored checkpoint after seq ${prevSeq}: ${p}` });
        return newest;
      }
      if (cp!.fromSeq !== prevSeq) {
        const [a, b] = cp!.fromSeq > prevSeq ? [prevSeq + 1n, cp!.fromSeq] : [cp!.fromSeq + 1n, prevSeq];
        findings.push({ seq: a, problem: `the checkpoints of entries ${a} to ${b} are missing from the store (deleted) or overlap` });
        return newest;
      }
      if (BigInt(r.entryHashes.length) !== cp!.seq - cp!.fromSeq || !bytesEqual(entriesDigest(r.entryHashes), cp!.entriesDigest)) {
        findings.push({ seq: prevSeq + 1n, problem: `the stored entry hashes of checkpoint ${cp!.seq} do not match its signed digest (edited)` });
        return newest;
      }
      const bad = await this.#compareEntries(cp!, r.entryHashes);
      if (bad !== undefined) {
        findings.push(bad);
        return newest;
      }
      prevSeq = cp!.seq;
      newest = cp;
    }
    return newest;
  }

  async #compareEntries(cp: AuditCheckpoint, hashes: readonly Uint8Array[]): Promise<Finding | undefined> {
    let s = cp.fromSeq + 1n;
    for await (const [key, r] of this.#store.iterate(AUDIT_LOG_TABLE, { gt: numericKey(cp.fromSeq), lte: numericKey(cp.seq) })) {
      if (key !== numericKey(s)) break;
      if (!bytesEqual(r.hash, hashes[Number(s - cp.fromSeq - 1n)]!)) {
        return { seq: s, problem: `entry ${s} differs from what checkpoint ${cp.seq} signed (an entry edited, dropped or renumbered at seq ${s})` };
      }
      s++;
    }
    if (s <= cp.seq) return { seq: s, problem: `entry ${s} is missing, but checkpoint ${cp.seq} signed it (entries dropped)` };
    return undefined;
  }
}

function entryProblem(r: AuditEntryRecord, expected: bigint, prev: Uint8Array | undefined): string | undefined {
  if (r.seq !== expected) return `stored as seq ${expected} but says seq ${r.seq}`;
  if (!bytesEqual(auditEntryHash(r), r.hash)) return "hash mismatch (edited)";
  if (prev !== undefined && !bytesEqual(r.prevHash, prev)) return "prev-hash does not link to the last checkpoint";
  return undefined;
}
