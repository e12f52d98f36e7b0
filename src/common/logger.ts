/**
 * Structured JSON-lines logging to stderr.
 *
 * One line per event: `{"time":"…","level":"info","msg":"…",…fields}`. Fields are plain
 * JSON; `Error` values become `{name, message, code?, stack?}`. Secrets never belong in a
 * field: log {@link secretDigest} of a sensitive value instead. As a second line of defence,
 * fields whose name says "secret" (see {@link isSecretFieldName}) are replaced by a digest.
 */
import { hash } from "node:crypto";
import { escapeJsonControls } from "./control-chars.js";

/** Log levels, lowest first. */
export type LogLevel = "debug" | "info" | "warn" | "error";

/** Extra key/value pairs of a log line. */
export type LogFields = Record<string, unknown>;

/** A structured logger. */
export interface Logger {
  /** Writes a debug line (dropped unless the level is `debug`). */
  debug(msg: string, fields?: LogFields): void;
  /** Writes an info line. */
  info(msg: string, fields?: LogFields): void;
  /** Writes a warning line. */
  warn(msg: string, fields?: LogFields): void;
  /** Writes an error line. */
  error(msg: string, fields?: LogFields): void;
  /** A logger that adds `fields` to every line (later fields win over earlier ones). */
  child(fields: LogFields): Logger;
  /** True when a line of `level` would be written; lets hot paths skip building fields. */
  enabled(level: LogLevel): boolean;
  /** The minimum level written. */
  readonly level: LogLevel;
}

/** Options of {@link createLogger}. */
export interface LoggerOptions {
  /** Minimum level written; default `info`. */
  level?: LogLevel;
  /** Where lines go; default `process.stderr`. Gets one line, newline included. */
  write?: (line: string) => void;
  /** Fields on every line, e.g. `{ program: "kdc" }`. */
  fields?: LogFields;
  /** Clock, for tests; default `() => new Date()`. */
  now?: () => Date;
}

const LEVELS: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/** The log levels accepted by {@link parseLogLevel}, lowest first. */
export const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error"];

/** Parses a level name; throws a message that lists the valid names. */
export function parseLogLevel(value: string): LogLevel {
  const v = value.toLowerCase();
  if (v in LEVELS) return v as LogLevel;
  throw new Error(`log level "${value}" is not one of ${LOG_LEVELS.join(", ")}`);
}

/**
 * Digest of a sensitive value, for logs and messages: `sha256:<first 16 hex chars>`.
 * Why: it lets two log lines be correlated (same token, same key) without the value itself
 * ever being written; 64 bits is plenty to correlate and too short to be useful as a
 * stand-in for the value. Use a keyed hash (HMAC) where a low-entropy value could be guessed.
 */
export function secretDigest(value: string | Uint8Array): string {
  // One-shot hash (Node >= 20.12): no Hash object per call; the same digest.
  return "sha256:" + hash("sha256", value, "hex").slice(0, 16);
}

const SECRET_FIELD_NAMES = new Set([
  "secret",
  "password",
  "passphrase",
  "token",
  "bearer",
  "authorization",
  "cookie",
  "apikey",
  "privatekey",
  "privatekeypem",
  "key",
  "keypem",
  "masterkey",
  "datakey",
  "jointoken",
  "clientsecret",
]);

/**
 * True when a field name says its value is a secret (`token`, `privateKey`, `password`,
 * `authorization`, …; case, `_` and `-` ignored). Such fields are logged as a digest.
 */
export function isSecretFieldName(name: string): boolean {
  return SECRET_FIELD_NAMES.has(name.toLowerCase().replace(/[-_]/g, ""));
}

function serializeError(err: Error, depth: number): Record<string, unknown> {
  const out: Record<string, unknown> = { name: err.name, message: err.message };
  const code = (err as { code?: unknown }).code;
  if (code !== undefined) out["code"] = code;
  if (err.stack !== undefined) out["stack"] = err.stack;
  if (err.cause !== undefined && depth < 3) {
    out["cause"] = err.cause instanceof Error ? serializeError(err.cause, depth + 1) : String(err.cause);
  }
  return out;
}

function toJsonValue(key: string, value: unknown, seen: WeakSet<object>, depth: number): unknown {
  if (isSecretFieldName(key) && value !== undefined && value !== null && value !== "") {
    // Why: a secret that slipped into a field is replaced by its digest, never written.
    return typeof value === "string" || value instanceof Uint8Array ? secretDigest(value) : "[redacted]";
  }
  switch (typeof value) {
    case "bigint":
      return value.toString();
    case "function":
    case "symbol":
      return undefined;
    case "object": {
      if (value === null) return null;
      if (value instanceof Error) return serializeError(value, 0);
      if (value instanceof Date) return value.toISOString();
      if (value instanceof Uint8Array) return `<${value.byteLength} bytes>`;
      if (seen.has(value) || depth > 8) return "[circular]";
      seen.add(value);
      let out: unknown;
      if (Array.isArray(value)) {
        out = value.map((v) => toJsonValue("", v, seen, depth + 1));
      } else if (value instanceof Map) {
        out = Object.fromEntries([...value].map(([k, v]) => [String(k), toJsonValue(String(k), v, seen, depth + 1)]));
      } else {
        const o: Record<string, unknown> = {};
        for (const [k, v] of Object.entries(value)) o[k] = toJsonValue(k, v, seen, depth + 1);
        out = o;
      }
      seen.delete(value);
      return out;
    }
    default:
      return value;
  }
}

/** What a line needs to know about a field name: its JSON text, and whether it names a secret. */
interface FieldName {
  readonly json: string;
  readonly secret: boolean;
}

/** Field names seen so far (names come from code, so few); bounded in case one is built from data. */
const fieldNames = new Map<string, FieldName>();
const MAX_FIELD_NAMES = 4096;

function fieldName(k: string): FieldName {
  let f = fieldNames.get(k);
  if (f === undefined) {
    f = { json: JSON.stringify(k), secret: isSecretFieldName(k) };
    if (fieldNames.size < MAX_FIELD_NAMES) fieldNames.set(k, f);
  }
  return f;
}

/**
 * Names that the fast path of a line leaves to the general one: the line's own keys, a key
 * that JavaScript would order before the others (an array index), and `__proto__`.
 */
function isPlainKey(k: string): boolean {
  return k !== "time" && k !== "level" && k !== "msg" && k !== "__proto__" && !/^(?:0|[1-9][0-9]*)$/.test(k);
}

function isPrimitive(v: unknown): boolean {
  const t = typeof v;
  return v === null || t === "string" || t === "number" || t === "boolean" || t === "undefined" || t === "bigint";
}

/**
 * The fields of a logger, serialized once: `,"k":v` for each, in order, or undefined when a
 * value is not a primitive (an object could change between lines) or a key is not plain.
 */
function preSerialize(fields: LogFields): string | undefined {
  let out = "";
  for (const k of Object.keys(fields)) {
    const v = fields[k];
    if (!isPlainKey(k) || !isPrimitive(v)) return undefined;
    const jv = toJsonValue(k, v, new WeakSet(), 0);
    if (jv === undefined) continue;
    out += "," + fieldName(k).json + ":" + JSON.stringify(jv);
  }
  return out;
}

class JsonLogger implements Logger {
  /** `,"k":v` of {@link fields}, made once; undefined when they cannot be (see preSerialize). */
  private readonly fieldsJson: string | undefined;

  constructor(
    readonly level: LogLevel,
    private readonly min: number,
    private readonly write: (line: string) => void,
    private readonly fields: LogFields,
    private readonly now: () => Date,
  ) {
    this.fieldsJson = preSerialize(fields);
  }

  enabled(level: LogLevel): boolean {
    return LEVELS[level] >= this.min;
  }

  debug(msg: string, fields?: LogFields): void {
    if (LEVELS.debug >= this.min) this.emit("debug", msg, fields);
  }
  info(msg: string, fields?: LogFields): void {
    if (LEVELS.info >= this.min) this.emit("info", msg, fields);
  }
  warn(msg: string, fields?: LogFields): void {
    if (LEVELS.warn >= this.min) this.emit("warn", msg, fields);
  }
  error(msg: string, fields?: LogFields): void {
    if (LEVELS.error >= this.min) this.emit("error", msg, fields);
  }

  child(fields: LogFields): Logger {
    return new JsonLogger(this.level, this.min, this.write, { ...this.fields, ...fields }, this.now);
  }

  private emit(level: LogLevel, msg: string, fields: LogFields | undefined): void {
    const time = this.now().toISOString();
    let text = this.fieldsJson === undefined ? undefined : this.fastLine(time, level, msg, fields);
    if (text === undefined) text = this.slowLine(time, level, msg, fields);
    try {
      this.write(escapeJsonControls(text) + "\n");
    } catch {
      // A closed stderr must not take the server down with it.
    }
  }

  /**
   * The line written as text, without building the object {@link slowLine} stringifies: the
   * same JSON, key for key. Undefined when a call field would make it differ (it overrides a
   * logger field, or is not a plain key); then the general way writes the line.
   */
  private fastLine(time: string, level: LogLevel, msg: string, fields: LogFields | undefined): string | undefined {
    let out = '{"time":"' + time + '","level":"' + level + '","msg":' + JSON.stringify(msg) + this.fieldsJson;
    if (fields === undefined) return out + "}";
    const base = this.fields;
    let seen: WeakSet<object> | undefined;
    try {
      for (const k of Object.keys(fields)) {
        if (k === "time" || k === "level" || k === "msg") continue;
        if (!isPlainKey(k) || Object.prototype.hasOwnProperty.call(base, k)) return undefined;
        const v = fields[k];
        const name = fieldName(k);
        let jv: unknown;
        if (typeof v === "string" && !name.secret) {
          jv = v;
        } else {
          if (typeof v === "object" && v !== null) seen ??= new WeakSet<object>();
          jv = toJsonValue(k, v, seen ?? EMPTY_SEEN, 0);
        }
        if (jv === undefined) continue;
        const j = JSON.stringify(jv);
        if (j === undefined) continue;
        out += "," + name.json + ":" + j;
      }
    } catch {
      return undefined;
    }
    return out + "}";
  }

  private slowLine(time: string, level: LogLevel, msg: string, fields: LogFields | undefined): string {
    const seen = new WeakSet<object>();
    const line: Record<string, unknown> = { time, level, msg };
    for (const [k, v] of Object.entries(this.fields)) {
      if (k !== "time" && k !== "level" && k !== "msg") line[k] = toJsonValue(k, v, seen, 0);
    }
    if (fields !== undefined) {
      for (const [k, v] of Object.entries(fields)) {
        if (k !== "time" && k !== "level" && k !== "msg") line[k] = toJsonValue(k, v, seen, 0);
      }
    }
    try {
      return JSON.stringify(line);
    } catch {
      return JSON.stringify({ time: line["time"], level, msg, logError: "fields not serializable" });
    }
  }
}

/** The `seen` set of a line whose values are no objects: never written to. */
const EMPTY_SEEN = new WeakSet<object>();

/** Creates a JSON-lines logger (stderr by default). */
export function createLogger(options: LoggerOptions = {}): Logger {
  const level = options.level ?? "info";
  const write = options.write ?? ((line: string) => void process.stderr.write(line));
  return new JsonLogger(level, LEVELS[level], write, options.fields ?? {}, options.now ?? (() => new Date()));
}

/** A logger that drops everything (tests, libraries called without one). */
export function createNopLogger(): Logger {
  return nopLogger;
}

const nopLogger: Logger = {
  level: "error",
  debug() {},
  info() {},
  warn() {},
  error() {},
  child() {
    return nopLogger;
  },
  enabled() {
    return false;
  },
};
