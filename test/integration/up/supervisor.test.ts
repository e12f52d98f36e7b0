/**
 * The supervisor of `kmi up` with stand-in parts (test/fixtures/up/fake-part.mjs, real child
 * processes): a part that dies is reported with its last log lines and restarted with
 * exponential backoff; a part that fails before it is healthy is a PartStartError naming why;
 * stop() ends the parts in reverse order and kills one that ignores SIGTERM. Plus the small
 * pieces of `kmi up` that need no process: README parsing, log-line summaries, progress lines,
 * configuration.
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { loadConfig } from "../../../src/common/config.js";
import { partEnvironment, resolveUpConfig, upProgram } from "../../../src/up/config.js";
import type { PartName } from "../../../src/up/layout.js";
import { Progress } from "../../../src/up/progress.js";
import { PartStartError, Supervisor, summarizeLogLine, summarizeLogLines, type PartDefinition } from "../../../src/up/supervisor.js";
import { twoCommands } from "../../fixtures/up/readme.js";
import { makeTempDir, type TempDir } from "../../helpers/process.js";

const FAKE = fileURLToPath(new URL("../../fixtures/up/fake-part.mjs", import.meta.url));

let dir: TempDir;
let printed: string;
let sup: Supervisor | undefined;

function makeSupervisor(overrides: Partial<ConstructorParameters<typeof Supervisor>[0]> = {}): Supervisor {
  sup = new Supervisor({
    kmi: [process.execPath, FAKE],
    cwd: dir.path,
    env: { ...(process.env as Record<string, string>), FAKE_PART_ORDER: join(dir.path, "order") },
    logFile: (p) => join(dir.path, `${p}.log`),
    progress: new Progress({ write: (t) => (printed += t), color: false }),
    readyTimeoutMs: 10_000,
    initialBackoffMs: 100,
    maxBackoffMs: 400,
    stopTimeoutMs: 500,
    ...overrides,
  });
  return sup;
}

function part(name: PartName, ...args: string[]): PartDefinition {
  return {
    name,
    args: () => [name, ...args],
    ready: async (proc, signal) => {
      await proc.waitForLog((r) => r.msg === "started", signal);
      return "healthy";
    },
  };
}

async function waitForPrinted(re: RegExp, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!re.test(printed)) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${re}; printed:\n${printed}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

beforeEach(async () => {
  dir = await makeTempDir("kmi-up-sup-");
  printed = "";
});

afterEach(async () => {
  await sup?.stop();
  sup = undefined;
  await dir.cleanup();
});

describe("Supervisor", () => {
  it("starts parts, records their version, and stops them in reverse order", async () => {
    const s = makeSupervisor();
    for (const name of ["kdc", "audit", "agent", "proxy"] as const) expect(await s.start(part(name))).toBe("healthy");
    expect(s.statuses().map((p) => [p.name, p.state, p.version])).toEqual([
      ["kdc", "running", "9.9.9"],
      ["audit", "running", "9.9.9"],
      ["agent", "running", "9.9.9"],
      ["proxy", "running", "9.9.9"],
    ]);
    const pids = s.livePids();
    expect(pids).toHaveLength(4);
    expect(await s.stop()).toEqual([]);
    expect((await readFile(join(dir.path, "order"), "utf8")).trim().split("\n")).toEqual(["proxy", "agent", "audit", "kdc"]);
    expect(s.livePids()).toEqual([]);
    expect(printed).toMatch(/proxy: stopping \(pid \d+\)…\n.*agent: stopping.*\n.*audit: stopping.*\n.*kdc: stopping/);
    // Every part's output went to its log file, after a line saying which process it was.
    const log = await readFile(join(dir.path, "kdc.log"), "utf8");
    expect(log).toMatch(/"msg":"kmi up: process started".*"part":"kdc"/);
    expect(log).toMatch(/"msg":"started"/);
  });

  it("reports a part that dies, with its last log lines, and restarts it", async () => {
    const s = makeSupervisor();
    await s.start(part("kdc"));
    const first = s.status("kdc")!.pid!;
    await s.start(part("agent", "--crash-after-ms", "200", "--crash-once", join(dir.path, "crashed")));
    await waitForPrinted(/agent: back: healthy \(pid \d+\)/);
    expect(printed).toMatch(/agent: died: exited with code 3 after \d+ ms \(pid \d+\); its last log lines \(.*agent\.log\):/);
    expect(printed).toContain("error fatal: lost the store: EIO: i/o error, read");
    expect(Number(/agent: restarting in (\d+) ms \(restart 1\)/.exec(printed)?.[1])).toBeGreaterThanOrEqual(50);
    const agent = s.status("agent")!;
    expect(agent).toMatchObject({ state: "running", restarts: 1 });
    expect(agent.lastExit).toMatchObject({ code: 3, signal: null });
    expect(s.status("kdc")!.pid).toBe(first);
  });

  it("backs off exponentially (with jitter) while a part keeps dying, up to the maximum", async () => {
    const s = makeSupervisor();
    await s.start(part("audit", "--crash-after-ms", "50"));
    await waitForPrinted(/restarting in \d+ ms \(restart 4\)/, 15_000);
    const delays = [...printed.matchAll(/audit: restarting in (\d+) ms/g)].map((m) => Number(m[1]));
    // Each delay is drawn in [cap/2, cap] with caps 100, 200, 400, 400.
    [100, 200, 400, 400].forEach((cap, i) => {
      expect(delays[i]).toBeGreaterThanOrEqual(cap / 2);
      expect(delays[i]).toBeLessThanOrEqual(cap);
    });
  });

  it("a part that fails before it is healthy is a PartStartError with its last lines", async () => {
    const s = makeSupervisor();
    const err = await s.start(part("kdc", "--fail-at-start")).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PartStartError);
    expect((err as PartStartError).message).toBe("exited with code 2 before it was healthy");
    expect((err as PartStartError).lastLines).toEqual(["kmi kdc: cannot open the store: it is locked by another process"]);
    expect(s.status("kdc")!.state).toBe("failed");
  });

  it("a part that is not healthy in time is killed and reported", async () => {
    const s = makeSupervisor({ readyTimeoutMs: 300 });
    const err = await s.start(part("proxy", "--start-delay-ms", "5000")).catch((e: unknown) => e);
    expect((err as PartStartError).message).toBe("not healthy after 300 ms");
    expect(s.livePids()).toEqual([]);
  });

  it("kills a part that ignores SIGTERM after the grace period", async () => {
    const s = makeSupervisor();
    await s.start(part("kdc"));
    await s.start(part("proxy", "--ignore-sigterm"));
    expect(await s.stop()).toEqual(["proxy"]);
    expect(printed).toMatch(/proxy: warning: still running 500 ms after SIGTERM; sending SIGKILL/);
    expect(s.livePids()).toEqual([]);
  });
});

describe("pieces of kmi up", () => {
  it("reads the Two commands of a README", () => {
    const readme = "# x\n\n## Two commands\n\nText.\n\n```sh\nnpm start     # run it\nnpm test      # test it\n```\n\n## Next\n```sh\nother\n```\n";
    expect(twoCommands(readme)).toEqual([
      { argv: ["npm", "start"], comment: "run it" },
      { argv: ["npm", "test"], comment: "test it" },
    ]);
    expect(() => twoCommands("# x\n")).toThrow(/no "## Two commands" section/);
    expect(() => twoCommands("## Two commands\n```sh\nnpm start && rm -rf /\n```\n")).toThrow(/not a plain command/);
  });

  it.each([
    ['{"level":"error","msg":"cannot listen","error":"EADDRINUSE 127.0.0.1:7443"}', "error cannot listen: EADDRINUSE 127.0.0.1:7443"],
    ['{"level":"warn","msg":"kdc link down; retrying","err":{"message":"Unavailable: nope"}}', "warn kdc link down; retrying: Unavailable: nope"],
    ["kmi kdc: data/kdc is not initialized; run kmi kdc init", "kmi kdc: data/kdc is not initialized; run kmi kdc init"],
    ['{"level":"info","msg":"rpc","method":"/kmi.kdc.v1.DistributionService/WatchSecrets","code":"ok"}', "info rpc kdc.v1.DistributionService/WatchSecrets ok"],
    ['{"level":"info"', '{"level":"info"'],
  ])("summarizes the log line %s", (line, want) => {
    expect(summarizeLogLine(line)).toBe(want);
  });

  it("folds repeated log lines", () => {
    const l = '{"level":"warn","msg":"retrying"}';
    expect(summarizeLogLines([l, l, l, '{"level":"info","msg":"ok"}'])).toEqual(["warn retrying (×3)", "info ok"]);
  });

  it("prints progress as time, part and text, with colour only when asked", () => {
    let out = "";
    const now = () => new Date(2026, 0, 2, 3, 4, 5);
    new Progress({ write: (t) => (out += t), color: false, now }).step("kdc", "healthy on 127.0.0.1:7443");
    expect(out).toBe("03:04:05 kdc: healthy on 127.0.0.1:7443\n");
    out = "";
    new Progress({ write: (t) => (out += t), color: true, now }).warn("agent", "quarantined");
    expect(out).toBe("03:04:05 \x1b[36magent\x1b[0m: \x1b[33mwarning: quarantined\x1b[0m\n");
  });

  it("takes ports and paths from flags or KMI_UP_* and resolves paths against the working directory", async () => {
    const loaded = await loadConfig(upProgram, ["--proxy-listen", "127.0.0.1:0"], {
      env: { KMI_UP_KDC_LISTEN: "127.0.0.1:17443", KMI_UP_ORIGIN_CA_FILE: "a.pem, /b.pem", KMI_UP_DATA_DIR: "d", KMI_UP_PROXY_ALLOW_PRIVATE: "127.0.0.0/8, ::1" },
    });
    const cfg = resolveUpConfig(loaded, "/work/x");
    expect(cfg.listen).toEqual({ kdc: { host: "127.0.0.1", port: 17443 }, audit: { host: "127.0.0.1", port: 7444 }, proxy: { host: "127.0.0.1", port: 0 } });
    expect(cfg.dataDir).toBe("/work/x/d");
    expect(cfg.runDir).toBe("/work/x/run");
    expect(cfg.originCaFiles).toEqual(["/work/x/a.pem", "/b.pem"]);
    expect(cfg.proxyAllowPrivate).toEqual(["127.0.0.0/8", "::1"]);
    await expect(loadConfig(upProgram, ["--proxy-listen", "/tmp/sock"])).rejects.toThrow(/--proxy-listen: must be host:port/);
    await expect(loadConfig(upProgram, ["--tenant", "Dev"])).rejects.toThrow(/--tenant/);
  });

  it("keeps the operator's KMI_* settings of the parts away from them", () => {
    const env = partEnvironment({ PATH: "/bin", KMI_KDC_MASTER_KEY: "x", KMI_MASTER_KEY: "y", KMI_AGENT_JOIN_TOKEN: "z", KMI_CTL_KDC: "u", KMI_UP_JSON: "1" });
    expect(env).toEqual({ PATH: "/bin", KMI_UP_JSON: "1" });
  });
});
