/**
 * Where the private keys of the KDC's two roots (the KMI root CA and the infrastructure CA)
 * live, behind one interface with two implementations:
 *
 *   sealed  (default) a PKCS#8 key made in this process and sealed under the master key in the
 *           credential record (`private_key`); unsealed for the moment of a signature.
 *   pkcs11  an ECDSA P-256 key made inside a PKCS#11 token (non-extractable, sensitive); the
 *           credential record keeps only its CKA_LABEL (`token_key_label`), and every
 *           signature is made by the token.
 *
 * The KDC's own TLS key stays sealed in the store either way; tenants' intermediates are sealed
 * unless made with custody TOKEN (./version-keys.ts), in the same token session.
 */
import { readFile, stat } from "node:fs/promises";
import type { SealedBlob } from "../gen/kmi/store/v1/envelope_pb.js";
import type { CredentialRecord } from "../gen/kmi/store/v1/kdc_pb.js";
import { KeyAlgorithm } from "../gen/kmi/common/v1/common_pb.js";
import { FailedPrecondition } from "../common/errors.js";
import { Pkcs11Token, type Pkcs11Options } from "../common/keys/pkcs11-token.js";
import type { MasterKeyWrap } from "../storage/wrapped-key.js";
import { importPrivateKeyPkcs8Der } from "../pki/keys.js";
import { keyObjectSigner, type Signer } from "../pki/signer.js";
import type { CertificateFactory, Issuer, Sealer } from "./context.js";
import { credentialAad } from "./kdc-store.js";

/** A new root key: what signs its certificate, and what its credential record keeps of it. */
export interface NewRootKey {
  /** Signs the root's self-signed certificate (and, for the infrastructure CA, the KDC's TLS certificate). */
  readonly signer: Signer;
  /** The sealed PKCS#8 key (sealed provider), to store as `private_key`. */
  readonly privateKey: SealedBlob | undefined;
  /** The token's label of the key (pkcs11 provider), to store as `token_key_label`; "" otherwise. */
  readonly tokenKeyLabel: string;
  /** Wipes any key bytes this process held. */
  wipe(): void;
}

/** The keys of the KDC's roots. */
export interface RootKeys {
  /** "sealed" or "pkcs11", for logs and `kmi kdc init`'s output. */
  readonly kind: "sealed" | "pkcs11";
  /** Makes the key of root credential `name` for the KDC `kdcId` (labels in a shared token stay apart). */
  generate(name: string, kdcId: string): Promise<NewRootKey>;
  /** The issuer of a stored root credential; call `wipe` on it when done. */
  issuer(record: CredentialRecord): Issuer & { wipe(): void };
  /** The token session, when the KDC has one (tenant intermediates of custody TOKEN live there too). */
  readonly token: Pkcs11Token | undefined;
  /** Releases the token session, if any. */
  close(): void;
}

/** Keys sealed under the master key in the store: what kmi did before tokens, and still the default. */
export function sealedRootKeys(pki: CertificateFactory, sealer: Sealer, token?: Pkcs11Token): RootKeys {
  return {
    kind: "sealed",
    token,
    async generate(name) {
      const key = await pki.generateKey(KeyAlgorithm.ECDSA_P256);
      const signer = keyObjectSigner(importPrivateKeyPkcs8Der(key.pkcs8, "root key"));
      return { signer, privateKey: sealer.seal(key.pkcs8, credentialAad(name)), tokenKeyLabel: "", wipe: () => key.pkcs8.fill(0) };
    },
    issuer(record) {
      if (record.tokenKeyLabel !== "") return tokenIssuer(pki, token, record);
      if (record.privateKey === undefined) throw new FailedPrecondition(`the KDC's ${record.name} credential has no key; restore the store from a backup`);
      const pkcs8 = sealer.open(record.privateKey, credentialAad(record.name));
      return { certificateDer: record.certificateDer, pkcs8, wipe: () => pkcs8.fill(0) };
    },
    close() {
      token?.close();
    },
  };
}

/** Keys made and held in a PKCS#11 token. */
export function tokenRootKeys(pki: CertificateFactory, token: Pkcs11Token): RootKeys {
  return {
    kind: "pkcs11",
    token,
    async generate(name, kdcId) {
      const label = tokenLabel(kdcId, name);
      return { signer: token.generateEcKey(label), privateKey: undefined, tokenKeyLabel: label, wipe: () => undefined };
    },
    issuer(record) {
      return tokenIssuer(pki, token, record);
    },
    close() {
      token.close();
    },
  };
}

/** The token label of a root key: `kmi/<kdc id>/<credential name>`. */
export function tokenLabel(kdcId: string, name: string): string {
  return `kmi/${kdcId}/${name}`;
}

function tokenIssuer(pki: CertificateFactory, token: Pkcs11Token | undefined, record: CredentialRecord): Issuer & { wipe(): void } {
  if (token === undefined) {
    throw new FailedPrecondition(`the KDC's ${record.name} key is in a PKCS#11 token (${record.tokenKeyLabel}); start the KDC with --pkcs11-module, --pkcs11-token and --pkcs11-pin-file`);
  }
  const signer = token.findKey(record.tokenKeyLabel);
  if (signer === undefined) throw new FailedPrecondition(`pkcs11 token "${token.label}" has no key ${record.tokenKeyLabel} (the ${record.name} key); is it the token this KDC was initialized with?`);
  if (!Buffer.from(signer.spkiDer).equals(Buffer.from(pki.summarize(record.certificateDer).spki))) {
    throw new FailedPrecondition(`pkcs11 key ${record.tokenKeyLabel} is not the key of the ${record.name} certificate; is it the token this KDC was initialized with?`);
  }
  return { certificateDer: record.certificateDer, pkcs8: new Uint8Array(0), signer, wipe: () => undefined };
}

/** PKCS#11 settings as `kmi kdc` / `kmi kdc init` take them (module, token label, PIN file). */
export interface Pkcs11Settings {
  readonly module: string;
  readonly token: string;
  readonly pinFile: string;
}

/**
 * The root keys for a KDC: in the token when one is given (sealed keys of an older store still
 * open), sealed otherwise. The root keys own the token from here on (`close` closes it).
 */
export function openRootKeys(pki: CertificateFactory, sealer: Sealer, token: Pkcs11Token | undefined, forNewRoots: boolean): RootKeys {
  if (token === undefined) return sealedRootKeys(pki, sealer);
  return forNewRoots ? tokenRootKeys(pki, token) : sealedRootKeys(pki, sealer, token);
}

/** Opens and logs in to the token of `--pkcs11-*` (undefined when none is configured). */
export async function openPkcs11Token(pkcs11: Pkcs11Settings | undefined): Promise<Pkcs11Token | undefined> {
  return pkcs11 === undefined ? undefined : Pkcs11Token.open(await pkcs11Options(pkcs11));
}

/** The default CKA_LABEL of the AES key that wraps the master key (`--master-key-wrap-label`). */
export const MASTER_KEY_WRAP_LABEL = "kmi/master-key-wrap";

/**
 * What opens a wrapped master key file with `token` and, with `newKeyLabel`, wraps new ones
 * (the token's AES key of that label is made when missing: sensitive, not extractable).
 */
export function masterKeyWrap(token: Pkcs11Token | undefined, newKeyLabel?: string): MasterKeyWrap | undefined {
  if (token === undefined) {
    if (newKeyLabel !== undefined) throw new FailedPrecondition("--master-key-wrap pkcs11 needs the token: give --pkcs11-module, --pkcs11-token and --pkcs11-pin-file");
    return undefined;
  }
  if (newKeyLabel !== undefined && !token.hasAesKey(newKeyLabel)) token.generateAesKey(newKeyLabel);
  return { token, keyLabel: newKeyLabel };
}

async function pkcs11Options(s: Pkcs11Settings): Promise<Pkcs11Options> {
  let pin: string;
  try {
    // Why: whoever reads the PIN can make the token sign as the KMI root.
    const mode = (await stat(s.pinFile)).mode & 0o777;
    if ((mode & 0o077) !== 0) throw new FailedPrecondition(`--pkcs11-pin-file ${s.pinFile} is mode ${mode.toString(8).padStart(4, "0")}; it must be readable by its owner only: chmod 600 ${s.pinFile}`);
    pin = (await readFile(s.pinFile, "utf8")).trim();
  } catch (err) {
    if (err instanceof FailedPrecondition) throw err;
    throw new FailedPrecondition(`--pkcs11-pin-file ${s.pinFile}: cannot read (${(err as NodeJS.ErrnoException).code ?? "error"})`);
  }
  if (pin === "") throw new FailedPrecondition(`--pkcs11-pin-file ${s.pinFile}: empty; put the token's user PIN in it`);
  return { module: s.module, token: s.token, pin };
}
