/**
 * The key holder: the secrets the agent holds, in memory, per tenant.
 *
 * - per tenant, the active intermediate CA key with its chain and a ready leaf issuer;
 * - plain signing keys, by key id and by "<tenant_id>/<name>";
 * - each with its lease; a key whose lease ran out keeps its public side (so callers get
 *   UNAVAILABLE, not NOT_FOUND) but loses its private key and issuer;
 * - per tenant, at most one staged intermediate (the rotation scheduler's next version): held
 *   beside the active one, reported to the KDC, never used to sign; it becomes active only when
 *   an ACTIVATED event carries it;
 * - a quarantine flag: every key dropped, every call refused, until the KDC syncs again;
 * - tombstones of revoked keys, so a caller is told why a key vanished.
 *
 * Every change is computed as a new set, diffed against the old one, swapped in at once and
 * announced to subscribers (WatchKeys, the sealed cache, the KDC report). Lookups on the hot
 * path are map reads and one number comparison.
 */
import { X509Certificate, type KeyObject } from "node:crypto";
import { FailedPrecondition, NotFound, Unavailable } from "../common/errors.js";
import { KeyAlgorithm, KeyPurpose } from "../gen/kmi/common/v1/common_pb.js";
import type { Clock } from "./context.js";
import { kdcLeafIssuer, type KdcLeafSigner, type LeafIssuer, type LeafIssuerFactory } from "./leaf-issuer.js";

/** A secret as the agent receives it (from the KDC, unwrapped, or from the sealed cache). */
export interface SecretInput {
  /** Tenant id. */
  tenantId: string;
  /** INTERMEDIATE_CA or SIGNING. */
  purpose: KeyPurpose;
  /** Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo. */
  keyId: string;
  /** Intermediate version, 0 for signing keys. */
  version: number;
  /** Signing key name, empty for intermediates. */
  name: string;
  /** Key algorithm. */
  keyAlgorithm: KeyAlgorithm;
  /** For intermediates: the intermediate followed by its issuers, PEM. */
  chainPem: string;
  /** Public key, PEM. */
  publicKeyPem: string;
  /** The private key; undefined for an entry whose lease already ran out (from the cache), and when `kdcSigns`. */
  privateKey: KeyObject | undefined;
  /** The key stays in the KDC's token: leaves are signed there (DistributionService.SignLeaf), while the lease lasts. */
  kdcSigns?: boolean;
  /** End of the lease, epoch ms. */
  leaseExpiresAt: number;
  /** When the agent received it, epoch ms. */
  receivedAt: number;
}

/** The intermediate-only parts of a held key, derived once on arrival. */
export interface HeldIntermediate {
  /** The intermediate certificate, DER (first of the chain). */
  certificateDer: Uint8Array;
  /** Its notBefore, epoch ms. */
  notBefore: number;
  /** Its notAfter, epoch ms. */
  notAfter: number;
  /** The ready leaf issuer; undefined once the lease ran out. */
  issuer: LeafIssuer | undefined;
}

/** A key the agent holds. Read-only to everyone but the holder. */
export interface HeldKey extends Readonly<Omit<SecretInput, "privateKey">> {
  /** The private key; undefined once the lease ran out. */
  readonly privateKey: KeyObject | undefined;
  /** True once the lease ran out (until a resync renews it). */
  readonly leaseExpired: boolean;
  /** Set for INTERMEDIATE_CA keys. */
  readonly intermediate: HeldIntermediate | undefined;
}

/** What a holder event says happened. */
export type HolderEventType = "rotated" | "revoked" | "added" | "quarantined" | "lease_expired";

/** One change, announced to subscribers. */
export interface HolderEvent {
  /** What happened. */
  type: HolderEventType;
  /** The tenant concerned; empty for quarantine. */
  tenantId: string;
  /** The keys concerned: the new intermediate (rotated), the dropped keys (revoked, quarantined), the added keys. */
  keys: HeldKey[];
  /** Why (revoke or quarantine reason). */
  reason: string;
  /** When the agent learned it, epoch ms. */
  time: number;
}

/** A subscriber to holder events. Called synchronously after the change is in place. */
export type HolderListener = (events: readonly HolderEvent[]) => void;

/** The KDC link as the holder's error messages describe it. */
export interface LinkDescription {
  /** True while the watch stream is open. */
  connected: boolean;
  /** The last KDC error, when down. */
  error: string;
}

/** Options of {@link KeyHolder}. */
export interface KeyHolderOptions {
  /** Time. */
  clock: Clock;
  /** Makes the leaf issuer of an intermediate. */
  createLeafIssuer: LeafIssuerFactory;
  /** Signs leaves at the KDC, for intermediates whose key the KDC keeps in its token. */
  signAtKdc?: KdcLeafSigner;
  /** Describes the KDC link for UNAVAILABLE messages. */
  describeLink?: () => LinkDescription;
}

/** Why a tenant or key is gone, kept so that a caller is told. */
interface Tombstone {
  reason: string;
  time: number;
}

const MAX_TOMBSTONES = 1024;

/** The held state; replaced as a whole on every change. */
interface HeldState {
  /** Active intermediate per tenant. */
  intermediates: Map<string, HeldKey>;
  /** Signing keys by key id. */
  signingById: Map<string, HeldKey>;
  /** Signing keys by "<tenant_id>/<name>". */
  signingByName: Map<string, HeldKey>;
  /** Intermediates by key id (for the CA-key refusal of Sign). */
  intermediatesById: Map<string, HeldKey>;
  /** Staged intermediate per tenant: newer than the active one, never used to sign. */
  staged: Map<string, HeldKey>;
}

function emptyState(): HeldState {
  return { intermediates: new Map(), signingById: new Map(), signingByName: new Map(), intermediatesById: new Map(), staged: new Map() };
}

/** The keys the agent holds in memory, with their leases, the quarantine flag and events. */
export class KeyHolder {
  private state: HeldState = emptyState();
  private quarantine: Tombstone | undefined;
  private readonly revokedKeys = new Map<string, Tombstone>();
  private readonly revokedTenants = new Map<string, Tombstone>();
  private readonly listeners = new Set<HolderListener>();
  private readonly clock: Clock;
  private readonly issuers: Issuers;
  private readonly describeLink: () => LinkDescription;

  constructor(options: KeyHolderOptions) {
    this.clock = options.clock;
    this.issuers = {
      local: options.createLeafIssuer,
      atKdc: options.signAtKdc ?? (() => Promise.reject(new Unavailable("the agent has no link to the KDC, which holds this tenant's key in its token"))),
    };
    this.describeLink = options.describeLink ?? (() => ({ connected: false, error: "" }));
  }

  /** Subscribes to changes; returns the unsubscribe function. */
  subscribe(listener: HolderListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** The quarantine reason, or undefined when not quarantined. */
  get quarantineReason(): string | undefined {
    return this.quarantine?.reason;
  }

  /** Every key held (lease-expired ones included), by tenant then key id. */
  keys(tenantId = ""): HeldKey[] {
    const all = [...this.state.intermediates.values(), ...this.state.signingById.values()];
    return all
      .filter((k) => tenantId === "" || k.tenantId === tenantId)
      .sort((a, b) => (a.tenantId === b.tenantId ? compare(a.keyId, b.keyId) : compare(a.tenantId, b.tenantId)));
  }

  /** The staged intermediates (one per tenant at most), by tenant. One whose lease ran out is dropped at the next change. */
  stagedKeys(tenantId = ""): HeldKey[] {
    return [...this.state.staged.values()].filter((k) => tenantId === "" || k.tenantId === tenantId).sort((a, b) => compare(a.tenantId, b.tenantId));
  }

  /** The earliest lease end among usable keys (epoch ms), or undefined. */
  nextLeaseExpiry(): number | undefined {
    let next: number | undefined;
    for (const k of this.keys()) if (!k.leaseExpired && (next === undefined || k.leaseExpiresAt < next)) next = k.leaseExpiresAt;
    return next;
  }

  /**
   * Replaces everything held with `secrets` (a SNAPSHOT from the KDC, or the sealed cache at
   * start). Clears the quarantine flag unless `quarantine` is given (a cache written while
   * quarantined). Throws, changing nothing, when a secret is unusable (see {@link buildKey}).
   * Staged versions are dropped, except those in `staged` (the sealed cache's): the KDC sends
   * the ones still staged as STAGED events right after a SNAPSHOT or RESUMED.
   */
  replaceAll(secrets: readonly SecretInput[], quarantine?: { reason: string; time: number }, staged: readonly SecretInput[] = []): HolderEvent[] {
    const next = this.build(secrets, quarantine === undefined ? staged : []);
    this.quarantine = quarantine;
    if (quarantine === undefined) this.revokedTenants.clear();
    return this.swap(next, "no longer released to this machine by the KDC");
  }

  /**
   * Replaces one tenant's keys with `secrets` (an ACTIVATED event: "the new set for that
   * tenant"). Secrets of other tenants in `secrets` are refused.
   */
  replaceTenant(tenantId: string, secrets: readonly SecretInput[]): HolderEvent[] {
    const stray = secrets.find((s) => s.tenantId !== tenantId);
    if (stray !== undefined) throw new FailedPrecondition(`secrets: key ${stray.keyId} belongs to tenant "${stray.tenantId}", not "${tenantId}"`);
    const kept = this.keys().filter((k) => k.tenantId !== tenantId);
    // The staged version stays only while it is still newer than what the tenant now has.
    const next = this.build([...kept, ...secrets], this.stagedKeys());
    this.revokedTenants.delete(tenantId);
    return this.swap(next, `replaced by a new set for tenant "${tenantId}"`);
  }

  /** Adds or updates keys (KEY_ADDED); an intermediate replaces its tenant's current one. */
  upsert(secrets: readonly SecretInput[]): HolderEvent[] {
    const incoming = new Set(secrets.map((s) => s.keyId));
    const incomingIntermediateTenants = new Set(secrets.filter((s) => s.purpose === KeyPurpose.INTERMEDIATE_CA).map((s) => s.tenantId));
    const kept = this.keys().filter(
      (k) => !incoming.has(k.keyId) && !(k.purpose === KeyPurpose.INTERMEDIATE_CA && incomingIntermediateTenants.has(k.tenantId)),
    );
    const next = this.build([...kept, ...secrets], this.stagedKeys());
    for (const t of incomingIntermediateTenants) this.revokedTenants.delete(t);
    return this.swap(next, "replaced");
  }

  /**
   * Holds `secret` as the staged intermediate of its tenant (STAGED): beside the active one,
   * never used to sign, reported to the KDC. Refused when it is not an intermediate, or not
   * newer than the tenant's active version (the KDC never stages an older one). Throws,
   * changing nothing, when it is unusable (see {@link buildKey}).
   */
  stage(secret: SecretInput): void {
    if (this.quarantine !== undefined) throw new FailedPrecondition("machine quarantined: a staged version is not held until the KDC syncs the machine again");
    if (secret.purpose !== KeyPurpose.INTERMEDIATE_CA) throw new FailedPrecondition(`secrets: staged key ${secret.keyId} is not an intermediate CA key`);
    const active = this.state.intermediates.get(secret.tenantId);
    if (active !== undefined && active.version >= secret.version) {
      throw new FailedPrecondition(`secrets: staged version ${secret.version} of tenant "${secret.tenantId}" is not newer than the active version ${active.version}`);
    }
    const others = this.stagedKeys().filter((k) => k.tenantId !== secret.tenantId);
    this.state = this.build(this.keys(), [...others, secret]);
  }

  /** Drops one key now (REVOKED) and remembers why; unknown key ids are remembered too. */
  revoke(keyId: string, reason: string): HolderEvent[] {
    const time = this.clock.now();
    remember(this.revokedKeys, keyId, { reason, time });
    const staged = this.stagedKeys().filter((k) => k.keyId !== keyId);
    const victim = this.state.intermediatesById.get(keyId) ?? this.state.signingById.get(keyId);
    if (victim === undefined) {
      // A revoked staged version is dropped at once; nothing signed with it, so no event.
      if (staged.length !== this.state.staged.size) this.state = this.build(this.keys(), staged);
      return [];
    }
    if (victim.purpose === KeyPurpose.INTERMEDIATE_CA) remember(this.revokedTenants, victim.tenantId, { reason, time });
    else if (victim.name !== "") remember(this.revokedKeys, `${victim.tenantId}/${victim.name}`, { reason, time });
    const next = this.build(this.keys().filter((k) => k.keyId !== keyId), staged);
    const events: HolderEvent[] = [{ type: "revoked", tenantId: victim.tenantId, keys: [victim], reason, time }];
    this.state = next;
    this.emit(events);
    return events;
  }

  /** Drops every key and refuses every call until {@link replaceAll} (QUARANTINED). */
  quarantineMachine(reason: string): HolderEvent[] {
    const time = this.clock.now();
    const dropped = this.keys();
    this.state = emptyState();
    this.quarantine = { reason: reason || "quarantined by the KDC", time };
    const events: HolderEvent[] = [{ type: "quarantined", tenantId: "", keys: dropped, reason: this.quarantine.reason, time }];
    this.emit(events);
    return events;
  }

  /**
   * Marks every key whose lease ran out as expired: its private key and issuer are dropped,
   * its public side stays; a staged version whose lease ran out is dropped. Returns the events
   * (one per tenant), empty when nothing expired.
   */
  expireLeases(): HolderEvent[] {
    const now = this.clock.now();
    const due = this.keys().filter((k) => !k.leaseExpired && k.leaseExpiresAt <= now);
    if (due.length === 0) {
      // A staged version whose lease ran out is dropped (build leaves it out); nothing signed with it.
      if (this.stagedKeys().some((k) => k.leaseExpiresAt <= now)) this.state = this.build(this.keys(), this.stagedKeys());
      return [];
    }
    const dueIds = new Set(due.map((k) => k.keyId));
    const next = this.build(this.keys().map((k) => (dueIds.has(k.keyId) ? { ...k, privateKey: undefined } : k)), this.stagedKeys());
    this.state = next;
    const byTenant = new Map<string, HeldKey[]>();
    for (const k of due) byTenant.set(k.tenantId, [...(byTenant.get(k.tenantId) ?? []), k]);
    const events = [...byTenant].map(
      ([tenantId, keys]): HolderEvent => ({ type: "lease_expired", tenantId, keys, reason: "lease ran out; waiting for the KDC to renew it", time: now }),
    );
    this.emit(events);
    return events;
  }

  /**
   * The usable intermediate of a tenant: quarantine and revocation are FAILED_PRECONDITION, an
   * unknown tenant NOT_FOUND, a lease that ran out UNAVAILABLE.
   */
  intermediateFor(tenantId: string): HeldKey & { intermediate: HeldIntermediate & { issuer: LeafIssuer } } {
    this.refuseIfQuarantined();
    const key = this.state.intermediates.get(tenantId);
    if (key === undefined) {
      const tomb = this.revokedTenants.get(tenantId);
      if (tomb !== undefined) {
        throw new FailedPrecondition(`tenant_id: the intermediate of tenant "${tenantId}" was revoked (${tomb.reason}); wait for a new version to be activated`);
      }
      throw new NotFound(`tenant_id: the agent holds no intermediate for tenant "${tenantId}"; check the tenant id and that this machine's group serves it`);
    }
    this.refuseIfLeaseOver(key);
    return key as HeldKey & { intermediate: HeldIntermediate & { issuer: LeafIssuer } };
  }

  /**
   * The usable signing key named by a key id or "<tenant_id>/<name>". A CA key is
   * FAILED_PRECONDITION: CA keys sign only through IssueLeafCertificate.
   */
  signingKey(ref: string): HeldKey & { privateKey: KeyObject } {
    this.refuseIfQuarantined();
    const key = this.state.signingById.get(ref) ?? this.state.signingByName.get(ref);
    if (key === undefined) {
      const ca = this.state.intermediatesById.get(ref) ?? this.stagedKeys().find((k) => k.keyId === ref);
      if (ca !== undefined) {
        throw new FailedPrecondition(`key ${ref} is an intermediate CA key; CA keys sign only through IssueLeafCertificate`);
      }
      const tomb = this.revokedKeys.get(ref);
      if (tomb !== undefined) throw new FailedPrecondition(`key_id: key ${ref} was revoked (${tomb.reason})`);
      throw new NotFound(`key_id: the agent holds no signing key "${ref}"; list the keys with ListKeys`);
    }
    this.refuseIfLeaseOver(key);
    return key as HeldKey & { privateKey: KeyObject };
  }

  private refuseIfQuarantined(): void {
    if (this.quarantine !== undefined) {
      // Why FAILED_PRECONDITION and not UNAVAILABLE: retrying will not help until an operator acts.
      throw new FailedPrecondition(`machine quarantined: ${this.quarantine.reason}; the agent dropped its keys and refuses to sign until an operator releases the machine`);
    }
  }

  private refuseIfLeaseOver(key: HeldKey): void {
    if (!key.leaseExpired && key.leaseExpiresAt > this.clock.now() && (key.privateKey !== undefined || key.kdcSigns)) return;
    const at = new Date(key.leaseExpiresAt).toISOString();
    const link = this.describeLink();
    const what = `key ${key.keyId} of tenant "${key.tenantId}"`;
    if (link.connected) throw new Unavailable(`${what}: lease ran out at ${at}; waiting for the KDC to renew it, retry shortly`);
    const why = link.error === "" ? "" : ` (${link.error})`;
    throw new Unavailable(`${what}: lease ran out at ${at} and the KDC is unreachable${why}; the agent serves it again once it resyncs with the KDC`);
  }

  /**
   * Builds a full state from secrets and staged intermediates; throws (changing nothing) on an
   * unusable one. A staged intermediate is kept only while it is newer than its tenant's active
   * version and its lease runs.
   */
  private build(secrets: readonly (SecretInput | HeldKey)[], staged: readonly (SecretInput | HeldKey)[] = []): HeldState {
    const next = emptyState();
    const old = this.state;
    const oldStaged = new Map([...old.staged.values()].map((k) => [k.keyId, k]));
    const reuseOf = (keyId: string) => old.intermediatesById.get(keyId) ?? old.signingById.get(keyId) ?? oldStaged.get(keyId);
    for (const s of secrets) {
      const key = buildKey(s, reuseOf(s.keyId), this.clock.now(), this.issuers);
      if (key.purpose === KeyPurpose.INTERMEDIATE_CA) {
        const current = next.intermediates.get(key.tenantId);
        // One active intermediate per tenant: keep the highest version if the set has several.
        if (current === undefined || current.version < key.version) {
          if (current !== undefined) next.intermediatesById.delete(current.keyId);
          next.intermediates.set(key.tenantId, key);
          next.intermediatesById.set(key.keyId, key);
        }
      } else {
        next.signingById.set(key.keyId, key);
        if (key.name !== "") next.signingByName.set(`${key.tenantId}/${key.name}`, key);
      }
    }
    for (const s of staged) {
      if (s.purpose !== KeyPurpose.INTERMEDIATE_CA || s.leaseExpiresAt <= this.clock.now()) continue;
      if ((next.intermediates.get(s.tenantId)?.version ?? 0) >= s.version || (next.staged.get(s.tenantId)?.version ?? 0) >= s.version) continue;
      next.staged.set(s.tenantId, buildKey(s, reuseOf(s.keyId), this.clock.now(), this.issuers));
    }
    return next;
  }

  /** Swaps in `next`, emits the diff, returns it. */
  private swap(next: HeldState, dropReason: string): HolderEvent[] {
    const events = diff(this.state, next, dropReason, this.clock.now());
    this.state = next;
    for (const k of [...next.intermediatesById.keys(), ...next.signingById.keys(), ...next.signingByName.keys()]) this.revokedKeys.delete(k);
    this.emit(events);
    return events;
  }

  private emit(events: readonly HolderEvent[]): void {
    if (events.length === 0) return;
    for (const l of this.listeners) {
      try {
        l(events);
      } catch {
        // A broken subscriber must not stop the others or the change.
      }
    }
  }
}

/** How leaves get signed: with a released key here, or at the KDC for a key in its token. */
interface Issuers {
  local: LeafIssuerFactory;
  atKdc: KdcLeafSigner;
}

/**
 * Turns a secret into a held key. An intermediate gets its certificate parsed and its leaf
 * issuer built (unless its lease ran out); an entry that was held already with the same key
 * keeps its issuer, so lease renewals cost nothing.
 */
function buildKey(s: SecretInput | HeldKey, reuse: HeldKey | undefined, now: number, issuers: Issuers): HeldKey {
  const leaseExpired = (s.privateKey === undefined && !s.kdcSigns) || s.leaseExpiresAt <= now;
  const privateKey = leaseExpired ? undefined : s.privateKey;
  let intermediate: HeldIntermediate | undefined;
  if (s.purpose === KeyPurpose.INTERMEDIATE_CA) {
    // Same key id means the same key (the id is the hash of the public key, and the sync
    // layer checks that the private key matches it), so a lease renewal keeps the parsed
    // certificate and the ready issuer.
    const prior = reuse?.intermediate !== undefined && reuse.chainPem === s.chainPem ? reuse.intermediate : undefined;
    let base: Omit<HeldIntermediate, "issuer">;
    if (prior !== undefined) {
      base = { certificateDer: prior.certificateDer, notBefore: prior.notBefore, notAfter: prior.notAfter };
    } else {
      const first = firstCertificate(s.chainPem, s.keyId);
      base = { certificateDer: first.raw, notBefore: Date.parse(first.validFrom), notAfter: Date.parse(first.validTo) };
    }
    const issuer = leaseExpired ? undefined : (prior?.issuer ?? newIssuer(s, base.certificateDer, privateKey, issuers));
    intermediate = { ...base, issuer };
  }
  return {
    tenantId: s.tenantId,
    purpose: s.purpose,
    keyId: s.keyId,
    version: s.version,
    name: s.name,
    keyAlgorithm: s.keyAlgorithm,
    chainPem: s.chainPem,
    publicKeyPem: s.publicKeyPem,
    leaseExpiresAt: s.leaseExpiresAt,
    receivedAt: s.receivedAt,
    privateKey,
    kdcSigns: s.kdcSigns === true,
    leaseExpired,
    intermediate,
  };
}

/** The leaf issuer of a usable intermediate: at the KDC for a token-held key, else over its released key. */
function newIssuer(s: SecretInput | HeldKey, certificateDer: Uint8Array, privateKey: KeyObject | undefined, issuers: Issuers): LeafIssuer {
  if (s.kdcSigns) return kdcLeafIssuer(s.tenantId, s.version, certificateDer, issuers.atKdc);
  if (privateKey === undefined) throw new FailedPrecondition(`intermediate ${s.keyId}: no private key`);
  return issuers.local(certificateDer, privateKey);
}

function firstCertificate(chainPem: string, keyId: string): X509Certificate {
  const match = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/.exec(chainPem);
  if (match === null) throw new FailedPrecondition(`chain_pem: the intermediate ${keyId} comes without a certificate`);
  try {
    return new X509Certificate(match[0]);
  } catch (err) {
    throw new FailedPrecondition(`chain_pem: the certificate of intermediate ${keyId} does not parse`, { cause: err });
  }
}

/** The events that turn `old` into `next`. */
function diff(old: HeldState, next: HeldState, dropReason: string, time: number): HolderEvent[] {
  const events: HolderEvent[] = [];
  const tenants = new Set([...old.intermediates.keys(), ...next.intermediates.keys()]);
  for (const t of [...tenants].sort()) {
    const a = old.intermediates.get(t);
    const b = next.intermediates.get(t);
    if (b !== undefined && (a === undefined || a.keyId !== b.keyId || (a.leaseExpired && !b.leaseExpired))) {
      events.push({ type: "rotated", tenantId: t, keys: [b], reason: "", time });
    } else if (a !== undefined && b === undefined) {
      events.push({ type: "revoked", tenantId: t, keys: [a], reason: dropReason, time });
    }
  }
  const added = new Map<string, HeldKey[]>();
  const dropped = new Map<string, HeldKey[]>();
  for (const [id, k] of next.signingById) {
    const before = old.signingById.get(id);
    if (before === undefined || (before.leaseExpired && !k.leaseExpired)) added.set(k.tenantId, [...(added.get(k.tenantId) ?? []), k]);
  }
  for (const [id, k] of old.signingById) if (!next.signingById.has(id)) dropped.set(k.tenantId, [...(dropped.get(k.tenantId) ?? []), k]);
  for (const [t, keys] of [...added].sort()) events.push({ type: "added", tenantId: t, keys, reason: "", time });
  for (const [t, keys] of [...dropped].sort()) events.push({ type: "revoked", tenantId: t, keys, reason: dropReason, time });
  return events;
}

function remember(map: Map<string, Tombstone>, key: string, value: Tombstone): void {
  map.delete(key);
  map.set(key, value);
  if (map.size > MAX_TOMBSTONES) map.delete(map.keys().next().value as string);
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The algorithm family of a key, for Sign's algorithm check. */
export function keyFamily(algorithm: KeyAlgorithm): "ec" | "rsa" | undefined {
  switch (algorithm) {
    case KeyAlgorithm.ECDSA_P256:
      return "ec";
    case KeyAlgorithm.RSA_2048:
    case KeyAlgorithm.RSA_3072:
      return "rsa";
    default:
      return undefined;
  }
}
