/**
 * TLS material, server TLS options for the three mutual-TLS modes, and the identity of a
 * client taken from its certificate.
 */
import { X509Certificate } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { PeerCertificate, TLSSocket, TlsOptions } from "node:tls";
import { ServerCredentials, type KeyCertPair } from "@grpc/grpc-js";

/**
 * How a TCP listener treats client certificates:
 * - `none`: no client certificate is asked for.
 * - `optional`: one is asked for and verified against the CA; a client without one, or with one
 *   that does not verify, still connects, and each call decides (see {@link PeerIdentity.authorized}).
 * - `required`: the handshake refuses a client without a certificate that verifies against the CA.
 */
export type MtlsMode = "none" | "optional" | "required";

/** The modes accepted by {@link parseMtlsMode}. */
export const MTLS_MODES: readonly MtlsMode[] = ["none", "optional", "required"];

/** Parses a mutual-TLS mode name. */
export function parseMtlsMode(value: string): MtlsMode {
  if ((MTLS_MODES as readonly string[]).includes(value)) return value as MtlsMode;
  throw new Error(`mutual TLS mode "${value}" is not one of ${MTLS_MODES.join(", ")}`);
}

/** Paths of a server's PEM files. */
export interface TlsFiles {
  /** Certificate chain, PEM (leaf first). */
  certFile: string;
  /** Private key, PEM. */
  keyFile: string;
  /** CA certificates that client certificates must chain to, PEM; needed for mutual TLS. */
  caFile?: string;
}

/** A server's TLS material, in memory. */
export interface TlsMaterial {
  /** Certificate chain, PEM. */
  cert: Buffer;
  /** Private key, PEM. */
  key: Buffer;
  /** Client CA certificates, PEM. */
  ca?: Buffer;
}

async function readPem(path: string, what: string, marker: RegExp): Promise<Buffer> {
  let data: Buffer;
  try {
    data = await readFile(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? String(err);
    throw new Error(`${what} ${path}: cannot read (${code}); check the path and its permissions`);
  }
  if (!marker.test(data.toString("latin1"))) {
    throw new Error(`${what} ${path}: no PEM block found; give a PEM file`);
  }
  return data;
}

/** Reads and sanity-checks PEM files; errors name the file and what is wrong with it. */
export async function loadTlsMaterial(files: TlsFiles): Promise<TlsMaterial> {
  const cert = await readPem(files.certFile, "TLS certificate", /-----BEGIN CERTIFICATE-----/);
  const key = await readPem(files.keyFile, "TLS key", /-----BEGIN ([A-Z]+ )?PRIVATE KEY-----/);
  const ca = files.caFile !== undefined ? await readPem(files.caFile, "client CA", /-----BEGIN CERTIFICATE-----/) : undefined;
  try {
    new X509Certificate(cert);
  } catch {
    throw new Error(`TLS certificate ${files.certFile}: does not parse as an X.509 certificate`);
  }
  const material: TlsMaterial = { cert, key };
  if (ca !== undefined) material.ca = ca;
  return material;
}

function requireCa(material: TlsMaterial, mode: MtlsMode): Buffer | undefined {
  if (mode !== "none" && material.ca === undefined) {
    throw new Error(`mutual TLS mode "${mode}" needs a client CA file; set the TLS CA option or use mode "none"`);
  }
  return mode === "none" ? undefined : material.ca;
}

/**
 * Node TLS options for a server in the given mutual-TLS mode (TLS 1.2 minimum).
 * Why `rejectUnauthorized: false` in `optional` mode: the handshake must let a client without a
 * (valid) certificate through so that unauthenticated methods (health, a trust bundle) work;
 * OpenSSL still verifies any certificate sent, and `socket.authorized` records the verdict that
 * each call's authorization reads.
 */
export function serverTlsOptions(material: TlsMaterial, mode: MtlsMode): TlsOptions {
  const ca = requireCa(material, mode);
  const opts: TlsOptions = {
    cert: material.cert,
    key: material.key,
    minVersion: "TLSv1.2",
    requestCert: mode !== "none",
    rejectUnauthorized: mode === "required",
  };
  if (ca !== undefined) opts.ca = ca;
  return opts;
}

/** grpc-js credentials whose TLS options are exactly {@link serverTlsOptions}. */
class KmiServerCredentials extends ServerCredentials {
  constructor(options: TlsOptions) {
    const { cert, key, ca, ...constructorOptions } = options;
    const context: { cert: unknown; key: unknown; ca?: unknown } = { cert, key };
    if (ca !== undefined) context.ca = ca;
    super(constructorOptions, context as ConstructorParameters<typeof ServerCredentials>[1]);
  }
  override _equals(other: ServerCredentials): boolean {
    return other === this;
  }
}

/** grpc-js server credentials for the given mutual-TLS mode. */
export function grpcServerCredentials(material: TlsMaterial, mode: MtlsMode): ServerCredentials {
  if (mode === "required") {
    // grpc-js's own path for the common case: requestCert, rejectUnauthorized (Node's default).
    const pair: KeyCertPair = { private_key: material.key, cert_chain: material.cert };
    return ServerCredentials.createSsl(requireCa(material, mode) ?? null, [pair], true);
  }
  return new KmiServerCredentials(serverTlsOptions(material, mode));
}

/**
 * The identity a client proved with its TLS certificate.
 * `machineId` and `serviceName` are set only when the certificate verified against the CA
 * (`authorized`), so code that reads them cannot trust an unverified certificate by mistake.
 */
export interface PeerIdentity {
  /** True when the certificate chains to the configured client CA. */
  readonly authorized: boolean;
  /** Why it did not verify (OpenSSL's reason), when it did not. */
  readonly authorizationError?: string;
  /** All URI SANs of the certificate. */
  readonly uris: readonly string[];
  /** `<id>` of a `kmi://machine/<id>` URI SAN (verified certificates only). */
  readonly machineId?: string;
  /** `<name>` of a `kmi://service/<name>` URI SAN (verified certificates only). */
  readonly serviceName?: string;
  /** SHA-256 of the DER certificate, lowercase hex without separators. */
  readonly fingerprint256: string;
  /** The DER certificate. */
  readonly der: Uint8Array;
  /** Subject distinguished name, one RDN per line as Node prints it. */
  readonly subject: string;
}

/** Splits Node's `subjectAltName` text ("DNS:a, URI:kmi://x, URI:\"quoted, value\"") into entries. */
export function parseSubjectAltNames(text: string | undefined): { type: string; value: string }[] {
  const out: { type: string; value: string }[] = [];
  if (text === undefined || text === "") return out;
  let i = 0;
  while (i < text.length) {
    const colon = text.indexOf(":", i);
    if (colon < 0) break;
    const type = text.slice(i, colon).trim();
    let j = colon + 1;
    let value: string;
    if (text[j] === '"') {
      // Node quotes values with special characters as JSON strings.
      let k = j + 1;
      while (k < text.length && text[k] !== '"') k += text[k] === "\\" ? 2 : 1;
      try {
        value = JSON.parse(text.slice(j, k + 1)) as string;
      } catch {
        // Unparsable: trust nothing of it (no raw text can pass for a kmi:// URI or a host name).
        value = "";
      }
      j = k + 1;
      const comma = text.indexOf(",", j);
      i = comma < 0 ? text.length : comma + 1;
    } else {
      const comma = text.indexOf(", ", j);
      value = comma < 0 ? text.slice(j) : text.slice(j, comma);
      i = comma < 0 ? text.length : comma + 2;
    }
    out.push({ type, value });
  }
  return out;
}

const MACHINE_PREFIX = "kmi://machine/";
const SERVICE_PREFIX = "kmi://service/";

/** Builds a {@link PeerIdentity} from a DER certificate and the TLS layer's verdict. */
export function peerIdentityFromDer(der: Uint8Array, authorized: boolean, authorizationError?: string): PeerIdentity {
  const x509 = new X509Certificate(der);
  const uris = parseSubjectAltNames(x509.subjectAltName)
    .filter((e) => e.type === "URI")
    .map((e) => e.value);
  let machineId: string | undefined;
  let serviceName: string | undefined;
  if (authorized) {
    for (const uri of uris) {
      if (machineId === undefined && uri.startsWith(MACHINE_PREFIX) && uri.length > MACHINE_PREFIX.length) {
        machineId = uri.slice(MACHINE_PREFIX.length);
      } else if (serviceName === undefined && uri.startsWith(SERVICE_PREFIX) && uri.length > SERVICE_PREFIX.length) {
        serviceName = uri.slice(SERVICE_PREFIX.length);
      }
    }
  }
  const identity: {
    -readonly [K in keyof PeerIdentity]: PeerIdentity[K];
  } = {
    authorized,
    uris,
    fingerprint256: x509.fingerprint256.replace(/:/g, "").toLowerCase(),
    der,
    subject: x509.subject,
  };
  if (authorizationError !== undefined) identity.authorizationError = authorizationError;
  if (machineId !== undefined) identity.machineId = machineId;
  if (serviceName !== undefined) identity.serviceName = serviceName;
  return Object.freeze(identity);
}

/** Builds a {@link PeerIdentity} from Node's PeerCertificate (grpc-js auth context), if it has one. */
export function peerIdentityFromPeerCertificate(cert: PeerCertificate | undefined, authorized: boolean): PeerIdentity | undefined {
  if (cert === undefined || cert.raw === undefined || cert.raw.length === 0) return undefined;
  return peerIdentityFromDer(new Uint8Array(cert.raw), authorized);
}

const identityByConnection = new WeakMap<object, PeerIdentity | null>();

/**
 * The client identity of a TLS connection, computed once per connection (`cacheKey`, default the
 * socket: pass the HTTP/2 session when the socket is the session's proxy); undefined when the
 * client sent no certificate.
 */
export function peerIdentityFromSocket(socket: TLSSocket, cacheKey: object = socket): PeerIdentity | undefined {
  const cached = identityByConnection.get(cacheKey);
  if (cached !== undefined) return cached ?? undefined;
  const cert = socket.getPeerCertificate(false);
  let identity: PeerIdentity | undefined;
  if (cert !== null && cert.raw !== undefined && cert.raw.length > 0) {
    const err = socket.authorizationError;
    identity = peerIdentityFromDer(
      new Uint8Array(cert.raw),
      socket.authorized,
      err === null || err === undefined ? undefined : String(err),
    );
  }
  identityByConnection.set(cacheKey, identity ?? null);
  return identity;
}
