/**
 * The command-line parser of `kmi ctl`: `--name value`, `--name=value`, boolean
 * `--name`, repeatable flags, positional arguments, and help text made from the same
 * declarations. Mistakes are UsageErrors (exit 2).
 */
import { UsageError } from "./output.js";

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
}

/** Flag declarations by name (without the leading dashes). */
export type FlagSpecs = Readonly<Record<string, FlagSpec>>;

/** Parsed flags and positional arguments. */
export interface Parsed {
  flags: Map<string, string | boolean | number | string[]>;
  positionals: string[];
  help: boolean;
}

/** Parses argv against the specs; `env` supplies the flags' environment variables. */
export function parseFlags(argv: readonly string[], specs: FlagSpecs, env: Readonly<Record<string, string | undefined>> = {}): Parsed {
  const flags = new Map<string, string | boolean | number | string[]>();
  const positionals: string[] = [];
  let help = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--") {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (arg === "-h" || arg === "--help") {
      help = true;
      continue;
    }
    if (!arg.startsWith("--") || arg === "-") {
      if (arg.startsWith("-") && arg !== "-") throw new UsageError(`unknown flag "${arg}"`);
      positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf("=");
    const flagName = eq === -1 ? arg.slice(2) : arg.slice(2, eq);
    const spec = specs[flagName];
    if (spec === undefined) throw new UsageError(`unknown flag "--${flagName}"`);
    if (spec.type === "bool") {
      if (eq !== -1) {
        const v = arg.slice(eq + 1);
        if (v !== "true" && v !== "false") throw new UsageError(`--${flagName}: takes no value (or =true/=false)`);
        flags.set(flagName, v === "true");
      } else flags.set(flagName, true);
      continue;
    }
    let value: string;
    if (eq !== -1) value = arg.slice(eq + 1);
    else {
      const next = argv[i + 1];
      if (next === undefined) throw new UsageError(`--${flagName}: needs a value (${spec.value ?? "VALUE"})`);
      value = next;
      i++;
    }
    setValue(flags, flagName, spec, value);
  }
  for (const [flagName, spec] of Object.entries(specs)) {
    if (!flags.has(flagName) && spec.env !== undefined) {
      const v = env[spec.env];
      if (v !== undefined && v !== "") {
        if (spec.type === "bool") flags.set(flagName, v === "1" || v === "true");
        else setValue(flags, flagName, spec, v, spec.env);
      }
    }
    if (!help && spec.required === true && !flags.has(flagName)) {
      throw new UsageError(`--${flagName} is required${spec.env !== undefined ? ` (or set ${spec.env})` : ""}`);
    }
  }
  return { flags, positionals, help };
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
