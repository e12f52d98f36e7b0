/**
 * The open-file limit the proxy reports at start: parsed from /proc/<pid>/limits, turned into
 * the connections it allows, a warning when low; and, as a process started with a soft limit
 * below its hard one, Node raises the soft limit to the hard one and the start line says so.
 */
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { describe, expect, it } from "vitest";
import type { Logger } from "../../../src/common/logger.js";
import { describeFdLimit, logFdLimit, parseFdLimit, readFdLimit } from "../../../src/proxy/fd-limit.js";

const LIMITS = `Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 524288               files
Max locked memory         8388608              8388608              bytes
`;

/** A logger that keeps its lines. */
function memoryLogger(): { logger: Logger; lines: { level: string; msg: string; fields: Record<string, unknown> }[] } {
  const lines: { level: string; msg: string; fields: Record<string, unknown> }[] = [];
  const at = (level: string) => (msg: string, fields?: Record<string, unknown>) => void lines.push({ level, msg, fields: fields ?? {} });
  const logger = { debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") } as unknown as Logger;
  return { logger, lines };
}

describe("open-file limit", () => {
  it("parses the Max open files line, unlimited included", () => {
    expect(parseFdLimit(LIMITS)).toEqual({ soft: 1024, hard: 524288 });
    expect(parseFdLimit(LIMITS.replace("1024                 524288", "unlimited            unlimited"))).toEqual({ soft: Infinity, hard: Infinity });
    expect(parseFdLimit("Max cpu time unlimited unlimited seconds\n")).toBeUndefined();
  });

  it("reads this process's limit from /proc", () => {
    const l = readFdLimit();
    if (!existsSync("/proc/self/limits")) return expect(l).toBeUndefined();
    expect(l!.soft).toBeGreaterThan(0);
    expect(l!.hard).toBeGreaterThanOrEqual(l!.soft);
  });

  it("says how many connections the limit allows: two descriptors per busy intercepted connection, one per idle h2 one", () => {
    expect(describeFdLimit({ soft: 65_536, hard: 65_536 })).toEqual({
      fields: { soft: 65_536, hard: 65_536, busyConnections: 32_736, idleH2Connections: 65_472 },
      low: false,
    });
    expect(describeFdLimit({ soft: 1024, hard: 4096 }).low).toBe(true);
    expect(describeFdLimit({ soft: Infinity, hard: Infinity }).fields.busyConnections).toBe("unlimited");
  });

  it("logs info when the limit is ample, a warning when low or when the soft limit stayed below the hard one", () => {
    const a = memoryLogger();
    logFdLimit(a.logger, { soft: 100_000, hard: 100_000 });
    expect(a.lines).toEqual([{ level: "info", msg: "open files limit", fields: expect.objectContaining({ soft: 100_000, busyConnections: 49_968 }) as object }]);
    const b = memoryLogger();
    logFdLimit(b.logger, { soft: 1024, hard: 1024 });
    expect(b.lines[0]!.level).toBe("warn");
    expect(b.lines[0]!.msg).toContain("LimitNOFILE");
    const c = memoryLogger();
    logFdLimit(c.logger, { soft: 20_000, hard: 40_000 });
    expect(c.lines[0]!.level).toBe("warn");
    expect(c.lines[0]!.msg).toContain("soft limit stayed below the hard limit");
  });

  it("as a process started with soft 1024 and hard 4096: the start line shows the soft limit raised to 4096, and warns", async () => {
    if (!existsSync("/proc/self/limits") || !existsSync("/usr/bin/prlimit")) return;
    const kmi = new URL("../../../dist/cmd/kmi.js", import.meta.url).pathname;
    expect(existsSync(kmi), "dist/cmd/kmi.js: run npm run build").toBe(true);
    const p = spawn("prlimit", ["--nofile=1024:4096", process.execPath, kmi, "proxy", "--listen", "127.0.0.1:0", "--agent-socket", "/nonexistent/agent.sock", "--default-tenant", "acme", "--access-log", "off"], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    try {
      const line = await new Promise<string>((resolve, reject) => {
        let err = "";
        const timer = setTimeout(() => reject(new Error(`no open files line within 20 s: ${err}`)), 20_000);
        p.stderr.on("data", (b: Buffer) => {
          err += b.toString();
          const l = err.split("\n").find((x) => x.includes("open files"));
          if (l !== undefined) {
            clearTimeout(timer);
            resolve(l);
          }
        });
        p.once("exit", (code) => {
          clearTimeout(timer);
          reject(new Error(`exited ${String(code)} before the line: ${err}`));
        });
      });
      const rec = JSON.parse(line) as Record<string, unknown>;
      expect(rec).toMatchObject({ level: "warn", soft: 4096, hard: 4096, busyConnections: 2016, idleH2Connections: 4032 });
    } finally {
      p.kill("SIGKILL");
    }
  });
});
