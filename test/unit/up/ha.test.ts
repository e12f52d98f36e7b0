/**
 * The pieces of `kmi up --ha` that need no running cluster: the etcd certificates (judged by
 * openssl), the members' plan kept across starts, finding the etcd binary, each member's and
 * each replica's command line (parsed by the programs' own option parsers), the order parts
 * start and stop in, and `kmi up status`'s lines for replicas and members.
 * (test/integration/up/ha.test.ts runs all of it for real.)
 */
import { chmod, mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadConfig } from "../../../src/common/config.js";
import { serveProgram } from "../../../src/kdc/config.js";
import { KDC_ETCD_PREFIX } from "../../../src/kdc/config.js";
import { storeBackendFrom } from "../../../src/storage/backend.js";
import { ensureEtcdPki, etcdPkiFiles } from "../../../src/up/etcd-pki.js";
import { EtcdMissingError, etcdArgs, findEtcd, loadOrPlanCluster, storeFlags } from "../../../src/up/etcd.js";
import type { HealthSummary } from "../../../src/up/health.js";
import { layout, partIds, programOf, replicaId } from "../../../src/up/layout.js";
import { banner } from "../../../src/up/banner.js";
import { formatSummary } from "../../../src/up/status.js";
import { tlsNameFlags } from "../../../src/up/mesh.js";
import { makeTempDir, run, type TempDir } from "../../helpers/process.js";

let tmp: TempDir;

beforeAll(async () => {
  tmp = await makeTempDir("kmi-up-ha-unit-");
});

afterAll(async () => {
  await tmp?.cleanup();
});

async function openssl(args: string[]): Promise<string> {
  const r = await run("openssl", args);
  if (r.code !== 0) throw new Error(`openssl ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

describe("the etcd certificates", () => {
  it("a CA, a member certificate for clients and peers on the host, and client certificates, all verified by openssl; files 0600 in a 0700 dir", async () => {
    const dir = join(tmp.path, "pki");
    const pki = await ensureEtcdPki(dir, "127.0.0.1");
    expect((await stat(dir)).mode & 0o777).toBe(0o700);
    for (const c of [pki.member, ...Object.values(pki.clients)]) {
      expect(await openssl(["verify", "-CAfile", pki.ca, c.cert])).toContain(": OK");
      expect((await stat(c.key)).mode & 0o777).toBe(0o600);
    }
    expect((await stat(join(dir, "ca.key"))).mode & 0o777).toBe(0o600);
    const member = await openssl(["x509", "-in", pki.member.cert, "-noout", "-text"]);
    expect(member).toMatch(/DNS:localhost/);
    expect(member).toMatch(/IP Address:127\.0\.0\.1/);
    expect(member).toMatch(/TLS Web Server Authentication, TLS Web Client Authentication/);
    expect(member).toMatch(/CA:FALSE/);
    const ca = await openssl(["x509", "-in", pki.ca, "-noout", "-text"]);
    expect(ca).toMatch(/CA:TRUE/);
  });

  it("a later start keeps the CA and issues fresh certificates from it; a named host is in the member's SANs", async () => {
    const dir = join(tmp.path, "pki");
    const before = { ca: await readFile(join(dir, "ca.pem"), "utf8"), member: await readFile(etcdPkiFiles(dir).member.cert, "utf8") };
    const pki = await ensureEtcdPki(dir, "kmi-host.example");
    expect(await readFile(pki.ca, "utf8")).toBe(before.ca);
    expect(await readFile(pki.member.cert, "utf8")).not.toBe(before.member);
    expect(await openssl(["verify", "-CAfile", pki.ca, pki.member.cert])).toContain(": OK");
    expect(await openssl(["x509", "-in", pki.member.cert, "-noout", "-ext", "subjectAltName"])).toMatch(/DNS:kmi-host\.example/);
  });
});

describe("the members' plan", () => {
  it("is made once (3 members, distinct https URLs, file 0600) and read back unchanged", async () => {
    const file = join(tmp.path, "cluster.json");
    const first = await loadOrPlanCluster(file, "127.0.0.1");
    expect(first.members.map((m) => m.name)).toEqual(["etcd-1", "etcd-2", "etcd-3"]);
    const urls = first.members.flatMap((m) => [m.clientUrl, m.peerUrl]);
    expect(new Set(urls).size).toBe(6);
    for (const u of urls) expect(u).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    expect(await loadOrPlanCluster(file, "127.0.0.1")).toEqual(first);
  });

  it("each member: client and peer TLS with client certificates required, and the whole initial cluster", async () => {
    const plan = await loadOrPlanCluster(join(tmp.path, "cluster.json"), "127.0.0.1");
    const pki = etcdPkiFiles("/p");
    const args = etcdArgs(plan.members[1]!, plan, pki, "/d/etcd-2", "info");
    const flag = (name: string) => args[args.indexOf(name) + 1];
    expect(flag("--name")).toBe("etcd-2");
    expect(args).toContain("--client-cert-auth");
    expect(args).toContain("--peer-client-cert-auth");
    expect(flag("--trusted-ca-file")).toBe("/p/ca.pem");
    expect(flag("--peer-trusted-ca-file")).toBe("/p/ca.pem");
    expect(flag("--listen-client-urls")).toBe(plan.members[1]!.clientUrl);
    expect(flag("--initial-cluster")).toBe(plan.members.map((m) => `${m.name}=${m.peerUrl}`).join(","));
    expect(flag("--initial-cluster-token")).toBe(plan.token);
  });

  it("a KDC replica's store flags are what the KDC's own parser reads as etcd with every member", async () => {
    const plan = await loadOrPlanCluster(join(tmp.path, "cluster.json"), "127.0.0.1");
    const loaded = await loadConfig(serveProgram, ["--data-dir", "/d/kdc", ...storeFlags(plan, etcdPkiFiles("/p"), "kdc")], { env: {} });
    expect(storeBackendFrom(loaded.values, KDC_ETCD_PREFIX)).toEqual({
      kind: "etcd",
      endpoints: plan.members.map((m) => m.clientUrl),
      caFile: "/p/ca.pem",
      certFile: "/p/kdc.pem",
      keyFile: "/p/kdc.key",
      prefix: "kmi/kdc",
    });
  });
});

describe("finding etcd", () => {
  it("takes the first executable etcd on PATH, and without one says how to install it", async () => {
    const bin = join(tmp.path, "bin");
    await mkdir(bin, { recursive: true });
    await writeFile(join(bin, "etcd"), "#!/bin/sh\n");
    await expect(findEtcd(`/nonexistent:${bin}`)).rejects.toThrow(EtcdMissingError); // not executable yet
    await chmod(join(bin, "etcd"), 0o755);
    expect(await findEtcd(`/nonexistent:${bin}`)).toBe(join(bin, "etcd"));
    await expect(findEtcd("/nonexistent")).rejects.toThrow(/no etcd is on PATH; install it: apt-get install etcd-server/);
    await expect(findEtcd(undefined)).rejects.toThrow(EtcdMissingError);
  });
});

describe("the servers' certificate names", () => {
  it.each([
    ["127.0.0.1", []],
    ["0.0.0.0", []],
    ["::", []],
    ["localhost", []],
    ["10.0.0.5", ["--ip", "10.0.0.5"]],
    ["fd00::5", ["--ip", "fd00::5"]],
    ["kdc.example", ["--dns-name", "kdc.example"]],
  ])("listening on %s: %j beyond localhost, 127.0.0.1 and ::1", (host, flags) => {
    expect(tlsNameFlags(host)).toEqual(flags);
  });
});

describe("the start banner", () => {
  const L = layout("/k/data", "/k/run");
  const urls = { kdc: "https://127.0.0.1:7443", audit: "https://127.0.0.1:7444", proxy: "http://127.0.0.1:8080" };
  const cfg = { tenant: "dev", originCaFiles: [], proxyAllowPrivate: [] };

  it("without --ha points at it", () => {
    const text = banner({ L, urls, cfg, kmiScript: "/k/kmi.js", status: undefined });
    expect(text).toContain("kmi up --ha");
    expect(text).toMatch(/^ {2}KDC +https:\/\/127\.0\.0\.1:7443 +log \/k\/data\/logs\/kdc\.log$/m);
  });

  it("with --ha lists every etcd member and replica with its log", () => {
    const ha = {
      kdc: ["https://127.0.0.1:7443", "https://127.0.0.1:7453", "https://127.0.0.1:7463"],
      audit: ["https://127.0.0.1:7444", "https://127.0.0.1:7454"],
      etcd: [1, 2, 3].map((n) => ({ name: `etcd-${n}`, url: `https://127.0.0.1:${40000 + n}` })),
    };
    const text = banner({ L, urls, cfg, kmiScript: "/k/kmi.js", status: undefined, ha });
    expect(text).toMatch(/^kmi is up, highly available/m);
    expect(text).toMatch(/^ {2}etcd-2 +https:\/\/127\.0\.0\.1:40002 +log \/k\/data\/logs\/etcd-2\.log$/m);
    expect(text).toMatch(/^ {2}KDC 1 +https:\/\/127\.0\.0\.1:7443 +log \/k\/data\/logs\/kdc\.log$/m);
    expect(text).toMatch(/^ {2}KDC 3 +https:\/\/127\.0\.0\.1:7463 +log \/k\/data\/logs\/kdc-3\.log$/m);
    expect(text).toMatch(/^ {2}Auditserver 2 +https:\/\/127\.0\.0\.1:7454 +log \/k\/data\/logs\/audit-2\.log$/m);
    expect(text).not.toContain("kmi up --ha (with another");
  });
});

describe("the parts of kmi up --ha", () => {
  it("start etcd first, then the KDC and Auditserver replicas, the agent and the proxy (they stop in reverse)", () => {
    expect(partIds(true)).toEqual(["etcd-1", "etcd-2", "etcd-3", "kdc", "kdc-2", "kdc-3", "audit", "audit-2", "agent", "proxy"]);
    expect(partIds(false)).toEqual(["kdc", "audit", "agent", "proxy"]);
    expect(partIds(true).map(programOf)).toEqual(["etcd", "etcd", "etcd", "kdc", "kdc", "kdc", "audit", "audit", "agent", "proxy"]);
    expect([replicaId("kdc", 1), replicaId("audit", 2)]).toEqual(["kdc", "audit-2"]);
  });

  it("kmi up status shows every etcd member (the leader marked) and every replica", () => {
    const proc = (pid: number) => ({ state: "running", pid, restarts: 0, log: "/l" });
    const summary = {
      kmi_up: { version: "1", pid: 1, data_dir: "/d", run_dir: "/r", ready: true, time: "" },
      kdc: { url: "https://127.0.0.1:7443", ...proc(11), healthy: true, version: "1", tenants: [], connected_agents: 1 },
      audit: { url: "https://127.0.0.1:7444", ...proc(21), healthy: true, machines: [] },
      agent: { socket: "/r/agent.sock", ...proc(31), healthy: false, error: "down" },
      proxy: { url: "http://127.0.0.1:8080", ...proc(41), healthy: true, default_tenant: "dev" },
      trust: { kmi_root_ca: "", infra_ca: "", operator_token_file: "" },
      ctl_env: {},
      ha: {
        kdc_replicas: [
          { name: "kdc", url: "https://127.0.0.1:7443", ...proc(11), healthy: true },
          { name: "kdc-2", url: "https://127.0.0.1:7453", ...proc(12), healthy: true, connected_agents: 0 },
          { name: "kdc-3", url: "https://127.0.0.1:7463", state: "exited", pid: null, restarts: 0, healthy: false, error: "connect ECONNREFUSED" },
        ],
        audit_replicas: [
          { name: "audit", url: "https://127.0.0.1:7444", ...proc(21), healthy: true },
          { name: "audit-2", url: "https://127.0.0.1:7454", ...proc(22), healthy: true },
        ],
        etcd: {
          leader: "etcd-2",
          members: [
            { name: "etcd-1", url: "https://127.0.0.1:2379", ...proc(1), healthy: true, leader: false, version: "3.4.23" },
            { name: "etcd-2", url: "https://127.0.0.1:2381", ...proc(2), healthy: true, leader: true, version: "3.4.23" },
            { name: "etcd-3", url: "https://127.0.0.1:2383", ...proc(3), healthy: false, leader: false, error: "no answer in 3000 ms" },
          ],
        },
      },
    } satisfies HealthSummary;
    const text = formatSummary(summary);
    expect(text).toMatch(/^ {2}etcd-1 +running +pid 1 +https:\/\/127\.0\.0\.1:2379 {2}healthy; etcd 3\.4\.23$/m);
    expect(text).toMatch(/^ {2}etcd-2 .* healthy, leader; etcd 3\.4\.23$/m);
    expect(text).toMatch(/^ {2}etcd-3 .* unhealthy: no answer in 3000 ms$/m);
    expect(text).toMatch(/^ {2}kdc-2 +running +pid 12 +https:\/\/127\.0\.0\.1:7453 {2}serving; 0 agent\(s\) connected$/m);
    expect(text).toMatch(/^ {2}kdc-3 +exited +pid - +https:\/\/127\.0\.0\.1:7463 {2}unreachable: connect ECONNREFUSED$/m);
    expect(text).toMatch(/^ {2}audit-2 +running +pid 22 +https:\/\/127\.0\.0\.1:7454 {2}serving$/m);
  });
});
