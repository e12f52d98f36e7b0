import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FailedPrecondition, InvalidArgument } from "../../../src/common/errors.js";
import { createCsr, csrToPem, intermediateCaRequestExtensions, parseCsr } from "../../../src/pki/csr.js";
import { certificateInfo } from "../../../src/pki/inspect.js";
import { exportPublicKeySpkiDer, generateKeyPair, type KeyPair } from "../../../src/pki/keys.js";
import { createLeafIssuer } from "../../../src/pki/leaf.js";
import { certificateToPem, encodePem } from "../../../src/pki/pem.js";
import { checkUploadedIntermediate } from "../../../src/pki/upload.js";
import { verifyChain } from "../../../src/pki/verify.js";
import { DAY, openssl, opensslOk, tempDir, type TempDir } from "./support.js";

/**
 * The private-CA flow of the Certificate menu: kmi makes the key and CSR, a customer CA made
 * with the openssl CLI signs it, and the upload check accepts exactly the right certificate.
 */
describe("CSR → customer CA (openssl) → upload check", () => {
  let tmp: TempDir;
  let key: KeyPair;
  let spki: Uint8Array;
  let csrPem: string;
  let good: string; // PEM of the intermediate the customer CA issued for our CSR
  let rootPem: string;
  /**
   * The checks' clock. openssl stamps notBefore with the second it signs in, so `now` is taken
   * after every certificate is made: a clock read before signing can be earlier than notBefore
   * (a slow CI machine signs a second later) and the good certificate would be "not yet valid".
   */
  let now: Date;

  /** Files of the customer CA and helpers to sign with it. */
  const EXT = {
    intermediate:
      "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    leaf: "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    noKeyCertSign: "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,digitalSignature\n",
  };

  function makeRoot(name: string, subj: string, ext = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"]): string {
    opensslOk([
      "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
      "-keyout", join(tmp.dir, `${name}.key`), "-out", join(tmp.dir, `${name}.pem`),
      "-days", "3650", "-subj", subj, ...ext.flatMap((e) => ["-addext", e]),
    ]);
    return readFileSync(join(tmp.dir, `${name}.pem`), "utf8");
  }

  function sign(csrFile: string, ca: string, ext: string, out: string, extra: string[] = []): string {
    const extFile = tmp.write(`${out}.ext`, ext);
    opensslOk([
      "x509", "-req", "-in", csrFile, "-CA", join(tmp.dir, `${ca}.pem`), "-CAkey", join(tmp.dir, `${ca}.key`),
      "-set_serial", `0x${randomBytes(12).toString("hex")}`, "-extfile", extFile, "-out", join(tmp.dir, `${out}.pem`),
      ...(extra.includes("-days") ? [] : ["-days", "365"]), ...extra,
    ]);
    return readFileSync(join(tmp.dir, `${out}.pem`), "utf8");
  }

  const cases = new Map<string, { certificate: Uint8Array | string; customerRoot?: Uint8Array | string; now?: Date }>();

  beforeAll(async () => {
    tmp = tempDir();
    key = await generateKeyPair("ecdsa-p256");
    spki = exportPublicKeySpkiDer(key.publicKey);
    csrPem = csrToPem(
      createCsr({
        subject: { commonName: "acme MITM CA v3", organization: "acme", country: "US" },
        privateKey: key.privateKey,
        requestedExtensions: intermediateCaRequestExtensions(spki),
      }),
    );
    const csrFile = tmp.write("kmi.csr", csrPem);
    rootPem = makeRoot("customer", "/CN=Customer Root CA/O=Customer Inc");
    good = sign(csrFile, "customer", EXT.intermediate, "good");

    const otherCsr = join(tmp.dir, "other.csr");
    opensslOk(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", join(tmp.dir, "other.key"), "-out", otherCsr, "-subj", "/CN=someone else"]);
    const otherRoot = makeRoot("other", "/CN=Another Root CA");
    const notCaRoot = makeRoot("notca", "/CN=Not A CA", ["basicConstraints=critical,CA:FALSE"]);
    const pathLen0Root = makeRoot("pl0", "/CN=PathLen0 Root", ["basicConstraints=critical,CA:TRUE,pathlen:0", "keyUsage=critical,keyCertSign,cRLSign"]);
    const underPl0 = sign(csrFile, "pl0", EXT.intermediate, "under-pl0");

    const goodDer = certificateInfo(new Uint8Array(Buffer.from(good.split("-----")[2]!.replace(/\s+/g, ""), "base64"))).der;
    const tampered = goodDer.slice();
    tampered[tampered.length - 1]! ^= 0x01;

    cases.set("non-CA", { certificate: sign(csrFile, "customer", EXT.leaf, "leaf") });
    cases.set("no keyCertSign", { certificate: sign(csrFile, "customer", EXT.noKeyCertSign, "nokcs") });
    cases.set("another key", { certificate: sign(otherCsr, "customer", EXT.intermediate, "otherkey") });
    cases.set("expired", { certificate: sign(csrFile, "customer", EXT.intermediate, "short", ["-days", "1"]) });
    cases.set("not yet valid", { certificate: good });
    cases.set("SHA-1", { certificate: sign(csrFile, "customer", EXT.intermediate, "sha1", ["-sha1"]) });
    cases.set("garbage", { certificate: new Uint8Array(Buffer.from("this is not a certificate\n")) });
    cases.set("random DER-like", { certificate: Uint8Array.of(0x30, 0x03, 0x02, 0x01, 0x05) });
    cases.set("truncated PEM", { certificate: good.slice(0, Math.floor(good.length / 2)) });
    cases.set("corrupt PEM", { certificate: good.replace(/\n([A-Za-z0-9+/]{10})/, "\n!!!!!!!!!!") });
    cases.set("base64 not a certificate", { certificate: encodePem("CERTIFICATE", randomBytes(300)) });
    cases.set("truncated DER", { certificate: goodDer.subarray(0, goodDer.length - 10) });
    cases.set("PEM bundle", { certificate: good + rootPem });
    cases.set("DER bundle", { certificate: Buffer.concat([goodDer, goodDer]) });
    cases.set("a CSR", { certificate: csrPem });
    cases.set("a private key", { certificate: readFileSync(join(tmp.dir, "other.key"), "utf8") + good });
    cases.set("empty", { certificate: new Uint8Array(0) });
    cases.set("too large", { certificate: good + "\n".repeat(70 * 1024) });
    cases.set("another root", { certificate: good, customerRoot: otherRoot });
    cases.set("bad signature", { certificate: tampered, customerRoot: rootPem });
    cases.set("root not a CA", { certificate: good, customerRoot: notCaRoot });
    cases.set("root garbage", { certificate: good, customerRoot: "-----BEGIN CERTIFICATE-----\nAAAA\n" });
    cases.set("root bundle", { certificate: good, customerRoot: rootPem + otherRoot });
    cases.set("root pathLen 0", { certificate: underPl0, customerRoot: pathLen0Root });
    // Every certificate is signed by now (see `now`); the clock-relative cases are set from it.
    now = new Date();
    cases.get("expired")!.now = new Date(now.getTime() + 2 * DAY * 1000);
    cases.get("not yet valid")!.now = new Date(now.getTime() - 2 * DAY * 1000);
  }, 30_000);
  afterAll(() => tmp.cleanup());

  it("a CSR made by kmi passes `openssl req -verify` and names the subject and key", () => {
    const file = tmp.write("check.csr", csrPem);
    const r = openssl(["req", "-in", file, "-noout", "-verify", "-text", "-nameopt", "RFC2253"]);
    expect(r.code).toBe(0);
    expect(r.stdout + r.stderr).toContain("verify OK");
    // openssl's RFC2253 output is the same RFC 4514 string that parseCsr gives.
    expect(r.stdout).toContain("Subject: CN=acme MITM CA v3,O=acme,C=US");
    expect(r.stdout).toMatch(/Requested Extensions:\s+X509v3 Basic Constraints: critical\s+CA:TRUE, pathlen:0/);
    const info = parseCsr(csrPem);
    expect(info.subject).toBe("CN=acme MITM CA v3,O=acme,C=US");
    expect(Buffer.from(info.spkiDer).equals(Buffer.from(spki))).toBe(true);
    expect(info.keyAlgorithm).toBe("ecdsa-p256");
    expect(info.requestedExtensions.map((e) => [e.oid, e.critical])).toEqual([
      ["2.5.29.19", true],
      ["2.5.29.15", true],
      ["2.5.29.14", false],
    ]);
  });

  it("parseCsr reads an openssl CSR, and refuses a tampered one, garbage and a certificate", () => {
    const other = readFileSync(join(tmp.dir, "other.csr"), "utf8");
    expect(parseCsr(other).subject).toBe("CN=someone else");
    const der = parseCsr(other).der.slice();
    der[der.length - 3]! ^= 0xff;
    expect(() => parseCsr(der)).toThrow(/csr: (self-signature does not verify|not a valid PKCS#10 CSR)/);
    expect(() => parseCsr("hello")).toThrow(InvalidArgument);
    expect(() => parseCsr("hello")).toThrow("csr: neither PEM nor DER");
    expect(() => parseCsr(good)).toThrow('csr: expected one "CERTIFICATE REQUEST" PEM block, found 0');
  });

  it("accepts the intermediate the customer CA issued for the CSR, as PEM or DER, with its root; refuses it without the root", () => {
    const withRoot = checkUploadedIntermediate({
      certificate: good,
      expectedSpkiDer: spki,
      expectedSubjectDer: parseCsr(csrPem).subjectNameDer,
      issuerKey: key.privateKey,
      customerRoot: rootPem,
      now,
      pendingVersion: 3,
    });
    expect(withRoot.certificate.subject).toBe("CN=acme MITM CA v3,O=acme,C=US");
    expect(withRoot.certificate.isCa).toBe(true);
    expect(withRoot.certificate.pathLenConstraint).toBe(0);
    expect(withRoot.customerRoot?.subject).toBe("O=Customer Inc,CN=Customer Root CA");
    const fp = opensslOk(["x509", "-noout", "-fingerprint", "-sha256"], { input: good }).trim();
    expect(fp).toBe(`sha256 Fingerprint=${withRoot.certificate.sha256Fingerprint}`);
    const der = withRoot.certificate.der;
    const asDer = checkUploadedIntermediate({ certificate: der, expectedSpkiDer: spki, customerRoot: certificateInfo(withRoot.customerRoot.der).der, now });
    expect(asDer.certificate.serialHex).toBe(withRoot.certificate.serialHex);
    for (const customerRoot of [undefined, new Uint8Array(0)]) {
      expect(() => checkUploadedIntermediate({ certificate: der, expectedSpkiDer: spki, ...(customerRoot ? { customerRoot } : {}), now })).toThrow(
        "customer_root: required on the tenant's first private-CA upload, so that the signature can be checked",
      );
    }
  });

  it("the uploaded intermediate issues leaves that openssl verifies against the customer root", async () => {
    const issuer = createLeafIssuer({ certificateDer: certificateInfo(checkUploadedIntermediate({ certificate: good, expectedSpkiDer: spki, customerRoot: rootPem, now }).certificate.der).der, privateKey: key.privateKey });
    const leafKey = await generateKeyPair("ecdsa-p256");
    const leaf = issuer.issueLeaf({
      publicKeySpkiDer: exportPublicKeySpkiDer(leafKey.publicKey),
      dnsNames: ["localhost"],
      ipAddresses: ["127.0.0.1"],
      notBefore: now,
      notAfter: new Date(now.getTime() + 47 * DAY * 1000),
    });
    const root = join(tmp.dir, "customer.pem");
    const int = join(tmp.dir, "good.pem");
    const leafFile = tmp.write("customer-leaf.pem", certificateToPem(leaf));
    const r = openssl(["verify", "-CAfile", root, "-untrusted", int, "-verify_hostname", "localhost", "-x509_strict", leafFile]);
    expect(r.stdout, r.stderr).toBe(`${leafFile}: OK\n`);
  });

  it("issues a throw-away leaf under the intermediate before accepting it, and refuses when it cannot (a key that is not the intermediate's)", async () => {
    const stranger = await generateKeyPair("ecdsa-p256");
    expect(() =>
      checkUploadedIntermediate({ certificate: good, expectedSpkiDer: spki, customerRoot: rootPem, issuerKey: stranger.privateKey, now }),
    ).toThrow("certificate: the agent could not issue a leaf under it (issuer: the private key does not belong to the CA certificate)");
  });

  it("verifyChain with purpose serverAuth refuses a path whose intermediate's extendedKeyUsage lacks serverAuth, as openssl -purpose sslserver does", async () => {
    const clientOnly = sign(join(tmp.dir, "kmi.csr"), "customer", `${EXT.intermediate}extendedKeyUsage=clientAuth\n`, "eku-client");
    const der = certificateInfo(new Uint8Array(Buffer.from(clientOnly.split("-----")[2]!.replace(/\s+/g, ""), "base64"))).der;
    const leafKey = await generateKeyPair("ecdsa-p256");
    const leaf = createLeafIssuer({ certificateDer: der, privateKey: key.privateKey }).issueLeaf({
      publicKeySpkiDer: exportPublicKeySpkiDer(leafKey.publicKey),
      dnsNames: ["localhost"],
      notBefore: new Date(),
      notAfter: new Date(Date.now() + DAY * 1000),
    });
    const rootDer = certificateInfo(new Uint8Array(Buffer.from(rootPem.split("-----")[2]!.replace(/\s+/g, ""), "base64"))).der;
    const at = new Date(Date.now() + 5000);
    expect(verifyChain({ leafDer: leaf, intermediatesDer: [der], rootsDer: [rootDer], at }).ok).toBe(true);
    const r = verifyChain({ leafDer: leaf, intermediatesDer: [der], rootsDer: [rootDer], at, purpose: "serverAuth" });
    expect(r).toEqual({ ok: false, reason: "issuer 1 (CN=acme MITM CA v3,O=acme,C=US): extendedKeyUsage lacks serverAuth" });
    const leafFile = tmp.write("eku-leaf.pem", certificateToPem(leaf));
    const o = openssl(["verify", "-purpose", "sslserver", "-CAfile", join(tmp.dir, "customer.pem"), "-untrusted", join(tmp.dir, "eku-client.pem"), leafFile]);
    expect(o.code).not.toBe(0);
  });

  it.each([
    ["non-CA", InvalidArgument, "certificate: not a CA (basicConstraints cA is false); upload the intermediate, not a leaf"],
    ["no keyCertSign", InvalidArgument, "certificate: keyUsage lacks keyCertSign"],
    ["another key", InvalidArgument, "certificate: its public key is not the pending CSR's key; upload the certificate issued for the CSR of version 3"],
    ["expired", FailedPrecondition, "certificate: expired at"],
    ["not yet valid", FailedPrecondition, "certificate: not valid until"],
    ["SHA-1", InvalidArgument, "certificate: signed with ecdsa-with-SHA1, which TLS clients reject"],
    ["garbage", InvalidArgument, "certificate: neither PEM nor DER; upload the intermediate certificate as PEM"],
    ["random DER-like", InvalidArgument, "certificate: not a valid X.509 certificate"],
    ["truncated PEM", InvalidArgument, 'certificate: truncated PEM (a CERTIFICATE block has no "-----END CERTIFICATE-----" line); upload the whole file'],
    ["corrupt PEM", InvalidArgument, "certificate: corrupt PEM (the CERTIFICATE block is not valid base64)"],
    ["base64 not a certificate", InvalidArgument, "certificate: not a valid X.509 certificate"],
    ["truncated DER", InvalidArgument, "certificate: truncated or corrupt DER"],
    ["PEM bundle", InvalidArgument, "certificate: holds 2 certificates (a bundle); upload only the intermediate certificate, not the chain"],
    ["DER bundle", InvalidArgument, "certificate: holds 2 certificates (a bundle)"],
    ["a CSR", InvalidArgument, "certificate: this is a CSR; upload the certificate your CA issued for it"],
    ["a private key", InvalidArgument, "certificate: the file holds a private key; never upload keys"],
    ["empty", InvalidArgument, "certificate: empty; upload the intermediate certificate as PEM or DER"],
    ["too large", InvalidArgument, "certificate: larger than 64 KiB"],
    ["another root", InvalidArgument, "certificate: does not chain to customer_root (certificate (CN=acme MITM CA v3,O=acme,C=US): no given certificate is its issuer"],
    ["bad signature", InvalidArgument, "certificate: does not chain to customer_root (certificate (CN=acme MITM CA v3,O=acme,C=US): signature does not verify"],
    ["root not a CA", InvalidArgument, "customer_root: not a CA (basicConstraints cA is false)"],
    ["root garbage", InvalidArgument, "customer_root: truncated PEM"],
    ["root bundle", InvalidArgument, "customer_root: holds 2 certificates (a bundle); upload only the customer's root certificate"],
    ["root pathLen 0", InvalidArgument, "customer_root: pathLenConstraint 0 forbids an intermediate CA below it"],
  ] as const)("refuses: %s", (name, cls, message) => {
    const c = cases.get(name)!;
    expect(c, name).toBeDefined();
    let err: unknown;
    try {
      checkUploadedIntermediate({ expectedSpkiDer: spki, now, pendingVersion: 3, ...c });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(cls);
    expect((err as Error).message).toContain(message);
    // Never key material or PEM/base64 bodies in a message.
    expect((err as Error).message).not.toMatch(/[A-Za-z0-9+/=]{40}/);
  });
});
