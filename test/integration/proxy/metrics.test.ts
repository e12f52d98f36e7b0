/**
 * The proxy's own metrics, read from its registry while real clients are connected.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createLogger } from "../../../src/common/logger.js";
import { createMetricsRegistry, type MetricsRegistry } from "../../../src/common/metrics.js";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { connectTunnel, requestOver, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;
let registry: MetricsRegistry;
/** The proxy's own log lines. */
const logLines: string[] = [];

beforeAll(async () => {
  registry = createMetricsRegistry();
  const logger = createLogger({ level: "info", write: (l) => void logLines.push(l) });
  h = await startHarness({ policy: { blockHosts: ["blocked.test"] }, proxy: { metrics: registry, logger } });
  good = await startOrigin({ cert: h.pki.good });
});

afterAll(async () => {
  await good?.close();
  await h?.close();
});

/** The value of an unlabelled metric in the registry's text format. */
async function metric(name: string): Promise<number> {
  const line = (await registry.render())
    .split("\n")
    .find((l) => l.startsWith(`${name} `));
  if (line === undefined) throw new Error(`${name} is not exported`);
  return Number(line.split(" ")[1]);
}

async function until(what: string, ok: () => boolean | Promise<boolean>): Promise<void> {
  for (let i = 0; i < 200 && !(await ok()); i++) await new Promise((r) => setTimeout(r, 25));
  if (!(await ok())) throw new Error(`${what}: not reached`);
}

describe("kmi_proxy_open_connections", () => {
  it("counts each client connection once: an intercepted one, then a second, then none", async () => {
    const root = h.agent.rootPem("acme");
    expect(await metric("kmi_proxy_open_connections")).toBe(0);
    const a = await tlsViaProxy(h.port, "localhost", good.port, { ca: root });
    expect((await requestOver(a, "/hello", { host: "localhost", headers: { connection: "keep-alive" } })).status).toBe(200);
    expect(await metric("kmi_proxy_open_connections")).toBe(1);
    // A second client connection that is only a CONNECT waiting for its ClientHello.
    const b = await connectTunnel(h.port, `localhost:${good.port}`);
    expect(await metric("kmi_proxy_open_connections")).toBe(2);
    a.destroy();
    b.socket.destroy();
    await until("both closed", async () => (await metric("kmi_proxy_open_connections")) === 0);
  });
});

describe("a policy file that fails to reload", () => {
  it("is counted (kmi_proxy_policy_reload_failures_total), logged with event policy-reload-failed, and the previous policy stays in force", async () => {
    expect(await metric("kmi_proxy_policy_reload_failures_total")).toBe(0);
    await h.writePolicy({ blockHosts: ["a b"] });
    await until("the failed reload is counted", async () => (await metric("kmi_proxy_policy_reload_failures_total")) === 1);
    const line = logLines.map((l) => JSON.parse(l) as Record<string, unknown>).find((r) => r["event"] === "policy-reload-failed");
    expect(line).toMatchObject({ level: "error", msg: "policy reload failed; the previous policy stays in force" });
    expect(String(line!["error"])).toContain("policy.blockHosts[0]");
    // The previous policy is still the one in force.
    const r = await connectTunnel(h.port, "blocked.test:443");
    r.socket.destroy();
    expect(r.status).toBe(403);
    // A good file is taken again, and the count stays.
    const reloads = h.proxy.context.policy.reloads;
    await h.writePolicy({});
    await until("the good file is reloaded", () => h.proxy.context.policy.reloads > reloads);
    expect(await metric("kmi_proxy_policy_reload_failures_total")).toBe(1);
  });
});
