/**
 * AuditService: the machine-facing API (enroll, renew, nonce, attest), the public attestation
 * key, and the status watch for the KDC. Machines are known from their mutual-TLS certificate
 * (`kPeer`); Enroll and GetAttestationKey need TLS only.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { publicKeyPem } from "../attest/index.js";
import { FailedPrecondition, PermissionDenied } from "../common/errors.js";
import { kDraining, kPeer, kPeerAddress, peerSource } from "../common/rpc.js";
import {
  AttestResponseSchema,
  AuditService,
  EnrollResponseSchema,
  GetAttestationKeyResponseSchema,
  GetAttestationNonceResponseSchema,
  GetWitnessedCheckpointResponseSchema,
  MachineStatusChangeSchema,
  RenewMachineCertificateResponseSchema,
  WatchMachineStatusResponseSchema,
  WitnessCheckpointResponseSchema,
  type WatchMachineStatusResponse,
} from "../gen/kmi/audit/v1/audit_pb.js";
import { attest, issueNonce } from "./attestation.js";
import { audited } from "./audited.js";
import type { AuditContext } from "./context.js";
import { enroll, renew } from "./enrollment.js";
import { requireMachinePeer, requireServicePeer } from "./identity.js";
import { quarantinedMachines } from "./machine-ops.js";
import type { StatusChange } from "./status-hub.js";
import * as V from "./validate.js";

/** A watch sends an empty message after this long without a change, so dead streams are noticed. */
export const WATCH_KEEPALIVE_MS = 15_000;

function peerActor(hctx: HandlerContext): string {
  const peer = hctx.values.get(kPeer);
  if (peer?.authorized && peer.machineId !== undefined) return `machine:${peer.machineId}`;
  if (peer?.authorized && peer.serviceName !== undefined) return `service:${peer.serviceName}`;
  return "anonymous";
}

/** The witness keeper, and the caller, which must be the KDC (kmi://service/kdc). */
function kdcWitness(ctx: AuditContext, hctx: HandlerContext) {
  if (requireServicePeer(hctx.values.get(kPeer)) !== "kdc") {
    throw new PermissionDenied("client certificate: only the KDC (kmi://service/kdc) keeps its audit checkpoints here");
  }
  if (ctx.witness === undefined) throw new FailedPrecondition("this Auditserver keeps no checkpoints");
  return ctx.witness;
}

function changeToProto(c: StatusChange) {
  return create(MachineStatusChangeSchema, { machineId: c.machineId, status: c.status, reason: c.reason, time: timestampFromDate(c.time) });
}

/** AuditService over the Auditserver's context. */
export function createAuditService(ctx: AuditContext, options: { keepaliveMs?: number } = {}): ServiceImpl<typeof AuditService> {
  const keepaliveMs = options.keepaliveMs ?? WATCH_KEEPALIVE_MS;
  const machineCall = <T>(hctx: HandlerContext, action: string, fn: () => Promise<T>): Promise<T> => {
    const actor = peerActor(hctx);
    const peer = hctx.values.get(kPeerAddress);
    // A verified machine or service certificate proves who calls; only the rest is budgeted.
    const source = actor === "anonymous" ? { source: peerSource(peer) } : {};
    return audited(ctx, () => ({ actor, action, target: actor.startsWith("machine:") ? `machine/${actor.slice(8)}` : "", details: { peer }, ...source }), fn);
  };

  return {
    enroll: (req, hctx) =>
      audited(
        ctx,
        () => ({ actor: "anonymous", action: "machine.enroll", target: "", details: { peer: hctx.values.get(kPeerAddress) }, source: peerSource(hctx.values.get(kPeerAddress)) }),
        async () => {
          const r = await enroll(ctx, V.parseEnroll(req), hctx.values.get(kPeerAddress));
          return create(EnrollResponseSchema, { machineId: r.machineId, group: r.group, certificatePem: r.certificatePem, caPem: r.caPem, notAfter: timestampFromDate(r.notAfter) });
        },
      ),

    renewMachineCertificate: (req, hctx) =>
      machineCall(hctx, "machine.renew", async () => {
        const caller = requireMachinePeer(hctx.values.get(kPeer));
        const r = await renew(ctx, caller, V.parseRenew(req).csrPem);
        return create(RenewMachineCertificateResponseSchema, { certificatePem: r.certificatePem, caPem: r.caPem, notAfter: timestampFromDate(r.notAfter) });
      }),

    getAttestationNonce: (_req, hctx) =>
      machineCall(hctx, "machine.nonce", async () => {
        const caller = requireMachinePeer(hctx.values.get(kPeer));
        const n = await issueNonce(ctx, caller);
        return create(GetAttestationNonceResponseSchema, { nonce: n.nonce, expiresAt: timestampFromDate(n.expiresAt) });
      }),

    attest: (req, hctx) =>
      machineCall(hctx, "machine.attest", async () => {
        const caller = requireMachinePeer(hctx.values.get(kPeer));
        const { evidence, signature } = V.parseAttest(req);
        const r = await attest(ctx, caller, evidence, signature);
        return create(AttestResponseSchema, { attestationToken: r.token, expiresAt: timestampFromDate(r.expiresAt) });
      }),

    getAttestationKey: async () =>
      create(GetAttestationKeyResponseSchema, { publicKeyPem: publicKeyPem(ctx.attestationKey.publicKey), keyId: ctx.attestationKey.keyId }),

    witnessCheckpoint: (req, hctx) =>
      machineCall(hctx, "audit.checkpoint.witness", async () => {
        const witnessed = await kdcWitness(ctx, hctx).accept("kdc", req.checkpoint);
        return create(WitnessCheckpointResponseSchema, { witnessed });
      }),

    getWitnessedCheckpoint: (req, hctx) =>
      machineCall(hctx, "audit.checkpoint.get_witnessed", async () => {
        const witnessed = await kdcWitness(ctx, hctx).get("kdc", req.keyId);
        return create(GetWitnessedCheckpointResponseSchema, witnessed === undefined ? {} : { witnessed });
      }),

    async *watchMachineStatus(_req, hctx): AsyncGenerator<WatchMachineStatusResponse> {
      // Subscribe before reading the snapshot, so no change falls between the two (a change
      // may then arrive twice: applying it again is harmless).
      const sub = await machineCall(hctx, "machine.watch_status", async () => {
        requireServicePeer(hctx.values.get(kPeer));
        return ctx.statusHub.subscribe();
      });
      const draining = hctx.values.get(kDraining);
      const stop = AbortSignal.any([hctx.signal, draining]);
      try {
        yield create(WatchMachineStatusResponseSchema, { snapshot: true, changes: (await quarantinedMachines(ctx)).map(changeToProto) });
        for (;;) {
          const next = await sub.next(stop, keepaliveMs);
          if (next === undefined) return;
          yield create(WatchMachineStatusResponseSchema, { snapshot: false, changes: next === "idle" ? [] : [changeToProto(next)] });
        }
      } finally {
        sub.close();
      }
    },
  };
}
