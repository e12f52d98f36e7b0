/**
 * Issue 17: the agent's sealing key from a provider (`--sealing-key file | systemd-creds |
 * pkcs11`). For each provider the sealed cache on disk opens only with that provider's key and
 * holds no plaintext private key. PKCS#11 runs against a real SoftHSM2 token in a token folder
 * of this test's own: the AES key is made in the token, sensitive and never extractable, and
 * the state dir holds only the sealing key encrypted by it. systemd-creds is tested where this
 * machine allows: the $CREDENTIALS_DIRECTORY path (what a unit's LoadCredentialEncrypted= gives),
 * and the clear refusal when neither it nor an encrypted credential file is there.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { agentProgram, resolveAgentConfig, type AgentConfig } from "../../../src/agent/config.js";
import { AgentServer } from "../../../src/agent/server.js";
import { SignatureAlgorithm } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { FixtureAudit } from "../../fixtures/agent/fixture-audit.js";
import { FixtureKdc } from "../../fixtures/agent/fixture-kdc.js";
import { AgentGrpcClient } from "../../fixtures/agent/grpc-client.js";
import { KeyHolder } from "../../../src/agent/key-holder.js";
import { pkiLeafIssuerFactory } from "../../../src/agent/leaf-issuer.js";
import { SealedCache } from "../../../src/agent/sealed-cache.js";
import { loadSealingKey, type SealingKeySource } from "../../../src/agent/sealing-key.js";
import { StateDir } from "../../../src/agent/state-dir.js";
import { loadConfig } from "../../../src/common/config.js";
import { Pkcs11Token } from "../../../src/common/keys/pkcs11-token.js";
import { createNopLogger } from "../../../src/common/logger.js";
import { TestClock } from "../../fixtures/agent/harness.js";
import { makeInfra, type TestInfra } from "../../fixtures/agent/infra.js";
import { intermediateSecret, makeIntermediate, makeRoot, makeSigningKey, pkcs8Of, signingSecret } from "../../fixtures/agent/tenant-ca.js";

const run = promisify(execFile);
const MODULE = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN = "kmi-agent-test";
const OTHER_TOKEN = "kmi-agent-other";
const PIN = "2718-user";
const MACHINE = "m-0123456789abcdef";
const DAY = 86_400_000;

const dir = mkdtempSync(join(tmpdir(), "kmi-sealing-key-"));
const root = makeRoot(Date.now() - DAY);
const inter = makeIntermediate(root, "acme", 1, { now: Date.now() - DAY });
const signer = makeSigningKey("acme", "signer");
const pkcs11 = (token = TOKEN): Extract<SealingKeySource, { kind: "pkcs11" }> => ({ kind: "pkcs11", module: MODULE, token, pin: PIN, keyLabel: "kmi-agent-sealing-key" });

beforeAll(async () => {
  mkdirSync(join(dir, "tokens"), { mode: 0o700 });
  writeFileSync(join(dir, "softhsm2.conf"), `directories.tokendir = ${join(dir, "tokens")}\nobjectstore.backend = file\nlog.level = ERROR\n`);
  // SoftHSM reads its config from the environment of this process, at C_Initialize.
  process.env["SOFTHSM2_CONF"] = join(dir, "softhsm2.conf");
  for (const label of [TOKEN, OTHER_TOKEN]) {
    await run("softhsm2-util", ["--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", "so-pin-31415"], { env: { ...process.env } });
  }
}, 60_000);

afterAll(() => {
  delete process.env["SOFTHSM2_CONF"];
  rmSync(dir, { recursive: true, force: true });
});

/** Writes a cache holding an intermediate and a signing key under `key`; returns the cache file's bytes. */
async function writeCache(sd: StateDir, key: Buffer): Promise<Buffer> {
  const clock = new TestClock();
  const holder = new KeyHolder({ clock, createLeafIssuer: pkiLeafIssuerFactory });
  holder.replaceAll([intermediateSecret(inter, DAY, clock.now()), signingSecret(signer, DAY, clock.now())]);
  await new SealedCache(sd, key, MACHINE, createNopLogger()).write(holder, clock.now(), clock.now());
  return readFileSync(join(sd.path, "cache.pb"));
}

/** The cache's secrets read back with `key`, or undefined when it does not open. */
async function readCache(sd: StateDir, key: Buffer): Promise<string[] | undefined> {
  const back = await new SealedCache(sd, key, MACHINE, createNopLogger()).load();
  return back?.secrets.map((s) => s.keyId).sort();
}

/** Every file of the state dir, checked 0600, as one buffer to search. */
function stateBytes(path: string): Buffer {
  const files = readdirSync(path).map((f) => join(path, f));
  for (const f of files) expect(statSync(f).mode & 0o777, f).toBe(0o600);
  return Buffer.concat(files.map((f) => readFileSync(f)));
}

function expectNoPlaintext(bytes: Buffer, sealingKey: Buffer | undefined): void {
  for (const k of [inter.key, signer.key]) expect(bytes.includes(pkcs8Of(k))).toBe(false);
  expect(bytes.includes("PRIVATE KEY")).toBe(false);
  if (sealingKey !== undefined) {
    expect(bytes.includes(sealingKey)).toBe(false);
    expect(bytes.includes(sealingKey.toString("base64"))).toBe(false);
  }
}

const held = [inter.keyId, signer.keyId].sort();

describe("--sealing-key file (the default)", () => {
  it("makes sealing.key 0600 on first start and reads it back; the cache opens with it only and holds no plaintext key", async () => {
    const sd = await StateDir.open(join(dir, "file"));
    const key = await loadSealingKey(sd, { kind: "file" });
    expect(statSync(join(sd.path, "sealing.key")).mode & 0o777).toBe(0o600);
    expect((await loadSealingKey(sd, { kind: "file" })).equals(key)).toBe(true);
    expectNoPlaintext(await writeCache(sd, key), undefined);
    expect(await readCache(sd, key)).toEqual(held);
    expect(await readCache(sd, randomBytes(32))).toBeUndefined();
  });
});

describe("--sealing-key pkcs11 (SoftHSM2)", () => {
  it("makes a non-extractable AES key in the token and keeps only the sealing key it encrypted; the cache opens with it only", async () => {
    const sd = await StateDir.open(join(dir, "p11"));
    const key = await loadSealingKey(sd, pkcs11());
    expect(key.length).toBe(32);
    // The token made and keeps the AES key: sensitive, never extractable, its value refused.
    const token = Pkcs11Token.open({ module: MODULE, token: TOKEN, pin: PIN });
    try {
      expect(token.aesKeyProtection("kmi-agent-sealing-key")).toEqual({ sensitive: true, extractable: false, alwaysSensitive: true, neverExtractable: true });
      expect(token.tryReadAesKeyValue("kmi-agent-sealing-key")).toMatch(/CKR_ATTRIBUTE_SENSITIVE/);
    } finally {
      token.close();
    }
    // On disk: sealing.key.p11 (the key encrypted in the token), no sealing.key.
    expect(readdirSync(sd.path).sort()).toEqual(["sealing.key.p11"]);
    const cache = await writeCache(sd, key);
    expectNoPlaintext(Buffer.concat([cache, stateBytes(sd.path)]), key);
    // The next start gets the same key back from the token, and the cache opens with it.
    const again = await loadSealingKey(sd, pkcs11());
    expect(again.equals(key)).toBe(true);
    expect(await readCache(sd, again)).toEqual(held);
    expect(await readCache(sd, randomBytes(32))).toBeUndefined();
  });

  it("refuses another token (no key of that label), a token whose key of that label is another key, and a wrong PIN", async () => {
    const sd = await StateDir.open(join(dir, "p11"));
    await expect(loadSealingKey(sd, pkcs11(OTHER_TOKEN))).rejects.toThrow(/pkcs11 token "kmi-agent-other": no AES key labelled kmi-agent-sealing-key, which sealed .*sealing\.key\.p11/);
    const other = Pkcs11Token.open({ module: MODULE, token: OTHER_TOKEN, pin: PIN });
    try {
      other.generateAesKey("kmi-agent-sealing-key");
    } finally {
      other.close();
    }
    await expect(loadSealingKey(sd, pkcs11(OTHER_TOKEN))).rejects.toThrow(/key kmi-agent-sealing-key does not open this ciphertext/);
    await expect(loadSealingKey(sd, { ...pkcs11(), pin: "0000" })).rejects.toThrow(/login refused .*check the PIN file/);
  });

  it("refuses a state dir sealed under another provider instead of making a new key", async () => {
    const fileDir = await StateDir.open(join(dir, "file"));
    await expect(loadSealingKey(fileDir, pkcs11())).rejects.toThrow(/--sealing-key pkcs11: state dir .* is sealed with --sealing-key file \(sealing\.key\)/);
    const p11Dir = await StateDir.open(join(dir, "p11"));
    await expect(loadSealingKey(p11Dir, { kind: "file" })).rejects.toThrow(/--sealing-key file: state dir .* is sealed with --sealing-key pkcs11 \(sealing\.key\.p11\)/);
    expect(readdirSync(p11Dir.path)).not.toContain("sealing.key");
  });
});

describe("--sealing-key systemd-creds", () => {
  it("reads the credential systemd put in $CREDENTIALS_DIRECTORY (base64 or raw); nothing is written to the state dir; the cache opens with it only", async () => {
    const creds = join(dir, "credentials");
    mkdirSync(creds, { mode: 0o700 });
    const key = randomBytes(32);
    writeFileSync(join(creds, "kmi-agent-sealing-key"), key.toString("base64") + "\n", { mode: 0o400 });
    const sd = await StateDir.open(join(dir, "creds"));
    const source: SealingKeySource = { kind: "systemd-creds", credential: "kmi-agent-sealing-key", credentialsDirectory: creds };
    expect((await loadSealingKey(sd, source)).equals(key)).toBe(true);
    expect(readdirSync(sd.path)).toEqual([]);
    expectNoPlaintext(Buffer.concat([await writeCache(sd, key), stateBytes(sd.path)]), key);
    expect(await readCache(sd, await loadSealingKey(sd, source))).toEqual(held);
    expect(await readCache(sd, randomBytes(32))).toBeUndefined();
    writeFileSync(join(creds, "raw"), key, { mode: 0o400 });
    expect((await loadSealingKey(sd, { ...source, credential: "raw" })).equals(key)).toBe(true);
  });

  it.each<[string, (creds: string) => void, RegExp]>([
    ["a missing credential", () => {}, /systemd credential kmi-agent-sealing-key: .* does not exist; name the credential/],
    ["a credential others can read", (c) => writeFileSync(join(c, "kmi-agent-sealing-key"), randomBytes(32).toString("base64"), { mode: 0o644 }), /has mode 644, readable by others/],
    ["a credential that is not a 32-byte key", (c) => writeFileSync(join(c, "kmi-agent-sealing-key"), "c2hvcnQ=", { mode: 0o400 }), /decodes to 5 bytes/],
  ])("refuses %s, naming it", async (_name, setup, message) => {
    const creds = mkdtempSync(join(dir, "creds-bad-"));
    chmodSync(creds, 0o700);
    setup(creds);
    const sd = await StateDir.open(mkdtempSync(join(dir, "state-bad-")));
    await expect(loadSealingKey(sd, { kind: "systemd-creds", credential: "kmi-agent-sealing-key", credentialsDirectory: creds })).rejects.toThrow(message);
  });

  it("without $CREDENTIALS_DIRECTORY and without sealing.key.cred, says how to provide the credential", async () => {
    const sd = await StateDir.open(join(dir, "creds-none"));
    await expect(loadSealingKey(sd, { kind: "systemd-creds", credential: "kmi-agent-sealing-key", credentialsDirectory: undefined })).rejects.toThrow(
      /\$CREDENTIALS_DIRECTORY is not set and .*sealing\.key\.cred does not exist; start the agent from a systemd unit with LoadCredentialEncrypted=kmi-agent-sealing-key:<file>, or make the file with `openssl rand -base64 32 \| systemd-creds encrypt/,
    );
  });

  it("outside a unit, decrypts sealing.key.cred with `systemd-creds decrypt` and names the command's error", async () => {
    const sd = await StateDir.open(join(dir, "creds-file"));
    writeFileSync(join(sd.path, "sealing.key.cred"), "not a credential", { mode: 0o600 });
    const key = randomBytes(32);
    const calls: string[][] = [];
    const source: SealingKeySource = { kind: "systemd-creds", credential: "kmi-agent-sealing-key", credentialsDirectory: undefined };
    const got = await loadSealingKey(sd, source, async (file, args) => {
      calls.push([file, ...args]);
      return { stdout: Buffer.from(key.toString("base64")) };
    });
    expect(got.equals(key)).toBe(true);
    expect(calls).toEqual([["systemd-creds", "decrypt", "--name=kmi-agent-sealing-key", join(sd.path, "sealing.key.cred"), "-"]]);
    // The real command on this machine (systemd 250+; a machine without systemd has none), on a
    // file that is no credential: its error, named.
    await expect(loadSealingKey(sd, source)).rejects.toThrow(/`systemd-creds decrypt` of .*sealing\.key\.cred failed \(|the systemd-creds command is not installed/);
    const missing = Object.assign(new Error("spawn systemd-creds ENOENT"), { code: "ENOENT" });
    await expect(loadSealingKey(sd, source, () => Promise.reject(missing))).rejects.toThrow(/the systemd-creds command is not installed \(systemd 250 or later\); use --sealing-key file or pkcs11/);
  });
});

describe("kmi agent's flags", () => {
  const base = ["--audit-url", "https://a:1", "--kdc-url", "https://k:1", "--ca-file", ""];
  let caFile: string;
  beforeAll(async () => {
    caFile = join(dir, "ca.pem");
    writeFileSync(caFile, (await makeInfra()).pem);
    base[base.length - 1] = caFile;
    writeFileSync(join(dir, "pin"), PIN + "\n", { mode: 0o600 });
  });
  const resolve = async (argv: string[], env: NodeJS.ProcessEnv = {}) => (await resolveAgentConfig(await loadConfig(agentProgram, [...base, ...argv], { env }), env)).sealingKey;

  it("file by default; systemd-creds takes $CREDENTIALS_DIRECTORY; pkcs11 reads its PIN file", async () => {
    expect(await resolve([])).toEqual({ kind: "file" });
    expect(await resolve(["--sealing-key", "systemd-creds"], { CREDENTIALS_DIRECTORY: "/run/credentials/kmi-agent.service" })).toEqual({
      kind: "systemd-creds",
      credential: "kmi-agent-sealing-key",
      credentialsDirectory: "/run/credentials/kmi-agent.service",
    });
    const p11 = ["--sealing-key", "pkcs11", "--pkcs11-module", MODULE, "--pkcs11-token", TOKEN, "--pkcs11-pin-file", join(dir, "pin")];
    expect(await resolve(p11)).toEqual(pkcs11());
  });

  it.each<[string, string[], RegExp]>([
    ["an unknown provider", ["--sealing-key", "tpm"], /--sealing-key/],
    ["pkcs11 without its token", ["--sealing-key", "pkcs11", "--pkcs11-module", MODULE, "--pkcs11-pin-file", "/x"], /--pkcs11-token: required with --sealing-key pkcs11/],
    ["a pkcs11 flag without pkcs11", ["--pkcs11-module", MODULE], /--pkcs11-module: only used with --sealing-key pkcs11/],
    ["an unreadable PIN file", ["--sealing-key", "pkcs11", "--pkcs11-module", MODULE, "--pkcs11-token", TOKEN, "--pkcs11-pin-file", "/nonexistent/pin"], /--pkcs11-pin-file \/nonexistent\/pin: cannot read \(ENOENT\)/],
  ])("refuses %s", async (_name, argv, message) => {
    await expect(resolve(argv)).rejects.toThrow(message);
  });
});

describe("a real agent with --sealing-key pkcs11 (fixture KDC and Auditserver)", () => {
  let infra: TestInfra;
  let audit: FixtureAudit;
  let kdc: FixtureKdc;
  const stateDir = join(dir, "agent-state");
  const source = { ...pkcs11(), keyLabel: "kmi-agent-e2e" };
  const config = (sealingKey: SealingKeySource): AgentConfig => ({
    socketPath: join(dir, "agent.sock"),
    socketGroup: undefined,
    stateDir,
    sealingKey,
    auditUrls: [audit.url],
    kdcUrls: [kdc.url],
    caPem: infra.pem,
    joinToken: "kmij_p11",
    hostname: "proxy-p11",
    measurements: { files: {}, softwareVersion: true },
    policy: { maxLifetimeMs: 47 * DAY, backdateMs: 3_600_000 },
    timing: { reconnectInitialMs: 100, reconnectMaxMs: 400, heartbeatTimeoutMs: 5_000 },
    shutdownTimeoutMs: 500,
    metricsListen: undefined,
    logLevel: "error",
  });
  const signHello = async (agent: AgentServer) => {
    const client = new AgentGrpcClient((await agent.start()).unix!);
    try {
      const deadline = Date.now() + 10_000;
      for (;;) {
        const r = await client.unary("sign", { keyId: "acme/signer", message: Buffer.from("hello"), algorithm: SignatureAlgorithm.ECDSA_SHA256 }).catch(() => undefined);
        if (r !== undefined) return r.signature;
        if (Date.now() > deadline) throw new Error("the agent did not sign within 10 s");
        await new Promise((res) => setTimeout(res, 50));
      }
    } finally {
      client.close();
    }
  };

  beforeAll(async () => {
    infra = makeInfra();
    audit = new FixtureAudit(infra);
    audit.joinTokens.set("kmij_p11", "edge");
    await audit.start();
    kdc = new FixtureKdc(infra, audit.tokenKey.publicKey, { heartbeatMs: 1000 });
    await kdc.start();
    kdc.tenants.set("acme", [intermediateSecret(inter), signingSecret(signer)]);
  });
  afterAll(async () => {
    await kdc?.stop();
    await audit?.stop();
  });

  it("enrolls and signs; the state dir holds the token-encrypted sealing key and no plaintext key; a restart opens its identity through the token; another token is refused", async () => {
    const agent = AgentServer.create(config(source), { logger: createNopLogger() });
    let identity;
    try {
      expect((await signHello(agent)).length).toBeGreaterThan(0);
      identity = agent.machine!;
    } finally {
      await agent.destroy();
    }
    expect(readdirSync(stateDir).sort()).toEqual(["cache.pb", "identity.pb", "sealing.key.p11"]);
    const bytes = stateBytes(stateDir);
    expectNoPlaintext(bytes, undefined);
    for (const k of [identity.privateKey, identity.encryptionKey!]) expect(bytes.includes(pkcs8Of(k))).toBe(false);

    const again = AgentServer.create(config(source), { logger: createNopLogger() });
    try {
      expect((await signHello(again)).length).toBeGreaterThan(0);
      expect(again.machine!.machineId).toBe(identity.machineId);
    } finally {
      await again.destroy();
    }
    const other = AgentServer.create(config({ ...source, token: OTHER_TOKEN }), { logger: createNopLogger() });
    await expect(other.start()).rejects.toThrow(/pkcs11 token "kmi-agent-other": no AES key labelled kmi-agent-e2e/);
    await other.destroy();
  });
});
