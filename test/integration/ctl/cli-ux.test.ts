/**
 * The command line of `kmi` and `kmi ctl` as a person meets it, run as the built program
 * (`node dist/cmd/kmi.js`): group help, --version, "did you mean" for a mistyped command, flag
 * or program, the missing positional named before a missing flag, and the shell completion
 * scripts run by real bash and zsh. None of these needs a server.
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { commandTable } from "../../../src/ctl/cli.js";
import { cleanEnv, cleanup, KMI, tempDir } from "../kdc/harness.js";

interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: readonly string[]): Promise<Result> {
  return new Promise((resolve) => {
    execFile(cmd, args, { env: cleanEnv(), encoding: "utf8" }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof (err as { code?: unknown }).code === "number" ? ((err as { code: number }).code) : -1, stdout, stderr });
    });
  });
}

const kmi = (...args: string[]) => run(process.execPath, [KMI, ...args]);

let dir: string;
beforeAll(async () => {
  expect(existsSync(KMI), "dist/cmd/kmi.js is missing: run `npm run build` first").toBe(true);
  dir = await tempDir("kmi-cli-ux-");
});
afterAll(async () => cleanup(dir));

describe("help and version", () => {
  const groups = [...new Set(commandTable.filter((c) => c.name.length > 1).map((c) => c.name[0]!))];

  it.each(groups)("kmi ctl %s --help prints the group's commands and exits 0", async (group) => {
    const r = await kmi("ctl", group, "--help");
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`usage: kmi ctl ${group} <command>`);
    for (const c of commandTable.filter((x) => x.name[0] === group && x.name.length > 1)) expect(r.stdout).toContain(`  ${c.name.join(" ")}`);
    for (const c of commandTable.filter((x) => x.name[0] !== group)) expect(r.stdout).not.toMatch(new RegExp(`^  ${c.name.join(" ")}\\b`, "m"));
  });

  it("kmi ctl <group> alone prints the group's help on stderr and exits 2", async () => {
    const r = await kmi("ctl", "ca");
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("ca upload");
  });

  it.each([[["ctl", "--version"]], [["--version"]], [["ctl", "-V"]]])("kmi %j prints the version and exits 0", async (args) => {
    const r = await kmi(...args);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe("0.1.0\n");
  });

  it("kmi ctl ca upload --help prints the command's flags and exits 0", async () => {
    const r = await kmi("ctl", "ca", "upload", "--help");
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("usage: kmi ctl ca upload");
    expect(r.stdout).toContain("--cert FILE");
  });
});

describe("mistakes", () => {
  it.each([
    ["a mistyped command", ["ctl", "ca", "uplod"], 'unknown command "ca uplod"; did you mean "ca upload"?'],
    ["a mistyped group", ["ctl", "tennant", "list"], 'did you mean "tenant list"?'],
    ["a mistyped flag", ["ctl", "ca", "history", "--tennant", "acme"], 'unknown flag "--tennant"; did you mean "--tenant"?'],
    ["a mistyped global flag", ["ctl", "--jsn"], 'unknown flag "--jsn"; did you mean "--json"?'],
    ["a mistyped program", ["ctll"], 'unknown program "ctll"; did you mean "ctl"?'],
    ["a mistyped flag of kmi up", ["up", "--tennant", "x"], 'unknown flag --tennant; did you mean "--tenant"?'],
    ["a mistyped flag of kmi kdc", ["kdc", "--listn", "127.0.0.1:0"], 'unknown flag --listn; did you mean "--listen"?'],
    ["no machine id, before the missing --reason", ["ctl", "machine", "quarantine"], "missing MACHINE_ID"],
    ["a flag without its value", ["ctl", "ca", "activate", "--tenant", "acme", "--version"], "--version: needs a value (N)"],
    ["a value that looks like a flag", ["ctl", "ca", "activate", "--tenant", "acme", "--version", "-3"], 'write --version=VALUE'],
    ["a negative number", ["ctl", "ca", "activate", "--tenant", "acme", "--version=-3"], '"-3" is not a non-negative integer'],
    ["a word that is nothing like a command", ["ctl", "zzzzzz"], "run `kmi ctl --help` for the list"],
  ])("%s: exit 2 with %j", async (_name, args, message) => {
    const r = await kmi(...args);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(message);
  });

  it("the missing machine id is named even when --reason is missing too, and --reason after the id", async () => {
    const r = await kmi("ctl", "machine", "quarantine", "m-1");
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("--reason is required");
  });
});

describe("kmi completion", () => {
  it("bash: completes programs, ctl groups, commands, flags and flag values from the command table", async () => {
    const script = join(dir, "kmi.bash");
    const gen = await kmi("completion", "bash");
    expect(gen.code, gen.stderr).toBe(0);
    await writeFile(script, gen.stdout);
    const probe = [
      `source ${script}`,
      't(){ COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _kmi; echo "${COMPREPLY[*]}"; }',
      't kmi ""',
      "t kmi ctl ca up",
      "t kmi ctl ca upload --te",
      't kmi ctl ca download --tenant acme --format ""',
      't kmi ctl --json ca download --tenant acme --part ""',
      't kmi kdc ""',
      't kmi up --log-level ""',
      `t kmi ctl ca upload --cert ${script.slice(0, -2)}`,
      't kmi audit ""',
      "t kmi kdc rekey --batch",
    ].join("\n");
    const r = await run("bash", ["-c", probe]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.split("\n").slice(0, 10)).toEqual([
      "kdc audit agent proxy ctl up completion",
      "upload",
      "--tenant",
      "pem der",
      "chain intermediate root",
      "init backup restore rekey",
      "debug info warn error",
      script,
      "init rekey",
      "--batch-size",
    ]);
  });

  it("bash: every command of the table is reachable and offers its flags and --json", async () => {
    const script = join(dir, "kmi-all.bash");
    await writeFile(script, (await kmi("completion", "bash")).stdout);
    const lines = commandTable.map((c) => `t kmi ctl ${c.name.join(" ")} --`);
    const r = await run("bash", ["-c", [`source ${script}`, 't(){ COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _kmi; echo "${COMPREPLY[*]}"; }', ...lines].join("\n")]);
    expect(r.code, r.stderr).toBe(0);
    const out = r.stdout.trimEnd().split("\n");
    commandTable.forEach((c, i) => {
      const offered = out[i]!.split(" ");
      expect(offered, c.name.join(" ")).toEqual(expect.arrayContaining([...Object.keys(c.flags).map((f) => `--${f}`), "--json", "--help"]));
    });
  });

  it("zsh: the same tree through compadd and _files", async () => {
    const script = join(dir, "kmi.zsh");
    const gen = await kmi("completion", "zsh");
    expect(gen.code, gen.stderr).toBe(0);
    expect(gen.stdout.startsWith("#compdef kmi\n")).toBe(true);
    await writeFile(script, gen.stdout);
    // Outside a completion widget compadd and _files do not exist: stand-ins print what they get.
    const probe = [
      `source ${script}`,
      'compadd(){ shift; echo "$*"; }; _files(){ echo FILES; }',
      't(){ words=("$@"); CURRENT=${#words}; _kmi; }',
      't kmi ""',
      't kmi ctl ca ""',
      't kmi ctl ca download --format ""',
      't kmi ctl ca upload --cert ""',
    ].join("\n");
    const r = await run("zsh", ["-f", "-c", probe]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.split("\n").slice(0, 4)).toEqual([
      "kdc audit agent proxy ctl up completion",
      commandTable.filter((c) => c.name[0] === "ca").map((c) => c.name[1]).join(" "),
      "pem der",
      "FILES",
    ]);
  });

  it("refuses a shell it does not know, naming the ones it does", async () => {
    const r = await kmi("completion", "fish");
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("one of bash, zsh");
  });
});
