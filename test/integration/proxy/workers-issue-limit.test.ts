/**
 * The per-client new-host limit (`--issue-rate`/`--issue-burst`) under `kmi proxy --workers 2`,
 * as the built process (dist/cmd/kmi.js) in front of the fixture agent: it is one limit for the
 * machine, held by the primary, however the client's connections are spread over the workers.
 * A client that opens tunnels to many new hosts at once gets the burst of leaves (plus what the
 * rate refilled while it ran), and every other connection is refused with the 429 of the limit;
 * past the limit, the hosts it has leaves for stay served on both workers; and each worker
 * answers that client's next new host with the 429 on the CONNECT.
 */
import { get as httpGet } from "node:http";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeTempDir, spawnProcess, waitFor, type Spawned, type TempDir } from "../../helpers/process.js";
import { FixtureAgent } from "../../fixtures/proxy/fixture-agent.js";
import { connectTunnel, requestOver } from "../../fixtures/proxy/harness.js";
import { makeOriginPki, startOrigin, type Origin } from "../../fixtures/proxy/origins.js";

const kmi = new URL("../../../dist/cmd/kmi.js", import.meta.url).pathname;

/** The burst (`--issue-burst`); the rate is 1 a second (`--issue-rate` is an integer). */
const BURST = 5;
/** New hosts asked for at once: enough that one limit per worker (today's bug) would issue 2 × BURST. */
const AT_ONCE = 4 * BURST;
/** New hosts asked for one after another, afterwards. */
const AFTER = 4;

let dir: TempDir;
let agent: FixtureAgent;
let origins: Origin[] = [];
let proxy: Spawned;
let port: number;
let ca: string;
/** When the client began asking for new hosts (the limit's refill counts from then). */
let firstAsk = 0;
/** The origins the client got a leaf for. */
let served: Origin[] = [];
const logFile = (): string => join(dir.path, "access.log");
const metricsSocket = (): string => join(dir.path, "metrics.sock");

beforeAll(async () => {
  dir = await makeTempDir("kmi-proxy-workers-limit-");
  agent = await FixtureAgent.start({ tenants: ["acme"], dir: dir.path });
  const pki = makeOriginPki();
  // One origin per new host: each has its own certificate, so each needs its own leaf.
  origins = await Promise.all(Array.from({ length: AT_ONCE + AFTER }, () => startOrigin({ cert: pki.issue(["localhost"], []), h2: false })));
  const caFile = join(dir.path, "origin-ca.pem");
  await writeFile(caFile, pki.caPem);
  ca = agent.rootPem("acme");
  // prettier-ignore
  proxy = spawnProcess(process.execPath, [
    kmi, "proxy",
    "--workers", "2",
    "--listen", "127.0.0.1:0",
    "--agent-socket", agent.socketPath,
    "--default-tenant", "acme",
    "--extra-ca", caFile,
    "--no-system-roots",
    "--allow-private", "127.0.0.0/8,::1",
    "--access-log", logFile(),
    "--access-log-query",
    "--metrics-listen", `unix:${metricsSocket()}`,
    "--issue-rate", "1",
    "--issue-burst", String(BURST),
  ]);
  const started = await proxy.waitForLine(/^(?!.*"worker":).*"msg":"started"/, 30_000, "stderr");
  port = (JSON.parse(started) as { bound: { port: number } }).bound.port;
});

afterAll(async () => {
  if (proxy !== undefined) {
    // SIGTERM drains both workers and the primary exits; SIGKILL only if it does not.
    proxy.child.kill("SIGTERM");
    const timer = setTimeout(() => proxy.kill(), 20_000);
    await proxy.exited;
    clearTimeout(timer);
  }
  await Promise.all(origins.map((o) => o.close()));
  await agent?.stop();
  await dir?.cleanup();
});

/** The primary's /metrics (every worker's summed with its own). */
function metrics(): Promise<string> {
  return new Promise((resolve, reject) => {
    httpGet({ socketPath: metricsSocket(), path: "/metrics" }, (res) => {
      let body = "";
      res.setEncoding("utf8").on("data", (d: string) => (body += d));
      res.on("end", () => resolve(body));
    }).on("error", reject);
  });
}

/** The value of one series, 0 when absent. */
function value(text: string, series: string): number {
  const line = text.split("\n").find((l) => l.startsWith(series + " "));
  return line === undefined ? 0 : Number(line.slice(series.length + 1));
}

interface LogLine {
  method: string;
  path: string;
  worker?: number;
  status: number;
  decision: string;
  rule?: string;
}

async function logLines(): Promise<LogLine[]> {
  const text = await readFile(logFile(), "utf8").catch(() => "");
  return text
    .split("\n")
    .filter((l) => l !== "")
    .map((l) => JSON.parse(l) as LogLine);
}

/** How a client's attempt at a new host ended. */
type Outcome = "leaf" | "refused-on-connect" | "refused-after-hello";

/**
 * CONNECT to `o`, then TLS and one request: a leaf under the tenant's CA (the origin answers),
 * the limit's 429 on the CONNECT, or its 429 page after the ClientHello (under kmi-blocked).
 * Anything else fails the test.
 */
async function attempt(o: Origin, tag: string): Promise<Outcome> {
  const { socket, status, head } = await connectTunnel(port, `localhost:${o.port}`);
  if (status !== 200) {
    socket.destroy();
    if (status === 429 && head.includes("x-kmi-rule: issue-rate-limit")) return "refused-on-connect";
    throw new Error(`CONNECT answered ${head}`);
  }
  const t = tlsConnect({ socket, servername: "localhost", ca, rejectUnauthorized: false, ALPNProtocols: ["http/1.1"] });
  await new Promise<void>((resolve, reject) => {
    t.once("secureConnect", resolve);
    t.once("error", reject);
  });
  const r = await requestOver(t, `/hello?limit=${tag}`, { host: "localhost" });
  t.destroy();
  if (t.authorized && r.status === 200) return "leaf";
  if (!t.authorized && r.status === 429 && r.headers["x-kmi-rule"] === "issue-rate-limit") return "refused-after-hello";
  throw new Error(`unexpected answer: authorized ${String(t.authorized)}, status ${r.status}, rule ${String(r.headers["x-kmi-rule"])}`);
}

/** The most leaves one limit allows in `ms`: the burst, plus the rate's refill (1 a second). */
function bound(ms: number): number {
  return BURST + Math.floor(ms / 1000);
}

describe("kmi proxy --workers 2 --issue-rate 1 --issue-burst 5", () => {
  it("a client's new-host limit is one for the machine, whichever worker takes each connection", async () => {
    firstAsk = Date.now();
    const outcomes = await Promise.all(origins.slice(0, AT_ONCE).map((o, i) => attempt(o, `now-${i}`)));
    const elapsed = Date.now() - firstAsk;
    served = origins.slice(0, AT_ONCE).filter((_, i) => outcomes[i] === "leaf");
    const leaves = served.length;
    const issued = agent.issueCount("acme");
    // Every leaf served was issued for it (each host is new), at least the burst, and no more
    // than one limit allows in the time taken (with one limit per worker it would be ~2 × burst).
    expect(issued).toBe(leaves);
    expect(leaves).toBeGreaterThanOrEqual(BURST);
    expect(leaves, `${leaves} leaves in ${elapsed} ms`).toBeLessThanOrEqual(bound(elapsed));
    // Both workers took connections of this client.
    const lines = await waitFor(async () => {
      const all = await logLines();
      return all.length >= AT_ONCE ? all : undefined;
    }, 10_000, "an access log line for each connection");
    expect(lines).toHaveLength(AT_ONCE);
    expect(new Set(lines.map((l) => l.worker)).size).toBe(2);
    // Each refusal is counted once: one access log line, one decision in the summed metrics.
    const refused = lines.filter((l) => l.rule === "issue-rate-limit");
    expect(refused).toHaveLength(AT_ONCE - leaves);
    expect(refused.every((l) => l.status === 429 && l.decision === "error")).toBe(true);
    const m = await metrics();
    expect(value(m, 'kmi_proxy_decisions_total{decision="error",tenant="acme"}')).toBe(AT_ONCE - leaves);
    expect(value(m, "kmi_proxy_leaf_mints_total")).toBe(leaves);
  });

  it("past the limit, the hosts it got leaves for stay served, whichever worker takes the connection", async () => {
    const before = agent.issueCount("acme");
    const outcomes: Outcome[] = [];
    // Twice each, one after another: round-robin puts each host on both workers.
    for (const [i, o] of [...served, ...served].entries()) outcomes.push(await attempt(o, `again-${i}`));
    expect(outcomes).toEqual(Array(2 * served.length).fill("leaf"));
    expect(agent.issueCount("acme")).toBe(before);
  });

  it("then each worker refuses that client's next new hosts on the CONNECT, until the rate gives it a token", async () => {
    const before = agent.issueCount("acme");
    const outcomes: Outcome[] = [];
    for (const [i, o] of origins.slice(AT_ONCE).entries()) outcomes.push(await attempt(o, `after-${i}`));
    // The primary told every worker when the bucket was left empty: a new host either gets a
    // leaf (the rate gave a token back) or is refused on the CONNECT, never after the 200 (which
    // a worker that did not know would let through, to a page under the kmi-blocked CA).
    expect(outcomes.filter((o) => o === "refused-after-hello")).toEqual([]);
    expect(agent.issueCount("acme") - before).toBe(outcomes.filter((o) => o === "leaf").length);
    // Still one limit over both tests.
    const elapsed = Date.now() - firstAsk;
    expect(agent.issueCount("acme"), `${agent.issueCount("acme")} leaves in ${elapsed} ms`).toBeLessThanOrEqual(bound(elapsed));
  });
});
