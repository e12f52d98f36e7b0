/**
 * One ICAP service as the proxy uses it: its OPTIONS (Methods, Preview, Transfer-Preview /
 * -Ignore / -Complete, ISTag, Options-TTL, Max-Connections, Allow) fetched once and cached
 * for their TTL, and body inspectors that run a REQMOD or RESPMOD transaction and turn its
 * outcome, or its failure under the service's fail mode, into a verdict.
 */
import type { Logger } from "../../common/logger.js";
import type { BodyInspector, InspectionNote, InspectionVerdict } from "../body-relay.js";
import type { IcapPool } from "./pool.js";
import { IcapTransaction, type IcapOutcome } from "./transaction.js";
import { formatIcapRequest, type IcapResponse, type IcapUrl } from "./wire.js";

/** A service as the policy names it. */
export interface IcapServiceConfig {
  /** Name in the access log and metrics. */
  readonly name: string;
  readonly url: IcapUrl;
  /** What a body gets when the service cannot answer: passed (`open`) or blocked (`closed`). */
  readonly failMode: "open" | "closed";
  /** TCP connect (and wait for a free connection), ms. */
  readonly connectTimeoutMs: number;
  /** Longest wait for each answer of the service, ms. */
  readonly readTimeoutMs: number;
  /** Most connections to the service's server. */
  readonly maxConnections: number;
}

/** The service's OPTIONS answer, as used. */
export interface IcapOptions {
  /** Methods offered (`RESPMOD`, `REQMOD`). */
  readonly methods: ReadonlySet<string>;
  /** Preview size the service asks for; undefined when it takes no preview. */
  readonly preview: number | undefined;
  /** File extensions to preview (`*` for all); empty when the service did not say. */
  readonly transferPreview: readonly string[];
  /** File extensions the service does not want to see. */
  readonly transferIgnore: readonly string[];
  /** File extensions to send whole, without a preview. */
  readonly transferComplete: readonly string[];
  /** The service's ISTag (changes when its signatures or configuration do). */
  readonly istag: string | undefined;
  /** Whether the service answers 204 for unmodified messages. */
  readonly allow204: boolean;
  /** The service's connection ceiling, if it gave one. */
  readonly maxConnections: number | undefined;
  /** When to ask again (ms since the epoch). */
  readonly expires: number;
}

/** Counters of ICAP traffic (Prometheus in the server). */
export interface IcapCounters {
  /** One transaction ended: `result` is clean, infection, violation, modified, ignored or error. */
  request(service: string, method: string, result: string): void;
  /** Request/answer exchanges with the service (OPTIONS, preview, final). */
  roundTrips(service: string, n: number): void;
}

/** The HTTP message a body belongs to, as the service is told about it. */
export interface InspectedMessage {
  /** REQMOD (an upload) or RESPMOD (a response). */
  readonly method: "REQMOD" | "RESPMOD";
  /** The encapsulated HTTP request head. */
  readonly reqHdr: Buffer;
  /** The encapsulated HTTP response head (RESPMOD). */
  readonly resHdr?: Buffer;
  /** The request path (its extension picks preview or not, per Transfer-* headers). */
  readonly path: string;
}

/** Where an inspector feeds the body: a transaction, or a stand-in until the OPTIONS are known. */
type Feed = Pick<IcapTransaction, "write" | "onDrain" | "end" | "abort">;

/** Default Options-TTL when the service gives none (RFC 3507 says "forever"; an hour keeps ISTag fresh). */
const DEFAULT_TTL_MS = 3_600_000;

function list(v: string | undefined): string[] {
  return v === undefined ? [] : v.split(",").map((x) => x.trim().toLowerCase()).filter((x) => x !== "");
}

/** Reads an OPTIONS answer; throws when it is not a 200. */
export function parseOptions(r: IcapResponse, now: number): IcapOptions {
  if (r.status !== 200) throw new Error(`the icap service answered OPTIONS with ${r.status} ${r.reason}`.trim());
  const num = (name: string): number | undefined => {
    const v = r.headers.get(name);
    return v !== undefined && /^\d+$/.test(v.trim()) ? Number(v.trim()) : undefined;
  };
  const ttl = num("options-ttl");
  return {
    methods: new Set(list(r.headers.get("methods")).map((m) => m.toUpperCase())),
    preview: num("preview"),
    transferPreview: list(r.headers.get("transfer-preview")),
    transferIgnore: list(r.headers.get("transfer-ignore")),
    transferComplete: list(r.headers.get("transfer-complete")),
    istag: r.headers.get("istag")?.replace(/^"|"$/g, ""),
    allow204: list(r.headers.get("allow")).includes("204"),
    maxConnections: num("max-connections"),
    expires: now + (ttl === undefined ? DEFAULT_TTL_MS : ttl * 1000),
  };
}

/** The extension of a path's last segment, lowercase ("" when none). */
function extensionOf(path: string): string {
  const p = path.split(/[?#]/, 1)[0] ?? "";
  const last = p.slice(p.lastIndexOf("/") + 1);
  const dot = last.lastIndexOf(".");
  return dot <= 0 ? "" : last.slice(dot + 1).toLowerCase();
}

const listed = (l: readonly string[], ext: string): boolean => l.includes("*") || (ext !== "" && l.includes(ext));

/** How a message is sent: skipped, whole, or with a preview of `n` bytes. */
export function transferOf(o: IcapOptions, path: string): { kind: "ignore" } | { kind: "send"; preview: number | undefined } {
  const ext = extensionOf(path);
  if (ext !== "" && o.transferIgnore.includes(ext)) return { kind: "ignore" };
  if (o.preview === undefined || (ext !== "" && o.transferComplete.includes(ext))) return { kind: "send", preview: undefined };
  // Transfer-Preview absent: the Preview header alone applies to everything.
  if (o.transferPreview.length === 0 || listed(o.transferPreview, ext)) return { kind: "send", preview: o.preview };
  return { kind: "send", preview: undefined };
}

/** An ICAP service with its cached OPTIONS. */
export class IcapService {
  private cached: IcapOptions | undefined;
  private fetching: Promise<IcapOptions> | undefined;
  private failing = false;

  constructor(
    readonly config: IcapServiceConfig,
    private readonly pool: IcapPool,
    private readonly counters: IcapCounters,
    private readonly logger: Logger,
    private readonly now: () => number = Date.now,
  ) {}

  /** The service's OPTIONS: cached until their TTL, fetched once for concurrent callers. */
  options(): Promise<IcapOptions> {
    const c = this.cached;
    if (c !== undefined && c.expires > this.now()) return Promise.resolve(c);
    this.fetching ??= this.fetchOptions().finally(() => (this.fetching = undefined));
    return this.fetching;
  }

  private async fetchOptions(): Promise<IcapOptions> {
    const conn = await this.pool.acquire();
    let ok = false;
    try {
      conn.write(formatIcapRequest({ method: "OPTIONS", url: this.config.url, body: false }));
      const r = await conn.next(this.config.readTimeoutMs);
      this.counters.roundTrips(this.config.name, 1);
      const o = parseOptions(r, this.now());
      ok = (r.headers.get("connection") ?? "").toLowerCase() !== "close";
      if (o.maxConnections !== undefined) this.pool.limit(o.maxConnections);
      if (this.cached?.istag !== o.istag) this.logger.info("icap service options", { service: this.config.name, istag: o.istag, methods: [...o.methods], preview: o.preview });
      this.cached = o;
      return o;
    } finally {
      this.pool.release(conn, ok);
    }
  }

  /** A body inspector for one message; its verdict follows the service's answer and fail mode. */
  inspector(message: InspectedMessage): BodyInspector {
    const tx = this.start(message);
    let onVerdict: ((v: InspectionVerdict) => void) | undefined;
    let verdict: InspectionVerdict | undefined;
    let aborted = false;
    // A transaction the relay abandoned (the client left, the built-in scan blocked) is neither
    // a verdict nor a failure of the service: it is not counted.
    void tx.result
      .then(
        (outcome) => (aborted ? undefined : this.verdictOf(message.method, outcome)),
        (err: unknown) => (aborted ? undefined : this.failed(message.method, err as Error)),
      )
      .then((v) => {
        if (v === undefined) return;
        verdict = v;
        // Wake a relay waiting for room (it stops feeding once it has the verdict).
        tx.transaction?.abort();
        onVerdict?.(v);
      });
    return {
      write: (chunk) => tx.transaction?.write(chunk) ?? true,
      onDrain: (cb) => (tx.transaction === undefined ? queueMicrotask(cb) : tx.transaction.onDrain(cb)),
      end: () => tx.transaction?.end(),
      onVerdict: (cb) => {
        onVerdict = cb;
        if (verdict !== undefined) queueMicrotask(() => cb(verdict!));
      },
      abort: () => {
        aborted = true;
        tx.transaction?.abort();
      },
    };
  }

  /**
   * Starts the transaction. The OPTIONS are needed first (method, preview); the transaction
   * object exists from the start only when they are cached, so the first message of a fresh
   * service waits for them behind a small relay of its own.
   */
  private start(message: InspectedMessage): { transaction: Feed | undefined; result: Promise<IcapOutcome | "ignored"> } {
    const setup = (o: IcapOptions): IcapTransaction | "ignored" => {
      if (!o.methods.has(message.method)) throw new Error(`the icap service does not offer ${message.method} (it offers ${[...o.methods].join(", ") || "nothing"})`);
      const t = transferOf(o, message.path);
      if (t.kind === "ignore") return "ignored";
      return new IcapTransaction({ ...message, url: this.config.url, pool: this.pool, preview: t.preview, readTimeoutMs: this.config.readTimeoutMs });
    };
    const c = this.cached;
    if (c !== undefined && c.expires > this.now()) {
      let t: IcapTransaction | "ignored";
      try {
        t = setup(c);
      } catch (err) {
        // A method the service does not offer: a failure like any other, under the fail mode.
        return { transaction: undefined, result: Promise.reject(err as Error) };
      }
      return t === "ignored" ? { transaction: undefined, result: Promise.resolve("ignored") } : { transaction: t, result: t.result };
    }
    // OPTIONS not yet known: buffer what arrives meanwhile in a transaction made once they are.
    const early = new DeferredTransaction();
    const result = this.options().then((o): Promise<IcapOutcome | "ignored"> | "ignored" => {
      const t = setup(o);
      if (t === "ignored") {
        early.drop();
        return "ignored" as const;
      }
      early.attach(t);
      return t.result;
    });
    result.catch(() => early.drop());
    return { transaction: early, result };
  }

  private verdictOf(method: string, outcome: IcapOutcome | "ignored"): InspectionVerdict {
    const name = this.config.name;
    this.recovered();
    if (outcome === "ignored") {
      this.counters.request(name, method, "ignored");
      return { kind: "pass", note: { service: name, result: "ignored" } };
    }
    this.counters.roundTrips(name, outcome.roundTrips);
    if (outcome.kind === "clean") {
      this.counters.request(name, method, "clean");
      return { kind: "pass", note: { service: name, result: "clean", ...(outcome.istag !== undefined ? { istag: outcome.istag } : {}) } };
    }
    const f = outcome.finding;
    this.counters.request(name, method, f.kind);
    const note: InspectionNote = { service: name, result: f.kind, ...(f.threat !== undefined ? { threat: f.threat } : {}), ...(outcome.istag !== undefined ? { istag: outcome.istag } : {}) };
    const what = f.threat ?? (f.kind === "modified" ? "content the icap service would change" : `an unnamed ${f.kind}`);
    return { kind: "block", rule: `icap:${name}`, reason: `${what} (icap service ${name})`, note };
  }

  private failed(method: string, err: Error): InspectionVerdict {
    const name = this.config.name;
    this.counters.request(name, method, "error");
    if (!this.failing) {
      this.failing = true;
      this.logger.warn(`icap service unavailable; bodies are ${this.config.failMode === "open" ? "passed unscanned (fail-open)" : "blocked (fail-closed)"}`, { service: name, error: err.message });
    }
    if (this.config.failMode === "open") return { kind: "pass", note: { service: name, result: "fail-open", error: err.message } };
    return {
      kind: "block",
      rule: `icap-unavailable:${name}`,
      reason: `no verdict: the icap service ${name} is unavailable (${err.message})`,
      note: { service: name, result: "fail-closed", error: err.message },
    };
  }

  private recovered(): void {
    if (!this.failing) return;
    this.failing = false;
    this.logger.info("icap service answers again", { service: this.config.name });
  }
}

/**
 * Stands in for a transaction while the service's OPTIONS are fetched: it keeps the chunks
 * (the relay's backpressure bounds them, as for a real one) and hands them over once it can.
 */
class DeferredTransaction implements Feed {
  private chunks: Buffer[] = [];
  private size = 0;
  private ended = false;
  private target: IcapTransaction | undefined;
  private dropped = false;
  private drains: (() => void)[] = [];

  write(chunk: Buffer): boolean {
    if (this.target !== undefined) return this.target.write(chunk);
    if (this.dropped) return true;
    this.chunks.push(chunk);
    this.size += chunk.length;
    return this.size < 64 * 1024;
  }

  onDrain(cb: () => void): void {
    if (this.target !== undefined) this.target.onDrain(cb);
    else if (this.dropped) queueMicrotask(cb);
    else this.drains.push(cb);
  }

  end(): void {
    if (this.target !== undefined) this.target.end();
    else this.ended = true;
  }

  abort(): void {
    if (this.target !== undefined) this.target.abort();
    else this.drop();
  }

  attach(t: IcapTransaction): void {
    if (this.dropped) {
      t.abort();
      return;
    }
    this.target = t;
    for (const c of this.chunks) t.write(c);
    this.chunks = [];
    if (this.ended) t.end();
    const d = this.drains;
    this.drains = [];
    for (const cb of d) t.onDrain(cb);
  }

  drop(): void {
    this.dropped = true;
    this.chunks = [];
    const d = this.drains;
    this.drains = [];
    for (const cb of d) cb();
  }
}
