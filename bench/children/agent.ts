/**
 * The key agent under test, in its own process: the real KeyAgentService (src/agent) on the
 * platform's grpc-js server (src/common/grpc-server.ts) on a temp Unix socket, with the
 * workload header required and a key holder loaded directly (a tenant intermediate and a
 * plain ECDSA P-256 signing key) instead of from a KDC. The same server also answers
 * grpc.health.v1.Health/Check, the no-op baseline on the same socket stack.
 *
 * Log lines (one per issuance or signature, as the real agent writes them) go to a file.
 */
import { closeSync, openSync, writeSync } from "node:fs";
import { join } from "node:path";
import { createKeyAgentService } from "../../src/agent/agent-service.js";
import type { AgentRuntimeStatus, AgentServiceContext } from "../../src/agent/context.js";
import { KeyHolder } from "../../src/agent/key-holder.js";
import { pkiLeafIssuerFactory } from "../../src/agent/leaf-issuer.js";
import { WORKLOAD_HEADER, WORKLOAD_HEADER_VALUE } from "../../src/clients/workload-header.js";
import { GrpcServer } from "../../src/common/grpc-server.js";
import { createLogger } from "../../src/common/logger.js";
import { serviceRegistration } from "../../src/common/rpc.js";
import { KeyAgentService } from "../../src/gen/kmi/agent/v1/agent_pb.js";
import { childConfig, dieOnError, peakRss, serveParent } from "../lib/serve.js";
import { intermediateSecret, makeIntermediate, makeRoot, signingSecret } from "../lib/tenant-ca.js";

/** What the parent passes. */
export interface AgentChildConfig {
  /** Directory for the socket and the log file. */
  readonly dir: string;
  /** Tenant id. */
  readonly tenant: string;
}

/** What the child answers when ready. */
export interface AgentChildInfo {
  readonly socketPath: string;
  readonly rootPem: string;
  readonly intermediatePem: string;
  readonly signingKeyName: string;
  readonly signingKeyId: string;
  /** The signing key's public key (PEM), to check a signature. */
  readonly signingPublicKeyPem: string;
  readonly logFile: string;
}

async function main(): Promise<void> {
  const cfg = childConfig<AgentChildConfig>();
  const root = makeRoot("kmi bench KMI root");
  let version = 1;
  const inter = makeIntermediate(root, cfg.tenant, version);
  const signer = signingSecret(cfg.tenant, "bench-signer");
  const holder = new KeyHolder({ clock: { now: () => Date.now() }, createLeafIssuer: pkiLeafIssuerFactory });
  holder.replaceAll([intermediateSecret(inter), signer.secret]);

  const logFile = join(cfg.dir, "agent.log");
  const fd = openSync(logFile, "a", 0o600);
  const logger = createLogger({ level: "info", write: (line) => void writeSync(fd, line), fields: { program: "agent" } });
  const status: AgentRuntimeStatus = {
    machineId: "m-bench",
    group: "bench",
    attestation: "attested",
    attestationProblem: "",
    kdcConnected: true,
    kdcError: "",
    lastSync: Date.now(),
    servingFromCache: false,
  };
  const ctx: AgentServiceContext = {
    holder,
    clock: { now: () => Date.now() },
    logger: logger.child({ component: "api" }),
    policy: { maxLifetimeMs: 47 * 86_400_000, backdateMs: 3_600_000 },
    status: { status: () => status },
    version: "bench",
  };
  const socketPath = join(cfg.dir, "agent.sock");
  const server = GrpcServer.create({
    name: "agent",
    services: [serviceRegistration(KeyAgentService, createKeyAgentService(ctx))],
    unix: { path: socketPath, mode: 0o600 },
    logger,
    requiredMetadata: { key: WORKLOAD_HEADER, value: WORKLOAD_HEADER_VALUE },
    maxMessageBytes: 1024 * 1024,
    shutdownTimeoutMs: 2000,
  });
  await server.start();
  const info: AgentChildInfo = {
    socketPath,
    rootPem: root.pem,
    intermediatePem: inter.pem,
    signingKeyName: `${cfg.tenant}/bench-signer`,
    signingKeyId: signer.secret.keyId,
    signingPublicKeyPem: signer.secret.publicKeyPem,
    logFile,
  };
  await serveParent(
    info,
    {
      /** A new intermediate version for the tenant (WatchKeys emits a rotation). */
      rotate: () => {
        version++;
        const next = makeIntermediate(root, cfg.tenant, version);
        holder.replaceTenant(cfg.tenant, [intermediateSecret(next), signer.secret]);
        return { version, intermediatePem: next.pem };
      },
      rss: async () => ({ peakRss: await peakRss(), rss: process.memoryUsage().rss }),
    },
    async () => {
      await server.destroy();
      closeSync(fd);
    },
  );
}

dieOnError(main());
