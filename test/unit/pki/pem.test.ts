import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import {
  certificatesToPem,
  certificateToPem,
  decodePemBlocks,
  encodePem,
  parseOneCertificate,
  splitPemCertificates,
} from "../../../src/pki/pem.js";
import { makeKmiPki } from "./support.js";

describe("pem", () => {
  it("encodes 64-character lines that openssl-style decoders expect, and decodes with explanatory text around", () => {
    const der = new Uint8Array(100).map((_, i) => i);
    const pem = encodePem("TEST", der);
    const lines = pem.trim().split("\n");
    expect(lines[0]).toBe("-----BEGIN TEST-----");
    expect(lines[1]).toHaveLength(64);
    expect(lines.at(-1)).toBe("-----END TEST-----");
    const blocks = decodePemBlocks(`Subject: something\n${pem}trailing words\n`, "f");
    expect(blocks).toHaveLength(1);
    expect(Buffer.from(blocks[0]!.der).equals(Buffer.from(der))).toBe(true);
  });

  it("splits a chain, PEM or concatenated DER, in file order", async () => {
    const pki = await makeKmiPki();
    const chain = certificatesToPem([pki.intermediate.der, pki.root.der]);
    const ders = splitPemCertificates(chain, "chain");
    expect(ders.map((d) => Buffer.from(d).toString("hex"))).toEqual([pki.intermediate.der, pki.root.der].map((d) => Buffer.from(d).toString("hex")));
    expect(splitPemCertificates(Buffer.concat([pki.intermediate.der, pki.root.der]), "chain")).toHaveLength(2);
    expect(parseOneCertificate(certificateToPem(pki.root.der), "c")).toEqual(pki.root.der);
    expect(() => splitPemCertificates(certificateToPem(pki.root.der).repeat(11), "chain")).toThrow(
      "chain: holds 11 certificates; at most 10 are accepted",
    );
    const broken = chain.replace(/-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\n/, "-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nAAAA");
    expect(() => splitPemCertificates(broken, "chain")).toThrow(InvalidArgument);
    expect(() => splitPemCertificates(broken, "chain")).toThrow("chain[1]: not a valid X.509 certificate");
  });

  it("refuses a PEM block of another kind, naming it", () => {
    const pem = encodePem("PUBLIC KEY", new Uint8Array([0x30, 0]));
    expect(() => parseOneCertificate(pem, "certificate")).toThrow('certificate: holds a PEM "PUBLIC KEY" block, not a CERTIFICATE');
  });
});
