/**
 * KdcAdminService: what an operator does on the KDC (tenants, tokens, service certificates,
 * the audit log, status); GetTrustBundle is public.
 */
import { create } from "@bufbuild/protobuf";
import type { ServiceImpl } from "@connectrpc/connect";
import { FailedPrecondition } from "../common/errors.js";
import { VERSION } from "../common/version.js";
import { verifyResponseFields } from "../storage/audit-checkpointer.js";
import { requireCheckpoint } from "../storage/audit-checkpoint.js";
import {
  CreateTenantResponseSchema,
  CreateTokenResponseSchema,
  GetKdcStatusResponseSchema,
  GetTenantResponseSchema,
  GetTrustBundleResponseSchema,
  IssueServiceCertificateResponseSchema,
  KdcAdminService,
  ListTenantsResponseSchema,
  ListTokensResponseSchema,
  RevokeTokenResponseSchema,
  TailAuditLogResponseSchema,
  TenantStatusSchema,
  VerifyAuditLogResponseSchema,
  GetAuditCheckpointResponseSchema,
} from "../gen/kmi/kdc/v1/admin_pb.js";
import { actorOf } from "./authz.js";
import type { AuditEntry } from "../storage/audit-log.js";
import type { KdcContext } from "./context.js";
import { handle } from "./handler.js";
import { CREDENTIAL } from "./kdc-store.js";
import { auditEntry, tenant, tokenInfo } from "./mapping.js";
import type { KdcOperations } from "./operations.js";
import * as V from "./validate.js";

const operator = () => ({ kind: "operator" }) as const;
const none = () => ({});

/** How far back a tenant's audit trail looks: the newest this many entries of the log. */
const TENANT_TRAIL_WINDOW = 10_000n;

/**
 * The entries about one tenant (target "tenant/<id>" or below it) among the newest
 * {@link TENANT_TRAIL_WINDOW}, read forward a page at a time: the first or last `limit`.
 */
async function tenantEntries(ctx: KdcContext, i: V.TailAuditLogInput): Promise<AuditEntry[]> {
  const head = await ctx.audit.head();
  const floor = head.seq > TENANT_TRAIL_WINDOW ? head.seq - TENANT_TRAIL_WINDOW : 0n;
  let after = i.afterSeq > floor ? i.afterSeq : floor;
  const out: AuditEntry[] = [];
  const mine = (e: AuditEntry) => e.target === `tenant/${i.tenantId}` || e.target.startsWith(`tenant/${i.tenantId}/`);
  for (;;) {
    const page = await ctx.audit.tail({ afterSeq: after, limit: 1000 });
    for (const e of page) {
      if (!mine(e)) continue;
      out.push(tenantView(e));
      if (!i.last && out.length === i.limit) return out;
      if (i.last && out.length > i.limit) out.shift();
    }
    if (page.length < 1000) return out;
    after = page[page.length - 1]!.seq;
  }
}

/**
 * An entry as a tenant's trail shows it. Why a refused call loses its actor and details: the
 * caller may be someone else's (another tenant's admin probing this tenant), and its token id
 * is not this tenant's to see. The unfiltered tail (operators) keeps them.
 */
function tenantView(e: AuditEntry): AuditEntry {
  return e.outcome === "ok" ? e : { ...e, actor: "(refused caller)", details: {} };
}

/** KdcAdminService over the KDC's context and operations. */
export function createAdminService(ctx: KdcContext, ops: KdcOperations): ServiceImpl<typeof KdcAdminService> {
  return {
    createTenant: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "tenant.create",
        target: (r) => `tenant/${r.tenantId}`,
        auth: "token",
        parse: V.createTenant,
        need: operator,
        act: async (c, i) => create(CreateTenantResponseSchema, { tenant: tenant(await ops.createTenant(actorOf(c), i)) }),
      }),

    listTenants: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "tenants",
        auth: "token",
        parse: none,
        need: operator,
        act: async () => create(ListTenantsResponseSchema, { tenants: (await ctx.store.listTenants()).map(tenant) }),
      }),

    getTenant: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: (r) => `tenant/${r.tenantId}`,
        auth: "token",
        parse: (r) => ({ tenantId: V.tenantId(r.tenantId) }),
        need: operator,
        act: async (_c, i) => create(GetTenantResponseSchema, { tenant: tenant(await ops.requireTenant(i.tenantId)) }),
      }),

    createToken: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "token.create",
        target: (r) => `tokens/${r.tenantId}`,
        auth: "token",
        parse: V.createToken,
        need: operator,
        act: async (c, i) => {
          const { record, bearer } = await ops.createToken(actorOf(c), i);
          return create(CreateTokenResponseSchema, { token: tokenInfo(record), secret: bearer });
        },
      }),

    revokeToken: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "token.revoke",
        target: (r) => `token/${r.tokenId}`,
        auth: "token",
        parse: (r) => ({ tokenId: V.tokenId(r.tokenId) }),
        need: operator,
        act: async (c, i) => create(RevokeTokenResponseSchema, { token: tokenInfo(await ops.revokeToken(actorOf(c), i.tokenId)) }),
      }),

    listTokens: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "tokens",
        auth: "token",
        parse: none,
        need: operator,
        act: async () => {
          const tokens = await ctx.store.listTokens();
          tokens.sort((a, b) => Number((a.createdAt?.seconds ?? 0n) - (b.createdAt?.seconds ?? 0n)) || a.tokenId.localeCompare(b.tokenId));
          return create(ListTokensResponseSchema, { tokens: tokens.map(tokenInfo) });
        },
      }),

    issueServiceCertificate: (req, hctx) =>
      handle(ctx, hctx, req, {
        action: "service-cert.issue",
        target: (r) => `service/${r.serviceName}`,
        auth: "token",
        parse: V.issueServiceCertificate,
        need: operator,
        act: async (c, i) => {
          const r = await ops.issueServiceCertificate(actorOf(c), i);
          return create(IssueServiceCertificateResponseSchema, { certificatePem: ctx.pki.certificatePem(r.certificateDer), caPem: ctx.pki.certificatePem(r.caDer) });
        },
      }),

    getTrustBundle: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "trust-bundle",
        auth: "none",
        parse: none,
        need: () => ({ kind: "public" }) as const,
        act: async () =>
          create(GetTrustBundleResponseSchema, {
            kmiRootPem: ctx.pki.certificatePem(await ops.credentialCertificate(CREDENTIAL.kmiRoot)),
            infrastructureCaPem: ctx.pki.certificatePem(await ops.credentialCertificate(CREDENTIAL.infraCa)),
          }),
      }),

    tailAuditLog: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "audit-log",
        auth: "token",
        parse: V.tailAuditLog,
        need: (i) => (i.tenantId === "" ? operator() : ({ kind: "tenant", tenantId: i.tenantId } as const)),
        act: async (_c, i) => {
          const entries = i.tenantId === "" ? await ctx.audit.tail({ afterSeq: i.afterSeq, limit: i.limit, last: i.last }) : await tenantEntries(ctx, i);
          const head = await ctx.audit.head();
          return create(TailAuditLogResponseSchema, { entries: entries.map(auditEntry), headSeq: head.seq });
        },
      }),

    verifyAuditLog: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "audit-log",
        auth: "token",
        parse: (r) => ({ checkpoint: r.checkpoint === undefined ? undefined : requireCheckpoint(r.checkpoint, "checkpoint") }),
        need: operator,
        act: async (_c, i) => {
          if (ctx.checkpoints === undefined) {
            if (i.checkpoint !== undefined) throw new FailedPrecondition("checkpoint: this KDC keeps no checkpoints");
            const r = await ctx.audit.verify();
            return create(VerifyAuditLogResponseSchema, verifyResponseFields(r));
          }
          const r = await ctx.checkpoints.verify(i.checkpoint);
          return create(VerifyAuditLogResponseSchema, verifyResponseFields(r));
        },
      }),

    getAuditCheckpoint: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "audit-log",
        auth: "token",
        parse: none,
        need: operator,
        act: async () => {
          const checkpoint = await ctx.checkpoints?.checkpoint();
          if (checkpoint === undefined) throw new FailedPrecondition("audit log: no checkpoint to export (the log is empty, or this KDC keeps none)");
          return create(GetAuditCheckpointResponseSchema, { checkpoint, witness: await ctx.checkpoints!.witnessed() });
        },
      }),

    getKdcStatus: (req, hctx) =>
      handle(ctx, hctx, req, {
        target: () => "kdc",
        auth: "token",
        parse: none,
        need: operator,
        act: async () => {
          const tenants = await ctx.store.listTenants();
          const statuses = [];
          for (const t of tenants) {
            const reports = await ctx.store.listRollout(t.tenantId);
            statuses.push(
              create(TenantStatusSchema, {
                tenantId: t.tenantId,
                activeVersion: t.activeVersion,
                machinesUpToDate: reports.filter((m) => t.activeVersion !== 0 && m.heldVersion === t.activeVersion).length,
                machinesTotal: reports.length,
              }),
            );
          }
          const head = await ctx.audit.head();
          return create(GetKdcStatusResponseSchema, {
            version: VERSION,
            uptimeSeconds: BigInt(Math.max(0, Math.floor((ctx.clock.now().getTime() - ctx.startedAt.getTime()) / 1000))),
            tenants: statuses,
            connectedAgents: ctx.watches.connectedCount,
            auditHeadSeq: head.seq,
            attestationKeyLoaded: ctx.attestationKey.loaded,
          });
        },
      }),
  };
}
