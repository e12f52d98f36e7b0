/**
 * The KDC's Sealer: envelope encryption under the master keyring (storage/keyring.ts, which
 * opens records under the current or, during a rotation, the next key) and keyed hashes for
 * the audit log, under the audit log's HMAC key (storage/log-keys.ts).
 */
import { deriveAuditKey, keyedHash } from "../storage/audit-log.js";
import { MasterKeyring } from "../storage/keyring.js";
import type { Sealer } from "./context.js";

/**
 * A Sealer over `keys`: a keyring and the audit log's HMAC key, or one master key (32 bytes)
 * that both seals and, by HKDF, keys the hashes (a store never rekeyed; init, tests).
 */
export function createSealer(keys: Uint8Array | { keyring: MasterKeyring; hmacKey: Uint8Array }): Sealer {
  const keyring = keys instanceof Uint8Array ? new MasterKeyring(keys) : keys.keyring;
  const auditKey = keys instanceof Uint8Array ? deriveAuditKey(keys) : Buffer.from(keys.hmacKey);
  return {
    seal: (plaintext, aad) => keyring.seal(plaintext, aad),
    open: (blob, aad) => keyring.open(blob, aad),
    keyedHash: (value) => keyedHash(auditKey, value),
  };
}
