import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FailedPrecondition, InvalidArgument } from "../../../src/common/errors.js";
import { certificateInfo } from "../../../src/pki/inspect.js";
import {
  createRootCa,
  issueIntermediateCa,
  issueMachineCertificate,
  issueServiceCertificate,
} from "../../../src/pki/issue.js";
import { exportPublicKeySpkiDer, generateKeyPair, subjectKeyIdentifier, type KeyPair } from "../../../src/pki/keys.js";
import { createLeafIssuer } from "../../../src/pki/leaf.js";
import { certificateToPem } from "../../../src/pki/pem.js";
import { DAY, makeKmiPki, openssl, tempDir, x509Text, type KmiPki, type TempDir } from "./support.js";

const hex = (b: Uint8Array): string => Buffer.from(b).toString("hex");
/** openssl prints key ids as uppercase colon pairs. */
const colon = (h: string): string => h.toUpperCase().match(/../g)!.join(":");

describe("issue: KMI root → intermediate → leaf, judged by openssl", () => {
  let pki: KmiPki;
  let tmp: TempDir;
  let leafKey: KeyPair;

  beforeAll(async () => {
    pki = await makeKmiPki();
    tmp = tempDir();
    leafKey = await generateKeyPair("ecdsa-p256");
  });
  afterAll(() => tmp.cleanup());

  it("root: self-signed CA with critical basicConstraints and keyUsage keyCertSign+cRLSign, SKI", () => {
    const text = x509Text(pki.root.der);
    expect(text).toMatch(/X509v3 Basic Constraints: critical\s+CA:TRUE\n/);
    expect(text).toMatch(/X509v3 Key Usage: critical\s+Certificate Sign, CRL Sign\n/);
    expect(text).toContain(colon(hex(subjectKeyIdentifier(exportPublicKeySpkiDer(pki.root.key.publicKey)))));
    expect(text).toContain("Issuer: C = DE, O = kmi tests, CN = KMI Test Root CA");
    // Self-signed: openssl verifies it against itself.
    const root = tmp.write("root.pem", pki.root.pem);
    expect(openssl(["verify", "-CAfile", root, root]).stdout).toContain(": OK");
  });

  it("intermediate: pathlen:0, keyCertSign+cRLSign+digitalSignature critical, SKI and AKI = root SKI", () => {
    const text = x509Text(pki.intermediate.der);
    expect(text).toMatch(/X509v3 Basic Constraints: critical\s+CA:TRUE, pathlen:0\n/);
    expect(text).toMatch(/X509v3 Key Usage: critical\s+Digital Signature, Certificate Sign, CRL Sign\n/);
    const rootSki = certificateInfo(pki.root.der).subjectKeyIdHex!;
    const intSki = hex(subjectKeyIdentifier(exportPublicKeySpkiDer(pki.intermediate.key.publicKey)));
    expect(text).toMatch(new RegExp(`X509v3 Subject Key Identifier: \\n\\s+${colon(intSki)}`));
    expect(text).toMatch(new RegExp(`X509v3 Authority Key Identifier: \\n\\s+(keyid:)?${colon(rootSki)}`));
    const root = tmp.write("root.pem", pki.root.pem);
    const int = tmp.write("int.pem", pki.intermediate.pem);
    const r = openssl(["verify", "-CAfile", root, int]);
    expect(r.stdout).toContain(`${int}: OK`);
  });

  it("a leaf from the fast builder passes `openssl verify -CAfile root -untrusted intermediate leaf`", () => {
    const issuer = createLeafIssuer({ certificateDer: pki.intermediate.der, privateKey: pki.intermediate.key.privateKey });
    const leafDer = issuer.issueLeaf({
      publicKeySpkiDer: exportPublicKeySpkiDer(leafKey.publicKey),
      dnsNames: ["www.example.com", "*.cdn.example.com"],
      ipAddresses: ["192.0.2.7", "2001:db8::1"],
      notBefore: new Date(pki.now.getTime() - 60_000),
      notAfter: new Date(pki.now.getTime() + 30 * DAY * 1000),
    });
    const root = tmp.write("root.pem", pki.root.pem);
    const int = tmp.write("int.pem", pki.intermediate.pem);
    const leaf = tmp.write("leaf.pem", certificateToPem(leafDer));
    const r = openssl(["verify", "-CAfile", root, "-untrusted", int, "-purpose", "sslserver", "-x509_strict", leaf]);
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe(`${leaf}: OK\n`);
    // Also with hostname checks, as a TLS client would.
    expect(openssl(["verify", "-CAfile", root, "-untrusted", int, "-verify_hostname", "img.cdn.example.com", leaf]).code).toBe(0);
    expect(openssl(["verify", "-CAfile", root, "-untrusted", int, "-verify_hostname", "evil.example.org", leaf]).code).not.toBe(0);

    const text = x509Text(leafDer);
    expect(text).toMatch(/X509v3 Basic Constraints: critical\s+CA:FALSE\n/);
    expect(text).toMatch(/X509v3 Key Usage: critical\s+Digital Signature\n/);
    expect(text).toMatch(/X509v3 Extended Key Usage: \n\s+TLS Web Server Authentication\n/);
    expect(text).toMatch(
      /X509v3 Subject Alternative Name: \n\s+DNS:www.example.com, DNS:\*.cdn.example.com, IP Address:192.0.2.7, IP Address:2001:DB8:0:0:0:0:0:1\n/,
    );
    expect(text).toContain("Subject: CN = www.example.com");
    const intSki = certificateInfo(pki.intermediate.der).subjectKeyIdHex!;
    expect(text).toMatch(new RegExp(`X509v3 Authority Key Identifier: \\n\\s+(keyid:)?${colon(intSki)}`));
    expect(text).toMatch(
      new RegExp(`X509v3 Subject Key Identifier: \\n\\s+${colon(hex(subjectKeyIdentifier(exportPublicKeySpkiDer(leafKey.publicKey))))}`),
    );
    expect(text).toContain("Signature Algorithm: ecdsa-with-SHA256");
  });

  it("a leaf is refused by openssl against another root (the judge can fail)", async () => {
    const other = await makeKmiPki();
    const issuer = createLeafIssuer({ certificateDer: pki.intermediate.der, privateKey: pki.intermediate.key.privateKey });
    const leafDer = issuer.issueLeaf({
      publicKeySpkiDer: exportPublicKeySpkiDer(leafKey.publicKey),
      dnsNames: ["a.example"],
      notBefore: new Date(),
      notAfter: new Date(Date.now() + DAY * 1000),
    });
    const root = tmp.write("other-root.pem", other.root.pem);
    const int = tmp.write("int.pem", pki.intermediate.pem);
    const leaf = tmp.write("leaf2.pem", certificateToPem(leafDer));
    expect(openssl(["verify", "-CAfile", root, "-untrusted", int, leaf]).code).not.toBe(0);
  });

  it("service certificate: serverAuth+clientAuth, DNS/IP SANs and URI kmi://service/<name>", async () => {
    const infra = await generateKeyPair("ecdsa-p256");
    const infraDer = createRootCa({
      subject: { commonName: "KMI Infrastructure CA" },
      privateKey: infra.privateKey,
      now: pki.now,
      validitySeconds: 5 * 365 * DAY,
      pathLenConstraint: 0,
    });
    const svcKey = await generateKeyPair("ecdsa-p256");
    const der = issueServiceCertificate({
      issuer: { certificateDer: infraDer, privateKey: infra.privateKey },
      serviceName: "kdc",
      publicKeySpkiDer: exportPublicKeySpkiDer(svcKey.publicKey),
      dnsNames: ["localhost", "kdc.internal"],
      ipAddresses: ["127.0.0.1", "::1"],
      now: pki.now,
      validitySeconds: 90 * DAY,
    });
    const text = x509Text(der);
    expect(text).toMatch(/X509v3 Basic Constraints: critical\s+CA:FALSE\n/);
    expect(text).toMatch(/X509v3 Extended Key Usage: \n\s+TLS Web Server Authentication, TLS Web Client Authentication\n/);
    expect(text).toMatch(
      /X509v3 Subject Alternative Name: \n\s+DNS:localhost, DNS:kdc.internal, URI:kmi:\/\/service\/kdc, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1\n/,
    );
    expect(text).toContain("Subject: O = kmi, CN = kdc");
    const ca = tmp.write("infra.pem", certificateToPem(infraDer));
    const svc = tmp.write("svc.pem", certificateToPem(der));
    for (const purpose of ["sslserver", "sslclient"]) {
      const r = openssl(["verify", "-CAfile", ca, "-purpose", purpose, "-x509_strict", "-verify_ip", "127.0.0.1", svc]);
      expect(r.stdout, r.stderr).toContain(": OK");
    }
    const info = certificateInfo(der);
    expect(info.uris).toEqual(["kmi://service/kdc"]);
    expect(info.notAfter.getTime() - info.notBefore.getTime()).toBe((90 * DAY + 60) * 1000);
  });

  it("machine certificate: URI kmi://machine/<id>, OU = group, clientAuth only, validity in seconds", async () => {
    const infra = await generateKeyPair("ecdsa-p256");
    const infraDer = createRootCa({
      subject: { commonName: "KMI Infrastructure CA" },
      privateKey: infra.privateKey,
      now: pki.now,
      validitySeconds: 5 * 365 * DAY,
    });
    const mKey = await generateKeyPair("ecdsa-p256");
    const der = issueMachineCertificate({
      issuer: { certificateDer: infraDer, privateKey: infra.privateKey },
      machineId: "m-0042",
      group: "edge-eu",
      publicKeySpkiDer: exportPublicKeySpkiDer(mKey.publicKey),
      now: pki.now,
      validitySeconds: 3600,
    });
    const text = x509Text(der);
    expect(text).toMatch(/X509v3 Subject Alternative Name: \n\s+URI:kmi:\/\/machine\/m-0042\n/);
    expect(text).toMatch(/X509v3 Extended Key Usage: \n\s+TLS Web Client Authentication\n/);
    expect(text).toContain("Subject: O = kmi, OU = edge-eu, CN = m-0042");
    const ca = tmp.write("infra2.pem", certificateToPem(infraDer));
    const m = tmp.write("machine.pem", certificateToPem(der));
    expect(openssl(["verify", "-CAfile", ca, "-purpose", "sslclient", m]).stdout).toContain(": OK");
    expect(openssl(["verify", "-CAfile", ca, "-purpose", "sslserver", m]).code).not.toBe(0);
    const info = certificateInfo(der);
    expect(info.notAfter.getTime() - pki.now.getTime()).toBeLessThanOrEqual(3600 * 1000);
    expect(info.notAfter.getTime() - pki.now.getTime()).toBeGreaterThan(3599 * 1000);
    expect(info.notBefore.getTime()).toBeLessThanOrEqual(pki.now.getTime() - 59_000);
  });

  it("RSA 2048 intermediate under the EC root signs an RSA-signed leaf that openssl verifies", async () => {
    const rsa = await generateKeyPair("rsa-2048"); // slow: the one RSA keygen of this file
    const intDer = issueIntermediateCa({
      issuer: { certificateDer: pki.root.der, privateKey: pki.root.key.privateKey },
      subject: { commonName: "acme RSA MITM CA" },
      publicKeySpkiDer: exportPublicKeySpkiDer(rsa.publicKey),
      now: pki.now,
      validitySeconds: 365 * DAY,
    });
    expect(certificateInfo(intDer).keyAlgorithm).toBe("rsa-2048");
    const issuer = createLeafIssuer({ certificateDer: intDer, privateKey: rsa.privateKey });
    const leafDer = issuer.issueLeaf({
      publicKeySpkiDer: exportPublicKeySpkiDer(leafKey.publicKey),
      dnsNames: ["rsa.example.com"],
      notBefore: pki.now,
      notAfter: new Date(pki.now.getTime() + 7 * DAY * 1000),
    });
    const root = tmp.write("root.pem", pki.root.pem);
    const int = tmp.write("rsa-int.pem", certificateToPem(intDer));
    const leaf = tmp.write("rsa-leaf.pem", certificateToPem(leafDer));
    const r = openssl(["verify", "-CAfile", root, "-untrusted", int, "-x509_strict", leaf]);
    expect(r.stdout, r.stderr).toBe(`${leaf}: OK\n`);
    expect(x509Text(leafDer)).toContain("Signature Algorithm: sha256WithRSAEncryption");
    expect(x509Text(intDer)).toMatch(/Public-Key: \(2048 bit\)/);
    // The issuing CA's own key is never certified as a leaf.
    expect(() =>
      issuer.issueLeaf({
        publicKeySpkiDer: exportPublicKeySpkiDer(rsa.publicKey),
        dnsNames: ["x.example.com"],
        notBefore: pki.now,
        notAfter: new Date(pki.now.getTime() + DAY * 1000),
      }),
    ).toThrow("public_key: is the issuing CA's own key");
    // An RSA leaf key (here: under the EC intermediate) gets keyEncipherment too, for TLS 1.2 RSA key exchange.
    const ecIssuer = createLeafIssuer({ certificateDer: pki.intermediate.der, privateKey: pki.intermediate.key.privateKey });
    const rsaLeaf = ecIssuer.issueLeaf({
      publicKeySpkiDer: exportPublicKeySpkiDer(rsa.publicKey),
      dnsNames: ["x.example.com"],
      notBefore: pki.now,
      notAfter: new Date(pki.now.getTime() + DAY * 1000),
    });
    expect(x509Text(rsaLeaf)).toMatch(/X509v3 Key Usage: critical\s+Digital Signature, Key Encipherment\n/);
    expect(certificateInfo(rsaLeaf).keyUsage).toEqual(["digitalSignature", "keyEncipherment"]);
  }, 20_000);

  it("clamps notAfter to the issuer's notAfter", async () => {
    const k = await generateKeyPair("ecdsa-p256");
    const der = issueIntermediateCa({
      issuer: { certificateDer: pki.root.der, privateKey: pki.root.key.privateKey },
      subject: { commonName: "long-lived" },
      publicKeySpkiDer: exportPublicKeySpkiDer(k.publicKey),
      now: pki.now,
      validitySeconds: 29 * 365 * DAY,
    });
    expect(certificateInfo(der).notAfter).toEqual(certificateInfo(pki.root.der).notAfter);
  });

  it.each([
    ["issuer not a CA", "leaf-as-issuer", FailedPrecondition, "issuer: not a CA certificate"],
    ["issuer key mismatch", "wrong-key", FailedPrecondition, "issuer: the private key does not belong to the CA certificate"],
    ["issuer pathLen 0 issuing a CA", "pathlen0", FailedPrecondition, "may not issue CA certificates"],
    ["issuer expired", "expired", FailedPrecondition, "issuer: expired at"],
    ["subject without CN", "no-cn", InvalidArgument, "subject.common_name: required for a CA"],
    ["bad country", "bad-country", InvalidArgument, "subject.country: must be two uppercase letters"],
    ["the issuer's own key", "own-key", InvalidArgument, "public_key: is the issuer's own key"],
  ] as const)("issueIntermediateCa refuses: %s", async (_name, kind, cls, message) => {
    const k = await generateKeyPair("ecdsa-p256");
    let issuerDer = pki.root.der;
    let issuerKey = pki.root.key.privateKey;
    let now = pki.now;
    let subject: { commonName?: string; country?: string } = { commonName: "x" };
    let spki = exportPublicKeySpkiDer(k.publicKey);
    if (kind === "leaf-as-issuer") {
      issuerDer = issueServiceCertificate({
        issuer: { certificateDer: pki.root.der, privateKey: pki.root.key.privateKey },
        serviceName: "svc",
        publicKeySpkiDer: spki,
        now,
        validitySeconds: DAY,
      });
      issuerKey = k.privateKey;
      spki = exportPublicKeySpkiDer(pki.intermediate.key.publicKey);
    } else if (kind === "wrong-key") issuerKey = k.privateKey;
    else if (kind === "pathlen0") {
      issuerDer = pki.intermediate.der;
      issuerKey = pki.intermediate.key.privateKey;
    } else if (kind === "expired") now = new Date(pki.now.getTime() + 3651 * DAY * 1000);
    else if (kind === "no-cn") subject = {};
    else if (kind === "bad-country") subject = { commonName: "x", country: "de" };
    else if (kind === "own-key") spki = exportPublicKeySpkiDer(pki.root.key.publicKey);
    const call = (): Uint8Array =>
      issueIntermediateCa({
        issuer: { certificateDer: issuerDer, privateKey: issuerKey },
        subject,
        publicKeySpkiDer: spki,
        now,
        validitySeconds: DAY,
      });
    expect(call).toThrow(cls);
    expect(call).toThrow(message);
  });

  it.each([
    ["bad service name", { serviceName: "kdc/x" }, "service_name: must be 1-64 letters"],
    ["bad DNS name", { dnsNames: ["bad_host.example"] }, 'dns_names[0]: "bad_host.example" is not a valid hostname'],
    ["bad IP", { ipAddresses: ["300.1.1.1"] }, 'ip_addresses[0]: "300.1.1.1" is not a valid IP address'],
    ["zero validity", { validitySeconds: 0 }, "validity_seconds: must be a whole number"],
  ])("issueServiceCertificate refuses with InvalidArgument: %s", (_name, patch, message) => {
    const call = (): Uint8Array =>
      issueServiceCertificate({
        issuer: { certificateDer: pki.root.der, privateKey: pki.root.key.privateKey },
        serviceName: "kdc",
        publicKeySpkiDer: exportPublicKeySpkiDer(leafKey.publicKey),
        now: pki.now,
        validitySeconds: DAY,
        ...patch,
      });
    expect(call).toThrow(InvalidArgument);
    expect(call).toThrow(message);
  });
});
