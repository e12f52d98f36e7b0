#!/usr/bin/env node
/**
 * The one kmi command: `kmi <program> [args]`. Thin by design: it picks the program and
 * hands it argv; each program parses its own flags, env and config file, creates its
 * server, starts it, and stops it cleanly on SIGTERM/SIGINT. On failure: exit 1 and one
 * line on stderr that says what to do.
 */
import { VERSION } from "../src/common/version.js";

type ProgramMain = (argv: string[]) => Promise<number>;

/** The programs, loaded lazily so that `kmi ctl` does not pay for the proxy's imports. */
const programs: Record<string, { summary: string; load: () => Promise<ProgramMain> }> = {
  kdc: { summary: "run the KDC (keys, certificates, distribution); `kmi kdc init` first", load: async () => (await import("../src/kdc/cli.js")).main },
  audit: { summary: "run the Auditserver (enrollment, attestation, quarantine); `kmi audit init` first", load: async () => (await import("../src/audit/cli.js")).main },
  agent: { summary: "run the key agent of this machine (Unix-socket signing API)", load: async () => (await import("../src/agent/cli.js")).main },
  proxy: { summary: "run the TLS-inspecting forward proxy", load: async () => (await import("../src/proxy/cli.js")).main },
  ctl: { summary: "operator and tenant-admin commands (tenants, tokens, CA, machines, audit log)", load: async () => (await import("../src/ctl/cli.js")).main },
  up: { summary: "the whole mesh on this machine with embedded defaults (what `npm start` runs)", load: async () => (await import("../src/up/cli.js")).main },
};

function usage(): string {
  const width = Math.max(...Object.keys(programs).map((k) => k.length));
  const lines = Object.entries(programs).map(([name, p]) => `  ${name.padEnd(width)}  ${p.summary}`);
  return [
    `kmi ${VERSION}: key management infrastructure for TLS-inspecting forward proxies`,
    "",
    "usage: kmi <program> [flags]     (kmi <program> --help for its flags)",
    "",
    "programs:",
    ...lines,
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
  const program = programs[name];
  if (program === undefined) {
    process.stderr.write(`kmi: unknown program "${name}"; run \`kmi --help\` for the list\n`);
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
