import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { agentProgram, installDir, parseMeasure, resolveAgentConfig } from "../../../src/agent/config.js";
import { ConfigError, loadConfig } from "../../../src/common/config.js";
import { makeInfra } from "../../fixtures/agent/infra.js";

const dir = mkdtempSync(join(tmpdir(), "kmi-agent-cfg-"));
const ca = join(dir, "ca.pem");
writeFileSync(ca, makeInfra().pem);
writeFileSync(join(dir, "token"), "kmij_from_file\n");
writeFileSync(join(dir, "agent.json"), JSON.stringify({ "kdc-url": "https://kdc.example:7443", "socket-group": "kmi" }));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const base = ["--audit-url", "https://audit.example:7444", "--kdc-url", "https://kdc.example:7443", "--ca-file", ca];

async function resolve(argv: string[], env: Record<string, string> = {}) {
  return resolveAgentConfig(await loadConfig(agentProgram, argv, { env }));
}

describe("agent configuration", () => {
  it("has safe defaults: socket 0600 (no group), 47-day leaves with 1 h backdating, its code, packages and node binary measured", async () => {
    const c = await resolve(base);
    expect(c.socketPath).toBe("/run/kmi/agent.sock");
    expect(c.socketGroup).toBeUndefined();
    expect(c.stateDir).toBe("/var/lib/kmi/agent");
    expect(c.policy).toEqual({ maxLifetimeMs: 47 * 86_400_000, backdateMs: 3_600_000 });
    expect(c.measurements).toEqual({
      files: { "agent.code": [installDir()], "agent.deps": [join(installDir(), "node_modules")], "agent.node": [process.execPath] },
      softwareVersion: true,
    });
    expect(c.joinToken).toBeUndefined();
    expect(c.caPem).toContain("BEGIN CERTIFICATE");
    expect(c.timing).toEqual({ reconnectInitialMs: 500, reconnectMaxMs: 30_000, heartbeatTimeoutMs: 45_000 });
  });

  it("takes the join token from KMI_AGENT_JOIN_TOKEN or from --join-token-file", async () => {
    expect((await resolve(base, { KMI_AGENT_JOIN_TOKEN: "kmij_env" })).joinToken).toBe("kmij_env");
    expect((await resolve([...base, "--join-token-file", join(dir, "token")])).joinToken).toBe("kmij_from_file");
    await expect(resolve([...base, "--join-token-file", join(dir, "token")], { KMI_AGENT_JOIN_TOKEN: "kmij_env" })).rejects.toThrow(/both set/);
  });

  it("takes every replica's URL, comma-separated, and refuses a list with a non-https entry", async () => {
    const c = await resolve(["--audit-url", "https://a1:7444, https://a2:7444", "--kdc-url", "https://k1:7443,https://k2:7443,https://k1:7443", "--ca-file", ca]);
    expect(c.auditUrls).toEqual(["https://a1:7444", "https://a2:7444"]);
    expect(c.kdcUrls).toEqual(["https://k1:7443", "https://k2:7443"]);
    await expect(resolve(["--audit-url", "https://a1:7444", "--kdc-url", "https://k1:7443,http://k2:7443", "--ca-file", ca])).rejects.toThrow(/http:\/\/k2:7443.*https:\/\//);
    await expect(resolve(["--audit-url", "https://a1:7444", "--kdc-url", " , ", "--ca-file", ca])).rejects.toThrow(/at least one/);
  });

  it("reads a config file, and measures it as agent.config by default", async () => {
    const c = await resolve(["--config", join(dir, "agent.json"), "--audit-url", "https://audit.example:7444", "--ca-file", ca]);
    expect(c.kdcUrls).toEqual(["https://kdc.example:7443"]);
    expect(c.socketGroup).toBe("kmi");
    expect(c.measurements.files["agent.config"]).toEqual([join(dir, "agent.json")]);
    expect(c.measurements.files["proxy.config"]).toBeUndefined();
  });

  it("measures the proxy's config file as proxy.config when --proxy-config names it", async () => {
    const c = await resolve([...base, "--proxy-config", join(dir, "agent.json")]);
    expect(c.measurements.files["proxy.config"]).toEqual([join(dir, "agent.json")]);
  });

  it.each<[string, string[], RegExp]>([
    ["a plain-http KDC", ["--audit-url", "https://a:1", "--kdc-url", "http://kdc:1", "--ca-file", ca], /--kdc-url: "http:\/\/kdc:1" must use https:\/\//],
    ["a CA file that is not PEM", [...base.slice(0, 4), "--ca-file", join(dir, "token")], /--ca-file .*: no PEM certificate/],
    ["a missing CA file", [...base.slice(0, 4), "--ca-file", join(dir, "nope.pem")], /--ca-file .*: cannot read \(ENOENT\)/],
    ["a relative socket path", [...base, "--socket", "agent.sock"], /--socket: /],
    ["backdating longer than the lifetime", [...base, "--max-leaf-lifetime-days", "1", "--leaf-backdate-seconds", "90000"], /--leaf-backdate-seconds/],
    ["a zero lifetime", [...base, "--max-leaf-lifetime-days", "0"], /--max-leaf-lifetime-days: must be a positive number/],
    ["a bad measurement", [...base, "--measure", "Agent=/x"], /--measure: /],
  ])("refuses %s", async (_name, argv, message) => {
    const p = resolve(argv);
    await expect(p).rejects.toThrow(ConfigError);
    await expect(p).rejects.toThrow(message);
  });

  it("parses --measure", () => {
    expect(parseMeasure("agent.code=/opt/kmi/dist, proxy.config=/etc/kmi/proxy.json:/etc/kmi/policy.json")).toEqual({
      "agent.code": ["/opt/kmi/dist"],
      "proxy.config": ["/etc/kmi/proxy.json", "/etc/kmi/policy.json"],
    });
    expect(() => parseMeasure("a=/x,a=/y")).toThrow(/appears twice/);
    expect(() => parseMeasure("a=relative")).toThrow(/must be absolute/);
    expect(() => parseMeasure("noequals")).toThrow(/is not name=path/);
  });
});
