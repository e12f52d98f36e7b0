/**
 * The etcd backend against a real 3-member etcd cluster (TLS, client certificates): the shared
 * Store contract, TLS refusals, compaction by `etcdctl`, and what etcd holds, read back with
 * `etcdctl`: no private key or token secret in plaintext.
 */
import { createPrivateKey, generateKeyPairSync, randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { create } from "@bufbuild/protobuf";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { CredentialRecordSchema, TokenRecordSchema } from "../../../src/gen/kmi/store/v1/kdc_pb.js";
import { openEtcdStore, type EtcdStore } from "../../../src/storage/etcd-store.js";
import { createAuditLog } from "../../../src/storage/audit-log.js";
import { open as unseal, seal } from "../../../src/storage/seal.js";
import { defineTable, putOp } from "../../../src/storage/store.js";
import { mintToken, parseToken } from "../../../src/kdc/tokens.js";
import { startEtcdCluster, type EtcdCluster } from "../../fixtures/storage/etcd-cluster.js";
import { describeStoreContract } from "../../unit/storage/store-contract.js";

let cluster: EtcdCluster;
let n = 0;
const open: EtcdStore[] = [];

beforeAll(async () => {
  cluster = await startEtcdCluster(3);
});
afterEach(async () => {
  await Promise.all(open.splice(0).map((s) => s.close()));
});
afterAll(async () => {
  await cluster?.stop();
});

async function openStore(prefix: string, endpoints = cluster.endpoints): Promise<EtcdStore> {
  const s = await openEtcdStore({ endpoints, ca: cluster.ca, cert: cluster.cert, key: cluster.key, prefix, owner: "test" });
  open.push(s);
  return s;
}

describeStoreContract("etcd (3 members, TLS)", () => ({
  async fresh() {
    const prefix = `t/contract${++n}`;
    // Two separate clients (two gRPC connections), each on its own member.
    return { a: await openStore(prefix, [cluster.endpoints[0]!]), b: await openStore(prefix, [cluster.endpoints[1]!]) };
  },
  async compactExternally(revision) {
    const r = await cluster.etcdctl(["compaction", revision.toString()]);
    expect(r.code, r.stderr).toBe(0);
  },
}));

describe("etcd store", () => {
  it("refuses to open another owner's prefix, and a cluster it cannot authenticate to", async () => {
    await openStore("t/owned");
    await expect(openEtcdStore({ endpoints: cluster.endpoints, ca: cluster.ca, cert: cluster.cert, key: cluster.key, prefix: "t/owned", owner: "other" })).rejects.toThrow(
      /belongs to kmi test, not kmi other/,
    );
    const stranger = { cert: await readFile(cluster.strangerFiles.cert), key: await readFile(cluster.strangerFiles.key) };
    await expect(openEtcdStore({ endpoints: [cluster.endpoints[0]!], ca: cluster.ca, ...stranger, prefix: "t/x" })).rejects.toMatchObject({ code: "unavailable" });
    await expect(openEtcdStore({ endpoints: ["http://127.0.0.1:2379"], ca: cluster.ca, cert: cluster.cert, key: cluster.key, prefix: "t/x" })).rejects.toThrow(/https/);
  });

  it("holds sealed secrets only: etcdctl reads no private key and no token secret in plaintext", async () => {
    const store = await openStore("t/secrets");
    const Credentials = defineTable("credentials", CredentialRecordSchema);
    const Tokens = defineTable("tokens", TokenRecordSchema);
    const master = randomBytes(32);
    const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
    const pkcs8 = privateKey.export({ format: "der", type: "pkcs8" });
    const pem = privateKey.export({ format: "pem", type: "pkcs8" }).toString();
    const token = mintToken();
    await store.commit({
      ops: [
        putOp(Credentials, "kmi-root", create(CredentialRecordSchema, { name: "kmi-root", privateKey: seal(master, new Uint8Array(pkcs8), "kdc/credential/kmi-root") })),
        putOp(Tokens, token.tokenId, create(TokenRecordSchema, { tokenId: token.tokenId, secretSha256: token.secretSha256 })),
      ],
    });
    const dump = await cluster.etcdctl(["get", "--prefix", "t/secrets/", "-w", "json"]);
    expect(dump.code, dump.stderr).toBe(0);
    const kvs = (JSON.parse(dump.stdout) as { kvs: Array<{ key: string; value: string }> }).kvs;
    expect(kvs.map((kv) => Buffer.from(kv.key, "base64").toString())).toEqual(["t/secrets/_meta/store", "t/secrets/credentials/kmi-root", `t/secrets/tokens/${token.tokenId}`]);
    const all = Buffer.concat(kvs.map((kv) => Buffer.from(kv.value, "base64")));
    // The key's private scalar (inside its PKCS#8), the PEM text and the token secret appear nowhere.
    // From a copy of the key: a JWK export of a just-generated key can hang Node 20 (src/attest/keys.ts, p256Coordinates).
    const scalar = Buffer.from(createPrivateKey(privateKey.export({ type: "pkcs8", format: "pem" })).export({ format: "jwk" }).d!, "base64url");
    expect(scalar).toHaveLength(32);
    expect(all.includes(Buffer.from(pkcs8))).toBe(false);
    expect(all.includes(scalar)).toBe(false);
    expect(all.includes(Buffer.from("PRIVATE KEY"))).toBe(false);
    expect(all.includes(Buffer.from(pem.split("\n")[1]!))).toBe(false);
    expect(all.includes(Buffer.from(parseToken(token.bearer)!.secret))).toBe(false);
    // …and the sealed key opens again with the master key (the bytes are there, sealed).
    const back = await store.get(Credentials, "kmi-root");
    expect(Buffer.from(unseal(master, back!.privateKey!, "kdc/credential/kmi-root")).equals(Buffer.from(pkcs8))).toBe(true);
  });


  it("keeps one linear audit chain when two clients on two members append at once", async () => {
    const a = await openStore("t/audit", [cluster.endpoints[0]!]);
    const b = await openStore("t/audit", [cluster.endpoints[2]!]);
    const [one, two] = [createAuditLog(a), createAuditLog(b)];
    const written = await Promise.all(
      Array.from({ length: 30 }, (_, i) => (i % 2 === 0 ? one : two).append({ actor: "system", action: "test.append", target: `t/${i}`, outcome: "ok" })),
    );
    expect(written.map((e) => e.seq).sort((x, y) => Number(x - y))).toEqual(Array.from({ length: 30 }, (_, i) => BigInt(i + 1)));
    expect(await one.verify()).toMatchObject({ ok: true, entries: 30 });
  });
});
