/**
 * The KDC's Sealer: envelope encryption under the master key (storage/seal.ts) and keyed
 * hashes for the audit log, under a key derived from the master key.
 */
import { deriveAuditKey, keyedHash } from "../storage/audit-log.js";
import { open, seal } from "../storage/seal.js";
import type { Sealer } from "./context.js";

/** A Sealer bound to `masterKey` (32 bytes). */
export function createSealer(masterKey: Uint8Array): Sealer {
  const key = new Uint8Array(masterKey);
  const auditKey = deriveAuditKey(key);
  return {
    seal: (plaintext, aad) => seal(key, plaintext, aad),
    open: (blob, aad) => open(key, blob, aad),
    keyedHash: (value) => keyedHash(auditKey, value),
  };
}
