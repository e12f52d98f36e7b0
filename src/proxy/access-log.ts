/**
 * The proxy's access log: one JSON line per request (or per tunnel, for a bypassed or
 * refused connection) with time, tenant, client, host, method, path, status, bytes each way,
 * the decision and the rule that made it, and the duration.
 *
 * Lines go to a file (reopened on SIGHUP, for log rotation), to stdout, or nowhere. A line is
 * in the file before the response's last bytes go out (see the handlers and
 * {@link AccessLog.writeThen}), so it is there when the client has its answer.
 *
 * Query strings are not logged unless asked for: they often carry tokens, session ids and
 * personal data (as Squid's `strip_query_terms`, on by default). A stripped path keeps its "?"
 * so that a reader sees there was a query.
 */
import { closeSync, openSync, writeSync } from "node:fs";
import type { Logger } from "../common/logger.js";
import { escapeJsonControls } from "../common/control-chars.js";

/**
 * What the proxy did with a request or connection. `no-request`: a connection that ended
 * without sending a request (a browser's unused preconnect, `openssl s_client`, a client that
 * closed before or right after the TLS handshake without an alert); not an error.
 */
export type Decision = "allow" | "block" | "bypass" | "error" | "no-request";

/** One access log record. */
export interface AccessRecord {
  /** Tenant id ("" when none could be determined). */
  tenant: string;
  /** Client address and port. */
  client: string;
  /** Host the client asked for (SNI, CONNECT target, or Host header). */
  host: string;
  /** HTTP method; `CONNECT` for a tunnel-level record. */
  method: string;
  /** Request path with its query (empty for a tunnel); the sinks strip the query unless told to keep it. */
  path: string;
  /** HTTP status sent to the client (0 when none was sent). */
  status: number;
  /** Body bytes from the client toward the origin (tunnel: all bytes). */
  bytes_up: number;
  /** Body bytes from the origin toward the client (tunnel: all bytes). */
  bytes_down: number;
  /** The decision. */
  decision: Decision;
  /** The rule that made it (`block-host:…`, `eicar`, `origin-verify`, `bypass-host:…`, …), if any. */
  rule?: string;
  /** Milliseconds from the request's start to its end. */
  duration_ms: number;
  /** `http/1.1`, `h2`, `tunnel`, `websocket`. */
  proto?: string;
  /** Why it failed or was blocked, in words (verification error, agent error, …). */
  error?: string;
  /** The ICAP service a body went to, when one did. */
  icap?: string;
  /** Its verdict: `clean`, `infection`, `violation`, `modified`, `ignored`, `fail-open`, `fail-closed`. */
  icap_result?: string;
  /** The threat or violation it named. */
  threat?: string;
  /** With `--workers`: the cluster id of the worker that served it. */
  worker?: number;
  /** Set when `path` and `error` were shortened to keep the line within one atomic pipe write (workers, stdout). */
  truncated?: boolean;
}

/** Where records go. */
export interface AccessLog {
  /** Writes a record (time is added) at once. */
  write(record: AccessRecord): void;
  /**
   * Writes a record, then calls `then` (where a handler sends the response's last bytes). A
   * file log gathers the lines of one turn of the event loop into one write(2) and calls each
   * `then` after it: the line is in the file before the client has its answer, at one system
   * call per turn instead of one per request (docs/proxy.md, "Access log").
   */
  writeThen(record: AccessRecord, then: () => void): void;
  /** Reopens the file (after log rotation). */
  reopen(): void;
  /** Flushes and closes. */
  close(): Promise<void>;
}

/** Options of the access log sinks. */
export interface AccessLogOptions {
  /** Log query strings; default false (`/search?q=secret` is logged as `/search?`). */
  readonly query?: boolean;
  /**
   * The cluster id of the worker writing (`--workers`): added to every record, and a line to
   * stdout is kept within PIPE_BUF (4096 bytes), which the kernel writes atomically, so that
   * the workers' lines never interleave. A file is opened for append by each worker, and each
   * line is one write(2): appends to a local file do not interleave either.
   */
  readonly worker?: number;
}

/** Bytes the kernel writes to a pipe atomically (Linux PIPE_BUF). */
const PIPE_BUF = 4096;

/** The record's line, within PIPE_BUF: a long path (and error) is cut, and the record marked truncated. */
function pipeLine(record: AccessRecord): string {
  const l = line(record);
  if (Buffer.byteLength(l) <= PIPE_BUF) return l;
  for (const keep of [1024, 128]) {
    const cut: AccessRecord = { ...record, path: record.path.slice(0, keep), truncated: true };
    if (record.error !== undefined) cut.error = record.error.slice(0, keep);
    const shorter = line(cut);
    if (Buffer.byteLength(shorter) <= PIPE_BUF) return shorter;
  }
  return line({ ...record, path: "", error: "", host: record.host.slice(0, 255), truncated: true });
}

/** `path` as the log shows it: without its query string (the "?" kept) unless `query`. */
export function loggedPath(path: string, query: boolean): string {
  if (query) return path;
  const q = path.indexOf("?");
  return q < 0 ? path : path.slice(0, q + 1);
}

/** The record as the log shows it; the same object when nothing is stripped. */
function redactPath(record: AccessRecord, query: boolean): AccessRecord {
  const path = loggedPath(record.path, query);
  return path === record.path ? record : { ...record, path };
}

/** An access log that keeps records in memory (tests) or drops them; it strips queries as the file log does. */
export class MemoryAccessLog implements AccessLog {
  readonly records: (AccessRecord & { time: string })[] = [];
  private waiters: { pred: (r: AccessRecord) => boolean; resolve: (r: AccessRecord) => void }[] = [];
  private readonly query: boolean;
  private readonly deferEnds: boolean;

  /** `deferEnds`: {@link AccessLog.writeThen} lets the response end a turn later, as the file log does. */
  constructor(options: AccessLogOptions & { readonly deferEnds?: boolean } = {}) {
    this.query = options.query ?? false;
    this.deferEnds = options.deferEnds ?? false;
  }

  write(record: AccessRecord): void {
    const r = { time: new Date().toISOString(), ...redactPath(record, this.query) };
    this.records.push(r);
    this.waiters = this.waiters.filter((w) => {
      if (!w.pred(r)) return true;
      w.resolve(r);
      return false;
    });
  }

  /** Resolves with the first record (already written or future) that satisfies `pred`. */
  waitFor(pred: (r: AccessRecord) => boolean, timeoutMs = 5000): Promise<AccessRecord & { time?: string }> {
    const hit = this.records.find(pred);
    if (hit !== undefined) return Promise.resolve(hit);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error("no matching access log record")), timeoutMs);
      this.waiters.push({ pred, resolve: (r) => (clearTimeout(t), resolve(r)) });
    });
  }

  writeThen(record: AccessRecord, then: () => void): void {
    this.write(record);
    if (this.deferEnds) setImmediate(then);
    else then();
  }

  reopen(): void {}
  async close(): Promise<void> {}
}

let lastMs = 0;
let lastIso = "";

/** The record as a line; the ISO time is formatted once per millisecond, not once per record. */
function line(record: AccessRecord): string {
  const ms = Date.now();
  if (ms !== lastMs) {
    lastMs = ms;
    lastIso = new Date(ms).toISOString();
  }
  // Same text as JSON.stringify({ time, ...record }) without copying the record per line.
  const body = escapeJsonControls(JSON.stringify(record));
  return body === "{}" ? `{"time":"${lastIso}"}\n` : `{"time":"${lastIso}",${body.slice(1)}\n`;
}

/**
 * Opens the access log: `"-"` for stdout, `"off"` for none, or a file path (appended to,
 * created 0600: it names clients and URLs). Query strings are stripped unless `options.query`.
 *
 * A file gets one write(2) per turn of the event loop: the lines that {@link AccessLog.writeThen}
 * gathered in the turn, written together before any of their responses ends (a plain `write`
 * goes out at once, after the lines gathered before it). So a script that reads the log once
 * its request completes (`curl …; tail -n 1 access.log`) finds that request's line. The write
 * lands in the page cache (no fsync). Under --workers each worker appends its own writes; an
 * append to a local file is never interleaved with another.
 */
export function createAccessLog(destination: string, logger?: Logger, options: AccessLogOptions = {}): AccessLog {
  const query = options.query ?? false;
  const worker = options.worker;
  const redact = worker === undefined ? redactPath : (r: AccessRecord, q: boolean): AccessRecord => ({ ...redactPath(r, q), worker });
  if (destination === "off") {
    return { write() {}, writeThen: (_r, then) => then(), reopen() {}, close: async () => {} };
  }
  // A full disk must not stop the proxy: the failure goes to the operator log, once until a write succeeds again.
  let failing = false;
  const onError = (err: Error): void => {
    if (failing) return;
    failing = true;
    if (logger !== undefined) logger.error("access log write failed", { path: destination, error: err.message });
    else process.stderr.write(`access log ${destination}: ${err.message}\n`);
  };
  if (destination === "-") {
    // stdout is synchronous for files, pipes and terminals on Linux.
    const write = worker === undefined ? (r: AccessRecord) => void process.stdout.write(line(redact(r, query))) : (r: AccessRecord) => void process.stdout.write(pipeLine(redact(r, query)));
    return {
      write,
      writeThen(r, then) {
        write(r);
        then();
      },
      reopen() {},
      close: async () => {},
    };
  }
  return new FileAccessLog(destination, (r) => line(redact(r, query)), onError, () => (failing = false));
}

/** Lines gathered in one turn of the event loop before they are written: a bound on one write(2). */
const MAX_BATCH = 1024;

/** The file sink: lines gathered per turn of the event loop, each batch one write(2). */
class FileAccessLog implements AccessLog {
  private fd: number | undefined;
  private lines: string[] = [];
  private thens: (() => void)[] = [];
  private scheduled: NodeJS.Immediate | undefined;

  constructor(
    private readonly path: string,
    private readonly format: (r: AccessRecord) => string,
    private readonly onError: (err: Error) => void,
    private readonly onSuccess: () => void,
  ) {
    this.fd = openLog(path, onError);
  }

  write(r: AccessRecord): void {
    if (this.fd === undefined) return;
    this.lines.push(this.format(r));
    this.putLines();
  }

  writeThen(r: AccessRecord, then: () => void): void {
    if (this.fd === undefined) return then();
    this.lines.push(this.format(r));
    this.thens.push(then);
    // A full batch is written at once, and its responses end inside this call.
    if (this.lines.length >= MAX_BATCH) this.flush();
    else this.scheduled ??= setImmediate(() => this.flush());
  }

  reopen(): void {
    this.putLines();
    const old = this.fd;
    this.fd = openLog(this.path, this.onError);
    if (old !== undefined) closeSync(old);
  }

  async close(): Promise<void> {
    this.flush();
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }

  /** Writes the gathered lines, then lets their responses end. */
  private flush(): void {
    if (this.scheduled !== undefined) clearImmediate(this.scheduled);
    this.scheduled = undefined;
    this.putLines();
    const thens = this.thens;
    this.thens = [];
    for (const then of thens) {
      try {
        then();
      } catch (err) {
        // One response's failure must not hold back the others; it still surfaces, uncaught, as
        // it would have where the response ended at once.
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }

  /** Writes the gathered lines (one write(2)); a failed write is reported, and the lines are dropped. */
  private putLines(): void {
    if (this.lines.length === 0) return;
    const text = this.lines.length === 1 ? this.lines[0]! : this.lines.join("");
    this.lines = [];
    if (this.fd === undefined) return;
    try {
      const written = writeSync(this.fd, text);
      // A short write (a nearly full disk) goes on from where it stopped, so no line is cut.
      if (written < Buffer.byteLength(text)) {
        const bytes = Buffer.from(text);
        for (let at = written; at < bytes.length; ) at += writeSync(this.fd, bytes, at);
      }
      this.onSuccess();
    } catch (err) {
      this.onError(err as Error);
    }
  }
}

function openLog(path: string, onError: (err: Error) => void): number | undefined {
  try {
    return openSync(path, "a", 0o600);
  } catch (err) {
    onError(err as Error);
    return undefined;
  }
}
