/**
 * `kmi up` passes the proxy's per-address new-host limit through (flags or KMI_UP_*), and the
 * proxy accepts the command line `kmi up` makes.
 */
import { describe, expect, it } from "vitest";
import { loadConfig } from "../../../src/common/config.js";
import { proxyProgram, resolveProxyConfig } from "../../../src/proxy/config.js";
import { resolveUpConfig, upProgram } from "../../../src/up/config.js";
import { layout } from "../../../src/up/layout.js";
import { proxyArgs } from "../../../src/up/mesh.js";

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

  it("refuses a negative rate and a burst below 1, naming the flag", async () => {
    const negative = await loadConfig(upProgram, ["--proxy-issue-rate=-1"], { env: {} });
    expect(() => resolveUpConfig(negative, "/w")).toThrow(/--proxy-issue-rate: must be 0 \(no limit\) or more/);
    const zeroBurst = await loadConfig(upProgram, ["--proxy-issue-burst", "0"], { env: {} });
    expect(() => resolveUpConfig(zeroBurst, "/w")).toThrow(/--proxy-issue-burst: must be 1 or more/);
  });
});
