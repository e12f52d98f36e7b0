/**
 * The configuration layer every kmi program uses: typed options from flags, environment
 * variables and a JSON config file, with defaults, and generated `--help`.
 *
 * Precedence: flag > environment (`KMI_<PROG>_<NAME>`) > config file (`--config`, keys as the
 * flags are spelled) > default. This is the only module that reads `process.env`.
 */
import { readFile } from "node:fs/promises";
import { parseArgs } from "node:util";
import { didYouMean } from "./suggest.js";

/** The value types an option can have. */
export type OptionType = "string" | "integer" | "boolean";

/** One option. The key it is declared under (camelCase) gives the flag (`--kebab-case`) and env var. */
export interface OptionSpec {
  /** Value type. */
  type: OptionType;
  /** One sentence for `--help`. */
  description: string;
  /** Default value; without one (and without `required`) the value may be undefined. */
  default?: string | number | boolean;
  /** The value must come from somewhere: a clear error otherwise. */
  required?: boolean;
  /** Allowed values of a string option. */
  choices?: readonly string[];
  /** A one-letter alias (`-v`). */
  short?: string;
  /** Name of the value in `--help` (`--listen <host:port>`). */
  valueName?: string;
  /** Checks a value (throw an Error whose message says what is wrong). */
  validate?: (value: never) => void;
  /** Never shown in `--help` defaults or in {@link describeConfig} (a key file path is fine; a secret is not). */
  secret?: boolean;
  /** Not settable from the environment. */
  noEnv?: boolean;
}

/** A program's options. */
export interface ProgramSpec<O extends Record<string, OptionSpec> = Record<string, OptionSpec>> {
  /** Program name (`kdc`): env vars are `KMI_KDC_*`. */
  program: string;
  /** Usage line (`kmi kdc [flags]`). */
  usage: string;
  /** One paragraph under the usage line. */
  summary?: string;
  /** Options by camelCase name. */
  options: O;
  /** Accept positional arguments (sub-commands); default false. */
  allowPositionals?: boolean;
}

type ValueOf<S extends OptionSpec> = S["type"] extends "integer" ? number : S["type"] extends "boolean" ? boolean : string;

/** The typed values of a program's options. */
export type ConfigValues<O extends Record<string, OptionSpec>> = {
  [K in keyof O]: O[K] extends { default: string | number | boolean } | { required: true } ? ValueOf<O[K]> : ValueOf<O[K]> | undefined;
};

/** Where a value came from. */
export type ConfigSource = "flag" | "env" | "file" | "default";

/** The outcome of {@link loadConfig}. */
export interface LoadedConfig<O extends Record<string, OptionSpec>> {
  /** The values. */
  values: ConfigValues<O>;
  /** Where each set value came from. */
  sources: Partial<Record<keyof O, ConfigSource>>;
  /** Positional arguments (when allowed). */
  positionals: string[];
  /** True when `--help` was given: print {@link formatHelp} and exit 0. */
  help: boolean;
  /** The config file read, if any. */
  configFile?: string;
}

/** A configuration mistake, with a message that says which flag, variable or key and how to fix it. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

/** Declares a program's options, keeping their literal types. */
export function defineProgram<O extends Record<string, OptionSpec>>(spec: ProgramSpec<O>): ProgramSpec<O> {
  for (const [name, o] of Object.entries(spec.options)) {
    if (!/^[a-z][a-zA-Z0-9]*$/.test(name)) throw new Error(`option name "${name}" must be camelCase`);
    if (name === "config" || name === "help") throw new Error(`option name "${name}" is built in`);
    if (o.default !== undefined && typeof o.default !== (o.type === "integer" ? "number" : o.type)) {
      throw new Error(`option ${name}: default ${JSON.stringify(o.default)} is not a ${o.type}`);
    }
  }
  return spec;
}

/** `tlsCert` → `tls-cert`. */
export function flagName(name: string): string {
  return name.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase());
}

/** `kdc`, `tlsCert` → `KMI_KDC_TLS_CERT`. */
export function envName(program: string, name: string): string {
  return `KMI_${program}_${flagName(name)}`.replace(/-/g, "_").toUpperCase();
}

function convert(spec: OptionSpec, raw: unknown, where: string): string | number | boolean {
  let v: string | number | boolean;
  switch (spec.type) {
    case "boolean":
      if (typeof raw === "boolean") v = raw;
      else if (typeof raw === "string" && /^(true|1|yes|on)$/i.test(raw)) v = true;
      else if (typeof raw === "string" && /^(false|0|no|off)$/i.test(raw)) v = false;
      else throw new ConfigError(`${where}: ${JSON.stringify(raw)} is not a boolean; use true or false`);
      break;
    case "integer": {
      const n = typeof raw === "number" ? raw : typeof raw === "string" && /^-?\d+$/.test(raw.trim()) ? Number(raw) : NaN;
      if (!Number.isSafeInteger(n)) throw new ConfigError(`${where}: ${JSON.stringify(raw)} is not an integer`);
      v = n;
      break;
    }
    default:
      if (typeof raw !== "string") throw new ConfigError(`${where}: ${JSON.stringify(raw)} is not a string`);
      v = raw;
      if (spec.choices !== undefined && !spec.choices.includes(v)) {
        throw new ConfigError(`${where}: "${v}" is not one of ${spec.choices.join(", ")}`);
      }
  }
  if (spec.validate !== undefined) {
    try {
      spec.validate(v as never);
    } catch (err) {
      throw new ConfigError(`${where}: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
  return v;
}

/** Options of {@link loadConfig}. */
export interface LoadConfigOptions {
  /** Environment; default `process.env`. */
  env?: Record<string, string | undefined>;
  /** Reads the config file; default `fs.readFile` as UTF-8. */
  readTextFile?: (path: string) => Promise<string>;
}

/**
 * Parses `argv` (without the program name), the environment and the config file into typed
 * values. Throws {@link ConfigError} for an unknown flag, a bad value, an unknown config-file
 * key or a missing required option.
 */
export async function loadConfig<O extends Record<string, OptionSpec>>(
  spec: ProgramSpec<O>,
  argv: readonly string[],
  options: LoadConfigOptions = {},
): Promise<LoadedConfig<O>> {
  const env = options.env ?? process.env;
  const read = options.readTextFile ?? ((p: string) => readFile(p, "utf8"));
  const help = `run \`${spec.usage.split(" [")[0]} --help\` for the list`;

  type ParseOpt = { type: "string" | "boolean"; short?: string };
  const parseOptions: Record<string, ParseOpt> = { config: { type: "string" }, help: { type: "boolean", short: "h" } };
  for (const [name, o] of Object.entries(spec.options)) {
    const p: ParseOpt = { type: o.type === "boolean" ? "boolean" : "string" };
    if (o.short !== undefined) p.short = o.short;
    parseOptions[flagName(name)] = p;
  }
  let parsed: { values: Record<string, string | boolean | undefined>; positionals: string[] };
  try {
    parsed = parseArgs({
      args: [...argv],
      options: parseOptions,
      strict: true,
      allowPositionals: spec.allowPositionals ?? false,
      allowNegative: true,
    }) as typeof parsed;
  } catch (err) {
    const e = err as { code?: string; message: string };
    const m = /'([^']+)'/.exec(e.message);
    const what = m?.[1] ?? "";
    switch (e.code) {
      case "ERR_PARSE_ARGS_UNKNOWN_OPTION":
        throw new ConfigError(`unknown flag ${what}${didYouMean(what.replace(/^-+/, ""), Object.keys(parseOptions), (c) => `--${c}`)}; ${help}`);
      case "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL":
        throw new ConfigError(`unexpected argument ${what}; flags start with --; ${help}`);
      case "ERR_PARSE_ARGS_INVALID_OPTION_VALUE":
        throw new ConfigError(`${e.message.split(".")[0]}; ${help}`);
      default:
        throw new ConfigError(`${e.message}; ${help}`);
    }
  }
  if (parsed.values["help"] === true) {
    return { values: {} as ConfigValues<O>, sources: {}, positionals: parsed.positionals, help: true };
  }

  let configFile = parsed.values["config"] as string | undefined;
  const configEnv = envName(spec.program, "config");
  if (configFile === undefined && env[configEnv] !== undefined && env[configEnv] !== "") configFile = env[configEnv];
  let file: Record<string, unknown> = {};
  if (configFile !== undefined) {
    let text: string;
    try {
      text = await read(configFile);
    } catch (err) {
      throw new ConfigError(`config file ${configFile}: cannot read (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (err) {
      throw new ConfigError(`config file ${configFile}: not valid JSON (${(err as Error).message})`);
    }
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      throw new ConfigError(`config file ${configFile}: must be a JSON object of "flag-name": value`);
    }
    file = json as Record<string, unknown>;
    const known = new Set(Object.keys(spec.options).map(flagName));
    for (const key of Object.keys(file)) {
      if (!known.has(key)) throw new ConfigError(`config file ${configFile}: unknown key "${key}"; keys are spelled like the flags; ${help}`);
    }
  }

  const values: Record<string, string | number | boolean | undefined> = {};
  const sources: Record<string, ConfigSource> = {};
  for (const [name, o] of Object.entries(spec.options)) {
    const flag = flagName(name);
    const ev = envName(spec.program, name);
    const fromFlag = parsed.values[flag];
    if (fromFlag !== undefined) {
      values[name] = convert(o, fromFlag, `flag --${flag}`);
      sources[name] = "flag";
    } else if (o.noEnv !== true && env[ev] !== undefined && env[ev] !== "") {
      values[name] = convert(o, env[ev], `environment ${ev}`);
      sources[name] = "env";
    } else if (file[flag] !== undefined) {
      values[name] = convert(o, file[flag], `config file ${configFile} key "${flag}"`);
      sources[name] = "file";
    } else if (o.default !== undefined) {
      values[name] = o.default;
      sources[name] = "default";
    } else if (o.required === true) {
      throw new ConfigError(`--${flag} is required (or ${ev}, or "${flag}" in the config file)`);
    }
  }
  const out: LoadedConfig<O> = {
    values: values as ConfigValues<O>,
    sources: sources as Partial<Record<keyof O, ConfigSource>>,
    positionals: parsed.positionals,
    help: false,
  };
  if (configFile !== undefined) out.configFile = configFile;
  return out;
}

/** The `--help` text of a program: usage, summary, every flag with its env var and default. */
export function formatHelp(spec: ProgramSpec): string {
  const rows: [string, string][] = [];
  for (const [name, o] of Object.entries(spec.options)) {
    const flag = flagName(name);
    const value = o.type === "boolean" ? "" : ` <${o.valueName ?? (o.choices ? o.choices.join("|") : o.type === "integer" ? "n" : "value")}>`;
    const left = `${o.short !== undefined ? `-${o.short}, ` : "    "}--${flag}${value}`;
    const notes: string[] = [];
    if (o.required === true) notes.push("required");
    if (o.default !== undefined && o.secret !== true) notes.push(`default ${o.type === "string" ? JSON.stringify(o.default) : String(o.default)}`);
    if (o.noEnv !== true) notes.push(`env ${envName(spec.program, name)}`);
    if (o.type === "boolean") notes.push(`--no-${flag} to turn off`);
    rows.push([left, `${o.description}${notes.length ? ` (${notes.join("; ")})` : ""}`]);
  }
  rows.push(["    --config <file>", `JSON config file of "flag-name": value (env ${envName(spec.program, "config")})`]);
  rows.push(["-h, --help", "show this help"]);
  const width = Math.min(34, Math.max(...rows.map(([l]) => l.length)));
  const lines = rows.map(([l, r]) => (l.length > width ? `  ${l}\n  ${" ".repeat(width)}  ${r}` : `  ${l.padEnd(width)}  ${r}`));
  return [
    `usage: ${spec.usage}`,
    ...(spec.summary !== undefined ? ["", spec.summary] : []),
    "",
    "flags:",
    ...lines,
    "",
    "Precedence: flag > environment > config file > default.",
  ].join("\n");
}

/** The effective configuration for a startup log line: values with their sources, secrets hidden. */
export function describeConfig<O extends Record<string, OptionSpec>>(spec: ProgramSpec<O>, loaded: LoadedConfig<O>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, o] of Object.entries(spec.options)) {
    const v = (loaded.values as Record<string, unknown>)[name];
    if (v === undefined) continue;
    const src = loaded.sources[name as keyof O] ?? "default";
    out[flagName(name)] = `${o.secret === true ? "<set>" : String(v)} (${src})`;
  }
  return out;
}

/**
 * The options that pick a program's store, shared by the KDC and the Auditserver: `--store`
 * (level, the default, or etcd) and the etcd client's endpoints, TLS files and key prefix
 * (env `KMI_<PROG>_STORE`, `KMI_<PROG>_ETCD_ENDPOINTS`, …). src/storage/backend.ts turns the
 * values into a backend.
 */
export function storeOptions(defaultPrefix: string) {
  return {
    store: { type: "string", description: "where the store lives: level (LevelDB in the data dir, one node) or etcd (replicas)", default: "level", choices: ["level", "etcd"] },
    etcdEndpoints: { type: "string", description: "with --store etcd: the members' client URLs, comma-separated (https://host:2379,…)", valueName: "urls" },
    etcdCa: { type: "string", description: "with --store etcd: PEM file of the CA that signed the etcd members' certificates", valueName: "file" },
    etcdCert: { type: "string", description: "with --store etcd: PEM file of this program's etcd client certificate", valueName: "file" },
    etcdKey: { type: "string", description: "with --store etcd: PEM file of that certificate's private key (mode 0600)", valueName: "file" },
    etcdPrefix: { type: "string", description: "with --store etcd: key prefix of this program's tables (each program its own)", default: defaultPrefix, valueName: "prefix" },
  } as const;
}
