/**
 * `kmi audit rekey` with real processes: refused while the Auditserver runs (LevelDB has one
 * process) and for a key from the environment, with nothing changed; on the stopped server it
 * rewraps its sealed keys, retires the old key file, and the restarted Auditserver serves, its
 * audit log verifies against a checkpoint exported before the rotation (the KDC's witness copy
 * included) and new checkpoints are signed with the same key; the retirement is in the log.
 */
import { execFile } from "node:child_process";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openAuditStore } from "../../../src/audit/init.js";
import { AUDIT_LOG_TABLE } from "../../../src/storage/audit-log.js";
import { readMasterKeyFile } from "../../../src/storage/master-key.js";
import { masterKeyId } from "../../../src/storage/seal.js";
import { KMI, cleanEnv, ctl, startMesh, type Mesh } from "./harness.js";

const run = promisify(execFile);
let mesh: Mesh;

async function rekey(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(process.execPath, [KMI, "audit", "rekey", "--data-dir", mesh.auditDataDir, ...args], { env: cleanEnv(env), encoding: "utf8" });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const x = err as { code: number; stdout: string; stderr: string };
    return { code: x.code, stdout: x.stdout, stderr: x.stderr };
  }
}

beforeAll(async () => {
  mesh = await startMesh();
}, 120_000);
afterAll(async () => mesh?.close());

describe("kmi audit rekey", () => {
  it("is refused while the Auditserver runs, and for a key from the environment; nothing changes", async () => {
    const keyFile = join(mesh.auditDataDir, "master.key");
    const before = masterKeyId(await readMasterKeyFile(keyFile));
    const busy = await rekey(["--json"]);
    expect(busy.code).toBe(1);
    expect(JSON.parse(busy.stderr).error.message).toMatch(/locked by another process/);
    const env = await rekey([], { KMI_AUDIT_MASTER_KEY: Buffer.alloc(32, 1).toString("base64") });
    expect(env.code).toBe(1);
    expect(env.stderr).toContain("KMI_AUDIT_MASTER_KEY");
    expect(env.stderr).not.toContain(Buffer.alloc(32, 1).toString("base64"));
    expect((await rekey(["--batch-size", "0"])).code).toBe(2);
    expect(masterKeyId(await readMasterKeyFile(keyFile))).toBe(before);
    expect((await readdir(mesh.auditDataDir)).filter((f) => f.startsWith("master.key"))).toEqual(["master.key"]);
  }, 60_000);

  it("rotates the stopped server's key; the restarted server serves and its log verifies against an older checkpoint", async () => {
    expect((await ctl(mesh, ["group", "create", "edge", "--all-tenants"])).code).toBe(0);
    const jt = await ctl(mesh, ["join-token", "create", "edge", "--json"]);
    expect(jt.code, jt.stderr).toBe(0);
    const checkpointFile = join(mesh.dir, "audit.checkpoint");
    const cp = await ctl(mesh, ["audit", "checkpoint", "--server", "audit", "--out", checkpointFile]);
    expect(cp.code, cp.stderr).toBe(0);
    await mesh.stopAudit();
    const keyFile = join(mesh.auditDataDir, "master.key");
    const oldId = masterKeyId(await readMasterKeyFile(keyFile));
    const r = await rekey(["--json"]);
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { old_key_id: string; new_key_id: string; sealed_records: number };
    // The attestation key, the TLS key and the pinned log keys.
    expect(out).toMatchObject({ old_key_id: oldId, sealed_records: 3 });
    expect(masterKeyId(await readMasterKeyFile(keyFile))).toBe(out.new_key_id);
    expect((await readdir(mesh.auditDataDir)).filter((f) => f.startsWith("master.key"))).toEqual(["master.key"]);

    await mesh.restartAudit();
    const verify = await ctl(mesh, ["audit", "verify", "--server", "audit", "--checkpoint", checkpointFile]);
    expect(verify.code, verify.stdout + verify.stderr).toBe(0);
    expect((await ctl(mesh, ["group", "list"])).code).toBe(0);
    // New checkpoints are signed with the same key as before the rotation (the witness pins it).
    const after = join(mesh.dir, "after.checkpoint");
    const cp2 = await ctl(mesh, ["audit", "checkpoint", "--server", "audit", "--out", after]);
    expect(cp2.code, cp2.stderr).toBe(0);
    const keyIdOf = async (f: string) => (JSON.parse(await readFile(f, "utf8")) as { keyId: string }).keyId;
    expect(await keyIdOf(after)).toBe(await keyIdOf(checkpointFile));
    await mesh.stopAudit();
    const store = await openAuditStore(mesh.auditDataDir, false);
    try {
      const entries = (await store.list(AUDIT_LOG_TABLE)).records.map((e) => e.value);
      expect(entries.filter((e) => e.action === "master_key.retire").map((e) => e.target)).toEqual([`master-key/${oldId}`]);
    } finally {
      await store.close();
    }
    await mesh.restartAudit();
  }, 120_000);
});
