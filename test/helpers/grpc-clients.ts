/**
 * A `@grpc/grpc-js` client built from `proto/` alone (with @grpc/proto-loader), as any other
 * gRPC user would build one: no generated TypeScript, no kmi code.
 */
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import * as loader from "@grpc/proto-loader";

/** The repository root. */
export const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

const definition = loader.loadSync(
  ["kmi/kdc/v1/admin.proto", "kmi/agent/v1/agent.proto", "grpc/health/v1/health.proto"],
  { includeDirs: [join(REPO_ROOT, "proto"), join(REPO_ROOT, "third_party", "proto")], keepCase: true, defaults: true, enums: String },
);

// eslint-disable-next-line @typescript-eslint/no-explicit-any
const pkg = grpc.loadPackageDefinition(definition) as any;

type Ctor = new (target: string, creds: grpc.ChannelCredentials, options?: grpc.ChannelOptions) => grpc.Client;

/** Client constructors by service. */
export const clients = {
  health: pkg.grpc.health.v1.Health as Ctor,
  kdcAdmin: pkg.kmi.kdc.v1.KdcAdminService as Ctor,
  agent: pkg.kmi.agent.v1.KeyAgentService as Ctor,
};

/** TLS credentials trusting `caFile`, optionally with a client certificate. */
export function tlsCredentials(caFile: string, client?: { cert: string; key: string }): grpc.ChannelCredentials {
  const ca = readFileSync(caFile);
  if (client === undefined) return grpc.credentials.createSsl(ca);
  return grpc.credentials.createSsl(ca, readFileSync(client.key), readFileSync(client.cert));
}

/** Insecure credentials (Unix sockets). */
export function insecure(): grpc.ChannelCredentials {
  return grpc.credentials.createInsecure();
}

/** Result of {@link unary}: the response, or the error's code and message. */
export type UnaryResult = { ok: true; value: Record<string, unknown> } | { ok: false; code: number; details: string };

/** Calls a unary method and resolves with its outcome (never rejects). */
export function unary(
  client: grpc.Client,
  method: string,
  request: Record<string, unknown>,
  metadata: Record<string, string> = {},
  timeoutMs = 10_000,
): Promise<UnaryResult> {
  const md = new grpc.Metadata();
  for (const [k, v] of Object.entries(metadata)) md.set(k, v);
  return new Promise((resolve) => {
    const fn = (client as unknown as Record<string, Function>)[method];
    if (fn === undefined) throw new Error(`no method ${method}`);
    fn.call(client, request, md, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, value: Record<string, unknown>) => {
      if (err) resolve({ ok: false, code: err.code, details: err.details });
      else resolve({ ok: true, value });
    });
  });
}

/** Target string for a Unix socket path. */
export function unixTarget(path: string): string {
  return `unix:${path}`;
}
