/**
 * Authentication of a machine on the distribution API: the machine certificate of the mutual-TLS
 * connection (kmi://machine/<id>, verified against the infrastructure CA) and an attestation
 * token from the Auditserver bound to that same machine id and that same certificate
 * (src/attest's `verifyAttestationToken`: signature, issuer, expiry, `sub`, `cnf.x5t#S256`).
 * The quarantine status is looked up here and refused by `authorize`; a released machine's
 * token issued before its last quarantine is refused here.
 */
import { fromBase64url, verifyAttestationToken, AttestationTokenError } from "../attest/index.js";
import { Unauthenticated } from "../common/errors.js";
import type { PeerIdentity } from "../common/rpc.js";
import type { Caller } from "./authz.js";
import { callerFromPeer } from "./authz.js";
import type { KdcContext } from "./context.js";

/**
 * Resolves the caller of a distribution call. No certificate or an untrusted one, a missing,
 * malformed, expired, forged or other machine's token, or (once the machine is released) one
 * issued before the machine's last quarantine: Unauthenticated with a message naming what is
 * wrong. A verified certificate of a service (not a machine) comes back as that service
 * (authorize then refuses it). Unavailable while the Auditserver's key is not loaded.
 */
export function authenticateMachine(ctx: Pick<KdcContext, "attestationKey" | "quarantine" | "clock">, peer: PeerIdentity | undefined, token: string): Caller {
  if (peer === undefined) {
    throw new Unauthenticated("client certificate required: connect with the machine certificate (kmi://machine/<id>) from the infrastructure CA, as `kmi agent` does");
  }
  if (!peer.authorized) {
    throw new Unauthenticated(`client certificate not trusted (${peer.authorizationError ?? "unknown reason"}); use the machine certificate issued at enrollment, renewed before it expires`);
  }
  const caller = callerFromPeer(peer);
  if (caller.kind !== "machine") return caller;
  if (token === "") {
    throw new Unauthenticated("attestation_token: required; attest with the Auditserver (AuditService.Attest) and send the token it returns");
  }
  const key = ctx.attestationKey.current();
  let claims;
  try {
    claims = verifyAttestationToken(token, key, { now: ctx.clock.now(), expectedMachineId: caller.machineId, expectedCertSha256: peer.fingerprint256 });
  } catch (err) {
    if (err instanceof AttestationTokenError && err.problem === "unknown_key") ctx.attestationKey.keyMismatch();
    throw err;
  }
  const quarantined = ctx.quarantine.reasonFor(caller.machineId);
  const lastQuarantine = ctx.quarantine.lastQuarantinedAt(caller.machineId);
  // Why: a token vouches for the machine as it was when attested, and lives up to the group's
  // token lifetime; one from before a quarantine must not serve a compromised agent after the
  // release. `iat` has whole seconds, so a token from the quarantine's own second is refused
  // too (the safe side; the agent attests again). While the machine is still quarantined,
  // authorize refuses it with PERMISSION_DENIED instead, which the agent takes as a quarantine.
  if (quarantined === undefined && lastQuarantine !== undefined && claims.iat * 1000 < lastQuarantine.getTime()) {
    throw new Unauthenticated(`attestation token issued before the machine's quarantine at ${lastQuarantine.toISOString()}; attest again`);
  }
  return {
    kind: "machine",
    machineId: caller.machineId,
    attestation: {
      group: claims.grp,
      tenantIds: claims.ten,
      expiresAt: new Date(claims.exp * 1000),
      jti: claims.jti,
      certificateDer: peer.der,
      encryptionKeyDer: claims.enc === undefined ? undefined : fromBase64url(claims.enc),
      quarantined,
    },
  };
}
