/**
 * A minimal Prometheus registry (counter, gauge, histogram; text exposition format 0.0.4),
 * the per-RPC metrics both server stacks record, and an optional `/metrics` HTTP endpoint.
 *
 * RPC metric names follow go-grpc-prometheus, which dashboards already know:
 * `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
 * `grpc_server_handling_seconds`.
 */
import { createServer } from "node:http";
import type { AddressInfo, Server } from "node:net";
import { Code } from "@connectrpc/connect";
import { formatListenAddress, listenUnixSocket, removeUnixSocket, type ListenAddress } from "./listen.js";
import type { Logger } from "./logger.js";
import { VERSION } from "./version.js";

function escapeLabel(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

function escapeHelp(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");
}

function formatNumber(v: number): string {
  if (Number.isNaN(v)) return "NaN";
  if (v === Infinity) return "+Inf";
  if (v === -Infinity) return "-Inf";
  return String(v);
}

function labelText(names: readonly string[], values: readonly string[], extra?: [string, string]): string {
  const parts = names.map((n, i) => `${n}="${escapeLabel(values[i] ?? "")}"`);
  if (extra !== undefined) parts.push(`${extra[0]}="${escapeLabel(extra[1])}"`);
  return parts.length === 0 ? "" : `{${parts.join(",")}}`;
}

const NAME_RE = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_RE = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

abstract class Metric<Child> {
  protected readonly children = new Map<string, { values: readonly string[]; child: Child }>();

  constructor(
    readonly name: string,
    readonly help: string,
    readonly labelNames: readonly string[],
    private readonly collectFn?: () => void,
  ) {
    if (!NAME_RE.test(name)) throw new Error(`metric name "${name}" is not valid`);
    for (const l of labelNames) if (!LABEL_RE.test(l) || l === "le") throw new Error(`label name "${l}" of ${name} is not valid`);
  }

  /** The child for these label values (created on first use); keep it to skip the lookup. */
  labels(...values: string[]): Child {
    if (values.length !== this.labelNames.length) {
      throw new Error(`metric ${this.name} takes ${this.labelNames.length} label values, got ${values.length}`);
    }
    const key = values.join("\u0000");
    let entry = this.children.get(key);
    if (entry === undefined) {
      entry = { values: [...values], child: this.newChild() };
      this.children.set(key, entry);
    }
    return entry.child;
  }

  protected abstract newChild(): Child;
  protected abstract get type(): string;
  protected abstract renderChild(values: readonly string[], child: Child, out: string[]): void;

  /** Appends this metric in the text format. */
  render(out: string[]): void {
    this.collectFn?.();
    out.push(`# HELP ${this.name} ${escapeHelp(this.help)}`, `# TYPE ${this.name} ${this.type}`);
    for (const { values, child } of this.children.values()) this.renderChild(values, child, out);
  }
}

/** One labelled series of a counter. */
export interface CounterChild {
  /** Adds `n` (default 1; must not be negative). */
  inc(n?: number): void;
  /** The current value. */
  readonly value: number;
}

class CounterValue implements CounterChild {
  value = 0;
  inc(n = 1): void {
    if (n < 0) throw new Error("a counter only goes up");
    this.value += n;
  }
}

/** A monotonically increasing counter. */
export class Counter extends Metric<CounterChild> {
  protected newChild(): CounterChild {
    return new CounterValue();
  }
  protected get type(): string {
    return "counter";
  }
  protected renderChild(values: readonly string[], child: CounterChild, out: string[]): void {
    out.push(`${this.name}${labelText(this.labelNames, values)} ${formatNumber(child.value)}`);
  }
  /** Adds `n` to the unlabelled series. */
  inc(n = 1): void {
    this.labels().inc(n);
  }
}

/** One labelled series of a gauge. */
export interface GaugeChild {
  /** Sets the value. */
  set(v: number): void;
  /** Adds `n` (default 1). */
  inc(n?: number): void;
  /** Subtracts `n` (default 1). */
  dec(n?: number): void;
  /** The current value. */
  readonly value: number;
}

class GaugeValue implements GaugeChild {
  value = 0;
  set(v: number): void {
    this.value = v;
  }
  inc(n = 1): void {
    this.value += n;
  }
  dec(n = 1): void {
    this.value -= n;
  }
}

/** A value that goes up and down. */
export class Gauge extends Metric<GaugeChild> {
  protected newChild(): GaugeChild {
    return new GaugeValue();
  }
  protected get type(): string {
    return "gauge";
  }
  protected renderChild(values: readonly string[], child: GaugeChild, out: string[]): void {
    out.push(`${this.name}${labelText(this.labelNames, values)} ${formatNumber(child.value)}`);
  }
  /** Sets the unlabelled series. */
  set(v: number): void {
    this.labels().set(v);
  }
}

/** One labelled series of a histogram. */
export interface HistogramChild {
  /** Records one observation. */
  observe(v: number): void;
  /** Number of observations. */
  readonly count: number;
  /** Sum of observations. */
  readonly sum: number;
}

class HistogramValue implements HistogramChild {
  count = 0;
  sum = 0;
  readonly buckets: number[];
  constructor(private readonly bounds: readonly number[]) {
    this.buckets = new Array<number>(bounds.length).fill(0);
  }
  observe(v: number): void {
    this.count++;
    this.sum += v;
    const b = this.bounds;
    for (let i = 0; i < b.length; i++) {
      if (v <= b[i]!) {
        this.buckets[i]!++;
        return;
      }
    }
  }
}

/** Default latency buckets, in seconds: 0.1 ms to 10 s. */
export const DEFAULT_LATENCY_BUCKETS: readonly number[] = [
  0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];

/** A histogram with fixed buckets (cumulative in the output, as Prometheus expects). */
export class Histogram extends Metric<HistogramChild> {
  readonly bounds: readonly number[];
  constructor(name: string, help: string, labelNames: readonly string[], buckets: readonly number[] = DEFAULT_LATENCY_BUCKETS) {
    super(name, help, labelNames);
    this.bounds = [...buckets].sort((a, b) => a - b);
  }
  protected newChild(): HistogramChild {
    return new HistogramValue(this.bounds);
  }
  protected get type(): string {
    return "histogram";
  }
  protected renderChild(values: readonly string[], child: HistogramChild, out: string[]): void {
    const c = child as HistogramValue;
    let cumulative = 0;
    for (let i = 0; i < this.bounds.length; i++) {
      cumulative += c.buckets[i]!;
      out.push(`${this.name}_bucket${labelText(this.labelNames, values, ["le", formatNumber(this.bounds[i]!)])} ${cumulative}`);
    }
    out.push(`${this.name}_bucket${labelText(this.labelNames, values, ["le", "+Inf"])} ${c.count}`);
    out.push(`${this.name}_sum${labelText(this.labelNames, values)} ${formatNumber(c.sum)}`);
    out.push(`${this.name}_count${labelText(this.labelNames, values)} ${c.count}`);
  }
  /** Records one observation on the unlabelled series. */
  observe(v: number): void {
    this.labels().observe(v);
  }
}

/** A set of metrics rendered together. */
export class MetricsRegistry {
  private readonly metrics = new Map<string, Metric<unknown>>();

  private add<M extends Metric<unknown>>(m: M): M {
    const existing = this.metrics.get(m.name);
    if (existing !== undefined) {
      if (existing.constructor !== m.constructor || existing.labelNames.join() !== m.labelNames.join()) {
        throw new Error(`metric ${m.name} is registered already with another type or labels`);
      }
      return existing as M;
    }
    this.metrics.set(m.name, m);
    return m;
  }

  /** Registers (or returns the existing) counter. */
  counter(name: string, help: string, labelNames: readonly string[] = []): Counter {
    return this.add(new Counter(name, help, labelNames));
  }
  /** Registers (or returns the existing) gauge; `collect` runs before each render. */
  gauge(name: string, help: string, labelNames: readonly string[] = [], collect?: (g: Gauge) => void): Gauge {
    const g: Gauge = new Gauge(name, help, labelNames, collect ? () => collect(g) : undefined);
    return this.add(g);
  }
  /** Registers (or returns the existing) histogram. */
  histogram(name: string, help: string, labelNames: readonly string[] = [], buckets?: readonly number[]): Histogram {
    return this.add(new Histogram(name, help, labelNames, buckets));
  }
  /** The whole registry in the Prometheus text exposition format. */
  render(): string {
    const out: string[] = [];
    for (const m of this.metrics.values()) m.render(out);
    return out.join("\n") + "\n";
  }
}

/** Creates a registry with process metrics and `kmi_build_info`. */
export function createMetricsRegistry(): MetricsRegistry {
  const r = new MetricsRegistry();
  r.gauge("kmi_build_info", "kmi version; always 1.", ["version"]).labels(VERSION).set(1);
  const startSeconds = Math.round(Date.now() / 1000 - process.uptime());
  r.gauge("process_start_time_seconds", "Start time of the process since the Unix epoch, in seconds.").set(startSeconds);
  r.gauge("process_resident_memory_bytes", "Resident memory size, in bytes.", [], (g) => g.set(process.memoryUsage.rss()));
  r.gauge("nodejs_heap_used_bytes", "V8 heap used, in bytes.", [], (g) => g.set(process.memoryUsage().heapUsed));
  r.gauge("process_cpu_seconds_total", "User and system CPU time spent, in seconds.", [], (g) => {
    const u = process.cpuUsage();
    g.set((u.user + u.system) / 1e6);
  });
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

/** Registers the per-RPC metrics on `registry`. */
export function createRpcMetrics(registry: MetricsRegistry): RpcMetrics {
  const labels = ["grpc_type", "grpc_service", "grpc_method"];
  const started = registry.counter("grpc_server_started_total", "RPCs started on the server.", labels);
  const handled = registry.counter("grpc_server_handled_total", "RPCs completed on the server, by code.", [...labels, "grpc_code"]);
  const seconds = registry.histogram("grpc_server_handling_seconds", "Time from the start of an RPC to its end, in seconds.", labels);
  const inFlight = registry.gauge("grpc_server_in_flight", "RPCs in progress.", []);
  const cache = new Map<string, MethodMetrics>();
  return {
    method(service, method, type) {
      const key = `${type}/${service}/${method}`;
      const hit = cache.get(key);
      if (hit !== undefined) return hit;
      const s = started.labels(type, service, method);
      const h = seconds.labels(type, service, method);
      const byCode: (CounterChild | undefined)[] = [];
      const inFlightAll = inFlight.labels();
      const m: MethodMetrics = {
        started() {
          s.inc();
          inFlightAll.inc();
        },
        handled(code, secs) {
          inFlightAll.dec();
          let c = byCode[code];
          if (c === undefined) {
            c = handled.labels(type, service, method, GRPC_CODE_LABELS[code] ?? String(code));
            byCode[code] = c;
          }
          c.inc();
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
    const body = registry.render();
    res.writeHead(200, { "content-type": "text/plain; version=0.0.4; charset=utf-8" });
    res.end(req.method === "HEAD" ? undefined : body);
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
