/**
 * Issue 17: a tenant's intermediate held in the KDC's PKCS#11 token (SoftHSM2), by choice
 * (`kmi ctl ca rotate --key-custody token`). The KDC process (`node dist/cmd/kmi.js kdc`, started
 * with --pkcs11-*) makes the key inside the token, keeps only its label in the store, releases
 * the version to machines without a wrapped key (`kdc_signs`), and signs their leaves through
 * DistributionService.SignLeaf over mutual TLS with an attestation token, refusing a machine
 * that does not serve the tenant, a quarantined one, a stale version, an escrowed version and
 * a leaf the policy forbids. Leaves are judged by `openssl verify` and `openssl x509 -text`.
 * A revoked version's token key is destroyed once no version uses it (renewals share a key).
 */
import { generateKeyPairSync, X509Certificate } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KeyAlgorithm, KeyPurpose } from "../../../src/gen/kmi/common/v1/common_pb.js";
import type { SignLeafRequest } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { KeyCustody, Signer } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { openKdcStore } from "../../../src/kdc/init.js";
import { KdcStore } from "../../../src/kdc/kdc-store.js";
import { certificateToPem } from "../../../src/pki/pem.js";
import { FixtureAudit } from "../../fixtures/kdc/fixture-audit.js";
import { Machine, signToken, type TokenKey } from "../../fixtures/kdc/machines.js";
import { attestationKeyFile, distributionClient, issueMachines, issueService, operator, serverTls } from "../../fixtures/kdc/mesh.js";
import { softHsmToken, type SoftHsmToken } from "../../fixtures/pkcs11/softhsm.js";
import { cleanup, initDataDir, openssl, opensslStatus, startKdc, tempDir, type DataDir, type KdcProcess } from "../kdc/harness.js";

let hsmDir: string;
let hsm: SoftHsmToken;
let data: DataDir;
let caPem: string;
let tokenKey: TokenKey;
let audit: FixtureAudit;
let kdc: KdcProcess;
/** The token-held version of acme. */
let tokenVersion = 0;
let intermediatePem = "";
/** The PRIVATE_CA version made in the token and discarded. */
let discardedVersion = 0;
const A = new Machine("m-a100000000000001");
const B = new Machine("m-b100000000000002");
const Q = new Machine("m-c100000000000003");
const closers: (() => void)[] = [];
/** The flags of the KDC the tests call (token, Auditserver, attestation key). */
let servingFlags: string[] = [];

const tok = (m: Machine, tenants: string[] | "all" = "all") => signToken(tokenKey, { machineId: m.machineId, cert: m.certPem, tenants });
const ops = () => operator(kdc.url, caPem, data.token);
function dist(m: Machine) {
  const c = distributionClient(kdc.url, caPem, m);
  closers.push(c.close);
  return c.client;
}

const leafKey = () => new Uint8Array(generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey.export({ type: "spki", format: "der" }));
function request(m: Machine, over: Partial<SignLeafRequest> = {}): Omit<SignLeafRequest, "$typeName"> {
  const now = Date.now();
  return {
    attestationToken: tok(m),
    tenantId: "acme",
    version: tokenVersion,
    publicKeyDer: leafKey(),
    dnsNames: ["www.example.test"],
    ipAddresses: ["192.0.2.7"],
    commonName: "",
    notBefore: timestampFromMs(now - 60_000),
    notAfter: timestampFromMs(now + 7 * 86_400_000),
    ...over,
  };
}

async function failure(p: Promise<unknown>): Promise<{ code: Code; message: string }> {
  const e = await p.then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(ConnectError);
  return { code: (e as ConnectError).code, message: (e as ConnectError).rawMessage };
}

async function until(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The stored version records of acme (the KDC must be stopped: LevelDB has one opener). */
async function storedVersions() {
  const store = await openKdcStore(data.dataDir, false);
  try {
    return await new KdcStore(store).listVersions("acme");
  } finally {
    await store.close();
  }
}

/** True when the token holds a key labelled `label` (read with the KDC stopped). */
function inToken(label: string): boolean {
  const token = hsm.open();
  try {
    return token.findKey(label) !== undefined;
  } finally {
    token.close();
  }
}

/** Starts the KDC, runs `f`, stops it again. */
async function whileServing(f: () => Promise<unknown>): Promise<void> {
  kdc = await startKdc(data.dataDir, hsm.flags);
  try {
    await f();
  } finally {
    await kdc.stop();
  }
}

beforeAll(async () => {
  hsmDir = await tempDir("kmi-sign-leaf-hsm-");
  hsm = await softHsmToken(hsmDir, "kmi-sign-leaf", "2468-user");
  // The kmi programs started below inherit SOFTHSM2_CONF (the harness drops only KMI_*).
  process.env["SOFTHSM2_CONF"] = hsm.env["SOFTHSM2_CONF"];
  data = await initDataDir(hsm.flags);
  caPem = await readFile(data.caFile, "utf8");
  let keyFile: string;
  ({ key: tokenKey, file: keyFile } = await attestationKeyFile(data));
  kdc = await startKdc(data.dataDir, hsm.flags);
  const auditId = await issueService(kdc.url, caPem, data.token, "audit");
  await issueMachines(kdc.url, caPem, auditId, [A, B, Q]);
  await ops().admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  await ops().admin.createTenant({ tenantId: "beta", bootstrapKmiSigned: true });
  await kdc.stop();
  audit = new FixtureAudit(serverTls(auditId, caPem), tokenKey, { keepaliveMs: 1000 });
  await audit.start();
  servingFlags = [...hsm.flags, "--audit-url", audit.url, "--attestation-key-file", keyFile];
  kdc = await startKdc(data.dataDir, servingFlags);
  await until("the KDC follows the machine status stream", () => audit.watching === 1);
  const made = await ops().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, keyCustody: KeyCustody.TOKEN, activate: true });
  tokenVersion = made.version!.version;
  intermediatePem = made.version!.certificatePem;
}, 90_000);

afterAll(async () => {
  for (const c of closers) c();
  await kdc?.stop("SIGKILL");
  await audit?.stop();
  if (data !== undefined) await cleanup(data.dir, hsmDir);
});

describe("an intermediate held in the KDC's token", () => {
  it("is released with kdc_signs and no wrapped key; an escrowed tenant's still comes wrapped", async () => {
    const res = await dist(A).fetchSecrets({ attestationToken: tok(A) });
    const inter = (t: string) => res.secrets.find((s) => s.tenantId === t && s.purpose === KeyPurpose.INTERMEDIATE_CA)!;
    expect(inter("acme")).toMatchObject({ version: tokenVersion, kdcSigns: true });
    expect(inter("acme").wrappedKey).toBeUndefined();
    expect(inter("beta").kdcSigns).toBe(false);
    expect(inter("beta").wrappedKey?.ciphertext.length).toBeGreaterThan(0);
    const v = (await ops().ca.listVersions({ tenantId: "acme" })).versions.find((x) => x.version === tokenVersion)!;
    expect(v.keyCustody).toBe(KeyCustody.TOKEN);
  });

  it("signs a leaf that passes openssl verify under the KMI root, a server leaf and never a CA", async () => {
    const res = await dist(A).signLeaf(request(A));
    const dir = data.dir;
    await writeFile(join(dir, "leaf.pem"), certificateToPem(res.certificateDer));
    await writeFile(join(dir, "inter.pem"), intermediatePem);
    const out = await openssl(["verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", data.rootFile, "-untrusted", join(dir, "inter.pem"), join(dir, "leaf.pem")]);
    expect(out.trim()).toBe(`${join(dir, "leaf.pem")}: OK`);
    const text = await openssl(["x509", "-noout", "-text", "-in", join(dir, "leaf.pem")]);
    expect(text).toMatch(/CA:FALSE/);
    expect(text).toMatch(/TLS Web Server Authentication/);
    expect(text).toMatch(/DNS:www\.example\.test, IP Address:192\.0\.2\.7/);
    const leaf = new X509Certificate(res.certificateDer);
    expect(leaf.serialNumber.toLowerCase().replace(/^0+/, "")).toBe(res.serialHex.replace(/^0+/, ""));
    expect(kdc.stderr()).toMatch(/leaf signed with a token-held intermediate.*m-a100000000000001/);
  });

  it("judges the validity on its own clock, clamps a leaf to the intermediate's end, and refuses what the policy forbids with INVALID_ARGUMENT", async () => {
    const now = Date.now();
    const long = await failure(dist(A).signLeaf(request(A, { notAfter: timestampFromMs(now + 48 * 86_400_000) })));
    expect(long).toMatchObject({ code: Code.InvalidArgument, message: expect.stringMatching(/^not_after: .*at most 47 days/) });
    // A leaf made now to start later (after a quarantine, say), or dated far back.
    const later = await failure(dist(A).signLeaf(request(A, { notBefore: timestampFromMs(now + 86_400_000), notAfter: timestampFromMs(now + 2 * 86_400_000) })));
    expect(later).toMatchObject({ code: Code.InvalidArgument, message: expect.stringMatching(/^not_before: .*not about now/) });
    const old = await failure(dist(A).signLeaf(request(A, { notBefore: timestampFromMs(now - 3 * 86_400_000) })));
    expect(old).toMatchObject({ code: Code.InvalidArgument, message: expect.stringMatching(/^not_before/) });
    const noNames = await failure(dist(A).signLeaf(request(A, { dnsNames: [], ipAddresses: [] })));
    expect(noNames.code).toBe(Code.InvalidArgument);
    expect(noNames.message).toMatch(/dns_names/);
    const caKey = new Uint8Array(new X509Certificate(intermediatePem).publicKey.export({ type: "spki", format: "der" }));
    const ownKey = await failure(dist(A).signLeaf(request(A, { publicKeyDer: caKey })));
    expect(ownKey).toMatchObject({ code: Code.InvalidArgument, message: expect.stringMatching(/public_key/) });
    const garbage = await failure(dist(A).signLeaf(request(A, { publicKeyDer: new Uint8Array([0x30, 0x03, 0x02, 0x01, 0x01]) })));
    expect(garbage.code).toBe(Code.InvalidArgument);
    const backwards = await failure(dist(A).signLeaf(request(A, { notAfter: timestampFromMs(Date.now() - 3_600_000) })));
    expect(backwards).toMatchObject({ code: Code.InvalidArgument, message: expect.stringMatching(/^not_after/) });
    // Within 47 days but past a short-lived intermediate's end: clamped, not refused.
    const short = (await ops().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, keyCustody: KeyCustody.TOKEN, validityDays: 10, activate: true })).version!;
    try {
      const shortEnd = Date.parse(new X509Certificate(short.certificatePem).validTo);
      const clamped = await dist(A).signLeaf(request(A, { version: short.version, notAfter: timestampFromMs(now + 40 * 86_400_000) }));
      expect(Date.parse(new X509Certificate(clamped.certificateDer).validTo)).toBe(shortEnd);
    } finally {
      await ops().ca.activateVersion({ tenantId: "acme", version: tokenVersion });
    }
  });

  it("refuses a machine that does not serve the tenant (PERMISSION_DENIED), a quarantined one, and a missing token (UNAUTHENTICATED)", async () => {
    const other = await failure(dist(B).signLeaf(request(B, { attestationToken: tok(B, ["beta"]) })));
    expect(other).toMatchObject({ code: Code.PermissionDenied, message: expect.stringMatching(/does not serve tenant "acme"/) });
    expect((await dist(Q).signLeaf(request(Q))).certificateDer.length).toBeGreaterThan(0);
    audit.quarantine(Q.machineId, "stolen disk");
    // The KDC hears of it on its machine-status stream: poll (bounded) until it refuses.
    let q: { code: Code; message: string } | undefined;
    for (let i = 0; i < 100 && q?.code !== Code.PermissionDenied; i++) {
      q = await dist(Q).signLeaf(request(Q)).then(() => undefined, (e: ConnectError) => ({ code: e.code, message: e.rawMessage }));
      if (q?.code !== Code.PermissionDenied) await new Promise((r) => setTimeout(r, 100));
    }
    expect(q).toMatchObject({ code: Code.PermissionDenied, message: expect.stringMatching(/quarantined/) });
    const none = await failure(dist(A).signLeaf(request(A, { attestationToken: "" })));
    expect(none.code).toBe(Code.Unauthenticated);
  });

  it("refuses a version that is not active (a ready one) and an escrowed one with FAILED_PRECONDITION; signs with the version just replaced", async () => {
    const ready = (await ops().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, keyCustody: KeyCustody.TOKEN })).version!;
    const notActive = await failure(dist(A).signLeaf(request(A, { version: ready.version })));
    expect(notActive).toMatchObject({ code: Code.FailedPrecondition, message: expect.stringMatching(/not the active version of tenant "acme"/) });
    const missing = await failure(dist(A).signLeaf(request(A, { version: 999 })));
    expect(missing.code).toBe(Code.NotFound);
    // Version 1 (escrowed, retired when the token version was activated): its agents sign themselves.
    const escrowed = await failure(dist(A).signLeaf(request(A, { version: 1 })));
    expect(escrowed).toMatchObject({ code: Code.FailedPrecondition, message: expect.stringMatching(/escrowed/) });
    // An agent that has not heard of an activation yet: the version it holds was retired a moment ago.
    await ops().ca.activateVersion({ tenantId: "acme", version: ready.version });
    const replaced = await dist(A).signLeaf(request(A));
    expect(new X509Certificate(replaced.certificateDer).checkIssued(new X509Certificate(intermediatePem))).toBe(true);
    await ops().ca.activateVersion({ tenantId: "acme", version: tokenVersion });
  });

  it("a new version follows the active version's custody; RSA in the token is INVALID_ARGUMENT; a CSR is signed by the token key", async () => {
    const csr = await ops().ca.createVersion({ tenantId: "acme", signer: Signer.PRIVATE_CA });
    expect(csr.version!.keyCustody).toBe(KeyCustody.TOKEN);
    await writeFile(join(data.dir, "token.csr"), csr.csrPem);
    const verified = await opensslStatus(["req", "-in", join(data.dir, "token.csr"), "-noout", "-verify"]);
    expect(verified.out).toMatch(/verify OK|Certificate request self-signature verify OK/);
    discardedVersion = csr.version!.version;
    await ops().ca.discardPendingVersion({ tenantId: "acme", version: discardedVersion, reason: "test" });
    const rsa = await failure(ops().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, keyAlgorithm: KeyAlgorithm.RSA_2048, keyCustody: KeyCustody.TOKEN }));
    expect(rsa).toMatchObject({ code: Code.InvalidArgument, message: expect.stringMatching(/^key_algorithm: a key held in the token/) });
    const escrow = await ops().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, keyCustody: KeyCustody.ESCROW });
    expect(escrow.version!.keyCustody).toBe(KeyCustody.ESCROW);
  });

  it("holds each machine to --sign-leaf-rate and --sign-leaf-burst: past the burst, RESOURCE_EXHAUSTED naming the rate", async () => {
    await kdc.stop();
    kdc = await startKdc(data.dataDir, [...servingFlags, "--sign-leaf-rate", "1", "--sign-leaf-burst", "3"]);
    try {
      await until("the KDC follows the machine status stream", () => audit.watching === 1);
      // Eight at once: the burst (3) passes, plus one a second for however long the calls took.
      const started = Date.now();
      const client = dist(A);
      const outcomes = await Promise.allSettled(Array.from({ length: 8 }, () => client.signLeaf(request(A))));
      const seconds = (Date.now() - started) / 1000;
      const signed = outcomes.filter((o) => o.status === "fulfilled").length;
      expect(signed).toBeGreaterThanOrEqual(3);
      expect(signed).toBeLessThanOrEqual(3 + Math.ceil(seconds));
      const refusals = outcomes.flatMap((o) => (o.status === "rejected" ? [ConnectError.from(o.reason)] : []));
      expect(refusals.length).toBe(8 - signed);
      for (const r of refusals) {
        expect(r.code).toBe(Code.ResourceExhausted);
        expect(r.rawMessage).toMatch(/m-a100000000000001 asked for more than 1 leaves a second; retry shortly/);
      }
    } finally {
      await kdc.stop();
      kdc = await startKdc(data.dataDir, servingFlags);
    }
    await until("the KDC follows the machine status stream", () => audit.watching === 1);
  }, 60_000);

  it("keeps at most 8 token keys per tenant for versions not activated yet: the next is RESOURCE_EXHAUSTED until a discard makes room", async () => {
    const made: number[] = [];
    for (let i = 0; i < 8; i++) made.push((await ops().ca.createVersion({ tenantId: "beta", signer: Signer.PRIVATE_CA, keyCustody: KeyCustody.TOKEN })).version!.version);
    const refused = await failure(ops().ca.createVersion({ tenantId: "beta", signer: Signer.PRIVATE_CA, keyCustody: KeyCustody.TOKEN }));
    expect(refused).toMatchObject({ code: Code.ResourceExhausted, message: expect.stringMatching(/^tenant beta has 8 keys in the KDC's token for versions not activated yet/) });
    // An escrowed key takes no room in the token.
    const escrowed = (await ops().ca.createVersion({ tenantId: "beta", signer: Signer.PRIVATE_CA, keyCustody: KeyCustody.ESCROW })).version!;
    expect(escrowed.keyCustody).toBe(KeyCustody.ESCROW);
    await ops().ca.discardPendingVersion({ tenantId: "beta", version: made[0]!, reason: "room" });
    const next = (await ops().ca.createVersion({ tenantId: "beta", signer: Signer.PRIVATE_CA, keyCustody: KeyCustody.TOKEN })).version!;
    expect(next.keyCustody).toBe(KeyCustody.TOKEN);
    for (const v of [...made.slice(1), escrowed.version, next.version]) await ops().ca.discardPendingVersion({ tenantId: "beta", version: v, reason: "clean-up" });
  });

  it("keeps only the label in the store; the token holds the key sensitive and never extractable, and destroys it once no version uses it", async () => {
    const renewed = (await ops().ca.renewVersion({ tenantId: "acme", version: tokenVersion, signer: Signer.KMI_ROOT })).version!;
    expect(renewed.keyCustody).toBe(KeyCustody.TOKEN);
    await kdc.stop();
    const records = await storedVersions();
    const held = records.find((r) => r.version === tokenVersion)!;
    expect(held.privateKey).toBeUndefined();
    expect(held.tokenKeyLabel).toMatch(new RegExp(`^kmi/tenant/acme/v${tokenVersion}-[0-9a-f]{8}$`));
    expect(records.find((r) => r.version === renewed.version)!.tokenKeyLabel).toBe(held.tokenKeyLabel);
    const label = held.tokenKeyLabel;
    const discarded = records.find((r) => r.version === discardedVersion)!;
    expect(discarded.tokenKeyLabel).toMatch(/^kmi\/tenant\/acme\//);
    expect(inToken(discarded.tokenKeyLabel)).toBe(false);
    const token = hsm.open();
    try {
      expect(token.protection(label)).toEqual({ sensitive: true, extractable: false, alwaysSensitive: true, neverExtractable: true });
      expect(token.tryReadPrivateValue(label)).toMatch(/CKR_ATTRIBUTE_SENSITIVE/);
    } finally {
      token.close();
    }
    // Revoking the first version leaves the key: its renewal still uses it. Revoking the renewal destroys it.
    await whileServing(() => ops().ca.revokeVersion({ tenantId: "acme", version: tokenVersion, reason: "renewed", allowActive: true }));
    expect(inToken(label)).toBe(true);
    await whileServing(() => ops().ca.revokeVersion({ tenantId: "acme", version: renewed.version, reason: "done" }));
    expect(inToken(label)).toBe(false);
    kdc = await startKdc(data.dataDir, hsm.flags);
    // Each destruction was audited before it was done: the discarded CSR version's and this one
    // (beta's, from the test of the room in the token, are beta's).
    const destroyed = (await ops().admin.tailAuditLog({ limit: 100, last: true })).entries.filter((e) => e.action === "ca.version.key_destroy" && e.target.startsWith("tenant/acme/"));
    expect(destroyed.map((e) => e.details["token_key_label"]).sort()).toEqual([discarded.tokenKeyLabel, label].sort());
    expect(destroyed.find((e) => e.details["token_key_label"] === label)!.target).toBe(`tenant/acme/version/${renewed.version}`);
  }, 60_000);
});
