import { execFileSync, spawnSync } from "node:child_process";
import { constants, createPublicKey, generateKeyPairSync, verify, X509Certificate } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import {
  IssueLeafCertificateRequestSchema,
  KeyEventType,
  KeyState,
  SignatureAlgorithm,
  AttestationState,
  type IssueLeafCertificateRequest,
  type WatchKeysResponse,
} from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { KeyPurpose } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { createHarness, type Harness } from "../../fixtures/agent/harness.js";
import {
  intermediateSecret,
  makeIntermediate,
  makeRoot,
  makeSigningKey,
  signingSecret,
  type TestIntermediate,
  type TestRoot,
  type TestSigningKey,
} from "../../fixtures/agent/tenant-ca.js";

const DAY = 86_400_000;
let dir: string;
let root: TestRoot;
let acme: TestIntermediate;
let acme2: TestIntermediate;
let shortLived: TestIntermediate;
let ecSigner: TestSigningKey;
let rsaSigner: TestSigningKey;
let h: Harness;
const leafKey = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
const leafSpki = new Uint8Array(leafKey.publicKey.export({ format: "der", type: "spki" }));

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "kmi-agent-svc-"));
  const past = Date.now() - 2 * DAY;
  root = makeRoot(past);
  acme = makeIntermediate(root, "acme", 1, { now: past });
  acme2 = makeIntermediate(root, "acme", 2, { now: past });
  shortLived = makeIntermediate(root, "brief", 1, { now: past, days: 10 });
  ecSigner = makeSigningKey("acme", "signer");
  rsaSigner = makeSigningKey("acme", "rsa-signer", "rsa");
  writeFileSync(join(dir, "root.pem"), root.pem);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

beforeEach(() => {
  h = createHarness();
  const now = h.clock.now();
  h.holder.replaceAll([intermediateSecret(acme, DAY, now), intermediateSecret(shortLived, DAY, now), signingSecret(ecSigner, DAY, now), signingSecret(rsaSigner, DAY, now)]);
});

function leafRequest(overrides: Omit<MessageInitShape<typeof IssueLeafCertificateRequestSchema>, "$typeName"> = {}): IssueLeafCertificateRequest {
  return create(IssueLeafCertificateRequestSchema, { tenantId: "acme", publicKey: leafSpki, dnsNames: ["www.example.com", "*.cdn.example.com"], ipAddresses: ["192.0.2.7"], ...overrides });
}

async function codeOf(p: Promise<unknown>): Promise<{ code: Code; message: string }> {
  try {
    await p;
  } catch (err) {
    const ce = ConnectError.from(err);
    return { code: ce.code, message: ce.rawMessage };
  }
  throw new Error("expected the call to fail");
}

function openssl(args: string[]): { status: number | null; out: string } {
  const r = spawnSync("openssl", args, { encoding: "utf8" });
  return { status: r.status, out: r.stdout + r.stderr };
}

describe("IssueLeafCertificate", () => {
  it("issues a leaf that openssl verifies against the tenant chain, with the policy's extensions", async () => {
    const res = await h.client.issueLeafCertificate(leafRequest());
    writeFileSync(join(dir, "leaf.pem"), res.certificatePem);
    writeFileSync(join(dir, "chain.pem"), res.chainPem);
    const v = openssl(["verify", "-CAfile", join(dir, "root.pem"), "-untrusted", join(dir, "chain.pem"), "-purpose", "sslserver", join(dir, "leaf.pem")]);
    expect(v.out).toContain(": OK");
    expect(v.status).toBe(0);

    const text = execFileSync("openssl", ["x509", "-noout", "-text", "-in", join(dir, "leaf.pem")]).toString();
    expect(text).toMatch(/X509v3 Basic Constraints: critical\s+CA:FALSE/);
    expect(text).toMatch(/X509v3 Key Usage: critical\s+Digital Signature\n/);
    expect(text).toMatch(/X509v3 Extended Key Usage:\s+TLS Web Server Authentication\n/);
    expect(text).toContain("DNS:www.example.com, DNS:*.cdn.example.com, IP Address:192.0.2.7");
    expect(text).toContain("Subject: CN = www.example.com");
    const leaf = new X509Certificate(res.certificatePem);
    const inter = new X509Certificate(acme.pem);
    expect(leaf.checkIssued(inter)).toBe(true);
    // AKI = the intermediate's SKI.
    const ski = /Subject Key Identifier:\s+([0-9A-F:]+)/.exec(execFileSync("openssl", ["x509", "-noout", "-text", "-in", join(dir, "chain.pem")]).toString())![1];
    expect(text).toMatch(new RegExp(`Authority Key Identifier:\\s+(keyid:)?${ski}`));
    expect(leaf.serialNumber.toLowerCase().replace(/^0+/, "")).toBe(res.serialHex.replace(/^0+/, ""));
    expect(res.intermediateVersion).toBe(1);
    expect(res.issuerKeyId).toBe(acme.keyId);
    // Validity: at most 47 days including backdating.
    const lifetime = Date.parse(leaf.validTo) - Date.parse(leaf.validFrom);
    expect(lifetime).toBeLessThanOrEqual(47 * DAY);
    expect(lifetime).toBeGreaterThan(46 * DAY);
    expect(Date.parse(leaf.validFrom)).toBeLessThan(h.clock.now() - 59 * 60_000);
    expect(timestampMs(res.notAfter!)).toBe(Date.parse(leaf.validTo));
  });

  it("logs one line with tenant, names, serial and caller, and no key material", async () => {
    h.lines.length = 0;
    const res = await h.client.issueLeafCertificate(leafRequest(), { headers: { "kmi-caller-pid": "4242" } });
    expect(h.lines).toHaveLength(1);
    const line = h.lines[0]!;
    expect(line).toMatchObject({ msg: "leaf issued", tenant: "acme", serial: res.serialHex, names: ["www.example.com", "*.cdn.example.com", "192.0.2.7"] });
    expect(String(line["caller"])).toContain("pid 4242 (claimed)");
    expect(JSON.stringify(line)).not.toMatch(/PRIVATE|BEGIN/);
  });

  it("caps not_after at the intermediate's notAfter instead of refusing", async () => {
    const inter = new X509Certificate(shortLived.pem);
    const res = await h.client.issueLeafCertificate(leafRequest({ tenantId: "brief", notAfter: timestampFromMs(h.clock.now() + 40 * DAY) }));
    expect(Date.parse(new X509Certificate(res.certificatePem).validTo)).toBe(Date.parse(inter.validTo));
  });

  it("takes a requested not_after inside the cap as given", async () => {
    const want = Math.floor((h.clock.now() + 3 * DAY) / 1000) * 1000;
    const res = await h.client.issueLeafCertificate(leafRequest({ notAfter: timestampFromMs(want) }));
    expect(Date.parse(new X509Certificate(res.certificatePem).validTo)).toBe(want);
  });

  it("issues for an RSA leaf key (keyEncipherment added)", async () => {
    const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
    const res = await h.client.issueLeafCertificate(leafRequest({ publicKey: new Uint8Array(rsa.publicKey.export({ format: "der", type: "spki" })) }));
    writeFileSync(join(dir, "rsa-leaf.pem"), res.certificatePem);
    const text = execFileSync("openssl", ["x509", "-noout", "-text", "-in", join(dir, "rsa-leaf.pem")]).toString();
    expect(text).toMatch(/Digital Signature, Key Encipherment/);
  });

  it.each<[string, Partial<IssueLeafCertificateRequest>, Code, RegExp]>([
    ["ca=true", { ca: true }, Code.InvalidArgument, /^ca: the agent never issues CA certificates/],
    ["no names", { dnsNames: [], ipAddresses: [] }, Code.InvalidArgument, /^dns_names: a leaf needs at least one name/],
    ["not_after beyond the 47-day cap", { notAfter: timestampFromMs(Date.now() + 48 * DAY) }, Code.InvalidArgument, /^not_after: .* is beyond the maximum leaf lifetime \(47 days/],
    ["not_after in the past", { notAfter: timestampFromMs(Date.now() - 1000) }, Code.InvalidArgument, /^not_after: .* is not in the future/],
    ["no tenant", { tenantId: "" }, Code.InvalidArgument, /^tenant_id: required/],
    ["a malformed tenant", { tenantId: "Acme!" }, Code.InvalidArgument, /^tenant_id: "Acme!" is not a tenant id/],
    ["no public key", { publicKey: new Uint8Array(0) }, Code.InvalidArgument, /^public_key: required/],
    ["a garbage public key", { publicKey: new Uint8Array(100).fill(7) }, Code.InvalidArgument, /^public_key: /],
    ["a P-384 key", { publicKey: new Uint8Array(generateKeyPairSync("ec", { namedCurve: "secp384r1" }).publicKey.export({ format: "der", type: "spki" })) }, Code.InvalidArgument, /^public_key: /],
    ["a bad hostname", { dnsNames: ["exa mple.com"] }, Code.InvalidArgument, /^dns_names\[0\]: "exa mple.com" is not a hostname/],
    ["a wildcard on a TLD", { dnsNames: ["*.com"] }, Code.InvalidArgument, /^dns_names\[0\]/],
    ["a bad IP", { ipAddresses: ["300.1.1.1"] }, Code.InvalidArgument, /^ip_addresses\[0\]: "300.1.1.1" is not an IPv4 or IPv6 address/],
    ["101 names", { dnsNames: Array.from({ length: 101 }, (_, i) => `h${i}.example.com`) }, Code.InvalidArgument, /^dns_names: 101 DNS names and 1 IP address, 102 in all; at most 100 names \(DNS and IP together\)/],
    [
      "100 DNS names and 100 IPs (the limit is 100 in all)",
      { dnsNames: Array.from({ length: 100 }, (_, i) => `h${i}.example.com`), ipAddresses: Array.from({ length: 100 }, (_, i) => `192.0.2.${i + 1}`) },
      Code.InvalidArgument,
      /^dns_names: 100 DNS names and 100 IP addresses, 200 in all; at most 100 names/,
    ],
    ["a wildcard on the public suffix co.uk", { dnsNames: ["*.co.uk"] }, Code.InvalidArgument, /^dns_names\[0\]: "\*\.co\.uk" is a wildcard on the public suffix "co\.uk", which would cover every domain under it/],
    ["a wildcard on a public suffix, upper case", { dnsNames: ["ok.example.com", "*.COM.AU"] }, Code.InvalidArgument, /^dns_names\[1\]: "\*\.COM\.AU" is a wildcard on the public suffix "com\.au"/],
    ["a wildcard on a suffix of a PSL wildcard rule (*.ck)", { dnsNames: ["*.foo.ck"] }, Code.InvalidArgument, /^dns_names\[0\]: .* public suffix "foo\.ck"/],
    ["the IPv4 unspecified address", { ipAddresses: ["0.0.0.0"] }, Code.InvalidArgument, /^ip_addresses\[0\]: "0\.0\.0\.0" is the unspecified address, which names no server/],
    ["the IPv6 unspecified address", { ipAddresses: ["192.0.2.1", "::"] }, Code.InvalidArgument, /^ip_addresses\[1\]: "::" is the unspecified address/],
    ["the unspecified address, IPv4-mapped", { ipAddresses: ["::ffff:0.0.0.0"] }, Code.InvalidArgument, /^ip_addresses\[0\]: "::ffff:0\.0\.0\.0" is the unspecified address/],
    ["the broadcast address", { ipAddresses: ["255.255.255.255"] }, Code.InvalidArgument, /^ip_addresses\[0\]: "255\.255\.255\.255" is the broadcast address/],
    ["an IPv4 multicast address", { ipAddresses: ["224.0.0.1"] }, Code.InvalidArgument, /^ip_addresses\[0\]: "224\.0\.0\.1" is a multicast address/],
    ["the top of IPv4 multicast", { ipAddresses: ["239.255.255.250"] }, Code.InvalidArgument, /is a multicast address/],
    ["an IPv6 multicast address", { ipAddresses: ["ff02::1"] }, Code.InvalidArgument, /^ip_addresses\[0\]: "ff02::1" is a multicast address/],
    ["a CN that is not a name", { commonName: "other.example.com" }, Code.InvalidArgument, /^common_name: "other.example.com" is not one of/],
    ["an unknown tenant", { tenantId: "globex" }, Code.NotFound, /^tenant_id: the agent holds no intermediate for tenant "globex"/],
  ])("refuses %s", async (_name, overrides, code, message) => {
    const r = await codeOf(h.client.issueLeafCertificate(leafRequest(overrides)));
    expect(r.code).toBe(code);
    expect(r.message).toMatch(message);
  });

  it.each([
    ["a wildcard on a private-section suffix (GitHub Pages holds a real *.github.io certificate)", { dnsNames: ["*.github.io"], ipAddresses: [] }],
    ["a wildcard under a public suffix", { dnsNames: ["*.example.co.uk"], ipAddresses: [] }],
    ["addresses next to the refused ones", { dnsNames: [], ipAddresses: ["0.0.0.1", "223.255.255.255", "240.0.0.1", "255.255.255.254", "::1", "fe80::1"] }],
    ["100 names in all, DNS and IP together", { dnsNames: Array.from({ length: 50 }, (_, i) => `h${i}.example.com`), ipAddresses: Array.from({ length: 50 }, (_, i) => `192.0.2.${i + 1}`) }],
  ])("issues for %s", async (_name, names) => {
    const res = await h.client.issueLeafCertificate(leafRequest(names));
    const san = new X509Certificate(res.certificatePem).subjectAltName ?? "";
    expect(san.split(", ")).toHaveLength(names.dnsNames.length + names.ipAddresses.length);
  });

  it("refuses its own intermediate key as the leaf key", async () => {
    const spki = new Uint8Array(createPublicKey(acme.key).export({ format: "der", type: "spki" }));
    const r = await codeOf(h.client.issueLeafCertificate(leafRequest({ publicKey: spki })));
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.message).toMatch(/^public_key: /);
  });
});

describe("Sign", () => {
  const message = Buffer.from("the message itself, not a digest");

  it("signs with an ECDSA signing key, verifiable with node:crypto (by id and by tenant/name)", async () => {
    for (const keyId of [ecSigner.keyId, "acme/signer"]) {
      const res = await h.client.sign({ keyId, message, algorithm: SignatureAlgorithm.ECDSA_SHA256 });
      expect(res.keyId).toBe(ecSigner.keyId);
      expect(verify("sha256", message, { key: ecSigner.publicKey, dsaEncoding: "der" }, res.signature)).toBe(true);
    }
  });

  it("signs with RSA PKCS#1 v1.5 and PSS (salt 32)", async () => {
    const p1 = await h.client.sign({ keyId: rsaSigner.keyId, message, algorithm: SignatureAlgorithm.RSA_PKCS1_SHA256 });
    expect(verify("sha256", message, { key: rsaSigner.publicKey, padding: constants.RSA_PKCS1_PADDING }, p1.signature)).toBe(true);
    const pss = await h.client.sign({ keyId: rsaSigner.keyId, message, algorithm: SignatureAlgorithm.RSA_PSS_SHA256 });
    expect(verify("sha256", message, { key: rsaSigner.publicKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }, pss.signature)).toBe(true);
  });

  it("logs one line per signature without the message or key", async () => {
    h.lines.length = 0;
    await h.client.sign({ keyId: "acme/signer", message, algorithm: SignatureAlgorithm.ECDSA_SHA256 });
    expect(h.lines).toHaveLength(1);
    expect(h.lines[0]).toMatchObject({ msg: "message signed", tenant: "acme", name: "signer", algorithm: "ECDSA_SHA256", bytes: message.length });
    expect(JSON.stringify(h.lines[0])).not.toContain("the message itself");
  });

  it("refuses a CA key with FAILED_PRECONDITION", async () => {
    const r = await codeOf(h.client.sign({ keyId: acme.keyId, message, algorithm: SignatureAlgorithm.ECDSA_SHA256 }));
    expect(r.code).toBe(Code.FailedPrecondition);
    expect(r.message).toBe(`key ${acme.keyId} is an intermediate CA key; CA keys sign only through IssueLeafCertificate`);
  });

  it.each<[string, () => { keyId: string; message: Uint8Array; algorithm: SignatureAlgorithm }, Code, RegExp]>([
    ["no key id", () => ({ keyId: "", message, algorithm: SignatureAlgorithm.ECDSA_SHA256 }), Code.InvalidArgument, /^key_id: required/],
    ["a malformed key id", () => ({ keyId: "xyz", message, algorithm: SignatureAlgorithm.ECDSA_SHA256 }), Code.InvalidArgument, /^key_id: "xyz" is neither a key id/],
    ["an empty message", () => ({ keyId: ecSigner.keyId, message: new Uint8Array(0), algorithm: SignatureAlgorithm.ECDSA_SHA256 }), Code.InvalidArgument, /^message: required/],
    ["a message over 64 KiB", () => ({ keyId: ecSigner.keyId, message: new Uint8Array(65537), algorithm: SignatureAlgorithm.ECDSA_SHA256 }), Code.InvalidArgument, /^message: 65537 bytes, at most 65536/],
    ["no algorithm", () => ({ keyId: ecSigner.keyId, message, algorithm: SignatureAlgorithm.UNSPECIFIED }), Code.InvalidArgument, /^algorithm: required/],
    ["an RSA algorithm for an EC key", () => ({ keyId: ecSigner.keyId, message, algorithm: SignatureAlgorithm.RSA_PSS_SHA256 }), Code.InvalidArgument, /^algorithm: SIGNATURE_ALGORITHM_RSA_PSS_SHA256 does not fit key/],
    ["ECDSA for an RSA key", () => ({ keyId: rsaSigner.keyId, message, algorithm: SignatureAlgorithm.ECDSA_SHA256 }), Code.InvalidArgument, /^algorithm: SIGNATURE_ALGORITHM_ECDSA_SHA256 does not fit key/],
    ["an unknown key", () => ({ keyId: "f".repeat(64), message, algorithm: SignatureAlgorithm.ECDSA_SHA256 }), Code.NotFound, /^key_id: the agent holds no signing key/],
    ["an unknown name", () => ({ keyId: "acme/nope", message, algorithm: SignatureAlgorithm.ECDSA_SHA256 }), Code.NotFound, /^key_id: the agent holds no signing key "acme\/nope"/],
  ])("refuses %s", async (_name, make, code, re) => {
    const r = await codeOf(h.client.sign(make()));
    expect(r.code).toBe(code);
    expect(r.message).toMatch(re);
  });

  it("a revoked key is FAILED_PRECONDITION naming the reason", async () => {
    h.holder.revoke(ecSigner.keyId, "key compromised");
    const r = await codeOf(h.client.sign({ keyId: ecSigner.keyId, message, algorithm: SignatureAlgorithm.ECDSA_SHA256 }));
    expect(r.code).toBe(Code.FailedPrecondition);
    expect(r.message).toBe(`key_id: key ${ecSigner.keyId} was revoked (key compromised)`);
  });
});

describe("quarantine, revocation and leases", () => {
  it("a quarantined machine refuses to sign and to issue, FAILED_PRECONDITION naming why", async () => {
    h.holder.quarantineMachine("operator: suspected compromise");
    for (const p of [
      h.client.sign({ keyId: ecSigner.keyId, message: Buffer.from("x"), algorithm: SignatureAlgorithm.ECDSA_SHA256 }),
      h.client.issueLeafCertificate(leafRequest()),
    ]) {
      const r = await codeOf(p);
      expect(r.code).toBe(Code.FailedPrecondition);
      expect(r.message).toMatch(/^machine quarantined: operator: suspected compromise; /);
    }
    expect((await h.client.listKeys({})).keys).toHaveLength(0);
    const st = await h.client.getStatus({});
    expect(st.attestation).toBe(AttestationState.QUARANTINED);
  });

  it("a revoked intermediate leaves its tenant FAILED_PRECONDITION until a new version arrives", async () => {
    h.holder.revoke(acme.keyId, "version 1 revoked by tenant-admin");
    const r = await codeOf(h.client.issueLeafCertificate(leafRequest()));
    expect(r.code).toBe(Code.FailedPrecondition);
    expect(r.message).toMatch(/^tenant_id: the intermediate of tenant "acme" was revoked \(version 1 revoked by tenant-admin\)/);
    h.holder.replaceTenant("acme", [intermediateSecret(acme2, DAY, h.clock.now())]);
    const res = await h.client.issueLeafCertificate(leafRequest());
    expect(res.intermediateVersion).toBe(2);
  });

  it("a lease that ran out with the KDC unreachable is UNAVAILABLE with a clear message", async () => {
    h.clock.advance(DAY + 1);
    const r = await codeOf(h.client.sign({ keyId: ecSigner.keyId, message: Buffer.from("x"), algorithm: SignatureAlgorithm.ECDSA_SHA256 }));
    expect(r.code).toBe(Code.Unavailable);
    expect(r.message).toMatch(/lease ran out at .* and the KDC is unreachable \(connect ECONNREFUSED 127\.0\.0\.1:1\); the agent serves it again once it resyncs/);
    const leaf = await codeOf(h.client.issueLeafCertificate(leafRequest()));
    expect(leaf.code).toBe(Code.Unavailable);
    h.holder.expireLeases();
    const keys = (await h.client.listKeys({ tenantId: "acme" })).keys;
    expect(keys.every((k) => k.state === KeyState.LEASE_EXPIRED)).toBe(true);
    // A resync with a fresh lease serves again.
    h.holder.replaceAll([intermediateSecret(acme, DAY, h.clock.now()), signingSecret(ecSigner, DAY, h.clock.now())]);
    expect((await h.client.issueLeafCertificate(leafRequest())).intermediateVersion).toBe(1);
  });
});

describe("ListKeys, GetCertificateChain, GetStatus", () => {
  it("lists public parts only, by tenant then key id, with the intermediate's certificate parsed", async () => {
    const res = await h.client.listKeys({ tenantId: "acme" });
    expect(res.keys.map((k) => k.keyId)).toEqual([acme.keyId, ecSigner.keyId, rsaSigner.keyId].sort());
    const inter = res.keys.find((k) => k.purpose === KeyPurpose.INTERMEDIATE_CA)!;
    expect(inter.version).toBe(1);
    expect(inter.state).toBe(KeyState.ACTIVE);
    expect(inter.certificate?.isCa).toBe(true);
    expect(inter.certificate?.subject).toContain("acme MITM CA v1");
    expect(inter.publicKeyPem).toContain("BEGIN PUBLIC KEY");
    expect(JSON.stringify(res.keys.map((k) => k.publicKeyPem))).not.toContain("PRIVATE");
    expect((await h.client.listKeys({})).keys).toHaveLength(4);
    const bad = await codeOf(h.client.listKeys({ tenantId: "NOPE" }));
    expect(bad.code).toBe(Code.InvalidArgument);
  });

  it("returns the tenant chain", async () => {
    const res = await h.client.getCertificateChain({ tenantId: "acme" });
    expect(res.chainPem).toBe(acme.chainPem);
    expect(res.keyId).toBe(acme.keyId);
    expect((await codeOf(h.client.getCertificateChain({ tenantId: "" }))).code).toBe(Code.InvalidArgument);
    expect((await codeOf(h.client.getCertificateChain({ tenantId: "nope" }))).code).toBe(Code.NotFound);
  });

  it("reports status", async () => {
    const st = await h.client.getStatus({});
    expect(st).toMatchObject({ version: "test", machineId: "m-0123456789abcdef", group: "edge", attestation: AttestationState.ATTESTED, kdcConnected: false });
    expect(st.keys).toHaveLength(4);
  });
});

describe("WatchKeys", () => {
  it("sends a SNAPSHOT first, then ROTATED, ADDED, REVOKED and QUARANTINED as they happen", async () => {
    const abort = new AbortController();
    const got: WatchKeysResponse[] = [];
    const stream = h.client.watchKeys({ tenantId: "acme" }, { signal: abort.signal });
    const reader = (async () => {
      try {
        for await (const ev of stream) got.push(ev);
      } catch {
        // aborted
      }
    })();
    const until = async (n: number) => {
      for (let i = 0; i < 200 && got.length < n; i++) await new Promise((r) => setTimeout(r, 5));
      expect(got.length).toBeGreaterThanOrEqual(n);
    };
    await until(1);
    expect(got[0]!.type).toBe(KeyEventType.SNAPSHOT);
    expect(got[0]!.keys).toHaveLength(3);

    const extra = makeSigningKey("acme", "extra");
    h.holder.replaceTenant("acme", [intermediateSecret(acme2, DAY, h.clock.now()), signingSecret(ecSigner, DAY, h.clock.now()), signingSecret(rsaSigner, DAY, h.clock.now()), signingSecret(extra, DAY, h.clock.now())]);
    await until(3);
    expect(got[1]!.type).toBe(KeyEventType.ROTATED);
    expect(got[1]!.keys[0]!.keyId).toBe(acme2.keyId);
    expect(got[1]!.keys[0]!.version).toBe(2);
    expect(got[2]!.type).toBe(KeyEventType.ADDED);
    // Another tenant's change is filtered out.
    h.holder.revoke(shortLived.keyId, "other tenant");
    h.holder.revoke(extra.keyId, "no longer needed");
    await until(4);
    expect(got[3]).toMatchObject({ type: KeyEventType.REVOKED, tenantId: "acme", reason: "no longer needed" });
    // The dropped key is named as dropped, not in its last (active) state.
    expect(got[3]!.keys.map((k) => [k.keyId, k.state])).toEqual([[extra.keyId, KeyState.DROPPED]]);
    h.holder.quarantineMachine("compromised");
    await until(5);
    expect(got[4]).toMatchObject({ type: KeyEventType.QUARANTINED, reason: "compromised" });
    expect(got[4]!.keys.length).toBeGreaterThan(0);
    expect(got[4]!.keys.every((k) => k.state === KeyState.DROPPED)).toBe(true);
    expect(got).toHaveLength(5);
    abort.abort();
    await reader;
  });
});

describe("the workload header", () => {
  it.each<[string, (h: Harness) => Promise<unknown>]>([
    ["IssueLeafCertificate", (h) => h.bare.issueLeafCertificate(leafRequest())],
    ["Sign", (h) => h.bare.sign({ keyId: ecSigner.keyId, message: Buffer.from("x"), algorithm: SignatureAlgorithm.ECDSA_SHA256 })],
    ["ListKeys", (h) => h.bare.listKeys({})],
    ["GetCertificateChain", (h) => h.bare.getCertificateChain({ tenantId: "acme" })],
    ["GetStatus", (h) => h.bare.getStatus({})],
    ["WatchKeys", async (h) => {
      for await (const _ of h.bare.watchKeys({})) break;
    }],
  ])("%s without it is INVALID_ARGUMENT", async (_name, call) => {
    const r = await codeOf(call(h));
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.message).toBe('metadata: every call needs the header "kmi-agent-workload: true"; add it to the call\'s metadata');
  });

  it("a wrong value is refused too", async () => {
    const r = await codeOf(h.bare.listKeys({}, { headers: { "kmi-agent-workload": "yes" } }));
    expect(r.code).toBe(Code.InvalidArgument);
  });
});
