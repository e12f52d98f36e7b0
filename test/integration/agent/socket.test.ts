/**
 * KeyAgentService over the real Unix socket (the platform's grpc-js server) with a
 * @grpc/grpc-js client: issuance checked by openssl, Sign, the CA-key refusal, the metadata
 * header, and the socket's file mode as the access control (a client run as `nobody`).
 */
import { execFile, execFileSync } from "node:child_process";
import { promisify } from "node:util";
import { generateKeyPairSync, verify } from "node:crypto";
import { chmodSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createKeyAgentService } from "../../../src/agent/agent-service.js";
import { WORKLOAD_HEADER, WORKLOAD_HEADER_VALUE } from "../../../src/clients/workload-header.js";
import { GrpcServer } from "../../../src/common/grpc-server.js";
import { serviceRegistration } from "../../../src/common/rpc.js";
import { KeyAgentService, SignatureAlgorithm } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { createHarness, type Harness } from "../../fixtures/agent/harness.js";
import { AgentGrpcClient, failure } from "../../fixtures/agent/grpc-client.js";
import { intermediateSecret, makeIntermediate, makeRoot, makeSigningKey, signingSecret, type TestIntermediate, type TestRoot, type TestSigningKey } from "../../fixtures/agent/tenant-ca.js";

const DAY = 86_400_000;
const execFileAsync = promisify(execFile);
const socketClientScript = new URL("../../fixtures/agent/socket-client.mjs", import.meta.url).pathname;
const grpcModule = createRequire(import.meta.url).resolve("@grpc/grpc-js");

let dir: string;
let root: TestRoot;
let acme: TestIntermediate;
let signer: TestSigningKey;
let h: Harness;

async function serve(socketPath: string, options: { group?: string } = {}): Promise<GrpcServer> {
  const unix: { path: string; mode: 0o600 | 0o660; group?: string } = { path: socketPath, mode: options.group === undefined ? 0o600 : 0o660 };
  if (options.group !== undefined) unix.group = options.group;
  const server = GrpcServer.create({
    name: "agent-test",
    services: [serviceRegistration(KeyAgentService, createKeyAgentService(h.ctx))],
    unix,
    logger: h.logger,
    requiredMetadata: { key: WORKLOAD_HEADER, value: WORKLOAD_HEADER_VALUE },
    shutdownTimeoutMs: 500,
  });
  await server.start();
  return server;
}

/**
 * Runs the socket client as `user` (or as root when undefined) in another process (async: the
 * server lives in this one); returns its JSON verdict.
 */
async function clientAs(user: string | undefined, socketPath: string): Promise<{ ok: boolean; code?: number; details?: string }> {
  const cmd = user === undefined ? ["node", socketClientScript, socketPath, grpcModule] : ["runuser", "-u", user, "--", "node", socketClientScript, socketPath, grpcModule];
  const { stdout } = await execFileAsync(cmd[0]!, cmd.slice(1), { encoding: "utf8", timeout: 20_000 });
  return JSON.parse(stdout.trim()) as { ok: boolean; code?: number; details?: string };
}

let server: GrpcServer;
let client: AgentGrpcClient;
let socketPath: string;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "kmi-agent-sock-"));
  // The directory itself lets everyone through, so only the socket's own mode keeps others out.
  chmodSync(dir, 0o755);
  const past = Date.now() - DAY;
  root = makeRoot(past);
  acme = makeIntermediate(root, "acme", 1, { now: past });
  signer = makeSigningKey("acme", "signer");
  writeFileSync(join(dir, "root.pem"), root.pem);
  h = createHarness();
  h.holder.replaceAll([intermediateSecret(acme, DAY, h.clock.now()), signingSecret(signer, DAY, h.clock.now())]);
  socketPath = join(dir, "agent.sock");
  server = await serve(socketPath);
  client = new AgentGrpcClient(socketPath);
});

afterAll(async () => {
  client?.close();
  await server?.destroy();
  rmSync(dir, { recursive: true, force: true });
});

describe("KeyAgentService over the Unix socket", () => {
  it("the socket is mode 0600", () => {
    expect(statSync(socketPath).mode & 0o777).toBe(0o600);
  });

  it("issues a leaf that openssl verifies against the tenant chain", async () => {
    const leafKey = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
    const res = await client.unary("issueLeafCertificate", {
      tenantId: "acme",
      publicKey: new Uint8Array(leafKey.publicKey.export({ format: "der", type: "spki" })),
      dnsNames: ["origin.example.net"],
    });
    writeFileSync(join(dir, "leaf.pem"), res.certificatePem);
    writeFileSync(join(dir, "chain.pem"), res.chainPem);
    const out = execFileSync("openssl", ["verify", "-CAfile", join(dir, "root.pem"), "-untrusted", join(dir, "chain.pem"), "-purpose", "sslserver", join(dir, "leaf.pem")]).toString();
    expect(out).toContain("leaf.pem: OK");
    const text = execFileSync("openssl", ["x509", "-noout", "-text", "-in", join(dir, "leaf.pem")]).toString();
    expect(text).toMatch(/CA:FALSE/);
    expect(text).toContain("TLS Web Server Authentication");
    expect(text).toContain("DNS:origin.example.net");
  });

  it.each<[string, Record<string, unknown>, RegExp]>([
    ["ca=true", { ca: true, dnsNames: ["a.example"] }, /^ca: /],
    ["no names", { dnsNames: [] }, /^dns_names: a leaf needs at least one name/],
    ["not_after beyond the cap", { dnsNames: ["a.example"], notAfter: timestampFromMs(Date.now() + 60 * DAY) }, /^not_after: .*beyond the maximum leaf lifetime/],
  ])("refuses %s with INVALID_ARGUMENT", async (_name, fields, message) => {
    const leafKey = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
    const f = await failure(
      client.unary("issueLeafCertificate", { tenantId: "acme", publicKey: new Uint8Array(leafKey.publicKey.export({ format: "der", type: "spki" })), ...fields }),
    );
    expect(f.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(f.details).toMatch(message);
  });

  it("signs with a signing key (verified with node:crypto) and refuses the CA key", async () => {
    const message = Buffer.from("over the socket");
    const res = await client.unary("sign", { keyId: "acme/signer", message, algorithm: SignatureAlgorithm.ECDSA_SHA256 });
    expect(verify("sha256", message, { key: signer.publicKey, dsaEncoding: "der" }, res.signature)).toBe(true);
    const f = await failure(client.unary("sign", { keyId: acme.keyId, message, algorithm: SignatureAlgorithm.ECDSA_SHA256 }));
    expect(f.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(f.details).toBe(`key ${acme.keyId} is an intermediate CA key; CA keys sign only through IssueLeafCertificate`);
  });

  it("refuses every method without the workload header", async () => {
    for (const name of ["getStatus", "listKeys", "sign", "issueLeafCertificate", "getCertificateChain"] as const) {
      const f = await failure(client.unary(name, {} as never, { header: false }));
      expect(f.code, name).toBe(grpc.status.INVALID_ARGUMENT);
      expect(f.details, name).toContain("kmi-agent-workload");
    }
  });

  it("another Unix user (nobody) cannot connect; root can", async () => {
    const asRoot = await clientAs(undefined, socketPath);
    expect(asRoot.ok).toBe(true);
    const asNobody = await clientAs("nobody", socketPath);
    expect(asNobody.ok).toBe(false);
    expect(asNobody.code).toBe(grpc.status.UNAVAILABLE);
    expect(asNobody.details).toMatch(/EACCES|[Pp]ermission denied/);
  });

  it("with --socket-group the socket is 0660: a member of the group connects, others do not", async () => {
    const groupSocket = join(dir, "group.sock");
    const other = join(dir, "other.sock");
    const withNogroup = await serve(groupSocket, { group: "nogroup" });
    const withRoot = await serve(other, { group: "root" });
    try {
      expect(statSync(groupSocket).mode & 0o777).toBe(0o660);
      expect(statSync(groupSocket).gid).toBe(65534);
      // nobody's primary group is nogroup: this proves the client can succeed as nobody,
      // so the refusal above comes from the socket's mode, not from the test harness.
      expect((await clientAs("nobody", groupSocket)).ok).toBe(true);
      const refused = await clientAs("nobody", other);
      expect(refused.ok).toBe(false);
      expect(refused.details).toMatch(/EACCES|[Pp]ermission denied/);
    } finally {
      await withNogroup.destroy();
      await withRoot.destroy();
    }
  });
});
