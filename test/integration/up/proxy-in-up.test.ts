/**
 * What `kmi up` does for the proxy: it passes the per-address new-host limit and the worker
 * count through (flags or KMI_UP_*), `kmi up status` names the workers, the proxy accepts the command line `kmi up` makes, and the supervisor hands each
 * JSON log record of a part to that part's `onLog` (how the proxy's policy-reload-failed
 * reaches the terminal; the whole path runs in npm-start.test.ts).
 */
import { writeFile } from "node:fs/promises";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { Progress } from "../../../src/up/progress.js";
import { Supervisor, type LogRecord } from "../../../src/up/supervisor.js";
import { makeTempDir } from "../../helpers/process.js";
import { loadConfig } from "../../../src/common/config.js";
import { proxyProgram, resolveProxyConfig } from "../../../src/proxy/config.js";
import { resolveUpConfig, upProgram } from "../../../src/up/config.js";
import { layout } from "../../../src/up/layout.js";
import { proxyArgs, proxyConfigOf } from "../../../src/up/mesh.js";
import { formatSummary } from "../../../src/up/status.js";

describe("kmi up: the proxy's new-host limit", () => {
  it("defaults to the proxy's own (20/s, burst 100) and is set by flags or KMI_UP_PROXY_ISSUE_*", async () => {
    const def = resolveUpConfig(await loadConfig(upProgram, [], { env: {} }), "/w");
    expect(def.proxyIssueLimit).toEqual({ rate: 20, burst: 100 });
    const byFlag = resolveUpConfig(await loadConfig(upProgram, ["--proxy-issue-rate", "200", "--proxy-issue-burst", "1000"], { env: {} }), "/w");
    expect(byFlag.proxyIssueLimit).toEqual({ rate: 200, burst: 1000 });
    const byEnv = resolveUpConfig(await loadConfig(upProgram, [], { env: { KMI_UP_PROXY_ISSUE_RATE: "0", KMI_UP_PROXY_ISSUE_BURST: "5" } }), "/w");
    expect(byEnv.proxyIssueLimit).toEqual({ rate: 0, burst: 5 });
  });

  it("reaches the proxy's command line, which the proxy's own parser accepts", async () => {
    const cfg = resolveUpConfig(await loadConfig(upProgram, ["--proxy-issue-rate", "7", "--proxy-issue-burst", "9"], { env: {} }), "/w");
    const args = proxyArgs(layout(cfg.dataDir, cfg.runDir), cfg, cfg.listen.proxy);
    expect(args[0]).toBe("proxy");
    const proxy = await resolveProxyConfig(await loadConfig(proxyProgram, args.slice(1), { env: {} }));
    expect(proxy.issueRatePerSecond).toBe(7);
    expect(proxy.issueBurst).toBe(9);
  });

  it("writes the same settings as the proxy's config file (what the agent measures as proxy.config), which the proxy's parser reads alike", async () => {
    const cfg = resolveUpConfig(await loadConfig(upProgram, ["--proxy-issue-rate", "7", "--proxy-issue-burst", "9"], { env: {} }), "/w");
    const L = layout(cfg.dataDir, cfg.runDir);
    const args = proxyArgs(L, cfg, cfg.listen.proxy);
    const dir = await makeTempDir("kmi-up-proxy-config-");
    try {
      const file = join(dir.path, "proxy.json");
      await writeFile(file, JSON.stringify(proxyConfigOf(args)));
      const fromFile = await resolveProxyConfig(await loadConfig(proxyProgram, ["--config", file], { env: {} }));
      const fromArgs = await resolveProxyConfig(await loadConfig(proxyProgram, args.slice(1), { env: {} }));
      expect(fromFile).toEqual(fromArgs);
      expect(fromFile.issueRatePerSecond).toBe(7);
    } finally {
      await dir.cleanup();
    }
    expect(proxyConfigOf(["proxy", "--a", "1", "--b", "--c", "x"])).toEqual({ a: "1", b: true, c: "x" });
    expect(() => proxyConfigOf(["proxy", "stray"])).toThrow(/"stray" is not a flag/);
  });

  it("runs the proxy with 2 workers by default; --proxy-workers / KMI_UP_PROXY_WORKERS reach its --workers", async () => {
    const def = resolveUpConfig(await loadConfig(upProgram, [], { env: {} }), "/w");
    const parse = async (cfg: typeof def) => resolveProxyConfig(await loadConfig(proxyProgram, proxyArgs(layout(cfg.dataDir, cfg.runDir), cfg, cfg.listen.proxy).slice(1), { env: {} }));
    expect((await parse(def)).workers).toBe(2);
    const one = resolveUpConfig(await loadConfig(upProgram, [], { env: { KMI_UP_PROXY_WORKERS: "0" } }), "/w");
    expect((await parse(one)).workers).toBe(0);
    const auto = resolveUpConfig(await loadConfig(upProgram, ["--proxy-workers", "auto"], { env: {} }), "/w");
    expect((await parse(auto)).workers).toBe(availableParallelism());
    const bad = await loadConfig(upProgram, ["--proxy-workers", "many"], { env: {} });
    expect(() => resolveUpConfig(bad, "/w")).toThrow(/--proxy-workers: must be "auto" or a number from 0 to 256/);
  });

  it("kmi up status names the proxy's workers", () => {
    const part = { state: "running", pid: 10, healthy: true };
    const text = formatSummary({
      kmi_up: { version: "0.1.0", pid: 1, data_dir: "/w/data", run_dir: "/w/run", ready: true, time: "" },
      kdc: { ...part, url: "https://127.0.0.1:7443", version: "0.1.0", tenants: [], connected_agents: 0 },
      audit: { ...part, url: "https://127.0.0.1:7444", machines: [] },
      agent: { ...part, socket: "/w/run/agent.sock", machine_id: "m", attestation: "attested", kdc_connected: true, keys: [] },
      proxy: { ...part, url: "http://127.0.0.1:8080", default_tenant: "dev", leaf_cache_entries: 2, workers: [{ worker: 3, pid: 31 }, { worker: 4, pid: 41 }], worker_restarts: 2 },
      trust: {},
      ctl_env: {},
    } as unknown as Parameters<typeof formatSummary>[0]);
    expect(text).toMatch(/^ {2}proxy .*leaf cache 2 entries; 2 worker\(s\): #3 pid 31, #4 pid 41, 2 replaced$/m);
  });

  it("refuses a negative rate and a burst below 1, naming the flag", async () => {
    const negative = await loadConfig(upProgram, ["--proxy-issue-rate=-1"], { env: {} });
    expect(() => resolveUpConfig(negative, "/w")).toThrow(/--proxy-issue-rate: must be 0 \(no limit\) or more/);
    const zeroBurst = await loadConfig(upProgram, ["--proxy-issue-burst", "0"], { env: {} });
    expect(() => resolveUpConfig(zeroBurst, "/w")).toThrow(/--proxy-issue-burst: must be 1 or more/);
  });
});

describe("the supervisor hands a part's log records to its onLog", () => {
  it("every JSON record the part writes, as the part wrote it", async () => {
    const dir = await makeTempDir("kmi-up-onlog-");
    const fake = fileURLToPath(new URL("../../fixtures/up/fake-part.mjs", import.meta.url));
    const sup = new Supervisor({
      kmi: [process.execPath, fake],
      cwd: dir.path,
      env: { ...(process.env as Record<string, string>) },
      logFile: (p) => join(dir.path, `${p}.log`),
      progress: new Progress({ write: () => {}, color: false }),
      readyTimeoutMs: 10_000,
      initialBackoffMs: 100,
      maxBackoffMs: 400,
      stopTimeoutMs: 500,
    });
    const seen: LogRecord[] = [];
    try {
      await sup.start({
        name: "proxy",
        args: () => ["proxy"],
        ready: async (proc, signal) => {
          await proc.waitForLog((r) => r.msg === "started", signal);
          return "healthy";
        },
        onLog: (r) => void seen.push(r),
      });
      expect(seen.map((r) => r.msg)).toEqual(["configuration", "started"]);
      expect(seen[1]).toMatchObject({ program: "proxy", version: "9.9.9" });
    } finally {
      await sup.stop();
      await dir.cleanup();
    }
  });
});
