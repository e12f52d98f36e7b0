/**
 * The agent's side of a scheduled rotation (issue #13), with real `kmi kdc` (LevelDB, scheduler
 * every 200 ms), `kmi audit` and `kmi agent` processes: the scheduler stages v2 and sends it as
 * STAGED; the agent holds it beside v1 and reports it; the KDC activates it because the fleet
 * (this one machine) holds it, with the activation timeout at 24 h, so only the report can have
 * activated it; the agent then signs with v2, judged by openssl.
 */
import { generateKeyPairSync } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Mesh } from "../../fixtures/mesh/mesh.js";
import { runTool, until } from "../../fixtures/mesh/processes.js";

let mesh: Mesh;

beforeAll(async () => {
  mesh = await Mesh.start({ kdcFlags: ["--scheduler-interval", "200ms"] });
}, 90_000);

afterAll(async () => {
  await mesh?.close();
});

function issue() {
  const publicKey = generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey.export({ type: "spki", format: "der" });
  return mesh.agentClient().unary("issueLeafCertificate", { tenantId: mesh.tenant, publicKey, dnsNames: ["www.example.test"], ipAddresses: [] });
}

describe("a rotation staged by the KDC's scheduler", () => {
  it("the agent holds and reports the staged version, the KDC activates it on the fleet's report (not the timeout), the agent signs with it", async () => {
    expect((await mesh.agentClient().unary("getCertificateChain", { tenantId: mesh.tenant })).version).toBe(1);
    await mesh.ctlOk(["ca", "policy", "--tenant", mesh.tenant, "--rotate-every", "30d", "--activation-timeout", "24h", "--next-rotation", "now"]);

    const held = await mesh.agent.waitForLog("staged version held; it signs nothing until the KDC activates it", 20_000);
    expect(held).toMatchObject({ tenant: mesh.tenant, version: 2 });
    const activated = await mesh.kdc.waitForLog("scheduler: activated the staged version; the fleet holds it", 20_000);
    // 1/1: the one reporting machine held v2 while it was only staged, which it can only have said by reporting it.
    expect(activated).toMatchObject({ tenant: mesh.tenant, version: 2, fleet_held: "1/1" });
    expect(mesh.kdc.entries("scheduler: activated the staged version after the activation timeout; not every machine held it")).toEqual([]);
    expect(mesh.agent.entries("kdc: unknown watch event ignored")).toEqual([]);

    await until("the agent's chain at v2", async () => ((await mesh.agentClient().unary("getCertificateChain", { tenantId: mesh.tenant })).version === 2 ? true : undefined), 10_000);
    const leaf = await issue();
    expect(leaf.intermediateVersion).toBe(2);
    const [root, inter] = await Promise.all([mesh.download("root"), mesh.download("intermediate", "acme-v2-intermediate.pem")]);
    const leafFile = join(mesh.dir, "staged-leaf.pem");
    await writeFile(leafFile, leaf.certificatePem);
    const verified = await runTool("openssl", ["verify", "-CAfile", root, "-untrusted", inter, "-purpose", "sslserver", leafFile]);
    expect(`${verified.code} ${verified.stdout}${verified.stderr}`.trim()).toMatch(/^0 .*: OK$/);

    type Status = { activeVersion: number; machines: { machineId: string; heldVersion: number; upToDate: boolean }[] };
    const status = await until("ca status shows the machine on v2", async () => {
      const s = await mesh.ctlJson<Status>(["ca", "status", "--tenant", mesh.tenant]);
      return s.machines.some((m) => m.machineId === mesh.machineId && m.heldVersion === 2 && m.upToDate) ? s : undefined;
    }, 10_000);
    expect(status.activeVersion).toBe(2);
  });
});
