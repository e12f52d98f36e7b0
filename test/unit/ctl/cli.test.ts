import { Code, ConnectError } from "@connectrpc/connect";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { FailedPrecondition } from "../../../src/common/errors.js";
import { run, usage } from "../../../src/ctl/cli.js";
import type { Command } from "../../../src/ctl/command.js";
import { Args, parseFlags } from "../../../src/ctl/flags.js";
import { describeError, ExitCode, renderFields, renderTable, UsageError } from "../../../src/ctl/output.js";
import { makeTempDir } from "../../helpers/process.js";

function streams() {
  const out: string[] = [];
  const err: string[] = [];
  return { s: { stdout: { write: (c: string | Uint8Array) => out.push(String(c)) }, stderr: { write: (c: string) => err.push(c) } }, out: () => out.join(""), err: () => err.join("") };
}

const fake = (behaviour: () => Promise<number | void>): Command => ({
  name: ["thing", "do"],
  summary: "does a thing",
  flags: { tenant: { type: "string", help: "tenant", env: "KMI_CTL_TENANT", required: true }, n: { type: "int", help: "n" }, tag: { type: "list", help: "tags" } },
  async run(ctx) {
    const r = await behaviour();
    ctx.out.result({ tenant: ctx.args.str("tenant"), n: ctx.args.int("n"), tags: ctx.args.list("tag") }, () => `tenant ${ctx.args.str("tenant")}\n`);
    return r;
  },
});

describe("flags", () => {
  it("parses values, =values, booleans, lists and env, and refuses unknown flags", () => {
    const specs = { a: { type: "string", help: "" }, b: { type: "bool", help: "" }, l: { type: "list", help: "" }, i: { type: "int", help: "" }, e: { type: "string", help: "", env: "E" } } as const;
    const p = new Args(parseFlags(["--a", "x", "--b", "--l=1,2", "--l", "3", "--i=7", "pos"], specs, { E: "fromenv" }));
    expect([p.str("a"), p.bool("b"), p.list("l"), p.int("i"), p.str("e"), p.positionals]).toEqual(["x", true, ["1", "2", "3"], 7, "fromenv", ["pos"]]);
    expect(() => parseFlags(["--nope"], specs)).toThrow(UsageError);
    expect(() => parseFlags(["--a"], specs)).toThrow("needs a value");
    expect(() => parseFlags(["--i", "-3"], specs)).toThrow("--i=VALUE");
    expect(() => parseFlags(["--i=-3"], specs)).toThrow("not a non-negative integer");
    expect(() => parseFlags(["--b=yes"], specs)).toThrow("--b: takes no value");
    expect(() => parseFlags(["--ae", "x"], specs)).toThrow('did you mean "--a"?');
    expect(() => parseFlags([], { r: { type: "string", help: "", required: true, env: "R" } })).toThrow("--r is required (or set R)");
  });
});

describe("output", () => {
  it("renders aligned tables and fields, with control characters neutralized", () => {
    expect(renderTable([{ header: "id", value: (r: { id: string }) => r.id }, { header: "x", value: () => "" }], [{ id: "a\nb" }, { id: "long-id" }])).toBe("ID       X\na?b      -\nlong-id  -\n");
    expect(renderFields([["k", 1], ["longer", undefined]])).toBe("k:       1\nlonger:  -\n");
  });

  it.each([
    [new ConnectError("x", Code.NotFound), ExitCode.notFound],
    [new ConnectError("x", Code.Unauthenticated), ExitCode.denied],
    [new ConnectError("x", Code.PermissionDenied), ExitCode.denied],
    [new ConnectError("x", Code.InvalidArgument), ExitCode.rejected],
    [new ConnectError("x", Code.FailedPrecondition), ExitCode.rejected],
    [new ConnectError("x", Code.AlreadyExists), ExitCode.rejected],
    [new ConnectError("x", Code.Unavailable), ExitCode.failure],
    [new ConnectError("x", Code.Internal), ExitCode.failure],
    [new UsageError("x"), ExitCode.usage],
    [new FailedPrecondition("x"), ExitCode.rejected],
    [new Error("x"), ExitCode.failure],
  ])("maps %s to exit code %i", (err, code) => {
    expect(describeError(err).code).toBe(code);
  });
});

describe("run", () => {
  it("prints help with every KDC command and the exit codes", async () => {
    const t = streams();
    expect(await run(["--help"], { streams: t.s, env: {} })).toBe(0);
    for (const c of ["tenant create", "token revoke", "ca download", "ca upload", "ca renew", "audit verify", "service-cert issue", "exit codes:"]) expect(t.out()).toContain(c);
    expect(usage()).toContain("KMI_CTL_CA_FILE");
    expect(usage()).toContain("--timeout SECONDS (KMI_CTL_TIMEOUT, default 30)");
  });

  it("gives each command's own defaults in its help, and says 'repeatable' once", async () => {
    const help = async (...argv: string[]) => {
      const t = streams();
      expect(await run([...argv, "--help"], { streams: t.s, env: {} })).toBe(0);
      return t.out();
    };
    // status probes with 5 s unless told (its help said 30, the other commands' default).
    const status = await help("status");
    expect(status).toMatch(/--timeout SECONDS\s+give up on each probe after this many seconds \(default 5\)/);
    expect(status).not.toContain("(default 30)");
    const approve = await help("group", "approve-measurements");
    expect(approve).toContain("--measurement NAME=SHA256[,SHA256...]");
    expect(approve.match(/repeatable/g)?.length).toBe(3); // the two flags' lines and the text saying both are
    expect(approve).not.toContain("(repeatable) (repeatable)");
  });

  it("exits 2 on an unknown command or a missing flag, naming what to do", async () => {
    let t = streams();
    expect(await run(["thing", "undo"], { streams: t.s, env: {}, commands: [fake(async () => {})] })).toBe(2);
    expect(t.err()).toContain('did you mean "thing do"?');
    t = streams();
    expect(await run(["thing", "xyzzyplugh"], { streams: t.s, env: {}, commands: [fake(async () => {})] })).toBe(2);
    expect(t.err()).toContain('"thing" has: do');
    t = streams();
    expect(await run(["thing", "do"], { streams: t.s, env: {}, commands: [fake(async () => {})] })).toBe(2);
    expect(t.err()).toContain("--tenant is required (or set KMI_CTL_TENANT)");
  });

  it("prints people's text or --json (also before the command), takes flags from env", async () => {
    let t = streams();
    expect(await run(["thing", "do", "--tenant", "acme"], { streams: t.s, env: {}, commands: [fake(async () => {})] })).toBe(0);
    expect(t.out()).toBe("tenant acme\n");
    t = streams();
    expect(await run(["--json", "thing", "do", "--n", "3", "--tag", "a,b"], { streams: t.s, env: { KMI_CTL_TENANT: "env-t" }, commands: [fake(async () => {})] })).toBe(0);
    expect(JSON.parse(t.out())).toEqual({ tenant: "env-t", n: 3, tags: ["a", "b"] });
  });

  it("maps server errors to exit codes, as JSON on stderr with --json", async () => {
    const t = streams();
    const cmd = fake(async () => {
      throw new ConnectError("tenant \"x\" not found", Code.NotFound);
    });
    expect(await run(["thing", "do", "--tenant", "x", "--json"], { streams: t.s, env: {}, commands: [cmd] })).toBe(3);
    expect(JSON.parse(t.err())).toEqual({ error: { code: "NotFound", message: 'tenant "x" not found' } });
  });
});

describe("the bearer token never reaches an error message", () => {
  it("a token file with a second line is refused without quoting the token", async () => {
    const tmp = await makeTempDir("kmi-ctl-token-");
    try {
      const secret = "EqVegccpBWAtRHnHWWTFw71IdO1oat2sGfdtkLKDeuE";
      const file = join(tmp.path, "operator.token");
      writeFileSync(file, `kmi_a7c1bed3f8201061_${secret}\n# the first operator token\n`, { mode: 0o600 });
      const t = streams();
      const code = await run(["tenant", "list", "--kdc", "https://127.0.0.1:1", "--token-file", file, "--timeout", "5"], { streams: t.s, env: {} });
      expect(code).not.toBe(0);
      expect(t.err()).toMatch(/token/);
      expect(t.err() + t.out()).not.toContain(secret);
    } finally {
      await tmp.cleanup();
    }
  });
});
