/**
 * Input that crosses from one caller to another's screen: free text a tenant admin writes
 * (reasons) and raw request fields an unauthenticated caller gets into a refusal's audit target
 * end up in the operator's `kmi ctl` tables and in other tenants' audit trails. C1 control
 * characters (U+0080..U+009F) are control characters too: a terminal takes U+009B as CSI and
 * U+009D as OSC, so they must be refused (free text) or neutralized (targets, tables) like C0.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { Role } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { Signer, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { renderTable } from "../../../src/ctl/output.js";
import { initKdc, openKdc, type OpenedKdc } from "../../../src/kdc/init.js";
import { errorCode, kdcRouterClients } from "../../helpers/kdc-router.js";

const CSI = "\u009b";
const OSC = "\u009d";
const clock = { now: () => new Date("2030-03-01T12:00:00Z") };
let dir: string;
let kdc: OpenedKdc;
let operatorToken: string;
let acmeToken: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "kmi-kdc-input-"));
  const r = await initKdc({ dataDir: join(dir, "data"), tls: { dnsNames: [], ipAddresses: [] }, clock });
  operatorToken = r.operatorToken;
  kdc = await openKdc({ dataDir: join(dir, "data"), logger: createNopLogger(), clock });
  const { admin } = kdcRouterClients(kdc.ctx, operatorToken);
  await admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  acmeToken = (await admin.createToken({ role: Role.TENANT_ADMIN, tenantId: "acme" })).secret;
});

afterAll(async () => {
  await kdc?.store.close();
  await rm(dir, { recursive: true, force: true });
});

describe("C1 control characters", () => {
  it("in a tenant admin's revocation reason are INVALID_ARGUMENT, and nothing changes", async () => {
    const { ca } = kdcRouterClients(kdc.ctx, acmeToken);
    const v = (await ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT })).version!;
    expect(await errorCode(ca.revokeVersion({ tenantId: "acme", version: v.version, reason: `rotated${CSI}2J${OSC}0;owned` }))).toMatch(/^InvalidArgument: reason: contains control characters/);
    const after = (await ca.listVersions({ tenantId: "acme" })).versions.find((x) => x.version === v.version)!;
    expect(after.state).toBe(VersionState.READY);
    expect(after.revokeReason).toBe("");
  });

  it("in an unauthenticated caller's tenant id do not reach the audit log's target", async () => {
    const { admin } = kdcRouterClients(kdc.ctx, operatorToken);
    const head = (await admin.tailAuditLog({ last: true, limit: 1 })).headSeq;
    expect(await errorCode(kdcRouterClients(kdc.ctx).ca.createVersion({ tenantId: `acme${CSI}2J`, signer: Signer.KMI_ROOT }))).toMatch(/^Unauthenticated/);
    const entries = (await admin.tailAuditLog({ afterSeq: head })).entries;
    expect(entries.map((e) => e.outcome)).toEqual(["refused: unauthenticated"]);
    expect(entries[0]!.target).toBe("tenant/acme?2J");
  });

  it("are neutralized in kmi ctl's tables", () => {
    expect(renderTable([{ header: "target", value: (r: { t: string }) => r.t }], [{ t: `a${CSI}2Jb` }])).toBe("TARGET\na?2Jb\n");
  });
});
