/**
 * Shared helpers for the pki tests: the independent judge (`openssl` CLI) and an ephemeral
 * KMI-style PKI made with src/pki. Nothing here is committed material; keys live in memory
 * and in per-test temp dirs.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { certificateToPem } from "../../../src/pki/pem.js";
import { exportPublicKeySpkiDer, generateKeyPair, type KeyPair } from "../../../src/pki/keys.js";
import { createRootCa, issueIntermediateCa } from "../../../src/pki/issue.js";

/** Result of one openssl run. */
export interface OpensslResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `openssl args...` synchronously. */
export function openssl(args: string[], options: { input?: string | Uint8Array; cwd?: string } = {}): OpensslResult {
  const r = spawnSync("openssl", args, { input: options.input, cwd: options.cwd, encoding: "utf8" });
  if (r.error) throw r.error;
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Runs openssl and throws with its stderr when it fails. */
export function opensslOk(args: string[], options: { input?: string | Uint8Array; cwd?: string } = {}): string {
  const r = openssl(args, options);
  if (r.code !== 0) throw new Error(`openssl ${args.join(" ")} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
}

/** `openssl x509 -noout -text` of a DER certificate. */
export function x509Text(der: Uint8Array): string {
  return opensslOk(["x509", "-inform", "DER", "-noout", "-text"], { input: der });
}

/** A temp dir that is removed by `cleanup()`. */
export interface TempDir {
  dir: string;
  /** Writes a file and returns its path. */
  write(name: string, content: string | Uint8Array): string;
  cleanup(): void;
}

/** Makes a temp dir for one test file. */
export function tempDir(prefix = "kmi-pki-"): TempDir {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return {
    dir,
    write(name, content) {
      const p = join(dir, name);
      writeFileSync(p, content, { mode: 0o600 });
      return p;
    },
    cleanup() {
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A certificate with its key. */
export interface Issued {
  der: Uint8Array;
  pem: string;
  key: KeyPair;
}

/** An ephemeral KMI root and a tenant intermediate, both ECDSA P-256. */
export interface KmiPki {
  now: Date;
  root: Issued;
  intermediate: Issued;
}

/** Seconds in a day. */
export const DAY = 24 * 3600;

/** Makes a KMI root (10 years) and an intermediate (1 year) at `now`. */
export async function makeKmiPki(now = new Date()): Promise<KmiPki> {
  const rootKey = await generateKeyPair("ecdsa-p256");
  const rootDer = createRootCa({
    subject: { commonName: "KMI Test Root CA", organization: "kmi tests", country: "DE" },
    privateKey: rootKey.privateKey,
    now,
    validitySeconds: 3650 * DAY,
  });
  const intKey = await generateKeyPair("ecdsa-p256");
  const intDer = issueIntermediateCa({
    issuer: { certificateDer: rootDer, privateKey: rootKey.privateKey },
    subject: { commonName: "acme MITM CA v1", organization: "acme" },
    publicKeySpkiDer: exportPublicKeySpkiDer(intKey.publicKey),
    now,
    validitySeconds: 365 * DAY,
  });
  return {
    now,
    root: { der: rootDer, pem: certificateToPem(rootDer), key: rootKey },
    intermediate: { der: intDer, pem: certificateToPem(intDer), key: intKey },
  };
}
