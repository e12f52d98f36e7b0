import { chmodSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { IdentityStore, newMachineKey, renewalTime } from "../../../src/agent/identity.js";
import { KeyHolder } from "../../../src/agent/key-holder.js";
import { pkiLeafIssuerFactory } from "../../../src/agent/leaf-issuer.js";
import { SealedCache } from "../../../src/agent/sealed-cache.js";
import { StateDir } from "../../../src/agent/state-dir.js";
import { createNopLogger, createLogger } from "../../../src/common/logger.js";
import { AgentCacheRecordSchema } from "../../../src/gen/kmi/store/v1/agent_pb.js";
import { generateEncryptionKey } from "../../../src/attest/index.js";
import { keyIdOf } from "../../../src/keywrap/index.js";
import { issueMachineCertificate } from "../../../src/pki/issue.js";
import { exportPublicKeySpkiDer } from "../../../src/pki/keys.js";
import { certificateToPem } from "../../../src/pki/pem.js";
import { TestClock } from "../../fixtures/agent/harness.js";
import { makeInfra } from "../../fixtures/agent/infra.js";
import { intermediateSecret, makeIntermediate, makeRoot, makeSigningKey, pkcs8Of, signingSecret } from "../../fixtures/agent/tenant-ca.js";

const DAY = 86_400_000;
let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "kmi-agent-state-"));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const root = makeRoot(Date.now() - DAY);
const inter = makeIntermediate(root, "acme", 1, { now: Date.now() - DAY });
const signer = makeSigningKey("acme", "signer");

describe("StateDir", () => {
  it("creates the directory 0700 and the sealing key 0600, and reads the same key back", async () => {
    const path = join(dir, "a", "state");
    const sd = await StateDir.open(path);
    expect(statSync(path).mode & 0o777).toBe(0o700);
    const key = await sd.sealingKey();
    expect(key).toHaveLength(32);
    expect(statSync(join(path, "sealing.key")).mode & 0o777).toBe(0o600);
    expect((await (await StateDir.open(path)).sealingKey()).equals(key)).toBe(true);
  });

  it("writes files 0600 atomically, leaving no temporary file", async () => {
    const sd = await StateDir.open(join(dir, "s"));
    await sd.write("x.pb", Buffer.from("one"));
    await sd.write("x.pb", Buffer.from("two"));
    expect(readFileSync(join(dir, "s", "x.pb"), "utf8")).toBe("two");
    expect(statSync(join(dir, "s", "x.pb")).mode & 0o777).toBe(0o600);
    expect(readdirSync(join(dir, "s"))).toEqual(["x.pb"]);
    expect(await sd.read("missing.pb")).toBeUndefined();
  });

  it("refuses a directory other users can enter once it holds files, and a file others can read", async () => {
    const path = join(dir, "loose");
    mkdirSync(path, { mode: 0o755 });
    chmodSync(path, 0o755);
    writeFileSync(join(path, "identity.pb"), "x");
    await expect(StateDir.open(path)).rejects.toThrow(/mode 0755 lets other users in; chmod 700/);
    chmodSync(path, 0o700);
    chmodSync(join(path, "identity.pb"), 0o644);
    const sd = await StateDir.open(path);
    await expect(sd.read("identity.pb")).rejects.toThrow(/chmod 600/);
  });

  it("tightens an empty directory it is given", async () => {
    const path = join(dir, "empty");
    mkdirSync(path);
    chmodSync(path, 0o755);
    await StateDir.open(path);
    expect(statSync(path).mode & 0o777).toBe(0o700);
  });
});

describe("SealedCache", () => {
  it("round-trips the held secrets, sealed: no PKCS#8 in the file", async () => {
    const sd = await StateDir.open(join(dir, "s"));
    const key = await sd.sealingKey();
    const clock = new TestClock();
    const holder = new KeyHolder({ clock, createLeafIssuer: pkiLeafIssuerFactory });
    holder.replaceAll([intermediateSecret(inter, DAY, clock.now()), signingSecret(signer, DAY, clock.now())]);
    const cache = new SealedCache(sd, key, "m-0123456789abcdef", createNopLogger());
    await cache.write(holder, clock.now(), clock.now() - 5);
    const bytes = readFileSync(join(dir, "s", "cache.pb"));
    expect(bytes.includes(pkcs8Of(inter.key))).toBe(false);
    expect(bytes.includes(pkcs8Of(signer.key))).toBe(false);
    expect(bytes.includes("PRIVATE KEY")).toBe(false);
    const back = (await cache.load())!;
    expect(back.lastSync).toBe(clock.now() - 5);
    expect(back.quarantine).toBeUndefined();
    expect(back.secrets.map((s) => s.keyId).sort()).toEqual([inter.keyId, signer.keyId].sort());
    for (const s of back.secrets) expect(keyIdOf(s.privateKey!)).toBe(s.keyId);
  });

  it("keeps an expired key without its private key, and records quarantine without secrets", async () => {
    const sd = await StateDir.open(join(dir, "s"));
    const key = await sd.sealingKey();
    const clock = new TestClock();
    const holder = new KeyHolder({ clock, createLeafIssuer: pkiLeafIssuerFactory });
    holder.replaceAll([signingSecret(signer, 1000, clock.now())]);
    clock.advance(1000);
    holder.expireLeases();
    const cache = new SealedCache(sd, key, "m-0123456789abcdef", createNopLogger());
    await cache.write(holder, clock.now(), undefined);
    const back = (await cache.load())!;
    expect(back.secrets).toHaveLength(1);
    expect(back.secrets[0]!.privateKey).toBeUndefined();
    holder.quarantineMachine("compromised");
    await cache.write(holder, clock.now(), undefined);
    const record = fromBinary(AgentCacheRecordSchema, readFileSync(join(dir, "s", "cache.pb")));
    expect(record.quarantined).toBe(true);
    expect(record.secrets).toBeUndefined();
    expect((await cache.load())!.quarantine?.reason).toBe("compromised");
  });

  it("ignores a cache of another machine, under another sealing key, or tampered (with a log line)", async () => {
    const sd = await StateDir.open(join(dir, "s"));
    const key = await sd.sealingKey();
    const holder = new KeyHolder({ clock: new TestClock(), createLeafIssuer: pkiLeafIssuerFactory });
    holder.replaceAll([signingSecret(signer)]);
    await new SealedCache(sd, key, "m-0123456789abcdef", createNopLogger()).write(holder, Date.now(), undefined);
    const lines: string[] = [];
    const logger = createLogger({ write: (l) => void lines.push(l) });
    expect(await new SealedCache(sd, key, "m-ffffffffffffffff", logger).load()).toBeUndefined();
    expect(await new SealedCache(sd, Buffer.alloc(32, 1), "m-0123456789abcdef", logger).load()).toBeUndefined();
    const record = fromBinary(AgentCacheRecordSchema, readFileSync(join(dir, "s", "cache.pb")));
    record.secrets!.ciphertext[3]! ^= 1;
    await sd.write("cache.pb", toBinary(AgentCacheRecordSchema, record));
    expect(await new SealedCache(sd, key, "m-0123456789abcdef", logger).load()).toBeUndefined();
    expect(lines.map((l) => (JSON.parse(l) as { msg: string }).msg)).toEqual([
      "sealed cache ignored: it belongs to another machine",
      "sealed cache ignored: it does not open",
      "sealed cache ignored: it does not open",
    ]);
  });
});

describe("IdentityStore", () => {
  it("saves the machine key sealed and loads the same identity", async () => {
    const infra = makeInfra();
    const sd = await StateDir.open(join(dir, "s"));
    const sealing = await sd.sealingKey();
    const { privateKey, csrPem } = newMachineKey("proxy-1");
    expect(csrPem).toContain("BEGIN CERTIFICATE REQUEST");
    const certPem = certificateToPem(
      issueMachineCertificate({
        issuer: { certificateDer: infra.der, privateKey: infra.key },
        machineId: "m-0123456789abcdef",
        group: "edge",
        publicKeySpkiDer: exportPublicKeySpkiDer(privateKey),
        now: new Date(),
        validitySeconds: 3600,
      }),
    );
    const store = new IdentityStore(sd, sealing);
    const notBefore = Date.now() - 60_000;
    const encryptionKey = generateEncryptionKey();
    await store.save({
      machineId: "m-0123456789abcdef",
      group: "edge",
      privateKey,
      keyId: keyIdOf(privateKey),
      encryptionKey,
      certificatePem: certPem,
      caPem: infra.pem,
      notBefore,
      notAfter: notBefore + 3_660_000,
      enrolledAt: 1,
      renewedAt: undefined,
    });
    const file = readFileSync(join(dir, "s", "identity.pb"));
    expect(file.includes(pkcs8Of(privateKey))).toBe(false);
    expect(file.includes(pkcs8Of(encryptionKey))).toBe(false);
    expect(file.includes("PRIVATE KEY")).toBe(false);
    expect(statSync(join(dir, "s", "identity.pb")).mode & 0o777).toBe(0o600);
    const back = (await store.load())!;
    expect(back.machineId).toBe("m-0123456789abcdef");
    expect(keyIdOf(back.privateKey)).toBe(keyIdOf(privateKey));
    // The encryption key comes back as itself, a key apart from the machine key.
    expect(keyIdOf(back.encryptionKey!)).toBe(keyIdOf(encryptionKey));
    expect(keyIdOf(back.encryptionKey!)).not.toBe(keyIdOf(privateKey));
    // An identity enrolled before encryption keys existed loads without one (the legacy path).
    await store.save({ ...back, encryptionKey: undefined });
    expect((await store.load())!.encryptionKey).toBeUndefined();
    expect(renewalTime(back)).toBe(back.notBefore + ((back.notAfter - back.notBefore) * 2) / 3);
    // Another sealing key cannot open it.
    await expect(new IdentityStore(sd, Buffer.alloc(32, 7)).load()).rejects.toThrow(/sealed under master key/);
  });
});
