/**
 * DistributionService: the machine-facing API. Every call runs the one handler pipeline with
 * `auth: "machine"`: the mutual-TLS machine certificate (kmi://machine/<id>) and an attestation
 * token bound to it (./machine-auth.ts) authenticate; `authorize` refuses anything but an
 * attested, non-quarantined machine; every refusal is audited with the token only as a keyed
 * hash. Secrets are released by ./release.ts (unsealed for the wrap only, wrapped to the
 * machine certificate's key, audited before the response leaves), streams by ./watch-hub.ts.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { kDraining, kPeer } from "../common/rpc.js";
import {
  FetchSecretsResponseSchema,
  ReportHeldVersionsResponseSchema,
  type DistributionService,
  type FetchSecretsRequest,
  type FetchSecretsResponse,
  type WatchSecretsRequest,
  type WatchSecretsResponse,
} from "../gen/kmi/kdc/v1/distribution_pb.js";
import type { AttestedMachine, Caller } from "./authz.js";
import type { KdcContext } from "./context.js";
import { handle } from "./handler.js";
import type { KdcOperations } from "./operations.js";
import { TokenLeafSigner } from "./leaf-signing.js";
import { recipientOf, SecretRelease, wipe } from "./release.js";
import * as V from "./validate.js";
import { requireNotQuarantined } from "./watch-hub.js";

const attested = () => ({ kind: "attested-machine" }) as const;
const nothing = () => ({});

/** The audit target of a distribution call: the machine its certificate names, when it verified. */
function machineTarget(hctx: HandlerContext): string {
  const peer = hctx.values.get(kPeer);
  return peer?.authorized === true && peer.machineId !== undefined ? `machine/${peer.machineId}` : "machine/unknown";
}

/** `authorize` let only an attested machine through. */
function asAttested(c: Caller): AttestedMachine {
  if (c.kind !== "machine" || c.attestation === undefined) throw new Error("unreachable: authorize admits attested machines only");
  return c as AttestedMachine;
}

/** DistributionService over the KDC's context and operations. */
export function createDistributionService(ctx: KdcContext, ops: KdcOperations): ServiceImpl<typeof DistributionService> {
  const release = new SecretRelease(ctx);
  const leaves = new TokenLeafSigner(ctx);
  return {
    fetchSecrets: async (req, hctx) => {
      const slot = ctx.watches.admit(false);
      try {
        return await fetchSecrets(req, hctx);
      } finally {
        slot();
      }
    },

    async *watchSecrets(req, hctx): AsyncGenerator<WatchSecretsResponse> {
      // Admission first: a replica that cannot take the stream says so before any work.
      const slot = ctx.watches.admit(true);
      let stream: AsyncIterable<WatchSecretsResponse>;
      try {
        stream = await openWatch(req, hctx);
      } finally {
        slot();
      }
      yield* stream;
    },

    reportHeldVersions: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "rollout.report",
        target: () => machineTarget(hctx),
        auth: "machine",
        attestationToken: (r) => r.attestationToken,
        parse: V.reportHeldVersions,
        need: attested,
        act: async (c, i) => {
          await ops.reportHeldVersions(asAttested(c), i);
          return create(ReportHeldVersionsResponseSchema, {});
        },
      }),

    signLeaf: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "leaf.sign",
        target: () => machineTarget(hctx),
        auth: "machine",
        attestationToken: (r) => r.attestationToken,
        parse: V.signLeaf,
        need: attested,
        act: (c, i) => leaves.sign(asAttested(c), i),
      }),
  };

  function fetchSecrets(req: FetchSecretsRequest, hctx: HandlerContext): Promise<FetchSecretsResponse> {
    return handle(ctx, hctx, req, {
        action: "secret.release",
        target: () => machineTarget(hctx),
        auth: "machine",
        attestationToken: (r) => r.attestationToken,
        parse: nothing,
        need: attested,
        act: async (c) => {
          const m = asAttested(c);
          const a = m.attestation;
          const items = await release.secretsOf(await release.servedTenants(a.tenantIds));
          try {
            requireNotQuarantined(ctx.quarantine, m.machineId);
            // Fail-closed: the entry is written before any wrapped key leaves the KDC.
            await release.auditToMachine(m.machineId, "fetch", items, { token_jti: a.jti, group: a.group });
            const now = ctx.clock.now();
            return create(FetchSecretsResponseSchema, {
              secrets: release.wrap(items, recipientOf(m.machineId, a), now),
              serverTime: timestampFromDate(now),
            });
          } finally {
            wipe(items);
          }
        },
      });
  }

  function openWatch(req: WatchSecretsRequest, hctx: HandlerContext): Promise<AsyncIterable<WatchSecretsResponse>> {
    const stop = AbortSignal.any([hctx.signal, hctx.values.get(kDraining)]);
    return handle(ctx, hctx, req, {
      action: "secret.release",
      target: () => machineTarget(hctx),
      auth: "machine",
      attestationToken: (r) => r.attestationToken,
      parse: nothing,
      need: attested,
      act: (c) => ctx.watches.open(asAttested(c), stop, req.resumeFromRevision),
    });
  }
}
