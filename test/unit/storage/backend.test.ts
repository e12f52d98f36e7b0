import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import { envName, loadConfig, defineProgram, storeOptions } from "../../../src/common/config.js";
import { openStoreBackend, storeBackendFrom } from "../../../src/storage/backend.js";

const full = { store: "etcd", etcdEndpoints: "https://10.0.0.1:2379, https://10.0.0.2:2379", etcdCa: "ca.pem", etcdCert: "c.pem", etcdKey: "c.key" };

describe("store backend selection", () => {
  it("is LevelDB by default, and etcd with every setting (endpoints split, the program's default prefix)", () => {
    expect(storeBackendFrom({}, "kmi/kdc")).toEqual({ kind: "level" });
    expect(storeBackendFrom(full, "kmi/kdc")).toEqual({
      kind: "etcd",
      endpoints: ["https://10.0.0.1:2379", "https://10.0.0.2:2379"],
      caFile: "ca.pem",
      certFile: "c.pem",
      keyFile: "c.key",
      prefix: "kmi/kdc",
    });
    expect(storeBackendFrom({ ...full, etcdPrefix: "site-a/kdc" }, "kmi/kdc")).toMatchObject({ prefix: "site-a/kdc" });
  });

  it.each([
    ["no endpoints", { ...full, etcdEndpoints: undefined }, /--etcd-endpoints: required with --store etcd/],
    ["no CA", { ...full, etcdCa: "" }, /--etcd-ca: required with --store etcd/],
    ["no client certificate", { ...full, etcdCert: undefined }, /--etcd-cert: required/],
    ["no client key", { ...full, etcdKey: undefined }, /--etcd-key: required/],
    ["an unknown backend", { store: "redis" }, /--store: "redis" is not a backend; use level or etcd/],
  ])("refuses %s with InvalidArgument naming the flag", (_n, values, message) => {
    expect(() => storeBackendFrom(values, "kmi/kdc")).toThrow(InvalidArgument);
    expect(() => storeBackendFrom(values, "kmi/kdc")).toThrow(message);
  });

  it("reads the settings from the environment as KMI_<PROG>_STORE and KMI_<PROG>_ETCD_*", async () => {
    const program = defineProgram({ program: "kdc", usage: "kmi kdc", options: { ...storeOptions("kmi/kdc") } });
    const env = { [envName("kdc", "store")]: "etcd", KMI_KDC_ETCD_ENDPOINTS: "https://127.0.0.1:2379", KMI_KDC_ETCD_CA: "a", KMI_KDC_ETCD_CERT: "b", KMI_KDC_ETCD_KEY: "c" };
    const loaded = await loadConfig(program, [], { env });
    expect(storeBackendFrom(loaded.values, "kmi/kdc")).toMatchObject({ kind: "etcd", endpoints: ["https://127.0.0.1:2379"], caFile: "a", prefix: "kmi/kdc" });
  });

  it("says which file it cannot read, and refuses a plaintext endpoint", async () => {
    await expect(openStoreBackend({ kind: "etcd", endpoints: ["https://127.0.0.1:1"], caFile: "/nonexistent/ca.pem", certFile: "x", keyFile: "y", prefix: "kmi/kdc" }, "", { owner: "kdc", schemaVersion: 1, create: false })).rejects.toThrow(
      /--etcd-ca \/nonexistent\/ca.pem: cannot read it \(ENOENT\)/,
    );
    await expect(openStoreBackend({ kind: "etcd", endpoints: ["http://127.0.0.1:2379"], caFile: fileURLToPath(import.meta.url), certFile: fileURLToPath(import.meta.url), keyFile: fileURLToPath(import.meta.url), prefix: "kmi/kdc" }, "", { owner: "kdc", schemaVersion: 1, create: false })).rejects.toThrow(
      /use https:\/\/host:port/,
    );
  });
});
