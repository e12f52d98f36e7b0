/**
 * SignLeaf: leaves signed by the KDC with a tenant intermediate held in its PKCS#11 token
 * (custody TOKEN), for the agents of the machines that serve the tenant. The agent checks each
 * request against its own policy first; the KDC checks again (the machine serves the tenant, is
 * not quarantined, is within its rate; the version may sign and is token-held; the validity
 * starts about now and is at most {@link MAX_SIGNED_LEAF_DAYS} long) and builds the leaf with the
 * same builder as the agents (pki/leaf.ts: never a CA, serverAuth, names required, clamped to the
 * intermediate's validity). One ready issuer per version, made on first use.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate, timestampMs } from "@bufbuild/protobuf/wkt";
import { tenClaimServes } from "../attest/index.js";
import { FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable } from "../common/errors.js";
import { ClientRateLimiter, type RateLimit } from "../common/rate-limit.js";
import { SignLeafResponseSchema, type SignLeafResponse } from "../gen/kmi/kdc/v1/distribution_pb.js";
import { VersionState } from "../gen/kmi/kdc/v1/kdc_pb.js";
import type { IntermediateVersionRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import { createLeafIssuer, type LeafIssuer } from "../pki/leaf.js";
import type { AttestedMachine } from "./authz.js";
import type { KdcContext } from "./context.js";
import type { SignLeafInput } from "./validate.js";
import { openVersionKey } from "./version-keys.js";
import { requireNotQuarantined } from "./watch-hub.js";

/** The longest leaf the KDC signs, backdating included: the agents' default limit (browsers move to 47 days too). */
export const MAX_SIGNED_LEAF_DAYS = 47;
/** How far before now a leaf may start (the agents backdate by an hour by default). */
export const MAX_BACKDATE_MS = 24 * 3_600_000;
/** How far after now a leaf may start (clocks differ a little). */
export const MAX_FUTURE_START_MS = 5 * 60_000;
/** Leaves a machine may have signed per second, and in a burst (a proxy signs once per new host), unless `kmi kdc --sign-leaf-rate/--sign-leaf-burst` say otherwise. */
export const SIGN_RATE_PER_MACHINE = { perSecond: 50, burst: 500 } as const;
/** Ready issuers kept (one per token-held version in use), least recently used dropped first. */
const MAX_ISSUERS = 256;
const DAY_MS = 86_400_000;

type SignerContext = Pick<KdcContext, "store" | "quarantine" | "pki" | "sealer" | "rootKeys" | "logger" | "leaseMs" | "clock" | "signLeafRate">;

/** Signs leaves with token-held intermediates. */
export class TokenLeafSigner {
  private readonly issuers = new Map<string, LeafIssuer>();
  private readonly limit: RateLimit;
  private readonly rate: ClientRateLimiter;
  /** Leaves signed since start. */
  signed = 0;

  constructor(private readonly ctx: SignerContext) {
    this.limit = ctx.signLeafRate ?? SIGN_RATE_PER_MACHINE;
    this.rate = new ClientRateLimiter(this.limit);
  }

  /** Checks the caller, the version and the validity, then signs one leaf. */
  async sign(m: AttestedMachine, i: SignLeafInput): Promise<SignLeafResponse> {
    if (!tenClaimServes(m.attestation.tenantIds, i.tenantId)) {
      throw new PermissionDenied(`tenant_id: machine ${m.machineId} (group ${m.attestation.group}) does not serve tenant "${i.tenantId}"`);
    }
    requireNotQuarantined(this.ctx.quarantine, m.machineId);
    if (!this.rate.take(m.machineId)) {
      throw new ResourceExhausted(`machine ${m.machineId} asked for more than ${this.limit.perSecond} leaves a second; retry shortly`);
    }
    this.checkValidity(i.notBefore, i.notAfter);
    const issuer = await this.issuerFor(i.tenantId, i.version);
    const leaf = issuer.issueLeafDetailed({
      publicKeySpkiDer: i.publicKeyDer,
      dnsNames: i.dnsNames,
      ipAddresses: i.ipAddresses,
      commonName: i.commonName === "" ? undefined : i.commonName,
      notBefore: i.notBefore,
      notAfter: i.notAfter,
    });
    this.signed++;
    this.ctx.logger.info("leaf signed with a token-held intermediate", {
      machine: m.machineId,
      tenant: i.tenantId,
      version: i.version,
      names: [...leaf.dnsNames, ...leaf.ipAddresses].slice(0, 8),
      serial: leaf.serialHex,
      not_after: leaf.notAfter.toISOString(),
    });
    return create(SignLeafResponseSchema, { certificateDer: leaf.der, serialHex: leaf.serialHex, notAfter: timestampFromDate(leaf.notAfter) });
  }

  /**
   * The validity is the KDC's to judge, on its own clock: it starts about now and is short. Why:
   * a machine that is later quarantined must not hold leaves made to start after that, or to
   * last a year.
   */
  private checkValidity(notBefore: Date, notAfter: Date): void {
    const now = this.ctx.clock.now().getTime();
    if (notBefore.getTime() < now - MAX_BACKDATE_MS || notBefore.getTime() > now + MAX_FUTURE_START_MS) {
      throw new InvalidArgument(`not_before: ${notBefore.toISOString()} is not about now (the KDC's clock says ${new Date(now).toISOString()}); at most a day back, five minutes ahead`);
    }
    if (notAfter.getTime() - notBefore.getTime() > MAX_SIGNED_LEAF_DAYS * DAY_MS) {
      throw new InvalidArgument(`not_after: the leaf would be valid for more than ${MAX_SIGNED_LEAF_DAYS} days; the KDC signs leaves of at most ${MAX_SIGNED_LEAF_DAYS} days (the agent's --max-leaf-lifetime-days must not be higher)`);
    }
  }

  /** The ready issuer of `version`, when it may sign and its key is in this KDC's token. */
  private async issuerFor(tenantId: string, version: number): Promise<LeafIssuer> {
    const tenant = await this.ctx.store.getTenant(tenantId);
    if (tenant === undefined) throw new NotFound(`tenant_id: tenant "${tenantId}" does not exist`);
    const v = await this.ctx.store.getVersion(tenantId, version);
    if (v === undefined) throw new NotFound(`version: tenant "${tenantId}" has no version ${version}`);
    if (!(await this.maySign(tenant.activeVersion, v))) {
      throw new FailedPrecondition(
        `version: ${version} is not the active version of tenant "${tenantId}" (${tenant.activeVersion === 0 ? "none is" : `${tenant.activeVersion} is`}); the agent hears of the change on its watch stream`,
      );
    }
    if (v.tokenKeyLabel === "") {
      throw new FailedPrecondition(`version: version ${version} of tenant "${tenantId}" is escrowed, not held in the token; the agent signs its leaves itself with the released key`);
    }
    return this.cachedIssuer(v);
  }

  /**
   * The tenant's active version signs; so does the one it replaced, retired less than a lease
   * ago (an agent that has not heard of the activation yet, as an agent holding an escrowed key
   * keeps signing with it), unless its key was revoked with another version (a renewal).
   */
  private async maySign(activeVersion: number, v: IntermediateVersionRecord): Promise<boolean> {
    if (v.version === activeVersion && v.state === VersionState.ACTIVE) return true;
    if (v.state !== VersionState.RETIRED || v.retiredAt === undefined) return false;
    if (timestampMs(v.retiredAt) + this.ctx.leaseMs <= this.ctx.clock.now().getTime()) return false;
    const versions = await this.ctx.store.listVersions(v.tenantId);
    return !versions.some((x) => x.keyId === v.keyId && x.state === VersionState.REVOKED);
  }

  /** The issuer of a version that may sign, made once (least recently used dropped first). */
  private cachedIssuer(v: IntermediateVersionRecord): LeafIssuer {
    const key = `${v.tenantId}/${v.version}/${v.tokenKeyLabel}`;
    let issuer = this.issuers.get(key);
    if (issuer !== undefined) {
      this.issuers.delete(key);
    } else {
      // No maxValiditySeconds: checkValidity is the one home of the KDC's lifetime limit.
      issuer = createLeafIssuer({ certificateDer: v.certificateDer, privateKey: this.tokenSigner(v) });
      if (this.issuers.size >= MAX_ISSUERS) this.issuers.delete(this.issuers.keys().next().value as string);
    }
    this.issuers.set(key, issuer);
    return issuer;
  }

  /**
   * The version's key in this KDC's token. A replica without the token or the key answers
   * UNAVAILABLE, so that the agent tries another replica.
   */
  private tokenSigner(v: IntermediateVersionRecord) {
    try {
      return openVersionKey(this.ctx, v).signer;
    } catch (err) {
      if (!(err instanceof FailedPrecondition)) throw err;
      this.ctx.logger.error("cannot sign with a token-held intermediate", { tenant: v.tenantId, version: v.version, error: err });
      throw new Unavailable(`this KDC replica cannot reach the key of version ${v.version} of tenant "${v.tenantId}" (${err.message}); another replica may`);
    }
  }
}
