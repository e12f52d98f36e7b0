#!/usr/bin/env node
/**
 * The one kmi command: `kmi <program> [args]`. Thin by design: it picks the program and
 * hands it argv; each program parses its own flags, env and config file, creates its
 * server, starts it, and stops it cleanly on SIGTERM/SIGINT. On failure: exit 1 and one
 * line on stderr that says what to do.
 */
import { VERSION } from "../src/common/version.js";
import type { CompletionNode } from "../src/ctl/completion.js";
import { didYouMean } from "../src/common/suggest.js";

type ProgramMain = (argv: string[]) => Promise<number>;

interface Program {
  summary: string;
  load: () => Promise<ProgramMain>;
  /** Its flags and sub-commands for shell completion, from the same specs that parse them. */
  completion: () => Promise<CompletionNode>;
}

/** The programs, loaded lazily so that `kmi ctl` does not pay for the proxy's imports. */
const programs: Record<string, Program> = {
  kdc: {
    summary: "run the KDC (keys, certificates, distribution); `kmi kdc init` first",
    load: async () => (await import("../src/kdc/cli.js")).main,
    async completion() {
      const [{ programCompletionNode: node }, c, b, r, k] = await Promise.all([import("../src/ctl/completion.js"), import("../src/kdc/config.js"), import("../src/kdc/backup/cli.js"), import("../src/storage/rekey-command.js"), import("../src/kdc/rekey.js")]);
      return node(c.serveProgram, { init: node(c.initProgram), backup: node(b.backupProgram), restore: node(b.restoreProgram), rekey: node(r.rekeyProgram(k.kdcRekeyTarget)) });
    },
  },
  audit: {
    summary: "run the Auditserver (enrollment, attestation, quarantine); `kmi audit init` first",
    load: async () => (await import("../src/audit/cli.js")).main,
    async completion() {
      const [{ programCompletionNode: node }, c, r, a] = await Promise.all([import("../src/ctl/completion.js"), import("../src/audit/config.js"), import("../src/storage/rekey-command.js"), import("../src/audit/rekey.js")]);
      return node(c.serveProgram, { init: node(c.initProgram), rekey: node(r.rekeyProgram(a.auditRekeyTarget)) });
    },
  },
  agent: {
    summary: "run the key agent of this machine (Unix-socket signing API)",
    load: async () => (await import("../src/agent/cli.js")).main,
    async completion() {
      const [{ programCompletionNode: node }, c] = await Promise.all([import("../src/ctl/completion.js"), import("../src/agent/config.js")]);
      return node(c.agentProgram);
    },
  },
  proxy: {
    summary: "run the TLS-inspecting forward proxy",
    load: async () => (await import("../src/proxy/cli.js")).main,
    async completion() {
      const [{ programCompletionNode: node }, c] = await Promise.all([import("../src/ctl/completion.js"), import("../src/proxy/config.js")]);
      return node(c.proxyProgram, { "hash-password": { children: {}, flags: [{ name: "help", value: false }] } });
    },
  },
  ctl: {
    summary: "operator and tenant-admin commands (tenants, tokens, CA, machines, audit log)",
    load: async () => (await import("../src/ctl/cli.js")).main,
    async completion() {
      const [{ ctlCompletionTree }, { commandTable }] = await Promise.all([import("../src/ctl/completion.js"), import("../src/ctl/cli.js")]);
      return ctlCompletionTree(commandTable);
    },
  },
  up: {
    summary: "the whole mesh on this machine with embedded defaults (what `npm start` runs)",
    load: async () => (await import("../src/up/cli.js")).main,
    async completion() {
      const [{ programCompletionNode: node }, c] = await Promise.all([import("../src/ctl/completion.js"), import("../src/up/config.js")]);
      return node(c.upProgram, { status: { children: {}, flags: [{ name: "json", value: false }, { name: "help", value: false }] } });
    },
  },
};

/** `kmi completion bash|zsh`: the shell completion script, made from every program's flag declarations. */
async function completion(argv: string[]): Promise<number> {
  const { COMPLETION_SHELLS, completionScript } = await import("../src/ctl/completion.js");
  const shell = argv[0];
  if (shell === "--help" || shell === "-h") {
    process.stdout.write("usage: kmi completion bash|zsh\n\n  source <(kmi completion bash)   # in ~/.bashrc\n  source <(kmi completion zsh)    # in ~/.zshrc, after compinit\n");
    return 0;
  }
  if (shell === undefined || !(COMPLETION_SHELLS as readonly string[]).includes(shell) || argv.length > 1) {
    process.stderr.write(`kmi completion: give the shell, one of ${COMPLETION_SHELLS.join(", ")}; e.g. source <(kmi completion bash)\n`);
    return 2;
  }
  const children: Record<string, CompletionNode> = {};
  for (const [name, p] of Object.entries(programs)) children[name] = await p.completion();
  children["completion"] = { children: {}, flags: [{ name: "help", value: false }] };
  const tree: CompletionNode = { children, flags: [{ name: "help", value: false }, { name: "version", value: false }] };
  process.stdout.write(completionScript(shell as (typeof COMPLETION_SHELLS)[number], tree));
  return 0;
}

function usage(): string {
  const width = Math.max("completion".length, ...Object.keys(programs).map((k) => k.length));
  const lines = Object.entries(programs).map(([name, p]) => `  ${name.padEnd(width)}  ${p.summary}`);
  return [
    `kmi ${VERSION}: key management infrastructure for TLS-inspecting forward proxies`,
    "",
    "usage: kmi <program> [flags]     (kmi <program> --help for its flags)",
    "",
    "programs:",
    ...lines,
    `  ${"completion".padEnd(width)}  print the shell completion script: source <(kmi completion bash|zsh)`,
    "",
    "  --version   print the version",
  ].join("\n");
}

async function run(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "--help" || name === "-h" || name === "help") {
    process.stdout.write(usage() + "\n");
    return name === undefined ? 2 : 0;
  }
  if (name === "--version" || name === "version") {
    process.stdout.write(VERSION + "\n");
    return 0;
  }
  if (name === "completion") return completion(rest);
  const program = programs[name];
  if (program === undefined) {
    const hint = didYouMean(name.replace(/^-+/, ""), [...Object.keys(programs), "completion"]);
    process.stderr.write(`kmi: unknown program "${name}"${hint === "" ? "; run `kmi --help` for the list" : hint}\n`);
    return 2;
  }
  const main = await program.load();
  return main(rest);
}

run(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`kmi: ${message}\n`);
    process.exitCode = 1;
  },
);
