/**
 * The change follower of a KDC replica: turns the commits of OTHER replicas, read from the
 * store's change feed, into the watch hub's events, so that an agent attached to this replica
 * hears of a rotation made on another. This replica's own commits are announced by the
 * operations right after they commit (./operations.ts) and skipped here (`LocalCommits`).
 *
 * It keeps what it needs to tell a change from a repeat: each tenant's active version, each
 * version's state, each signing key's revocation, each tenant's staged version (the rotation
 * scheduler's, in `rotation_policies`). At start it lists the four tables and
 * watches each from the list's revision + 1. A watch that breaks (the cluster unreachable)
 * resumes from the last revision it delivered; one answered with "resync" (its revision was
 * compacted) lists the table again and announces what differs, then watches on — the
 * Kubernetes list-then-watch. Only used on a shared store (etcd); on LevelDB every commit is
 * this process's own.
 */
import { setTimeout as sleep } from "node:timers/promises";
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { jittered } from "../common/backoff.js";
import type { Logger } from "../common/logger.js";
import { VersionState } from "../gen/kmi/kdc/v1/kdc_pb.js";
import type { IntermediateVersionRecord, RotationPolicyRecord, SigningKeyRecord, TenantRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import { StoreClosed, type Store, type Table } from "../storage/store.js";
import type { SecretEvents } from "./context.js";
import { T, versionKey } from "./kdc-store.js";
import type { LocalCommits } from "./local-commits.js";

/** Options of the follower. */
export interface ChangeFollowerOptions {
  /** Pause before a broken watch is opened again, ms (jittered ×0.5–1.5; default 500). */
  retryMs?: number;
}

type Handler<V> = (key: string, value: V | undefined, announce: boolean) => Promise<void>;

/** Follows the store's change feed for one KDC replica. */
export class ChangeFollower {
  readonly #active = new Map<string, number>();
  readonly #versionStates = new Map<string, VersionState>();
  readonly #keys = new Map<string, boolean>();
  readonly #staged = new Map<string, number>();
  readonly #abort = new AbortController();
  readonly #loops: Promise<void>[] = [];
  readonly #retryMs: number;

  constructor(
    private readonly store: Store,
    private readonly local: LocalCommits,
    private readonly events: SecretEvents,
    private readonly logger: Logger,
    options: ChangeFollowerOptions = {},
  ) {
    this.#retryMs = options.retryMs ?? 500;
  }

  /** Lists the tables (nothing is announced for what is already there) and starts watching. */
  async start(): Promise<void> {
    const starts = await Promise.all([
      this.#list(T.tenants, this.#onTenant, false),
      this.#list(T.versions, this.#onVersion, false),
      this.#list(T.signingKeys, this.#onSigningKey, false),
      this.#list(T.rotationPolicies, this.#onPolicy, false),
    ]);
    this.#loops.push(
      this.#follow(T.tenants, this.#onTenant, starts[0]),
      this.#follow(T.versions, this.#onVersion, starts[1]),
      this.#follow(T.signingKeys, this.#onSigningKey, starts[2]),
      this.#follow(T.rotationPolicies, this.#onPolicy, starts[3]),
    );
  }

  /** Stops watching; resolves once every watch has ended. Idempotent. */
  async stop(): Promise<void> {
    this.#abort.abort();
    await Promise.allSettled(this.#loops);
  }

  /** Lists `table` through `handle`; returns the revision to watch from. */
  async #list<D extends DescMessage>(table: Table<D>, handle: Handler<MessageShape<D>>, announce: boolean): Promise<bigint> {
    const { records, revision } = await this.store.list(table);
    for (const r of records) await handle.call(this, r.key, r.value, announce);
    return revision + 1n;
  }

  async #follow<D extends DescMessage>(table: Table<D>, handle: Handler<MessageShape<D>>, from: bigint): Promise<void> {
    const signal = this.#abort.signal;
    let next = from;
    while (!signal.aborted) {
      try {
        for await (const ev of this.store.watch(table, { fromRevision: next, signal })) {
          if (ev.type === "resync") {
            this.logger.warn("change feed compacted past this replica's position; listing again", { table: table.name, compact_revision: String(ev.compactRevision) });
            next = await this.#list(table, handle, true);
            break;
          }
          // Why wait: this process's commit may show up on the feed before its own call returned.
          await this.local.settled();
          const announce = !this.local.isLocal(ev.revision);
          for (const c of ev.changes) await handle.call(this, c.key, c.value, announce);
          next = ev.revision + 1n;
        }
      } catch (err) {
        if (signal.aborted || err instanceof StoreClosed) return;
        this.logger.warn("change feed broke; watching again", { table: table.name, from_revision: String(next), err });
        await sleep(jittered(this.#retryMs, 0.5), undefined, { signal }).catch(() => {});
      }
    }
  }

  async #onTenant(key: string, t: TenantRecord | undefined, announce: boolean): Promise<void> {
    if (t === undefined) return;
    const before = this.#active.get(key);
    this.#active.set(key, t.activeVersion);
    if (announce && t.activeVersion !== 0 && t.activeVersion !== before) this.events.activeChanged(key);
  }

  async #onVersion(key: string, v: IntermediateVersionRecord | undefined, announce: boolean): Promise<void> {
    if (v === undefined) return;
    const before = this.#versionStates.get(key);
    this.#versionStates.set(key, v.state);
    if (!announce || v.state !== VersionState.REVOKED || before === VersionState.REVOKED) return;
    // As the revoking replica does: a key still used by the active version (a renewal) stays.
    const tenant = await this.store.get(T.tenants, v.tenantId);
    const active = tenant === undefined || tenant.activeVersion === 0 ? undefined : await this.store.get(T.versions, versionKey(v.tenantId, tenant.activeVersion));
    if (active?.keyId !== v.keyId) this.events.keyRevoked(v.tenantId, v.keyId, v.revokeReason);
  }

  async #onPolicy(key: string, p: RotationPolicyRecord | undefined, announce: boolean): Promise<void> {
    const before = this.#staged.get(key) ?? 0;
    const staged = p?.stagedVersion ?? 0;
    this.#staged.set(key, staged);
    if (announce && staged !== 0 && staged !== before) this.events.staged(key, staged);
  }

  async #onSigningKey(key: string, k: SigningKeyRecord | undefined, announce: boolean): Promise<void> {
    if (k === undefined) return;
    const known = this.#keys.has(key);
    const wasRevoked = this.#keys.get(key) === true;
    const revoked = k.revokedAt !== undefined;
    this.#keys.set(key, revoked);
    if (!announce) return;
    if (!known && !revoked) this.events.signingKeyAdded(k.tenantId, k.name);
    if (revoked && !wasRevoked) this.events.keyRevoked(k.tenantId, k.keyId, k.revokeReason);
  }
}
