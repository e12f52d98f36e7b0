/**
 * `kmi proxy --workers 2` as the built process (dist/cmd/kmi.js, built by `npm test` / `npm run
 * build`) in front of the fixture agent: both workers serve one listener; a host's leaf is
 * minted once for the machine however many workers ask; a TLS session made on one worker
 * resumes on the other (shared ticket keys); metrics are summed in the primary; SIGHUP reaches
 * every worker; a worker killed with SIGKILL is replaced while the other worker's keep-alive
 * connection keeps working; SIGTERM drains every worker (an upload in flight is answered) and
 * exits 0; a worker that cannot listen makes the primary exit 1; the primary's session ticket key
 * rotation reaches the workers.
 */
import { once } from "node:events";
import { existsSync } from "node:fs";
import { get as httpGet } from "node:http";
import { createServer, type AddressInfo } from "node:net";
import { readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { proxyHealth } from "../../../src/clients/mesh-health.js";
import { JEMALLOC_PATHS } from "../../../src/proxy/allocator.js";
import { makeTempDir, spawnProcess, waitFor, type Spawned, type TempDir } from "../../helpers/process.js";
import { FixtureAgent } from "../../fixtures/proxy/fixture-agent.js";
import { tlsViaProxy } from "../../fixtures/proxy/harness.js";
import { makeOriginPki, startOrigin, type Origin } from "../../fixtures/proxy/origins.js";

const kmi = new URL("../../../dist/cmd/kmi.js", import.meta.url).pathname;

let dir: TempDir;
let agent: FixtureAgent;
let origin: Origin;
let proxy: Spawned;
let port: number;
let ca: string;
const logFile = (): string => join(dir.path, "access.log");
const metricsSocket = (): string => join(dir.path, "metrics.sock");

beforeAll(async () => {
  dir = await makeTempDir("kmi-proxy-workers-");
  agent = await FixtureAgent.start({ tenants: ["acme"], dir: dir.path, issueDelayMs: 100 });
  const pki = makeOriginPki();
  origin = await startOrigin({ cert: pki.good, h2: false });
  const caFile = join(dir.path, "origin-ca.pem");
  await writeFile(caFile, pki.caPem);
  ca = agent.rootPem("acme");
  // prettier-ignore
  proxy = spawnProcess(process.execPath, [
    kmi, "proxy",
    "--workers", "2",
    "--allocator", "auto",
    "--listen", "127.0.0.1:0",
    "--agent-socket", agent.socketPath,
    "--default-tenant", "acme",
    "--extra-ca", caFile,
    "--no-system-roots",
    "--allow-private", "127.0.0.0/8,::1",
    "--access-log", logFile(),
    "--access-log-query",
    "--metrics-listen", `unix:${metricsSocket()}`,
    "--shutdown-grace-ms", "10000",
    // The kill test keeps a connection idle while a replacement worker starts (slow on a loaded machine).
    "--keep-alive-timeout-ms", "300000",
  ]);
  // The primary's line (each worker logs its own, with its "worker" id).
  const started = await proxy.waitForLine(/^(?!.*"worker":).*"msg":"started"/, 30_000, "stderr");
  port = (JSON.parse(started) as { bound: { port: number } }).bound.port;
});

afterAll(async () => {
  proxy?.kill();
  await origin?.close();
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

/** Running workers' pids by worker id, from kmi_proxy_worker_info. */
async function workerPids(): Promise<Map<number, number>> {
  const m = new Map<number, number>();
  for (const match of (await metrics()).matchAll(/^kmi_proxy_worker_info\{worker="(\d+)",pid="(\d+)"\} 1$/gm)) m.set(Number(match[1]), Number(match[2]));
  return m;
}

interface LogLine {
  path: string;
  worker?: number;
  status: number;
}

async function logLines(file = logFile()): Promise<LogLine[]> {
  const text = await readFile(file, "utf8").catch(() => "");
  return text
    .split("\n")
    .filter((l) => l !== "")
    .map((l) => JSON.parse(l) as LogLine);
}

/** The worker that logged `path` (waits for the line). */
function workerOf(path: string, file = logFile()): Promise<number> {
  return waitFor(async () => (await logLines(file)).find((l) => l.path === path)?.worker, 10_000, `an access log line for ${path}`);
}

/** Sends one HTTP/1.1 request on a kept-alive TLS connection and reads the response (content-length bodies: the origin's /big). */
function keepAliveGet(t: TLSSocket, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    if (t.destroyed) return reject(new Error("connection already closed"));
    let buf = Buffer.alloc(0);
    const onData = (d: Buffer): void => {
      buf = Buffer.concat([buf, d]);
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      const head = buf.subarray(0, end).toString("latin1");
      const length = Number(/content-length: (\d+)/i.exec(head)?.[1] ?? "0");
      if (buf.length < end + 4 + length) return;
      cleanup();
      resolve({ status: Number(head.split(" ")[1]), body: buf.subarray(end + 4, end + 4 + length).toString() });
    };
    const onEnd = (): void => {
      cleanup();
      reject(new Error("connection closed before the response"));
    };
    const cleanup = (): void => {
      t.off("data", onData);
      t.off("close", onEnd);
      t.off("error", onEnd);
    };
    t.on("data", onData);
    t.once("close", onEnd);
    t.once("error", onEnd);
    t.write(`GET ${path} HTTP/1.1\r\nHost: localhost\r\n\r\n`);
  });
}

/** One intercepted request on a new connection; resolves with the worker that served it. */
async function oneRequest(path: string, session?: Buffer): Promise<{ worker: number; resumed: boolean; session: Promise<Buffer> }> {
  const t = await tlsViaProxy(port, "localhost", origin.port, { ca, ...(session !== undefined ? { session } : {}) });
  const ticket = new Promise<Buffer>((resolve) => t.once("session", resolve));
  const r = await keepAliveGet(t, path);
  expect(r.status).toBe(200);
  const resumed = t.isSessionReused();
  t.destroy();
  return { worker: await workerOf(path), resumed, session: ticket };
}

describe("kmi proxy --workers 2", () => {
  it("runs two workers behind one listener; a host's leaf is minted once for the machine", async () => {
    expect([...(await workerPids()).keys()]).toHaveLength(2);
    const before = agent.issueCount("acme");
    const served = await Promise.all(Array.from({ length: 8 }, (_, i) => oneRequest(`/big?n=32&first=${i}`)));
    // Both workers served some of the eight connections, and the agent was asked once.
    expect(new Set(served.map((s) => s.worker)).size).toBe(2);
    expect(agent.issueCount("acme") - before).toBe(1);
    const m = await metrics();
    expect(value(m, "kmi_proxy_leaf_mints_total")).toBe(1);
    expect(value(m, "kmi_proxy_workers")).toBe(2);
    // The workers' counters are summed: every request of both workers is counted once.
    expect(value(m, 'kmi_proxy_decisions_total{decision="allow",tenant="acme"}')).toBeGreaterThanOrEqual(8);
    expect(value(m, "kmi_build_info")).toBe(0); // labelled series only
    expect(m).toMatch(/^kmi_build_info\{version="[^"]+"\} 1$/m);
  });

  it("forks the workers with jemalloc when it is installed (--allocator auto), else with the C library's", async () => {
    const installed = JEMALLOC_PATHS.some((p) => existsSync(p));
    const pids = [...(await workerPids()).values()];
    expect(pids).toHaveLength(2);
    for (const pid of pids) {
      const maps = await readFile(`/proc/${pid}/maps`, "utf8");
      expect(maps.includes("libjemalloc.so")).toBe(installed);
    }
    expect(proxy.stderr()).toMatch(new RegExp(`"msg":"worker allocator".*"allocator":"${installed ? "jemalloc" : "system"}"`));
  });

  it("a TLS session made on one worker resumes on the other (ticket keys shared per tenant)", async () => {
    const first = await oneRequest("/big?n=32&resume=0");
    const session = await first.session;
    const later: { worker: number; resumed: boolean }[] = [];
    for (let i = 1; i <= 10 && !later.some((l) => l.worker !== first.worker); i++) later.push(await oneRequest(`/big?n=32&resume=${i}`, session));
    expect(later.every((l) => l.resumed)).toBe(true);
    expect(later.some((l) => l.worker !== first.worker)).toBe(true);
  });

  it("SIGHUP reaches every worker: after a log rotation both write to the new file", async () => {
    const rotated = join(dir.path, "access.log.1");
    await rename(logFile(), rotated);
    proxy.child.kill("SIGHUP");
    const seen = new Set<number>();
    for (let i = 0; i < 40 && seen.size < 2; i++) {
      const path = `/big?n=32&after-hup=${i}`;
      const t = await tlsViaProxy(port, "localhost", origin.port, { ca });
      await keepAliveGet(t, path);
      t.destroy();
      const line = await waitFor(async () => [...(await logLines()), ...(await logLines(rotated))].find((l) => l.path === path), 10_000, path);
      if ((await logLines()).some((l) => l.path === path)) seen.add(line.worker!);
    }
    expect(seen.size).toBe(2);
  });

  it("a worker killed with SIGKILL is replaced; the other worker's keep-alive connection keeps working", async () => {
    const pids = await workerPids();
    const t = await tlsViaProxy(port, "localhost", origin.port, { ca });
    expect((await keepAliveGet(t, "/big?n=32&ka=1")).status).toBe(200);
    const serving = await workerOf("/big?n=32&ka=1");
    const [other] = [...pids.keys()].filter((id) => id !== serving);
    process.kill(pids.get(other!)!, "SIGKILL");
    // Metrics asked of both workers at the instant one dies: the write to the dead one fails (EPIPE)
    // and the primary answers without it, rather than dying of an unhandled 'error'.
    const answers = await Promise.all(Array.from({ length: 5 }, () => metrics().then(() => "answered", (e: unknown) => String(e))));
    expect(answers).toEqual(Array(5).fill("answered"));
    // A replacement appears (a new worker id), and the connection kept alive meanwhile still works.
    const replaced = await waitFor(async () => {
      const now = await workerPids();
      return now.size === 2 && !now.has(other!) ? now : undefined;
    }, 20_000, "a replacement worker");
    expect(replaced.has(serving)).toBe(true);
    const again = await keepAliveGet(t, "/big?n=32&ka=2");
    expect(again.status).toBe(200);
    expect(again.body).toBe("A".repeat(32));
    expect(await workerOf("/big?n=32&ka=2")).toBe(serving);
    expect(value(await metrics(), "kmi_proxy_worker_restarts_total")).toBe(1);
    // What `kmi up status` and `kmi ctl status` show of the proxy.
    const health = await proxyHealth({ metrics: `unix:${metricsSocket()}` });
    expect(health["workers"]).toEqual([...replaced].sort((a, b) => a[0] - b[0]).map(([worker, pid]) => ({ worker, pid })));
    expect(health["worker_restarts"]).toBe(1);
    // Now the serving worker dies: its client's connection ends, and a new connection is served.
    const closed = once(t, "close");
    process.kill(replaced.get(serving)!, "SIGKILL");
    await closed;
    // A new connection once the primary has seen the death. (One accepted in the instant between
    // the death and the primary hearing of it is handed to the dead worker by Node's round-robin
    // scheduler and hangs until the client gives up: docs/proxy.md, "Workers".)
    await waitFor(async () => ((await workerPids()).has(serving) ? undefined : true), 20_000, "the primary to see the serving worker's death");
    const next = await oneRequest("/big?n=32&after-kill=1");
    expect(next.worker).not.toBe(serving);
  });

  it("SIGTERM drains every worker (a request in flight finishes) and the primary exits 0", async () => {
    const pids = await waitFor(async () => {
      const now = [...(await workerPids()).values()];
      return now.length === 2 ? now : undefined;
    }, 20_000, "two workers");
    // An upload in flight: its head and half its body go before the SIGTERM, the rest after the workers start draining.
    const t = await tlsViaProxy(port, "localhost", origin.port, { ca });
    const seen = origin.requests;
    let answer = "";
    t.on("data", (d: Buffer) => (answer += d.toString()));
    t.write("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n12345");
    await waitFor(() => (origin.requests > seen ? true : undefined), 20_000, "the upload at the origin");
    proxy.child.kill("SIGTERM");
    await waitFor(() => (proxy.stderr().match(/"msg":"signal received; shutting down","program":"proxy","worker"/g)?.length === 2 ? true : undefined), 20_000, "both workers draining");
    t.write("67890");
    await waitFor(() => (answer.includes("received 10 bytes") ? true : undefined), 20_000, "the upload's answer");
    expect(answer).toMatch(/^HTTP\/1\.1 200 /);
    t.destroy();
    const { code } = await proxy.exited;
    expect(code).toBe(0);
    for (const pid of pids) expect(() => process.kill(pid, 0)).toThrow(/ESRCH/);
    expect(proxy.stderr()).toMatch(/"msg":"exiting"/);
  });
});

describe("kmi proxy --workers: a worker that cannot listen", () => {
  it("makes the primary exit 1, with the reason on stderr", async () => {
    const taken = createServer();
    await new Promise<void>((r) => taken.listen(0, "127.0.0.1", r));
    const busy = (taken.address() as AddressInfo).port;
    try {
      // prettier-ignore
      const p = spawnProcess(process.execPath, [kmi, "proxy", "--workers", "1", "--listen", `127.0.0.1:${busy}`, "--agent-socket", agent.socketPath, "--default-tenant", "acme", "--log-level", "error"]);
      const { code } = await p.exited;
      expect(code).toBe(1);
      expect(p.stderr()).toMatch(/kmi proxy: worker 1: bind EADDRINUSE 127\.0\.0\.1:\d+/);
      expect(p.stderr()).toMatch(/kmi: proxy worker exited before listening \(code 1\)/);
    } finally {
      taken.close();
    }
  });
});

describe("kmi proxy --workers: session ticket key rotation", () => {
  it("the primary's rotation reaches the workers: an old ticket stops resuming, the leaf is not minted again, new tickets resume", async () => {
    const caFile = join(dir.path, "origin-ca.pem");
    // prettier-ignore
    const p = spawnProcess(process.execPath, [
      kmi, "proxy", "--workers", "2", "--listen", "127.0.0.1:0", "--agent-socket", agent.socketPath, "--default-tenant", "acme",
      "--extra-ca", caFile, "--no-system-roots", "--allow-private", "127.0.0.0/8,::1", "--access-log", "off",
      "--ticket-key-rotation-seconds", "1",
    ]);
    try {
      const started = await p.waitForLine(/^(?!.*"worker":).*"msg":"started"/, 30_000, "stderr");
      const rotPort = (JSON.parse(started) as { bound: { port: number } }).bound.port;
      const connect = async (session?: Buffer): Promise<{ resumed: boolean; session: Promise<Buffer> }> => {
        const t = await tlsViaProxy(rotPort, "localhost", origin.port, { ca, ...(session !== undefined ? { session } : {}) });
        const ticket = new Promise<Buffer>((resolve) => t.once("session", resolve));
        const resumed = t.isSessionReused();
        expect((await keepAliveGet(t, "/big?n=8")).status).toBe(200);
        t.destroy();
        return { resumed, session: ticket };
      };
      const old = await (await connect()).session;
      const issued = agent.issueCount("acme");
      // Within a few rotations, the old ticket stops resuming on whichever worker serves it.
      await waitFor(async () => ((await connect(old)).resumed ? undefined : true), 20_000, "the old ticket to stop resuming");
      // A fresh ticket resumes (retried: a rotation may fall between making it and using it).
      const resumedFresh = await waitFor(async () => {
        const fresh = await (await connect()).session;
        return (await connect(fresh)).resumed ? true : undefined;
      }, 20_000, "a fresh ticket to resume");
      expect(resumedFresh).toBe(true);
      expect(agent.issueCount("acme")).toBe(issued);
    } finally {
      p.kill();
      await p.exited;
    }
  });
});
