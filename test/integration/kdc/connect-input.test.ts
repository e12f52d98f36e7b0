/**
 * What a real KDC process does with input that is too large or quietly wrong, on each protocol
 * its Connect server speaks:
 * - an upload of 10 MB (over the 4 MiB message limit) is RESOURCE_EXHAUSTED naming the limit
 *   over gRPC, gRPC-Web and Connect, from connect-node clients whose HTTP/2 session would
 *   otherwise refuse every frame (ENHANCE_YOUR_CALM), and the next call on the same client works;
 *   the same through `kmi ctl ca upload`;
 * - a misspelled field in Connect JSON is INVALID_ARGUMENT naming the field.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { readFile } from "node:fs/promises";
import { Code, ConnectError, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KdcAdminService } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { run } from "../../helpers/process.js";
import { cleanup, clients, ctl, initDataDir, startKdc, type DataDir, type KdcProcess } from "./harness.js";

let data: DataDir;
let kdc: KdcProcess;
let caPem: string;

beforeAll(async () => {
  data = await initDataDir();
  kdc = await startKdc(data.dataDir);
  caPem = await readFile(data.caFile, "utf8");
  await clients(kdc.url, caPem, { token: data.token })(KdcAdminService).createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
});

afterAll(async () => {
  await kdc?.stop("SIGKILL");
  await cleanup(data?.dir);
});

const TEN_MB = 10 * 1024 * 1024;

describe("an oversized request", () => {
  const transports: [string, (auth: Interceptor) => Transport][] = [
    ["gRPC", (auth) => createGrpcTransport({ baseUrl: kdc.url, interceptors: [auth], nodeOptions: { ca: caPem } })],
    ["gRPC-Web", (auth) => createGrpcWebTransport({ baseUrl: kdc.url, httpVersion: "2", interceptors: [auth], nodeOptions: { ca: caPem } })],
    ["Connect", (auth) => createConnectTransport({ baseUrl: kdc.url, httpVersion: "2", interceptors: [auth], nodeOptions: { ca: caPem } })],
  ];

  it.each(transports)("over %s: RESOURCE_EXHAUSTED naming the limit, twice, and the next calls on the same client succeed", async (_name, make) => {
    const auth: Interceptor = (next) => async (req) => {
      req.header.set("authorization", `Bearer ${data.token}`);
      return next(req);
    };
    const transport = make(auth);
    const ca = createClient(KdcService, transport);
    const admin = createClient(KdcAdminService, transport);
    for (let round = 0; round < 2; round++) {
      const err = await ca.uploadIntermediate({ tenantId: "acme", certificate: new Uint8Array(TEN_MB) }).then(
        () => undefined,
        (e: unknown) => ConnectError.from(e),
      );
      expect(err?.code, err?.message).toBe(Code.ResourceExhausted);
      expect(err?.rawMessage).toContain("readMaxBytes 4194304");
      const next = await admin.listTenants({});
      expect(next.tenants.map((t) => t.tenantId)).toEqual(["acme"]);
    }
    // Nothing changed: the tenant still has only its first version.
    expect((await ca.listVersions({ tenantId: "acme" })).versions.map((v) => v.version)).toEqual([1]);
  });

  it("through kmi ctl ca upload: RESOURCE_EXHAUSTED with the limit, not INTERNAL", async () => {
    const big = join(data.dir, "huge.pem");
    await writeFile(big, Buffer.alloc(TEN_MB, 0x41));
    const r = await ctl(kdc, data, ["ca", "upload", "--tenant", "acme", "--cert", big]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/ResourceExhausted: message size \d+ is larger than configured readMaxBytes 4194304/);
    expect(r.stderr).not.toContain("ENHANCE_YOUR_CALM");
  });
});

describe("Connect JSON with a field the message does not have", () => {
  const post = (method: string, body: string) =>
    run("curl", ["-sS", "--http2", "--cacert", data.caFile, "-H", "content-type: application/json", "-H", `authorization: Bearer ${data.token}`, "-d", body, "-w", "\n%{http_code}", `${kdc.url}/kmi.kdc.v1.${method}`]);

  it.each([
    ["a misspelled field", "KdcService/ListVersions", '{"tenantID":"acme"}', "tenantID"],
    ["an extra field beside a right one", "KdcAdminService/GetTenant", '{"tenantId":"acme","verbose":true}', "verbose"],
    ["a misspelled nested field", "KdcService/CreateVersion", '{"tenantId":"acme","signer":"SIGNER_KMI_ROOT","subject":{"commonNam":"x"}}', "commonNam"],
  ])("%s is 400 invalid_argument naming it", async (_name, method, body, field) => {
    const r = await post(method, body);
    const [json, status] = r.stdout.split("\n");
    expect(status).toBe("400");
    const e = JSON.parse(json!) as { code: string; message: string };
    expect(e.code).toBe("invalid_argument");
    expect(e.message).toContain(`"${field}"`);
  });

  it("the same request spelled right is served", async () => {
    const r = await post("KdcService/ListVersions", '{"tenantId":"acme"}');
    const [json, status] = r.stdout.split("\n");
    expect(status).toBe("200");
    expect((JSON.parse(json!) as { versions: unknown[] }).versions).toHaveLength(1);
  });
});
