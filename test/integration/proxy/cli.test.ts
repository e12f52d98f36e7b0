/**
 * `kmi proxy` as an operator runs it: --help, configuration errors, a run with a tenants
 * file and an access log file, SIGHUP (log reopen after rotation) and SIGTERM.
 */
import { createHash } from "node:crypto";
import { EventEmitter } from "node:events";
import { mkdtemp, readFile, rename, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runProxy } from "../../../src/proxy/cli.js";
import { FixtureAgent } from "../../fixtures/proxy/fixture-agent.js";
import { makeOriginPki, startOrigin, type Origin, type OriginPki } from "../../fixtures/proxy/origins.js";
import { run } from "../../fixtures/proxy/harness.js";

let dir: string;
let agent: FixtureAgent;
let pki: OriginPki;
let origin: Origin;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "kmi-proxy-cli-"));
  agent = await FixtureAgent.start({ tenants: ["acme", "globex"], dir });
  pki = makeOriginPki();
  origin = await startOrigin({ cert: pki.good });
});

afterAll(async () => {
  await origin?.close();
  await agent?.stop();
  await rm(dir, { recursive: true, force: true });
});

function capture(argv: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = "";
  let err = "";
  return runProxy(argv, { stdout: (t) => (out += t), stderr: (t) => (err += t), signalSource: new EventEmitter(), exit: () => {} }).then((code) => ({ code, out, err }));
}

describe("kmi proxy", () => {
  it("--help lists the flags with their environment variables", async () => {
    const r = await capture(["--help"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("usage: kmi proxy [flags]");
    for (const flag of ["--listen", "--agent-socket", "--tenants-file", "--policy", "--access-log", "--extra-ca", "--issue-rate", "--idle-timeout-ms"]) {
      expect(r.out).toContain(flag);
    }
    expect(r.out).toContain("KMI_PROXY_AGENT_SOCKET");
  });

  it.each([
    ["a Unix listen address", ["--listen", "unix:/tmp/x.sock", "--default-tenant", "acme"], /flag --listen: "unix:\/tmp\/x.sock" is a Unix socket path; the proxy listens on host:port/],
    ["no tenant at all", ["--listen", "127.0.0.1:0"], /no tenant: give --default-tenant/],
    ["an unknown flag", ["--no-such-flag"], /unknown flag --no-such-flag/],
    ["a lifetime past 47 days", ["--default-tenant", "acme", "--leaf-max-days", "90"], /--leaf-max-days: at most 47/],
    ["a missing CA file", ["--default-tenant", "acme", "--extra-ca", "/nonexistent.pem"], /--extra-ca \/nonexistent.pem: cannot read \(ENOENT\)/],
    ["a bad private range", ["--default-tenant", "acme", "--allow-private", "127.0.0.0/8,10.0.0.0/33"], /--allow-private: prefix length in "10.0.0.0\/33" must be 0 to 32/],
    ["a name as a private range", ["--default-tenant", "acme", "--allow-private", "localhost"], /--allow-private: "localhost" is not an address range/],
  ])("refuses %s with one line and exit 2", async (_n, argv, message) => {
    const r = await capture(argv);
    expect(r.code).toBe(2);
    expect(r.err).toMatch(message);
    expect(r.err.trim().split("\n")).toHaveLength(1);
  });

  it("refuses a bad tenants file naming the field", async () => {
    const f = join(dir, "bad-tenants.json");
    await writeFile(f, JSON.stringify({ tenants: [{ id: "acme", cidrs: ["10.0.0.0/33"] }] }));
    const r = await capture(["--tenants-file", f]);
    expect(r.code).toBe(2);
    expect(r.err).toContain("tenants[0].cidrs[0]: prefix length");
  });

  it("runs: tenants file, CA file, access log file reopened on SIGHUP, clean stop on SIGTERM", async () => {
    const tenantsFile = join(dir, "tenants.json");
    await writeFile(
      tenantsFile,
      JSON.stringify({
        defaultTenant: "acme",
        tenants: [{ id: "globex", users: [{ name: "bob", passwordSha256: createHash("sha256").update("tok").digest("hex") }] }],
      }),
    );
    const caFile = join(dir, "origin-ca.pem");
    await writeFile(caFile, pki.caPem);
    const logFile = join(dir, "access.log");
    const signals = new EventEmitter();
    let exitCode: number | undefined;
    let port = 0;
    const started = new Promise<void>((resolve) => {
      void runProxy(
        [
          "--listen", "127.0.0.1:0",
          "--agent-socket", agent.socketPath,
          "--tenants-file", tenantsFile,
          "--extra-ca", caFile,
          "--no-system-roots",
          "--allow-private", "127.0.0.0/8,::1",
          "--access-log", logFile,
          "--log-level", "error",
        ],
        { signalSource: signals, exit: (c) => (exitCode = c), onStarted: (a) => ((port = a.port), resolve()) },
      );
    });
    await started;
    const root = join(dir, "globex.pem");
    await writeFile(root, agent.rootPem("globex"));
    const curl = () => run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${port}`, "--proxy-user", "bob:tok", "--cacert", root, `https://localhost:${origin.port}/hello`]);
    expect((await curl()).stdout).toContain("hello from origin");
    // Log rotation: move the file away, SIGHUP, and the next line goes to a new file.
    const waitForLine = async (f: string) => {
      for (let i = 0; i < 50; i++) {
        const text = await readFile(f, "utf8").catch(() => "");
        if (text.includes('"path":"/hello"')) return text;
        await new Promise((r) => setTimeout(r, 20));
      }
      throw new Error(`no access log line in ${f}`);
    };
    const first = JSON.parse((await waitForLine(logFile)).trim().split("\n")[0]!);
    expect(first).toMatchObject({ tenant: "globex", host: "localhost", method: "GET", path: "/hello", status: 200, decision: "allow" });
    expect(Object.keys(first)).toEqual(expect.arrayContaining(["time", "client", "bytes_up", "bytes_down", "duration_ms"]));
    await rename(logFile, `${logFile}.1`);
    signals.emit("SIGHUP");
    await new Promise((r) => setTimeout(r, 50));
    expect((await curl()).stdout).toContain("hello from origin");
    expect(await waitForLine(logFile)).toContain('"tenant":"globex"');
    signals.emit("SIGTERM");
    for (let i = 0; i < 100 && exitCode === undefined; i++) await new Promise((r) => setTimeout(r, 20));
    expect(exitCode).toBe(0);
    const after = await run("curl", ["-sS", "--max-time", "2", "-x", `http://127.0.0.1:${port}`, "http://127.0.0.1:1/"]);
    expect(after.code).not.toBe(0);
  });
});
