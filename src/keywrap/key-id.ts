/** Key ids as kmi names keys: lowercase hex SHA-256 of the DER SubjectPublicKeyInfo. */
import { createHash, createPublicKey, type KeyObject } from "node:crypto";

/** The key id of a public key, or of the public half of a private key. */
export function keyIdOf(key: KeyObject): string {
  const publicKey = key.type === "private" ? createPublicKey(key) : key;
  return createHash("sha256").update(publicKey.export({ format: "der", type: "spki" })).digest("hex");
}
