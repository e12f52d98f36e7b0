/**
 * A master key file whose key is wrapped by an AES-256 key inside a PKCS#11 token
 * (`kmi kdc init --master-key-wrap pkcs11`). The file holds one JSON document:
 *
 * | field        | holds                                                               |
 * |--------------|---------------------------------------------------------------------|
 * | `format`     | `kmi-wrapped-master-key/1`                                          |
 * | `token`      | the token's label (for messages: which token to start with)         |
 * | `key_label`  | CKA_LABEL of the wrapping key in the token                          |
 * | `key_id`     | the master key's id (as in every envelope's `master_key_id`)        |
 * | `nonce`      | AES-GCM nonce, base64                                               |
 * | `sealed`     | the master key encrypted inside the token, ciphertext and tag, base64 |
 *
 * The AES-GCM additional data binds the ciphertext to its label and key id. Without the token
 * (and its PIN) the file is useless; the token's key is sensitive and not extractable, so the
 * master key exists in plaintext only in the memory of a process logged in to the token.
 */
import { FailedPrecondition, errorText } from "../common/errors.js";
import { KEY_BYTES, masterKeyId } from "./seal.js";

/** The token operations a wrap needs (`Pkcs11Token` has them). */
export interface WrappingToken {
  /** The token's label. */
  readonly label: string;
  encryptAesGcm(label: string, plaintext: Uint8Array, aad: Uint8Array): { nonce: Buffer; sealed: Buffer };
  decryptAesGcm(label: string, nonce: Uint8Array, sealed: Uint8Array, aad: Uint8Array): Buffer;
}

/** The token that opens wrapped master key files and, with `keyLabel`, wraps new ones. */
export interface MasterKeyWrap {
  readonly token: WrappingToken;
  /** CKA_LABEL of the AES key that wraps new master key files; absent, new files hold the key itself. */
  readonly keyLabel?: string | undefined;
}

const FORMAT = "kmi-wrapped-master-key/1";

interface WrappedKeyDocument {
  format: typeof FORMAT;
  token: string;
  key_label: string;
  key_id: string;
  nonce: string;
  sealed: string;
}

/** True when a key file's bytes are a wrapped key (a JSON document) rather than the key itself. */
export function isWrappedKeyFile(data: Uint8Array): boolean {
  return data.length > 0 && data[0] === 0x7b; // "{"
}

/** The file text of `key` wrapped by the token's AES key `keyLabel`. */
export function wrapMasterKey(key: Uint8Array, token: WrappingToken, keyLabel: string): Buffer {
  const id = masterKeyId(key);
  const { nonce, sealed } = token.encryptAesGcm(keyLabel, key, aad(keyLabel, id));
  const doc: WrappedKeyDocument = { format: FORMAT, token: token.label, key_label: keyLabel, key_id: id, nonce: nonce.toString("base64"), sealed: sealed.toString("base64") };
  return Buffer.from(JSON.stringify(doc) + "\n", "utf8");
}

/**
 * The master key in a wrapped key file, unwrapped inside `wrap`'s token (the file names the
 * token key). FailedPrecondition naming what to do without a token, with another token, or
 * when the file is damaged.
 */
export function unwrapMasterKey(path: string, data: Uint8Array, wrap: MasterKeyWrap | undefined): Buffer {
  const doc = parse(path, data);
  if (wrap === undefined) {
    throw new FailedPrecondition(
      `master key file ${path} is wrapped by key ${doc.key_label} in PKCS#11 token "${doc.token}"; start with --pkcs11-module, --pkcs11-token and --pkcs11-pin-file for that token`,
    );
  }
  if (wrap.token.label !== doc.token) {
    throw new FailedPrecondition(`master key file ${path} is wrapped in PKCS#11 token "${doc.token}", not in "${wrap.token.label}"; give --pkcs11-token ${doc.token}`);
  }
  let key: Buffer;
  try {
    key = wrap.token.decryptAesGcm(doc.key_label, Buffer.from(doc.nonce, "base64"), Buffer.from(doc.sealed, "base64"), aad(doc.key_label, doc.key_id));
  } catch (err) {
    throw new FailedPrecondition(`master key file ${path}: ${errorText(err)}; use the token that wrapped it, or restore the file from a backup`, { cause: err });
  }
  if (key.length !== KEY_BYTES || masterKeyId(key) !== doc.key_id) {
    key.fill(0);
    throw new FailedPrecondition(`master key file ${path}: the unwrapped key is not master key ${doc.key_id}; restore the file from a backup`);
  }
  return key;
}

function aad(keyLabel: string, keyId: string): Buffer {
  return Buffer.from(`kmi master key ${keyId} wrapped by ${keyLabel}`, "utf8");
}

/** What a wrapped key file's bytes say of themselves (no token needed). */
export function describeWrappedKey(path: string, data: Uint8Array): { token: string; keyLabel: string; keyId: string } {
  const doc = parse(path, data);
  return { token: doc.token, keyLabel: doc.key_label, keyId: doc.key_id };
}

function parse(path: string, data: Uint8Array): WrappedKeyDocument {
  let doc: Partial<WrappedKeyDocument>;
  try {
    doc = JSON.parse(Buffer.from(data).toString("utf8")) as Partial<WrappedKeyDocument>;
  } catch {
    throw new FailedPrecondition(`master key file ${path}: not a key and not a wrapped key document; restore the file from a backup`);
  }
  const fields = ["token", "key_label", "key_id", "nonce", "sealed"] as const;
  if (doc.format !== FORMAT || fields.some((f) => typeof doc[f] !== "string" || doc[f] === "")) {
    throw new FailedPrecondition(`master key file ${path}: a wrapped key document must have format ${FORMAT} and ${fields.join(", ")}; restore the file from a backup`);
  }
  return doc as WrappedKeyDocument;
}
