/**
 * Authentication and authorization of KDC calls: who is calling (a bearer token, a kmi
 * service over mutual TLS, nobody) and whether that caller may do what it asks. Every
 * handler calls `authenticateToken` (or `authenticatePeer`) first and `authorize` once it
 * has validated the request, so the rules live here and nowhere else.
 */
import { PermissionDenied, Unauthenticated } from "../common/errors.js";
import type { TokenRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import { Role } from "../gen/kmi/kdc/v1/admin_pb.js";
import { bearerFromHeader, parseToken, secretMatches } from "./tokens.js";
import type { RoleName } from "./validate.js";

/** What a verified attestation token says about the machine that presented it. */
export interface MachineAttestation {
  /** Machine group (`grp`). */
  group: string;
  /** Tenants whose secrets the machine may receive (`ten`): `["*"]` means every tenant, `[]` none. */
  tenantIds: readonly string[];
  /** When the token expires (`exp`): watch streams end then. */
  expiresAt: Date;
  /** Token id (`jti`), for the audit log. */
  jti: string;
  /** The machine certificate of the mutual-TLS connection, DER. */
  certificateDer: Uint8Array;
  /**
   * The machine's encryption key from the token (`enc`, DER SPKI): secrets are wrapped to it.
   * Undefined for a machine enrolled without one: the legacy path wraps to the certificate's key.
   */
  encryptionKeyDer: Uint8Array | undefined;
  /** Why the machine is quarantined, when it is (authorize refuses it then). */
  quarantined: string | undefined;
}

/** Who is calling. */
export type Caller =
  /** A bearer token, or a portal session (`sessionId`; `tokenId` is empty when it came from a login link). */
  | { kind: "token"; tokenId: string; role: RoleName; tenantId: string; sessionId?: string }
  | { kind: "service"; name: string }
  | { kind: "machine"; machineId: string; attestation?: MachineAttestation }
  | { kind: "anonymous" };

/** A machine caller whose attestation token verified. */
export type AttestedMachine = { kind: "machine"; machineId: string; attestation: MachineAttestation };

/** What a call requires of its caller. */
export type Requirement =
  /** An operator token. */
  | { kind: "operator" }
  /** An operator token, or a tenant-admin token of this tenant. */
  | { kind: "tenant"; tenantId: string }
  /** A kmi service over mutual TLS (kmi://service/<name>), restricted to `names` when given. */
  | { kind: "service"; names?: readonly string[] }
  /** A machine over mutual TLS (kmi://machine/<id>) with a verified attestation token, not quarantined. */
  | { kind: "attested-machine" }
  /** Anybody. */
  | { kind: "public" };

/**
 * The actor string of the audit log: "token:<id>", "session:<id>" (a portal session from a
 * login link), "service:<name>", "machine:<id>" or "anonymous".
 */
export function actorOf(caller: Caller): string {
  switch (caller.kind) {
    case "token":
      return caller.tokenId === "" && caller.sessionId !== undefined ? `session:${caller.sessionId}` : `token:${caller.tokenId}`;
    case "service":
      return `service:${caller.name}`;
    case "machine":
      return `machine:${caller.machineId}`;
    case "anonymous":
      return "anonymous";
  }
}

/** Looks tokens up by id (the store, in the KDC). */
export interface TokenLookup {
  getToken(tokenId: string): Promise<TokenRecord | undefined>;
}

/**
 * Resolves a bearer token to its caller. No header, a malformed token, an unknown id, a
 * wrong secret, a revoked or an expired token are all the same UNAUTHENTICATED: the message
 * does not tell a guesser which part was wrong.
 */
export async function authenticateToken(authorization: string | null | undefined, tokens: TokenLookup, now: Date): Promise<Caller & { kind: "token" }> {
  const bearer = bearerFromHeader(authorization);
  if (bearer === undefined) {
    throw new Unauthenticated("missing bearer token; send `authorization: Bearer kmi_...` (kmi ctl: --token, --token-file or KMI_CTL_TOKEN)");
  }
  const parsed = parseToken(bearer);
  const record = parsed === undefined ? undefined : await tokens.getToken(parsed.tokenId);
  const valid =
    parsed !== undefined &&
    record !== undefined &&
    secretMatches(parsed.secret, record.secretSha256) &&
    record.revokedAt === undefined &&
    (record.expiresAt === undefined || Number(record.expiresAt.seconds) * 1000 > now.getTime());
  if (!valid || record === undefined) {
    throw new Unauthenticated("invalid, revoked or expired token; ask an operator for a new one (`kmi ctl token create`)");
  }
  return {
    kind: "token",
    tokenId: record.tokenId,
    role: record.role === Role.OPERATOR ? "operator" : "tenant-admin",
    tenantId: record.tenantId,
  };
}

/** The identity of a mutual-TLS peer: the URI SANs of its verified client certificate. */
export interface PeerIdentity {
  uris: readonly string[];
}

/** Resolves a verified client certificate to a service or machine caller (anonymous when none). */
export function callerFromPeer(peer: PeerIdentity | undefined): Caller {
  for (const uri of peer?.uris ?? []) {
    const s = /^kmi:\/\/service\/([a-z0-9][a-z0-9-]{0,62})$/.exec(uri);
    if (s !== null) return { kind: "service", name: s[1]! };
    const m = /^kmi:\/\/machine\/([a-z0-9][a-z0-9-]{0,62})$/.exec(uri);
    if (m !== null) return { kind: "machine", machineId: m[1]! };
  }
  return { kind: "anonymous" };
}

/**
 * The one authorization rule of the KDC. Operators may do everything but peer calls; a
 * tenant-admin only its own tenant's Certificate menu; peer calls need a service certificate.
 */
export function authorize(caller: Caller, need: Requirement): void {
  switch (need.kind) {
    case "public":
      return;
    case "service":
      if (caller.kind !== "service") {
        throw new PermissionDenied("this call is for kmi services only; connect with a kmi://service/<name> client certificate from the infrastructure CA");
      }
      // Minting machine identities is the Auditserver's alone: another kmi service's
      // certificate (a KDC replica, a future service) must not be able to invent machines.
      if (need.names !== undefined && !need.names.includes(caller.name)) {
        throw new PermissionDenied(`this call is for the ${need.names.join(" or ")} service only, not service "${caller.name}"`);
      }
      return;
    case "attested-machine":
      if (caller.kind !== "machine" || caller.attestation === undefined) {
        throw new PermissionDenied("this call is for attested machines only; connect with the machine's kmi://machine/<id> certificate and an attestation token");
      }
      if (caller.attestation.quarantined !== undefined) {
        // The reason is the Auditserver's (an operator's text or the failed measurement name), not a secret.
        throw new PermissionDenied(
          `machine ${caller.machineId} is quarantined (${caller.attestation.quarantined}); it gets no secrets until an operator releases it (\`kmi ctl machine release ${caller.machineId}\`)`,
        );
      }
      return;
    case "operator":
      if (caller.kind === "token" && caller.role === "operator") return;
      throw new PermissionDenied("operator role required; this token is a tenant-admin token (ask an operator)");
    case "tenant":
      if (caller.kind === "token" && (caller.role === "operator" || caller.tenantId === need.tenantId)) return;
      // The message does not say whether the other tenant exists.
      throw new PermissionDenied(`this token may not act on tenant "${need.tenantId}"; use a token of that tenant or an operator token`);
  }
}
