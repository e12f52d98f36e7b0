/**
 * The KDC's operations on validated input: tenants, tokens, the intermediate versions of the
 * Certificate menu, signing keys, and service and machine certificates. Each change reads
 * what it needs with revisions, checks everything (./model.ts plans the transition), and then
 * commits all its records together with its audit entry in ONE batch that is conditional on
 * what it read (`guard` in ./kdc-store.ts): a change is whole or absent, never without its log
 * entry, and never based on a stale read — when another change (of this replica or another)
 * won, the batch fails with Conflict and the change runs again on fresh reads
 * (`retryOnConflict`). No lock is held. Refusals are logged by the handler layer.
 */
import { clone, create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { tenClaimServes } from "../attest/index.js";
import { AlreadyExists, FailedPrecondition, InvalidArgument, NotFound } from "../common/errors.js";
import { KeyAlgorithm } from "../gen/kmi/common/v1/common_pb.js";
import { Role } from "../gen/kmi/kdc/v1/admin_pb.js";
import { KeyCustody, Signer, SubjectSchema, VersionState } from "../gen/kmi/kdc/v1/kdc_pb.js";
import {
  IntermediateVersionRecordSchema,
  MachineRolloutRecordSchema,
  SigningKeyRecordSchema,
  TenantRecordSchema,
  TokenRecordSchema,
  type CredentialRecord,
  type IntermediateVersionRecord,
  type MachineRolloutRecord,
  type SigningKeyRecord,
  type TenantRecord,
  type TokenRecord,
} from "../gen/kmi/store/v1/kdc_pb.js";
import { MAX_APPEND_OPS } from "../storage/audit-log.js";
import { notFenced } from "../storage/election.js";
import { retryOnConflict } from "../storage/retry.js";
import { chunk, type BatchOp, type Compare } from "../storage/store.js";
import type { AttestedMachine } from "./authz.js";
import type { CertSummary, Issuer, KdcContext } from "./context.js";
import { CREDENTIAL, credentialAad, guard, intermediateKeyAad, put, signingKeyAad } from "./kdc-store.js";
import { newTenant, nextVersion, pendingExpiry, planActivate, planDiscard, planRevoke, planUpload, requireNotExpired, requireRenewable, stateName, type Validity } from "./model.js";
import { sealedRootKeys } from "./root-keys.js";
import { mintToken } from "./tokens.js";
import { checkTokenKeyRoom, custodyName, custodyOf, makeVersionKey, openVersionKey, requireToken, resolveCustody, tokenKeyInUse, tokenKeyUnused, type NewVersionKey } from "./version-keys.js";
import type { Signer as SignerKey } from "../pki/signer.js";
import type * as V from "./validate.js";

const DAY_S = 24 * 3600;

/** Lowercase algorithm label for audit details. */
export function algorithmLabel(a: KeyAlgorithm): string {
  return a === KeyAlgorithm.ECDSA_P256 ? "ecdsa-p256" : a === KeyAlgorithm.RSA_2048 ? "rsa-2048" : a === KeyAlgorithm.RSA_3072 ? "rsa-3072" : "unspecified";
}

function signerLabel(s: Signer): string {
  return s === Signer.KMI_ROOT ? "kmi-root" : "private-ca";
}

/** Audit target of a version. */
export function versionTarget(tenantId: string, version: number | string): string {
  return `tenant/${tenantId}/version/${version}`;
}

/** The result of a change to versions: the version and, on activation, the one it retired. */
export interface VersionChange {
  version: IntermediateVersionRecord;
  retired?: IntermediateVersionRecord | undefined;
}

/**
 * More to commit with a version change, in the same batch (the rotation scheduler's policy
 * record and its election fence): called on every attempt, after the change is planned, so
 * that what it reads is as fresh as the change's own reads.
 */
export type JointChange = (change: VersionChange) => Promise<{ ops: BatchOp[]; compares: Compare[]; details: Record<string, string> }>;

/** The KDC's operations; one instance per server, over its context. */
export class KdcOperations {
  constructor(private readonly ctx: KdcContext) {}

  private now(): Date {
    return this.ctx.clock.now();
  }

  /**
   * Runs a read-check-write of one tenant: `step` gets the tenant as read now and the compare
   * that conditions its commit on that read (pass it to `audit.append`). A concurrent change of
   * the tenant makes the commit fail with Conflict, and the whole step runs again on fresh reads.
   */
  private tenantChange<T>(tenantId: string, step: (tenant: TenantRecord, guarded: readonly Compare[]) => Promise<T>): Promise<T> {
    return retryOnConflict(async () => {
      const read = await this.ctx.store.readTenant(tenantId);
      if (read.value === undefined) throw new NotFound(`tenant "${tenantId}" not found; see \`kmi ctl tenant list\``);
      return step(read.value, [guard.tenant(tenantId, read.modRevision)]);
    }, { retryIf: notFenced });
  }

  // ---- credentials ----

  /** A KDC credential with its key unsealed (for one signing operation). */
  async issuer(name: string): Promise<Issuer & { record: CredentialRecord }> {
    const record = await this.ctx.store.getCredential(name);
    if (record === undefined || (record.privateKey === undefined && record.tokenKeyLabel === "")) throw new FailedPrecondition(`the KDC has no ${name} credential; run \`kmi kdc init\``);
    return { record, ...(this.ctx.rootKeys ?? sealedRootKeys(this.ctx.pki, this.ctx.sealer)).issuer(record) };
  }

  /** The public certificate of a KDC credential. */
  async credentialCertificate(name: string): Promise<Uint8Array> {
    const record = await this.ctx.store.getCredential(name);
    if (record === undefined) throw new FailedPrecondition(`the KDC has no ${name} credential; run \`kmi kdc init\``);
    return record.certificateDer;
  }

  // ---- tenants ----

  /** The tenant, or NotFound with what to do. */
  async requireTenant(tenantId: string): Promise<TenantRecord> {
    const t = await this.ctx.store.getTenant(tenantId);
    if (t === undefined) throw new NotFound(`tenant "${tenantId}" not found; see \`kmi ctl tenant list\``);
    return t;
  }

  /** Creates a tenant, optionally with an active KMI-signed first version. */
  async createTenant(actor: string, input: V.CreateTenantInput): Promise<TenantRecord> {
    return retryOnConflict(async () => {
      if ((await this.ctx.store.getTenant(input.tenantId)) !== undefined) {
        throw new AlreadyExists(`tenant "${input.tenantId}" exists already; pick another id`);
      }
      let tenant = newTenant(input.tenantId, input.displayName, this.now());
      const ops: BatchOp[] = [];
      const details: Record<string, string> = { display_name: input.displayName };
      if (input.bootstrapKmiSigned) {
        const bootstrap = { keyAlgorithm: KeyAlgorithm.ECDSA_P256, subject: { commonName: "", organization: "", organizationalUnit: "", country: "" }, validityDays: 365, activate: true };
        const made = await this.withNewVersionKey(tenant, bootstrap.keyAlgorithm, KeyCustody.ESCROW, (key) => this.makeKmiSignedVersion(tenant, bootstrap, key));
        tenant = made.tenant;
        ops.push(put.version(made.version));
        details["bootstrap_version"] = String(made.version.version);
        details["key_id"] = made.version.keyId;
      }
      ops.push(put.tenant(tenant));
      await this.ctx.audit.append({ actor, action: "tenant.create", target: `tenant/${input.tenantId}`, outcome: "ok", details }, ops, [guard.tenant(input.tenantId, 0n)]);
      if (tenant.activeVersion !== 0) this.ctx.events.activeChanged(tenant.tenantId);
      return tenant;
    });
  }

  // ---- versions ----

  private defaultSubject(tenant: TenantRecord, version: number, s: V.SubjectInput): V.SubjectInput {
    if (s.commonName !== "") return s;
    const suffix = ` MITM CA ${version}`;
    return { ...s, commonName: tenant.displayName.slice(0, 64 - suffix.length).trimEnd() + suffix };
  }

  /** The validity window of a version's certificate (undefined while PENDING). */
  validityOf(v: IntermediateVersionRecord): Validity | undefined {
    if (v.certificateDer.length === 0) return undefined;
    const s = this.ctx.pki.summarize(v.certificateDer);
    return { notBefore: s.notBefore, notAfter: s.notAfter };
  }

  /** Summary of a version's certificate (undefined while PENDING). */
  summaryOf(v: IntermediateVersionRecord): CertSummary | undefined {
    return v.certificateDer.length === 0 ? undefined : this.ctx.pki.summarize(v.certificateDer);
  }

  /** Signs an intermediate for `spki` with the KMI root (clamped to the root's lifetime). */
  private async kmiSign(spki: Uint8Array, subject: V.SubjectInput, validityDays: number): Promise<Uint8Array> {
    const root = await this.issuer(CREDENTIAL.kmiRoot);
    try {
      return this.ctx.pki.issueIntermediate({ issuer: root, spki, subject, now: this.now(), validitySeconds: validityDays * DAY_S });
    } finally {
      root.pkcs8.fill(0);
    }
  }

  /** Builds a new KMI-signed version (and its activation) without writing it. */
  private async makeKmiSignedVersion(
    tenant: TenantRecord,
    p: { subject: V.SubjectInput; validityDays: number; activate: boolean },
    key: NewVersionKey,
  ): Promise<{ tenant: TenantRecord; version: IntermediateVersionRecord; retired: IntermediateVersionRecord | undefined }> {
    const next = nextVersion(tenant);
    const subject = this.defaultSubject(tenant, next.version, p.subject);
    const cert = await this.kmiSign(key.spki, subject, p.validityDays);
    const record = create(IntermediateVersionRecordSchema, {
      ...this.newVersionBase(tenant, next.version, key),
      state: VersionState.READY,
      signer: Signer.KMI_ROOT,
      certificateDer: cert,
      subject: create(SubjectSchema, subject),
    });
    return this.maybeActivate(next.tenant, record, p.activate);
  }

  /** A PRIVATE_CA version: the key and its CSR, PENDING until the upload. */
  private makeCsrVersion(tenant: TenantRecord, p: { subject: V.SubjectInput }, key: NewVersionKey): { tenant: TenantRecord; version: IntermediateVersionRecord; retired: undefined } {
    const next = nextVersion(tenant);
    const subject = this.defaultSubject(tenant, next.version, p.subject);
    const csr = this.ctx.pki.createCsr({ signer: key.signer, subject });
    const record = create(IntermediateVersionRecordSchema, {
      ...this.newVersionBase(tenant, next.version, key),
      state: VersionState.PENDING,
      signer: Signer.PRIVATE_CA,
      csrDer: csr,
      subject: create(SubjectSchema, subject),
    });
    return { tenant: next.tenant, version: record, retired: undefined };
  }

  /** The fields of a new version record that come from its key. */
  private newVersionBase(tenant: TenantRecord, version: number, key: NewVersionKey) {
    return {
      recordVersion: 1,
      tenantId: tenant.tenantId,
      version,
      keyAlgorithm: key.algorithm,
      keyId: key.keyId,
      ...(key.sealed !== undefined ? { privateKey: key.sealed } : {}),
      tokenKeyLabel: key.tokenKeyLabel,
      publicKeyDer: key.spki,
      createdAt: timestampFromDate(this.now()),
    };
  }

  /**
   * Makes the key of the tenant's next version in `custody` (unspecified: as the tenant's
   * versions say, ./version-keys.ts), builds the version with it, then commits it. A token key
   * is removed again when the build fails, or when after a failed commit no version record
   * holds it (read again: a commit that timed out may have been applied); when that read fails
   * too, the key stays.
   */
  private async withNewVersionKey<T>(
    tenant: TenantRecord,
    algorithm: KeyAlgorithm,
    custody: KeyCustody,
    build: (key: NewVersionKey) => Promise<T> | T,
    commit: (built: T) => Promise<void> = async () => undefined,
  ): Promise<T> {
    const versions = custody === KeyCustody.ESCROW ? [] : await this.ctx.store.listVersions(tenant.tenantId);
    const resolved = resolveCustody(custody, tenant.activeVersion, versions);
    if (resolved === KeyCustody.TOKEN) checkTokenKeyRoom(tenant.tenantId, versions);
    const key = await makeVersionKey(this.ctx, tenant.tenantId, tenant.lastVersion + 1, algorithm, resolved);
    let committing = false;
    try {
      const built = await build(key);
      committing = true;
      await commit(built);
      return built;
    } catch (err) {
      if (!committing) key.discard();
      else if (key.tokenKeyLabel !== "") await this.discardIfUnwritten(tenant.tenantId, key);
      throw err;
    } finally {
      key.wipe();
    }
  }

  /** Removes a new token key that no version record holds (its commit failed); keeps it when that cannot be read. */
  private async discardIfUnwritten(tenantId: string, key: NewVersionKey): Promise<void> {
    try {
      if (!tokenKeyInUse(key.tokenKeyLabel, await this.ctx.store.listVersions(tenantId))) key.discard();
    } catch (err) {
      this.ctx.logger.warn("a new token key may be left unused in the token (its version's commit failed and the store could not be read)", { tenant: tenantId, token_key_label: key.tokenKeyLabel, error: err as Error });
    }
  }

  private async maybeActivate(
    tenant: TenantRecord,
    record: IntermediateVersionRecord,
    activate: boolean,
  ): Promise<{ tenant: TenantRecord; version: IntermediateVersionRecord; retired: IntermediateVersionRecord | undefined }> {
    if (!activate) return { tenant, version: record, retired: undefined };
    const current = tenant.activeVersion === 0 ? undefined : await this.ctx.store.getVersion(tenant.tenantId, tenant.activeVersion);
    const plan = planActivate(tenant, record, current, this.validityOf(record), this.now());
    return { tenant: plan.tenant, version: plan.activated, retired: plan.retired };
  }

  /** CreateVersion: a new key; KMI-signed (READY, optionally ACTIVE) or a CSR (PENDING). */
  async createVersion(actor: string, input: V.CreateVersionInput, joint?: JointChange): Promise<VersionChange> {
    return this.tenantChange(input.tenantId, async (tenant, guarded) => {
      const result = await this.withNewVersionKey(
        tenant,
        input.keyAlgorithm,
        input.keyCustody ?? KeyCustody.UNSPECIFIED,
        (key) => (input.signer === Signer.KMI_ROOT ? this.makeKmiSignedVersion(tenant, input, key) : this.makeCsrVersion(tenant, input, key)),
        (r) =>
          this.commitVersionChange(actor, "ca.version.create", r, {
            signer: signerLabel(input.signer),
            algorithm: algorithmLabel(r.version.keyAlgorithm),
            key_custody: custodyName(custodyOf(r.version)),
          }, guarded, joint),
      );
      return { version: result.version, retired: result.retired };
    });
  }

  private async commitVersionChange(
    actor: string,
    action: string,
    r: { tenant: TenantRecord; version: IntermediateVersionRecord; retired?: IntermediateVersionRecord | undefined },
    extra: Record<string, string>,
    guarded: readonly Compare[],
    joint?: JointChange,
  ): Promise<void> {
    const more = await joint?.({ version: r.version, retired: r.retired });
    const ops = [put.tenant(r.tenant), put.version(r.version), ...(more?.ops ?? [])];
    const details: Record<string, string> = { ...extra, ...more?.details, key_id: r.version.keyId, state: stateName(r.version.state) };
    if (r.version.certificateDer.length > 0) details["sha256"] = this.ctx.pki.summarize(r.version.certificateDer).sha256Fingerprint;
    if (r.retired !== undefined) {
      ops.push(put.version(r.retired));
      details["retired_version"] = String(r.retired.version);
    }
    await this.ctx.audit.append({ actor, action, target: versionTarget(r.tenant.tenantId, r.version.version), outcome: "ok", details }, ops, [...guarded, ...(more?.compares ?? [])]);
    // Agents hear of a new active version once it is committed (never before).
    if (r.version.state === VersionState.ACTIVE) this.ctx.events.activeChanged(r.tenant.tenantId);
  }

  private async requireVersion(tenantId: string, version: number): Promise<IntermediateVersionRecord> {
    const v = await this.ctx.store.getVersion(tenantId, version);
    if (v === undefined) throw new NotFound(`tenant "${tenantId}" has no version ${version}; see \`kmi ctl ca history --tenant ${tenantId}\``);
    return v;
  }

  /** RenewVersion: a new version for an existing version's key. */
  async renewVersion(actor: string, input: V.RenewVersionInput): Promise<VersionChange> {
    return this.tenantChange(input.tenantId, async (tenant, guarded) => {
      const source = await this.requireVersion(input.tenantId, input.version);
      requireRenewable(source);
      if (source.privateKey === undefined && source.tokenKeyLabel === "") throw new FailedPrecondition(`version ${source.version} has no key`);
      const next = nextVersion(tenant);
      const subject: V.SubjectInput = {
        commonName: source.subject?.commonName ?? "",
        organization: source.subject?.organization ?? "",
        organizationalUnit: source.subject?.organizationalUnit ?? "",
        country: source.subject?.country ?? "",
      };
      const base = {
        recordVersion: 1,
        tenantId: tenant.tenantId,
        version: next.version,
        signer: input.signer,
        keyAlgorithm: source.keyAlgorithm,
        keyId: source.keyId,
        // The same key, so the same sealed blob (its AAD names the key, not the version), or the same token key.
        ...(source.privateKey !== undefined ? { privateKey: source.privateKey } : {}),
        tokenKeyLabel: source.tokenKeyLabel,
        publicKeyDer: source.publicKeyDer,
        createdAt: timestampFromDate(this.now()),
        renewedFrom: source.version,
        subject: source.subject,
      };
      let result: { tenant: TenantRecord; version: IntermediateVersionRecord; retired: IntermediateVersionRecord | undefined };
      if (input.signer === Signer.KMI_ROOT) {
        const cert = await this.kmiSign(source.publicKeyDer, subject, input.validityDays);
        const record = create(IntermediateVersionRecordSchema, { ...base, state: VersionState.READY, certificateDer: cert });
        result = await this.maybeActivate(next.tenant, record, input.activate);
      } else {
        const csr = this.withVersionKey(source, (signer) => this.ctx.pki.createCsr({ signer, subject }));
        result = { tenant: next.tenant, version: create(IntermediateVersionRecordSchema, { ...base, state: VersionState.PENDING, csrDer: csr }), retired: undefined };
      }
      await this.commitVersionChange(actor, "ca.version.renew", result, { signer: signerLabel(input.signer), renewed_from: String(source.version) }, guarded);
      return { version: result.version, retired: result.retired };
    });
  }

  /** UploadIntermediate: every check first, then PENDING -> READY (-> ACTIVE) in one batch. */
  async uploadIntermediate(actor: string, input: V.UploadInput): Promise<VersionChange> {
    return this.tenantChange(input.tenantId, async (tenant, guarded) => {
      let target: IntermediateVersionRecord | undefined;
      if (input.version === 0) {
        target = (await this.ctx.store.listVersions(input.tenantId)).find((v) => v.state === VersionState.PENDING);
        if (target === undefined) {
          throw new FailedPrecondition(`tenant "${input.tenantId}" has no pending version; make one with \`kmi ctl ca csr --tenant ${input.tenantId}\``);
        }
      } else target = await this.requireVersion(input.tenantId, input.version);
      planUpload(target, new Uint8Array(), undefined); // state check before the certificate checks
      requireNotExpired(target, this.ctx.pendingTtlMs, this.now());
      const kept = await this.keptCustomerRoot(tenant);
      const root = input.customerRoot ?? kept; // undefined on a first upload without one: refused by the checks
      const checked = this.withVersionKey(target, (signer) =>
        this.ctx.pki.checkUpload({
          certificate: input.certificate,
          customerRoot: root,
          expectedSpki: target.publicKeyDer,
          csr: target.csrDer,
          signer,
          now: this.now(),
          pendingVersion: target.version,
        }),
      );
      const uploaded = planUpload(target, checked.certificateDer, checked.customerRootDer);
      const withRoot = clone(TenantRecordSchema, tenant);
      withRoot.customerRootDer = checked.customerRootDer;
      const result = await this.maybeActivate(withRoot, uploaded, input.activate);
      const details: Record<string, string> = {
        customer_root_sha256: this.ctx.pki.summarize(checked.customerRootDer).sha256Fingerprint,
        customer_root: input.customerRoot === undefined ? "kept" : "given",
      };
      if (kept !== undefined && !Buffer.from(kept).equals(checked.customerRootDer)) details["customer_root_changed"] = "true";
      await this.commitVersionChange(actor, "ca.version.upload", result, details, guarded);
      return { version: result.version, retired: result.retired };
    });
  }

  /**
   * The customer root kept with the tenant: the tenant record's, or for a tenant whose last
   * upload predates that field, the newest version's that has one. Undefined before the first.
   */
  private async keptCustomerRoot(tenant: TenantRecord): Promise<Uint8Array | undefined> {
    if (tenant.customerRootDer.length > 0) return tenant.customerRootDer;
    const versions = await this.ctx.store.listVersions(tenant.tenantId);
    return versions.find((v) => v.customerRootDer.length > 0)?.customerRootDer;
  }

  /** Runs `f` with a version's key opened for signatures (unsealed and wiped afterwards, or in the token). */
  private withVersionKey<T>(v: IntermediateVersionRecord, f: (signer: SignerKey) => T): T {
    const key = openVersionKey(this.ctx, v);
    try {
      return f(key.signer);
    } finally {
      key.wipe();
    }
  }

  /** ActivateVersion: READY/RETIRED -> ACTIVE, the previous active -> RETIRED, in one batch. */
  async activateVersion(actor: string, input: V.TenantVersionInput, joint?: JointChange): Promise<VersionChange> {
    return this.tenantChange(input.tenantId, async (tenant, guarded) => {
      const target = await this.requireVersion(input.tenantId, input.version);
      const current = tenant.activeVersion === 0 ? undefined : await this.ctx.store.getVersion(tenant.tenantId, tenant.activeVersion);
      const plan = planActivate(tenant, target, current, this.validityOf(target), this.now());
      await this.commitVersionChange(actor, "ca.version.activate", { tenant: plan.tenant, version: plan.activated, retired: plan.retired }, {}, guarded, joint);
      return { version: plan.activated, retired: plan.retired };
    });
  }

  /** RevokeVersion. */
  async revokeVersion(actor: string, input: V.RevokeVersionInput): Promise<IntermediateVersionRecord> {
    return this.tenantChange(input.tenantId, async (tenant, guarded) => {
      const target = await this.requireVersion(input.tenantId, input.version);
      const plan = planRevoke(tenant, target, input.reason, input.allowActive, this.now());
      await this.ctx.audit.append(
        {
          actor,
          action: "ca.version.revoke",
          target: versionTarget(input.tenantId, input.version),
          outcome: "ok",
          details: { reason: input.reason, was_active: String(plan.wasActive), key_id: target.keyId },
        },
        [put.tenant(plan.tenant), put.version(plan.revoked)],
        guarded,
      );
      // A renewal shares its key with the version it renewed: a key still used by the active
      // version is not revoked on the agents (only this version's certificate is).
      const active = plan.tenant.activeVersion === 0 ? undefined : await this.ctx.store.getVersion(input.tenantId, plan.tenant.activeVersion);
      if (active?.keyId !== target.keyId) this.ctx.events.keyRevoked(input.tenantId, target.keyId, input.reason);
      await this.destroyTokenKeyIfUnused(actor, plan.revoked);
      return plan.revoked;
    });
  }

  /** DiscardPendingVersion: PENDING -> DISCARDED (its sealed key erased), audited, in one batch. */
  async discardPendingVersion(actor: string, input: V.DiscardVersionInput): Promise<IntermediateVersionRecord> {
    return this.tenantChange(input.tenantId, async (tenant, guarded) => {
      const target = await this.requireVersion(input.tenantId, input.version);
      const end = pendingExpiry(target, this.ctx.pendingTtlMs);
      const discarded = planDiscard(target, input.reason, this.now());
      const details: Record<string, string> = { key_id: target.keyId, was_expired: String(end !== undefined && end <= this.now()) };
      if (input.reason !== "") details["reason"] = input.reason;
      await this.ctx.audit.append(
        { actor, action: "ca.version.discard", target: versionTarget(input.tenantId, input.version), outcome: "ok", details },
        // The tenant record is written back unchanged: its revision moves, so an upload or
        // activation of this version racing the discard (guarded on the tenant) conflicts and
        // rereads the version as DISCARDED instead of bringing back its erased key.
        [put.version(discarded), put.tenant(tenant)],
        guarded,
      );
      await this.destroyTokenKeyIfUnused(actor, discarded);
      return discarded;
    });
  }

  /**
   * After a version was revoked or discarded (committed): its token key is destroyed when no
   * other version uses it (renewals share a key), audited first ("ca.version.key_destroy",
   * fail-closed: no entry, no destruction). Best effort: a failure is logged, and the key, which
   * no version can use any more, stays in the token for an operator to remove.
   */
  private async destroyTokenKeyIfUnused(actor: string, gone: IntermediateVersionRecord): Promise<void> {
    const label = gone.tokenKeyLabel;
    if (label === "") return;
    const log = { tenant: gone.tenantId, version: gone.version, token_key_label: label };
    try {
      if (!tokenKeyUnused(label, gone, await this.ctx.store.listVersions(gone.tenantId))) return;
      const token = requireToken(this.ctx, "destroying the key");
      await this.ctx.audit.append({ actor, action: "ca.version.key_destroy", target: versionTarget(gone.tenantId, gone.version), outcome: "ok", details: { key_id: gone.keyId, token_key_label: label } });
      token.destroyKey(label);
      this.ctx.logger.info("token key destroyed: no version uses it any more", log);
    } catch (err) {
      this.ctx.logger.warn("token key left in the token: remove it with pkcs11-tool --delete-object --type privkey --label", { ...log, error: err as Error });
    }
  }

  /** The version to download: `version`, or the active one when 0. */
  async versionForDownload(tenantId: string, version: number): Promise<IntermediateVersionRecord> {
    const tenant = await this.requireTenant(tenantId);
    if (version === 0) {
      if (tenant.activeVersion === 0) {
        throw new FailedPrecondition(`tenant "${tenantId}" has no active version; give --version, or activate one (\`kmi ctl ca activate\`)`);
      }
      version = tenant.activeVersion;
    }
    const v = await this.requireVersion(tenantId, version);
    if (v.certificateDer.length === 0) {
      throw new FailedPrecondition(`version ${version} is pending and has no certificate yet; upload it (\`kmi ctl ca upload\`) or download its CSR (\`kmi ctl ca csr --version ${version}\`)`);
    }
    return v;
  }

  /** The root a version chains to: the KMI root, or the customer root given at upload. */
  async rootOf(v: IntermediateVersionRecord): Promise<Uint8Array | undefined> {
    if (v.signer === Signer.KMI_ROOT) return this.credentialCertificate(CREDENTIAL.kmiRoot);
    return v.customerRootDer.length > 0 ? v.customerRootDer : undefined;
  }

  /** A tenant's history, newest first. */
  async listVersions(tenantId: string): Promise<IntermediateVersionRecord[]> {
    await this.requireTenant(tenantId);
    return this.ctx.store.listVersions(tenantId);
  }

  /** The CSR of a PENDING version. */
  async versionCsr(input: V.TenantVersionInput): Promise<Uint8Array> {
    await this.requireTenant(input.tenantId);
    const v = await this.requireVersion(input.tenantId, input.version);
    if (v.state !== VersionState.PENDING || v.csrDer.length === 0) {
      throw new FailedPrecondition(`version ${v.version} is ${stateName(v.state)}, not pending; only a pending version has a CSR to sign`);
    }
    requireNotExpired(v, this.ctx.pendingTtlMs, this.now());
    return v.csrDer;
  }

  /**
   * The private key of a version, unsealed (PKCS#8 DER): the one place a release to an
   * attested machine will take it from. The caller zeroes it after use.
   */
  async unsealVersionKey(tenantId: string, version: number): Promise<Uint8Array> {
    const v = await this.requireVersion(tenantId, version);
    if (v.privateKey === undefined) throw new FailedPrecondition(`version ${version} has no key`);
    return this.ctx.sealer.open(v.privateKey, intermediateKeyAad(tenantId, v.keyId));
  }

  // ---- signing keys ----

  /** CreateSigningKey. */
  async createSigningKey(actor: string, input: V.CreateSigningKeyInput): Promise<SigningKeyRecord> {
    return retryOnConflict(async () => {
      await this.requireTenant(input.tenantId);
      if ((await this.ctx.store.getSigningKey(input.tenantId, input.name)) !== undefined) {
        throw new AlreadyExists(`tenant "${input.tenantId}" has a signing key "${input.name}" already; pick another name`);
      }
      const key = await this.ctx.pki.generateKey(input.keyAlgorithm);
      try {
        const record = create(SigningKeyRecordSchema, {
          recordVersion: 1,
          tenantId: input.tenantId,
          name: input.name,
          keyId: key.keyId,
          keyAlgorithm: key.algorithm,
          publicKeyDer: key.spki,
          privateKey: this.ctx.sealer.seal(key.pkcs8, signingKeyAad(input.tenantId, input.name)),
          createdAt: timestampFromDate(this.now()),
        });
        await this.ctx.audit.append(
          { actor, action: "signing-key.create", target: `tenant/${input.tenantId}/signing-key/${input.name}`, outcome: "ok", details: { key_id: key.keyId, algorithm: algorithmLabel(key.algorithm) } },
          [put.signingKey(record)],
          [guard.signingKey(input.tenantId, input.name, 0n)],
        );
        this.ctx.events.signingKeyAdded(input.tenantId, input.name);
        return record;
      } finally {
        key.pkcs8.fill(0);
      }
    });
  }

  /** RevokeSigningKey. */
  async revokeSigningKey(actor: string, input: V.RevokeSigningKeyInput): Promise<SigningKeyRecord> {
    return retryOnConflict(async () => {
      await this.requireTenant(input.tenantId);
      const read = await this.ctx.store.readSigningKey(input.tenantId, input.name);
      const key = read.value;
      if (key === undefined) throw new NotFound(`tenant "${input.tenantId}" has no signing key "${input.name}"; see \`ListSigningKeys\``);
      if (key.revokedAt !== undefined) throw new FailedPrecondition(`signing key "${input.name}" is already revoked`);
      const revoked = create(SigningKeyRecordSchema, { ...key, revokedAt: timestampFromDate(this.now()), revokeReason: input.reason });
      await this.ctx.audit.append(
        { actor, action: "signing-key.revoke", target: `tenant/${input.tenantId}/signing-key/${input.name}`, outcome: "ok", details: { key_id: key.keyId, reason: input.reason } },
        [put.signingKey(revoked)],
        [guard.signingKey(input.tenantId, input.name, read.modRevision)],
      );
      this.ctx.events.keyRevoked(input.tenantId, key.keyId, input.reason);
      return revoked;
    });
  }

  // ---- rollout ----

  /**
   * ReportHeldVersions: one rollout record per tenant the machine serves (the tenants of the
   * token's `ten`, every tenant for `["*"]`, none for `[]`), holding the intermediate version it
   * reports for that tenant (the active one when it holds it, else the newest; 0 when none), in
   * one batch with its audit entry. An entry whose key id is not its version's key is not
   * believed (recorded as not held).
   *
   * A machine serving more tenants than one commit can carry (`MAX_APPEND_OPS`, from etcd's 128
   * ops per transaction) is recorded in several batches, each with its own entry ("part" k/n).
   * Each record stands alone (one tenant's rollout), so a report cut short by a failure leaves
   * the other tenants' records as they were, never a record half written; the agent reports again.
   */
  async reportHeldVersions(caller: AttestedMachine, input: V.ReportHeldVersionsInput): Promise<MachineRolloutRecord[]> {
    const a = caller.attestation;
    const tenants = (await this.ctx.store.listTenants()).filter((t) => tenClaimServes(a.tenantIds, t.tenantId));
    const now = timestampFromDate(this.now());
    const records: MachineRolloutRecord[] = [];
    let mismatched = 0;
    for (const t of tenants) {
      const held = input.held.filter((h) => h.tenantId === t.tenantId && h.version > 0).sort((x, y) => y.version - x.version);
      let pick: V.HeldKeyInput | undefined = held.find((h) => h.version === t.activeVersion) ?? held[0];
      if (pick !== undefined && !(await this.heldKeyMatches(t.tenantId, pick))) {
        mismatched++;
        pick = undefined;
      }
      // The newest held (a version staged by the rotation scheduler), believed only with its key id.
      const newest = held[0] !== undefined && held[0] !== pick && (await this.heldKeyMatches(t.tenantId, held[0])) ? held[0] : pick;
      records.push(
        create(MachineRolloutRecordSchema, {
          recordVersion: 1,
          tenantId: t.tenantId,
          machineId: caller.machineId,
          group: a.group,
          heldVersion: pick?.version ?? 0,
          keyId: pick?.keyId ?? "",
          lastReport: now,
          newestHeldVersion: Math.max(pick?.version ?? 0, newest?.version ?? 0),
        }),
      );
    }
    const tenantSet = new Set(tenants.map((t) => t.tenantId));
    const totals = {
      entries: String(input.held.length),
      not_served: String(input.held.filter((h) => !tenantSet.has(h.tenantId)).length),
      key_mismatch: String(mismatched),
      group: a.group,
    };
    // A report that names no tenant is still recorded: one entry.
    const parts = records.length === 0 ? [[]] : chunk(records, MAX_APPEND_OPS);
    for (const [i, part] of parts.entries()) {
      const joined = part.map((r) => `${r.tenantId}:${r.heldVersion === 0 ? "-" : `v${r.heldVersion}`}`).join(",");
      await this.ctx.audit.append(
        {
          actor: `machine:${caller.machineId}`,
          action: "rollout.report",
          target: `machine/${caller.machineId}`,
          outcome: "ok",
          details: {
            held: joined.length > 3800 ? `${joined.slice(0, 3800)}...` : joined,
            ...totals,
            ...(parts.length > 1 ? { part: `${i + 1}/${parts.length}` } : {}),
          },
        },
        part.map((r) => put.rollout(r)),
      );
    }
    return records;
  }

  private async heldKeyMatches(tenantId: string, h: V.HeldKeyInput): Promise<boolean> {
    return (await this.ctx.store.getVersion(tenantId, h.version))?.keyId === h.keyId;
  }

  // ---- tokens ----

  /** CreateToken: returns the record and the bearer secret (shown once). */
  async createToken(actor: string, input: V.CreateTokenInput): Promise<{ record: TokenRecord; bearer: string }> {
    if (input.role === "tenant-admin") await this.requireTenant(input.tenantId);
    // A new id each attempt: the commit is conditional on the id being unused.
    return retryOnConflict(() => this.commitNewToken(actor, input));
  }

  private async commitNewToken(actor: string, input: V.CreateTokenInput): Promise<{ record: TokenRecord; bearer: string }> {
    const minted = mintToken();
    const now = this.now();
    const record = create(TokenRecordSchema, {
      recordVersion: 1,
      tokenId: minted.tokenId,
      secretSha256: minted.secretSha256,
      role: input.role === "operator" ? Role.OPERATOR : Role.TENANT_ADMIN,
      tenantId: input.tenantId,
      description: input.description,
      createdAt: timestampFromDate(now),
      ...(input.ttlSeconds > 0 ? { expiresAt: timestampFromDate(new Date(now.getTime() + input.ttlSeconds * 1000)) } : {}),
    });
    await this.ctx.audit.append(
      {
        actor,
        action: "token.create",
        target: `token/${minted.tokenId}`,
        outcome: "ok",
        // The secret appears only as a keyed hash.
        details: { role: input.role, tenant: input.tenantId, ttl_seconds: String(input.ttlSeconds), secret: this.ctx.sealer.keyedHash(minted.bearer) },
      },
      [put.token(record)],
      [guard.token(minted.tokenId, 0n)],
    );
    return { record, bearer: minted.bearer };
  }

  /** RevokeToken. */
  async revokeToken(actor: string, tokenId: string): Promise<TokenRecord> {
    return retryOnConflict(async () => {
      const read = await this.ctx.store.readToken(tokenId);
      const t = read.value;
      if (t === undefined) throw new NotFound(`token ${tokenId} not found; see \`kmi ctl token list\``);
      if (t.revokedAt !== undefined) throw new FailedPrecondition(`token ${tokenId} is already revoked`);
      const revoked = create(TokenRecordSchema, { ...t, revokedAt: timestampFromDate(this.now()) });
      await this.ctx.audit.append(
        { actor, action: "token.revoke", target: `token/${tokenId}`, outcome: "ok", details: { role: t.role === Role.OPERATOR ? "operator" : "tenant-admin", tenant: t.tenantId } },
        [put.token(revoked)],
        [guard.token(tokenId, read.modRevision)],
      );
      return revoked;
    });
  }

  // ---- service and machine certificates ----

  private async issueFromInfra(
    actor: string,
    action: string,
    target: string,
    issue: (infra: Issuer, now: Date) => Uint8Array,
  ): Promise<{ certificateDer: Uint8Array; caDer: Uint8Array; notAfter: Date }> {
    const infra = await this.issuer(CREDENTIAL.infraCa);
    try {
      const der = issue(infra, this.now());
      const info = this.ctx.pki.summarize(der);
      await this.ctx.audit.append({ actor, action, target, outcome: "ok", details: { serial: info.serialHex, sha256: info.sha256Fingerprint, not_after: info.notAfter.toISOString() } }, []);
      return { certificateDer: der, caDer: infra.certificateDer, notAfter: info.notAfter };
    } finally {
      infra.pkcs8.fill(0);
    }
  }

  /** IssueServiceCertificate: a TLS server (and client) certificate of a kmi service. */
  async issueServiceCertificate(actor: string, input: V.IssueServiceCertificateInput) {
    const csr = this.ctx.pki.checkCsr(input.csrPem, "csr_pem");
    return this.issueFromInfra(actor, "service-cert.issue", `service/${input.serviceName}`, (issuer, now) =>
      this.ctx.pki.issueServiceCertificate({
        issuer,
        serviceName: input.serviceName,
        spki: csr.spki,
        dnsNames: input.dnsNames,
        ipAddresses: input.ipAddresses,
        now,
        validitySeconds: input.validityDays * DAY_S,
      }),
    );
  }

  /** IssueMachineCertificate: a short-lived client certificate of an enrolled machine. */
  async issueMachineCertificate(actor: string, input: V.IssueMachineCertificateInput) {
    const csr = this.ctx.pki.checkCsr(input.csrPem, "csr_pem");
    if (csr.algorithm !== KeyAlgorithm.ECDSA_P256) {
      throw new InvalidArgument("csr_pem: a machine key must be ECDSA P-256; make it with `openssl ecparam -name prime256v1 -genkey`");
    }
    return this.issueFromInfra(actor, "machine-cert.issue", `machine/${input.machineId}`, (issuer, now) =>
      this.ctx.pki.issueMachineCertificate({ issuer, machineId: input.machineId, group: input.group, spki: csr.spki, now, validitySeconds: input.ttlSeconds }),
    );
  }
}
