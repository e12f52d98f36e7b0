/**
 * The proxy's own metrics, read from its registry while real clients are connected.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createMetricsRegistry, type MetricsRegistry } from "../../../src/common/metrics.js";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { connectTunnel, requestOver, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let good: Origin;
let registry: MetricsRegistry;

beforeAll(async () => {
  registry = createMetricsRegistry();
  h = await startHarness({ proxy: { metrics: registry } });
  good = await startOrigin({ cert: h.pki.good });
});

afterAll(async () => {
  await good?.close();
  await h?.close();
});

/** The value of an unlabelled metric in the registry's text format. */
function metric(name: string): number {
  const line = registry
    .render()
    .split("\n")
    .find((l) => l.startsWith(`${name} `));
  if (line === undefined) throw new Error(`${name} is not exported`);
  return Number(line.split(" ")[1]);
}

async function until(what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 200 && !ok(); i++) await new Promise((r) => setTimeout(r, 25));
  if (!ok()) throw new Error(`${what}: not reached`);
}

describe("kmi_proxy_open_connections", () => {
  it("counts each client connection once: an intercepted one, then a second, then none", async () => {
    const root = h.agent.rootPem("acme");
    expect(metric("kmi_proxy_open_connections")).toBe(0);
    const a = await tlsViaProxy(h.port, "localhost", good.port, { ca: root });
    expect((await requestOver(a, "/hello", { host: "localhost", headers: { connection: "keep-alive" } })).status).toBe(200);
    expect(metric("kmi_proxy_open_connections")).toBe(1);
    // A second client connection that is only a CONNECT waiting for its ClientHello.
    const b = await connectTunnel(h.port, `localhost:${good.port}`);
    expect(metric("kmi_proxy_open_connections")).toBe(2);
    a.destroy();
    b.socket.destroy();
    await until("both closed", () => metric("kmi_proxy_open_connections") === 0);
  });
});
