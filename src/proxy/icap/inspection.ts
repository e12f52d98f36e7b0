/**
 * The hook between the proxy's body relay and the ICAP services: for one body, the scan
 * settings that apply and the inspector (if the tenant's policy names a service for that
 * side), plus the services and connection pools, shared by every tenant that names the
 * same service (so a policy reload that keeps a service keeps its connections).
 */
import type { Logger } from "../../common/logger.js";
import { isLiveStream, type BodyInspector } from "../body-relay.js";
import type { Policy, ScanSettings } from "../policy.js";
import { IcapPool } from "./pool.js";
import { IcapService, type IcapCounters, type IcapServiceConfig } from "./service.js";
import { formatHttpRequestHead, formatHttpResponseHead, type HeaderPairs } from "./wire.js";

/** Headers as the handlers have them: a raw `[name, value, ...]` list, or Node's header object. */
export type HeaderSource = readonly string[] | Readonly<Record<string, string | string[] | number | undefined>>;

/** The HTTP exchange a body belongs to. */
export interface BodyExchange {
  readonly method: string;
  /** Origin-form path with query. */
  readonly path: string;
  /** Host[:port] the client asked for. */
  readonly authority: string;
  readonly requestHeaders: HeaderSource;
}

/** A response's status, reason and headers (what a response body's scan is told). */
export interface ResponseHead {
  readonly status: number;
  readonly reason?: string;
  readonly headers: HeaderSource;
}

/** What scans one body: the settings of the relay and, when a service applies, its inspector. */
export interface BodyScan {
  readonly settings: ScanSettings;
  readonly inspector?: BodyInspector;
}

/**
 * How one exchange's bodies are scanned: the request body, or the response body (with the
 * response's status and headers). Bound to the tenant's policy by {@link Inspection.forExchange}.
 */
export type BodyScanner = (side: "request" | "response", contentType: string | undefined, response?: ResponseHead) => BodyScan;

/** Idle ICAP connections close after this (c-icap keeps them 600 s by default, so a reused one is rarely stale). */
const IDLE_MS = 30_000;

/** Upload settings when uploads are not inspected: nothing scanned, nothing held. */
function uninspected(s: ScanSettings): ScanSettings {
  return { ...s, eicar: false, maxBodyBytes: 0 };
}

function pairs(h: HeaderSource): HeaderPairs {
  const out: [string, string][] = [];
  if (Array.isArray(h)) {
    const raw = h as readonly string[];
    for (let i = 0; i + 1 < raw.length; i += 2) out.push([raw[i]!, raw[i + 1]!]);
    return out;
  }
  for (const [k, v] of Object.entries(h as Record<string, string | string[] | number | undefined>)) {
    if (v === undefined || k.startsWith(":")) continue;
    if (Array.isArray(v)) for (const x of v) out.push([k, x]);
    else out.push([k, String(v)]);
  }
  return out;
}

/** The first value of header `lower` (lowercase), from either form. */
function headerValue(h: HeaderSource, lower: string): string | undefined {
  if (Array.isArray(h)) {
    const raw = h as readonly string[];
    for (let i = 0; i + 1 < raw.length; i += 2) if (raw[i]!.toLowerCase() === lower) return raw[i + 1]!.trim();
    return undefined;
  }
  const v = (h as Record<string, string | string[] | number | undefined>)[lower];
  return v === undefined ? undefined : String(Array.isArray(v) ? v[0] : v).trim();
}

function withHost(h: HeaderPairs, authority: string): HeaderPairs {
  return h.some(([k]) => k.toLowerCase() === "host") ? h : [["Host", authority], ...h];
}

/** The proxy's ICAP services, by configuration. */
export class Inspection {
  private readonly services = new Map<string, IcapService>();
  private readonly pools = new Map<string, IcapPool>();

  constructor(
    private readonly counters: IcapCounters,
    private readonly logger: Logger,
  ) {}

  /**
   * How to scan one body under `policy`: the upload or response settings, and an inspector
   * when the policy names a service for that side. Bodies that are streams by nature
   * (gRPC, server-sent events) go to no service: they may never end; one offered as a download
   * (Content-Disposition: attachment) is a file, and goes.
   */
  scan(policy: Policy, side: "request" | "response", exchange: BodyExchange, contentType: string | undefined, response?: ResponseHead): BodyScan {
    if (side === "request" && !policy.scan.uploads) return { settings: uninspected(policy.scan) };
    const config = side === "request" ? policy.icap.reqmod : policy.icap.respmod;
    const headers = response?.headers ?? exchange.requestHeaders;
    // An empty body has nothing to scan: no round trip for it.
    if (config === undefined || isLiveStream(contentType, headerValue(headers, "content-disposition")) || headerValue(headers, "content-length") === "0") return { settings: policy.scan };
    const reqHdr = formatHttpRequestHead(exchange.method, exchange.path, withHost(pairs(exchange.requestHeaders), exchange.authority));
    const r = response;
    const inspector = this.service(config).inspector(
      r === undefined
        ? { method: "REQMOD", reqHdr, path: exchange.path }
        : { method: "RESPMOD", reqHdr, resHdr: formatHttpResponseHead(r.status, r.reason ?? "", pairs(r.headers)), path: exchange.path },
    );
    return { settings: policy.scan, inspector };
  }

  /** {@link Inspection.scan} bound to one exchange under `policy`. */
  forExchange(policy: Policy, exchange: BodyExchange): BodyScanner {
    return (side, contentType, response) => this.scan(policy, side, exchange, contentType, response);
  }

  /** The service of this configuration (made on first use; pools are per server and connection settings). */
  service(config: IcapServiceConfig): IcapService {
    const key = JSON.stringify(config);
    let s = this.services.get(key);
    if (s === undefined) {
      const poolKey = `${config.url.authority}|${config.connectTimeoutMs}|${config.maxConnections}`;
      let pool = this.pools.get(poolKey);
      if (pool === undefined) {
        pool = new IcapPool({ host: config.url.host, port: config.url.port, maxConnections: config.maxConnections, connectTimeoutMs: config.connectTimeoutMs, idleTimeoutMs: IDLE_MS });
        this.pools.set(poolKey, pool);
      }
      s = new IcapService(config, pool, this.counters, this.logger);
      this.services.set(key, s);
    }
    return s;
  }

  /** ICAP connections open now (tests, metrics). */
  get openConnections(): number {
    let n = 0;
    for (const p of this.pools.values()) n += p.size;
    return n;
  }

  /** Closes every pool (server shutdown). */
  close(): void {
    for (const p of this.pools.values()) p.close();
    this.pools.clear();
    this.services.clear();
  }
}
