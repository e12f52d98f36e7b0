/**
 * KdcService: the tenant-facing Certificate menu. Every method goes through `handle`
 * (authenticate -> validate -> authorize -> act -> map); the operations live in
 * ./operations.ts.
 */
import { create } from "@bufbuild/protobuf";
import type { ServiceImpl } from "@connectrpc/connect";
import {
  ActivateVersionResponseSchema,
  CertificateFormat,
  CreateSigningKeyResponseSchema,
  CreateVersionResponseSchema,
  DiscardPendingVersionResponseSchema,
  GetCaCertificatesResponseSchema,
  GetRotationPolicyResponseSchema,
  SetRotationPolicyResponseSchema,
  GetVersionCsrResponseSchema,
  KdcService,
  ListSigningKeysResponseSchema,
  ListVersionsResponseSchema,
  RenewVersionResponseSchema,
  RevokeSigningKeyResponseSchema,
  RevokeVersionResponseSchema,
  Signer,
  UploadIntermediateResponseSchema,
} from "../gen/kmi/kdc/v1/kdc_pb.js";
import { kDraining } from "../common/rpc.js";
import { encodePem } from "../pki/pem.js";
import { actorOf, authorize } from "./authz.js";
import type { KdcContext } from "./context.js";
import { authenticateTokenOrSession, handle } from "./handler.js";
import { intermediateVersion, signingKey } from "./mapping.js";
import { versionTarget, type KdcOperations } from "./operations.js";
import { RolloutStreams, rolloutStatus, watchRollout } from "./rollout-status.js";
import { RotationPolicies } from "./rotation-policy.js";
import * as V from "./validate.js";

const tenantNeed = (i: { tenantId: string }) => ({ kind: "tenant", tenantId: i.tenantId }) as const;

/** KdcService over the KDC's context and operations. */
export function createKdcService(ctx: KdcContext, ops: KdcOperations): ServiceImpl<typeof KdcService> {
  const pem = (spki: Uint8Array) => encodePem("PUBLIC KEY", spki);
  const iv = (r: Parameters<typeof intermediateVersion>[0]) => intermediateVersion(r, ctx.pki, { pendingTtlMs: ctx.pendingTtlMs, now: ctx.clock.now() });
  const rolloutStreams = new RolloutStreams();
  const policies = new RotationPolicies(ctx, ops);

  return {
    getCaCertificates: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: (r) => versionTarget(r.tenantId, r.version || "active"),
        auth: "token",
        parse: V.getCaCertificates,
        need: tenantNeed,
        act: async (_c, i) => {
          const v = await ops.versionForDownload(i.tenantId, i.version);
          const root = await ops.rootOf(v);
          const der = i.format === CertificateFormat.DER;
          const enc = (d: Uint8Array) => (der ? d : new Uint8Array(Buffer.from(ctx.pki.certificatePem(d), "utf8")));
          const intermediate = enc(v.certificateDer);
          const rootBytes = root === undefined ? new Uint8Array() : enc(root);
          return create(GetCaCertificatesResponseSchema, {
            version: iv(v),
            intermediate,
            root: rootBytes,
            chain: der ? intermediate : new Uint8Array(Buffer.concat([intermediate, rootBytes])),
            intermediateSha256: ctx.pki.summarize(v.certificateDer).sha256Fingerprint,
            rootSha256: root === undefined ? "" : ctx.pki.summarize(root).sha256Fingerprint,
          });
        },
      }),

    createVersion: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "ca.version.create",
        target: (r) => `tenant/${r.tenantId}`,
        auth: "token",
        parse: V.createVersion,
        need: tenantNeed,
        act: async (c, i) => {
          const { version } = await ops.createVersion(actorOf(c), i);
          const out = iv(version);
          return create(CreateVersionResponseSchema, { version: out, csrPem: i.signer === Signer.PRIVATE_CA ? out.csrPem : "" });
        },
      }),

    renewVersion: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "ca.version.renew",
        target: (r) => versionTarget(r.tenantId, r.version),
        auth: "token",
        parse: V.renewVersion,
        need: tenantNeed,
        act: async (c, i) => {
          const { version } = await ops.renewVersion(actorOf(c), i);
          const out = iv(version);
          return create(RenewVersionResponseSchema, { version: out, csrPem: i.signer === Signer.PRIVATE_CA ? out.csrPem : "" });
        },
      }),

    getVersionCsr: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: (r) => versionTarget(r.tenantId, r.version),
        auth: "token",
        parse: V.tenantVersion,
        need: tenantNeed,
        act: async (_c, i) => create(GetVersionCsrResponseSchema, { csrPem: ctx.pki.csrPem(await ops.versionCsr(i)) }),
      }),

    uploadIntermediate: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "ca.version.upload",
        target: (r) => versionTarget(r.tenantId, r.version || "pending"),
        auth: "token",
        parse: V.uploadIntermediate,
        need: tenantNeed,
        act: async (c, i) => create(UploadIntermediateResponseSchema, { version: iv((await ops.uploadIntermediate(actorOf(c), i)).version) }),
      }),

    activateVersion: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "ca.version.activate",
        target: (r) => versionTarget(r.tenantId, r.version),
        auth: "token",
        parse: V.activateVersion,
        need: tenantNeed,
        act: async (c, i) => {
          const r = await ops.activateVersion(actorOf(c), i);
          return create(ActivateVersionResponseSchema, { version: iv(r.version), ...(r.retired ? { retired: iv(r.retired) } : {}) });
        },
      }),

    revokeVersion: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "ca.version.revoke",
        target: (r) => versionTarget(r.tenantId, r.version),
        auth: "token",
        parse: V.revokeVersion,
        need: tenantNeed,
        act: async (c, i) => create(RevokeVersionResponseSchema, { version: iv(await ops.revokeVersion(actorOf(c), i)) }),
      }),

    discardPendingVersion: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "ca.version.discard",
        target: (r) => versionTarget(r.tenantId, r.version),
        auth: "token",
        parse: V.discardPendingVersion,
        need: tenantNeed,
        act: async (c, i) => create(DiscardPendingVersionResponseSchema, { version: iv(await ops.discardPendingVersion(actorOf(c), i)) }),
      }),

    listVersions: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: (r) => `tenant/${r.tenantId}`,
        auth: "token",
        parse: (r) => ({ tenantId: V.tenantId(r.tenantId) }),
        need: tenantNeed,
        act: async (_c, i) => create(ListVersionsResponseSchema, { versions: (await ops.listVersions(i.tenantId)).map(iv) }),
      }),

    getRolloutStatus: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: (r) => `tenant/${r.tenantId}`,
        auth: "token",
        parse: (r) => ({ tenantId: V.tenantId(r.tenantId) }),
        need: tenantNeed,
        act: (_c, i) => rolloutStatus(ctx, ops, i.tenantId),
      }),

    async *watchRolloutStatus(req, hctx) {
      const signal = AbortSignal.any([hctx.signal, hctx.values.get(kDraining)]);
      const stream = await handle(ctx, hctx, req, {
        target: (r) => `tenant/${r.tenantId}`,
        auth: "token",
        parse: (r) => ({ tenantId: V.tenantId(r.tenantId) }),
        need: tenantNeed,
        act: async (_c, i) => {
          await ops.requireTenant(i.tenantId);
          const release = rolloutStreams.take();
          return watchRollout({
            read: () => rolloutStatus(ctx, ops, i.tenantId),
            // The caller again each turn: a revoked token or ended session ends the stream.
            check: async () => authorize(await authenticateTokenOrSession(ctx, hctx), { kind: "tenant", tenantId: i.tenantId }),
            signal,
            release,
          });
        },
      });
      yield* stream;
    },

    createSigningKey: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "signing-key.create",
        target: (r) => `tenant/${r.tenantId}/signing-key/${r.name}`,
        auth: "token",
        parse: V.createSigningKey,
        need: tenantNeed,
        act: async (c, i) => create(CreateSigningKeyResponseSchema, { key: signingKey(await ops.createSigningKey(actorOf(c), i), pem) }),
      }),

    listSigningKeys: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: (r) => `tenant/${r.tenantId}`,
        auth: "token",
        parse: (r) => ({ tenantId: V.tenantId(r.tenantId) }),
        need: tenantNeed,
        act: async (_c, i) => {
          await ops.requireTenant(i.tenantId);
          return create(ListSigningKeysResponseSchema, { keys: (await ctx.store.listSigningKeys(i.tenantId)).map((k) => signingKey(k, pem)) });
        },
      }),

    getRotationPolicy: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: (r) => `tenant/${r.tenantId}`,
        auth: "token",
        parse: (r) => ({ tenantId: V.tenantId(r.tenantId) }),
        need: tenantNeed,
        act: async (_c, i) => create(GetRotationPolicyResponseSchema, { rotation: await policies.status(i.tenantId) }),
      }),

    setRotationPolicy: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "ca.policy.set",
        target: (r) => `tenant/${r.tenantId}`,
        auth: "token",
        parse: V.setRotationPolicy,
        need: tenantNeed,
        act: async (c, i) => create(SetRotationPolicyResponseSchema, { rotation: await policies.set(actorOf(c), i) }),
      }),

    revokeSigningKey: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "signing-key.revoke",
        target: (r) => `tenant/${r.tenantId}/signing-key/${r.name}`,
        auth: "token",
        parse: V.revokeSigningKey,
        need: tenantNeed,
        act: async (c, i) => create(RevokeSigningKeyResponseSchema, { key: signingKey(await ops.revokeSigningKey(actorOf(c), i), pem) }),
      }),
  };
}
