import { createPublicKey, generateKeyPairSync, X509Certificate } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { IssueLeafCertificateResponseSchema } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { createRootCa, issueIntermediateCa } from "../../../src/pki/issue.js";
import { exportPublicKeySpkiDer } from "../../../src/pki/keys.js";
import { createLeafIssuer } from "../../../src/pki/leaf.js";
import { certificateToPem } from "../../../src/pki/pem.js";
import { AgentCallError, type LeafIssuer, type LeafRequest } from "../../../src/clients/agent-client.js";
import { createLeafMinter, LeafRejected, MAX_LEAF_LIFETIME_MS } from "../../../src/proxy/leaf-minter.js";
import type { OriginCertificate } from "../../../src/proxy/origin-cert.js";

const DAY = 86_400_000;
const ca = generateKeyPairSync("ec", { namedCurve: "P-256" });
const caDer = createRootCa({ subject: { commonName: "t MITM CA" }, privateKey: ca.privateKey, now: new Date(Date.now() - 60_000), validitySeconds: 400 * 86400 });
const issuer = createLeafIssuer({ certificateDer: caDer, privateKey: ca.privateKey });

type Tamper = "other-key" | "ca" | "outlive" | "none";

/** An in-process agent that signs what it is asked (or tampers with it, to test the checks). */
function fakeAgent(tamper: Tamper = "none", maxMs = MAX_LEAF_LIFETIME_MS): LeafIssuer & { calls: LeafRequest[] } {
  const calls: LeafRequest[] = [];
  return {
    calls,
    async issueLeafCertificate(req) {
      calls.push(req);
      const now = Date.now();
      if (req.notAfter !== undefined && req.notAfter.getTime() > now + maxMs - 3600_000) {
        throw new AgentCallError("invalid_argument", 3, "not_after: beyond the maximum leaf lifetime");
      }
      let spki = req.publicKeyDer;
      if (tamper === "other-key") spki = exportPublicKeySpkiDer(generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey);
      let der: Uint8Array;
      if (tamper === "ca") {
        der = issueIntermediateCa({ issuer: { certificateDer: caDer, privateKey: ca.privateKey }, subject: { commonName: "not a leaf" }, publicKeySpkiDer: spki, now: new Date(now - 60_000), validitySeconds: 10 * 86400 });
      } else {
        const notAfter = tamper === "outlive" ? new Date(now + 46 * DAY) : (req.notAfter ?? new Date(now - 3600_000 + maxMs));
        der = issuer.issueLeaf({ publicKeySpkiDer: spki, dnsNames: [...req.dnsNames], ipAddresses: [...req.ipAddresses], notBefore: new Date(now - 3600_000), notAfter });
      }
      return create(IssueLeafCertificateResponseSchema, { certificatePem: certificateToPem(der), chainPem: certificateToPem(caDer), issuerKeyId: "kid", intermediateVersion: 3, serialHex: "ab" });
    },
  };
}

const origin = (days: number): OriginCertificate => ({ fingerprint: "F", dnsNames: ["www.example.com", "example.com"], ipAddresses: ["192.0.2.1"], notAfter: new Date(Date.now() + days * DAY) });

describe("leaf minter", () => {
  it("sends a fresh P-256 public key and the origin's names; gets a ready context", async () => {
    const agent = fakeAgent();
    const m = createLeafMinter({ agent });
    const e = await m.mint("acme", origin(90), "www.example.com");
    const req = agent.calls[0]!;
    expect(req).toMatchObject({ tenantId: "acme", dnsNames: ["www.example.com", "example.com"], ipAddresses: ["192.0.2.1"], commonName: "www.example.com", notAfter: undefined });
    const pub = createPublicKey({ key: Buffer.from(req.publicKeyDer), format: "der", type: "spki" });
    expect(pub.asymmetricKeyType).toBe("ec");
    expect(pub.asymmetricKeyDetails?.namedCurve).toBe("prime256v1");
    expect(e).toMatchObject({ tenant: "acme", issuerKeyId: "kid", intermediateVersion: 3, serialHex: "ab" });
    expect(e.notAfter - e.notBefore).toBeLessThanOrEqual(MAX_LEAF_LIFETIME_MS);
    // Every mint makes a new key.
    await m.mint("acme", origin(90), "www.example.com");
    expect(Buffer.from(agent.calls[1]!.publicKeyDer).equals(Buffer.from(req.publicKeyDer))).toBe(false);
  });

  it("asks for the origin's end when it comes first", async () => {
    const agent = fakeAgent();
    const o = origin(10);
    const e = await createLeafMinter({ agent }).mint("acme", o, "example.com");
    expect(agent.calls[0]!.notAfter?.getTime()).toBe(o.notAfter.getTime());
    expect(e.notAfter).toBeLessThanOrEqual(o.notAfter.getTime());
  });

  it("an agent with a shorter maximum is asked again for its maximum", async () => {
    const agent = fakeAgent("none", 30 * DAY);
    const e = await createLeafMinter({ agent }).mint("acme", origin(40), "example.com");
    expect(agent.calls).toHaveLength(2);
    expect(agent.calls[1]!.notAfter).toBeUndefined();
    expect(e.notAfter).toBeLessThan(Date.now() + 31 * DAY);
  });

  it.each([
    ["a certificate for another key", "other-key" as Tamper, "another public key"],
    ["a CA certificate", "ca" as Tamper, "a ca certificate as a leaf"],
    ["a leaf that outlives the origin", "outlive" as Tamper, "outlives the origin"],
  ])("refuses %s from the agent", async (_n, tamper, message) => {
    const m = createLeafMinter({ agent: fakeAgent(tamper) });
    const days = tamper === "outlive" ? 20 : 90;
    await expect(m.mint("acme", origin(days), "example.com")).rejects.toThrow(LeafRejected);
    await expect(m.mint("acme", origin(days), "example.com")).rejects.toThrow(message);
  });

  it("an origin without names cannot be copied", async () => {
    const m = createLeafMinter({ agent: fakeAgent() });
    await expect(m.mint("acme", { ...origin(9), dnsNames: [], ipAddresses: [] }, "x")).rejects.toThrow("names no dns name");
  });

  it("the leaf served is the agent's, verifiable against its issuer", async () => {
    const agent = fakeAgent();
    await createLeafMinter({ agent }).mint("acme", origin(90), "www.example.com");
    // Re-issue through the fake to inspect what it signed.
    const res = await agent.issueLeafCertificate(agent.calls[0]!);
    const leaf = new X509Certificate(res.certificatePem);
    expect(leaf.verify(new X509Certificate(certificateToPem(caDer)).publicKey)).toBe(true);
    expect(leaf.ca).toBe(false);
  });
});
