import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { certificateInfo } from "../../../src/pki/inspect.js";
import { parseOneCertificate } from "../../../src/pki/pem.js";
import { verifyChain } from "../../../src/pki/verify.js";
import { DAY, makeKmiPki, openssl, opensslOk, tempDir, type TempDir } from "./support.js";
import { createLeafIssuer } from "../../../src/pki/leaf.js";
import { exportPublicKeySpkiDer, generateKeyPair } from "../../../src/pki/keys.js";

/**
 * verifyChain against chains made with the openssl CLI, each case also judged by
 * `openssl verify`, so the two must agree on ok / not ok.
 */
describe("verifyChain", () => {
  let tmp: TempDir;
  const der = new Map<string, Uint8Array>();
  const file = (name: string): string => join(tmp.dir, `${name}.pem`);

  /** Makes `name` (key + cert) signed by `issuer` (self-signed when undefined) with extensions `ext`. */
  function make(name: string, subj: string, issuer: string | undefined, ext: string[], days = 30): void {
    const key = join(tmp.dir, `${name}.key`);
    const extFile = tmp.write(`${name}.ext`, `${ext.join("\n")}\nsubjectKeyIdentifier=hash\n${issuer ? "authorityKeyIdentifier=keyid\n" : ""}`);
    if (!issuer) {
      opensslOk(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", file(name), "-days", String(days), "-subj", subj, ...ext.flatMap((e) => ["-addext", e])]);
    } else {
      const csr = join(tmp.dir, `${name}.csr`);
      opensslOk(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", csr, "-subj", subj]);
      opensslOk(["x509", "-req", "-in", csr, "-CA", file(issuer), "-CAkey", join(tmp.dir, `${issuer}.key`), "-set_serial", `0x${randomBytes(10).toString("hex")}`, "-days", String(days), "-extfile", extFile, "-out", file(name)]);
    }
    der.set(name, parseOneCertificate(readFileSync(file(name), "utf8"), name));
  }

  const CA = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"];
  const CA0 = ["basicConstraints=critical,CA:TRUE,pathlen:0", "keyUsage=critical,keyCertSign,cRLSign"];
  const LEAF = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature", "extendedKeyUsage=serverAuth", "subjectAltName=DNS:leaf.example"];

  beforeAll(() => {
    tmp = tempDir();
    make("root", "/CN=Root", undefined, CA);
    make("int", "/CN=Int", "root", CA0);
    make("leaf", "/CN=leaf.example", "int", LEAF);
    make("int2", "/CN=Int2", "int", CA0); // violates int's pathlen:0
    make("leaf2", "/CN=leaf2.example", "int2", LEAF);
    make("noca", "/CN=NotCA", "root", ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyCertSign"]);
    make("leaf3", "/CN=leaf3.example", "noca", LEAF);
    make("nokcs", "/CN=NoKCS", "root", ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,digitalSignature"]);
    make("leaf4", "/CN=leaf4.example", "nokcs", LEAF);
    make("crit", "/CN=crit.example", "int", [...LEAF, "1.3.6.1.4.1.99999.1=critical,ASN1:NULL"]);
    make("other", "/CN=Root", undefined, CA); // same name as root, other key
    make("shortint", "/CN=ShortInt", "root", CA0, 1);
    make("leaf5", "/CN=leaf5.example", "shortint", LEAF, 20);
  });
  afterAll(() => tmp.cleanup());

  const day = (n: number): Date => new Date(Date.now() + n * DAY * 1000);

  it.each([
    ["a valid chain", "leaf", ["int"], ["root"], 0, true, ""],
    ["the intermediate alone", "int", [], ["root"], 0, true, ""],
    ["a root as its own anchor", "root", [], ["root"], 0, true, ""],
    ["a missing intermediate", "leaf", [], ["root"], 0, false, "certificate (CN=leaf.example): no given certificate is its issuer (CN=Int)"],
    ["another root with the same name", "leaf", ["int"], ["other"], 0, false, "issuer 1 (CN=Int): its issuer CN=Root is given, but with another key"],
    ["pathlen violated", "leaf2", ["int2", "int"], ["root"], 0, false, "issuer 2 (CN=Int): pathLenConstraint 0 allows fewer intermediates than the 1 below it"],
    ["a non-CA issuer", "leaf3", ["noca"], ["root"], 0, false, "issuer 1 (CN=NotCA): not a CA"],
    ["an issuer without keyCertSign", "leaf4", ["nokcs"], ["root"], 0, false, "issuer 1 (CN=NoKCS): keyUsage lacks keyCertSign"],
    ["an unknown critical extension", "crit", ["int"], ["root"], 0, false, "unsupported critical extension 1.3.6.1.4.1.99999.1"],
    ["the leaf expired", "leaf", ["int"], ["root"], 31, false, "certificate (CN=leaf.example): expired at"],
    ["not yet valid", "leaf", ["int"], ["root"], -1, false, "not valid before"],
    ["the intermediate expired", "leaf5", ["shortint"], ["root"], 2, false, "issuer 1 (CN=ShortInt): expired at"],
  ] as const)("%s", (_name, leaf, ints, roots, atDays, ok, reason) => {
    const result = verifyChain({
      leafDer: der.get(leaf)!,
      intermediatesDer: ints.map((n) => der.get(n)!),
      rootsDer: roots.map((n) => der.get(n)!),
      at: day(atDays),
    });
    expect(result.ok).toBe(ok);
    if (!result.ok) expect(result.reason).toContain(reason);
    else expect(result.chain.map((c) => c.subject)).toEqual([leaf, ...ints, ...roots].filter((v, i, a) => a.indexOf(v) === i).map((n) => certificateInfo(der.get(n)!).subject));
    // The independent judge agrees (openssl checks time with -attime).
    const args = ["verify", "-CAfile", file(roots[0]), ...ints.flatMap((n) => ["-untrusted", file(n)]), "-attime", String(Math.floor(day(atDays).getTime() / 1000)), file(leaf)];
    expect(openssl(args).code === 0, openssl(args).stderr).toBe(ok);
  });

  it("reports unparseable input as a reason, and a tampered leaf signature", async () => {
    expect(verifyChain({ leafDer: new Uint8Array([1, 2, 3]), rootsDer: [der.get("root")!], at: new Date() })).toEqual({
      ok: false,
      reason: expect.stringContaining("leaf: not a valid X.509 certificate"),
    });
    expect(verifyChain({ leafDer: der.get("leaf")!, rootsDer: [], at: new Date() })).toEqual({ ok: false, reason: "no trust anchor given" });
    const pki = await makeKmiPki();
    const issuer = createLeafIssuer({ certificateDer: pki.intermediate.der, privateKey: pki.intermediate.key.privateKey });
    const leaf = issuer.issueLeaf({
      publicKeySpkiDer: exportPublicKeySpkiDer((await generateKeyPair("ecdsa-p256")).publicKey),
      dnsNames: ["t.example"],
      notBefore: pki.now,
      notAfter: new Date(pki.now.getTime() + DAY * 1000),
    });
    const opts = { intermediatesDer: [pki.intermediate.der], rootsDer: [pki.root.der], at: new Date(pki.now.getTime() + 1000) };
    expect(verifyChain({ leafDer: leaf, ...opts }).ok).toBe(true);
    const tampered = leaf.slice();
    tampered[tampered.length - 2]! ^= 0x01;
    const r = verifyChain({ leafDer: tampered, ...opts });
    expect(r.ok).toBe(false);
    expect(!r.ok && r.reason).toContain("certificate (CN=t.example): signature does not verify with the issuer's public key");
  });
});
