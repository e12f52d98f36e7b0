/**
 * An in-process Auditserver for unit tests: a real LevelDB store in a temp dir, the real
 * audit log, services behind `createRouterTransport`, a test clock, and a fake KDC that signs
 * machine certificates with a test infrastructure CA made by src/pki. The mutual-TLS peer is
 * injected per call from a test header (the real server reads it from the TLS socket).
 */
import { X509Certificate, generateKeyPairSync, randomBytes, type KeyObject } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, toBinary } from "@bufbuild/protobuf";
import { createClient, createRouterTransport, type Client, type Interceptor } from "@connectrpc/connect";
import { attestationKeyId } from "../../../src/attest/index.js";
import { AuditService } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { AuditAdminService } from "../../../src/gen/kmi/audit/v1/admin_pb.js";
import { Role, TokenInfoSchema, type TokenInfo } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { toConnectError } from "../../../src/common/error-mapping.js";
import { Unauthenticated, Unavailable } from "../../../src/common/errors.js";
import { createLogger } from "../../../src/common/logger.js";
import { kPeer, kPeerAddress } from "../../../src/common/rpc.js";
import { peerIdentityFromDer } from "../../../src/common/tls.js";
import { certificateToPem } from "../../../src/pki/pem.js";
import { createCsr, csrToPem } from "../../../src/pki/csr.js";
import { createRootCa, issueMachineCertificate } from "../../../src/pki/issue.js";
import { parseCsr } from "../../../src/pki/csr.js";
import { createAuditLog, deriveAuditKey, keyedHash } from "../../../src/storage/audit-log.js";
import { openLevelStore } from "../../../src/storage/level-store.js";
import type { AuditContext, KdcPeer } from "../../../src/audit/context.js";
import { createCsrChecker } from "../../../src/audit/csr.js";
import { routes } from "../../../src/audit/routes.js";
import { MachineStatusHub } from "../../../src/audit/status-hub.js";
import { MachineStatusFollower } from "../../../src/audit/status-follower.js";
import { AUDIT_SCHEMA_VERSION, AUDIT_STORE_OWNER, Tables } from "../../../src/audit/store.js";
import type { Store, Table } from "../../../src/storage/store.js";

/** A clock the test moves. */
export class TestClock {
  constructor(public t: Date) {}
  now(): Date {
    return new Date(this.t);
  }
  advance(seconds: number): void {
    this.t = new Date(this.t.getTime() + seconds * 1000);
  }
}

/** The KDC as the Auditserver sees it, with a real test CA behind it. */
export class FakeKdc implements KdcPeer {
  readonly caKey = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
  readonly caDer: Uint8Array;
  readonly caPem: string;
  /** Bearer secret → token info. */
  readonly tokens = new Map<string, TokenInfo>();
  issued = 0;
  down = false;
  /** Set to make the next certificate name another machine (a misbehaving KDC). */
  wrongMachineNext = false;

  constructor(private readonly clock: TestClock) {
    this.caDer = createRootCa({ subject: { commonName: "test infrastructure CA", organization: "kmi" }, privateKey: this.caKey, now: new Date(clock.now().getTime() - 3600_000), validitySeconds: 30 * 86400 });
    this.caPem = certificateToPem(this.caDer);
  }

  addToken(secret: string, role: Role, tokenId = randomBytes(8).toString("hex"), extra: { revoked?: boolean } = {}): string {
    this.tokens.set(secret, create(TokenInfoSchema, { tokenId, role, tenantId: role === Role.TENANT_ADMIN ? "acme" : "", ...extra }));
    return secret;
  }

  async authenticateToken(token: string): Promise<{ token: TokenInfo; actor: string }> {
    if (this.down) throw new Unavailable("kdc: unreachable");
    const info = this.tokens.get(token);
    if (info === undefined) throw new Unauthenticated("token: unknown");
    return { token: info, actor: `token:${info.tokenId}` };
  }

  async issueMachineCertificate(p: { csrPem: string; machineId: string; group: string; ttlSeconds: number }) {
    if (this.down) throw new Unavailable("kdc: unreachable");
    const spki = parseCsr(p.csrPem, "csr_pem").spkiDer;
    const machineId = this.wrongMachineNext ? "m-ffffffffffffffff" : p.machineId;
    this.wrongMachineNext = false;
    const der = issueMachineCertificate({ issuer: { certificateDer: this.caDer, privateKey: this.caKey }, machineId, group: p.group, publicKeySpkiDer: spki, now: this.clock.now(), validitySeconds: p.ttlSeconds });
    this.issued++;
    return { certificatePem: certificateToPem(der), caPem: this.caPem, notAfter: new Date(new X509Certificate(der).validTo) };
  }
}

/** A machine as the tests drive it: its key and, once enrolled, its certificate. */
export interface TestMachine {
  key: KeyObject;
  csrPem: string;
  machineId: string;
  certificateDer: Uint8Array;
  certificatePem: string;
}

/** A fresh P-256 machine key and a CSR for it. */
export function newMachineKey(): { key: KeyObject; csrPem: string } {
  const key = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
  return { key, csrPem: csrToPem(createCsr({ subject: { commonName: "machine" }, privateKey: key })) };
}

/** Headers that make the injected peer present `certDer` (verified unless `authorized` is false). */
export function asPeer(certDer: Uint8Array, authorized = true): { headers: Record<string, string> } {
  return { headers: { "x-test-peer-cert": Buffer.from(certDer).toString("base64"), "x-test-peer-authorized": String(authorized) } };
}

/** The harness. */
export interface Harness {
  dir: string;
  store: Store;
  clock: TestClock;
  kdc: FakeKdc;
  ctx: AuditContext;
  audit: Client<typeof AuditService>;
  admin: Client<typeof AuditAdminService>;
  operator: { headers: Record<string, string> };
  /**
   * Every record of the Auditserver's tables but the audit log (and, unless asked, the
   * attestation observations), serialized: equal snapshots mean byte-identical state.
   */
  snapshot(options?: { withAttestations?: boolean }): Promise<Map<string, string>>;
  close(): Promise<void>;
}

const peerInjector: Interceptor = (next) => async (req) => {
  const cert = req.header.get("x-test-peer-cert");
  if (cert !== null) {
    req.contextValues.set(kPeer, peerIdentityFromDer(new Uint8Array(Buffer.from(cert, "base64")), req.header.get("x-test-peer-authorized") !== "false"));
  }
  req.contextValues.set(kPeerAddress, "127.0.0.1:4242");
  return next(req);
};

/** Makes a harness on LevelDB in a temp dir, or on `options.store` (etcd); `close()` it in afterEach/afterAll. */
export async function makeHarness(options: { store?: Store } = {}): Promise<Harness> {
  const dir = await mkdtemp(join(tmpdir(), "kmi-audit-unit-"));
  const store = options.store ?? (await openLevelStore(join(dir, "db"), { owner: AUDIT_STORE_OWNER, schemaVersion: AUDIT_SCHEMA_VERSION }));
  const clock = new TestClock(new Date("2030-01-01T00:00:00Z"));
  const log = createAuditLog(store, { clock });
  const hmacKey = deriveAuditKey(randomBytes(32));
  const kdc = new FakeKdc(clock);
  const attestation = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const logger = createLogger({ level: "error", write: () => {} });
  const ctx: AuditContext = {
    store,
    audit: log,
    keyedHash: (v) => keyedHash(hmacKey, v),
    kdc,
    csr: createCsrChecker(),
    attestationKey: { privateKey: attestation.privateKey, publicKey: attestation.publicKey, keyId: attestationKeyId(attestation.publicKey) },
    caPem: kdc.caPem,
    statusHub: new MachineStatusHub(),
    clock,
    logger,
    policy: { nonceTtlMs: 60_000, maxNoncesPerMachine: 16 },
  };
  // As the server does: status changes reach the hub through the store's change feed.
  const follower = new MachineStatusFollower(store, ctx.statusHub, logger);
  await follower.start();
  const errorMapping: Interceptor = (next) => async (req) => {
    try {
      const res = await next(req);
      if (!res.stream) return res;
      const source = res.message;
      return {
        ...res,
        message: (async function* () {
          try {
            yield* source;
          } catch (err) {
            throw toConnectError(err, logger);
          }
        })(),
      };
    } catch (err) {
      throw toConnectError(err, logger);
    }
  };
  const transport = createRouterTransport(routes(ctx, { keepaliveMs: 100 }), { router: { interceptors: [errorMapping, peerInjector] } });
  kdc.addToken("kmi_00000000000000aa_operator", Role.OPERATOR, "00000000000000aa");
  return {
    dir,
    store,
    clock,
    kdc,
    ctx,
    audit: createClient(AuditService, transport),
    admin: createClient(AuditAdminService, transport),
    operator: { headers: { authorization: "Bearer kmi_00000000000000aa_operator" } },
    async snapshot(options = {}) {
      const out = new Map<string, string>();
      for (const [name, table] of Object.entries(Tables)) {
        if (name === "attestations" && options.withAttestations !== true) continue;
        for await (const [k, v] of store.iterate(table as Table)) out.set(`${table.name}/${k}`, Buffer.from(toBinary(table.schema, v as never)).toString("hex"));
      }
      return out;
    },
    async close() {
      await follower.stop();
      await store.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
