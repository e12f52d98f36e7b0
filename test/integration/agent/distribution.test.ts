/**
 * The agent against the fixture Auditserver and the fixture DistributionService over mutual
 * TLS (test/fixtures/agent): enrollment, attestation, wrapped secrets, push events, the
 * sealed cache, restart from the cache with the KDC down, resync, lease expiry, quarantine.
 * The agent runs in-process (AgentServer) and is called over its real Unix socket.
 */
import { execFileSync } from "node:child_process";
import { cpSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { createPeerClient } from "../../../src/agent/client.js";
import { privateKeyPem } from "../../../src/agent/identity.js";
import { createAttestRequest } from "../../../src/attest/index.js";
import { AuditService } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { DistributionService, FetchSecretsResponseSchema } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { keyIdOf, unwrapKey } from "../../../src/keywrap/index.js";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { AgentConfig } from "../../../src/agent/config.js";
import { AgentServer } from "../../../src/agent/server.js";
import { createLogger } from "../../../src/common/logger.js";
import { AttestationState, KeyEventType, SignatureAlgorithm, type WatchKeysResponse } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { AgentCacheRecordSchema } from "../../../src/gen/kmi/store/v1/agent_pb.js";
import { FixtureAudit } from "../../fixtures/agent/fixture-audit.js";
import { FixtureKdc } from "../../fixtures/agent/fixture-kdc.js";
import { AgentGrpcClient, failure } from "../../fixtures/agent/grpc-client.js";
import { makeInfra, type TestInfra } from "../../fixtures/agent/infra.js";
import {
  intermediateSecret,
  makeIntermediate,
  makeRoot,
  makeSigningKey,
  pkcs8Of,
  signingSecret,
  type TestIntermediate,
  type TestRoot,
  type TestSigningKey,
} from "../../fixtures/agent/tenant-ca.js";
import { TestClock } from "../../fixtures/agent/harness.js";
import { generateKeyPairSync, verify } from "node:crypto";

const DAY = 86_400_000;
let dir: string;
let infra: TestInfra;
let audit: FixtureAudit;
let kdc: FixtureKdc;
let root: TestRoot;
let v1: TestIntermediate;
let v2: TestIntermediate;
let signer: TestSigningKey;
let agent: AgentServer | undefined;
let client: AgentGrpcClient | undefined;
const logLines: string[] = [];

function config(overrides: Partial<AgentConfig> = {}): AgentConfig {
  return {
    socketPath: join(dir, "agent.sock"),
    socketGroup: undefined,
    stateDir: join(dir, "state"),
    sealingKey: { kind: "file" },
    auditUrls: [audit.url],
    kdcUrls: [kdc.url],
    caPem: infra.pem,
    joinToken: "kmij_first_start",
    hostname: "proxy-1",
    measurements: { files: { "agent.config": [join(dir, "agent.json")] }, softwareVersion: true },
    policy: { maxLifetimeMs: 47 * DAY, backdateMs: 3_600_000 },
    timing: { reconnectInitialMs: 100, reconnectMaxMs: 400, heartbeatTimeoutMs: 5_000 },
    shutdownTimeoutMs: 500,
    metricsListen: undefined,
    logLevel: "debug",
    ...overrides,
  };
}

async function startAgent(overrides: Partial<AgentConfig> = {}, clock?: TestClock): Promise<void> {
  const logger = createLogger({ level: "debug", write: (l) => void logLines.push(l) });
  agent = AgentServer.create(config(overrides), clock === undefined ? { logger } : { logger, clock });
  const bound = await agent.start();
  client = new AgentGrpcClient(bound.unix!);
}

async function stopAgent(): Promise<void> {
  client?.close();
  client = undefined;
  await agent?.destroy();
  agent = undefined;
}

async function waitFor<T>(what: string, fn: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 5000): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const leafKey = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
const leafSpki = new Uint8Array(leafKey.publicKey.export({ format: "der", type: "spki" }));
const issue = () => client!.unary("issueLeafCertificate", { tenantId: "acme", publicKey: leafSpki, dnsNames: ["shop.example.org"] });
const sign = () => client!.unary("sign", { keyId: "acme/signer", message: Buffer.from("hello"), algorithm: SignatureAlgorithm.ECDSA_SHA256 });

/** Every file under the state dir, with its bytes. */
function stateFiles(stateDir: string): { path: string; data: Buffer; mode: number }[] {
  return readdirSync(stateDir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => {
      const path = join(e.parentPath, e.name);
      return { path, data: readFileSync(path), mode: statSync(path).mode & 0o777 };
    });
}

function expectNoPlaintextKeys(stateDir: string, keys: Buffer[]): void {
  const files = stateFiles(stateDir);
  expect(files.map((f) => f.path.split("/").pop()).sort()).toEqual(["cache.pb", "identity.pb", "sealing.key"]);
  for (const f of files) {
    expect(f.mode, f.path).toBe(0o600);
    expect(f.data.includes("PRIVATE KEY"), f.path).toBe(false);
    for (const k of keys) expect(f.data.includes(k), f.path).toBe(false);
    // Nor a recognizable piece of one: the 32-byte EC scalar inside each PKCS#8.
    for (const k of keys) if (k.length < 200) expect(f.data.includes(k.subarray(k.length - 100, k.length - 68)), f.path).toBe(false);
  }
  expect(statSync(stateDir).mode & 0o777).toBe(0o700);
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "kmi-agent-dist-"));
  writeFileSync(join(dir, "agent.json"), '{"log-level":"info"}\n');
  infra = makeInfra();
  audit = new FixtureAudit(infra);
  audit.joinTokens.set("kmij_first_start", "edge");
  await audit.start();
  kdc = new FixtureKdc(infra, audit.tokenKey.publicKey, { heartbeatMs: 1000 });
  await kdc.start();
  const past = Date.now() - DAY;
  root = makeRoot(past);
  v1 = makeIntermediate(root, "acme", 1, { now: past });
  v2 = makeIntermediate(root, "acme", 2, { now: past });
  signer = makeSigningKey("acme", "signer");
  kdc.tenants.set("acme", [intermediateSecret(v1), signingSecret(signer)]);
  writeFileSync(join(dir, "root.pem"), root.pem);
});

afterAll(async () => {
  await stopAgent();
  await kdc?.stop();
  await audit?.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe("the agent with the fixture KDC and Auditserver", () => {
  it("enrolls, attests, receives its secrets wrapped and unwraps them", async () => {
    await startAgent();
    const machineId = agent!.machine!.machineId;
    expect(machineId).toMatch(/^m-[0-9a-f]{16}$/);
    expect(audit.joinTokens.size).toBe(0); // the join token was used once
    await waitFor("the first sync", async () => (await client!.unary("getStatus", {})).kdcConnected);
    // Attestation carried the configured measurement and the software version.
    expect(audit.attested[0]!.measurements.map((m) => m.name)).toEqual(["agent.config", "software.version"]);
    expect(kdc.calls.fetch).toBe(1);
    expect(kdc.calls.watch).toBe(1);

    const res = await issue();
    expect(res.issuerKeyId).toBe(v1.keyId);
    writeFileSync(join(dir, "leaf.pem"), res.certificatePem);
    writeFileSync(join(dir, "chain.pem"), res.chainPem);
    expect(execFileSync("openssl", ["verify", "-CAfile", join(dir, "root.pem"), "-untrusted", join(dir, "chain.pem"), join(dir, "leaf.pem")]).toString()).toContain(": OK");
    const sig = await sign();
    expect(verify("sha256", Buffer.from("hello"), { key: signer.publicKey, dsaEncoding: "der" }, sig.signature)).toBe(true);

    // On the wire each secret is wrapped to this machine: fetch as the machine would, and look.
    const id = agent!.machine!;
    const tls = { caPem: infra.pem, certPem: id.certificatePem, keyPem: privateKeyPem(id) };
    const auditClient = createPeerClient(AuditService, audit.url, tls);
    const kdcClient = createPeerClient(DistributionService, kdc.url, tls);
    try {
      const { nonce } = await auditClient.client.getAttestationNonce({});
      const measurements = [{ name: "agent.config", sha256: audit.attested[0]!.measurements[0]!.sha256 }];
      const { attestationToken } = await auditClient.client.attest(
        createAttestRequest({ machineId, nonce, measurements, softwareVersion: "test", time: new Date() }, id.privateKey),
      );
      const fetched = await kdcClient.client.fetchSecrets({ attestationToken });
      const wire = Buffer.from(toBinary(FetchSecretsResponseSchema, fetched));
      for (const k of [v1.key, signer.key]) expect(wire.includes(pkcs8Of(k))).toBe(false);
      expect(wire.includes("PRIVATE KEY")).toBe(false);
      const inter = fetched.secrets.find((x) => x.keyId === v1.keyId)!;
      expect(inter.wrappedKey!.aad).toBe(`${machineId}|acme|${v1.keyId}|1`);
      // Wrapped to the machine's encryption key, not to its mutual-TLS/evidence key: one key, one purpose.
      expect(id.encryptionKey).toBeDefined();
      expect(keyIdOf(id.encryptionKey!)).not.toBe(keyIdOf(id.privateKey));
      expect(inter.wrappedKey!.recipientKeyId).toBe(keyIdOf(id.encryptionKey!));
      expect(pkcs8Of(unwrapKey(inter.wrappedKey!, id.encryptionKey!, { expectedAad: inter.wrappedKey!.aad })).equals(pkcs8Of(v1.key))).toBe(true);
      expect(() => unwrapKey(inter.wrappedKey!, id.privateKey, { expectedAad: inter.wrappedKey!.aad })).toThrow(/wrapped_key: does not open/);
    } finally {
      auditClient.close();
      kdcClient.close();
    }

    // The agent reported what it holds.
    const reports = await waitFor("a held-versions report", () => kdc.reports.get(machineId));
    expect(reports.at(-1)!.map((h) => [h.keyId, h.version]).sort()).toEqual([[signer.keyId, 0], [v1.keyId, 1]].sort());
    const st = await client!.unary("getStatus", {});
    expect(st.machineId).toBe(machineId);
    expect(st.attestation).toBe(AttestationState.ATTESTED);
    expect(st.servingFromCache).toBe(false);
  });

  it("a pushed ACTIVATED event swaps the intermediate within 2 s and WatchKeys emits ROTATED", async () => {
    const events: WatchKeysResponse[] = [];
    const call = client!.watchKeys("acme", (ev) => events.push(ev));
    await waitFor("the snapshot", () => events.length >= 1);
    expect(events[0]!.type).toBe(KeyEventType.SNAPSHOT);
    const t0 = Date.now();
    kdc.activate("acme", [intermediateSecret(v2), signingSecret(signer)]);
    const rotated = await waitFor("ROTATED", () => events.find((e) => e.type === KeyEventType.ROTATED), 2000);
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(rotated.keys[0]!.keyId).toBe(v2.keyId);
    expect(rotated.keys[0]!.version).toBe(2);
    call.cancel();
    const res = await issue();
    expect(res.intermediateVersion).toBe(2);
    expect(res.issuerKeyId).toBe(v2.keyId);
    const machineId = agent!.machine!.machineId;
    await waitFor("the rollout report", () => kdc.reports.get(machineId)!.at(-1)!.some((h) => h.version === 2));
  });

  it("the sealed cache and the state dir hold no private key in plaintext", async () => {
    const machineKey = pkcs8Of(agent!.machine!.privateKey);
    const cache = fromBinary(AgentCacheRecordSchema, readFileSync(join(dir, "state", "cache.pb")));
    expect(cache.secrets?.ciphertext.length).toBeGreaterThan(0);
    expect(cache.quarantined).toBe(false);
    expectNoPlaintextKeys(join(dir, "state"), [pkcs8Of(v1.key), pkcs8Of(v2.key), pkcs8Of(signer.key), machineKey]);
  });

  it("restarted with the KDC stopped, the agent signs again from the sealed cache", async () => {
    await stopAgent();
    await kdc.stop();
    await startAgent({ joinToken: undefined });
    const st = await client!.unary("getStatus", {});
    expect(st.servingFromCache).toBe(true);
    expect(st.kdcConnected).toBe(false);
    expect((await issue()).issuerKeyId).toBe(v2.keyId);
    expect((await sign()).keyId).toBe(signer.keyId);
  });

  it("with the lease run out (KDC still down) it refuses with UNAVAILABLE and a clear message", async () => {
    // A copy of the state dir, run with a clock two days ahead (the leases are one day).
    cpSync(join(dir, "state"), join(dir, "state-later"), { recursive: true });
    const first = { agent, client };
    agent = undefined;
    client = undefined;
    await startAgent({ joinToken: undefined, stateDir: join(dir, "state-later"), socketPath: join(dir, "later.sock") }, new TestClock(Date.now() + 2 * DAY));
    try {
      const f = await failure(sign());
      expect(f.code).toBe(grpc.status.UNAVAILABLE);
      expect(f.details).toMatch(/^key [0-9a-f]{64} of tenant "acme": lease ran out at .* and the KDC is unreachable( \(.*\))?; the agent serves it again once it resyncs with the KDC$/);
      expect((await failure(issue())).code).toBe(grpc.status.UNAVAILABLE);
    } finally {
      await stopAgent();
      agent = first.agent;
      client = first.client;
    }
  });

  it("when the KDC comes back, the agent resyncs by itself", async () => {
    kdc = Object.assign(new FixtureKdc(infra, audit.tokenKey.publicKey, { heartbeatMs: 1000, port: kdc.port }), { tenants: kdc.tenants });
    await kdc.start();
    await waitFor("the resync", async () => {
      const st = await client!.unary("getStatus", {});
      return st.kdcConnected && !st.servingFromCache;
    }, 8000);
    expect(kdc.calls.fetch).toBe(1);
    expect((await issue()).issuerKeyId).toBe(v2.keyId);
  });

  it("a QUARANTINED event makes signing fail with FAILED_PRECONDITION within 2 s, and the cache then holds no key", async () => {
    const machineId = agent!.machine!.machineId;
    const t0 = Date.now();
    kdc.quarantine(machineId, "operator: suspected compromise");
    const f = await waitFor("the refusal", async () => {
      try {
        await sign();
        return undefined;
      } catch (err) {
        return err as grpc.ServiceError;
      }
    }, 2000);
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(f.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(f.details).toMatch(/^machine quarantined: operator: suspected compromise; /);
    expect((await failure(issue())).code).toBe(grpc.status.FAILED_PRECONDITION);
    // Memory first, then disk: within the same 2 s the cache holds no secret, only the flag.
    const cache = await waitFor("the cache rewrite", () => {
      const c = fromBinary(AgentCacheRecordSchema, readFileSync(join(dir, "state", "cache.pb")));
      return c.quarantined ? c : undefined;
    }, Math.max(1, 2000 - (Date.now() - t0)));
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(cache.quarantineReason).toBe("operator: suspected compromise");
    expect(cache.secrets).toBeUndefined();
    expectNoPlaintextKeys(join(dir, "state"), [pkcs8Of(v1.key), pkcs8Of(v2.key), pkcs8Of(signer.key)]);
    expect((await client!.unary("listKeys", {})).keys).toHaveLength(0);
  });

  it("restarted while quarantined it still refuses (the flag is in the cache)", async () => {
    await stopAgent();
    await startAgent({ joinToken: undefined });
    const f = await failure(sign());
    expect(f.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(f.details).toMatch(/^machine quarantined: /);
  });
});
