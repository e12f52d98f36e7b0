/**
 * Entry point of `kmi up` (what `npm start` runs) and `kmi up status`.
 */
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { ConfigError, formatHelp, loadConfig } from "../common/config.js";
import { colorAllowed, partEnvironment, resolveUpConfig, upProgram } from "./config.js";
import { runUp } from "./mesh.js";
import { runStatus } from "./status.js";

const STATUS_HELP = [
  "usage: kmi up status [--data-dir <dir>] [--run-dir <dir>] [--json]",
  "",
  "The health of the kmi up running on this data directory: each part's process, and what it reports",
  "(KDC: version, tenants with their active CA version and rollout; Auditserver: machines; agent:",
  "attestation, KDC link, keys held; proxy: leaf cache size). --json prints the same summary as",
  "`kmi up --json` does once ready. A mesh started with --ha also shows every KDC and Auditserver replica",
  "(url, pid, health) and every etcd member (url, pid, health, which one leads; JSON: the \"ha\" entry).",
  "Exit code 0 when every part (every replica and member) is healthy, 1 otherwise.",
].join("\n");

/** Entry point of `kmi up` (called by cmd/kmi.ts); resolves with the exit code. */
export async function main(argv: string[]): Promise<number> {
  const isStatus = argv[0] === "status";
  const args = isStatus ? argv.slice(1) : argv;
  try {
    const loaded = await loadConfig(upProgram, args);
    if (loaded.help) {
      process.stdout.write((isStatus ? STATUS_HELP : formatHelp(upProgram) + "\n\ncommands:\n  kmi up status --help   the health of a running kmi up") + "\n");
      return 0;
    }
    if (loaded.positionals.length > 0) {
      throw new ConfigError(`unexpected argument "${loaded.positionals[0]}"; the only command is \`kmi up status\`; run \`kmi up --help\``);
    }
    const cfg = resolveUpConfig(loaded);
    if (isStatus) return await runStatus(cfg, { out: process.stdout, cwd: process.cwd() });
    const script = resolve(process.argv[1] ?? fileURLToPath(new URL("../../cmd/kmi.js", import.meta.url)));
    return await runUp(cfg, {
      out: process.stdout,
      err: process.stderr,
      cwd: process.cwd(),
      env: partEnvironment(),
      color: colorAllowed(),
      // The parts run with the same node and loader flags as this process (tsx in development).
      kmi: [process.execPath, ...process.execArgv, script],
      kmiScript: script,
      // dist/src/up/cli.js → dist/: the directory the agent measures as agent.code.
      codeDir: fileURLToPath(new URL("../../", import.meta.url)).replace(/\/$/, ""),
      signals: process,
    });
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`kmi up: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
}
