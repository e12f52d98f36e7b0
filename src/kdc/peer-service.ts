/**
 * PeerService: what other kmi services (the Auditserver) ask of the KDC, over mutual TLS with
 * a kmi://service/<name> certificate from the infrastructure CA.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { FailedPrecondition, InvalidArgument } from "../common/errors.js";
import {
  AuthenticateTokenResponseSchema,
  GetWitnessedCheckpointResponseSchema,
  IssueMachineCertificateResponseSchema,
  PeerService,
  WitnessCheckpointResponseSchema,
} from "../gen/kmi/kdc/v1/peer_pb.js";
import { actorOf, authenticateToken } from "./authz.js";
import type { KdcContext } from "./context.js";
import { handle } from "./handler.js";
import { tokenInfo } from "./mapping.js";
import { liveSession } from "./portal-session.js";
import type { KdcOperations } from "./operations.js";
import * as V from "./validate.js";

const service = () => ({ kind: "service" }) as const;
const auditService = () => ({ kind: "service", names: ["audit"] }) as const;

function witness(ctx: KdcContext) {
  if (ctx.witness === undefined) throw new FailedPrecondition("this KDC keeps no checkpoints");
  return ctx.witness;
}

/** PeerService over the KDC's context and operations. */
export function createPeerService(ctx: KdcContext, ops: KdcOperations): ServiceImpl<typeof PeerService> {
  return {
    witnessCheckpoint: (req, hctx) =>
      handle(ctx, hctx, req, {
        // Why only refusals are logged: an accepted checkpoint is not a change of the KDC's
        // security state, and logging it would checkpoint again, back and forth.
        action: "audit.checkpoint.witness",
        target: () => "audit-checkpoint/audit",
        auth: "peer",
        parse: (r) => ({ checkpoint: r.checkpoint }),
        need: auditService,
        act: async (_c, i) => create(WitnessCheckpointResponseSchema, { witnessed: await witness(ctx).accept("audit", i.checkpoint) }),
      }),

    getWitnessedCheckpoint: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "audit-checkpoint/audit",
        auth: "peer",
        parse: (r) => ({ keyId: r.keyId }),
        need: auditService,
        act: async (_c, i) => {
          const witnessed = await witness(ctx).get("audit", i.keyId);
          return create(GetWitnessedCheckpointResponseSchema, witnessed === undefined ? {} : { witnessed });
        },
      }),

    authenticateToken: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "token",
        auth: "peer",
        parse: (r) => {
          if (r.token === "") throw new InvalidArgument("token: required; pass the bearer secret the operator sent");
          return { token: r.token };
        },
        need: service,
        act: async (_c, i) => {
          const now = ctx.clock.now();
          const caller = await authenticateToken(`Bearer ${i.token}`, ctx.store, now).catch(async (err: unknown) => {
            // A portal session relayed by a KDC (./audit-relay.ts) is shaped like a token.
            const s = /^kmi_([0-9a-f]{16})_(.+)$/.exec(i.token);
            const session = s === null ? undefined : await liveSession(ctx.store, s[2]!, now, s[1]!);
            if (session === undefined) throw err;
            return session;
          });
          if ("kind" in caller) {
            const record = await ctx.store.getToken(caller.tokenId);
            return create(AuthenticateTokenResponseSchema, { token: tokenInfo(record!), actor: actorOf(caller) });
          }
          return create(AuthenticateTokenResponseSchema, {
            actor: caller.tokenId === "" ? `session:${caller.sessionId}` : `token:${caller.tokenId}`,
            token: { tokenId: caller.sessionId, role: caller.role, tenantId: caller.tenantId, description: "portal session", ...(caller.createdAt ? { createdAt: caller.createdAt } : {}), ...(caller.expiresAt ? { expiresAt: caller.expiresAt } : {}) },
          });
        },
      }),

    issueMachineCertificate: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "machine-cert.issue",
        target: (r) => `machine/${r.machineId}`,
        auth: "peer",
        parse: V.issueMachineCertificate,
        need: auditService,
        act: async (c, i) => {
          const r = await ops.issueMachineCertificate(actorOf(c), i);
          return create(IssueMachineCertificateResponseSchema, {
            certificatePem: ctx.pki.certificatePem(r.certificateDer),
            caPem: ctx.pki.certificatePem(r.caDer),
            notAfter: timestampFromDate(r.notAfter),
          });
        },
      }),
  };
}
