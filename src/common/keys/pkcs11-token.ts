/**
 * A PKCS#11 token (an HSM, or SoftHSM2 in tests) through npm pkcs11js: the one module that
 * speaks Cryptoki. It makes ECDSA P-256 key pairs inside the token — private halves
 * CKA_SENSITIVE, not CKA_EXTRACTABLE, CKA_TOKEN (persistent), CKA_PRIVATE (login needed) —
 * finds them again by label, and signs through them as a {@link Signer}; and AES-256 keys
 * (sensitive, not extractable) that encrypt and decrypt with AES-GCM inside the token (the
 * agent's `--sealing-key pkcs11`). No private or secret key byte ever reaches this process.
 */
import { createHash, createPublicKey, randomBytes } from "node:crypto";
import { createRequire } from "node:module";
import type * as Pkcs11Js from "pkcs11js";
import { AlreadyExists, FailedPrecondition, InvalidArgument, errorText } from "../errors.js";
import { ecdsaRawToDer, type Signer } from "../../pki/signer.js";
import { ECDSA_SHA256 } from "../../pki/signature.js";

// pkcs11js is CommonJS with a native addon: loaded with require, only when a token is configured.
const require = createRequire(import.meta.url);

/** Where the token is and how to log in. */
export interface Pkcs11Options {
  /** Path of the PKCS#11 module (.so), e.g. /usr/lib/softhsm/libsofthsm2.so. */
  readonly module: string;
  /** The token's label (CKA token info label). */
  readonly token: string;
  /** The user PIN. */
  readonly pin: string;
}

/** The protection attributes of a private key object, as the token reports them. */
export interface TokenKeyProtection {
  sensitive: boolean;
  extractable: boolean;
  alwaysSensitive: boolean;
  neverExtractable: boolean;
}

/** DER of the P-256 curve OID (1.2.840.10045.3.1.7): CKA_EC_PARAMS. */
const P256_PARAMS = Buffer.from("06082a8648ce3d030107", "hex");

/** An open, logged-in session with one token. */
export class Pkcs11Token {
  private constructor(
    private readonly lib: typeof Pkcs11Js,
    private readonly p11: Pkcs11Js.PKCS11,
    private readonly session: Buffer,
    /** The token's label. */
    readonly label: string,
  ) {}

  /**
   * Loads the module, finds the token by label, opens a read-write session and logs in.
   * FailedPrecondition naming what to fix when the module, the token or the PIN is wrong.
   */
  static open(opts: Pkcs11Options): Pkcs11Token {
    const lib = require("pkcs11js") as typeof Pkcs11Js;
    const p11 = new lib.PKCS11();
    try {
      p11.load(opts.module);
    } catch (err) {
      throw new FailedPrecondition(`pkcs11 module ${opts.module}: cannot load (${errorText(err)}); give the path of the token's PKCS#11 library`);
    }
    p11.C_Initialize();
    try {
      const slot = p11.C_GetSlotList(true).find((s) => p11.C_GetTokenInfo(s).label.trim() === opts.token);
      if (slot === undefined) throw new FailedPrecondition(`pkcs11 token "${opts.token}": no such token in ${opts.module}; list them with \`softhsm2-util --show-slots\` or \`pkcs11-tool -L\``);
      const session = p11.C_OpenSession(slot, lib.CKF_RW_SESSION | lib.CKF_SERIAL_SESSION);
      try {
        p11.C_Login(session, lib.CKU_USER, opts.pin);
      } catch (err) {
        // The PIN itself never goes into the message.
        throw new FailedPrecondition(`pkcs11 token "${opts.token}": login refused (${errorText(err)}); check the PIN file`);
      }
      return new Pkcs11Token(lib, p11, session, opts.token);
    } catch (err) {
      p11.C_Finalize();
      throw err;
    }
  }

  /** Makes a P-256 key pair labelled `label` inside the token; AlreadyExists when the label is taken. */
  generateEcKey(label: string): Signer {
    const lib = this.lib;
    if (this.findPrivate(label) !== undefined) throw new AlreadyExists(`pkcs11 token "${this.label}": a key labelled ${label} exists already; use another token or remove it`);
    const id = createHash("sha256").update(label).digest().subarray(0, 16);
    const common = [
      { type: lib.CKA_TOKEN, value: true },
      { type: lib.CKA_LABEL, value: label },
      { type: lib.CKA_ID, value: id },
    ];
    const keys = this.p11.C_GenerateKeyPair(
      this.session,
      { mechanism: lib.CKM_EC_KEY_PAIR_GEN },
      [...common, { type: lib.CKA_EC_PARAMS, value: P256_PARAMS }, { type: lib.CKA_VERIFY, value: true }],
      // Why these: the private key can sign and do nothing else, and cannot leave the token.
      [
        ...common,
        { type: lib.CKA_PRIVATE, value: true },
        { type: lib.CKA_SENSITIVE, value: true },
        { type: lib.CKA_EXTRACTABLE, value: false },
        { type: lib.CKA_SIGN, value: true },
        { type: lib.CKA_DECRYPT, value: false },
        { type: lib.CKA_UNWRAP, value: false },
        { type: lib.CKA_DERIVE, value: false },
      ],
    );
    return this.signerFor(keys.privateKey, this.spkiOf(keys.publicKey, label));
  }

  /** The signer of the key labelled `label`, or undefined when the token has none. */
  findKey(label: string): Signer | undefined {
    const priv = this.findPrivate(label);
    if (priv === undefined) return undefined;
    const pub = this.find(this.lib.CKO_PUBLIC_KEY, label);
    if (pub === undefined) throw new FailedPrecondition(`pkcs11 token "${this.label}": key ${label} has no public key object`);
    return this.signerFor(priv, this.spkiOf(pub, label));
  }

  /** Destroys the key pair labelled `label`; false when the token has none. */
  destroyKey(label: string): boolean {
    const priv = this.findPrivate(label);
    const pub = this.find(this.lib.CKO_PUBLIC_KEY, label);
    for (const obj of [priv, pub]) if (obj !== undefined) this.p11.C_DestroyObject(this.session, obj);
    return priv !== undefined;
  }

  /** How the token protects the private key labelled `label` (what `kmi kdc init` relies on). */
  protection(label: string): TokenKeyProtection {
    return this.protectionOf(this.requirePrivate(label));
  }

  /** Asks the token for the private key's value: resolves with the token's refusal (CKR_…), or "returned" if it gave it. */
  tryReadPrivateValue(label: string): string {
    return this.tryReadValue(this.requirePrivate(label));
  }

  /**
   * Makes an AES-256 key labelled `label` inside the token, for encrypting and decrypting in
   * it and nothing else (the agent's sealing key wrap); AlreadyExists when the label is taken.
   */
  generateAesKey(label: string): void {
    const lib = this.lib;
    if (this.findSecret(label) !== undefined) throw new AlreadyExists(`pkcs11 token "${this.label}": a key labelled ${label} exists already; use another label`);
    this.p11.C_GenerateKey(this.session, { mechanism: lib.CKM_AES_KEY_GEN }, [
      { type: lib.CKA_CLASS, value: lib.CKO_SECRET_KEY },
      { type: lib.CKA_KEY_TYPE, value: lib.CKK_AES },
      { type: lib.CKA_VALUE_LEN, value: 32 },
      { type: lib.CKA_TOKEN, value: true },
      { type: lib.CKA_LABEL, value: label },
      // Why these: the key encrypts and decrypts inside the token and can never be read or wrapped out.
      { type: lib.CKA_PRIVATE, value: true },
      { type: lib.CKA_SENSITIVE, value: true },
      { type: lib.CKA_EXTRACTABLE, value: false },
      { type: lib.CKA_ENCRYPT, value: true },
      { type: lib.CKA_DECRYPT, value: true },
      { type: lib.CKA_WRAP, value: false },
      { type: lib.CKA_UNWRAP, value: false },
      { type: lib.CKA_SIGN, value: false },
      { type: lib.CKA_DERIVE, value: false },
    ]);
  }

  /** True when the token holds an AES (secret) key labelled `label`. */
  hasAesKey(label: string): boolean {
    return this.findSecret(label) !== undefined;
  }

  /** How the token protects the secret key labelled `label`. */
  aesKeyProtection(label: string): TokenKeyProtection {
    return this.protectionOf(this.requireSecret(label));
  }

  /** Asks the token for the AES key's value: the token's refusal (CKR_…), or "returned" if it gave it. */
  tryReadAesKeyValue(label: string): string {
    return this.tryReadValue(this.requireSecret(label));
  }

  /** AES-256-GCM encryption inside the token with the key labelled `label`: a fresh 12-byte nonce, ciphertext || 16-byte tag. */
  encryptAesGcm(label: string, plaintext: Uint8Array, aad: Uint8Array): { nonce: Buffer; sealed: Buffer } {
    const key = this.requireSecret(label);
    const nonce = randomBytes(12);
    // A copy of the plaintext (a key) for the module: wiped once the token has it.
    const input = Buffer.from(plaintext);
    try {
      this.p11.C_EncryptInit(this.session, this.gcm(nonce, aad), key);
      const sealed = this.p11.C_Encrypt(this.session, input, Buffer.alloc(plaintext.length + 16));
      return { nonce, sealed: Buffer.from(sealed) };
    } finally {
      input.fill(0);
    }
  }

  /** AES-256-GCM decryption inside the token; FailedPrecondition when the tag does not verify (another key, changed bytes). */
  decryptAesGcm(label: string, nonce: Uint8Array, sealed: Uint8Array, aad: Uint8Array): Buffer {
    const key = this.requireSecret(label);
    this.p11.C_DecryptInit(this.session, this.gcm(Buffer.from(nonce), aad), key);
    // The module writes the plaintext (a key) here; the caller gets a copy and this one is wiped.
    const output = Buffer.alloc(sealed.length);
    try {
      return Buffer.from(this.p11.C_Decrypt(this.session, Buffer.from(sealed), output));
    } catch (err) {
      throw new FailedPrecondition(`pkcs11 token "${this.label}": key ${label} does not open this ciphertext (${errorText(err)}): another key or token, or changed bytes`);
    } finally {
      output.fill(0);
    }
  }

  private gcm(nonce: Buffer, aad: Uint8Array): Pkcs11Js.Mechanism {
    const params: Pkcs11Js.AesGCM = { type: this.lib.CK_PARAMS_AES_GCM, iv: nonce, aad: Buffer.from(aad), ivBits: 96, tagBits: 128 };
    return { mechanism: this.lib.CKM_AES_GCM, parameter: params };
  }

  private findSecret(label: string): Buffer | undefined {
    return this.find(this.lib.CKO_SECRET_KEY, label);
  }

  private requireSecret(label: string): Buffer {
    const key = this.findSecret(label);
    if (key === undefined) throw new FailedPrecondition(`pkcs11 token "${this.label}": no AES key labelled ${label}`);
    return key;
  }

  private requirePrivate(label: string): Buffer {
    const key = this.findPrivate(label);
    if (key === undefined) throw new FailedPrecondition(`pkcs11 token "${this.label}": no key labelled ${label}`);
    return key;
  }

  /** Asks for an object's CKA_VALUE: the token's refusal (CKR_…), or "returned" if it gave it. */
  private tryReadValue(obj: Buffer): string {
    try {
      this.p11.C_GetAttributeValue(this.session, obj, [{ type: this.lib.CKA_VALUE }]);
      return "returned";
    } catch (err) {
      return errorText(err);
    }
  }

  private protectionOf(obj: Buffer): TokenKeyProtection {
    const lib = this.lib;
    const attrs = this.p11.C_GetAttributeValue(this.session, obj, [
      { type: lib.CKA_SENSITIVE },
      { type: lib.CKA_EXTRACTABLE },
      { type: lib.CKA_ALWAYS_SENSITIVE },
      { type: lib.CKA_NEVER_EXTRACTABLE },
    ]);
    const flag = (i: number) => attrs[i]!.value[0] === 1;
    return { sensitive: flag(0), extractable: flag(1), alwaysSensitive: flag(2), neverExtractable: flag(3) };
  }

  /** Logs out and unloads the module. */
  close(): void {
    try {
      this.p11.C_Logout(this.session);
      this.p11.C_CloseSession(this.session);
    } finally {
      this.p11.C_Finalize();
    }
  }

  private findPrivate(label: string): Buffer | undefined {
    return this.find(this.lib.CKO_PRIVATE_KEY, label);
  }

  private find(cls: number, label: string): Buffer | undefined {
    this.p11.C_FindObjectsInit(this.session, [
      { type: this.lib.CKA_CLASS, value: cls },
      { type: this.lib.CKA_LABEL, value: label },
    ]);
    try {
      const found = this.p11.C_FindObjects(this.session, 2);
      if (found.length > 1) throw new FailedPrecondition(`pkcs11 token "${this.label}": two objects labelled ${label}; remove one`);
      return found[0];
    } finally {
      this.p11.C_FindObjectsFinal(this.session);
    }
  }

  private spkiOf(publicKey: Buffer, label: string): Uint8Array {
    const [attr] = this.p11.C_GetAttributeValue(this.session, publicKey, [{ type: this.lib.CKA_EC_POINT }]);
    let point = attr!.value;
    // CKA_EC_POINT is the DER OCTET STRING of the uncompressed point (some tokens give it bare).
    if (point.length === 67 && point[0] === 0x04 && point[1] === 65) point = point.subarray(2);
    if (point.length !== 65 || point[0] !== 0x04) throw new InvalidArgument(`pkcs11 key ${label}: CKA_EC_POINT is not an uncompressed P-256 point`);
    const jwk = { kty: "EC", crv: "P-256", x: point.subarray(1, 33).toString("base64url"), y: point.subarray(33).toString("base64url") };
    return new Uint8Array(createPublicKey({ key: jwk, format: "jwk" }).export({ type: "spki", format: "der" }));
  }

  private signerFor(privateKey: Buffer, spkiDer: Uint8Array): Signer {
    const lib = this.lib;
    return {
      spkiDer,
      signatureAlgorithm: ECDSA_SHA256,
      sign: (data) => {
        // CKM_ECDSA signs a hash given to it: SHA-256 here, r || s back.
        const digest = createHash("sha256").update(data).digest();
        this.p11.C_SignInit(this.session, { mechanism: lib.CKM_ECDSA }, privateKey);
        return ecdsaRawToDer(this.p11.C_Sign(this.session, digest, Buffer.alloc(64)));
      },
    };
  }
}

