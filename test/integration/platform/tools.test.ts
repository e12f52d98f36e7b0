/**
 * Real gRPC tools talk to both server stacks: `buf curl` (reflection v1 and v1alpha, health),
 * a grpc-js client built from proto/ alone, a Python client generated with protoc +
 * grpc_python_plugin, `curl` with the Connect protocol, and a hand-framed gRPC-Web request. Over
 * TLS on TCP and over the Unix socket.
 */
import { cp, mkdir, readFile } from "node:fs/promises";
import https from "node:https";
import { join } from "node:path";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { codeToString } from "@connectrpc/connect/protocol-connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  Health,
  HealthCheckRequestSchema,
  HealthCheckResponseSchema,
  HealthCheckResponse_ServingStatus,
} from "../../../src/gen/grpc/health/v1/health_pb.js";
import { KeyAgentService } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { REFLECTION_SERVICES } from "../../../src/common/reflection.js";
import { FIXTURE_ROOT_PEM } from "../../fixtures/platform/services.js";
import { startFixture, type Fixture, type Stack } from "../../fixtures/platform/start.js";
import { REPO_ROOT, clients, insecure, tlsCredentials, unary, unixTarget } from "../../helpers/grpc-clients.js";
import { makeTestPki, type TestPki } from "../../helpers/pki.js";
import { makeTempDir, run, waitFor, type TempDir } from "../../helpers/process.js";

const BUF = join(REPO_ROOT, "node_modules", ".bin", "buf");
const PYTHON = "/usr/bin/python3";
const WORKLOAD = { "kmi-agent-workload": "true" };

/** Every method the fixture servers must list, as `buf curl --list-methods` prints them. */
const EXPECTED_METHODS = [KdcAdminService, KeyAgentService, Health, ...REFLECTION_SERVICES]
  .flatMap((s) => s.methods.map((m) => `${s.typeName}/${m.name}`))
  .sort();

let tmp: TempDir;
let pki: TestPki;
let pyGen: string;
const servers = {} as Record<Stack, Fixture>;

beforeAll(async () => {
  tmp = await makeTempDir("kmi-tools-");
  pki = await makeTestPki(tmp.path);
  // Python code generated from proto/: buf assembles the image (proto/ plus the well-known
  // types it needs), protoc + grpc_python_plugin generate from it. health.proto is compiled from
  // a copy under kmihealth/, since generated code under a top-level grpc/ would shadow grpcio.
  pyGen = join(tmp.path, "pygen");
  await mkdir(join(tmp.path, "pysrc", "kmihealth", "v1"), { recursive: true });
  const image = join(tmp.path, "kmi.binpb");
  const build = await run(BUF, ["build", "-o", image], { cwd: REPO_ROOT });
  expect(build.code, build.stderr).toBe(0);
  await mkdir(pyGen);
  const plugin = "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin";
  const gen1 = await run("protoc", [
    `--descriptor_set_in=${image}`, `--python_out=${pyGen}`, `--grpc_python_out=${pyGen}`, plugin,
    "kmi/kdc/v1/admin.proto", "kmi/agent/v1/agent.proto", "kmi/common/v1/common.proto", "kmi/common/v1/checkpoint.proto",
  ]);
  expect(gen1.code, gen1.stderr).toBe(0);
  await cp(join(REPO_ROOT, "third_party/proto/grpc/health/v1/health.proto"), join(tmp.path, "pysrc/kmihealth/v1/health.proto"));
  const gen2 = await run("protoc", [`-I${join(tmp.path, "pysrc")}`, `--python_out=${pyGen}`, `--grpc_python_out=${pyGen}`, plugin, "kmihealth/v1/health.proto"]);
  expect(gen2.code, gen2.stderr).toBe(0);

  servers.connect = await startFixture({ stack: "connect", pki, dir: tmp.path });
  servers.grpc = await startFixture({ stack: "grpc", pki, dir: tmp.path, requireHeader: true });
});

afterAll(async () => {
  await Promise.all(Object.values(servers).map((s) => s.server.destroy(2000)));
  await tmp?.cleanup();
});

describe.each(["connect", "grpc"] as const)("%s stack", (stack) => {
  const tcpUrl = () => `https://127.0.0.1:${servers[stack].port}`;
  const unixArgs = () => ["--unix-socket", servers[stack].bound.unix, "--protocol", "grpc", "--http2-prior-knowledge"];

  describe.each(["grpc-v1", "grpc-v1alpha"])("buf curl --reflect-protocol %s", (reflect) => {
    it("lists every method over TLS", async () => {
      const r = await run(BUF, ["curl", "--cacert", pki.ca.cert, "--protocol", "grpc", "--reflect-protocol", reflect, "--list-methods", tcpUrl()]);
      expect(r.stderr).toBe("");
      expect(r.stdout.trim().split("\n")).toEqual(EXPECTED_METHODS);
    });

    it("lists every method over the Unix socket", async () => {
      const r = await run(BUF, ["curl", ...unixArgs(), "--reflect-protocol", reflect, "--list-methods", "http://localhost"]);
      expect(r.stderr).toBe("");
      expect(r.stdout.trim().split("\n")).toEqual(EXPECTED_METHODS);
    });

    it("calls Health/Check and a kmi method, with request schemas from reflection", async () => {
      const h = await run(BUF, ["curl", ...unixArgs(), "--reflect-protocol", reflect, "http://localhost/grpc.health.v1.Health/Check"]);
      expect(h.stderr).toBe("");
      expect(JSON.parse(h.stdout)).toEqual({ status: "SERVING" });
      const k = await run(BUF, [
        "curl", "--cacert", pki.ca.cert, "--protocol", "grpc", "--reflect-protocol", reflect,
        "-H", "kmi-agent-workload: true", "-d", "{}", `${tcpUrl()}/kmi.kdc.v1.KdcAdminService/GetTrustBundle`,
      ]);
      expect(k.stderr).toBe("");
      expect(JSON.parse(k.stdout)).toEqual({ kmiRootPem: FIXTURE_ROOT_PEM, infrastructureCaPem: FIXTURE_ROOT_PEM });
    });
  });

  it("buf curl calls Health/Check over TLS", async () => {
    const r = await run(BUF, ["curl", "--cacert", pki.ca.cert, "--protocol", "grpc", `${tcpUrl()}/grpc.health.v1.Health/Check`]);
    expect(r.stderr).toBe("");
    expect(JSON.parse(r.stdout)).toEqual({ status: "SERVING" });
  });

  describe("grpc-js client built from proto/ with proto-loader", () => {
    const targets = () => [
      { name: "TLS", target: `localhost:${servers[stack].port}`, creds: tlsCredentials(pki.ca.cert) },
      { name: "Unix socket", target: unixTarget(servers[stack].bound.unix), creds: insecure() },
    ];
    it.each(["TLS", "Unix socket"])("calls Health and kmi methods over %s", async (name) => {
      const t = targets().find((x) => x.name === name)!;
      const health = new clients.health(t.target, t.creds);
      const kdc = new clients.kdcAdmin(t.target, t.creds);
      const agent = new clients.agent(t.target, t.creds);
      try {
        expect(await unary(health, "Check", { service: "" })).toEqual({ ok: true, value: { status: "SERVING" } });
        expect(await unary(health, "Check", { service: "kmi.agent.v1.KeyAgentService" })).toEqual({ ok: true, value: { status: "SERVING" } });
        expect(await unary(health, "Check", { service: "no.such.Service" })).toMatchObject({ ok: false, code: 5 });
        expect(await unary(kdc, "GetTrustBundle", {}, WORKLOAD)).toEqual({
          ok: true,
          value: { kmi_root_pem: FIXTURE_ROOT_PEM, infrastructure_ca_pem: FIXTURE_ROOT_PEM },
        });
        const st = await unary(agent, "GetStatus", {}, WORKLOAD);
        expect(st).toMatchObject({ ok: true, value: { version: "0.1.0", kdc_connected: true, group: name === "TLS" ? expect.stringMatching(/^127\.0\.0\.1:\d+$/) : "unix" } });
        // A method the fixture leaves out: UNIMPLEMENTED, as the platform answers it.
        expect(await unary(agent, "Sign", { key_id: "k" }, WORKLOAD)).toEqual({
          ok: false,
          code: 12,
          details: "kmi.agent.v1.KeyAgentService.Sign is not implemented",
        });
      } finally {
        health.close();
        kdc.close();
        agent.close();
      }
    });
  });

  it.each(["TLS", "Unix socket"])("a Python client generated with protoc + grpc_python_plugin calls Health and kmi methods over %s", async (name) => {
    const args =
      name === "TLS"
        ? [`127.0.0.1:${servers[stack].port}`, "--ca", pki.ca.cert]
        : [unixTarget(servers[stack].bound.unix)];
    const service = stack === "connect" ? "kdc" : "agent";
    const r = await run(PYTHON, [join(REPO_ROOT, "test/fixtures/platform/python_client.py"), pyGen, ...args, "--service", service]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(out["health"]).toBe("SERVING");
    if (service === "kdc") expect(out["kmi"]).toEqual({ kmiRootPem: FIXTURE_ROOT_PEM, infrastructureCaPem: FIXTURE_ROOT_PEM });
    else expect(out["kmi"]).toMatchObject({ version: "0.1.0", kdcConnected: true });
    expect(out["error"]).toEqual({ code: "INVALID_ARGUMENT", details: `tenant_id: "Bad" is not a valid id; use lowercase letters, digits and '-'` });
  });
});

describe("curl with the Connect protocol (JSON) over TLS", () => {
  const url = (m: string) => `https://127.0.0.1:${servers.connect.port}/kmi.kdc.v1.KdcAdminService/${m}`;
  const curl = (m: string, body: string, extra: string[] = []) =>
    run("curl", ["-sS", "--cacert", pki.ca.cert, "-H", "content-type: application/json", "-d", body, "-w", "\n%{http_code} %{http_version}", ...extra, url(m)]);

  it.each([["HTTP/2", "--http2", "2"], ["HTTP/1.1", "--http1.1", "1.1"]])("calls GetTrustBundle over %s", async (_name, flag, version) => {
    const r = await curl("GetTrustBundle", "{}", [flag]);
    expect(r.stderr).toBe("");
    const [body, status] = r.stdout.split("\n");
    expect(status).toBe(`200 ${version}`);
    expect(JSON.parse(body!)).toEqual({ kmiRootPem: FIXTURE_ROOT_PEM, infrastructureCaPem: FIXTURE_ROOT_PEM });
  });

  it("gets a domain error as its Connect code with the message that says what to fix", async () => {
    const r = await curl("GetTenant", '{"tenantId":"Bad"}');
    const [body, status] = r.stdout.split("\n");
    expect(status).toBe("400 2");
    expect(JSON.parse(body!)).toEqual({ code: "invalid_argument", message: `tenant_id: "Bad" is not a valid id; use lowercase letters, digits and '-'` });
  });

  it("gets an unexpected error as an opaque internal with a reference id, and the cause is logged under it", async () => {
    const r = await curl("ListTenants", "{}");
    const [body, status] = r.stdout.split("\n");
    expect(status).toBe("500 2");
    const err = JSON.parse(body!) as { code: string; message: string };
    expect(err.code).toBe("internal");
    expect(err.message).toMatch(/^internal error \(ref [0-9a-f]{12}\); the server log has the cause under this ref$/);
    expect(err.message).not.toContain("leveldb");
    const ref = /ref ([0-9a-f]{12})/.exec(err.message)![1];
    const line = servers.connect.logs.find((l) => l["msg"] === "internal error" && l["ref"] === ref);
    expect(line).toBeDefined();
    expect(JSON.stringify(line)).toContain("leveldb: corruption");
  });

  it("refuses a malformed JSON body as invalid_argument", async () => {
    const r = await curl("GetTenant", '{"tenantId": ');
    const [body, status] = r.stdout.split("\n");
    expect(status).toBe("400 2");
    expect((JSON.parse(body!) as { code: string }).code).toBe("invalid_argument");
  });
});

describe("gRPC-Web (application/grpc-web+proto) over TLS, HTTP/1.1", () => {
  interface Frame {
    flag: number;
    data: Buffer;
  }
  interface GrpcWebResult {
    status: number;
    contentType: string | undefined;
    httpVersion: string;
    body: Buffer;
  }

  /** A gRPC-Web length-prefixed frame: flag byte, 4-byte big-endian length, payload. */
  const frame = (flag: number, payload: Uint8Array) => {
    const head = Buffer.alloc(5);
    head.writeUInt8(flag, 0);
    head.writeUInt32BE(payload.length, 1);
    return Buffer.concat([head, Buffer.from(payload)]);
  };

  /** Splits a gRPC-Web response body into its frames; fails on a torn frame. */
  const frames = (body: Buffer): Frame[] => {
    const out: Frame[] = [];
    let at = 0;
    while (at < body.length) {
      expect(body.length - at, "frame header").toBeGreaterThanOrEqual(5);
      const len = body.readUInt32BE(at + 1);
      expect(body.length - at - 5, "frame payload").toBeGreaterThanOrEqual(len);
      out.push({ flag: body.readUInt8(at), data: body.subarray(at + 5, at + 5 + len) });
      at += 5 + len;
    }
    return out;
  };

  /** The trailer frame's "name: value\r\n" lines, names lowercased. */
  const trailers = (f: Frame): Record<string, string> =>
    Object.fromEntries(
      f.data
        .toString("latin1")
        .split("\r\n")
        .filter((l) => l !== "")
        .map((l) => {
          const i = l.indexOf(":");
          return [l.slice(0, i).trim().toLowerCase(), l.slice(i + 1).trim()];
        }),
    );

  /** POSTs one gRPC-Web request with node's https client (HTTP/1.1), trusting the test CA. */
  const call = async (path: string, message: Uint8Array): Promise<GrpcWebResult> => {
    const ca = await readFile(pki.ca.cert);
    return new Promise((resolve, reject) => {
      const req = https.request(
        {
          host: "127.0.0.1",
          port: servers.connect.port,
          servername: "localhost",
          ca,
          method: "POST",
          path,
          headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1", accept: "application/grpc-web+proto" },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () => {
            const body = Buffer.concat(chunks);
            resolve({ status: res.statusCode ?? 0, contentType: res.headers["content-type"], httpVersion: res.httpVersion, body });
          });
          res.on("error", reject);
        },
      );
      req.on("error", reject);
      req.end(frame(0x00, message));
    });
  };

  it("answers Health/Check with a data frame that decodes to SERVING and a trailer frame with grpc-status 0", async () => {
    const req = toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, { service: "kmi.kdc.v1.KdcAdminService" }));
    const r = await call("/grpc.health.v1.Health/Check", req);
    expect(r.status).toBe(200);
    expect(r.httpVersion).toBe("1.1");
    expect(r.contentType).toBe("application/grpc-web+proto");
    const [data, trailer, ...rest] = frames(r.body);
    expect(rest).toEqual([]);
    expect(data!.flag).toBe(0x00);
    expect(fromBinary(HealthCheckResponseSchema, data!.data).status).toBe(HealthCheckResponse_ServingStatus.SERVING);
    expect(trailer!.flag).toBe(0x80);
    expect(trailers(trailer!)).toEqual({ "grpc-status": "0" });
    // The call went through the gRPC-Web protocol handler, as the call log names it (the line is
    // written when the response closes, which may be just after the client saw its end).
    await waitFor(() => servers.connect.logs.find((l) => l["method"] === "/grpc.health.v1.Health/Check" && l["protocol"] === "grpc-web" && l["code"] === "ok"), 10_000, "the grpc-web call log line");
  });

  it("answers an unimplemented method with no data frame and a trailer frame of grpc-status 12 and its message", async () => {
    const r = await call("/kmi.agent.v1.KeyAgentService/Sign", new Uint8Array());
    expect(r.status).toBe(200);
    expect(r.contentType).toBe("application/grpc-web+proto");
    const f = frames(r.body);
    expect(f.map((x) => x.flag)).toEqual([0x80]);
    const t = trailers(f[0]!);
    expect(t["grpc-status"]).toBe("12");
    expect(decodeURIComponent(t["grpc-message"]!)).toBe("kmi.agent.v1.KeyAgentService.Sign is not implemented");
  });

  it("answers a domain error in the trailer frame with its gRPC code (3) and the message that says what to fix", async () => {
    const r = await call("/kmi.kdc.v1.KdcAdminService/GetTenant", Buffer.from([0x0a, 0x03, ...Buffer.from("Bad")]));
    expect(r.status).toBe(200);
    const f = frames(r.body);
    expect(f.map((x) => x.flag)).toEqual([0x80]);
    const t = trailers(f[0]!);
    expect(t["grpc-status"]).toBe("3");
    expect(decodeURIComponent(t["grpc-message"]!)).toBe(`tenant_id: "Bad" is not a valid id; use lowercase letters, digits and '-'`);
  });

  it("logs a call refused before its handler with the code its trailer frame carries, not ok", async () => {
    // Not a protobuf message: field 1 (tenant_id) declared 100 bytes long, 1 byte present.
    const r = await call("/kmi.kdc.v1.KdcAdminService/GetTenant", Buffer.from([0x0a, 0x64, 0x41]));
    expect(r.status).toBe(200);
    const f = frames(r.body);
    const t = trailers(f[f.length - 1]!);
    expect(t["grpc-status"]).toMatch(/^\d+$/);
    expect(t["grpc-status"]).not.toBe("0");
    const wire = codeToString(Number(t["grpc-status"]));
    await waitFor(
      () => servers.connect.logs.find((l) => l["method"] === "/kmi.kdc.v1.KdcAdminService/GetTenant" && l["protocol"] === "grpc-web" && l["code"] === wire),
      10_000,
      `a grpc-web call log line with code ${wire}`,
    );
    expect(servers.connect.logs.some((l) => l["method"] === "/kmi.kdc.v1.KdcAdminService/GetTenant" && l["protocol"] === "grpc-web" && l["code"] === "ok")).toBe(false);
  });

  // An unknown service is not routed to a protocol handler at all: the server answers HTTP 404,
  // which gRPC-Web clients map to UNIMPLEMENTED (gRPC's HTTP-status mapping), with no frames.
  it("answers an unknown service with HTTP 404 (UNIMPLEMENTED to a gRPC-Web client) and no gRPC-Web frames", async () => {
    const r = await call("/no.such.v1.Service/Check", new Uint8Array());
    expect(r.status).toBe(404);
    expect(r.contentType).toBe("text/plain; charset=utf-8");
    expect(r.body.toString()).toBe("no such method: /no.such.v1.Service/Check; list the methods with server reflection\n");
  });
});
