/**
 * The errors of attestation token verification. Each says precisely why a token was refused,
 * so that the KDC's log and the agent's error name the fix (attest again, use the current
 * certificate, fetch the Auditserver's key), and each is UNAUTHENTICATED on the wire.
 */
import { Unauthenticated } from "../common/errors.js";

/** Why a token was refused. */
export type AttestationTokenProblem =
  /** Not a compact JWS of the expected shape, header or claims. */
  | "malformed"
  /** Signed with a key other than the one given (its `kid` differs). */
  | "unknown_key"
  /** The ES256 signature does not verify. */
  | "bad_signature"
  /** `iss` is not "kmi-audit". */
  | "wrong_issuer"
  /** `exp` has passed. */
  | "expired"
  /** `iat` lies in the future beyond the allowed clock skew. */
  | "not_yet_valid"
  /** `sub` names another machine. */
  | "wrong_machine"
  /** `cnf.x5t#S256` names another certificate. */
  | "wrong_certificate";

/** A refused attestation token; `problem` says why in one word, the message in a sentence. */
export class AttestationTokenError extends Unauthenticated {
  constructor(
    /** Why the token was refused. */
    readonly problem: AttestationTokenProblem,
    message: string,
  ) {
    super(message);
  }
}
