/**
 * Attestation: nonce → evidence (measurements of the configured code and config paths, the
 * software version, the machine id, the nonce, the time), signed with the machine key →
 * a token from the Auditserver. The token is refreshed at 2/3 of its life, so the KDC
 * stream can be reopened with a fresh one before the old one expires.
 */
import type { Client } from "@connectrpc/connect";
import { Code, ConnectError } from "@connectrpc/connect";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { createAttestRequest, FileDigestCache, measureFiles, measureValue, type MeasurementSources, type MeasurementValue } from "../attest/index.js";
import type { Logger } from "../common/logger.js";
import { VERSION } from "../common/version.js";
import type { AuditService } from "../gen/kmi/audit/v1/audit_pb.js";
import type { AttestationStateName, Clock } from "./context.js";
import type { MachineIdentity } from "./identity.js";

/** Name of the software-version measurement: SHA-256 of the version string. */
export const SOFTWARE_VERSION_MEASUREMENT = "software.version";

/** A token from the Auditserver. */
export interface AttestationToken {
  /** The compact JWS. */
  readonly token: string;
  /** When the agent got it, epoch ms. */
  readonly issuedAt: number;
  /** When it expires, epoch ms. */
  readonly expiresAt: number;
}

/** The Auditserver said the machine is quarantined (PERMISSION_DENIED). */
export class MachineQuarantined extends Error {
  override name = "MachineQuarantined";
}

/** When a token is due for refresh: at 2/3 of its life. */
export function tokenRefreshTime(t: AttestationToken): number {
  return t.issuedAt + ((t.expiresAt - t.issuedAt) * 2) / 3;
}

/** What to measure, and how to measure it. */
export interface MeasurementPlan {
  /** Measurement name → path(s). */
  files: MeasurementSources;
  /** Also send "software.version" (SHA-256 of the kmi version string). */
  softwareVersion: boolean;
}

/**
 * Measures a plan (the files each time, so a changed file shows at the next attestation; with
 * a cache, only files whose inode, size, mtime or ctime changed are read again).
 */
export async function measure(plan: MeasurementPlan, cache?: FileDigestCache): Promise<MeasurementValue[]> {
  const out = await measureFiles(plan.files, { cache });
  if (plan.softwareVersion) out.push(measureValue(SOFTWARE_VERSION_MEASUREMENT, VERSION));
  return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/** Holds the current attestation token and gets a new one when due. */
export class Attestor {
  private current: AttestationToken | undefined;
  private inFlight: Promise<AttestationToken> | undefined;
  /** Where attestation stands, for GetStatus. */
  state: AttestationStateName = "not_attested";
  /** Why the last attempt failed. */
  problem = "";
  /** File digests from earlier attestations (node_modules and the node binary are large). */
  private readonly digests = new FileDigestCache();

  constructor(
    private readonly plan: MeasurementPlan,
    private readonly clock: Clock,
    private readonly logger: Logger,
  ) {}

  /** The current token if still valid. */
  get token(): AttestationToken | undefined {
    const t = this.current;
    return t !== undefined && t.expiresAt > this.clock.now() ? t : undefined;
  }

  /** Forgets the token (a new machine certificate, or the KDC refused it). */
  invalidate(): void {
    this.current = undefined;
    if (this.state === "attested") this.state = "not_attested";
  }

  /**
   * A token that is not yet due for refresh: the current one, or a new one from the
   * Auditserver. Concurrent callers share one attestation. Throws MachineQuarantined on
   * PERMISSION_DENIED; other failures are rethrown after recording the problem.
   */
  async fresh(audit: Client<typeof AuditService>, identity: MachineIdentity): Promise<AttestationToken> {
    const t = this.current;
    if (t !== undefined && this.clock.now() < tokenRefreshTime(t)) return t;
    this.inFlight ??= this.attest(audit, identity).finally(() => (this.inFlight = undefined));
    return this.inFlight;
  }

  private async attest(audit: Client<typeof AuditService>, identity: MachineIdentity): Promise<AttestationToken> {
    try {
      const { nonce } = await audit.getAttestationNonce({});
      const measurements = await measure(this.plan, this.digests);
      const req = createAttestRequest(
        { machineId: identity.machineId, nonce, measurements, softwareVersion: VERSION, time: new Date(this.clock.now()) },
        identity.privateKey,
      );
      const res = await audit.attest(req);
      if (res.expiresAt === undefined || res.attestationToken === "") throw new Error("attest: the Auditserver returned no token");
      const token: AttestationToken = { token: res.attestationToken, issuedAt: this.clock.now(), expiresAt: timestampMs(res.expiresAt) };
      this.current = token;
      this.state = "attested";
      this.problem = "";
      this.logger.info("attested", { machine: identity.machineId, expires_at: new Date(token.expiresAt).toISOString(), measurements: measurements.map((m) => m.name) });
      return token;
    } catch (err) {
      const ce = err instanceof ConnectError ? err : undefined;
      const message = ce?.rawMessage ?? (err instanceof Error ? err.message : String(err));
      if (ce?.code === Code.PermissionDenied) {
        this.state = "quarantined";
        this.problem = message;
        this.current = undefined;
        throw new MachineQuarantined(message);
      }
      this.state = ce?.code === Code.FailedPrecondition || ce?.code === Code.Unauthenticated ? "refused" : "not_attested";
      this.problem = message;
      throw err;
    }
  }
}
