/**
 * The Certificate menu through a real KDC over TLS: each step through a gRPC client and
 * through `kmi ctl`, certificates judged by openssl, upload refusals that change nothing,
 * and the authorization matrix of every RPC.
 */
import { createHash, X509Certificate } from "node:crypto";
import { readFile, stat, writeFile } from "node:fs/promises";
import { connect as tlsConnect } from "node:tls";
import { join } from "node:path";
import { toBinary, toJson } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KeyAlgorithm } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { KdcAdminService, Role, TailAuditLogResponseSchema } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { DistributionService } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { CertificateFormat, KdcService, ListVersionsResponseSchema, Signer, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { PeerService } from "../../../src/gen/kmi/kdc/v1/peer_pb.js";
import { generateKeyPair } from "../../../src/pki/keys.js";
import { createRootCa, issueIntermediateCa } from "../../../src/pki/issue.js";
import { parseCsr } from "../../../src/pki/csr.js";
import { cleanup, clients, ctl, initDataDir, makePrivateCa, openssl, opensslStatus, startKdc, type DataDir, type KdcProcess, type PrivateCa } from "./harness.js";

/** The secret part of "kmi_<16 hex id>_<43 base64url chars>"; the secret may itself contain "_". */
function tokenSecret(token: string): string {
  const secret = token.slice("kmi_".length + 16 + 1);
  expect(secret).toHaveLength(43);
  return secret;
}

let data: DataDir;
let kdc: KdcProcess;
let caPem: string;
let op: ReturnType<typeof clients>;
let acmeToken: string;
let acmeTokenFile: string;
let priv: PrivateCa;
let work: string;

async function refused(p: Promise<unknown>, code: Code, message?: string): Promise<ConnectError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, "the call should have been refused").toBeInstanceOf(ConnectError);
  const ce = err as ConnectError;
  expect(Code[ce.code]).toBe(Code[code]);
  if (message !== undefined) expect(ce.rawMessage).toContain(message);
  return ce;
}

async function history(tenantId: string): Promise<Uint8Array> {
  return toBinary(ListVersionsResponseSchema, await op(KdcService).listVersions({ tenantId }));
}

async function file(name: string, content: string | Uint8Array): Promise<string> {
  const p = join(work, name);
  await writeFile(p, content);
  return p;
}

beforeAll(async () => {
  data = await initDataDir(["--dns-name", "kdc.test.example"]);
  work = data.dir;
  kdc = await startKdc(data.dataDir);
  caPem = await readFile(data.caFile, "utf8");
  op = clients(kdc.url, caPem, { token: data.token });
  await op(KdcAdminService).createTenant({ tenantId: "acme", displayName: "ACME Corp", bootstrapKmiSigned: true });
  await op(KdcAdminService).createTenant({ tenantId: "globex", bootstrapKmiSigned: true });
  acmeToken = (await op(KdcAdminService).createToken({ role: Role.TENANT_ADMIN, tenantId: "acme", description: "acme admin" })).secret;
  acmeTokenFile = await file("acme.token", acmeToken);
  priv = await makePrivateCa(work, "privroot");
});

afterAll(async () => {
  await kdc?.stop();
  await cleanup(data?.dir);
});

describe("kmi kdc init and serve", () => {
  it("made a 0700 data dir, a 0600 master key and token file, and a TLS certificate from the infrastructure CA", async () => {
    expect((await stat(data.dataDir)).mode & 0o777).toBe(0o700);
    expect((await stat(join(data.dataDir, "master.key"))).mode & 0o777).toBe(0o600);
    expect((await stat(data.tokenFile)).mode & 0o777).toBe(0o600);
    expect(data.token).toMatch(/^kmi_[0-9a-f]{16}_/);
    // The KDC's own server certificate, fetched over the wire, verifies against infra-ca.pem.
    const leafDer = await new Promise<Buffer>((res, rej) => {
      const [host, port] = [kdc.address.slice(0, kdc.address.lastIndexOf(":")), Number(kdc.address.slice(kdc.address.lastIndexOf(":") + 1))];
      const sock = tlsConnect({ host, port, servername: "localhost", ca: caPem, ALPNProtocols: ["h2"] }, () => {
        res(sock.getPeerCertificate().raw);
        sock.end();
      });
      sock.once("error", rej);
    });
    const leafFile = await file("kdc-tls.der", leafDer);
    expect(await openssl(["verify", "-CAfile", data.caFile, "-purpose", "sslserver", await file("kdc-tls.pem", await openssl(["x509", "-inform", "DER", "-in", leafFile]))])).toContain("OK");
    const text = await openssl(["x509", "-inform", "DER", "-in", leafFile, "-noout", "-ext", "subjectAltName"]);
    for (const n of ["DNS:localhost", "DNS:kdc.test.example", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1", "URI:kmi://service/kdc"]) expect(text).toContain(n);
    // The two roots are separate keys.
    const a = await openssl(["x509", "-in", data.rootFile, "-noout", "-pubkey"]);
    const b = await openssl(["x509", "-in", data.caFile, "-noout", "-pubkey"]);
    expect(a).not.toBe(b);
  });

  it("refuses to init the same data dir twice", async () => {
    const { execFile } = await import("node:child_process");
    const r = await new Promise<{ code: number; err: string }>((res) =>
      execFile(process.execPath, [join(import.meta.dirname, "../../../dist/cmd/kmi.js"), "kdc", "init", "--data-dir", data.dataDir], (e, _o, err) => res({ code: (e as { code?: number } | null)?.code ?? 0, err })),
    );
    expect(r.code).not.toBe(0);
    expect(r.err).toContain("initialized already");
  });

  it("--help documents the flags; kmi ctl --help documents the exit codes", async () => {
    const { execFile } = await import("node:child_process");
    const out = (args: string[]) =>
      new Promise<string>((res) => execFile(process.execPath, [join(import.meta.dirname, "../../../dist/cmd/kmi.js"), ...args], (_e, o) => res(o)));
    const kdcHelp = await out(["kdc", "--help"]);
    for (const f of ["--data-dir", "--listen", "--master-key-file", "KMI_KDC_LISTEN", "kmi kdc init"]) expect(kdcHelp).toContain(f);
    expect(await out(["kdc", "init", "--help"])).toContain("--token-file");
    const ctlHelp = await out(["ctl", "--help"]);
    for (const s of ["exit codes:", "2  usage", "3  not found", "4  unauthenticated", "5  invalid argument", "ca upload", "audit verify"]) expect(ctlHelp).toContain(s);
  });
});

describe("Certificate menu through the gRPC client", () => {
  it("KMI-signed rotation is ready at once, does not disturb the active version, and verifies with openssl", async () => {
    const ca = op(KdcService);
    const before = (await op(KdcAdminService).getTenant({ tenantId: "acme" })).tenant!.activeVersion;
    const created = await ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, subject: { organization: "ACME" }, validityDays: 30 });
    const v = created.version!;
    expect(v.state).toBe(VersionState.READY);
    expect(created.csrPem).toBe("");
    expect((await op(KdcAdminService).getTenant({ tenantId: "acme" })).tenant!.activeVersion).toBe(before);

    const dl = await ca.getCaCertificates({ tenantId: "acme", version: v.version, format: CertificateFormat.PEM });
    const interFile = await file("kmi-inter.pem", dl.intermediate);
    const rootFile = await file("kmi-root-dl.pem", dl.root);
    expect(Buffer.from(dl.root).toString()).toBe(await readFile(data.rootFile, "utf8"));
    expect(await openssl(["verify", "-CAfile", rootFile, interFile])).toContain(": OK");
    const text = await openssl(["x509", "-in", interFile, "-noout", "-text"]);
    expect(text).toMatch(/CA:TRUE, pathlen:0/);
    expect(text).toMatch(/Certificate Sign, CRL Sign/);
    expect(text).toContain("Subject Key Identifier");
    expect(text).toContain("Authority Key Identifier");
    expect(text).toContain("CN = ACME Corp MITM CA " + v.version);
    const fp = await openssl(["x509", "-in", interFile, "-noout", "-fingerprint", "-sha256"]);
    expect(fp).toContain(dl.intermediateSha256);
    expect(dl.intermediateSha256).toBe(v.certificate!.sha256Fingerprint);
    expect(Buffer.from(dl.chain).toString()).toBe(Buffer.from(dl.intermediate).toString() + Buffer.from(dl.root).toString());

    const der = await ca.getCaCertificates({ tenantId: "acme", version: v.version, format: CertificateFormat.DER });
    const derFile = await file("kmi-inter.der", der.intermediate);
    expect(await openssl(["x509", "-inform", "DER", "-in", derFile, "-noout", "-fingerprint", "-sha256"])).toContain(der.intermediateSha256);
    expect(der.chain).toEqual(der.intermediate);

    const act = await ca.activateVersion({ tenantId: "acme", version: v.version });
    expect(act.version!.state).toBe(VersionState.ACTIVE);
    expect(act.retired!.version).toBe(before);
    expect(act.retired!.state).toBe(VersionState.RETIRED);
  });

  it("KMI-signed RSA-3072 intermediate: a 3072-bit key in a CA:TRUE pathlen:0 certificate that openssl verifies against the KMI root", async () => {
    const ca = op(KdcService);
    await op(KdcAdminService).createTenant({ tenantId: "rsa3k", displayName: "RSA Three K" });
    const created = await ca.createVersion({ tenantId: "rsa3k", signer: Signer.KMI_ROOT, keyAlgorithm: KeyAlgorithm.RSA_3072, subject: { organization: "RSA3K" }, validityDays: 30, activate: true });
    const v = created.version!;
    expect(v.keyAlgorithm).toBe(KeyAlgorithm.RSA_3072);
    expect(v.state).toBe(VersionState.ACTIVE);
    expect(created.csrPem).toBe("");

    const dl = await ca.getCaCertificates({ tenantId: "rsa3k", version: v.version, format: CertificateFormat.PEM });
    expect(dl.version!.keyAlgorithm).toBe(KeyAlgorithm.RSA_3072);
    const interFile = await file("rsa3k-inter.pem", dl.intermediate);
    const text = await openssl(["x509", "-in", interFile, "-noout", "-text"]);
    expect(text).toContain("Public Key Algorithm: rsaEncryption");
    expect(text).toContain("Public-Key: (3072 bit)");
    expect(text).toMatch(/CA:TRUE, pathlen:0/);
    expect(text).toMatch(/Certificate Sign, CRL Sign/);
    expect(text).toContain("CN = RSA Three K MITM CA " + v.version);
    // The key id is the SHA-256 of this certificate's SPKI, as for every other algorithm.
    const spki = new X509Certificate(Buffer.from(dl.intermediate)).publicKey.export({ format: "der", type: "spki" });
    expect(createHash("sha256").update(spki).digest("hex")).toBe(v.keyId);
    expect(await openssl(["verify", "-CAfile", data.rootFile, interFile])).toContain(": OK");
    // An unknown algorithm value is refused, naming the three that exist.
    await refused(ca.createVersion({ tenantId: "rsa3k", signer: Signer.KMI_ROOT, keyAlgorithm: 99 as KeyAlgorithm }), Code.InvalidArgument, "use ECDSA_P256, RSA_2048 or RSA_3072");
  });

  it("CSR (RSA-2048, key made in the KDC) passes openssl req -verify; the private-CA intermediate uploads, activates and verifies", async () => {
    const ca = op(KdcService);
    const created = await ca.createVersion({ tenantId: "acme", signer: Signer.PRIVATE_CA, keyAlgorithm: KeyAlgorithm.RSA_2048, subject: { organization: "ACME", country: "US" } });
    expect(created.version!.state).toBe(VersionState.PENDING);
    expect(created.version!.keyAlgorithm).toBe(KeyAlgorithm.RSA_2048);
    const csrFile = await file("rsa.csr", created.csrPem);
    expect(await openssl(["req", "-in", csrFile, "-noout", "-verify"])).toMatch(/verify OK/i);
    expect(await openssl(["req", "-in", csrFile, "-noout", "-subject"])).toMatch(/C\s*=\s*US, O\s*=\s*ACME, CN\s*=\s*ACME Corp MITM CA/);
    expect((await ca.getVersionCsr({ tenantId: "acme", version: created.version!.version })).csrPem).toBe(created.csrPem);
    // Making a CSR does not disturb the active version.
    const active = (await op(KdcAdminService).getTenant({ tenantId: "acme" })).tenant!.activeVersion;
    expect(active).not.toBe(created.version!.version);

    const signed = await priv.sign(created.csrPem);
    const up = await ca.uploadIntermediate({ tenantId: "acme", version: created.version!.version, certificate: Buffer.from(signed), customerRoot: Buffer.from(priv.rootPem), activate: true });
    expect(up.version!.state).toBe(VersionState.ACTIVE);
    expect(up.version!.customerRootSha256).toMatch(/^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
    const dl = await ca.getCaCertificates({ tenantId: "acme", version: 0 });
    expect(dl.version!.version).toBe(created.version!.version);
    const chainFile = await file("priv-chain.pem", dl.chain);
    const interFile = await file("priv-inter.pem", dl.intermediate);
    expect(await openssl(["verify", "-CAfile", priv.rootFile, "-untrusted", chainFile, interFile])).toContain(": OK");
    const hist = (await ca.listVersions({ tenantId: "acme" })).versions;
    expect(hist[0]!.version).toBe(created.version!.version);
    expect(hist.find((v) => v.version === active)!.state).toBe(VersionState.RETIRED);
    expect(hist.filter((v) => v.state === VersionState.ACTIVE)).toHaveLength(1);
  });

  it("renew reuses the key: a KMI-signed renewal and a CSR renewal share the key id", async () => {
    const ca = op(KdcService);
    const src = (await ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT })).version!;
    const kmi = (await ca.renewVersion({ tenantId: "acme", version: src.version, signer: Signer.KMI_ROOT, validityDays: 10 })).version!;
    expect(kmi.keyId).toBe(src.keyId);
    expect(kmi.renewedFrom).toBe(src.version);
    expect(kmi.state).toBe(VersionState.READY);
    expect(kmi.certificate!.sha256Fingerprint).not.toBe(src.certificate!.sha256Fingerprint);
    const csr = await ca.renewVersion({ tenantId: "acme", version: src.version, signer: Signer.PRIVATE_CA });
    expect(csr.version!.state).toBe(VersionState.PENDING);
    expect(csr.version!.keyId).toBe(src.keyId);
    const csrFile = await file("renew.csr", csr.csrPem);
    expect(await openssl(["req", "-in", csrFile, "-noout", "-verify"])).toMatch(/verify OK/i);
    const certPub = await openssl(["x509", "-in", await file("renew-src.pem", src.certificatePem), "-noout", "-pubkey"]);
    const csrPub = await openssl(["req", "-in", csrFile, "-noout", "-pubkey"]);
    expect(csrPub).toBe(certPub);
    await refused(ca.renewVersion({ tenantId: "acme", version: csr.version!.version, signer: Signer.KMI_ROOT }), Code.FailedPrecondition, "pending");
  });

  it("revoke, activate and CSR refusals say what to do", async () => {
    const ca = op(KdcService);
    const v = (await ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT })).version!;
    const r = await ca.revokeVersion({ tenantId: "acme", version: v.version, reason: "test" });
    expect(r.version!.state).toBe(VersionState.REVOKED);
    expect(r.version!.revokeReason).toBe("test");
    await refused(ca.revokeVersion({ tenantId: "acme", version: v.version, reason: "again" }), Code.FailedPrecondition, "already revoked");
    await refused(ca.activateVersion({ tenantId: "acme", version: v.version }), Code.FailedPrecondition, "revoked");
    const active = (await op(KdcAdminService).getTenant({ tenantId: "acme" })).tenant!.activeVersion;
    await refused(ca.revokeVersion({ tenantId: "acme", version: active, reason: "x" }), Code.FailedPrecondition, "allow_active");
    await refused(ca.getVersionCsr({ tenantId: "acme", version: active }), Code.FailedPrecondition, "not pending");
    await refused(ca.activateVersion({ tenantId: "acme", version: 9999 }), Code.NotFound, "no version 9999");
    await refused(ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, validityDays: 5000 }), Code.InvalidArgument, "validity_days");
    await refused(ca.createVersion({ tenantId: "nope", signer: Signer.KMI_ROOT }), Code.NotFound, 'tenant "nope" not found');
  });

  it("two concurrent activations cannot both win", async () => {
    const ca = op(KdcService);
    const a = (await ca.createVersion({ tenantId: "globex", signer: Signer.KMI_ROOT })).version!;
    const b = (await ca.createVersion({ tenantId: "globex", signer: Signer.KMI_ROOT })).version!;
    const res = await Promise.allSettled([ca.activateVersion({ tenantId: "globex", version: a.version }), ca.activateVersion({ tenantId: "globex", version: b.version })]);
    expect(res.every((r) => r.status === "fulfilled")).toBe(true);
    const hist = (await ca.listVersions({ tenantId: "globex" })).versions;
    const active = hist.filter((v) => v.state === VersionState.ACTIVE);
    expect(active).toHaveLength(1);
    expect((await op(KdcAdminService).getTenant({ tenantId: "globex" })).tenant!.activeVersion).toBe(active[0]!.version);
  });

  it("rollout status is empty until agents report; signing keys are made and revoked", async () => {
    const ca = op(KdcService);
    const s = await ca.getRolloutStatus({ tenantId: "globex" });
    expect(s.machines).toHaveLength(0);
    expect(s.activeVersion).toBe((await op(KdcAdminService).getTenant({ tenantId: "globex" })).tenant!.activeVersion);
    const k = (await ca.createSigningKey({ tenantId: "globex", name: "webhook" })).key!;
    expect(k.publicKeyPem).toContain("BEGIN PUBLIC KEY");
    await refused(ca.createSigningKey({ tenantId: "globex", name: "webhook" }), Code.AlreadyExists);
    expect((await ca.listSigningKeys({ tenantId: "globex" })).keys.map((x) => x.name)).toEqual(["webhook"]);
    expect((await ca.revokeSigningKey({ tenantId: "globex", name: "webhook", reason: "rotated" })).key!.revoked).toBe(true);
  });

  it("DistributionService refuses a bearer token without a machine certificate (the full suite is test/integration/distribution)", async () => {
    await refused(op(DistributionService).fetchSecrets({ attestationToken: "x" }), Code.Unauthenticated, "client certificate required");
  });
});

describe("upload refusals change nothing", () => {
  let pendingVersion: number;
  let pendingCsr: string;
  let good: string;
  const cases: [string, () => Promise<{ cert: Uint8Array; root?: Uint8Array }>, Code, string][] = [
    ["a non-CA certificate", async () => ({ cert: Buffer.from(await priv.sign(pendingCsr, { ca: false })) }), Code.InvalidArgument, "not a CA"],
    [
      "a certificate for another key",
      async () => {
        const other = await op(KdcService).createVersion({ tenantId: "upl", signer: Signer.PRIVATE_CA });
        return { cert: Buffer.from(await priv.sign(other.csrPem)) };
      },
      Code.InvalidArgument,
      "not the pending CSR's key",
    ],
    [
      "an expired one",
      async () => {
        // Issued two years ago for one day, for this version's own key, by a throw-away root.
        const rootKey = await generateKeyPair("ecdsa-p256");
        const past = new Date(Date.now() - 2 * 365 * 86400_000);
        const rootDer = createRootCa({ subject: { commonName: "Old Root" }, privateKey: rootKey.privateKey, now: past, validitySeconds: 30 * 86400 });
        const der = issueIntermediateCa({
          issuer: { certificateDer: rootDer, privateKey: rootKey.privateKey },
          subject: { commonName: "expired" },
          publicKeySpkiDer: parseCsr(pendingCsr).spkiDer,
          now: past,
          validitySeconds: 86400,
        });
        return { cert: der };
      },
      Code.FailedPrecondition,
      "expired at",
    ],
    ["garbage bytes", async () => ({ cert: new Uint8Array(Array.from({ length: 300 }, (_, i) => (i * 37 + 11) & 0xff)) }), Code.InvalidArgument, "neither PEM nor DER"],
    ["a truncated PEM", async () => ({ cert: Buffer.from(good.slice(0, Math.floor(good.length / 2))) }), Code.InvalidArgument, "certificate:"],
    ["a bundle where one certificate is expected", async () => ({ cert: Buffer.from(good + priv.rootPem) }), Code.InvalidArgument, "holds 2 certificates"],
    [
      "one that does not chain to the given root",
      async () => {
        const other = await makePrivateCa(work, "otherroot");
        return { cert: Buffer.from(good), root: Buffer.from(other.rootPem) };
      },
      Code.InvalidArgument,
      "does not chain to customer_root",
    ],
    ["an empty upload", async () => ({ cert: new Uint8Array() }), Code.InvalidArgument, "certificate: required"],
  ];

  beforeAll(async () => {
    await op(KdcAdminService).createTenant({ tenantId: "upl", bootstrapKmiSigned: true });
    const c = await op(KdcService).createVersion({ tenantId: "upl", signer: Signer.PRIVATE_CA });
    pendingVersion = c.version!.version;
    pendingCsr = c.csrPem;
    good = await priv.sign(pendingCsr);
  });

  it.each(cases)("refuses %s with a clear error and no change", async (_name, input, code, message) => {
    const { cert, root } = await input();
    const before = await history("upl");
    const tenantBefore = (await op(KdcAdminService).getTenant({ tenantId: "upl" })).tenant;
    const err = await refused(
      op(KdcService).uploadIntermediate({ tenantId: "upl", version: pendingVersion, certificate: cert, customerRoot: root ?? new Uint8Array(), activate: true }),
      code,
      message,
    );
    expect(err.rawMessage.length).toBeLessThan(300);
    expect(await history("upl")).toEqual(before);
    expect((await op(KdcAdminService).getTenant({ tenantId: "upl" })).tenant).toEqual(tenantBefore);
    const tail = await op(KdcAdminService).tailAuditLog({ last: true, limit: 1 });
    expect(tail.entries[0]).toMatchObject({ action: "ca.version.upload", outcome: `refused: ${Code[code] === "InvalidArgument" ? "invalid_argument" : "failed_precondition"}` });
  });

  it("through kmi ctl a refused upload exits 5 with the reason, and the good one then succeeds", async () => {
    const wrong = await file("upl-bundle.pem", good + priv.rootPem);
    const before = await history("upl");
    const r = await ctl(kdc, data, ["ca", "upload", "--tenant", "upl", "--version", String(pendingVersion), "--cert", wrong]);
    expect(r.code).toBe(5);
    expect(r.stderr).toContain("holds 2 certificates");
    expect(await history("upl")).toEqual(before);
    const ok = await ctl(kdc, data, ["ca", "upload", "--tenant", "upl", "--version", String(pendingVersion), "--cert", await file("upl-good.pem", good), "--root", priv.rootFile, "--json"]);
    expect(ok.code).toBe(0);
    expect(JSON.parse(ok.stdout).version.state).toBe("VERSION_STATE_READY");
  });
});

describe("Certificate menu through kmi ctl", () => {
  it("rotate --activate, download the chain and the root, openssl verify; DER download", async () => {
    const rot = await ctl(kdc, data, ["ca", "rotate", "--tenant", "globex", "--activate", "--json"]);
    expect(rot.code).toBe(0);
    const v = JSON.parse(rot.stdout).version;
    expect(v.state).toBe("VERSION_STATE_ACTIVE");
    const chain = join(work, "ctl-chain.pem");
    const root = join(work, "ctl-root.pem");
    expect((await ctl(kdc, data, ["ca", "download", "--tenant", "globex", "--out", chain])).code).toBe(0);
    expect((await ctl(kdc, data, ["ca", "download", "--tenant", "globex", "--part", "root", "--out", root])).code).toBe(0);
    expect(await openssl(["verify", "-CAfile", root, chain])).toContain(": OK");
    const der = join(work, "ctl-inter.der");
    const d = await ctl(kdc, data, ["ca", "download", "--tenant", "globex", "--format", "der", "--out", der]);
    expect(d.code).toBe(0);
    expect(d.stderr).toContain("intermediate sha256");
    expect(await openssl(["x509", "-inform", "DER", "-in", der, "-noout", "-subject"])).toContain("globex MITM CA " + v.version);
    expect((await ctl(kdc, data, ["ca", "download", "--tenant", "globex", "--format", "der"])).code).toBe(2);
  });

  it("csr, upload, activate, renew, revoke, history and status", async () => {
    const csrFile = join(work, "ctl.csr");
    const c = await ctl(kdc, data, ["ca", "csr", "--tenant", "globex", "--org", "Globex", "--out", csrFile]);
    expect(c.code).toBe(0);
    expect(c.stderr).toContain("ca upload");
    expect(await openssl(["req", "-in", csrFile, "-noout", "-verify"])).toMatch(/verify OK/i);
    const signed = await file("ctl-signed.pem", await priv.sign(await readFile(csrFile, "utf8")));
    const u = await ctl(kdc, data, ["ca", "upload", "--tenant", "globex", "--cert", signed, "--root", priv.rootFile, "--json"]);
    expect(u.code).toBe(0);
    const version = JSON.parse(u.stdout).version.version as number;
    const a = await ctl(kdc, data, ["ca", "activate", "--tenant", "globex", "--version", String(version)]);
    expect(a.code).toBe(0);
    expect(a.stdout).toMatch(new RegExp(`version ${version} is active; version \\d+ is retired`));
    const chain = join(work, "ctl-priv-chain.pem");
    await ctl(kdc, data, ["ca", "download", "--tenant", "globex", "--out", chain]);
    expect(await openssl(["verify", "-CAfile", priv.rootFile, "-untrusted", chain, chain])).toContain(": OK");

    const rn = await ctl(kdc, data, ["ca", "renew", "--tenant", "globex", "--version", String(version), "--signer", "kmi-root", "--json"]);
    expect(rn.code).toBe(0);
    const renewed = JSON.parse(rn.stdout).version;
    expect(renewed.renewedFrom).toBe(version);
    const rv = await ctl(kdc, data, ["ca", "revoke", "--tenant", "globex", "--version", String(renewed.version), "--reason", "not needed"]);
    expect(rv.code).toBe(0);
    const again = await ctl(kdc, data, ["ca", "revoke", "--tenant", "globex", "--version", String(renewed.version), "--reason", "x"]);
    expect(again.code).toBe(5);
    expect(again.stderr).toContain("already revoked");
    const h = await ctl(kdc, data, ["ca", "history", "--tenant", "globex"]);
    expect(h.code).toBe(0);
    expect(h.stdout).toMatch(/^VERSION\s+STATE\s+SIGNER/);
    expect(h.stdout).toMatch(new RegExp(`^${renewed.version}\\s+revoked`, "m"));
    expect(h.stdout).toMatch(new RegExp(`^${version}\\s+active\\s+private-ca`, "m"));
    const hj = JSON.parse((await ctl(kdc, data, ["ca", "history", "--tenant", "globex", "--json"])).stdout);
    expect(hj.versions.filter((x: { state: string }) => x.state === "VERSION_STATE_ACTIVE")).toHaveLength(1);
    const st = await ctl(kdc, data, ["ca", "status", "--tenant", "globex"]);
    expect(st.code).toBe(0);
    expect(st.stdout).toContain(`active version: ${version}`);
    const csrAgain = await ctl(kdc, data, ["ca", "csr", "--tenant", "globex", "--version", String(version)]);
    expect(csrAgain.code).toBe(5);
  });

  it("tenants and tokens: create, list, show; a tenant-admin token works on its tenant only; revoke stops it", async () => {
    expect((await ctl(kdc, data, ["tenant", "create", "initech", "--name", "Initech"])).code).toBe(0);
    expect((await ctl(kdc, data, ["tenant", "create", "initech"])).code).toBe(5);
    expect((await ctl(kdc, data, ["tenant", "show", "nosuch"])).code).toBe(3);
    const list = JSON.parse((await ctl(kdc, data, ["tenant", "list", "--json"])).stdout);
    expect(list.tenants.map((t: { tenantId: string }) => t.tenantId)).toEqual(expect.arrayContaining(["acme", "globex", "initech"]));
    const show = await ctl(kdc, data, ["tenant", "show", "initech"]);
    expect(show.stdout).toMatch(/active version:\s+none/);

    const tf = join(work, "initech.token");
    const t = await ctl(kdc, data, ["token", "create", "--role", "tenant-admin", "--tenant", "initech", "--ttl", "1d", "--out", tf, "--json"]);
    expect(t.code).toBe(0);
    expect(JSON.parse(t.stdout).secret).toBeUndefined();
    expect((await stat(tf)).mode & 0o777).toBe(0o600);
    const mine = { caFile: data.caFile, tokenFile: tf };
    expect((await ctl(kdc, mine, ["ca", "rotate", "--tenant", "initech", "--activate"])).code).toBe(0);
    const other = await ctl(kdc, mine, ["ca", "history", "--tenant", "acme"]);
    expect(other.code).toBe(4);
    expect(other.stderr).toContain("permission denied");
    const opOnly = await ctl(kdc, mine, ["tenant", "list"]);
    expect(opOnly.code).toBe(4);
    const tokens = await ctl(kdc, data, ["token", "list", "--json"]);
    const id = JSON.parse(t.stdout).token.tokenId as string;
    expect(tokens.stdout).toContain(id);
    expect(tokens.stdout).not.toContain(tokenSecret((await readFile(tf, "utf8")).trim()));
    expect((await ctl(kdc, data, ["token", "revoke", id])).code).toBe(0);
    const after = await ctl(kdc, mine, ["ca", "history", "--tenant", "initech"]);
    expect(after.code).toBe(4);
    expect(after.stderr).toContain("unauthenticated");
  });

  it("exit codes: usage 2, no token 4, unreachable 1; errors say what to do", async () => {
    const u = await ctl(kdc, data, ["ca", "frobnicate"]);
    expect(u.code).toBe(2);
    expect(u.stderr).toContain("upload");
    expect((await ctl(kdc, data, ["ca", "history"])).code).toBe(2);
    const none = await ctl(kdc, { caFile: data.caFile }, ["tenant", "list"]);
    expect(none.code).toBe(4);
    expect(none.stderr).toContain("--token");
    const down = await ctl({ url: "https://127.0.0.1:1" }, data, ["tenant", "list"]);
    expect(down.code).toBe(1);
    const j = await ctl(kdc, data, ["--json", "tenant", "show", "nosuch"]);
    expect(j.code).toBe(3);
    expect(JSON.parse(j.stderr).error.code).toBe("NotFound");
  });
});

describe("authorization", () => {
  const tenantCalls: [string, (c: ReturnType<typeof clients>, t: string) => Promise<unknown>][] = [
    ["GetCaCertificates", (c, t) => c(KdcService).getCaCertificates({ tenantId: t })],
    ["CreateVersion", (c, t) => c(KdcService).createVersion({ tenantId: t, signer: Signer.KMI_ROOT })],
    ["RenewVersion", (c, t) => c(KdcService).renewVersion({ tenantId: t, version: 1, signer: Signer.KMI_ROOT })],
    ["GetVersionCsr", (c, t) => c(KdcService).getVersionCsr({ tenantId: t, version: 1 })],
    ["UploadIntermediate", (c, t) => c(KdcService).uploadIntermediate({ tenantId: t, certificate: new Uint8Array([48, 0]) })],
    ["ActivateVersion", (c, t) => c(KdcService).activateVersion({ tenantId: t, version: 1 })],
    ["RevokeVersion", (c, t) => c(KdcService).revokeVersion({ tenantId: t, version: 1, reason: "x" })],
    ["ListVersions", (c, t) => c(KdcService).listVersions({ tenantId: t })],
    ["GetRolloutStatus", (c, t) => c(KdcService).getRolloutStatus({ tenantId: t })],
    ["CreateSigningKey", (c, t) => c(KdcService).createSigningKey({ tenantId: t, name: "k" })],
    ["ListSigningKeys", (c, t) => c(KdcService).listSigningKeys({ tenantId: t })],
    ["RevokeSigningKey", (c, t) => c(KdcService).revokeSigningKey({ tenantId: t, name: "k", reason: "x" })],
  ];
  const operatorCalls: [string, (c: ReturnType<typeof clients>) => Promise<unknown>][] = [
    ["CreateTenant", (c) => c(KdcAdminService).createTenant({ tenantId: "evil" })],
    ["ListTenants", (c) => c(KdcAdminService).listTenants({})],
    ["GetTenant", (c) => c(KdcAdminService).getTenant({ tenantId: "acme" })],
    ["CreateToken", (c) => c(KdcAdminService).createToken({ role: Role.OPERATOR })],
    ["RevokeToken", (c) => c(KdcAdminService).revokeToken({ tokenId: "0123456789abcdef" })],
    ["ListTokens", (c) => c(KdcAdminService).listTokens({})],
    ["IssueServiceCertificate", (c) => c(KdcAdminService).issueServiceCertificate({ csrPem: "x", serviceName: "evil", dnsNames: ["a"] })],
    ["TailAuditLog", (c) => c(KdcAdminService).tailAuditLog({})],
    ["VerifyAuditLog", (c) => c(KdcAdminService).verifyAuditLog({})],
    ["GetAuditCheckpoint", (c) => c(KdcAdminService).getAuditCheckpoint({})],
    ["GetKdcStatus", (c) => c(KdcAdminService).getKdcStatus({})],
  ];
  const peerCalls: [string, (c: ReturnType<typeof clients>) => Promise<unknown>][] = [
    ["AuthenticateToken", (c) => c(PeerService).authenticateToken({ token: "x" })],
    ["IssueMachineCertificate", (c) => c(PeerService).issueMachineCertificate({ csrPem: "x", machineId: "m1", group: "g", ttlSeconds: 600 })],
    ["WitnessCheckpoint", (c) => c(PeerService).witnessCheckpoint({})],
    ["GetWitnessedCheckpoint", (c) => c(PeerService).getWitnessedCheckpoint({})],
  ];

  it.each([...tenantCalls.map(([n, f]) => [n, (c: ReturnType<typeof clients>) => f(c, "acme")] as const), ...operatorCalls])(
    "%s requires a token (UNAUTHENTICATED without one or with a bad one)",
    async (_name, call) => {
      await refused(call(clients(kdc.url, caPem)), Code.Unauthenticated, "bearer token");
      await refused(call(clients(kdc.url, caPem, { token: `kmi_0123456789abcdef_${"A".repeat(43)}` })), Code.Unauthenticated, "invalid, revoked or expired");
    },
  );

  it.each(tenantCalls)("%s on another tenant with a tenant-admin token is PERMISSION_DENIED", async (_name, call) => {
    await refused(call(clients(kdc.url, caPem, { token: acmeToken }), "globex"), Code.PermissionDenied, 'may not act on tenant "globex"');
  });

  it.each(operatorCalls)("operator-only %s with a tenant-admin token is PERMISSION_DENIED", async (_name, call) => {
    await refused(call(clients(kdc.url, caPem, { token: acmeToken })), Code.PermissionDenied, "operator role required");
  });

  it.each(peerCalls)("peer call %s requires a service certificate: UNAUTHENTICATED without one, with or without a token", async (_name, call) => {
    await refused(call(clients(kdc.url, caPem)), Code.Unauthenticated, "client certificate required");
    await refused(call(clients(kdc.url, caPem, { token: data.token })), Code.Unauthenticated, "client certificate required");
  });

  it("GetTrustBundle needs no token and returns both roots", async () => {
    const b = await clients(kdc.url, caPem)(KdcAdminService).getTrustBundle({});
    expect(b.kmiRootPem).toBe(await readFile(data.rootFile, "utf8"));
    expect(b.infrastructureCaPem).toBe(caPem);
  });

  it("refused changes and cross-tenant probes are in the audit log with the token id, never the secret", async () => {
    await refused(clients(kdc.url, caPem, { token: acmeToken })(KdcService).activateVersion({ tenantId: "globex", version: 1 }), Code.PermissionDenied);
    const tail = await op(KdcAdminService).tailAuditLog({ last: true, limit: 1 });
    const e = tail.entries[0]!;
    expect(e).toMatchObject({ action: "ca.version.activate", target: "tenant/globex/version/1", outcome: "refused: permission_denied" });
    expect(e.actor).toBe(`token:${acmeToken.split("_")[1]}`);
    const all = await op(KdcAdminService).tailAuditLog({ limit: 1000 });
    const text = JSON.stringify(toJson(TailAuditLogResponseSchema, all));
    expect(text).not.toContain(tokenSecret(acmeToken));
    expect(text).not.toContain(tokenSecret(data.token));
    expect(all.entries.find((x) => x.action === "token.create")!.details["secret"]).toMatch(/^hmac:[0-9a-f]{32}$/);
  });

  it("a kmi service certificate (issued through kmi ctl) calls PeerService; a machine certificate may not", async () => {
    const key = join(work, "audit.key");
    const csr = join(work, "audit.csr");
    await openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-subj", "/CN=audit", "-out", csr]);
    const certFile = join(work, "audit.pem");
    const r = await ctl(kdc, data, ["service-cert", "issue", "--name", "audit", "--csr", csr, "--dns", "audit.test", "--ip", "127.0.0.1", "--out", certFile]);
    expect(r.code).toBe(0);
    expect(await openssl(["verify", "-CAfile", data.caFile, "-purpose", "sslclient", certFile])).toContain(": OK");
    expect(await openssl(["x509", "-in", certFile, "-noout", "-ext", "subjectAltName"])).toContain("URI:kmi://service/audit");
    const svc = clients(kdc.url, caPem, { cert: await readFile(certFile, "utf8"), key: await readFile(key, "utf8") });

    const who = await svc(PeerService).authenticateToken({ token: acmeToken });
    expect(who.token).toMatchObject({ role: Role.TENANT_ADMIN, tenantId: "acme" });
    await refused(svc(PeerService).authenticateToken({ token: "kmi_nope" }), Code.Unauthenticated);

    const mkey = join(work, "m1.key");
    const mcsr = join(work, "m1.csr");
    await openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", mkey, "-subj", "/CN=m1", "-out", mcsr]);
    const m = await svc(PeerService).issueMachineCertificate({ csrPem: await readFile(mcsr, "utf8"), machineId: "m1", group: "edge-eu", ttlSeconds: 3600 });
    const mcert = await file("m1.pem", m.certificatePem);
    expect(await openssl(["verify", "-CAfile", data.caFile, "-purpose", "sslclient", mcert])).toContain(": OK");
    const mtext = await openssl(["x509", "-in", mcert, "-noout", "-subject", "-ext", "subjectAltName"]);
    expect(mtext).toContain("URI:kmi://machine/m1");
    expect(mtext).toMatch(/OU\s*=\s*edge-eu/);
    // RSA machine keys are refused.
    const rkey = join(work, "m2.key");
    const rcsr = join(work, "m2.csr");
    await openssl(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", rkey, "-subj", "/CN=m2", "-out", rcsr]);
    await refused(svc(PeerService).issueMachineCertificate({ csrPem: await readFile(rcsr, "utf8"), machineId: "m2", group: "g", ttlSeconds: 3600 }), Code.InvalidArgument, "ECDSA P-256");
    // Only the Auditserver mints machine identities: another kmi service's certificate may not.
    const wkey = join(work, "watcher.key");
    const wcsr = join(work, "watcher.csr");
    await openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", wkey, "-subj", "/CN=watcher", "-out", wcsr]);
    const wcert = join(work, "watcher.pem");
    expect((await ctl(kdc, data, ["service-cert", "issue", "--name", "watcher", "--csr", wcsr, "--dns", "watcher.test", "--out", wcert])).code).toBe(0);
    const watcher = clients(kdc.url, caPem, { cert: await readFile(wcert, "utf8"), key: await readFile(wkey, "utf8") });
    await refused(watcher(PeerService).issueMachineCertificate({ csrPem: await readFile(mcsr, "utf8"), machineId: "m3", group: "g", ttlSeconds: 3600 }), Code.PermissionDenied, "audit service only");

    const machine = clients(kdc.url, caPem, { cert: m.certificatePem, key: await readFile(mkey, "utf8") });
    await refused(machine(PeerService).authenticateToken({ token: acmeToken }), Code.PermissionDenied, "kmi services only");
    // A certificate from another CA is not trusted.
    const selfKey = join(work, "self.key");
    const selfCert = join(work, "self.pem");
    await openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", selfKey, "-subj", "/CN=audit", "-addext", "subjectAltName=URI:kmi://service/audit", "-days", "1", "-out", selfCert]);
    const forged = clients(kdc.url, caPem, { cert: await readFile(selfCert, "utf8"), key: await readFile(selfKey, "utf8") });
    await refused(forged(PeerService).authenticateToken({ token: acmeToken }), Code.Unauthenticated, "not trusted");
  });

  it("status summarizes tenants; operator token with --json", async () => {
    const s = await ctl(kdc, data, ["status", "--json"]);
    expect(s.code).toBe(0);
    const j = JSON.parse(s.stdout);
    expect(j.kdc.version).toBe("0.1.0");
    expect(j.kdc.tenants.map((t: { tenant: string }) => t.tenant)).toContain("acme");
    expect(j.kdc.audit_head_seq).toBeGreaterThan(5);
  });
});

describe("openssl cross-checks of what the KDC makes", () => {
  it("the KMI root and the infrastructure CA are self-signed CAs that openssl accepts", async () => {
    for (const f of [data.rootFile, data.caFile]) {
      expect(await openssl(["verify", "-CAfile", f, f])).toContain(": OK");
      expect(await openssl(["x509", "-in", f, "-noout", "-ext", "basicConstraints,keyUsage"])).toMatch(/CA:TRUE[\s\S]*Certificate Sign/);
    }
    // A KMI-signed intermediate does not verify against the infrastructure CA: separate roots.
    const dl = await op(KdcService).getCaCertificates({ tenantId: "acme", version: 1 });
    const inter = await file("v1.pem", dl.intermediate);
    expect((await opensslStatus(["verify", "-CAfile", data.caFile, inter])).code).not.toBe(0);
  });
});
