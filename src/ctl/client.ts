/**
 * The connection setup shared by every `kmi ctl` command file: the server URL, the bearer
 * token and the CA file, from flags or environment, turned into a connect-node gRPC
 * transport over TLS (common/http2-client.ts). The Auditserver's commands reuse
 * `connectionFlags` and `createTransport` with their own URL flag.
 *
 * A URL flag takes one URL or every replica's, comma-separated: calls go to the first and move
 * to the next only when they failed before the server acted (src/clients/failover-transport.ts:
 * the connection could not be made, the replica shed the call, or a read got UNAVAILABLE).
 */
import { readFileSync } from "node:fs";
import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import type { DescService } from "@bufbuild/protobuf";
import { Endpoints } from "../clients/endpoints.js";
import { createFailoverTransport } from "../clients/failover-transport.js";
import { createGrpcClientTransport } from "../common/http2-client.js";
import { urlList } from "../common/urls.js";
import type { FlagSpecs } from "./flags.js";
import type { Args } from "./flags.js";
import { UsageError } from "./output.js";
import { bearerAuthorization } from "../common/bearer.js";

/** Default KDC address (what `kmi kdc` listens on by default). */
export const DEFAULT_KDC_URL = "https://127.0.0.1:7443";

/** The flags every command that talks to the KDC accepts. */
export const kdcConnectionFlags: FlagSpecs = {
  kdc: { type: "string", value: "URL[,URL...]", help: `KDC address, or every replica's, comma-separated (default ${DEFAULT_KDC_URL})`, env: "KMI_CTL_KDC" },
  token: { type: "string", value: "TOKEN", help: "bearer token kmi_... (prefer --token-file: argv is visible to other users)", env: "KMI_CTL_TOKEN" },
  "token-file": { type: "string", value: "FILE", help: "file holding the bearer token", env: "KMI_CTL_TOKEN_FILE" },
  "ca-file": { type: "string", value: "FILE", help: "CA certificate(s) that sign the server's TLS certificate, PEM (the KDC's <data-dir>/infra-ca.pem)", env: "KMI_CTL_CA_FILE" },
  timeout: { type: "int", value: "SECONDS", help: "give up on a call after this many seconds (default 30)", env: "KMI_CTL_TIMEOUT" },
};

/** Connection settings of one server. */
export interface ConnectionSettings {
  /** The first URL given. */
  url: string;
  /** Every URL given, in order: the replicas a call may go to. */
  urls: string[];
  /** The kmi service at `url` ("kdc" or "audit", from the URL flag), checked in its certificate. */
  service: string | undefined;
  token: string | undefined;
  caPem: string | undefined;
  timeoutMs: number;
}

/** Reads the connection settings of `urlFlag` (e.g. "kdc") from parsed flags. */
export function connectionSettings(args: Args, urlFlag: string, defaultUrl: string): ConnectionSettings {
  const urls = urlList(args.str(urlFlag) ?? defaultUrl);
  if (urls.length === 0) throw new UsageError(`--${urlFlag}: give a URL, e.g. ${defaultUrl} (several replicas: comma-separated)`);
  for (const url of urls) {
    let parsedUrl: URL;
    try {
      parsedUrl = new URL(url);
    } catch {
      throw new UsageError(`--${urlFlag}: "${url}" is not a URL; use e.g. ${defaultUrl}`);
    }
    if (parsedUrl.protocol !== "https:") throw new UsageError(`--${urlFlag}: use an https:// URL (kmi servers speak TLS only)`);
  }
  let token = args.str("token");
  const tokenFile = args.str("token-file");
  if (token === undefined && tokenFile !== undefined) {
    try {
      token = readFileSync(tokenFile, "utf8").trim();
    } catch (err) {
      throw new UsageError(`--token-file: cannot read ${tokenFile} (${(err as NodeJS.ErrnoException).code ?? "error"}); check the path`);
    }
  }
  const caFile = args.str("ca-file");
  let caPem: string | undefined;
  if (caFile !== undefined) {
    try {
      caPem = readFileSync(caFile, "utf8");
    } catch (err) {
      throw new UsageError(`--ca-file: cannot read ${caFile} (${(err as NodeJS.ErrnoException).code ?? "error"}); check the path`);
    }
    if (!caPem.includes("-----BEGIN CERTIFICATE-----")) throw new UsageError(`--ca-file: ${caFile} holds no PEM certificate`);
  }
  const service = urlFlag === "kdc" || urlFlag === "audit" ? urlFlag : undefined;
  return { url: urls[0]!, urls, service, token, caPem, timeoutMs: args.int("timeout", 30) * 1000 };
}

/**
 * A gRPC-over-TLS transport that sends the bearer token on every call; over several URLs, one
 * that fails over between them (see above).
 */
export function createTransport(s: ConnectionSettings): Transport {
  const auth: Interceptor = (next) => async (req) => {
    if (s.token !== undefined) req.header.set("authorization", bearerAuthorization(s.token));
    return next(req);
  };
  const at = (url: string) =>
    createGrpcClientTransport({
      baseUrl: url,
      interceptors: [auth],
      defaultTimeoutMs: s.timeoutMs,
      tls: s.caPem !== undefined ? { ca: s.caPem } : {},
      ...(s.service !== undefined ? { expectedService: s.service } : {}),
    });
  if (s.urls.length <= 1) return at(s.url).transport;
  return createFailoverTransport(new Endpoints(s.urls), at).transport;
}

/** Lazily-made clients of one server: the transport is built on first use. */
export class Clients {
  private transport: Transport | undefined;
  private readonly cache = new Map<DescService, unknown>();

  constructor(private readonly settings: () => ConnectionSettings) {}

  /** A client of `service`. */
  get<S extends DescService>(service: S): Client<S> {
    this.transport ??= createTransport(this.settings());
    let c = this.cache.get(service) as Client<S> | undefined;
    if (c === undefined) {
      c = createClient(service, this.transport);
      this.cache.set(service, c);
    }
    return c;
  }
}
