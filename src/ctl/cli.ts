/**
 * Entry point of `kmi ctl`: finds the command in the one command table, parses its flags
 * (plus the global `--json`), runs it, and turns errors into one stderr line and an exit
 * code that scripts can branch on (see EXIT_CODE_HELP).
 *
 * To add a command file, import its array and add it to `commandTable` below (the
 * Auditserver's `audit-commands.ts` is added through its `registerAuditCommands`).
 */
import { readFileSync } from "node:fs";
import { VERSION } from "../common/version.js";
import { Clients, connectionSettings } from "./client.js";
import type { Command, CommandContext } from "./command.js";
import { applyEnv, Args, checkRequired, flagHelp, parseArgv, type FlagSpecs } from "./flags.js";
import { didYouMean, editDistance } from "../common/suggest.js";
import { registerAuditCommands } from "./audit-commands.js";
import { kdcCommands } from "./kdc-commands.js";
import { portalCommands } from "./portal-commands.js";
import { statusCommand } from "./status-command.js";
import { EXIT_CODE_HELP, ExitCode, Output, UsageError, type Streams } from "./output.js";
import { writeFileAtomicSync } from "../common/fs.js";

/** The one table of `kmi ctl` commands: the KDC's, the Auditserver's (src/ctl/audit-commands.ts), then `status` (src/ctl/status-command.ts). */
export const commandTable: readonly Command[] = [...registerAuditCommands(kdcCommands), ...portalCommands, statusCommand];

const globalFlags: FlagSpecs = {
  json: { type: "bool", help: "print results as JSON for scripts (errors as JSON on stderr)" },
};

/** Options of `run` (tests pass buffers and an environment). */
export interface CtlOptions {
  streams?: Streams;
  env?: Readonly<Record<string, string | undefined>>;
  commands?: readonly Command[];
}

/** Finds the command whose name is the longest prefix of argv's words. */
function findCommand(commands: readonly Command[], words: readonly string[]): { command: Command; rest: string[] } | undefined {
  let best: Command | undefined;
  for (const c of commands) {
    if (c.name.length <= words.length && c.name.every((w, i) => words[i] === w) && (best === undefined || c.name.length > best.name.length)) best = c;
  }
  return best === undefined ? undefined : { command: best, rest: words.slice(best.name.length) };
}

/** The commands of the group `word` (the first word of their names), e.g. every `ca …` command. */
function groupOf(commands: readonly Command[], word: string): Command[] {
  return commands.filter((c) => c.name.length > 1 && c.name[0] === word);
}

function commandLines(commands: readonly Command[]): string[] {
  const names = commands.map((c) => c.name.join(" ") + (c.args ? ` ${c.args}` : ""));
  const width = Math.max(...names.map((n) => n.length));
  return commands.map((c, i) => `  ${names[i]!.padEnd(width)}  ${c.summary}`);
}

const CONNECTION_HELP = [
  "every command takes --json (results as JSON for scripts) and the connection flags:",
  "  --kdc URL (KMI_CTL_KDC, default https://127.0.0.1:7443), --token TOKEN (KMI_CTL_TOKEN),",
  "  --token-file FILE (KMI_CTL_TOKEN_FILE), --ca-file FILE (KMI_CTL_CA_FILE: the KDC's infra-ca.pem),",
  "  --timeout SECONDS (KMI_CTL_TIMEOUT, default 30);",
  "  the Auditserver's commands take --audit URL (KMI_CTL_AUDIT, default https://127.0.0.1:7444) instead of --kdc",
];

/** The top-level help: every command, the connection environment and the exit codes. */
export function usage(commands: readonly Command[] = commandTable): string {
  return [
    `kmi ctl ${VERSION}: operator and tenant-admin commands`,
    "",
    "usage: kmi ctl <command> [flags]     (kmi ctl <command> --help for its flags, kmi ctl <group> --help for a group)",
    "",
    "commands:",
    ...commandLines(commands),
    "",
    ...CONNECTION_HELP,
    "",
    EXIT_CODE_HELP,
  ].join("\n") + "\n";
}

/** The help of one group (`kmi ctl ca --help`): its commands and the connection flags. */
export function groupUsage(commands: readonly Command[], word: string): string {
  return [
    `usage: kmi ctl ${word} <command> [flags]     (kmi ctl ${word} <command> --help for its flags)`,
    "",
    `${word} commands:`,
    ...commandLines(groupOf(commands, word)),
    "",
    ...CONNECTION_HELP,
    "",
    EXIT_CODE_HELP,
  ].join("\n") + "\n";
}

function commandHelp(c: Command, specs: FlagSpecs): string {
  return [
    `usage: kmi ctl ${c.name.join(" ")}${c.args ? ` ${c.args}` : ""} [flags]`,
    "",
    c.summary,
    ...(c.details ? ["", c.details] : []),
    "",
    "flags:",
    flagHelp(specs),
    "",
    EXIT_CODE_HELP,
  ].join("\n") + "\n";
}

/** The message for words that name no command: the group's commands, or the nearest command name. */
function unknownCommand(commands: readonly Command[], words: readonly string[]): string {
  const typed = words.join(" ");
  let best: { name: string; d: number } | undefined;
  for (const c of commands) {
    const name = c.name.join(" ");
    const same = words.slice(0, c.name.length).join(" ");
    const hint = didYouMean(same, [name]);
    if (hint !== "") {
      const d = editDistance(same, name);
      if (best === undefined || d < best.d) best = { name, d };
    }
  }
  if (best !== undefined) return `kmi ctl: unknown command "${typed}"; did you mean "${best.name}"?`;
  const group = groupOf(commands, words[0]!);
  const hint = group.length > 0 ? `; "${words[0]}" has: ${group.map((c) => c.name.slice(1).join(" ")).join(", ")}` : "; run `kmi ctl --help` for the list";
  return `kmi ctl: unknown command "${typed}"${hint}`;
}

/** Refuses a command without its positional argument, before any flag is found missing: the first thing a person forgets is named first. */
function checkPositionals(command: Command, args: Args): void {
  if (command.args !== undefined && command.args !== "" && !command.args.startsWith("[") && args.positionals.length === 0) {
    throw new UsageError(`missing ${command.args.split(" ")[0]}: usage: kmi ctl ${command.name.join(" ")} ${command.args}`);
  }
}

/** Runs `kmi ctl` with argv; returns the exit code. */
export async function run(argv: readonly string[], opts: CtlOptions = {}): Promise<number> {
  const streams = opts.streams ?? { stdout: process.stdout, stderr: process.stderr };
  const env = opts.env ?? process.env;
  const commands = opts.commands ?? commandTable;
  const wantsJson = argv.includes("--json");
  const out = new Output(streams, wantsJson);
  // --json is global: it may come before the command words too.
  argv = argv.filter((a) => a !== "--json");
  const firstFlag = argv.findIndex((a) => a.startsWith("-"));
  const words = firstFlag === -1 ? [...argv] : argv.slice(0, firstFlag);
  const helpAsked = argv.includes("--help") || argv.includes("-h") || words[0] === "help";
  if (words[0] === "help") words.shift();
  if (words.length === 0) {
    if (argv.includes("--version") || argv.includes("-V")) {
      streams.stdout.write(wantsJson ? JSON.stringify({ version: VERSION }) + "\n" : VERSION + "\n");
      return ExitCode.ok;
    }
    if (!helpAsked && argv.length > 0) {
      const hint = didYouMean(argv[0]!.replace(/^-+/, ""), ["help", "version", "json"], (c) => `--${c}`);
      streams.stderr.write(`kmi ctl: unknown flag "${argv[0]}"${hint === "" ? "; run `kmi ctl --help`" : hint}\n`);
      return ExitCode.usage;
    }
    (helpAsked ? streams.stdout : streams.stderr).write(usage(commands));
    return helpAsked ? ExitCode.ok : ExitCode.usage;
  }
  const found = findCommand(commands, words);
  if (found === undefined) {
    // A group's name alone (`kmi ctl ca`, `kmi ctl ca --help`) shows the group's commands.
    if (words.length === 1 && groupOf(commands, words[0]!).length > 0) {
      (helpAsked ? streams.stdout : streams.stderr).write(groupUsage(commands, words[0]!));
      return helpAsked ? ExitCode.ok : ExitCode.usage;
    }
    streams.stderr.write(unknownCommand(commands, words) + "\n");
    return ExitCode.usage;
  }
  const { command } = found;
  const specs: FlagSpecs = { ...command.flags, ...globalFlags };
  try {
    const parsed = parseArgv(argv.slice(command.name.length), specs);
    if (wantsJson) parsed.flags.set("json", true);
    if (parsed.help || helpAsked) {
      streams.stdout.write(commandHelp(command, specs));
      return ExitCode.ok;
    }
    applyEnv(parsed, specs, env);
    const args = new Args(parsed);
    checkPositionals(command, args);
    checkRequired(parsed, specs);
    const code = await command.run(commandContext(args, out, streams));
    return code ?? ExitCode.ok;
  } catch (err) {
    return out.error(err);
  }
}

/** What a command's run function gets: its arguments, the output, clients made on first use, file access. */
function commandContext(args: Args, out: Output, streams: Streams): CommandContext {
  const clientCache = new Map<string, Clients>();
  return {
    args,
    out,
    stderr: streams.stderr,
    clients(urlFlag, defaultUrl) {
      let c = clientCache.get(urlFlag);
      if (c === undefined) {
        c = new Clients(() => connectionSettings(args, urlFlag, defaultUrl));
        clientCache.set(urlFlag, c);
      }
      return c;
    },
    readFile(flag, path) {
      try {
        return new Uint8Array(readFileSync(path));
      } catch (err) {
        throw new UsageError(`--${flag}: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? "error"}); check the path`);
      }
    },
    writeFile(path, data, mode = 0o644) {
      writeFileAtomicSync(path, data, mode);
    },
  };
}

/** Entry point of `kmi ctl` (called by cmd/kmi.ts). */
export async function main(argv: string[]): Promise<number> {
  return run(argv);
}
