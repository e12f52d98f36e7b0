import { spawnSync } from "node:child_process";
import { readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createCsr, csrToPem, intermediateCaRequestExtensions } from "../../../src/pki/csr.js";
import { exportPublicKeySpkiDer, generateKeyPair } from "../../../src/pki/keys.js";
import { checkUploadedIntermediate } from "../../../src/pki/upload.js";
import { openssl, tempDir, type TempDir } from "./support.js";

const SCRIPT = fileURLToPath(new URL("../../../certs-dev/make-dev-certs.sh", import.meta.url));

describe("certs-dev/make-dev-certs.sh", () => {
  let tmp: TempDir;
  const run = (...args: string[]) =>
    spawnSync("bash", [SCRIPT, ...args], { encoding: "utf8", env: { ...process.env, KMI_DEV_CERTS_OUT: join(tmp.dir, "out") } });
  const out = (name: string): string => join(tmp.dir, "out", name);

  beforeAll(() => {
    tmp = tempDir();
    const r = run();
    if (r.status !== 0) throw new Error(r.stderr);
  }, 30_000);
  afterAll(() => tmp.cleanup());

  it("makes origin certificates that openssl judges as intended, with private keys 0600", () => {
    const verify = (cert: string, host: string) => openssl(["verify", "-CAfile", out("origin-ca.pem"), "-verify_hostname", host, out(cert)]).code;
    expect(verify("origin-localhost.pem", "localhost")).toBe(0);
    expect(verify("origin-wrongname.pem", "localhost")).not.toBe(0);
    expect(verify("origin-selfsigned.pem", "localhost")).not.toBe(0);
    expect(readFileSync(out("origin-localhost.chain.pem"), "utf8").match(/BEGIN CERTIFICATE/g)).toHaveLength(2);
    for (const key of ["customer-root.key", "origin-ca.key", "origin-localhost.key"]) {
      expect(statSync(out(key)).mode & 0o777).toBe(0o600);
    }
    expect(statSync(join(tmp.dir, "out")).mode & 0o777).toBe(0o700);
    // Idempotent: a second run keeps what exists.
    const before = readFileSync(out("origin-ca.pem"), "utf8");
    expect(run().status).toBe(0);
    expect(readFileSync(out("origin-ca.pem"), "utf8")).toBe(before);
  });

  it("sign-csr signs a kmi CSR with the dev customer root, and the upload check accepts it", async () => {
    const key = await generateKeyPair("ecdsa-p256");
    const spki = exportPublicKeySpkiDer(key.publicKey);
    const csr = tmp.write("tenant.csr", csrToPem(createCsr({ subject: { commonName: "dev tenant CA" }, privateKey: key.privateKey, requestedExtensions: intermediateCaRequestExtensions(spki) })));
    const r = run("sign-csr", csr, "30");
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(out("tenant.signed.pem"));
    const uploaded = checkUploadedIntermediate({
      certificate: readFileSync(out("tenant.signed.pem")),
      customerRoot: readFileSync(out("customer-root.pem")),
      expectedSpkiDer: spki,
      now: new Date(),
    });
    expect(uploaded.certificate.pathLenConstraint).toBe(0);
    expect(uploaded.customerRoot?.subject).toBe("CN=Dev Customer Root CA,O=Dev Customer Inc");
    expect(run("sign-csr", join(tmp.dir, "missing.csr")).status).not.toBe(0);
  });
});
