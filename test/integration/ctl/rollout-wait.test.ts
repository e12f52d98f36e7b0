/**
 * `kmi ctl ca status --wait`: a rollout to many machines watched to its end, as the built program
 * against a real KDC. Six machines (real identities from the KDC, attestation tokens signed with
 * the key the KDC was given) report what they hold over DistributionService, one after the other;
 * the command shows "N of 6 machines hold v2" with an estimate on stderr (--progress: stderr is
 * not a terminal here), exits 0 once all hold it, and exits 1 naming the count when
 * --wait-timeout passes first.
 */
import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Signer } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { Machine, signToken, type TokenKey } from "../../fixtures/kdc/machines.js";
import { attestationKeyFile, distributionClient, issueMachines, issueService, operator } from "../../fixtures/kdc/mesh.js";
import { cleanEnv, cleanup, ctl, initDataDir, KMI, startKdc, type DataDir, type KdcProcess } from "../kdc/harness.js";

let data: DataDir;
let caPem: string;
let kdc: KdcProcess;
let tokenKey: TokenKey;
const machines = Array.from({ length: 6 }, (_, i) => new Machine(`m-f00000000000000${i}`));
const closers: (() => void)[] = [];

const ops = () => operator(kdc.url, caPem, data.token);

async function report(m: Machine, version: number): Promise<void> {
  const v = (await ops().ca.listVersions({ tenantId: "acme" })).versions.find((x) => x.version === version)!;
  const c = distributionClient(kdc.url, caPem, m);
  closers.push(c.close);
  await c.client.reportHeldVersions({ attestationToken: signToken(tokenKey, { machineId: m.machineId, cert: m.certPem }), held: [{ tenantId: "acme", keyId: v.keyId, version }] });
}

beforeAll(async () => {
  data = await initDataDir();
  caPem = await readFile(data.caFile, "utf8");
  const key = await attestationKeyFile(data);
  tokenKey = key.key;
  kdc = await startKdc(data.dataDir, ["--attestation-key-file", key.file]);
  // Only the Auditserver may mint machine identities: a service certificate named "audit" stands in.
  await issueMachines(kdc.url, caPem, await issueService(kdc.url, caPem, data.token, "audit"), machines);
  await ops().admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  for (const m of machines) await report(m, 1);
}, 60_000);

afterAll(async () => {
  for (const c of closers) c();
  await kdc?.stop("SIGKILL");
  await cleanup(data?.dir);
});

describe("kmi ctl ca status --wait", () => {
  it("shows N of 6 machines holding v2 with an estimate while they report, and exits 0 once all do", async () => {
    await ops().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, activate: true });
    const env = cleanEnv({ KMI_CTL_KDC: kdc.url, KMI_CTL_CA_FILE: data.caFile, KMI_CTL_TOKEN_FILE: data.tokenFile });
    const child = spawn(process.execPath, [KMI, "ctl", "ca", "status", "--tenant", "acme", "--wait", "--progress", "--wait-timeout", "120"], { env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
    // The machines report one after the other, each once the command has shown the previous count.
    for (let i = 0; i < machines.length; i++) {
      for (let n = 0; n < 300 && !stderr.includes(`: ${i} of 6 machines hold v2`); n++) await new Promise((r) => setTimeout(r, 100));
      expect(stderr).toContain(`: ${i} of 6 machines hold v2`);
      await report(machines[i]!, 2);
    }
    expect(await exited, stderr).toBe(0);
    const lines = stderr.trimEnd().split("\n");
    expect(lines[0]).toBe("kmi ctl ca status: 0 of 6 machines hold v2 (0%), estimating…");
    expect(lines.some((l) => /^kmi ctl ca status: [1-5] of 6 machines hold v2 \(\d+%\), about \d+ (s|min)\b.* left$/.test(l)), stderr).toBe(true);
    expect(lines.at(-1)).toBe("kmi ctl ca status: 6 of 6 machines hold v2");
    expect(stdout).toMatch(/^active version: 2\n6 of 6 machines hold it/);
  });

  it("exits 1 naming how many hold it when --wait-timeout passes first; --json prints the status without progress", async () => {
    await ops().ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT, activate: true });
    await report(machines[0]!, 3);
    const r = await ctl(kdc, data, ["ca", "status", "--tenant", "acme", "--wait", "--wait-timeout", "1", "--progress"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("kmi ctl: the rollout of version 3 is not complete after 1 s: 1 of 6 machines hold it");
    const j = await ctl(kdc, data, ["ca", "status", "--tenant", "acme", "--wait", "--wait-timeout", "1", "--progress", "--json"]);
    expect(j.code).toBe(1);
    expect(j.stderr).toBe("");
    expect(JSON.parse(j.stdout)).toMatchObject({ activeVersion: 3, upToDateCount: 1 });
  });
});
