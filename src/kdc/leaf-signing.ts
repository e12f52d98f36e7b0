/**
 * SignLeaf: leaves signed by the KDC with a tenant intermediate held in its PKCS#11 token
 * (custody TOKEN), for the agents of the machines that serve the tenant. The agent checks each
 * request against its own policy first; the KDC checks again (the machine serves the tenant, is
 * not quarantined, the version is the active one and token-held) and builds the leaf with the
 * same builder as the agents (pki/leaf.ts: never a CA, serverAuth, names required, validity
 * capped and clamped to the intermediate's). One ready issuer per version, made on first use.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate, timestampMs } from "@bufbuild/protobuf/wkt";
import { tenClaimServes } from "../attest/index.js";
import { FailedPrecondition, NotFound, PermissionDenied } from "../common/errors.js";
import { SignLeafResponseSchema, type SignLeafResponse } from "../gen/kmi/kdc/v1/distribution_pb.js";
import { VersionState } from "../gen/kmi/kdc/v1/kdc_pb.js";
import type { IntermediateVersionRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import { createLeafIssuer, type LeafIssuer } from "../pki/leaf.js";
import type { AttestedMachine } from "./authz.js";
import type { KdcContext } from "./context.js";
import type { SignLeafInput } from "./validate.js";
import { openVersionKey } from "./version-keys.js";
import { requireNotQuarantined } from "./watch-hub.js";

/** The longest leaf the KDC signs: the CA/Browser Forum's limit (browsers refuse longer). */
export const MAX_SIGNED_LEAF_DAYS = 398;
/** Ready issuers kept (one per token-held version in use). */
const MAX_ISSUERS = 256;

/** Signs leaves with token-held intermediates. */
export class TokenLeafSigner {
  private readonly issuers = new Map<string, LeafIssuer>();
  /** Leaves signed since start. */
  signed = 0;

  constructor(private readonly ctx: Pick<KdcContext, "store" | "quarantine" | "pki" | "sealer" | "rootKeys" | "logger" | "leaseMs" | "clock">) {}

  /** Checks the caller and the version, then signs one leaf. */
  async sign(m: AttestedMachine, i: SignLeafInput): Promise<SignLeafResponse> {
    if (!tenClaimServes(m.attestation.tenantIds, i.tenantId)) {
      throw new PermissionDenied(`tenant_id: machine ${m.machineId} (group ${m.attestation.group}) does not serve tenant "${i.tenantId}"`);
    }
    requireNotQuarantined(this.ctx.quarantine, m.machineId);
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
   * The ready issuer of `version`, when its key is in the token and it may sign: the tenant's
   * active version, or the one it replaced within a lease of its retirement (an agent that has
   * not heard of the activation yet, as an agent holding an escrowed key keeps signing with it).
   */
  private async issuerFor(tenantId: string, version: number): Promise<LeafIssuer> {
    const tenant = await this.ctx.store.getTenant(tenantId);
    if (tenant === undefined) throw new NotFound(`tenant_id: tenant "${tenantId}" does not exist`);
    const v = await this.ctx.store.getVersion(tenantId, version);
    if (v === undefined) throw new NotFound(`version: tenant "${tenantId}" has no version ${version}`);
    if (!this.maySign(tenant.activeVersion, v)) {
      throw new FailedPrecondition(
        `version: ${version} is not the active version of tenant "${tenantId}" (${tenant.activeVersion === 0 ? "none is" : `${tenant.activeVersion} is`}); the agent hears of the change on its watch stream`,
      );
    }
    if (v.tokenKeyLabel === "") {
      throw new FailedPrecondition(`version: version ${version} of tenant "${tenantId}" is escrowed, not held in the token; the agent signs its leaves itself with the released key`);
    }
    const cacheKey = `${tenantId}/${version}/${v.tokenKeyLabel}`;
    let issuer = this.issuers.get(cacheKey);
    if (issuer === undefined) {
      issuer = createLeafIssuer({ certificateDer: v.certificateDer, privateKey: openVersionKey(this.ctx, v).signer, maxValiditySeconds: MAX_SIGNED_LEAF_DAYS * 86_400 });
      if (this.issuers.size >= MAX_ISSUERS) this.issuers.delete(this.issuers.keys().next().value as string);
      this.issuers.set(cacheKey, issuer);
    }
    return issuer;
  }

  private maySign(activeVersion: number, v: IntermediateVersionRecord): boolean {
    if (v.version === activeVersion && v.state === VersionState.ACTIVE) return true;
    if (v.state !== VersionState.RETIRED || v.retiredAt === undefined) return false;
    return timestampMs(v.retiredAt) + this.ctx.leaseMs > this.ctx.clock.now().getTime();
  }
}
