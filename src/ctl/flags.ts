/**
 * The command-line parser of `kmi ctl`, on node:util's `parseArgs` (as src/common/config.ts):
 * `--name value`, `--name=value`, boolean `--name`, repeatable flags, positional arguments, and
 * help text made from the same declarations. Mistakes are UsageErrors (exit 2) that name the
 * flag and, for a typo, the flag that was probably meant.
 */
import { parseArgs } from "node:util";
import { UsageError } from "./output.js";
import { didYouMean } from "../common/suggest.js";

/** One flag's declaration. */
export interface FlagSpec {
  /** "string" takes a value; "bool" does not; "list" takes a value and may repeat; "int" takes a non-negative integer. */
  type: "string" | "bool" | "list" | "int";
  /** One line of help. */
  help: string;
  /** Name of the value in help, e.g. "FILE". */
  value?: string;
  /** Environment variable read when the flag is absent. */
  env?: string;
  /** Required (after env). */
  required?: boolean;
  /** Allowed values. */
  choices?: readonly string[];
  /** What shell completion offers for the value: files, or nothing special (default: choices, else nothing). */
  complete?: "file";
}

/** Flag declarations by name (without the leading dashes). */
export type FlagSpecs = Readonly<Record<string, FlagSpec>>;

/** Parsed flags and positional arguments. */
export interface Parsed {
  flags: Map<string, string | boolean | number | string[]>;
  positionals: string[];
  help: boolean;
}

/** Parses argv against the specs; `env` supplies the flags' environment variables; required flags are checked. */
export function parseFlags(argv: readonly string[], specs: FlagSpecs, env: Readonly<Record<string, string | undefined>> = {}): Parsed {
  const parsed = parseArgv(argv, specs);
  applyEnv(parsed, specs, env);
  if (!parsed.help) checkRequired(parsed, specs);
  return parsed;
}

/** Parses argv alone (no environment, no required check): the first stage of {@link parseFlags}. */
export function parseArgv(argv: readonly string[], specs: FlagSpecs): Parsed {
  const options: Record<string, { type: "string" | "boolean"; multiple?: boolean; short?: string }> = { help: { type: "boolean", short: "h" } };
  for (const [name, spec] of Object.entries(specs)) {
    options[name] = spec.type === "bool" ? { type: "boolean" } : spec.type === "list" ? { type: "string", multiple: true } : { type: "string" };
  }
  let result: { values: Record<string, string | boolean | string[] | undefined>; positionals: string[] };
  try {
    result = parseArgs({ args: [...argv], options, strict: true, allowPositionals: true }) as typeof result;
  } catch (err) {
    throw usageFromParseArgs(err, specs);
  }
  const flags: Parsed["flags"] = new Map();
  for (const [name, v] of Object.entries(result.values)) {
    if (name === "help" || v === undefined) continue;
    const spec = specs[name]!;
    if (spec.type === "list") for (const item of v as string[]) setValue(flags, name, spec, item);
    else if (spec.type === "bool") flags.set(name, v === true);
    else setValue(flags, name, spec, v as string);
  }
  return { flags, positionals: result.positionals, help: result.values["help"] === true };
}

/** Turns a parseArgs error into a UsageError that names the flag, with "did you mean" for a typo. */
function usageFromParseArgs(err: unknown, specs: FlagSpecs): UsageError {
  const e = err as { code?: string; message?: string };
  const message = e.message ?? String(err);
  const flag = /'(-{1,2}[^' ]+)/.exec(message)?.[1] ?? "";
  const name = flag.replace(/^-+/, "");
  switch (e.code) {
    case "ERR_PARSE_ARGS_UNKNOWN_OPTION":
      return new UsageError(`unknown flag "${flag}"${didYouMean(name, Object.keys(specs), (c) => `--${c}`)}`);
    case "ERR_PARSE_ARGS_INVALID_OPTION_VALUE": {
      const spec = specs[name];
      if (spec === undefined || spec.type === "bool") return new UsageError(`${flag}: takes no value`);
      if (/ambiguous/.test(message)) return new UsageError(`${flag}: needs a value (${spec.value ?? "VALUE"}); to pass one that starts with "-", write ${flag}=VALUE`);
      return new UsageError(`${flag}: needs a value (${spec.value ?? "VALUE"})`);
    }
    default:
      return new UsageError(message.split("\n", 1)[0]!);
  }
}

/** Fills flags that are absent on the command line from their environment variables. */
export function applyEnv(parsed: Parsed, specs: FlagSpecs, env: Readonly<Record<string, string | undefined>>): void {
  for (const [flagName, spec] of Object.entries(specs)) {
    if (parsed.flags.has(flagName) || spec.env === undefined) continue;
    const v = env[spec.env];
    if (v === undefined || v === "") continue;
    if (spec.type === "bool") parsed.flags.set(flagName, v === "1" || v === "true");
    else setValue(parsed.flags, flagName, spec, v, spec.env);
  }
}

/** Refuses a parse that lacks a required flag. */
export function checkRequired(parsed: Parsed, specs: FlagSpecs): void {
  for (const [flagName, spec] of Object.entries(specs)) {
    if (spec.required === true && !parsed.flags.has(flagName)) {
      throw new UsageError(`--${flagName} is required${spec.env !== undefined ? ` (or set ${spec.env})` : ""}`);
    }
  }
}

function setValue(flags: Parsed["flags"], flagName: string, spec: FlagSpec, value: string, from = `--${flagName}`): void {
  if (spec.choices !== undefined && !spec.choices.includes(value)) {
    throw new UsageError(`${from}: "${value}" is not one of ${spec.choices.join(", ")}`);
  }
  if (spec.type === "int") {
    if (!/^\d+$/.test(value) || !Number.isSafeInteger(Number(value))) throw new UsageError(`${from}: "${value}" is not a non-negative integer`);
    flags.set(flagName, Number(value));
  } else if (spec.type === "list") {
    const prev = flags.get(flagName);
    flags.set(flagName, [...(Array.isArray(prev) ? prev : []), value]);
  } else flags.set(flagName, value);
}

/** Typed accessors over parsed flags. */
export class Args {
  constructor(readonly parsed: Parsed) {}

  /** A string flag, or undefined. */
  str(name: string): string | undefined {
    const v = this.parsed.flags.get(name);
    return typeof v === "string" ? v : undefined;
  }

  /** A required string flag (declared `required` or checked here). */
  need(name: string): string {
    const v = this.str(name);
    if (v === undefined) throw new UsageError(`--${name} is required`);
    return v;
  }

  /** A boolean flag. */
  bool(name: string): boolean {
    return this.parsed.flags.get(name) === true;
  }

  /** An integer flag, or `dflt`. */
  int(name: string, dflt = 0): number {
    const v = this.parsed.flags.get(name);
    return typeof v === "number" ? v : dflt;
  }

  /** A repeatable flag's values (also split on commas). */
  list(name: string): string[] {
    const v = this.parsed.flags.get(name);
    return Array.isArray(v) ? v.flatMap((s) => s.split(",")).map((s) => s.trim()).filter((s) => s !== "") : [];
  }

  /** The positional arguments. */
  get positionals(): string[] {
    return this.parsed.positionals;
  }

  /** The one positional argument named `what`, required. */
  positional(what: string): string {
    const p = this.parsed.positionals;
    if (p.length === 0) throw new UsageError(`missing ${what}`);
    if (p.length > 1) throw new UsageError(`unexpected argument "${p[1]}"`);
    return p[0]!;
  }

  /** Refuses positional arguments. */
  noPositionals(): void {
    if (this.parsed.positionals.length > 0) throw new UsageError(`unexpected argument "${this.parsed.positionals[0]}"`);
  }
}

/** Help lines for flag specs. */
export function flagHelp(specs: FlagSpecs): string {
  const rows = Object.entries(specs).map(([n, s]) => {
    const left = `  --${n}${s.type === "bool" ? "" : ` ${s.value ?? "VALUE"}`}`;
    const extra = [s.choices ? `one of ${s.choices.join("|")}` : "", s.env ? `env ${s.env}` : "", s.type === "list" ? "repeatable" : ""].filter((x) => x !== "");
    return [left, s.help + (extra.length > 0 ? ` (${extra.join("; ")})` : "") + (s.required ? " [required]" : "")] as const;
  });
  const width = Math.max(0, ...rows.map(([l]) => l.length));
  return rows.map(([l, r]) => `${l.padEnd(width)}  ${r}`).join("\n");
}
