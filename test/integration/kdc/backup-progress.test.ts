/**
 * Progress with an estimate of `kmi kdc backup` and `kmi kdc restore`, as processes: on stderr
 * with --progress (stderr is not a terminal here, so without it only the closing line is
 * printed), never with --json; restore's estimate counts records against the backup's total.
 */
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { cleanEnv, cleanup, clients, initDataDir, KMI, startKdc, type DataDir } from "./harness.js";

const exec = promisify(execFile);
let data: DataDir;

async function kmiKdc(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await exec(process.execPath, [KMI, "kdc", ...args], { env: cleanEnv(), encoding: "utf8" });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const x = err as { code?: number; stdout?: string; stderr?: string };
    if (typeof x.code !== "number") throw err;
    return { code: x.code, stdout: x.stdout ?? "", stderr: x.stderr ?? "" };
  }
}

beforeAll(async () => {
  data = await initDataDir();
  const kdc = await startKdc(data.dataDir);
  const admin = clients(kdc.url, await readFile(data.caFile, "utf8"), { token: data.token })(KdcAdminService);
  for (let i = 0; i < 5; i++) await admin.createTenant({ tenantId: `t${i}`, bootstrapKmiSigned: true });
  expect(await kdc.stop("SIGTERM")).toBe(0);
}, 60_000);

afterAll(async () => cleanup(data?.dir));

describe("backup and restore progress", () => {
  it("backup --progress: bytes written of the store's size with an estimate, then the closing line; without it only the closing line", async () => {
    const withProgress = await kmiKdc(["backup", "--data-dir", data.dataDir, "--out", join(data.dir, "a.kbk"), "--progress"]);
    expect(withProgress.code, withProgress.stderr).toBe(0);
    const lines = withProgress.stderr.trimEnd().split("\n");
    expect(lines[0]).toMatch(/^kmi kdc backup: \d+ KB of \d+ KB written \(estimated from the store's size\) \(\d+%\), estimating…$/);
    expect(lines.at(-1)).toMatch(/^kmi kdc backup: \d+ records written to /);
    const quiet = await kmiKdc(["backup", "--data-dir", data.dataDir, "--out", join(data.dir, "b.kbk")]);
    expect(quiet.stderr).toMatch(/^kmi kdc backup: \d+ records written to \S+\n$/);
    const json = await kmiKdc(["backup", "--data-dir", data.dataDir, "--out", join(data.dir, "c.kbk"), "--json", "--progress"]);
    expect(json.stderr).toBe("");
    expect(JSON.parse(json.stdout)).toHaveProperty("records");
  });

  it("restore --progress: records of the backup's total with a percentage, then the closing line", async () => {
    const r = await kmiKdc(["restore", "--data-dir", join(data.dir, "restored"), "--in", join(data.dir, "a.kbk"), "--progress"]);
    expect(r.code, r.stderr).toBe(0);
    const total = Number(/restored \S+ into \S+: (\d+) records/.exec(r.stdout)?.[1]);
    expect(total).toBeGreaterThan(10);
    const lines = r.stderr.trimEnd().split("\n");
    expect(lines[0]).toBe(`kmi kdc restore: 1 of ${total} records (${Math.floor(100 / total)}%), estimating…`);
    expect(lines.at(-1)).toBe(`kmi kdc restore: ${total} records restored into ${join(data.dir, "restored")}`);
    const quiet = await kmiKdc(["restore", "--data-dir", join(data.dir, "restored-2"), "--in", join(data.dir, "a.kbk")]);
    expect(quiet.stderr).toBe(`kmi kdc restore: ${total} records restored into ${join(data.dir, "restored-2")}\n`);
  });
});
