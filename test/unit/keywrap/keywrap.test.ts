import { execFileSync } from "node:child_process";
import { createPublicKey, generateKeyPairSync, KeyObject, sign, verify } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import {
  formatWrapAad,
  keyIdOf,
  machinePublicKeyFromCertificate,
  parseWrapAad,
  unwrapKey,
  wrapKeyForMachine,
  type WrappedKeyFields,
} from "../../../src/keywrap/index.js";

const fixture = new URL("../../fixtures/agent/ecies_unwrap.py", import.meta.url).pathname;
const machine = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
const other = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
const secret = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
const pkcs8 = (k: KeyObject) => k.export({ format: "der", type: "pkcs8" });
const aad = formatWrapAad({ machineId: "m-0123456789abcdef", tenantId: "acme", keyId: keyIdOf(secret.publicKey), version: 3 });

let dir: string;
let machineCertPem: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "kmi-keywrap-"));
  writeFileSync(join(dir, "machine.key"), machine.privateKey.export({ format: "pem", type: "pkcs8" }));
  execFileSync("openssl", ["req", "-new", "-x509", "-key", join(dir, "machine.key"), "-subj", "/CN=machine", "-days", "1", "-out", join(dir, "machine.crt")]);
  machineCertPem = execFileSync("cat", [join(dir, "machine.crt")]).toString();
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function hexed(w: WrappedKeyFields) {
  const h = (b: Uint8Array) => Buffer.from(b).toString("hex");
  return { ephemeral_public_key: h(w.ephemeralPublicKey), nonce: h(w.nonce), ciphertext: h(w.ciphertext), tag: h(w.tag), aad: w.aad };
}

describe("wrapKeyForMachine / unwrapKey", () => {
  it("round-trips a P-256 and an RSA key, and the unwrapped key signs like the original", () => {
    const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
    for (const pair of [secret, rsa]) {
      const wrapped = wrapKeyForMachine({ machinePublicKey: machine.publicKey, privateKey: pair.privateKey, aad });
      expect(wrapped.ephemeralPublicKey).toHaveLength(65);
      expect(wrapped.nonce).toHaveLength(12);
      expect(wrapped.tag).toHaveLength(16);
      expect(Buffer.from(wrapped.ciphertext).includes(pkcs8(pair.privateKey))).toBe(false);
      const opened = unwrapKey(wrapped, machine.privateKey, { expectedAad: aad });
      expect(pkcs8(opened).equals(pkcs8(pair.privateKey))).toBe(true);
      const sig = sign("sha256", Buffer.from("hello"), opened);
      expect(verify("sha256", Buffer.from("hello"), pair.publicKey, sig)).toBe(true);
    }
  });

  it("accepts the machine certificate (PEM) and PKCS#8 bytes as inputs", () => {
    const wrapped = wrapKeyForMachine({ machinePublicKey: machineCertPem, privateKey: pkcs8(secret.privateKey), aad });
    expect(keyIdOf(unwrapKey(wrapped, machine.privateKey))).toBe(keyIdOf(secret.publicKey));
    expect(keyIdOf(machinePublicKeyFromCertificate(machineCertPem))).toBe(keyIdOf(machine.publicKey));
  });

  it("uses a fresh ephemeral key and nonce per wrap", () => {
    const a = wrapKeyForMachine({ machinePublicKey: machine.publicKey, privateKey: secret.privateKey, aad });
    const b = wrapKeyForMachine({ machinePublicKey: machine.publicKey, privateKey: secret.privateKey, aad });
    expect(Buffer.from(a.ephemeralPublicKey).equals(Buffer.from(b.ephemeralPublicKey))).toBe(false);
    expect(Buffer.from(a.ciphertext).equals(Buffer.from(b.ciphertext))).toBe(false);
  });

  it("matches the written contract: Python `cryptography` opens what we wrap, and we open what it wraps", () => {
    const wrapped = wrapKeyForMachine({ machinePublicKey: machine.publicKey, privateKey: secret.privateKey, aad });
    const input = JSON.stringify({ machine_key_pem: machine.privateKey.export({ format: "pem", type: "pkcs8" }), ...hexed(wrapped) });
    const out = execFileSync("/usr/bin/python3", [fixture], { input }).toString();
    expect(Buffer.from(out, "hex").equals(pkcs8(secret.privateKey))).toBe(true);

    const theirs = JSON.parse(
      execFileSync("/usr/bin/python3", [fixture, "wrap"], { input: JSON.stringify({ machine_cert_pem: machineCertPem, pkcs8: pkcs8(secret.privateKey).toString("hex"), aad }) }).toString(),
    ) as Record<string, string>;
    const b = (k: string) => Buffer.from(theirs[k]!, "hex");
    const opened = unwrapKey({ ephemeralPublicKey: b("ephemeral_public_key"), nonce: b("nonce"), ciphertext: b("ciphertext"), tag: b("tag"), aad: theirs.aad! }, machine.privateKey, { expectedAad: aad });
    expect(keyIdOf(opened)).toBe(keyIdOf(secret.publicKey));
  });

  const wrapped = () => wrapKeyForMachine({ machinePublicKey: machine.publicKey, privateKey: secret.privateKey, aad });
  const flip = (b: Uint8Array, i = 0) => {
    const c = Buffer.from(b);
    c[i] = c[i]! ^ 1;
    return c;
  };
  it.each<[string, () => [WrappedKeyFields, KeyObject, string | undefined], RegExp]>([
    ["another machine's key", () => [wrapped(), other.privateKey, undefined], /^wrapped_key: does not open/],
    ["a changed aad (bound through HKDF)", () => [{ ...wrapped(), aad: aad.replace("|3", "|4") }, machine.privateKey, undefined], /^wrapped_key: does not open/],
    ["an aad other than expected", () => [wrapped(), machine.privateKey, aad.replace("acme", "evil")], /^wrapped_key\.aad: is/],
    ["a flipped ciphertext bit", () => { const w = wrapped(); return [{ ...w, ciphertext: flip(w.ciphertext, 5) }, machine.privateKey, undefined]; }, /^wrapped_key: does not open/],
    ["a flipped tag bit", () => { const w = wrapped(); return [{ ...w, tag: flip(w.tag) }, machine.privateKey, undefined]; }, /^wrapped_key: does not open/],
    ["a changed nonce", () => { const w = wrapped(); return [{ ...w, nonce: flip(w.nonce) }, machine.privateKey, undefined]; }, /^wrapped_key: does not open/],
    ["an ephemeral point off the curve", () => { const w = wrapped(); return [{ ...w, ephemeralPublicKey: flip(w.ephemeralPublicKey, 64) }, machine.privateKey, undefined]; }, /^wrapped_key\.ephemeral_public_key: not a point/],
    ["a compressed point", () => { const w = wrapped(); const p = Buffer.from(w.ephemeralPublicKey); p[0] = 2; return [{ ...w, ephemeralPublicKey: p }, machine.privateKey, undefined]; }, /uncompressed/],
    ["a short nonce", () => [{ ...wrapped(), nonce: new Uint8Array(8) }, machine.privateKey, undefined], /^wrapped_key\.nonce: want 12 bytes, got 8/],
    ["a short tag", () => [{ ...wrapped(), tag: new Uint8Array(4) }, machine.privateKey, undefined], /^wrapped_key\.tag: want 16 bytes/],
    ["an empty ciphertext", () => [{ ...wrapped(), ciphertext: new Uint8Array(0) }, machine.privateKey, undefined], /^wrapped_key\.ciphertext: want 1 to/],
    ["an RSA machine key", () => [wrapped(), generateKeyPairSync("rsa", { modulusLength: 1024 }).privateKey, undefined], /P-256/],
  ])("refuses %s", (_name, make, message) => {
    const [w, key, expectedAad] = make();
    let caught: unknown;
    try {
      unwrapKey(w, key, expectedAad === undefined ? {} : { expectedAad });
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(InvalidArgument);
    expect((caught as Error).message).toMatch(message);
  });

  it("refuses to wrap to a non-P-256 key or from a public key", () => {
    const rsa = generateKeyPairSync("rsa", { modulusLength: 1024 });
    expect(() => wrapKeyForMachine({ machinePublicKey: rsa.publicKey, privateKey: secret.privateKey, aad })).toThrow(/machine public key: want ECDSA P-256/);
    expect(() => wrapKeyForMachine({ machinePublicKey: machine.publicKey, privateKey: secret.publicKey, aad })).toThrow(/private key: want a private key/);
    expect(() => wrapKeyForMachine({ machinePublicKey: machine.publicKey, privateKey: new Uint8Array([1, 2, 3]), aad })).toThrow(/private key: not PKCS#8 DER/);
    expect(() => wrapKeyForMachine({ machinePublicKey: "garbage", privateKey: secret.privateKey, aad })).toThrow(InvalidArgument);
  });
});

describe("aad", () => {
  it("formats and parses", () => {
    expect(aad).toBe(`m-0123456789abcdef|acme|${keyIdOf(secret.publicKey)}|3`);
    expect(parseWrapAad(aad)).toEqual({ machineId: "m-0123456789abcdef", tenantId: "acme", keyId: keyIdOf(secret.publicKey), version: 3 });
  });
  it.each([["a|b|c"], ["a|b|c|d|0"], ["a||c|1"], ["a|b|c|01"], ["a|b|c|-1"], ["a|b|c|99999999999"]])("refuses to parse %s", (s) => {
    expect(() => parseWrapAad(s)).toThrow(/wrapped_key\.aad/);
  });
  it("refuses a part with the separator or an empty part", () => {
    expect(() => formatWrapAad({ machineId: "m|x", tenantId: "t", keyId: "k", version: 0 })).toThrow(/machine_id: must not contain/);
    expect(() => formatWrapAad({ machineId: "m", tenantId: "", keyId: "k", version: 0 })).toThrow(/tenant_id: required/);
    expect(() => formatWrapAad({ machineId: "m", tenantId: "t", keyId: "k", version: -1 })).toThrow(/version/);
  });
  it("key ids are the SHA-256 of the SPKI DER, the same from either half", () => {
    expect(keyIdOf(secret.privateKey)).toBe(keyIdOf(secret.publicKey));
    expect(keyIdOf(secret.publicKey)).toMatch(/^[0-9a-f]{64}$/);
    expect(keyIdOf(createPublicKey(secret.privateKey))).toBe(keyIdOf(secret.publicKey));
  });
});
