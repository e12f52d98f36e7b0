/**
 * The Prometheus registry of every program (prom-client, one registry per server, never the
 * global one), the per-RPC metrics both server stacks record, and an optional `/metrics` HTTP
 * endpoint.
 *
 * RPC metric names follow go-grpc-prometheus, which dashboards already know:
 * `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
 * `grpc_server_handling_seconds`. Process metrics are prom-client's defaults
 * (`process_cpu_seconds_total` a counter, `process_resident_memory_bytes`,
 * `nodejs_eventloop_lag_seconds` and its percentiles: the proxy's saturation signal, ...).
 */
import { createServer } from "node:http";
import type { AddressInfo, Server } from "node:net";
import { Code } from "@connectrpc/connect";
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import { formatListenAddress, listenUnixSocket, removeUnixSocket, type ListenAddress } from "./listen.js";
import type { Logger } from "./logger.js";
import { VERSION } from "./version.js";

export type { Counter, Gauge, Histogram } from "prom-client";

/** Default latency buckets, in seconds: 0.1 ms to 10 s. */
export const DEFAULT_LATENCY_BUCKETS: readonly number[] = [
  0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];

type AnyMetric = Counter | Gauge | Histogram;

/** prom-client's `collect` option (called with the metric as `this`) for `fn`, or nothing. */
function collector<M>(fn: ((m: M) => void) | undefined): { collect?: (this: M) => void } {
  return fn === undefined
    ? {}
    : {
        collect(this: M) {
          fn(this);
        },
      };
}

/** A set of metrics rendered together: a prom-client `Registry` of its own. */
export class MetricsRegistry {
  /** The prom-client registry behind it. */
  readonly prom = new Registry();

  /** The metric already registered under `name`, if its type and labels are the same; refuses another. */
  private existing<M extends AnyMetric>(name: string, type: new (...args: never[]) => M, labelNames: readonly string[]): M | undefined {
    const m = this.prom.getSingleMetric(name);
    if (m === undefined) return undefined;
    // prom-client keeps a metric's label names on the instance (not in its typings).
    const registered = (m as unknown as { labelNames?: string[] }).labelNames ?? [];
    if (!(m instanceof type) || registered.join() !== labelNames.join()) {
      throw new Error(`metric ${name} is registered already with another type or labels`);
    }
    return m;
  }

  /** Registers (or returns the existing) counter; `collect` runs before each render. */
  counter(name: string, help: string, labelNames: readonly string[] = [], collect?: (c: Counter) => void): Counter {
    return this.existing(name, Counter, labelNames) ?? new Counter({ name, help, labelNames: [...labelNames], registers: [this.prom], ...collector(collect) });
  }

  /** Registers (or returns the existing) gauge; `collect` runs before each render. */
  gauge(name: string, help: string, labelNames: readonly string[] = [], collect?: (g: Gauge) => void): Gauge {
    return this.existing(name, Gauge, labelNames) ?? new Gauge({ name, help, labelNames: [...labelNames], registers: [this.prom], ...collector(collect) });
  }

  /** Registers (or returns the existing) histogram. */
  histogram(name: string, help: string, labelNames: readonly string[] = [], buckets: readonly number[] = DEFAULT_LATENCY_BUCKETS): Histogram {
    return this.existing(name, Histogram, labelNames) ?? new Histogram({ name, help, labelNames: [...labelNames], buckets: [...buckets], registers: [this.prom] });
  }

  /** The whole registry in the Prometheus text exposition format. */
  render(): Promise<string> {
    return this.prom.metrics();
  }

  /** The content type of {@link render}'s text. */
  get contentType(): string {
    return this.prom.contentType;
  }
}

/** Creates a registry with prom-client's process and Node.js metrics and `kmi_build_info`. */
export function createMetricsRegistry(): MetricsRegistry {
  const r = new MetricsRegistry();
  r.gauge("kmi_build_info", "kmi version; always 1.", ["version"]).labels(VERSION).set(1);
  collectDefaultMetrics({ register: r.prom });
  // Kept under its earlier name for existing dashboards (prom-client's is nodejs_heap_size_used_bytes).
  r.gauge("nodejs_heap_used_bytes", "V8 heap used, in bytes.", [], (g) => g.set(process.memoryUsage().heapUsed));
  return r;
}

/** gRPC code names as go-grpc-prometheus labels them (index = code). */
const GRPC_CODE_LABELS: readonly string[] = [
  "OK",
  "Canceled",
  "Unknown",
  "InvalidArgument",
  "DeadlineExceeded",
  "NotFound",
  "AlreadyExists",
  "PermissionDenied",
  "ResourceExhausted",
  "FailedPrecondition",
  "Aborted",
  "OutOfRange",
  "Unimplemented",
  "Internal",
  "Unavailable",
  "DataLoss",
  "Unauthenticated",
];

/** Recorders of one method, bound once so that a call costs a few number updates. */
export interface MethodMetrics {
  /** A call started. */
  started(): void;
  /** A call ended with `code` (0 = OK) after `seconds`. */
  handled(code: Code | 0, seconds: number): void;
}

/** The per-RPC metrics of a server. */
export interface RpcMetrics {
  /** The recorders of one method; `type` is unary, server_stream, client_stream or bidi_stream. */
  method(service: string, method: string, type: string): MethodMetrics;
}

/** One series of a counter that the hot path counts in a plain number, read at scrape time. */
interface CountedSeries {
  readonly labels: Readonly<Record<string, string>>;
  n: number;
}

/** A counter whose series are plain numbers on the hot path, handed to prom-client when scraped. */
function scrapedCounter(registry: MetricsRegistry, name: string, help: string, labelNames: readonly string[]): CountedSeries[] {
  const series: CountedSeries[] = [];
  registry.counter(name, help, labelNames, (c) => {
    c.reset();
    for (const s of series) c.inc(s.labels, s.n);
  });
  return series;
}

/** The per-RPC series of a registry: one set however many servers record into it. */
const rpcSeries = new WeakMap<MetricsRegistry, { started: CountedSeries[]; handled: CountedSeries[] }>();

/**
 * Registers the per-RPC metrics on `registry`. Why the two counters count in plain numbers
 * that prom-client reads at scrape time: a prom-client `inc()` validates and hashes the labels
 * on every call. Measured per call (started + handled) on the 2-core dev machine: ~5.4 us with
 * every recorder in prom-client, ~1.3 us with these two counters scraped (the histogram and
 * the gauge still recorded directly), against ~40-50 us of server CPU per agent call.
 */
export function createRpcMetrics(registry: MetricsRegistry): RpcMetrics {
  const labels = ["grpc_type", "grpc_service", "grpc_method"];
  let counted = rpcSeries.get(registry);
  if (counted === undefined) {
    counted = {
      started: scrapedCounter(registry, "grpc_server_started_total", "RPCs started on the server.", labels),
      handled: scrapedCounter(registry, "grpc_server_handled_total", "RPCs completed on the server, by code.", [...labels, "grpc_code"]),
    };
    rpcSeries.set(registry, counted);
  }
  const { started, handled } = counted;
  const seconds = registry.histogram("grpc_server_handling_seconds", "Time from the start of an RPC to its end, in seconds.", labels);
  const inFlight = registry.gauge("grpc_server_in_flight", "RPCs in progress.", []);
  const cache = new Map<string, MethodMetrics>();
  return {
    method(service, method, type) {
      const key = `${type}/${service}/${method}`;
      const hit = cache.get(key);
      if (hit !== undefined) return hit;
      const s: CountedSeries = { labels: { grpc_type: type, grpc_service: service, grpc_method: method }, n: 0 };
      started.push(s);
      const h = seconds.labels(type, service, method);
      const byCode: (CountedSeries | undefined)[] = [];
      const m: MethodMetrics = {
        started() {
          s.n++;
          inFlight.inc();
        },
        handled(code, secs) {
          inFlight.dec();
          let c = byCode[code];
          if (c === undefined) {
            c = { labels: { ...s.labels, grpc_code: GRPC_CODE_LABELS[code] ?? String(code) }, n: 0 };
            handled.push(c);
            byCode[code] = c;
          }
          c.n++;
          h.observe(secs);
        },
      };
      cache.set(key, m);
      return m;
    },
  };
}

/** A running `/metrics` endpoint. */
export interface MetricsServer {
  /** The address bound (`host:port` or `unix:/path`). */
  readonly address: string;
  /** Stops listening and closes connections. */
  close(): Promise<void>;
}

/**
 * Serves `GET /metrics` over plain HTTP on `listen`. Bind it to loopback or a private network:
 * metrics carry no secrets, but RPC counts per method are still operational information.
 */
export async function startMetricsServer(registry: MetricsRegistry, listen: ListenAddress, logger: Logger): Promise<MetricsServer> {
  const http = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    if (path !== "/metrics" || (req.method !== "GET" && req.method !== "HEAD")) {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found; try GET /metrics\n");
      return;
    }
    registry.render().then(
      (body) => {
        res.writeHead(200, { "content-type": registry.contentType });
        res.end(req.method === "HEAD" ? undefined : body);
      },
      (err: unknown) => {
        logger.warn("metrics: a collector failed", { err });
        res.writeHead(500, { "content-type": "text/plain" }).end("a metrics collector failed; see the log\n");
      },
    );
  });
  http.keepAliveTimeout = 5000;
  let address: string;
  let unixServer: Server | undefined;
  if (listen.kind === "unix") {
    unixServer = await listenUnixSocket(listen.path, { mode: 0o600 }, (s) => http.emit("connection", s));
    address = formatListenAddress(listen);
  } else {
    await new Promise<void>((resolve, reject) => {
      http.once("error", reject);
      http.listen(listen.port, listen.host, () => {
        http.off("error", reject);
        resolve();
      });
    });
    const a = http.address() as AddressInfo;
    address = formatListenAddress({ kind: "tcp", host: listen.host, port: a.port });
  }
  logger.info("metrics endpoint listening", { address, path: "/metrics" });
  return {
    address,
    async close() {
      if (unixServer !== undefined) {
        const u = unixServer;
        await new Promise<void>((resolve) => {
          u.close(() => resolve());
          http.closeAllConnections();
        });
        if (listen.kind === "unix") await removeUnixSocket(listen.path);
      } else {
        await new Promise<void>((resolve) => {
          http.close(() => resolve());
          http.closeAllConnections();
        });
      }
    },
  };
}
