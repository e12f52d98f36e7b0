import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import { generateKeyPairSync } from "node:crypto";
import { oid, printableString, sequence, set, smallInteger, utf8String, x509Time } from "../../../src/pki/der.js";
import { exportPublicKeySpkiDer } from "../../../src/pki/keys.js";
import { assembleSigned, signatureAlgorithmFor, signWithKey } from "../../../src/pki/signature.js";
import { commonNameOf, encodeName, formatName } from "../../../src/pki/name.js";
import { Oid } from "../../../src/pki/oids.js";
import { opensslOk } from "./support.js";

describe("name", () => {
  it("builds C, O, OU, CN in order and formats them as RFC 4514, as openssl does", () => {
    const der = encodeName({ commonName: "m-1", organizationalUnit: "edge-eu", organization: "kmi", country: "DE" });
    expect(formatName(der)).toBe("CN=m-1,OU=edge-eu,O=kmi,C=DE");
    expect(commonNameOf(der)).toBe("m-1");
    expect(formatName(encodeName({}))).toBe("");
  });

  it("escapes special characters per RFC 4514 and agrees with openssl -nameopt RFC2253", () => {
    const der = sequence(
      set(sequence(oid(Oid.organizationName), utf8String('A, B + "C" <d>; e\\f'))),
      set(sequence(oid(Oid.commonName), utf8String("#lead and trail "))),
      set(sequence(oid(Oid.countryName), printableString("DE")), sequence(oid(Oid.organizationalUnitName), utf8String("multi"))),
    );
    const ours = formatName(der);
    expect(ours).toBe('OU=multi+C=DE,CN=\\#lead and trail\\ ,O=A\\, B \\+ \\"C\\" \\<d\\>\\; e\\\\f');
    // openssl prints a Name only inside a certificate: wrap this exact Name into a self-signed one.
    const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
    const alg = signatureAlgorithmFor(privateKey).algorithmIdentifierDer;
    const tbs = sequence(
      Uint8Array.of(0xa0, 3, 2, 1, 2),
      smallInteger(1),
      alg,
      der,
      sequence(x509Time(new Date()), x509Time(new Date(Date.now() + 3600e3))),
      der,
      exportPublicKeySpkiDer(privateKey),
    );
    const cert = assembleSigned(tbs, alg, signWithKey(privateKey, tbs));
    const subject = opensslOk(["x509", "-inform", "DER", "-noout", "-subject", "-nameopt", "RFC2253"], { input: cert }).trim();
    expect(subject).toBe(`subject=${ours}`);
  });

  it("writes an unknown attribute type as dotted OID with a #hex value", () => {
    const der = sequence(set(sequence(oid("1.2.840.113549.1.9.1"), Uint8Array.of(0x16, 0x01, 0x61))));
    expect(formatName(der)).toBe("1.2.840.113549.1.9.1=#160161");
  });

  it.each([
    [{ commonName: "" }, "subject.common_name: empty"],
    [{ commonName: "x".repeat(65) }, "subject.common_name: longer than 64 characters"],
    [{ organization: "a\nb" }, "subject.organization: contains control characters"],
    [{ country: "Germany" }, "subject.country: must be two uppercase letters"],
  ])("refuses %j", (dn, message) => {
    expect(() => encodeName(dn)).toThrow(InvalidArgument);
    expect(() => encodeName(dn)).toThrow(message);
  });
});
