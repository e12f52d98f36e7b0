/**
 * An ephemeral PKI for tests, made with the `openssl` CLI: a CA, a server certificate for
 * localhost/127.0.0.1, a client certificate with a kmi machine URI, and a client certificate
 * from another CA. Nothing is committed and nothing outlives the test's temp dir.
 */
import { randomBytes } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { run } from "./process.js";

/** Paths of one certificate and its key. */
export interface CertFiles {
  /** Certificate, PEM. */
  cert: string;
  /** Private key, PEM. */
  key: string;
}

/** The files of an ephemeral test PKI. */
export interface TestPki {
  /** Directory holding everything. */
  dir: string;
  /** The CA that signs the server and the trusted client. */
  ca: CertFiles;
  /** Server certificate: DNS:localhost, IP:127.0.0.1, IP:::1; serverAuth. */
  server: CertFiles;
  /** Client certificate from `ca`: URI kmi://machine/<machineId>; clientAuth. */
  client: CertFiles;
  /** A service client certificate from `ca`: URI kmi://service/<serviceName>. */
  serviceClient: CertFiles;
  /** A CA nobody trusts. */
  otherCa: CertFiles;
  /** A client certificate from `otherCa` with the same machine URI. */
  otherClient: CertFiles;
  /** The machine id in `client`. */
  machineId: string;
  /** The service name in `serviceClient`. */
  serviceName: string;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  const r = await run("openssl", args, { cwd });
  if (r.code !== 0) throw new Error(`openssl ${args.join(" ")} failed: ${r.stderr}`);
}

async function makeCa(dir: string, name: string, cn: string): Promise<CertFiles> {
  const cert = join(dir, `${name}.pem`);
  const key = join(dir, `${name}.key`);
  await openssl(
    [
      "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
      "-keyout", key, "-out", cert, "-days", "2", "-subj", `/CN=${cn}`,
      "-addext", "basicConstraints=critical,CA:TRUE",
      "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    ],
    dir,
  );
  return { cert, key };
}

async function makeLeaf(dir: string, name: string, ca: CertFiles, cn: string, ext: string): Promise<CertFiles> {
  const cert = join(dir, `${name}.pem`);
  const key = join(dir, `${name}.key`);
  const csr = join(dir, `${name}.csr`);
  const extFile = join(dir, `${name}.ext`);
  await writeFile(extFile, `basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n${ext}\n`);
  await openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", csr, "-subj", `/CN=${cn}`], dir);
  await openssl(
    ["x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial", "0x" + randomBytes(12).toString("hex"), "-out", cert, "-days", "2", "-extfile", extFile],
    dir,
  );
  return { cert, key };
}

/** Makes the PKI under `dir` (about 0.2 s of openssl calls). */
export async function makeTestPki(dir: string): Promise<TestPki> {
  const machineId = "m-test-1";
  const serviceName = "audit";
  const ca = await makeCa(dir, "ca", "kmi test infrastructure CA");
  const otherCa = await makeCa(dir, "other-ca", "someone else's CA");
  const [server, client, serviceClient, otherClient] = await Promise.all([
    makeLeaf(dir, "server", ca, "localhost", "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"),
    makeLeaf(dir, "client", ca, machineId, `extendedKeyUsage=clientAuth\nsubjectAltName=URI:kmi://machine/${machineId}`),
    makeLeaf(dir, "service-client", ca, serviceName, `extendedKeyUsage=clientAuth\nsubjectAltName=URI:kmi://service/${serviceName}`),
    makeLeaf(dir, "other-client", otherCa, machineId, `extendedKeyUsage=clientAuth\nsubjectAltName=URI:kmi://machine/${machineId}`),
  ]);
  return { dir, ca, server, client, serviceClient, otherCa, otherClient, machineId, serviceName };
}

/** Reads a PEM file as a Buffer. */
export function readPem(path: string): Promise<Buffer> {
  return readFile(path);
}
