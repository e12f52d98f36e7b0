/**
 * PeerService: what other kmi services (the Auditserver) ask of the KDC, over mutual TLS with
 * a kmi://service/<name> certificate from the infrastructure CA.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { InvalidArgument } from "../common/errors.js";
import { AuthenticateTokenResponseSchema, IssueMachineCertificateResponseSchema, PeerService } from "../gen/kmi/kdc/v1/peer_pb.js";
import { actorOf, authenticateToken } from "./authz.js";
import type { KdcContext } from "./context.js";
import { handle } from "./handler.js";
import { tokenInfo } from "./mapping.js";
import type { KdcOperations } from "./operations.js";
import * as V from "./validate.js";

const service = () => ({ kind: "service" }) as const;
const auditService = () => ({ kind: "service", names: ["audit"] }) as const;

/** PeerService over the KDC's context and operations. */
export function createPeerService(ctx: KdcContext, ops: KdcOperations): ServiceImpl<typeof PeerService> {
  return {
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
          const caller = await authenticateToken(`Bearer ${i.token}`, ctx.store, ctx.clock.now());
          const record = await ctx.store.getToken(caller.tokenId);
          return create(AuthenticateTokenResponseSchema, { token: tokenInfo(record!) });
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
