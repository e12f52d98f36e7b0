/**
 * Issue #11.1: whoever can write a server's store, but holds no signing key, cannot rewrite its
 * audit log unnoticed. For the KDC's and the Auditserver's log, the store is rewritten while
 * both servers are stopped (LevelDB opened directly, every hash recomputed, the head fixed) in
 * the three ways of the issue, and `kmi ctl audit verify` must fail naming the first sequence
 * number that differs. Then the same with the checkpoint records deleted as well (only the
 * witness's copy is left), and with an exported checkpoint file.
 */
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuditAdminService } from "../../../src/gen/kmi/audit/v1/admin_pb.js";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { clients, ctl, type CtlResult } from "../kdc/harness.js";
import { deleteTable, initWitnessPair, rewriteAuditLog, type Rewrite, type WitnessPair } from "../../fixtures/storage/audit-rewrite.js";

let pair: WitnessPair;
const heads: Record<"kdc" | "audit", number> = { kdc: 0, audit: 0 };

async function verify(server: "kdc" | "audit", extra: string[] = []): Promise<CtlResult & { json: Record<string, unknown> }> {
  const r = await ctl({ url: pair.kdcUrl }, { caFile: pair.caFile, tokenFile: pair.tokenFile }, ["audit", "verify", "--server", server, "--audit", pair.auditUrl, "--json", ...extra]);
  return { ...r, json: r.stdout.trim() === "" ? {} : (JSON.parse(r.stdout) as Record<string, unknown>) };
}

beforeAll(async () => {
  pair = await initWitnessPair();
  await pair.start();
  const kdc = clients(pair.kdcUrl, pair.caPem, { token: pair.token });
  const audit = clients(pair.auditUrl, pair.caPem, { token: pair.token });
  // Changes (each signed at once) and refusals (signed with the next change or at shutdown).
  for (let i = 0; i < 14; i++) {
    await kdc(KdcAdminService).createTenant({ tenantId: `t${i}` });
    await kdc(KdcAdminService).createTenant({ tenantId: `t${i}` }).catch(() => undefined);
    await audit(AuditAdminService).createGroup({ name: `g${i}`, tenantIds: ["t0"] });
    await audit(AuditAdminService).createGroup({ name: `g${i}`, tenantIds: ["t0"] }).catch(() => undefined);
  }
  heads.kdc = Number((await kdc(KdcAdminService).tailAuditLog({ last: true, limit: 1 })).headSeq);
  heads.audit = Number((await audit(AuditAdminService).tailAuditLog({ last: true, limit: 1 }, {})).headSeq);
  expect(heads.kdc).toBeGreaterThan(25);
  expect(heads.audit).toBeGreaterThan(25);
  for (const server of ["kdc", "audit"] as const) {
    const r = await ctl({ url: pair.kdcUrl }, { caFile: pair.caFile, tokenFile: pair.tokenFile }, ["audit", "checkpoint", "--server", server, "--audit", pair.auditUrl, "--out", join(pair.dir, `${server}.checkpoint.json`)]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`^seq: +${heads[server]}\nhash: +[0-9a-f]{64}\n[^]*^witness: +holds seq ${heads[server]}$`, "m"));
  }
  await pair.stop();
  await pair.save("pristine");
});

afterAll(async () => {
  await pair?.close();
});

const rewrites: [string, Rewrite, (head: number) => number][] = [
  ["an entry edited and everything after it re-chained", { kind: "edit", at: 7 }, () => 7],
  ["ten entries deleted and the rest renumbered and re-chained", { kind: "delete", at: 9, count: 10 }, () => 9],
  ["the last entry deleted and the head fixed", { kind: "truncate" }, (head) => head],
];

describe.each(["kdc", "audit"] as const)("the %s's audit log rewritten in its store", (server) => {
  it("verifies before any rewrite, against its checkpoints and the witness", async () => {
    await pair.restore("pristine");
    await pair.start();
    try {
      const r = await verify(server);
      expect(r.code, r.stderr).toBe(0);
      expect(r.json).toMatchObject({ ok: true, witness: expect.stringMatching(/^checked at seq \d+$/) });
      expect(Number(r.json["checkpointSeq"])).toBeGreaterThanOrEqual(heads[server]);
      const metrics = await pair.metrics(server);
      expect(metrics).toMatch(new RegExp(`^kmi_${server}_audit_checkpoints_stopped 0$`, "m"));
      expect(Number(new RegExp(`^kmi_${server}_audit_checkpoint_seq (\\d+)$`, "m").exec(metrics)?.[1])).toBeGreaterThanOrEqual(heads[server]);
    } finally {
      await pair.stop();
    }
  });

  it.each(rewrites)("%s: verify fails naming the sequence number", async (_name, rewrite, expected) => {
    await pair.restore("pristine");
    await rewriteAuditLog(join(server === "kdc" ? pair.kdcDir : pair.auditDir, "store"), rewrite);
    await pair.start();
    try {
      const r = await verify(server);
      expect(r.code, `${r.stdout}\n${r.stderr}\n${pair.logs()}`).toBe(1);
      expect(r.json).toMatchObject({ ok: false, firstBadSeq: String(expected(heads[server])) });
      expect(String(r.json["problem"])).toContain(`${expected(heads[server])}`);
      const human = await ctl({ url: pair.kdcUrl }, { caFile: pair.caFile, tokenFile: pair.tokenFile }, ["audit", "verify", "--server", server, "--audit", pair.auditUrl]);
      expect(human.code).toBe(1);
      expect(human.stdout).toContain(`audit log BROKEN at entry ${expected(heads[server])}: `);
      // The rewritten server stopped signing (and says so to monitoring); the other did not.
      expect(await pair.metrics(server)).toMatch(new RegExp(`^kmi_${server}_audit_checkpoints_stopped 1$`, "m"));
      const other = server === "kdc" ? "audit" : "kdc";
      expect(await pair.metrics(other)).toMatch(new RegExp(`^kmi_${other}_audit_checkpoints_stopped 0$`, "m"));
    } finally {
      await pair.stop();
    }
  });

  it("an exported checkpoint: verify --checkpoint proves the log extends it, refuses another log's or an edited file, and names the entry after a rewrite", async () => {
    const file = join(pair.dir, `${server}.checkpoint.json`);
    const otherFile = join(pair.dir, `${server === "kdc" ? "audit" : "kdc"}.checkpoint.json`);
    const edited = join(pair.dir, `${server}.edited.json`);
    const json = JSON.parse(await readFile(file, "utf8")) as Record<string, unknown>;
    await writeFile(edited, JSON.stringify({ ...json, seq: String(Number(json["seq"]) + 1) }));
    await pair.restore("pristine");
    await pair.start();
    try {
      const ok = await ctl({ url: pair.kdcUrl }, { caFile: pair.caFile, tokenFile: pair.tokenFile }, ["audit", "verify", "--server", server, "--audit", pair.auditUrl, "--checkpoint", file]);
      expect(ok.code, ok.stderr).toBe(0);
      expect(ok.stdout).toContain(`given checkpoint: seq ${heads[server]} is still part of the log`);
      const other = await verify(server, ["--checkpoint", otherFile]);
      expect(other.code).toBe(5);
      expect(other.stderr).toMatch(/checkpoint: signed by key [0-9a-f]{16}…, not by this log's checkpoint key/);
      const bad = await verify(server, ["--checkpoint", edited]);
      expect(bad.code).toBe(5);
      expect(bad.stderr).toMatch(/checkpoint: signature does not verify/);
    } finally {
      await pair.stop();
    }
    await rewriteAuditLog(join(server === "kdc" ? pair.kdcDir : pair.auditDir, "store"), { kind: "edit", at: 3 });
    await pair.start();
    try {
      const r = await verify(server, ["--checkpoint", file]);
      expect(r.code).toBe(1);
      expect(r.json).toMatchObject({ ok: false, firstBadSeq: "3" });
    } finally {
      await pair.stop();
    }
  });

  it("the last entry deleted and the checkpoints deleted too: the witness's copy still names it", async () => {
    await pair.restore("pristine");
    const store = join(server === "kdc" ? pair.kdcDir : pair.auditDir, "store");
    await rewriteAuditLog(store, { kind: "truncate" });
    expect(await deleteTable(store, "audit_checkpoints")).toBeGreaterThan(0);
    await pair.start();
    try {
      const r = await verify(server);
      expect(r.code, `${r.stdout}\n${r.stderr}\n${pair.logs()}`).toBe(1);
      // The witness was handed the checkpoint of the last change; what followed (refusals) is
      // signed only in the store, so the witness names the first seq it can.
      expect(Number(r.json["firstBadSeq"])).toBeGreaterThan(0);
      expect(Number(r.json["firstBadSeq"])).toBeLessThanOrEqual(heads[server]);
      expect(String(r.json["problem"])).toMatch(/witness/);
    } finally {
      await pair.stop();
    }
  });
});
