/**
 * `kmi proxy` as an operator runs it: --help, configuration errors, a run with a tenants
 * file and an access log file, SIGHUP (log reopen after rotation) and SIGTERM; and
 * `kmi proxy hash-password` (in-process, and as the built process dist/cmd/kmi.js, built by
 * `npm test` / `npm run build`), whose output the proxy then accepts.
 */
import { createHash } from "node:crypto";
import { EventEmitter } from "node:events";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rename, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runProxy } from "../../../src/proxy/cli.js";
import { FixtureAgent } from "../../fixtures/proxy/fixture-agent.js";
import { makeOriginPki, startOrigin, type Origin, type OriginPki } from "../../fixtures/proxy/origins.js";
import { run } from "../../fixtures/proxy/harness.js";

const kmi = new URL("../../../dist/cmd/kmi.js", import.meta.url).pathname;
const HASH = /^scrypt\$16384\$8\$1\$[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=$/;

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

function capture(argv: string[], stdin?: string): Promise<{ code: number; out: string; err: string }> {
  let out = "";
  let err = "";
  return runProxy(argv, {
    stdout: (t) => (out += t),
    stderr: (t) => (err += t),
    stdin: Readable.from(stdin === undefined ? [] : [Buffer.from(stdin)]),
    signalSource: new EventEmitter(),
    exit: () => {},
  }).then((code) => ({ code, out, err }));
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
    expect(r.out).toContain("kmi proxy hash-password --help");
    expect(r.out).toContain("passwordHash");
  });

  it.each([
    ["a Unix listen address", ["--listen", "unix:/tmp/x.sock", "--default-tenant", "acme"], /flag --listen: "unix:\/tmp\/x.sock" is a Unix socket path; the proxy listens on host:port/],
    ["no tenant at all", ["--listen", "127.0.0.1:0"], /no tenant: give --default-tenant/],
    ["an unknown flag", ["--no-such-flag"], /unknown flag --no-such-flag/],
    ["a lifetime past 47 days", ["--default-tenant", "acme", "--leaf-max-days", "90"], /--leaf-max-days: at most 47/],
    ["a missing CA file", ["--default-tenant", "acme", "--extra-ca", "/nonexistent.pem"], /--extra-ca \/nonexistent.pem: cannot read \(ENOENT\)/],
    ["a bad private range", ["--default-tenant", "acme", "--allow-private", "127.0.0.0/8,10.0.0.0/33"], /--allow-private: prefix length in "10.0.0.0\/33" must be 0 to 32/],
    ["a name as a private range", ["--default-tenant", "acme", "--allow-private", "localhost"], /--allow-private: "localhost" is not an address range/],
    ["a worker count that is not a number", ["--default-tenant", "acme", "--workers", "many"], /flag --workers: must be "auto" or a number from 0 to 256/],
    ["too many workers", ["--default-tenant", "acme", "--workers", "257"], /flag --workers: must be "auto" or a number from 0 to 256/],
    ["a negative ticket key rotation", ["--default-tenant", "acme", "--ticket-key-rotation-seconds=-1"], /--ticket-key-rotation-seconds: must be 0 \(only on a revoke or quarantine\) or more/],
  ])("refuses %s with one line and exit 2", async (_n, argv, message) => {
    const r = await capture(argv);
    expect(r.code).toBe(2);
    expect(r.err).toMatch(message);
    expect(r.err.trim().split("\n")).toHaveLength(1);
  });

  it.each([
    ["a malformed passwordHash", [{ name: "dave", passwordHash: "scrypt$16384$8$1$c2FsdA==" }], "tenants[0].users[0].passwordHash: must be scrypt$<N>$<r>$<p>$<salt base64>$<hash base64>"],
    ["a cheap passwordHash", [{ name: "dave", passwordHash: `scrypt$1024$8$1$${Buffer.alloc(16).toString("base64")}$${Buffer.alloc(32).toString("base64")}` }], "tenants[0].users[0].passwordHash: N must be a power of two from 16384"],
    ["a user with both hashes", [{ name: "dave", passwordHash: "x", passwordSha256: "y" }], "tenants[0].users[0]: has both passwordHash and passwordSha256"],
    ["a user with no hash", [{ name: "dave" }], "tenants[0].users[0].passwordHash: missing; make one with `kmi proxy hash-password`"],
  ])("refuses a tenants file with %s, in one line naming the field", async (_n, users, message) => {
    const f = join(dir, "bad-users.json");
    await writeFile(f, JSON.stringify({ tenants: [{ id: "acme", users }] }));
    const r = await capture(["--tenants-file", f]);
    expect(r.code).toBe(2);
    expect(r.err).toContain(`kmi proxy: --tenants-file ${f}: ${message}`);
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
    // dave's passwordHash comes from `kmi proxy hash-password`, as an operator makes it.
    const made = await capture(["hash-password"], "dave-Qx7Lm2Rt9Wb4Kc8n\n");
    expect(made.code).toBe(0);
    const passwordHash = made.out.trim();
    expect(passwordHash).toMatch(HASH);
    const tenantsFile = join(dir, "tenants.json");
    await writeFile(
      tenantsFile,
      JSON.stringify({
        defaultTenant: "acme",
        tenants: [
          { id: "globex", users: [{ name: "bob", passwordSha256: createHash("sha256").update("tok").digest("hex") }] },
          { id: "acme", users: [{ name: "dave", passwordHash }] },
        ],
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
          "--workers", "0",
        ],
        { signalSource: signals, exit: (c) => (exitCode = c), onStarted: (a) => ((port = a.port), resolve()) },
      );
    });
    await started;
    const root = join(dir, "globex.pem");
    await writeFile(root, agent.rootPem("globex"));
    const curl = () => run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${port}`, "--proxy-user", "bob:tok", "--cacert", root, `https://localhost:${origin.port}/hello`]);
    expect((await curl()).stdout).toContain("hello from origin");
    const acmeRoot = join(dir, "acme.pem");
    await writeFile(acmeRoot, agent.rootPem("acme"));
    const curlDave = (password: string) =>
      run("curl", ["-sS", "--max-time", "10", "-x", `http://127.0.0.1:${port}`, "--proxy-user", `dave:${password}`, "--cacert", acmeRoot, `https://localhost:${origin.port}/hello`]);
    expect((await curlDave("dave-Qx7Lm2Rt9Wb4Kc8n")).stdout).toContain("hello from origin");
    expect((await curlDave("dave-Qx7Lm2Rt9Wb4Kc8N")).stderr).toMatch(/407/);
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

describe("kmi proxy hash-password", () => {
  const PASSWORD = "tok-8Jd3Ks0Lq5Vz2Xw7";

  it("reads the password from stdin and prints only its scrypt passwordHash", async () => {
    for (const input of [PASSWORD, `${PASSWORD}\n`, `${PASSWORD}\r\n`]) {
      const r = await capture(["hash-password"], input);
      expect(r.code).toBe(0);
      expect(r.out).toMatch(/^scrypt\$[^\n]+\n$/);
      const hash = r.out.trim();
      expect(hash).toMatch(HASH);
      expect(r.out + r.err).not.toContain(PASSWORD);
      // The trailing newline is not part of the password: the proxy accepts exactly PASSWORD.
      const { createTenantResolver } = await import("../../../src/proxy/tenants.js");
      const resolver = createTenantResolver([{ id: "acme", users: [{ name: "u", passwordHash: hash }] }], undefined);
      expect(await resolver.resolve("10.0.0.1", `Basic ${Buffer.from(`u:${PASSWORD}`).toString("base64")}`)).toMatchObject({ kind: "tenant", tenant: "acme" });
    }
  });

  it("--help explains it", async () => {
    const r = await capture(["hash-password", "--help"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("usage: kmi proxy hash-password < password-file");
    expect(r.out).toContain("stdin");
    expect(r.out).toContain("scrypt$N$r$p$salt$hash");
    expect(r.out).toContain("passwordHash");
  });

  it("warns about a short password on stderr, still hashing it", async () => {
    const r = await capture(["hash-password"], "short\n");
    expect(r.code).toBe(0);
    expect(r.out.trim()).toMatch(HASH);
    expect(r.err).toContain("warning: a password of fewer than 16 characters is weak");
    expect(r.err).not.toContain("short\n");
  });

  it.each([
    ["an empty stdin", [], "", /stdin: no password/],
    ["a lone newline", [], "\n", /stdin: no password/],
    ["two lines", [], "one-long-password-here\ntwo\n", /stdin: more than one line/],
    ["a password over 1024 bytes", [], "x".repeat(1025), /stdin: the password is longer than 1024 bytes/],
    ["an unknown flag", ["--cost", "20"], "a-long-enough-password\n", /unknown flag --cost/],
    ["the password as an argument", ["hunter2-on-the-command-line"], "", /the password goes on stdin, never on the command line/],
  ])("refuses %s with exit 2, one line, no hash and no password echoed", async (_n, args, stdin, message) => {
    const r = await capture(["hash-password", ...args], stdin);
    expect(r.code).toBe(2);
    expect(r.out).toBe("");
    expect(r.err).toMatch(message);
    expect(r.err.trim().split("\n")).toHaveLength(1);
    expect(r.err).not.toContain("hunter2");
    const firstLine = stdin.trim().split("\n")[0]!;
    if (firstLine !== "") expect(r.err).not.toContain(firstLine);
  });

  it("as a process: stdin in, hash out, accepted by the proxy's resolver", async () => {
    expect(existsSync(kmi), "dist/cmd/kmi.js is missing: run `npm run build` first").toBe(true);
    const r = await run(process.execPath, [kmi, "proxy", "hash-password"], `${PASSWORD}\n`);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toMatch(HASH);
    expect(r.stdout).not.toContain(PASSWORD);
    const { createTenantResolver } = await import("../../../src/proxy/tenants.js");
    const resolver = createTenantResolver([{ id: "acme", users: [{ name: "u", passwordHash: r.stdout.trim() }] }], undefined);
    expect(await resolver.resolve("10.0.0.1", `Basic ${Buffer.from(`u:${PASSWORD}`).toString("base64")}`)).toMatchObject({ kind: "tenant", tenant: "acme" });
    expect(await resolver.resolve("10.0.0.1", `Basic ${Buffer.from(`u:${PASSWORD}x`).toString("base64")}`)).toMatchObject({ kind: "auth-required" });
    const empty = await run(process.execPath, [kmi, "proxy", "hash-password"], "");
    expect(empty.code).toBe(2);
    expect(empty.stdout).toBe("");
  });
});
