/**
 * Where a program's store lives, as configured: LevelDB in its data dir (the default: one
 * node, `npm start`) or an etcd cluster (replicas; `--store etcd --etcd-endpoints … --etcd-ca …
 * --etcd-cert … --etcd-key …`). The programs open their store through `openStoreBackend` and
 * see only the `Store` interface.
 */
import { readFile } from "node:fs/promises";
import { FailedPrecondition, InvalidArgument } from "../common/errors.js";
import { openEtcdStore } from "./etcd-store.js";
import { openLevelStore } from "./level-store.js";
import type { Store } from "./store.js";

/** The configured backend. */
export type StoreBackend =
  | { kind: "level" }
  | {
      kind: "etcd";
      /** Client URLs (https://host:port). */
      endpoints: string[];
      /** PEM files: the CA of the members' certificates, this client's certificate and key. */
      caFile: string;
      certFile: string;
      keyFile: string;
      /** Key prefix of the program's tables, e.g. "kmi/kdc". */
      prefix: string;
    };

/** The store options as `storeOptions` (src/common/config.ts) declares them. */
export interface StoreOptionValues {
  store?: string | undefined;
  etcdEndpoints?: string | undefined;
  etcdCa?: string | undefined;
  etcdCert?: string | undefined;
  etcdKey?: string | undefined;
  etcdPrefix?: string | undefined;
}

/** The backend the options describe; InvalidArgument naming the flag when etcd lacks a setting. */
export function storeBackendFrom(v: StoreOptionValues, defaultPrefix: string): StoreBackend {
  if ((v.store ?? "level") === "level") return { kind: "level" };
  if (v.store !== "etcd") throw new InvalidArgument(`--store: "${v.store}" is not a backend; use level or etcd`);
  const need = (value: string | undefined, flag: string, what: string): string => {
    if (value === undefined || value.trim() === "") throw new InvalidArgument(`${flag}: required with --store etcd (${what})`);
    return value.trim();
  };
  const endpoints = need(v.etcdEndpoints, "--etcd-endpoints", "the members' client URLs, https://host:2379,…")
    .split(",")
    .map((e) => e.trim())
    .filter((e) => e !== "");
  return {
    kind: "etcd",
    endpoints,
    caFile: need(v.etcdCa, "--etcd-ca", "PEM of the CA that signed the etcd members' certificates"),
    certFile: need(v.etcdCert, "--etcd-cert", "PEM of this program's etcd client certificate"),
    keyFile: need(v.etcdKey, "--etcd-key", "PEM of that certificate's private key"),
    prefix: v.etcdPrefix?.trim() || defaultPrefix,
  };
}

/** Options of `openStoreBackend`. */
export interface OpenBackendOptions {
  /** The owning program ("kdc", "audit"). */
  owner: string;
  /** Layout version of its tables. */
  schemaVersion: number;
  /** Create the store when there is none. */
  create: boolean;
}

/** Opens the store: LevelDB at `levelDir`, or the etcd prefix. */
export async function openStoreBackend(backend: StoreBackend, levelDir: string, options: OpenBackendOptions): Promise<Store> {
  if (backend.kind === "level") return openLevelStore(levelDir, { owner: options.owner, schemaVersion: options.schemaVersion, create: options.create });
  // One after the other, so that the first file missing is the one named.
  const ca = await readPem(backend.caFile, "--etcd-ca");
  const cert = await readPem(backend.certFile, "--etcd-cert");
  const key = await readPem(backend.keyFile, "--etcd-key");
  // The key stays in memory for the client's life: grpc-js keeps it to make each TLS connection.
  return openEtcdStore({ endpoints: backend.endpoints, ca, cert, key, prefix: backend.prefix, owner: options.owner, schemaVersion: options.schemaVersion, create: options.create });
}

/** Where the store is, for messages and logs ("data dir …" or "etcd … prefix …"). */
export function describeBackend(backend: StoreBackend, levelDir: string): string {
  return backend.kind === "level" ? `LevelDB ${levelDir}` : `etcd ${backend.endpoints.join(",")} prefix ${backend.prefix}`;
}

async function readPem(file: string, flag: string): Promise<Buffer> {
  try {
    return await readFile(file);
  } catch (err) {
    throw new FailedPrecondition(`${flag} ${file}: cannot read it (${(err as NodeJS.ErrnoException).code ?? "error"}); check the path and its permissions`, { cause: err });
  }
}
