import { execFileSync } from "node:child_process";
import { X509Certificate, createPrivateKey, generateKeyPairSync, randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, toBinary } from "@bufbuild/protobuf";
import { afterAll, describe, expect, it } from "vitest";
import {
  createAttestRequest,
  decodeEvidence,
  encodeEvidence,
  signEvidence,
  verifyEvidenceSignature,
  type EvidenceValue,
} from "../../../src/attest/index.js";
import { InvalidArgument } from "../../../src/common/errors.js";
import { EvidenceSchema } from "../../../src/gen/kmi/audit/v1/audit_pb.js";

const dir = mkdtempSync(join(tmpdir(), "kmi-evidence-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// A machine certificate made by an independent tool, so the library reads real X.509.
execFileSync("openssl", [
  "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
  "-subj", "/CN=m-00000000000000aa", "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem"),
], { stdio: "ignore" });
const machineKey = createPrivateKey(readFileSync(join(dir, "key.pem")));
const certPem = readFileSync(join(dir, "cert.pem"), "utf8");
const cert = new X509Certificate(certPem);
const otherKey = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;

const evidence = (over: Partial<EvidenceValue> = {}): EvidenceValue => ({
  machineId: "m-00000000000000aa",
  nonce: randomBytes(32),
  measurements: [
    { name: "agent.code", sha256: "a".repeat(64) },
    { name: "proxy.config", sha256: "b".repeat(64) },
  ],
  softwareVersion: "0.1.0",
  time: new Date("2030-01-01T00:00:00Z"),
  ...over,
});

describe("evidence", () => {
  it("round-trips through its serialized form", () => {
    const e = evidence();
    expect(decodeEvidence(encodeEvidence(e))).toEqual({ ...e, nonce: new Uint8Array(e.nonce) });
  });

  it("verifies a signature with the machine certificate in every form, and with its public key", () => {
    const req = createAttestRequest(evidence(), machineKey);
    for (const signer of [cert, certPem, new Uint8Array(cert.raw), cert.publicKey, cert.publicKey.export({ type: "spki", format: "pem" }).toString()]) {
      expect(verifyEvidenceSignature(req.evidence, req.signature, signer)).toBe(true);
    }
  });

  it("accepts a DER signature that openssl made over the same bytes", () => {
    const bytes = encodeEvidence(evidence());
    const sig = execFileSync("openssl", ["dgst", "-sha256", "-sign", join(dir, "key.pem")], { input: bytes });
    expect(verifyEvidenceSignature(bytes, sig, cert)).toBe(true);
  });

  it("refuses evidence signed by another key, changed after signing, or with a garbage signature", () => {
    const bytes = encodeEvidence(evidence());
    expect(verifyEvidenceSignature(bytes, signEvidence(bytes, otherKey), cert)).toBe(false);
    const sig = signEvidence(bytes, machineKey);
    const changed = Uint8Array.from(bytes);
    changed[changed.length - 1]! ^= 1;
    expect(verifyEvidenceSignature(changed, sig, cert)).toBe(false);
    expect(verifyEvidenceSignature(bytes, randomBytes(70), cert)).toBe(false);
    expect(verifyEvidenceSignature(bytes, new Uint8Array(), cert)).toBe(false);
  });

  it("refuses a non-P-256 signer key", () => {
    const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
    expect(() => signEvidence(new Uint8Array([1]), rsa.privateKey)).toThrow(/machine key: must be an ECDSA P-256 key/);
    expect(() => verifyEvidenceSignature(new Uint8Array([1]), new Uint8Array([1]), rsa.publicKey)).toThrow(/P-256/);
  });

  const raw = (over: Record<string, unknown>) =>
    toBinary(EvidenceSchema, create(EvidenceSchema, {
      machineId: "m-00000000000000aa",
      nonce: randomBytes(32),
      measurements: [{ name: "agent.code", sha256: "a".repeat(64) }],
      softwareVersion: "0.1.0",
      time: { seconds: 1n, nanos: 0 },
      ...over,
    }));

  it.each<[string, Uint8Array, RegExp]>([
    ["empty", new Uint8Array(), /^evidence: required/],
    ["too large", new Uint8Array(16 * 1024 + 1), /^evidence: 16385 bytes, at most 16384/],
    ["not protobuf", Buffer.from("\xff\xff\xff\xff\xff", "latin1"), /^evidence: does not parse/],
    ["a bad machine id", raw({ machineId: "M-1" }), /^evidence\.machine_id: /],
    ["a short nonce", raw({ nonce: randomBytes(16) }), /^evidence\.nonce: 16 bytes, want the 32/],
    ["an upper-case digest", raw({ measurements: [{ name: "agent.code", sha256: "A".repeat(64) }] }), /^evidence\.measurements\[0\]\.sha256: want 64 lowercase hex/],
    ["a bad name", raw({ measurements: [{ name: "Agent Code", sha256: "a".repeat(64) }] }), /^evidence\.measurements\[0\]\.name: "Agent Code" is not a measurement name/],
    [
      "a duplicate name",
      raw({ measurements: [{ name: "x", sha256: "a".repeat(64) }, { name: "x", sha256: "b".repeat(64) }] }),
      /^evidence\.measurements\[1\]\.name: "x" given twice/,
    ],
    ["65 measurements", raw({ measurements: Array.from({ length: 65 }, (_, i) => ({ name: `m${i}`, sha256: "a".repeat(64) })) }), /^evidence\.measurements: 65 measurements, at most 64/],
    ["no software version", raw({ softwareVersion: "" }), /^evidence\.software_version: /],
    ["no time", raw({ time: undefined }), /^evidence\.time: required/],
  ])("refuses evidence with %s, naming the field", (_name, bytes, message) => {
    expect(() => decodeEvidence(bytes)).toThrow(InvalidArgument);
    expect(() => decodeEvidence(bytes)).toThrow(message);
  });

  it("refuses to encode evidence the server would refuse", () => {
    expect(() => encodeEvidence(evidence({ nonce: new Uint8Array(3) }))).toThrow(/evidence\.nonce/);
  });
});
