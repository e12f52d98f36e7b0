/**
 * `ca upload` refuses every intermediate that is unsafe or could never work, through a real
 * KDC, before anything changes: each refusal class made by openssl at test time, with its gRPC
 * code and message, and history and tenant unchanged. The customer root is required on the
 * first upload, kept with the tenant and reused: 40 bit-flipped certificates uploaded without
 * `--root` afterwards are all refused, none becomes active.
 */
import { execFile } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KdcAdminService, TenantSchema } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService, ListVersionsResponseSchema, Signer, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { cleanup, clients, ctl, initDataDir, startKdc, type DataDir, type KdcProcess } from "./harness.js";

const run = promisify(execFile);

let data: DataDir;
let kdc: KdcProcess;
let op: ReturnType<typeof clients>;
let work: string;
let n = 0;

const TENANT = "pol";
const CA_EXT = "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n";
const KU = "keyUsage=critical,keyCertSign,cRLSign\n";

async function openssl(args: string[]): Promise<void> {
  await run("openssl", args, { cwd: work });
}

/** A root CA made by openssl: `name.pem` and `name.key` in the work dir. */
async function makeRoot(name: string, days: number, ext: string[] = []): Promise<string> {
  await openssl([
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.pem`,
    "-days", String(days), "-subj", `/CN=${name}/O=Policy Test Root`,
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", ...ext.flatMap((e) => ["-addext", e]),
  ]);
  return join(work, `${name}.pem`);
}

/** Signs `csrPem` with root `ca` (openssl x509 -req); `ext` undefined = no -extfile at all. */
async function sign(csrPem: string, ext: string | undefined, opts: { ca?: string; days?: number; extra?: string[] } = {}): Promise<Uint8Array> {
  n++;
  const csr = join(work, `in-${n}.csr`);
  await writeFile(csr, csrPem);
  const ca = opts.ca ?? "root";
  const args = ["x509", "-req", "-in", csr, "-CA", `${ca}.pem`, "-CAkey", `${ca}.key`, "-set_serial", String(5000 + n), "-days", String(opts.days ?? 90), "-out", `out-${n}.pem`, ...(opts.extra ?? [])];
  if (ext !== undefined) {
    await writeFile(join(work, `ext-${n}.cnf`), ext);
    args.push("-extfile", `ext-${n}.cnf`);
  }
  await openssl(args);
  return new Uint8Array(await readFile(join(work, `out-${n}.pem`)));
}

async function refusal(p: Promise<unknown>): Promise<ConnectError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, "the upload should have been refused").toBeInstanceOf(ConnectError);
  return err as ConnectError;
}

/** Everything an upload could change: the tenant's history and its record, byte for byte. */
async function state(): Promise<string> {
  const h = toBinary(ListVersionsResponseSchema, await op(KdcService).listVersions({ tenantId: TENANT }));
  const t = toBinary(TenantSchema, (await op(KdcAdminService).getTenant({ tenantId: TENANT })).tenant!);
  return Buffer.concat([h, t]).toString("hex");
}

let pending: { version: number; csrPem: string };
let rootPem: Uint8Array;

beforeAll(async () => {
  data = await initDataDir();
  work = data.dir;
  kdc = await startKdc(data.dataDir);
  op = clients(kdc.url, await readFile(data.caFile, "utf8"), { token: data.token });
  await op(KdcAdminService).createTenant({ tenantId: TENANT, bootstrapKmiSigned: true });
  const c = await op(KdcService).createVersion({ tenantId: TENANT, signer: Signer.PRIVATE_CA });
  pending = { version: c.version!.version, csrPem: c.csrPem };
  rootPem = new Uint8Array(await readFile(await makeRoot("root", 3650)));
  await makeRoot("shortroot", 30);
  await makeRoot("otherroot", 3650);
  await openssl([
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "pl0.key", "-out", "pl0.pem", "-days", "3650",
    "-subj", "/CN=pl0", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
  ]);
  await openssl([
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ncroot.key", "-out", "ncroot.pem", "-days", "3650",
    "-subj", "/CN=ncroot", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    "-addext", "nameConstraints=critical,permitted;DNS:.corp.example",
  ]);
}, 120_000);

afterAll(async () => {
  await kdc?.stop();
  await cleanup(data?.dir);
});

type Input = () => Promise<{ cert: Uint8Array; root?: Uint8Array }>;
const withRoot = (cert: Promise<Uint8Array>): ReturnType<Input> => cert.then((c) => ({ cert: c, root: rootPem }));
const rootFile = async (name: string): Promise<Uint8Array> => new Uint8Array(await readFile(join(work, `${name}.pem`)));
const FIX = "sign it with basicConstraints=critical,CA:TRUE,pathlen:0";

describe("ca upload refuses unsafe or unusable intermediates, changing nothing", () => {
  it.each<[string, Input, Code, string]>([
    [
      "signed without extensions (#15.11)",
      () => withRoot(sign(pending.csrPem, undefined)),
      Code.InvalidArgument,
      "certificate: not a CA (it has no basicConstraints extension: it was signed without extensions); sign the CSR again with an extensions file (openssl x509 -req ... -extfile ca.ext) holding basicConstraints=critical,CA:TRUE,pathlen:0 and keyUsage=critical,keyCertSign,cRLSign",
    ],
    ["a leaf (CA:FALSE)", () => withRoot(sign(pending.csrPem, "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n")), Code.InvalidArgument, `certificate: not a CA (basicConstraints cA is false); upload the intermediate, not a leaf, or ${FIX}`],
    ["basicConstraints not critical", () => withRoot(sign(pending.csrPem, `basicConstraints=CA:TRUE,pathlen:0\n${KU}`)), Code.InvalidArgument, `certificate: basicConstraints is not marked critical, as RFC 5280 requires of a CA; ${FIX}`],
    ["pathlen absent", () => withRoot(sign(pending.csrPem, `basicConstraints=critical,CA:TRUE\n${KU}`)), Code.InvalidArgument, `certificate: basicConstraints has no pathlen, so its key could sign further CAs; ${FIX}`],
    ["pathlen 1", () => withRoot(sign(pending.csrPem, `basicConstraints=critical,CA:TRUE,pathlen:1\n${KU}`)), Code.InvalidArgument, `certificate: basicConstraints pathlen is 1, so its key could sign further CAs; ${FIX}`],
    ["no keyCertSign", () => withRoot(sign(pending.csrPem, "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,digitalSignature\n")), Code.InvalidArgument, "certificate: keyUsage lacks keyCertSign, so it cannot sign leaves"],
    [
      "extendedKeyUsage clientAuth only",
      () => withRoot(sign(pending.csrPem, `${CA_EXT}extendedKeyUsage=clientAuth\n`)),
      Code.InvalidArgument,
      "certificate: extendedKeyUsage (clientAuth) lacks serverAuth, so TLS clients would reject every leaf it signs; sign it without extendedKeyUsage, or with extendedKeyUsage=serverAuth",
    ],
    ["extendedKeyUsage codeSigning", () => withRoot(sign(pending.csrPem, `${CA_EXT}extendedKeyUsage=codeSigning\n`)), Code.InvalidArgument, "certificate: extendedKeyUsage (codeSigning) lacks serverAuth"],
    [
      "nameConstraints permitting one domain",
      () => withRoot(sign(pending.csrPem, `${CA_EXT}nameConstraints=critical,permitted;DNS:example.com\n`)),
      Code.InvalidArgument,
      "certificate: has nameConstraints (permitted DNS), but the proxy mints leaves for any host its clients visit and clients would reject those outside them; sign it without nameConstraints",
    ],
    ["nameConstraints excluding a network", () => withRoot(sign(pending.csrPem, `${CA_EXT}nameConstraints=excluded;IP:10.0.0.0/255.0.0.0\n`)), Code.InvalidArgument, "certificate: has nameConstraints (excluded IP)"],
    [
      "a subject other than the CSR's",
      () => withRoot(sign(pending.csrPem, CA_EXT, { extra: ["-subj", "/CN=Someone Else/O=Elsewhere"] })),
      Code.InvalidArgument,
      'certificate: subject "O=Elsewhere,CN=Someone Else" is not the CSR\'s "',
    ],
    ["valid for 100 years", () => withRoot(sign(pending.csrPem, CA_EXT, { days: 36500 })), Code.InvalidArgument, "certificate: valid for 36500 days"],
    [
      "ending after its issuer",
      async () => ({ cert: await sign(pending.csrPem, CA_EXT, { ca: "shortroot", days: 60 }), root: await rootFile("shortroot") }),
      Code.InvalidArgument,
      "certificate: valid until",
    ],
    ["a day left", () => withRoot(sign(pending.csrPem, CA_EXT, { days: 1 })), Code.FailedPrecondition, "fewer than 7 days from now, too soon to roll it out and renew it; have the CA issue it for longer"],
    [
      "no root on the tenant's first upload",
      async () => ({ cert: await sign(pending.csrPem, CA_EXT) }),
      Code.InvalidArgument,
      "customer_root: required on the tenant's first private-CA upload, so that the signature can be checked (kmi keeps it for later uploads); pass --root with the root of your private CA",
    ],
    ["signed by another root than the one given", async () => ({ cert: await sign(pending.csrPem, CA_EXT), root: await rootFile("otherroot") }), Code.InvalidArgument, "certificate: does not chain to customer_root"],
    [
      "a root with nameConstraints",
      async () => ({ cert: await sign(pending.csrPem, CA_EXT, { ca: "ncroot" }), root: await rootFile("ncroot") }),
      Code.InvalidArgument,
      "customer_root: has nameConstraints (permitted DNS)",
    ],
    ["a root with pathlen 0", async () => ({ cert: await sign(pending.csrPem, CA_EXT, { ca: "pl0" }), root: await rootFile("pl0") }), Code.InvalidArgument, "customer_root: pathLenConstraint 0 forbids an intermediate CA below it"],
  ])("refuses %s", async (_name, input, code, message) => {
    const { cert, root } = await input();
    const before = await state();
    const err = await refusal(
      op(KdcService).uploadIntermediate({ tenantId: TENANT, version: pending.version, certificate: cert, customerRoot: root ?? new Uint8Array(), activate: true }),
    );
    expect(Code[err.code]).toBe(Code[code]);
    expect(err.rawMessage).toContain(message);
    expect(await state()).toBe(before);
    const [entry] = (await op(KdcAdminService).tailAuditLog({ last: true, limit: 1 })).entries;
    expect(entry).toMatchObject({ action: "ca.version.upload", outcome: code === Code.InvalidArgument ? "refused: invalid_argument" : "refused: failed_precondition" });
  });

  it("through kmi ctl, a certificate signed without extensions exits 5 with the -extfile line that fixes it", async () => {
    const certFile = join(work, "noext.pem");
    await writeFile(certFile, await sign(pending.csrPem, undefined));
    const before = await state();
    const r = await ctl(kdc, data, ["ca", "upload", "--tenant", TENANT, "--cert", certFile, "--root", join(work, "root.pem")]);
    expect(r.code).toBe(5);
    expect(r.stderr).toContain("it was signed without extensions); sign the CSR again with an extensions file (openssl x509 -req ... -extfile ca.ext) holding basicConstraints=critical,CA:TRUE,pathlen:0");
    expect(await state()).toBe(before);
  });
});

describe("the customer root is required once, kept with the tenant, and every signature is checked", () => {
  it("accepts the right certificate with --root, then checks later uploads without --root against the kept root: 40 bit flips refused, none active", async () => {
    const good = await sign(pending.csrPem, CA_EXT);
    const first = await op(KdcService).uploadIntermediate({ tenantId: TENANT, version: pending.version, certificate: good, customerRoot: rootPem });
    expect(first.version!.state).toBe(VersionState.READY);
    const [upload] = (await op(KdcAdminService).tailAuditLog({ last: true, limit: 1 })).entries;
    expect(upload).toMatchObject({ action: "ca.version.upload", outcome: "ok", details: expect.objectContaining({ customer_root: "given" }) });

    const next = await op(KdcService).createVersion({ tenantId: TENANT, signer: Signer.PRIVATE_CA });
    const v = next.version!.version;
    const signed = await sign(next.csrPem, CA_EXT);
    const signedDer = Buffer.from(new TextDecoder().decode(signed).replace(/-----[^-]+-----|\s/g, ""), "base64");
    const activeBefore = (await op(KdcAdminService).getTenant({ tenantId: TENANT })).tenant!.activeVersion;
    const before = await state();
    for (let i = 0; i < 40; i++) {
      const flipped = Buffer.from(signedDer);
      const at = Math.floor(((i + 0.5) * flipped.length) / 40);
      flipped[at]! ^= 1 << (i % 8);
      const err = await refusal(op(KdcService).uploadIntermediate({ tenantId: TENANT, version: v, certificate: flipped, activate: true }));
      expect([Code.InvalidArgument, Code.FailedPrecondition], `flip ${i} at byte ${at}: ${err.rawMessage}`).toContain(err.code);
    }
    expect(await state()).toBe(before);
    expect((await op(KdcAdminService).getTenant({ tenantId: TENANT })).tenant!.activeVersion).toBe(activeBefore);

    // The unflipped certificate, also without --root, is checked against the kept root and activates.
    const ok = await op(KdcService).uploadIntermediate({ tenantId: TENANT, version: v, certificate: signedDer, activate: true });
    expect(ok.version!.state).toBe(VersionState.ACTIVE);
    const [kept] = (await op(KdcAdminService).tailAuditLog({ last: true, limit: 1 })).entries;
    expect(kept).toMatchObject({ action: "ca.version.upload", outcome: "ok", details: expect.objectContaining({ customer_root: "kept" }) });
    expect(kept!.details["customer_root_sha256"]).toBe(upload!.details["customer_root_sha256"]);
  });
});
