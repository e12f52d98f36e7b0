/**
 * What a `kmi ctl` command is: a name path ("ca download"), its flags and a run function
 * that gets parsed arguments, the output, and lazily-made clients. Command files (the
 * KDC's, the Auditserver's) export arrays of these; cli.ts registers them in one table.
 */
import type { Args, FlagSpecs } from "./flags.js";
import type { Clients } from "./client.js";
import type { Output, Streams } from "./output.js";

/** Everything a command's run function may use. */
export interface CommandContext {
  /** Parsed flags and positionals. */
  args: Args;
  /** Where results and notes go. */
  out: Output;
  /** The error stream, for progress lines (src/ctl/progress.ts). */
  stderr: Streams["stderr"];
  /** Clients of the server whose URL flag is `urlFlag` (e.g. "kdc"), made on first use. */
  clients(urlFlag: string, defaultUrl: string): Clients;
  /** Reads a file named on the command line (errors name the flag). */
  readFile(flag: string, path: string): Uint8Array;
  /** Writes a file named on the command line, with `mode` for new files. */
  writeFile(path: string, data: string | Uint8Array, mode?: number): void;
}

/** One `kmi ctl` command. */
export interface Command {
  /** Words that select it, e.g. ["ca", "download"]. */
  name: readonly string[];
  /** One line for the command list. */
  summary: string;
  /** Positional arguments in help, e.g. "TENANT_ID"; empty for none. */
  args?: string;
  /** Longer help shown by `kmi ctl <command> --help` (examples, notes). */
  details?: string;
  /** Flags (connection flags included by the command file that needs them). */
  flags: FlagSpecs;
  /** Runs the command; returns the exit code (0 when it returns nothing). */
  run(ctx: CommandContext): Promise<number | void>;
}
