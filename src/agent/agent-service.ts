/**
 * KeyAgentService: the agent's local API. Each handler: check the workload header → parse
 * the request into a validated value → look the key up (quarantine, revocation and lease are
 * refused there) → act → map to proto. No response carries private key material.
 *
 * The hot path (IssueLeafCertificate, Sign) does map lookups, the leaf build or the
 * signature, and one log line; nothing else.
 */
import { constants as cryptoConstants, sign as cryptoSign } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { kDraining } from "../common/rpc.js";
import type { Logger } from "../common/logger.js";
import { FailedPrecondition, InvalidArgument, ResourceExhausted } from "../common/errors.js";
import { VERSION } from "../common/version.js";
import {
  AttestationState,
  GetCertificateChainResponseSchema,
  GetStatusResponseSchema,
  IssueLeafCertificateResponseSchema,
  KeyAgentService,
  KeyEventType,
  ListKeysResponseSchema,
  SignatureAlgorithm,
  SignResponseSchema,
  WatchKeysResponseSchema,
} from "../gen/kmi/agent/v1/agent_pb.js";
import { certificateToPem } from "../pki/pem.js";
import type { AgentServiceContext, AttestationStateName } from "./context.js";
import { keyFamily, type HeldKey, type HolderEvent } from "./key-holder.js";
import type { IssuedLeaf } from "./leaf-issuer.js";
import { toKeyInfo, toWatchEvent } from "./key-info.js";
import { parseLeafRequest, parseSignRequest, tenantFilter, tenantId } from "./validate.js";
import { callerOf, requireWorkloadHeader } from "./workload.js";

/** Events a slow WatchKeys reader may fall behind by before its stream is ended. */
const MAX_PENDING_EVENTS = 1024;

const ATTESTATION: Record<AttestationStateName, AttestationState> = {
  attested: AttestationState.ATTESTED,
  not_attested: AttestationState.NOT_ATTESTED,
  refused: AttestationState.REFUSED,
  quarantined: AttestationState.QUARANTINED,
};

function iso(ms: number): string {
  return new Date(ms).toISOString();
}

function days(ms: number): string {
  const d = ms / 86_400_000;
  return Number.isInteger(d) ? `${d} days` : `${Math.round(d * 100) / 100} days`;
}

/** Creates the full KeyAgentService implementation over `ctx`. */
export function createKeyAgentService(ctx: AgentServiceContext): ServiceImpl<typeof KeyAgentService> {
  const { holder, clock, policy } = ctx;
  const log = ctx.logger;

  return {
    issueLeafCertificate(req, hctx) {
      requireWorkloadHeader(hctx);
      const leaf = parseLeafRequest(req);
      const now = clock.now();
      const earliest = now - policy.backdateMs;
      const latest = earliest + policy.maxLifetimeMs;
      if (leaf.notAfter !== undefined) {
        if (leaf.notAfter > latest) {
          throw new InvalidArgument(
            `not_after: ${iso(leaf.notAfter)} is beyond the maximum leaf lifetime (${days(policy.maxLifetimeMs)} including backdating, so at most ${iso(latest)}); ask for an earlier time, or leave it unset for the maximum`,
          );
        }
        if (leaf.notAfter <= now) throw new InvalidArgument(`not_after: ${iso(leaf.notAfter)} is not in the future`);
      }
      const held = holder.intermediateFor(leaf.tenantId);
      const inter = held.intermediate;
      if (inter.notAfter <= now) {
        throw new FailedPrecondition(`tenant_id: the intermediate of tenant "${leaf.tenantId}" expired at ${iso(inter.notAfter)}; activate or renew a version on the KDC`);
      }
      // Policy: never before the issuer's own validity, never past it (clamped, not refused).
      const notBefore = Math.max(earliest, inter.notBefore);
      const notAfter = Math.min(leaf.notAfter ?? latest, inter.notAfter);
      const issuing = inter.issuer.issueLeaf({
        publicKeySpkiDer: leaf.publicKeySpkiDer,
        dnsNames: leaf.dnsNames,
        ipAddresses: leaf.ipAddresses,
        commonName: leaf.commonName,
        notBefore: new Date(notBefore),
        notAfter: new Date(notAfter),
      });
      // Why not always await: a leaf signed here stays synchronous (the hot path); one signed
      // at the KDC (a key in its token) is a promise.
      const answer = (issued: IssuedLeaf) => leafIssued(log, held, leaf, issued, callerOf(hctx));
      return issuing instanceof Promise ? issuing.then(answer) : answer(issuing);
    },

    sign(req, hctx) {
      requireWorkloadHeader(hctx);
      const input = parseSignRequest(req);
      const key = holder.signingKey(input.keyRef);
      const family = keyFamily(key.keyAlgorithm);
      let signature: Buffer;
      switch (input.algorithm) {
        case SignatureAlgorithm.ECDSA_SHA256:
          if (family !== "ec") throw algorithmMismatch(input.algorithm, key.keyId, family);
          signature = cryptoSign("sha256", input.message, { key: key.privateKey, dsaEncoding: "der" });
          break;
        case SignatureAlgorithm.RSA_PKCS1_SHA256:
          if (family !== "rsa") throw algorithmMismatch(input.algorithm, key.keyId, family);
          signature = cryptoSign("sha256", input.message, { key: key.privateKey, padding: cryptoConstants.RSA_PKCS1_PADDING });
          break;
        case SignatureAlgorithm.RSA_PSS_SHA256:
          if (family !== "rsa") throw algorithmMismatch(input.algorithm, key.keyId, family);
          signature = cryptoSign("sha256", input.message, { key: key.privateKey, padding: cryptoConstants.RSA_PKCS1_PSS_PADDING, saltLength: 32 });
          break;
        default:
          throw new InvalidArgument(`algorithm: ${input.algorithm} is not supported`);
      }
      log.info("message signed", {
        tenant: key.tenantId,
        // key_id, not "key": the logger digests fields named like secrets, and a key id
        // (SHA-256 of the public key) is public and must stay readable in the log.
        key_id: key.keyId.slice(0, 16),
        name: key.name,
        algorithm: SignatureAlgorithm[input.algorithm],
        bytes: input.message.length,
        caller: callerOf(hctx),
      });
      return create(SignResponseSchema, { signature, keyId: key.keyId });
    },

    listKeys(req, hctx) {
      requireWorkloadHeader(hctx);
      const tenant = tenantFilter(req.tenantId);
      const now = clock.now();
      return create(ListKeysResponseSchema, { keys: holder.keys(tenant).map((k) => toKeyInfo(k, now)) });
    },

    getCertificateChain(req, hctx) {
      requireWorkloadHeader(hctx);
      const held = holder.intermediateFor(tenantId(req.tenantId));
      return create(GetCertificateChainResponseSchema, { chainPem: held.chainPem, version: held.version, keyId: held.keyId });
    },

    async *watchKeys(req, hctx) {
      requireWorkloadHeader(hctx);
      const tenant = tenantFilter(req.tenantId);
      const queue = new EventQueue(MAX_PENDING_EVENTS);
      // Subscribe before taking the snapshot, so no change falls between the two.
      const unsubscribe = holder.subscribe((events) => {
        for (const e of events) if (tenant === "" || e.tenantId === tenant || e.type === "quarantined") queue.push(e);
      });
      try {
        const now = clock.now();
        yield create(WatchKeysResponseSchema, {
          type: KeyEventType.SNAPSHOT,
          keys: holder.keys(tenant).map((k) => toKeyInfo(k, now)),
          reason: holder.quarantineReason === undefined ? "" : `machine quarantined: ${holder.quarantineReason}`,
          time: timestampFromMs(now),
        });
        for (;;) {
          const event = await queue.next(hctx, hctx.values.get(kDraining), ctx.stopping);
          if (event === undefined) return;
          yield event === "overflow" ? overflow() : toWatchEvent(event, clock.now());
        }
      } finally {
        unsubscribe();
      }
    },

    getStatus(_req, hctx) {
      requireWorkloadHeader(hctx);
      const s = ctx.status.status();
      const now = clock.now();
      return create(GetStatusResponseSchema, {
        version: ctx.version || VERSION,
        machineId: s.machineId,
        group: s.group,
        attestation: holder.quarantineReason !== undefined ? AttestationState.QUARANTINED : ATTESTATION[s.attestation],
        attestationProblem: holder.quarantineReason !== undefined ? `machine quarantined: ${holder.quarantineReason}` : s.attestationProblem,
        attestationExpiresAt: s.attestationExpiresAt === undefined ? undefined : timestampFromMs(s.attestationExpiresAt),
        certificateNotAfter: s.certificateNotAfter === undefined ? undefined : timestampFromMs(s.certificateNotAfter),
        kdcConnected: s.kdcConnected,
        lastSync: s.lastSync === undefined ? undefined : timestampFromMs(s.lastSync),
        kdcError: s.kdcError,
        keys: holder.keys().map((k) => toKeyInfo(k, now)),
        servingFromCache: s.servingFromCache,
        kdcUrl: s.kdcUrl ?? "",
        kdcRevision: s.kdcRevision ?? 0n,
        kdcFailovers: s.kdcFailovers ?? 0,
      });
    },
  };
}

function algorithmMismatch(algorithm: SignatureAlgorithm, keyId: string, family: "ec" | "rsa" | undefined): InvalidArgument {
  const want = family === "ec" ? "SIGNATURE_ALGORITHM_ECDSA_SHA256" : "SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256 or SIGNATURE_ALGORITHM_RSA_PSS_SHA256";
  return new InvalidArgument(`algorithm: SIGNATURE_ALGORITHM_${SignatureAlgorithm[algorithm]} does not fit key ${keyId} (${family === "ec" ? "ECDSA P-256" : "RSA"}); use ${want}`);
}

function overflow(): never {
  throw new ResourceExhausted("watch: the reader fell more than 1024 events behind; open a new WatchKeys stream");
}

/** Logs an issued leaf (context only, never key material) and builds the answer. */
function leafIssued(log: Logger, held: HeldKey, leaf: ReturnType<typeof parseLeafRequest>, issued: IssuedLeaf, caller: string) {
  const names = [...leaf.dnsNames, ...leaf.ipAddresses];
  log.info("leaf issued", {
    tenant: leaf.tenantId,
    names: names.length <= 8 ? names : names.slice(0, 8).concat("…"),
    serial: issued.serialHex,
    issuer_key: held.keyId.slice(0, 16),
    version: held.version,
    ...(held.kdcSigns === true ? { signed_by: "kdc" } : {}),
    leaf_key: leaf.publicKeyType,
    not_after: issued.notAfter.toISOString(),
    caller,
  });
  return create(IssueLeafCertificateResponseSchema, {
    certificatePem: certificateToPem(issued.certificateDer),
    chainPem: held.chainPem,
    intermediateVersion: held.version,
    issuerKeyId: held.keyId,
    serialHex: issued.serialHex,
    notAfter: timestampFromMs(issued.notAfter.getTime()),
  });
}

/** A bounded queue of holder events for one WatchKeys stream. */
class EventQueue {
  private readonly items: HolderEvent[] = [];
  private wake: (() => void) | undefined;
  private overflowed = false;

  constructor(private readonly limit: number) {}

  push(e: HolderEvent): void {
    if (this.items.length >= this.limit) this.overflowed = true;
    else this.items.push(e);
    this.wake?.();
  }

  /** The next event, "overflow", or undefined when the call or the server ends. */
  async next(hctx: HandlerContext, ...stops: (AbortSignal | undefined)[]): Promise<HolderEvent | "overflow" | undefined> {
    const signals = [hctx.signal, ...stops].filter((s): s is AbortSignal => s !== undefined);
    for (;;) {
      if (this.overflowed) return "overflow";
      if (signals.some((s) => s.aborted)) return undefined;
      const e = this.items.shift();
      if (e !== undefined) return e;
      await new Promise<void>((resolve) => {
        const done = () => {
          this.wake = undefined;
          for (const s of signals) s.removeEventListener("abort", done);
          resolve();
        };
        this.wake = done;
        for (const s of signals) s.addEventListener("abort", done);
      });
    }
  }
}
