/**
 * What the platform refuses, on both stacks: clients without the right certificate (mutual TLS),
 * messages over the size limit (gRPC over the Unix socket and over TLS; Connect JSON over TLS),
 * malformed frames, calls without the agent's required header, and
 * another user on the Unix socket. After each refusal the server keeps serving. Also: graceful
 * shutdown with calls in flight, and the metrics the calls leave.
 */
import { execFileSync } from "node:child_process";
import { chmod, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LISTEN_BACKLOG } from "../../../src/common/connect-server.js";
import { createLogger } from "../../../src/common/logger.js";
import { startMetricsServer } from "../../../src/common/metrics.js";
import { FIXTURE_ROOT_PEM } from "../../fixtures/platform/services.js";
import { startFixture, type Fixture, type Stack } from "../../fixtures/platform/start.js";
import { clients, insecure, tlsCredentials, unary, unixTarget, type UnaryResult } from "../../helpers/grpc-clients.js";
import { makeTestPki, type TestPki } from "../../helpers/pki.js";
import { makeTempDir, run, waitFor, type TempDir } from "../../helpers/process.js";
import { connectUnixH2, grpcFrame, rawGrpcCall } from "../../helpers/raw-grpc.js";

const WORKLOAD = { "kmi-agent-workload": "true" };
const STACKS: Stack[] = ["connect", "grpc"];

let tmp: TempDir;
let pki: TestPki;

beforeAll(async () => {
  tmp = await makeTempDir("kmi-limits-");
  pki = await makeTestPki(tmp.path);
});

afterAll(async () => {
  await tmp?.cleanup();
});

async function withClient<T>(ctor: (typeof clients)[keyof typeof clients], target: string, creds: grpc.ChannelCredentials, fn: (c: grpc.Client) => Promise<T>): Promise<T> {
  const c = new ctor(target, creds);
  try {
    return await fn(c);
  } finally {
    c.close();
  }
}

const trustBundle: UnaryResult = { ok: true, value: { kmi_root_pem: FIXTURE_ROOT_PEM, infrastructure_ca_pem: FIXTURE_ROOT_PEM } };

describe.each(STACKS)("%s stack", (stack) => {
  describe("mutual TLS, required", () => {
    let f: Fixture;
    beforeAll(async () => {
      f = await startFixture({ stack, pki, dir: tmp.path, socketName: `${stack}-mtls.sock`, mtls: "required" });
    });
    afterAll(() => f.server.destroy(2000));

    const call = (client?: { cert: string; key: string }) =>
      withClient(clients.agent, `localhost:${f.port}`, tlsCredentials(pki.ca.cert, client), (c) => unary(c, "GetStatus", {}, WORKLOAD, 5000));

    it("refuses a client without a certificate", async () => {
      const r = await call();
      expect(r).toMatchObject({ ok: false, code: grpc.status.UNAVAILABLE });
    });

    it("refuses a client whose certificate comes from another CA", async () => {
      const r = await call(pki.otherClient);
      expect(r).toMatchObject({ ok: false, code: grpc.status.UNAVAILABLE });
    });

    it("serves a client with a certificate from the CA, and hands its identity to the handler", async () => {
      const r = await call(pki.client);
      expect(r).toMatchObject({ ok: true, value: { machine_id: pki.machineId } });
    });

    // Connect JSON over curl exists on the connect stack only, so the test is registered there alone.
    if (stack === "connect") it("curl without a client certificate is refused in the handshake", async () => {
      const r = await run("curl", ["-sS", "--cacert", pki.ca.cert, "-H", "content-type: application/json", "-d", "{}", `https://127.0.0.1:${f.port}/kmi.kdc.v1.KdcAdminService/GetTrustBundle`]);
      expect(r.code).not.toBe(0);
      expect(r.stdout).toBe("");
      const ok = await run("curl", ["-sS", "--cacert", pki.ca.cert, "--cert", pki.client.cert, "--key", pki.client.key, "-H", "content-type: application/json", "-d", "{}", `https://127.0.0.1:${f.port}/kmi.kdc.v1.KdcAdminService/GetTrustBundle`]);
      expect(ok.code).toBe(0);
      expect(JSON.parse(ok.stdout)).toHaveProperty("kmiRootPem", FIXTURE_ROOT_PEM);
      expect(f.logs.some((l) => l["msg"] === "tls handshake refused")).toBe(true);
    });
  });

  describe("mutual TLS, optional", () => {
    let f: Fixture;
    beforeAll(async () => {
      f = await startFixture({ stack, pki, dir: tmp.path, socketName: `${stack}-opt.sock`, mtls: "optional" });
    });
    afterAll(() => f.server.destroy(2000));

    it.each([
      ["no certificate", undefined, ""],
      ["a certificate from another CA", "other", ""],
      ["a certificate from the CA", "trusted", "m-test-1"],
    ] as const)("lets a client with %s connect; the handler sees machine id %j", async (_name, which, machineId) => {
      const client = which === undefined ? undefined : which === "other" ? pki.otherClient : pki.client;
      const r = await withClient(clients.agent, `localhost:${f.port}`, tlsCredentials(pki.ca.cert, client), (c) => unary(c, "GetStatus", {}, WORKLOAD));
      expect(r).toMatchObject({ ok: true, value: { machine_id: machineId } });
    });
  });

  describe("size limit and malformed frames", () => {
    let f: Fixture;
    let session: ReturnType<typeof connectUnixH2>;
    beforeAll(async () => {
      f = await startFixture({ stack, pki, dir: tmp.path, socketName: `${stack}-max.sock`, maxMessageBytes: 1024 });
      session = connectUnixH2(f.bound.unix);
    });
    afterAll(async () => {
      session.close();
      await f.server.destroy(2000);
    });

    const stillServes = async () => {
      const raw = await rawGrpcCall(session, "/kmi.kdc.v1.KdcAdminService/GetTrustBundle", grpcFrame(new Uint8Array()));
      expect(raw.grpcStatus).toBe(0);
      const viaClient = await withClient(clients.kdcAdmin, unixTarget(f.bound.unix), insecure(), (c) => unary(c, "GetTrustBundle", {}));
      expect(viaClient).toEqual(trustBundle);
    };

    it("refuses a request over the max message size with RESOURCE_EXHAUSTED, then keeps serving", async () => {
      const r = await withClient(clients.kdcAdmin, unixTarget(f.bound.unix), insecure(), (c) => unary(c, "GetTenant", { tenant_id: "x".repeat(2000) }));
      expect(r).toEqual({
        ok: false,
        code: grpc.status.RESOURCE_EXHAUSTED,
        details: stack === "connect" ? "message size 2003 is larger than configured readMaxBytes 1024" : "Received message larger than max (2003 vs 1024)",
      });
      await stillServes();
    });

    it("refuses a gRPC request over the max message size on the TLS port with RESOURCE_EXHAUSTED, then keeps serving there", async () => {
      const tls = () => tlsCredentials(pki.ca.cert);
      const r = await withClient(clients.kdcAdmin, `localhost:${f.port}`, tls(), (c) => unary(c, "GetTenant", { tenant_id: "x".repeat(2000) }));
      expect(r).toEqual({
        ok: false,
        code: grpc.status.RESOURCE_EXHAUSTED,
        details: stack === "connect" ? "message size 2003 is larger than configured readMaxBytes 1024" : "Received message larger than max (2003 vs 1024)",
      });
      // A message just under the limit passes the size check and reaches the handler.
      const under = await withClient(clients.kdcAdmin, `localhost:${f.port}`, tls(), (c) => unary(c, "GetTenant", { tenant_id: "x".repeat(1000) }));
      expect(under).toMatchObject({ ok: false, code: grpc.status.INVALID_ARGUMENT });
      expect(await withClient(clients.kdcAdmin, `localhost:${f.port}`, tls(), (c) => unary(c, "GetTrustBundle", {}))).toEqual(trustBundle);
      await stillServes();
    });

    // Connect JSON exists on the connect stack only, so the test is registered there alone.
    // connect-node answers an over-limit Connect request with HTTP 429 (its mapping of
    // resource_exhausted) and the Connect error body, before the handler runs.
    if (stack === "connect") it.each([["HTTP/2", "--http2", "2"], ["HTTP/1.1", "--http1.1", "1.1"]])(
      "refuses a Connect JSON POST over the max message size on the TLS port (%s) with 429 resource_exhausted, then keeps serving there",
      async (_name, flag, version) => {
        const curl = (method: string, body: string) =>
          run("curl", ["-sS", flag, "--cacert", pki.ca.cert, "-H", "content-type: application/json", "-d", body, "-w", "\n%{http_code} %{http_version}", `https://127.0.0.1:${f.port}/kmi.kdc.v1.KdcAdminService/${method}`]);
        const big = JSON.stringify({ tenantId: "x".repeat(2000) });
        expect(Buffer.byteLength(big)).toBe(2015);
        const r = await curl("GetTenant", big);
        expect(r.stderr).toBe("");
        const [body, status] = r.stdout.split("\n");
        expect(status).toBe(`429 ${version}`);
        expect(JSON.parse(body!)).toEqual({ code: "resource_exhausted", message: "message size 2015 is larger than configured readMaxBytes 1024" });
        // The call log (and the handled-calls metric) name the code the client got, not the HTTP status's loose mapping.
        await waitFor(
          () => f.logs.find((l) => l["method"] === "/kmi.kdc.v1.KdcAdminService/GetTenant" && l["protocol"] === "connect" && l["code"] === "resource_exhausted"),
          10_000,
          "a connect call log line with code resource_exhausted",
        );
        const ok = await curl("GetTrustBundle", "{}");
        const [okBody, okStatus] = ok.stdout.split("\n");
        expect(okStatus).toBe(`200 ${version}`);
        expect(JSON.parse(okBody!)).toEqual({ kmiRootPem: FIXTURE_ROOT_PEM, infrastructureCaPem: FIXTURE_ROOT_PEM });
        await stillServes();
      },
    );

    // A Connect streaming call carries its error in the end-stream message, behind HTTP 200.
    if (stack === "connect") it("refuses an over-limit Connect streaming request in its end-stream message, and logs that code", async () => {
      const json = Buffer.from(JSON.stringify({ service: "x".repeat(2000) }));
      const envelope = Buffer.concat([Buffer.from([0, 0, 0, 0, 0]), json]);
      envelope.writeUInt32BE(json.length, 1);
      const file = join(tmp.path, "watch-request.bin");
      await writeFile(file, envelope);
      const r = await run("curl", ["-sS", "--http2", "--cacert", pki.ca.cert, "-H", "content-type: application/connect+json", "--data-binary", `@${file}`,
        "-o", join(tmp.path, "watch-response.bin"), "-w", "%{http_code} %{content_type}", `https://127.0.0.1:${f.port}/grpc.health.v1.Health/Watch`]);
      expect(r.stderr).toBe("");
      expect(r.stdout).toBe("200 application/connect+json");
      const body = await readFile(join(tmp.path, "watch-response.bin"));
      expect(body[0]! & 0x02).toBe(0x02);
      const end = JSON.parse(body.subarray(5, 5 + body.readUInt32BE(1)).toString()) as { error: { code: string; message: string } };
      expect(end.error.code).toBe("resource_exhausted");
      await waitFor(
        () => f.logs.find((l) => l["method"] === "/grpc.health.v1.Health/Watch" && l["protocol"] === "connect" && l["code"] === "resource_exhausted"),
        10_000,
        "a connect call log line with code resource_exhausted",
      );
      await stillServes();
    });

    it("refuses a frame whose length prefix declares more than the limit, then keeps serving", async () => {
      const r = await rawGrpcCall(session, "/kmi.kdc.v1.KdcAdminService/GetTenant", grpcFrame(Buffer.from("abc"), 0x7fffffff));
      expect(r.grpcStatus).toBe(grpc.status.RESOURCE_EXHAUSTED);
      await stillServes();
    });

    // What each stack answers to a broken frame, asserted exactly: connect-node reads a short
    // envelope as INVALID_ARGUMENT; grpc-js sees no complete message and answers UNIMPLEMENTED
    // with its own wording. Unparsable protobuf is INTERNAL on both.
    const truncated =
      stack === "connect"
        ? { code: grpc.status.INVALID_ARGUMENT, message: "protocol error: incomplete envelope" }
        : { code: grpc.status.UNIMPLEMENTED, message: "Received no request message for server streaming method /kmi.kdc.v1.KdcAdminService/GetTenant" };

    it("answers a truncated frame (prefix promises 100 bytes, 3 arrive) cleanly, then keeps serving", async () => {
      const r = await rawGrpcCall(session, "/kmi.kdc.v1.KdcAdminService/GetTenant", grpcFrame(Buffer.from("abc"), 100));
      expect([r.httpStatus, r.grpcStatus, r.grpcMessage]).toEqual([200, truncated.code, truncated.message]);
      await stillServes();
    });

    it("answers a frame shorter than its 5-byte prefix cleanly, then keeps serving", async () => {
      const r = await rawGrpcCall(session, "/kmi.kdc.v1.KdcAdminService/GetTenant", Buffer.from([0, 0, 0]));
      expect([r.httpStatus, r.grpcStatus, r.grpcMessage]).toEqual([200, truncated.code, truncated.message]);
      await stillServes();
    });

    it("answers a frame of bytes that are not protobuf with INTERNAL, then keeps serving", async () => {
      const r = await rawGrpcCall(session, "/kmi.kdc.v1.KdcAdminService/GetTenant", grpcFrame(Buffer.from([0xff, 0xff, 0xff])));
      expect([r.httpStatus, r.grpcStatus, r.grpcMessage]).toEqual([
        200,
        grpc.status.INTERNAL,
        stack === "connect" ? "parse binary: premature EOF" : "Error deserializing request",
      ]);
      await stillServes();
    });
  });

  describe("Unix socket file mode", () => {
    // The directory is traversable by everyone, so only the socket's own mode keeps `nobody` out.
    let modesDir: TempDir;
    let dir: string;
    beforeAll(async () => {
      modesDir = await makeTempDir("kmi-modes-");
      dir = modesDir.path;
      await chmod(dir, 0o755);
    });
    afterAll(() => modesDir.cleanup());

    /** Connects as user nobody (group nogroup only) and reports "connected" or the errno. */
    const connectAsNobody = async (path: string) => {
      const script = `import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n  s.connect(sys.argv[1]); print("connected")\nexcept OSError as e:\n  import errno; print(errno.errorcode[e.errno])\n`;
      const r = await run("setpriv", ["--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", script, path]);
      expect(r.stderr).toBe("");
      return r.stdout.trim();
    };

    it("is 0600 by default, and user nobody cannot connect", async () => {
      const f = await startFixture({ stack, pki, dir, socketName: "s600.sock", tcp: false });
      try {
        const st = await stat(f.bound.unix);
        expect(st.isSocket()).toBe(true);
        expect(st.mode & 0o777).toBe(0o600);
        expect(await connectAsNobody(f.bound.unix)).toBe("EACCES");
        // The owner still can.
        expect(await withClient(clients.health, unixTarget(f.bound.unix), insecure(), (c) => unary(c, "Check", { service: "" }))).toMatchObject({ ok: true });
      } finally {
        await f.server.destroy(2000);
      }
    });

    it("is 0660 with the configured group when asked, and a member of that group can connect", async () => {
      const f = await startFixture({ stack, pki, dir, socketName: "s660.sock", tcp: false, socketMode: 0o660, socketGroup: "nogroup" });
      try {
        const st = await stat(f.bound.unix);
        expect(st.mode & 0o777).toBe(0o660);
        expect(st.gid).toBe(65534);
        expect(await connectAsNobody(f.bound.unix)).toBe("connected");
      } finally {
        await f.server.destroy(2000);
      }
      // destroy() removes the socket file.
      await expect(stat(f.bound.unix)).rejects.toMatchObject({ code: "ENOENT" });
    });

    it("refuses to start when another live server holds the path, and names the problem", async () => {
      const f = await startFixture({ stack, pki, dir, socketName: "busy.sock", tcp: false });
      try {
        await expect(startFixture({ stack, pki, dir, socketName: "busy.sock", tcp: false })).rejects.toThrow(/is in use by another running server/);
      } finally {
        await f.server.destroy(2000);
      }
    });
  });

  describe("graceful shutdown in-process", () => {
    it("lets an in-flight call finish, ends watch streams, refuses new connections and removes the socket", async () => {
      const f = await startFixture({ stack, pki, dir: tmp.path, socketName: `${stack}-drain.sock`, shutdownTimeoutMs: 5000 });
      const target = unixTarget(f.bound.unix);
      const kdc = new clients.kdcAdmin(target, insecure());
      const agent = new clients.agent(target, insecure());
      try {
        // A watch stream that would run forever.
        const watch = (agent as unknown as { WatchKeys(req: object, md: grpc.Metadata): grpc.ClientReadableStream<unknown> }).WatchKeys(
          { tenant_id: "t" },
          new grpc.Metadata(),
        );
        const watchDone = new Promise<{ events: number; code: number }>((resolve) => {
          let events = 0;
          watch.on("data", () => events++);
          watch.on("status", (s: grpc.StatusObject) => resolve({ events, code: s.code }));
          watch.on("error", () => {});
        });
        const slow = unary(kdc, "GetTrustBundle", {}, { "kmi-fixture-delay-ms": "700" });
        await new Promise((r) => setTimeout(r, 200));
        const t0 = Date.now();
        await f.server.destroy();
        const took = Date.now() - t0;
        expect(await slow).toEqual(trustBundle);
        expect(took).toBeGreaterThanOrEqual(350);
        expect(took).toBeLessThan(4000);
        expect(await watchDone).toEqual({ events: 1, code: grpc.status.OK });
        await expect(stat(f.bound.unix)).rejects.toMatchObject({ code: "ENOENT" });
        const after = await withClient(clients.health, target, insecure(), (c) => unary(c, "Check", { service: "" }, {}, 1500));
        expect(after).toMatchObject({ ok: false, code: grpc.status.UNAVAILABLE });
      } finally {
        kdc.close();
        agent.close();
      }
    });

    it("cancels a call still running at the deadline and still resolves", async () => {
      const f = await startFixture({ stack, pki, dir: tmp.path, socketName: `${stack}-force.sock` });
      const kdc = new clients.kdcAdmin(unixTarget(f.bound.unix), insecure());
      try {
        const slow = unary(kdc, "GetTrustBundle", {}, { "kmi-fixture-delay-ms": "5000" });
        await new Promise((r) => setTimeout(r, 200));
        const t0 = Date.now();
        await f.server.destroy(300);
        expect(Date.now() - t0).toBeLessThan(2000);
        const r = await slow;
        expect(r.ok).toBe(false);
        expect(f.logs.some((l) => l["msg"] === "shutdown deadline passed; canceling calls")).toBe(true);
      } finally {
        kdc.close();
      }
    });
  });

  describe("errors and metrics", () => {
    let f: Fixture;
    beforeAll(async () => {
      f = await startFixture({ stack, pki, dir: tmp.path, socketName: `${stack}-err.sock`, requireHeader: true });
    });
    afterAll(() => f.server.destroy(2000));

    it("maps a plain error to an opaque INTERNAL with a reference id that the log has with the cause", async () => {
      const r = await withClient(clients.kdcAdmin, unixTarget(f.bound.unix), insecure(), (c) => unary(c, "ListTenants", {}, WORKLOAD));
      expect(r).toMatchObject({ ok: false, code: grpc.status.INTERNAL });
      const details = (r as { details: string }).details;
      expect(details).toMatch(/^internal error \(ref [0-9a-f]{12}\); the server log has the cause under this ref$/);
      const ref = /ref ([0-9a-f]{12})/.exec(details)![1];
      const line = f.logs.find((l) => l["msg"] === "internal error" && l["ref"] === ref);
      expect(JSON.stringify(line)).toContain("leveldb: corruption");
    });

    it("maps domain errors to their codes with their messages", async () => {
      const r = await withClient(clients.agent, unixTarget(f.bound.unix), insecure(), (c) => unary(c, "ListKeys", { tenant_id: "t" }, WORKLOAD));
      expect(r).toEqual({ ok: false, code: grpc.status.NOT_FOUND, details: "tenant_id: no keys held for this tenant; check the tenant id" });
    });

    // The required workload header is the agent's (grpc stack) option, so the test is registered there alone.
    if (stack === "grpc") it("refuses a kmi call without the required header, naming it; health needs none", async () => {
      const r = await withClient(clients.agent, unixTarget(f.bound.unix), insecure(), (c) => unary(c, "GetStatus", {}));
      expect(r).toEqual({
        ok: false,
        code: grpc.status.INVALID_ARGUMENT,
        details: 'missing metadata "kmi-agent-workload: true"; add this header to every call to kmi.agent.v1.KeyAgentService',
      });
      const wrong = await withClient(clients.agent, unixTarget(f.bound.unix), insecure(), (c) => unary(c, "GetStatus", {}, { "kmi-agent-workload": "yes" }));
      expect(wrong).toMatchObject({ ok: false, code: grpc.status.INVALID_ARGUMENT });
      const h = await withClient(clients.health, unixTarget(f.bound.unix), insecure(), (c) => unary(c, "Check", { service: "" }));
      expect(h).toEqual({ ok: true, value: { status: "SERVING" } });
    });

    it("counts calls per method and code, and serves them on /metrics", async () => {
      await withClient(clients.kdcAdmin, unixTarget(f.bound.unix), insecure(), async (c) => {
        for (let i = 0; i < 3; i++) expect((await unary(c, "GetTrustBundle", {}, WORKLOAD)).ok).toBe(true);
        await unary(c, "GetTenant", { tenant_id: "Bad" }, WORKLOAD);
      });
      const m = await startMetricsServer(f.metrics, { kind: "tcp", host: "127.0.0.1", port: 0 }, createLogger({ write: () => {} }));
      try {
        const res = await fetch(`http://${m.address}/metrics`);
        expect(res.status).toBe(200);
        expect(res.headers.get("content-type")).toBe("text/plain; version=0.0.4; charset=utf-8");
        const text = await res.text();
        expect(text).toContain(
          'grpc_server_handled_total{grpc_type="unary",grpc_service="kmi.kdc.v1.KdcAdminService",grpc_method="GetTrustBundle",grpc_code="OK"} 3',
        );
        expect(text).toContain(
          'grpc_server_handled_total{grpc_type="unary",grpc_service="kmi.kdc.v1.KdcAdminService",grpc_method="GetTenant",grpc_code="InvalidArgument"} 1',
        );
        expect(text).toMatch(/grpc_server_handling_seconds_count\{grpc_type="unary",grpc_service="kmi.kdc.v1.KdcAdminService",grpc_method="GetTrustBundle"\} 3/);
        expect((await fetch(`http://${m.address}/other`)).status).toBe(404);
      } finally {
        await m.close();
      }
    });
  });
});

describe("connect stack: the TCP listen queue", () => {
  it("holds LISTEN_BACKLOG pending connections (as far as net.core.somaxconn allows), not Node's default 511", async () => {
    const f = await startFixture({ stack: "connect", pki, dir: tmp.path, socketName: "backlog.sock" });
    try {
      // ss shows a listening socket's backlog in its Send-Q column.
      const line = execFileSync("ss", ["-ltnH", `sport = :${f.port}`], { encoding: "utf8" }).trim().split("\n")[0]!;
      const somaxconn = Number(await readFile("/proc/sys/net/core/somaxconn", "utf8"));
      expect(Number(line.split(/\s+/)[2])).toBe(Math.min(LISTEN_BACKLOG, somaxconn));
    } finally {
      await f.server.destroy(2000);
    }
  });
});
