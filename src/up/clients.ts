/**
 * The calls `kmi up` makes itself: the KDC's and the Auditserver's admin APIs (Connect protocol
 * over HTTPS/1.1, trusting the infrastructure CA, with the operator token), the agent's
 * GetStatus over its Unix socket (grpc-js, with the workload header the agent requires), and a
 * Prometheus scrape over a metrics socket. Generated code and common/ only: `kmi up` talks to
 * the other programs through their public APIs, never their modules.
 */
import { Agent as HttpsAgent } from "node:https";
import { request as httpRequest } from "node:http";
import { connect } from "node:net";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { Client as GrpcClient, Metadata, credentials, type ServiceError } from "@grpc/grpc-js";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import { GetStatusRequestSchema, GetStatusResponseSchema, type GetStatusResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { AuditAdminService } from "../gen/kmi/audit/v1/admin_pb.js";
import { KdcAdminService } from "../gen/kmi/kdc/v1/admin_pb.js";
import { KdcService } from "../gen/kmi/kdc/v1/kdc_pb.js";

/** The metadata header every agent call must carry (the agent refuses calls without it). */
const AGENT_WORKLOAD_HEADER = "kmi-agent-workload";

/** Clients of one TLS server (KDC or Auditserver). */
export interface ServerClients {
  readonly kdcAdmin: Client<typeof KdcAdminService>;
  readonly kdc: Client<typeof KdcService>;
  readonly auditAdmin: Client<typeof AuditAdminService>;
  readonly health: Client<typeof Health>;
  /** Releases pooled connections. */
  close(): void;
}

/** Options of {@link serverClients}. */
export interface ServerClientOptions {
  /** `https://host:port`. */
  readonly url: string;
  /** The infrastructure CA, PEM. */
  readonly caPem: string;
  /** Reads the operator token (called per call, so a token file written later is picked up). */
  readonly token?: () => string | undefined;
  /** Deadline of each call, ms; default 10 s. */
  readonly timeoutMs?: number;
}

/** Connect-protocol clients of a kmi TLS server. */
export function serverClients(o: ServerClientOptions): ServerClients {
  const agent = new HttpsAgent({ keepAlive: true, maxSockets: 4, ca: o.caPem });
  const auth: Interceptor = (next) => async (req) => {
    const token = o.token?.();
    if (token !== undefined) req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const transport = createConnectTransport({
    baseUrl: o.url,
    httpVersion: "1.1",
    interceptors: [auth],
    defaultTimeoutMs: o.timeoutMs ?? 10_000,
    nodeOptions: { agent, ca: o.caPem },
  });
  return {
    kdcAdmin: createClient(KdcAdminService, transport),
    kdc: createClient(KdcService, transport),
    auditAdmin: createClient(AuditAdminService, transport),
    health: createClient(Health, transport),
    close: () => agent.destroy(),
  };
}

/** True when the server's gRPC health check answers SERVING. */
export async function isServing(c: ServerClients): Promise<boolean> {
  const r = await c.health.check({ service: "" });
  return r.status === HealthCheckResponse_ServingStatus.SERVING;
}

/** A client of the agent's socket for GetStatus. */
export class AgentStatusClient {
  private readonly client: GrpcClient;

  constructor(socketPath: string) {
    this.client = new GrpcClient(`unix:${socketPath}`, credentials.createInsecure());
  }

  /** Calls GetStatus; rejects with the gRPC error. */
  getStatus(timeoutMs = 5000): Promise<GetStatusResponse> {
    const md = new Metadata();
    md.set(AGENT_WORKLOAD_HEADER, "true");
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(
        "/kmi.agent.v1.KeyAgentService/GetStatus",
        (m: ReturnType<typeof create<typeof GetStatusRequestSchema>>) => Buffer.from(toBinary(GetStatusRequestSchema, m)),
        (b: Buffer) => fromBinary(GetStatusResponseSchema, b),
        create(GetStatusRequestSchema),
        md,
        { deadline: Date.now() + timeoutMs },
        (err: ServiceError | null, res?: GetStatusResponse) => {
          if (err !== null || res === undefined) reject(err ?? new Error("GetStatus: empty response"));
          else resolve(res);
        },
      );
    });
  }

  /** Closes the channel. */
  close(): void {
    this.client.close();
  }
}

/** Fetches `/metrics` from a Prometheus endpoint on a Unix socket; resolves with the text. */
export function scrapeMetrics(socketPath: string, timeoutMs = 3000): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ socketPath, path: "/metrics", method: "GET", timeout: timeoutMs, agent: false }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (body += d));
      res.on("end", () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`metrics: HTTP ${res.statusCode}`))));
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error("metrics: timed out")));
    req.on("error", reject);
    req.end();
  });
}

/** The value of a metric without labels in Prometheus text, or undefined. */
export function metricValue(text: string, name: string): number | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith(name + " ") || line.startsWith(name + "{} ")) {
      const v = Number(line.slice(line.lastIndexOf(" ") + 1));
      if (Number.isFinite(v)) return v;
    }
  }
  return undefined;
}

/** True when a TCP port accepts a connection (within `timeoutMs`). */
export function tcpOpen(host: string, port: number, timeoutMs = 2000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host, port });
    s.setTimeout(timeoutMs, () => {
      s.destroy();
      resolve(false);
    });
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}
