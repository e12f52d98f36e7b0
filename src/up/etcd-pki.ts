/**
 * The certificates of `kmi up --ha`'s etcd cluster: a dedicated etcd CA, made at the first
 * start and kept in `<data>/etcd/pki` (0700, files 0600), and from it, at every start, the
 * members' certificate (server for clients, server and client between peers) and one client
 * certificate per kind of program (the KDCs, the Auditservers, `kmi up` itself for health).
 *
 * Why a CA of its own and not the infrastructure CA: etcd trusts every certificate its CA
 * signed as a client (`--client-cert-auth`), and the infrastructure CA signs every machine's
 * identity; a proxy machine must not be able to open the store.
 */
import { createPrivateKey, type KeyObject } from "node:crypto";
import { chmod, mkdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { certificateToPem, createRootCa, generateKeyPair, issueServiceCertificate, parseOneCertificate } from "../pki/index.js";
import { pathExists, writeFileAtomicSync } from "../common/fs.js";

const DAY_S = 24 * 3600;
/** The CA lives ten years; the certificates it signs one, and are re-issued at every start. */
const CA_VALIDITY_S = 10 * 365 * DAY_S;
const LEAF_VALIDITY_S = 365 * DAY_S;

/** A certificate and its key, as files. */
export interface CertFiles {
  readonly cert: string;
  readonly key: string;
}

/** The files etcd and its clients are given. */
export interface EtcdPki {
  /** The etcd CA's certificate (what members and clients trust). */
  readonly ca: string;
  /** The members' certificate and key. */
  readonly member: CertFiles;
  /** The client certificates: the KDC replicas, the Auditserver replicas, `kmi up` (health, status). */
  readonly clients: { readonly kdc: CertFiles; readonly audit: CertFiles; readonly up: CertFiles };
}

/** Where the files are under `dir`. */
export function etcdPkiFiles(dir: string): EtcdPki {
  const pair = (name: string): CertFiles => ({ cert: join(dir, `${name}.pem`), key: join(dir, `${name}.key`) });
  return { ca: join(dir, "ca.pem"), member: pair("member"), clients: { kdc: pair("kdc"), audit: pair("audit"), up: pair("up") } };
}

function writeSecret(path: string, content: string): void {
  writeFileAtomicSync(path, content, 0o600);
}

function keyPem(key: KeyObject): string {
  return key.export({ type: "pkcs8", format: "pem" }) as string;
}

/** The CA: read when it exists, made (key and certificate, 0600) when it does not. */
async function loadOrMakeCa(dir: string, now: Date): Promise<{ certificateDer: Uint8Array; privateKey: KeyObject }> {
  const certFile = join(dir, "ca.pem");
  const keyFile = join(dir, "ca.key");
  if ((await pathExists(certFile)) && (await pathExists(keyFile))) {
    const der = parseOneCertificate(await readFile(certFile, "utf8"), certFile);
    return { certificateDer: der, privateKey: createPrivateKey(await readFile(keyFile, "utf8")) };
  }
  const key = await generateKeyPair("ecdsa-p256");
  const der = createRootCa({ subject: { commonName: "kmi up etcd CA", organization: "kmi" }, privateKey: key.privateKey, now, validitySeconds: CA_VALIDITY_S });
  writeSecret(keyFile, keyPem(key.privateKey));
  writeSecret(certFile, certificateToPem(der));
  return { certificateDer: der, privateKey: key.privateKey };
}

async function issue(ca: { certificateDer: Uint8Array; privateKey: KeyObject }, files: CertFiles, name: string, hosts: { dnsNames: string[]; ipAddresses: string[] }, now: Date): Promise<void> {
  const key = await generateKeyPair("ecdsa-p256");
  const spki = key.publicKey.export({ type: "spki", format: "der" });
  const der = issueServiceCertificate({ issuer: ca, serviceName: name, publicKeySpkiDer: new Uint8Array(spki), ...hosts, now, validitySeconds: LEAF_VALIDITY_S });
  writeSecret(files.key, keyPem(key.privateKey));
  writeSecret(files.cert, certificateToPem(der));
}

/**
 * Makes the CA on the first start and issues the members' and clients' certificates; the
 * members' covers `localhost`, 127.0.0.1, ::1 and `host` (the address they listen on).
 */
export async function ensureEtcdPki(dir: string, host: string, now: Date = new Date()): Promise<EtcdPki> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  const files = etcdPkiFiles(dir);
  const ca = await loadOrMakeCa(dir, now);
  const isIp = /^[\d.]+$|:/.test(host);
  const memberHosts = {
    dnsNames: [...new Set(["localhost", ...(isIp ? [] : [host])])],
    ipAddresses: [...new Set(["127.0.0.1", "::1", ...(isIp ? [host] : [])])],
  };
  await issue(ca, files.member, "etcd", memberHosts, now);
  // Clients present their certificate to etcd only: no names needed.
  for (const [name, f] of Object.entries(files.clients)) await issue(ca, f, `kmi-${name}`, { dnsNames: [], ipAddresses: [] }, now);
  return files;
}
