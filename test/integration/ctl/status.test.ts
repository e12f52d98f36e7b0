/**
 * `kmi ctl status` against a real KDC process: the KDC's entry (the same as `kmi up --json`'s),
 * an Auditserver address nobody listens on and an agent socket that does not exist shown as
 * unreachable with their errors, a proxy metrics endpoint read for its version and leaf cache,
 * parts not asked shown as not checked; a table for people and `--json` for scripts. With every
 * replica's URL (one real KDC, a dead port, a port that accepts and never answers), each replica
 * is shown with its state, error and latency, and a service is up when one replica is.
 */
import { createServer as createHttpServer, type Server } from "node:http";
import { createServer as createTcpServer, type Server as TcpServer, type Socket } from "node:net";
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { cleanEnv, cleanup, clients, ctl, initDataDir, KMI, startKdc, type DataDir, type KdcProcess } from "../kdc/harness.js";

let data: DataDir;
let kdc: KdcProcess;
let metrics: Server;
let metricsSocket: string;
let closedPort: number;
/** Accepts TCP connections and never answers: a hung replica. */
let silent: TcpServer;
let silentPort: number;
const held: Socket[] = [];

/** A port that was free a moment ago: nothing listens there. */
async function freePort(): Promise<number> {
  const s = createTcpServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

beforeAll(async () => {
  data = await initDataDir();
  kdc = await startKdc(data.dataDir);
  const op = clients(kdc.url, await readFile(data.caFile, "utf8"), { token: data.token });
  await op(KdcAdminService).createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  closedPort = await freePort();
  silent = createTcpServer((socket) => void held.push(socket));
  await new Promise<void>((r) => silent.listen(0, "127.0.0.1", r));
  silentPort = (silent.address() as { port: number }).port;
  // Stands in for the proxy's --metrics-listen on a Unix socket.
  metricsSocket = join(data.dir, "proxy-metrics.sock");
  metrics = createHttpServer((req, res) => {
    if (req.url !== "/metrics") return void res.writeHead(404).end();
    res.writeHead(200, { "content-type": "text/plain" }).end('# TYPE kmi_build_info gauge\nkmi_build_info{version="0.1.0"} 1\nkmi_proxy_leaf_cache_entries 3\n');
  });
  await new Promise<void>((r) => metrics.listen(metricsSocket, r));
});

afterAll(async () => {
  await kdc?.stop("SIGKILL");
  await new Promise<void>((r) => (metrics ? metrics.close(() => r()) : r()));
  held.forEach((x) => x.destroy());
  await new Promise<void>((r) => (silent ? silent.close(() => r()) : r()));
  await cleanup(data?.dir);
});

type Part = Record<string, unknown>;

describe("kmi ctl status", () => {
  const flags = () => ["--audit", `https://127.0.0.1:${closedPort}`, "--agent-socket", join(data.dir, "no-agent.sock"), "--proxy-metrics", `unix:${metricsSocket}`];

  it("--json: the KDC's entry, unreachable parts with their errors, the proxy's metrics; exit 1", async () => {
    const r = await ctl(kdc, data, ["status", ...flags(), "--json"]);
    expect(r.code, r.stderr).toBe(1);
    const j = JSON.parse(r.stdout) as { healthy: boolean; kmi_ctl: Part; kdc: Part; audit: Part; agent: Part; proxy: Part };
    expect(j.healthy).toBe(false);
    expect(j.kmi_ctl["version"]).toBe("0.1.0");
    // The same fields `kmi up --json` reports for the KDC (src/common/mesh-health.ts).
    expect(Object.keys(j.kdc).sort()).toEqual(["attestation_key_loaded", "audit_head_seq", "connected_agents", "healthy", "replicas", "tenants", "uptime_seconds", "url", "version"]);
    expect(j.kdc["replicas"]).toEqual([{ url: kdc.url, healthy: true, version: "0.1.0", uptime_seconds: expect.any(Number), connected_agents: 0, audit_head_seq: expect.any(Number), latency_ms: expect.any(Number) }]);
    expect(j.kdc).toMatchObject({ url: kdc.url, healthy: true, version: "0.1.0", attestation_key_loaded: false, connected_agents: 0 });
    expect(j.kdc["tenants"]).toEqual([{ tenant: "acme", active_version: 1, machines_up_to_date: 0, machines_total: 0 }]);
    expect(j.audit).toMatchObject({ url: `https://127.0.0.1:${closedPort}`, healthy: false, reachable: false });
    expect(String(j.audit["error"])).toContain("ECONNREFUSED");
    expect(j.agent).toMatchObject({ socket: join(data.dir, "no-agent.sock"), healthy: false, reachable: false });
    expect(String(j.agent["error"])).toMatch(/UNAVAILABLE.*ENOENT/);
    expect(j.proxy).toEqual({ metrics_address: `unix:${metricsSocket}`, healthy: true, version: "0.1.0", leaf_cache_entries: 3 });
  });

  it("every replica of --kdc and --audit: up when one is, each with its state, error and latency (--json)", async () => {
    const dead = `https://127.0.0.1:${closedPort}`;
    const hung = `https://127.0.0.1:${silentPort}`;
    const r = await ctl(kdc, data, ["status", "--kdc", `${dead},${kdc.url},${hung}`, "--timeout", "3", "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout) as { healthy: boolean; degraded: boolean; kdc: Part };
    expect(j).toMatchObject({ healthy: true, degraded: true });
    // The report shown is the replica that answered; the tenants are still there for scripts.
    expect(j.kdc).toMatchObject({ url: kdc.url, healthy: true, version: "0.1.0" });
    expect(j.kdc["tenants"]).toEqual([{ tenant: "acme", active_version: 1, machines_up_to_date: 0, machines_total: 0 }]);
    const [d, up, h] = j.kdc["replicas"] as Part[];
    expect(d).toMatchObject({ url: dead, healthy: false, reachable: false, latency_ms: expect.any(Number) });
    expect(String(d!["error"])).toContain("ECONNREFUSED");
    expect(up).toMatchObject({ url: kdc.url, healthy: true, connected_agents: 0, latency_ms: expect.any(Number) });
    expect(up!["error"]).toBeUndefined();
    // The hung replica failed on its own deadline (--timeout); the others are reported all the same.
    expect(h).toMatchObject({ url: hung, healthy: false, reachable: false });
    expect(String(h!["error"])).toMatch(/deadline|timed out|timeout/i);

    // Every Auditserver replica down: that service is down, and so is the whole status.
    const a = await ctl(kdc, data, ["status", "--audit", `${dead},${dead.replace("127.0.0.1", "[::1]")}`, "--json"]);
    expect(a.code, a.stderr).toBe(1);
    const ja = JSON.parse(a.stdout) as { healthy: boolean; degraded: boolean; audit: Part };
    expect(ja).toMatchObject({ healthy: false, degraded: false });
    expect(ja.audit).toMatchObject({ url: dead, healthy: false, reachable: false });
    expect((ja.audit["replicas"] as Part[]).map((x) => [x["url"], x["healthy"], x["reachable"]])).toEqual([
      [dead, false, false],
      [dead.replace("127.0.0.1", "[::1]"), false, false],
    ]);
  });

  it("a table for people: one row per replica, and the service's row says how many are down", async () => {
    const dead = `https://127.0.0.1:${closedPort}`;
    const r = await ctl(kdc, data, ["status", "--kdc", `${dead},${kdc.url}`, "--audit", `${dead},${dead.replace("127.0.0.1", "[::1]")}`]);
    expect(r.code, r.stderr).toBe(1);
    const lines = r.stdout.split("\n");
    const row = (part: string) => lines.find((l) => l.startsWith(part + " ")) ?? "";
    expect(row("kdc")).toMatch(/^kdc\s+ok\s+\S+\s+1 of 2 replicas down; v0\.1\.0, up \d+s, 1 tenant/);
    expect(row("kdc[1]")).toMatch(new RegExp(`^kdc\\[1\\]\\s+unreachable\\s+${dead.replace(/\./g, "\\.")}\\s+.*ECONNREFUSED.* \\(after \\d+ ms\\)$`));
    expect(row("kdc[2]")).toMatch(/^kdc\[2\]\s+ok\s+https:\S+\s+answered in \d+ ms, 0 agent\(s\) connected$/);
    expect(row("audit")).toMatch(/^audit\s+unreachable\s+\S+\s+all 2 replicas down; .*ECONNREFUSED/);
    expect(row("audit[2]")).toMatch(/^audit\[2\]\s+unreachable\s+/);
  });

  it("a table for people: each part's state, address and details, then the tenants", async () => {
    const r = await ctl(kdc, data, ["status", ...flags()]);
    expect(r.code, r.stderr).toBe(1);
    const lines = r.stdout.split("\n");
    expect(lines[0]).toMatch(/^PART\s+STATE\s+ADDRESS\s+DETAILS$/);
    const row = (part: string) => lines.find((l) => l.startsWith(part + " ")) ?? "";
    expect(row("kdc")).toMatch(new RegExp(`^kdc\\s+ok\\s+${kdc.url.replace(/\./g, "\\.")}\\s+v0\\.1\\.0, up \\d+s, 1 tenant\\(s\\), 0 agent\\(s\\) connected, attestation key NOT loaded, audit head \\d+$`));
    expect(row("audit")).toMatch(new RegExp(`^audit\\s+unreachable\\s+https://127\\.0\\.0\\.1:${closedPort}\\s+.*ECONNREFUSED`));
    expect(row("agent")).toMatch(/^agent\s+unreachable\s+\S+no-agent\.sock\s+.*ENOENT/);
    expect(row("proxy")).toMatch(/^proxy\s+ok\s+unix:\S+\s+v0\.1\.0, leaf cache 3 entries$/);
    expect(r.stdout).toMatch(/TENANT\s+ACTIVE VERSION\s+MACHINES UP TO DATE\nacme\s+1\s+0\/0\n/);
  });

  it("asks only the KDC when no other address is given (exit 0), and tells an error reply from an unreachable part", async () => {
    const only = await ctl(kdc, data, ["status", "--json"]);
    expect(only.code, only.stderr).toBe(0);
    const j = JSON.parse(only.stdout) as { healthy: boolean; audit: Part; agent: Part; proxy: Part; kdc: Part };
    expect(j.healthy).toBe(true);
    expect([j.audit, j.agent, j.proxy]).toEqual([{ checked: false }, { checked: false }, { checked: false }]);
    const table = await ctl(kdc, data, ["status"]);
    expect(table.stdout).toMatch(/^agent\s+not checked\s+-\s+give --agent-socket PATH/m);

    // A KDC that answers but refuses the token is an error, not unreachable.
    const denied = await ctl(kdc, { caFile: data.caFile }, ["status", "--json"], { KMI_CTL_TOKEN: "kmi_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" });
    expect(denied.code).toBe(1);
    const d = JSON.parse(denied.stdout) as { kdc: Part };
    expect(d.kdc).toMatchObject({ healthy: false, reachable: true });
    expect(String(d.kdc["error"])).toMatch(/unauthenticated/i);
  });

  it("takes a relative unix: socket path for --proxy-metrics and --agent-socket, read from the working directory", async () => {
    const r = await new Promise<{ code: number; stdout: string; stderr: string }>((res) =>
      execFile(
        process.execPath,
        [KMI, "ctl", "status", "--json", "--proxy-metrics", "unix:proxy-metrics.sock", "--agent-socket", "no-agent.sock"],
        { cwd: data.dir, encoding: "utf8", env: cleanEnv({ KMI_CTL_KDC: kdc.url, KMI_CTL_CA_FILE: data.caFile, KMI_CTL_TOKEN_FILE: data.tokenFile }) },
        (err, stdout, stderr) => res({ code: err === null ? 0 : Number((err as { code?: number }).code), stdout, stderr }),
      ),
    );
    const j = JSON.parse(r.stdout) as { proxy: Part; agent: Part };
    expect(j.proxy).toEqual({ metrics_address: `unix:${metricsSocket}`, healthy: true, version: "0.1.0", leaf_cache_entries: 3 });
    expect(j.agent).toMatchObject({ socket: join(data.dir, "no-agent.sock"), reachable: false });
  });
});
