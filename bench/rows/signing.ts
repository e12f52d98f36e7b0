/**
 * Row 1: agent signing over the Unix socket. `Sign` (ECDSA P-256) and `IssueLeafCertificate`
 * through the real KeyAgentService on the platform's grpc-js server, in its own process,
 * called by a lean grpc-js client in this process at concurrency 1, 16 and 64; baselines of
 * the same run: a no-op RPC (grpc.health.v1.Health/Check) on the same server and socket, the
 * agent's handlers called in-process (no RPC), and the operations themselves in-process
 * (node:crypto sign, the pki fast leaf builder, and pkijs's object-tree builder for reference).
 */
import { generateKeyPairSync, sign as cryptoSign } from "node:crypto";
import { closeSync, openSync, writeSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { cpus } from "node:os";
import { create } from "@bufbuild/protobuf";
import { createContextValues, createHandlerContext } from "@connectrpc/connect";
import { createKeyAgentService } from "../../src/agent/agent-service.js";
import { KeyHolder } from "../../src/agent/key-holder.js";
import { pkiLeafIssuerFactory } from "../../src/agent/leaf-issuer.js";
import { WORKLOAD_HEADER, WORKLOAD_HEADER_VALUE } from "../../src/clients/workload-header.js";
import { createLogger } from "../../src/common/logger.js";
import { Health, HealthCheckRequestSchema } from "../../src/gen/grpc/health/v1/health_pb.js";
import { IssueLeafCertificateRequestSchema, KeyAgentService, SignatureAlgorithm, SignRequestSchema } from "../../src/gen/kmi/agent/v1/agent_pb.js";
import { createLeafIssuer, exportPublicKeySpkiDer, issueServiceCertificate } from "../../src/pki/index.js";
import type { AgentChildConfig, AgentChildInfo } from "../children/agent.js";
import type { Child } from "../lib/child.js";
import type { Env } from "../lib/env.js";
import { ROW_TITLES } from "./titles.js";
import { createAgentGrpcClient } from "../../src/clients/agent-client.js";
import type { LeanClient } from "../../src/clients/grpc-client.js";
import { closedLoop, tightLoop, type LoopResult } from "../lib/loop.js";
import { profileSummary } from "../lib/profile.js";
import { RowBuilder, fmtPct, type Figure } from "../lib/results.js";
import { fmt } from "../lib/stats.js";
import { intermediateSecret, makeIntermediate, makeRoot, signingSecret } from "../lib/tenant-ca.js";

/** The tenant every row uses. */
export const TENANT = "acme";
const CONCURRENCY = [1, 16, 64] as const;
const MESSAGE = Buffer.alloc(128, 0x5a);

/** The agent process (shared by rows 1–3). */
export function agentChild(env: Env) {
  return env.shared<AgentChildInfo>("agent", (): AgentChildConfig => ({ dir: env.dir, tenant: TENANT }));
}

/** A lean client of the agent's socket that sends the workload header. */
export function agentClient(socketPath: string): LeanClient {
  return createAgentGrpcClient(socketPath, { metadata: { "kmi-caller-pid": String(process.pid) } });
}

const methodOf = (name: string) => KeyAgentService.methods.find((m) => m.name === name)!;

/** The RPCs of this row, ready to call. */
function rpcOps(client: LeanClient, info: AgentChildInfo) {
  const leafKey = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
  const spki = exportPublicKeySpkiDer(leafKey.publicKey);
  const healthCheck = Health.methods.find((m) => m.name === "Check")!;
  const signMethod = methodOf("Sign");
  const issueMethod = methodOf("IssueLeafCertificate");
  const noopReq = create(HealthCheckRequestSchema, { service: "" });
  const signReq = create(SignRequestSchema, { keyId: info.signingKeyId, message: MESSAGE, algorithm: SignatureAlgorithm.ECDSA_SHA256 });
  const issueReq = create(IssueLeafCertificateRequestSchema, { tenantId: TENANT, publicKey: spki, dnsNames: ["www.bench-origin.example"], commonName: "www.bench-origin.example" });
  return {
    noop: () => client.unaryMessage(healthCheck, noopReq),
    sign: () => client.unaryMessage(signMethod, signReq),
    issue: () => client.unaryMessage(issueMethod, issueReq),
  };
}

/** The agent's handlers in this process, without any RPC (what the socket adds is the rest). */
function inProcessHandlers(logFile: string) {
  const root = makeRoot("in-process root");
  const inter = makeIntermediate(root, TENANT, 1);
  const signer = signingSecret(TENANT, "bench-signer");
  const holder = new KeyHolder({ clock: { now: () => Date.now() }, createLeafIssuer: pkiLeafIssuerFactory });
  holder.replaceAll([intermediateSecret(inter), signer.secret]);
  // The same log line as the agent process writes, to a file the same way.
  const fd = openSync(logFile, "a", 0o600);
  const close = () => closeSync(fd);
  const logger = createLogger({ level: "info", write: (line) => void writeSync(fd, line) });
  const svc = createKeyAgentService({
    holder,
    clock: { now: () => Date.now() },
    logger,
    policy: { maxLifetimeMs: 47 * 86_400_000, backdateMs: 3_600_000 },
    status: { status: () => ({ machineId: "m", group: "g", attestation: "attested", attestationProblem: "", kdcConnected: true, kdcError: "", servingFromCache: false }) },
    version: "bench",
  });
  const leafKey = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
  const spki = exportPublicKeySpkiDer(leafKey.publicKey);
  const hctx = (method: string) =>
    createHandlerContext({
      service: KeyAgentService,
      method: methodOf(method),
      protocolName: "grpc",
      requestMethod: "POST",
      url: `http://localhost/kmi.agent.v1.KeyAgentService/${method}`,
      requestHeader: { [WORKLOAD_HEADER]: WORKLOAD_HEADER_VALUE },
      contextValues: createContextValues(),
    });
  const signCtx = hctx("Sign");
  const issueCtx = hctx("IssueLeafCertificate");
  const signReq = create(SignRequestSchema, { keyId: signer.secret.keyId, message: MESSAGE, algorithm: SignatureAlgorithm.ECDSA_SHA256 });
  const issueReq = create(IssueLeafCertificateRequestSchema, { tenantId: TENANT, publicKey: spki, dnsNames: ["www.bench-origin.example"], commonName: "www.bench-origin.example" });
  const now = Date.now();
  const builder = createLeafIssuer({ certificateDer: inter.der, privateKey: inter.key });
  return {
    close,
    signHandler: () => svc.sign(signReq, signCtx),
    issueHandler: () => svc.issueLeafCertificate(issueReq, issueCtx),
    signCrypto: () => cryptoSign("sha256", MESSAGE, { key: signer.key, dsaEncoding: "der" }),
    issueBuilder: () =>
      builder.issueLeafDetailed({
        publicKeySpkiDer: spki,
        dnsNames: ["www.bench-origin.example"],
        commonName: "www.bench-origin.example",
        notBefore: new Date(now - 3_600_000),
        notAfter: new Date(now + 40 * 86_400_000),
      }),
    // The same shape of certificate through pkijs object trees (src/pki/issue.ts's slow path).
    issuePkijs: () =>
      issueServiceCertificate({
        issuer: { certificateDer: inter.der, privateKey: inter.key },
        serviceName: "bench",
        publicKeySpkiDer: spki,
        dnsNames: ["www.bench-origin.example"],
        now: new Date(now),
        validitySeconds: 40 * 86400,
      }),
  };
}

/** Runs row 1. */
export async function runSigning(env: Env): Promise<RowBuilder> {
  const row = new RowBuilder(
    "1",
    ROW_TITLES["1"]!,
    "The real KeyAgentService (src/agent) on the platform's grpc-js server, in its own process on a temp Unix socket (mode 0600, workload header required, one log line per call written to a file), keys loaded directly into its key holder. A lean grpc-js client in the bench process (one channel) keeps 1, 16 or 64 calls in flight for each window; latency is per call at the client. No-op baseline: grpc.health.v1.Health/Check on the same server, socket and client. In-process figures call the agent's handlers without RPC, and the operation alone (node:crypto sign; pki's fast leaf builder; pkijs object trees for reference). Figures are interleaved across repeats.",
  );
  const b = env.budget;
  const agent = await agentChild(env);
  const client = agentClient(agent.info.socketPath);
  try {
    await client.ready();
    const ops = rpcOps(client, agent.info);
    // A first call of each proves the path works (and fails the row loudly if not).
    await ops.noop();
    await ops.sign();
    await ops.issue();

    // In-process first, while the agent process is idle.
    const local = inProcessHandlers(`${env.dir}/in-process.log`);
    const inproc: Record<string, number[]> = { signCrypto: [], signHandler: [], issueBuilder: [], issueHandler: [], issuePkijs: [] };
    const inWindow = Math.max(150, b.windowMs / 2);
    try {
      for (let r = 0; r < b.repeats; r++) {
        for (const k of Object.keys(inproc)) {
          const fn = local[k as Exclude<keyof typeof local, "close">];
          inproc[k]!.push(tightLoop(fn, k === "issuePkijs" ? inWindow / 2 : inWindow).perSecond);
        }
      }
    } finally {
      local.close();
    }

    type Key = `${"noop" | "sign" | "issue"}:${number}`;
    const results = new Map<Key, LoopResult[]>();
    for (let r = 0; r < b.repeats; r++) {
      for (const c of CONCURRENCY) {
        for (const op of ["noop", "sign", "issue"] as const) {
          env.log(`agent ${op} c=${c} repeat ${r + 1}`);
          const res = await closedLoop(ops[op], { concurrency: c, durationMs: b.windowMs });
          if (res.errors > 0) throw new Error(`agent ${op} c=${c}: ${res.errors} calls failed: ${res.firstError}`);
          const key: Key = `${op}:${c}`;
          results.set(key, [...(results.get(key) ?? []), res]);
        }
      }
    }
    const fig = (op: "noop" | "sign" | "issue", c: number, label: string, baseline = false): Figure => {
      const rs = results.get(`${op}:${c}`)!;
      return row.figure(`agent.${op}.c${c}`, `${label}, c=${c}`, "calls/s", rs.map((x) => x.perSecond), { p50: rs.map((x) => x.p50), p99: rs.map((x) => x.p99) }, baseline);
    };
    const noop: Record<number, Figure> = {};
    const sign: Record<number, Figure> = {};
    const issue: Record<number, Figure> = {};
    for (const c of CONCURRENCY) noop[c] = fig("noop", c, "no-op RPC (Health/Check), same socket stack", true);
    const signCrypto = row.figure("agent.sign.inprocess_crypto", "ECDSA P-256 sign in-process, node:crypto (limit)", "ops/s", inproc.signCrypto!, undefined, true);
    const signHandler = row.figure("agent.sign.inprocess_handler", "Sign handler in-process (no RPC)", "ops/s", inproc.signHandler!);
    row.ratio(signHandler, signCrypto, "of the limit");
    for (const c of CONCURRENCY) {
      sign[c] = fig("sign", c, "Sign ECDSA P-256 over the socket");
      row.ratio(sign[c]!, noop[c]!, `of no-op c=${c}`);
      row.ratio(sign[c]!, signCrypto, "of in-process limit");
    }
    const issueBuilder = row.figure("agent.issue.inprocess_builder", "leaf build+sign in-process, pki fast builder (limit)", "ops/s", inproc.issueBuilder!, undefined, true);
    const issuePkijs = row.figure("agent.issue.inprocess_pkijs", "same certificate through pkijs object trees, issuer parsed per call (reference)", "ops/s", inproc.issuePkijs!);
    row.ratio(issuePkijs, issueBuilder, "of the fast builder");
    const issueHandler = row.figure("agent.issue.inprocess_handler", "IssueLeafCertificate handler in-process (no RPC)", "ops/s", inproc.issueHandler!);
    row.ratio(issueHandler, issueBuilder, "of the limit");
    for (const c of CONCURRENCY) {
      issue[c] = fig("issue", c, "IssueLeafCertificate over the socket");
      row.ratio(issue[c]!, noop[c]!, `of no-op c=${c}`);
      row.ratio(issue[c]!, issueBuilder, "of in-process limit");
    }

    // Targets (issue 8).
    const signRatio = sign[64]!.value.median / noop[64]!.value.median;
    const t1 = row.target(sign[64]!, "≥ 80% of the no-op RPC at c=64", signRatio >= 0.8);
    const t2 = row.target(sign[64]!, "≥ 6,000/s at c=64", sign[64]!.value.median >= 6000);
    const t3 = row.target(sign[1]!, "p50 < 0.5 ms at c=1", sign[1]!.p50!.median < 0.5);
    // IssueLeafCertificate at its best concurrency, judged on the median; the min over the
    // repeats is shown beside it, so a median that meets the target while a repeat did not says so.
    const bestC = CONCURRENCY.reduce((a, c) => (issue[c]!.value.median > issue[a]!.value.median ? c : a));
    const best = issue[bestC]!.value;
    const issueMedianMet = best.median >= 2000;
    const issueMinMet = best.min >= 2000;
    const t4 = row.target(
      issue[bestC]!,
      `≥ 2,000/s (best concurrency, c=${bestC}: median ${fmt(best.median)}/s, min ${fmt(best.min)}/s over ${best.n} repeat${best.n === 1 ? "" : "s"})`,
      issueMedianMet && issueMinMet,
      issueMedianMet && !issueMinMet ? "met (median), min below target" : undefined,
    );
    const around = 1e6 / issueHandler.value.median - 1e6 / issueBuilder.value.median;
    row.note(
      `Where a leaf's time goes (in-process, per leaf): pki fast builder ${fmt(1e6 / issueBuilder.value.median)} µs; the agent's handler around it (validation, policy, PEM, log line, response message) ${around > 0 ? `${fmt(around)} µs` : "within the noise of the two figures"}; pkijs object trees (src/pki/issue.ts, which also parses the issuer per certificate) take ${fmt(1e6 / issuePkijs.value.median)} µs for the same certificate: the ASN.1 object-tree encoding is what the fast builder removes.`,
    );
    const perCall = (f: Figure) => 1e6 / f.value.median;
    row.note(
      `Wall time per call at c=64 (1/throughput; the bench client shares the ${cpus().length} cores with the agent, so for the no-op this is bounded by the client, not by the server's CPU): no-op ${fmt(perCall(noop[64]!))} µs, Sign ${fmt(perCall(sign[64]!))} µs (the signature alone ${fmt(1e6 / signCrypto.value.median)} µs, the handler alone ${fmt(1e6 / signHandler.value.median)} µs), IssueLeafCertificate ${fmt(perCall(issue[64]!))} µs (the handler alone ${fmt(1e6 / issueHandler.value.median)} µs). Sign is ${fmtPct(signRatio)} of the no-op rate.`,
    );
    explainTargets(row, { noop, sign, issue, signCrypto, signHandler }, { t2, t3, bestC });
    if (!(t1 && t2 && t3 && t4) && env.profile) {
      const missed = [!t1 || !t2 ? "sign" : undefined, !t3 ? "sign1" : undefined, !t4 ? "issue" : undefined].filter((x) => x !== undefined);
      for (const what of new Set(missed.map((m) => (m === "sign1" ? "sign" : m!)))) {
        env.log(`profiling the agent (${what}, c=64)`);
        const summary = await profileAgent(env, agent, ops, what as "sign" | "issue", b.windowMs);
        row.note(`CPU profile of the agent process during ${what === "sign" ? "Sign" : "IssueLeafCertificate"} at c=64 (V8 sampling profiler, self time): ${summary}`);
      }
    } else if (!(t1 && t2 && t3 && t4)) {
      row.note("A target was missed; run without --quick (or with --profile) for a CPU profile of the agent process.");
    }
  } finally {
    client.close();
  }
  return row;
}

/**
 * The missed-target explanations, from this run's figures: how much of Sign's p50 at c=1 is
 * the RPC stack (the no-op's p50 on the same socket), whether the stack itself reaches
 * 6,000 calls/s at c=64, and IssueLeafCertificate's min beside its median.
 */
function explainTargets(
  row: RowBuilder,
  f: { noop: Record<number, Figure>; sign: Record<number, Figure>; issue: Record<number, Figure>; signCrypto: Figure; signHandler: Figure },
  j: { t2: boolean; t3: boolean; bestC: number },
): void {
  const cores = cpus().length;
  const handlerMs = 1000 / f.signHandler.value.median;

  const signP50 = f.sign[1]!.p50!.median;
  const noopP50 = f.noop[1]!.p50!.median;
  const stackMs = Math.min(noopP50, signP50);
  row.note(
    `Sign p50 at c=1 (target < 0.5 ms, ${j.t3 ? "met" : "missed"}): ${fmt(signP50)} ms. The no-op RPC on the same socket stack has a p50 of ${fmt(noopP50)} ms in this run, so about ${fmt(stackMs)} ms (${fmtPct(stackMs / signP50)}) of Sign's p50 is the RPC stack (client, grpc-js, HTTP/2, Unix socket, server) and ${fmt(signP50 - stackMs)} ms is what Sign adds; the Sign handler with its signature takes ${fmt(handlerMs)} ms in-process.` +
      (noopP50 >= 0.5 ? " The no-op alone is not under 0.5 ms, so this stack cannot meet the target whatever the signature costs." : ""),
  );

  const sign64 = f.sign[64]!.value.median;
  const noop64 = f.noop[64]!.value.median;
  const head = `Sign at c=64 (target ≥ 6,000/s, ${j.t2 ? "met" : "missed"}): ${fmt(sign64)} calls/s; the no-op RPC on the same stack did ${fmt(noop64)} calls/s at c=64 in this run.`;
  row.note(
    noop64 < 6000
      ? `${head} The no-op itself is below 6,000/s, so this target is bounded by the client+server RPC stack on this ${cores}-core machine (the bench client and the agent process share the cores), not by signing: node:crypto signs ${fmt(f.signCrypto.value.median)}/s in-process.`
      : `${head} The stack itself reaches 6,000/s, so what Sign adds to the no-op (the handler and signature take ${fmt(handlerMs * 1000)} µs in-process) ${j.t2 ? "still fits" : "is what keeps it below"}.`,
  );

  const best = f.issue[j.bestC]!.value;
  if (best.median >= 2000 && best.min < 2000) {
    row.note(
      `IssueLeafCertificate ≥ 2,000/s: met (median), min below target: at c=${j.bestC} the median over ${best.n} repeats is ${fmt(best.median)}/s, but the slowest repeat did ${fmt(best.min)}/s.`,
    );
  } else if (best.median < 2000) {
    const noopBest = f.noop[j.bestC]!.value.median;
    row.note(
      `IssueLeafCertificate ≥ 2,000/s: missed: best median ${fmt(best.median)}/s at c=${j.bestC} (min ${fmt(best.min)}/s); the no-op RPC on the same stack did ${fmt(noopBest)} calls/s at that concurrency in this run.`,
    );
  }
}

/** Profiles the agent process (node:inspector, the --cpu-prof profiler) while the op runs at c=64; summarizes it. */
async function profileAgent(env: Env, agent: Child<AgentChildInfo>, ops: ReturnType<typeof rpcOps>, what: "sign" | "issue", windowMs: number): Promise<string> {
  const dir = `${env.dir}/prof-agent-${what}`;
  await mkdir(dir, { recursive: true });
  await closedLoop(ops[what], { concurrency: 64, durationMs: 200, warmupMs: 0 });
  await agent.call("profile:start");
  try {
    await closedLoop(ops[what], { concurrency: 64, durationMs: Math.max(1500, windowMs), warmupMs: 0 });
  } finally {
    await agent.call("profile:stop", { path: `${dir}/agent.cpuprofile` });
  }
  return profileSummary(dir);
}
