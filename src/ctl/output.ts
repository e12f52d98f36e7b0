/**
 * Output of `kmi ctl`: aligned tables and key/value blocks for people, one JSON document
 * for scripts (`--json`), errors as one line on stderr that says what to do, and the exit
 * codes that scripts branch on. Shared by every command file (KDC and Auditserver).
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { isKmiError } from "../common/errors.js";
import { neutralizeControlChars } from "../common/control-chars.js";

/** Exit codes of `kmi ctl`, documented in `kmi ctl --help`. */
export const ExitCode = {
  ok: 0,
  /** Anything else: network, TLS, internal errors. */
  failure: 1,
  /** The command line is wrong (unknown command or flag, missing argument). */
  usage: 2,
  /** The named object does not exist. */
  notFound: 3,
  /** No, a bad, or a not-allowed token (UNAUTHENTICATED, PERMISSION_DENIED). */
  denied: 4,
  /** The input or the state refused the change (INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS, OUT_OF_RANGE). */
  rejected: 5,
} as const;

/** The exit-code section of `kmi ctl --help`. */
export const EXIT_CODE_HELP = [
  "exit codes:",
  "  0  ok",
  "  1  anything else (server unreachable, TLS failure, internal error, audit log does not verify)",
  "  2  usage: unknown command or flag, missing argument",
  "  3  not found",
  "  4  unauthenticated or permission denied (check --token / KMI_CTL_TOKEN)",
  "  5  invalid argument, failed precondition or already exists (the message says what to fix)",
].join("\n");

/** A command-line mistake: exit 2 with the message and a pointer to --help. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** Where output goes (process streams in the CLI, buffers in tests). */
export interface Streams {
  stdout: { write(chunk: string | Uint8Array): unknown };
  stderr: { write(chunk: string): unknown };
}

/** A table column: header and how to get the cell from a row. */
export interface Column<T> {
  header: string;
  value: (row: T) => string | number | boolean | undefined;
}

/** Renders rows as an aligned text table (two spaces between columns, header in capitals). */
export function renderTable<T>(columns: readonly Column<T>[], rows: readonly T[]): string {
  const cells = rows.map((r) => columns.map((c) => cell(c.value(r))));
  const headers = columns.map((c) => c.header.toUpperCase());
  const widths = headers.map((h, i) => Math.max(h.length, ...cells.map((row) => row[i]!.length)));
  const line = (row: string[]) =>
    row
      .map((v, i) => (i === row.length - 1 ? v : v.padEnd(widths[i]!)))
      .join("  ")
      .trimEnd();
  return [line(headers), ...cells.map(line)].join("\n") + "\n";
}

/** Renders key/value pairs as an aligned block ("key:  value"). */
export function renderFields(fields: ReadonlyArray<readonly [string, string | number | boolean | undefined]>): string {
  const width = Math.max(0, ...fields.map(([k]) => k.length + 1));
  return fields.map(([k, v]) => `${(k + ":").padEnd(width)}  ${cell(v)}`.trimEnd()).join("\n") + "\n";
}

function cell(v: string | number | boolean | undefined): string {
  if (v === undefined || v === "") return "-";
  // Values come from the server; strip control characters so they cannot forge lines.
  // eslint-disable-next-line no-control-regex
  return neutralizeControlChars(String(v));
}

/** Output of one command: JSON for scripts, text for people. */
export class Output {
  constructor(
    private readonly streams: Streams,
    /** True with `--json`. */
    readonly json: boolean,
  ) {}

  /** Prints a result: `data` as JSON with --json, else what `human` returns. */
  result(data: unknown, human: () => string): void {
    if (this.json) this.streams.stdout.write(JSON.stringify(data, jsonReplacer, 2) + "\n");
    else this.streams.stdout.write(human());
  }

  /** Prints a table (or the rows as a JSON array with --json, under `key` when given). */
  table<T>(columns: readonly Column<T>[], rows: readonly T[], jsonValue: unknown): void {
    this.result(jsonValue, () => (rows.length === 0 ? "(none)\n" : renderTable(columns, rows)));
  }

  /** A line for people on stderr (hints, "wrote file"); silent with --json. */
  note(line: string): void {
    if (!this.json) this.streams.stderr.write(line + "\n");
  }

  /** Raw bytes or text to stdout (a PEM, a CSR). */
  raw(data: string | Uint8Array): void {
    this.streams.stdout.write(data);
  }

  /** Prints an error line on stderr and returns the exit code for it. */
  error(err: unknown): number {
    const { code, message } = describeError(err);
    if (this.json) this.streams.stderr.write(JSON.stringify({ error: { code: codeName(err), message } }) + "\n");
    else this.streams.stderr.write(`kmi ctl: ${message}\n`);
    return code;
  }
}

/** JSON.stringify replacer: bigints as strings, bytes as base64. */
export function jsonReplacer(_key: string, value: unknown): unknown {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Uint8Array) return Buffer.from(value).toString("base64");
  return value;
}

function codeName(err: unknown): string {
  if (err instanceof UsageError) return "usage";
  if (err instanceof ConnectError) return Code[err.code] ?? "unknown";
  if (isKmiError(err)) return err.code;
  return "unknown";
}

/** Maps an error to an exit code and a message that says what to do. */
export function describeError(err: unknown): { code: number; message: string } {
  if (err instanceof UsageError) return { code: ExitCode.usage, message: `${err.message} (see --help)` };
  if (err instanceof ConnectError) {
    const msg = err.rawMessage;
    switch (err.code) {
      case Code.NotFound:
        return { code: ExitCode.notFound, message: msg };
      case Code.Unauthenticated:
        return { code: ExitCode.denied, message: `unauthenticated: ${msg}` };
      case Code.PermissionDenied:
        return { code: ExitCode.denied, message: `permission denied: ${msg}` };
      case Code.InvalidArgument:
      case Code.FailedPrecondition:
      case Code.AlreadyExists:
      case Code.OutOfRange:
        return { code: ExitCode.rejected, message: msg };
      case Code.Unavailable:
        return { code: ExitCode.failure, message: `the server is unavailable (${msg}); check --kdc / KMI_CTL_KDC (for group, join-token and machine commands, and --server audit: --audit / KMI_CTL_AUDIT) and that the server runs` };
      case Code.Internal:
      case Code.Unknown:
        if (/certificate|self[- ]signed|unable to verify|CERT_|altnames|hostname/i.test(msg) && !/^\w+:/.test(msg)) {
          return { code: ExitCode.failure, message: `TLS: ${msg}; pass the KDC's infra-ca.pem with --ca-file (or KMI_CTL_CA_FILE), and reach it by a name in its certificate` };
        }
        return { code: ExitCode.failure, message: `${Code[err.code] ?? "error"}: ${msg}` };
      case Code.Unimplemented:
        return { code: ExitCode.failure, message: `not implemented by this server: ${msg}` };
      default:
        return { code: ExitCode.failure, message: `${Code[err.code] ?? "error"}: ${msg}` };
    }
  }
  if (isKmiError(err)) {
    const map: Record<string, number> = {
      not_found: ExitCode.notFound,
      unauthenticated: ExitCode.denied,
      permission_denied: ExitCode.denied,
      invalid_argument: ExitCode.rejected,
      failed_precondition: ExitCode.rejected,
      already_exists: ExitCode.rejected,
    };
    return { code: map[err.code] ?? ExitCode.failure, message: err.message };
  }
  const e = err as NodeJS.ErrnoException;
  if (e?.code === "ENOENT" && typeof e.path === "string") return { code: ExitCode.failure, message: `cannot read ${e.path}: no such file; check the path` };
  if (e?.code === "EACCES" && typeof e.path === "string") return { code: ExitCode.failure, message: `cannot access ${e.path}: permission denied` };
  return { code: ExitCode.failure, message: err instanceof Error ? err.message : String(err) };
}
