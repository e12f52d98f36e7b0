/**
 * The KDC link's life over time, against the fixture Auditserver and KDC: the watch reopened
 * with a fresh token before the token expires, a silent stream treated as dead, REVOKED
 * dropping a key from memory and cache, a STAGED version held, reported and activated, a KDC that refuses the machine as quarantined,
 * attestation refused, and the machine certificate renewed at 2/3 of its life.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fromBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { AgentConfig } from "../../../src/agent/config.js";
import { AgentServer } from "../../../src/agent/server.js";
import { createLogger } from "../../../src/common/logger.js";
import { AttestationState, SignatureAlgorithm } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { AgentCacheRecordSchema, AgentIdentityRecordSchema } from "../../../src/gen/kmi/store/v1/agent_pb.js";
import { FixtureAudit, type FixtureAuditOptions } from "../../fixtures/agent/fixture-audit.js";
import { FixtureKdc, type FixtureKdcOptions } from "../../fixtures/agent/fixture-kdc.js";
import { AgentGrpcClient, failure } from "../../fixtures/agent/grpc-client.js";
import { makeInfra, type TestInfra } from "../../fixtures/agent/infra.js";
import { intermediateSecret, makeIntermediate, makeRoot, makeSigningKey, pkcs8Of, signingSecret, type TestIntermediate, type TestSigningKey } from "../../fixtures/agent/tenant-ca.js";

const DAY = 86_400_000;
let dir: string;
let infra: TestInfra;
let inter: TestIntermediate;
let signer: TestSigningKey;
let n = 0;
const running: { agent: AgentServer; client: AgentGrpcClient; kdc: FixtureKdc; audit: FixtureAudit }[] = [];

async function setup(options: { audit?: FixtureAuditOptions; kdc?: FixtureKdcOptions; agent?: Partial<AgentConfig> } = {}) {
  const i = ++n;
  const audit = new FixtureAudit(infra, options.audit);
  audit.joinTokens.set(`kmij_${i}`, "edge");
  await audit.start();
  const kdc = new FixtureKdc(infra, audit.tokenKey.publicKey, { heartbeatMs: 1000, ...options.kdc });
  kdc.tenants.set("acme", [intermediateSecret(inter), signingSecret(signer)]);
  await kdc.start();
  const lines: Record<string, unknown>[] = [];
  const logger = createLogger({ level: "debug", write: (l) => void lines.push(JSON.parse(l) as Record<string, unknown>) });
  const config: AgentConfig = {
    socketPath: join(dir, `a${i}.sock`),
    socketGroup: undefined,
    stateDir: join(dir, `state${i}`),
    sealingKey: { kind: "file" },
    auditUrls: [audit.url],
    kdcUrls: [kdc.url],
    caPem: infra.pem,
    joinToken: `kmij_${i}`,
    hostname: `proxy-${i}`,
    measurements: { files: { "agent.config": [join(dir, "agent.json")] }, softwareVersion: true },
    policy: { maxLifetimeMs: 47 * DAY, backdateMs: 3_600_000 },
    timing: { reconnectInitialMs: 100, reconnectMaxMs: 300, heartbeatTimeoutMs: 5_000 },
    shutdownTimeoutMs: 300,
    metricsListen: undefined,
    logLevel: "debug",
    ...options.agent,
  };
  const agent = AgentServer.create(config, { logger });
  const bound = await agent.start();
  const client = new AgentGrpcClient(bound.unix!);
  const r = { agent, client, kdc, audit, lines, config };
  running.push(r);
  return r;
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

const sign = (c: AgentGrpcClient, keyId = "acme/signer") => c.unary("sign", { keyId, message: Buffer.from("m"), algorithm: SignatureAlgorithm.ECDSA_SHA256 });

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "kmi-agent-link-"));
  writeFileSync(join(dir, "agent.json"), "{}\n");
  infra = makeInfra();
  const root = makeRoot(Date.now() - DAY);
  inter = makeIntermediate(root, "acme", 1, { now: Date.now() - DAY });
  signer = makeSigningKey("acme", "signer");
});

afterEach(async () => {
  for (const r of running.splice(0)) {
    r.client.close();
    await r.agent.destroy();
    await r.kdc.stop();
    await r.audit.stop();
  }
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("the KDC link", () => {
  it("reopens the watch with a fresh token before the token expires, without refetching or dropping keys", async () => {
    const r = await setup({ audit: { tokenMs: 3000 } });
    await waitFor("the first watch", () => r.kdc.calls.watch >= 1);
    // Tokens live 3 s: the agent attests again at 2/3 (2 s) and opens a new stream.
    await waitFor("a reopened watch", () => r.kdc.calls.watch >= 2 && r.audit.attested.length >= 2, 4000);
    expect(r.kdc.calls.fetch).toBe(1);
    expect(r.kdc.calls.refused).toBe(0);
    expect((await sign(r.client)).keyId).toBe(signer.keyId);
    expect((await r.client.unary("getStatus", {})).attestation).toBe(AttestationState.ATTESTED);
  });

  it("treats a silent stream as dead and reconnects (fetching again)", async () => {
    const r = await setup({ kdc: { heartbeatMs: 60_000 }, agent: { timing: { reconnectInitialMs: 50, reconnectMaxMs: 100, heartbeatTimeoutMs: 600 } } });
    await waitFor("the first watch", () => r.kdc.calls.watch >= 1);
    await waitFor("a reconnect after silence", () => r.kdc.calls.watch >= 2 && r.kdc.calls.fetch >= 2, 4000);
    expect(r.lines.some((l) => l["msg"] === "kdc link down; retrying")).toBe(true);
  });

  it("a REVOKED event drops the key from memory and from the sealed cache at once", async () => {
    const r = await setup();
    await waitFor("the sync", async () => (await r.client.unary("getStatus", {})).kdcConnected);
    r.kdc.revoke("acme", signer.keyId, "signing key retired");
    const f = await waitFor("the refusal", async () => {
      try {
        await sign(r.client);
        return undefined;
      } catch (err) {
        return err as grpc.ServiceError;
      }
    }, 2000);
    expect(f.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(f.details).toBe("key_id: key acme/signer was revoked (signing key retired)");
    expect((await failure(sign(r.client, signer.keyId))).details).toBe(`key_id: key ${signer.keyId} was revoked (signing key retired)`);
    const cache = readFileSync(join(r.config.stateDir, "cache.pb"));
    expect(cache.includes(pkcs8Of(signer.key))).toBe(false);
    // The cache still holds the intermediate (sealed) and no longer the signing key: reload it.
    await r.agent.destroy();
    await r.kdc.stop();
    const again = AgentServer.create({ ...r.config, joinToken: undefined, socketPath: join(dir, "again.sock") }, { logger: createLogger({ write: () => undefined }) });
    await again.start();
    try {
      expect(again.holder.keys().map((k) => k.keyId)).toEqual([inter.keyId]);
    } finally {
      await again.destroy();
    }
  });

  it("a STAGED version is held and reported but signs nothing; the sealed cache keeps it; ACTIVATED makes it active", async () => {
    const r = await setup();
    await waitFor("the sync", async () => (await r.client.unary("getStatus", {})).kdcConnected);
    const machineId = r.agent.machine!.machineId;
    const next = makeIntermediate(makeRoot(Date.now() - DAY), "acme", 2, { now: Date.now() - DAY });
    r.kdc.stage("acme", intermediateSecret(next));
    const report = await waitFor("a report naming the staged version", () => r.kdc.reports.get(machineId)?.find((held) => held.some((h) => h.version === 2)));
    expect(report.map((h) => [h.tenantId, h.keyId, h.version]).sort()).toEqual(
      [["acme", inter.keyId, 1], ["acme", next.keyId, 2], ["acme", signer.keyId, 0]].sort(),
    );
    // Signing stays with the active version; the staged one is not a listed key.
    expect(r.agent.holder.intermediateFor("acme").keyId).toBe(inter.keyId);
    expect(r.agent.holder.keys("acme").map((k) => k.keyId)).not.toContain(next.keyId);
    expect(r.lines.some((l) => l["msg"] === "kdc: unknown watch event ignored")).toBe(false);
    r.kdc.activate("acme", [intermediateSecret(next), signingSecret(signer)]);
    await waitFor("the activation", () => r.agent.holder.intermediateFor("acme").keyId === next.keyId);
    expect(r.agent.holder.stagedKeys()).toEqual([]);
    // The sealed cache keeps a staged version (sealed): restarted with the KDC down, the agent holds it still.
    const third = makeIntermediate(makeRoot(Date.now() - DAY), "acme", 3, { now: Date.now() - DAY });
    r.kdc.stage("acme", intermediateSecret(third));
    await waitFor("the staged version", () => r.agent.holder.stagedKeys().length === 1);
    await r.agent.destroy();
    await r.kdc.stop();
    expect(readFileSync(join(r.config.stateDir, "cache.pb")).includes(pkcs8Of(third.key))).toBe(false);
    const again = AgentServer.create({ ...r.config, joinToken: undefined, socketPath: join(dir, "staged-again.sock") }, { logger: createLogger({ write: () => undefined }) });
    await again.start();
    try {
      expect(again.holder.stagedKeys().map((k) => k.keyId)).toEqual([third.keyId]);
      expect(again.holder.intermediateFor("acme").keyId).toBe(next.keyId);
    } finally {
      await again.destroy();
    }
  });

  it("a KDC that refuses the machine as quarantined (PERMISSION_DENIED) makes it drop every key", async () => {
    const r = await setup();
    await waitFor("the sync", async () => (await r.client.unary("getStatus", {})).kdcConnected);
    // Quarantined without a push (as after a restart): the next call is refused.
    r.kdc.quarantined.set(r.agent.machine!.machineId, "failed attestation");
    await r.kdc.stop();
    const kdc2 = Object.assign(new FixtureKdc(infra, r.audit.tokenKey.publicKey, { port: r.kdc.port }), { tenants: r.kdc.tenants, quarantined: r.kdc.quarantined });
    await kdc2.start();
    r.kdc = kdc2;
    const f = await waitFor("the refusal", async () => {
      try {
        await sign(r.client);
        return undefined;
      } catch (err) {
        return err as grpc.ServiceError;
      }
    }, 4000);
    expect(f.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(f.details).toMatch(/^machine quarantined: machine m-[0-9a-f]{16} is quarantined: failed attestation/);
    // Memory first, then disk: the cache follows within moments.
    const cache = await waitFor("the cache rewrite", () => {
      const c = fromBinary(AgentCacheRecordSchema, readFileSync(join(r.config.stateDir, "cache.pb")));
      return c.quarantined ? c : undefined;
    }, 1000);
    expect(cache.secrets).toBeUndefined();
  });

  it("after a quarantine is lifted it attests again instead of reusing the token it held before", async () => {
    const r = await setup();
    await waitFor("the sync", async () => (await r.client.unary("getStatus", {})).kdcConnected);
    const machineId = r.agent.machine!.machineId;
    const attestedBefore = r.audit.attested.length;
    // As the real servers do: the Auditserver refuses attestation, the KDC pushes QUARANTINED and ends the stream.
    r.audit.machines.get(machineId)!.quarantined = "suspected compromise";
    r.kdc.quarantine(machineId, "suspected compromise");
    await waitFor("the refusal", async () => (await sign(r.client).then(() => undefined, (e: grpc.ServiceError) => e.code)) === grpc.status.FAILED_PRECONDITION);
    await r.kdc.stop();
    const kdc2 = Object.assign(new FixtureKdc(infra, r.audit.tokenKey.publicKey, { port: r.kdc.port }), { tenants: r.kdc.tenants, quarantined: r.kdc.quarantined });
    await kdc2.start();
    r.kdc = kdc2;
    // It tried again while quarantined: refused by the Auditserver (a new attestation) or by the KDC (the old token).
    await waitFor("a try while quarantined", async () => kdc2.calls.refused > 0 || (await r.client.unary("getStatus", {})).attestation === AttestationState.QUARANTINED);

    r.audit.machines.get(machineId)!.quarantined = undefined;
    r.kdc.quarantined.delete(machineId);
    await waitFor("signing again", async () => sign(r.client).then(() => true, () => false), 5000);
    expect(r.audit.attested.length).toBeGreaterThan(attestedBefore);
    expect(r.kdc.calls.refused).toBe(0);
  });

  it("an attestation refused for a measurement shows in GetStatus, and no secret is fetched", async () => {
    const r = await setup({ audit: { approved: { "agent.config": "0".repeat(64) } } });
    const st = await waitFor("the refusal", async () => {
      const s = await r.client.unary("getStatus", {});
      return s.attestation === AttestationState.REFUSED ? s : undefined;
    });
    expect(st.attestationProblem).toMatch(/^measurement agent\.config: sha256 [0-9a-f]{64} is not approved/);
    expect(st.kdcConnected).toBe(false);
    expect(r.kdc.calls.fetch).toBe(0);
    expect((await failure(sign(r.client))).code).toBe(grpc.status.NOT_FOUND);
  });

  it("renews the machine certificate at 2/3 of its life, saves it, and reconnects with it", async () => {
    // 36 s of validity plus the issuer's 60 s of backdating: renewal falls about 4 s after issuance.
    const r = await setup({ audit: { certSeconds: 36 } });
    await waitFor("the first watch", () => r.kdc.calls.watch >= 1);
    const first = r.agent.machine!.certificatePem;
    await waitFor("a renewal", () => r.audit.renewals >= 1, 8000);
    await waitFor("the new certificate in use", () => r.agent.machine!.certificatePem !== first);
    const saved = fromBinary(AgentIdentityRecordSchema, readFileSync(join(r.config.stateDir, "identity.pb")));
    expect(saved.certificatePem).toBe(r.agent.machine!.certificatePem);
    expect(saved.renewedAt).toBeDefined();
    // The token is bound to the certificate: the agent attested again and reopened its watch.
    await waitFor("a watch with the new certificate", () => r.kdc.calls.watch >= 2 && r.audit.attested.length >= 2);
    expect(r.kdc.calls.refused).toBe(0);
    expect((await sign(r.client)).keyId).toBe(signer.keyId);
  });
});
