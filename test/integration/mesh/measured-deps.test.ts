/**
 * Issue 17 with real processes (`kmi kdc`, `kmi audit`, `kmi agent`): the agent measures a
 * node_modules tree (a small one this test owns, measured as the dependencies of the package
 * beside it), the group approves it, and one changed file in one dependency makes the running
 * agent's next attestation refused by the Auditserver, naming agent.deps; so does a change of the
 * proxy's config file (proxy.config), which the harness measures as `kmi up` does. The group's tokens
 * live 60 s (the shortest allowed), so the agent attests again on its own after 40 s.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Mesh } from "../../fixtures/mesh/mesh.js";
import { until } from "../../fixtures/mesh/processes.js";

const tree = mkdtempSync(join(tmpdir(), "kmi-deps-tree-"));
const depFile = join(tree, "node_modules", "left-pad", "index.js");
let mesh: Mesh;

beforeAll(async () => {
  mkdirSync(join(tree, "node_modules", "left-pad"), { recursive: true });
  writeFileSync(join(tree, "package.json"), JSON.stringify({ name: "app", dependencies: { "left-pad": "1.3.0" } }));
  writeFileSync(join(tree, "node_modules", "left-pad", "package.json"), JSON.stringify({ name: "left-pad", version: "1.3.0" }));
  writeFileSync(depFile, "module.exports = (s, n) => String(s).padStart(n);\n");
  mesh = await Mesh.start({ extraMeasure: { "agent.deps": join(tree, "node_modules") }, groupFlags: ["--token-ttl", "60"] });
}, 90_000);

afterAll(async () => {
  await mesh?.close();
  rmSync(tree, { recursive: true, force: true });
});

type Shown = { machine: { lastAttestation: { time: string; ok: boolean; problem?: string } } };

/** Polled on the agent's socket (cheap) until its attestation problem matches. */
function refusedNaming(pattern: RegExp): Promise<string> {
  return until(
    `the agent's next attestation is refused, matching ${pattern}`,
    async () => {
      const st = await mesh.agentClient().unary("getStatus", {}).catch(() => undefined);
      return st !== undefined && pattern.test(st.attestationProblem) ? st.attestationProblem : undefined;
    },
    75_000,
    () => mesh.agent.log().slice(-3000),
  );
}

describe("measured dependencies and config", () => {
  it("attests with the approved files, and the next attestation after a change of the proxy's config file is refused", async () => {
    const first = await mesh.ctlJson<Shown>(["machine", "show", mesh.machineId]);
    expect(first.machine.lastAttestation.ok).toBe(true);
    const original = readFileSync(mesh.proxyConfigFile, "utf8");
    writeFileSync(mesh.proxyConfigFile, original.replace("}", ', "issue-rate": 1000 }'));
    try {
      const problem = await refusedNaming(/proxy\.config/);
      expect(problem).toMatch(/^measurement proxy\.config: sha256 [0-9a-f]{64} is not approved for group edge/);
    } finally {
      writeFileSync(mesh.proxyConfigFile, original);
    }
  }, 120_000);

  it("the next attestation after one changed file under node_modules is refused", async () => {
    const changedAt = Date.now();
    writeFileSync(depFile, "module.exports = (s, n) => String(s).padStart(n); // changed\n");
    // The proxy's config is back as approved: only the dependency is named.
    const problem = await refusedNaming(/agent\.deps/);
    expect(problem).toMatch(/^measurement agent\.deps: sha256 [0-9a-f]{64} is not approved for group edge/);
    const shown = (await mesh.ctlJson<Shown>(["machine", "show", mesh.machineId])).machine.lastAttestation;
    expect(Date.parse(shown.time)).toBeGreaterThan(changedAt);
    expect(shown.ok).toBe(false);
    expect(shown.problem).toMatch(/^measurement agent\.deps: sha256 [0-9a-f]{64} is not approved for group edge/);
  }, 120_000);
});
