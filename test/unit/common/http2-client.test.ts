/**
 * The shared HTTP/2 client transport (src/common/http2-client.ts): a server that shuts down
 * (GOAWAY on an idle session) at the moment the program closes the transport must not crash
 * the process; and with `expectedService`, a server whose certificate chains to the
 * infrastructure CA and names the host but is another kmi service is refused before any call.
 */
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createPeerClient } from "../../../src/agent/client.js";
import { createGrpcClientTransport } from "../../../src/common/http2-client.js";
import { serverClients } from "../../../src/clients/mesh-health.js";
import { Health } from "../../../src/gen/grpc/health/v1/health_pb.js";
import { AuditService } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { DistributionService } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { createAuditClient } from "../../../src/kdc/audit-client.js";
import { makeInfra, serviceTls, type TestInfra } from "../../fixtures/agent/infra.js";
import { goawayWhileClosing } from "../../helpers/goaway-race.js";

it("a GOAWAY that arrives while the transport is being closed does not crash the process", async () => {
  const uncaught = await goawayWhileClosing("peer", (url, caPem) => {
    const t = createGrpcClientTransport({ baseUrl: url, tls: { ca: caPem } });
    const health = createClient(Health, t.transport);
    return { call: () => health.check({ service: "" }), close: () => t.close() };
  });
  expect(uncaught).toEqual([]);
});

describe("expectedService: the server must carry kmi://service/<name>", () => {
  let infra: TestInfra;
  const servers: { name: string; url: string; server: http2.Http2SecureServer; calls: number }[] = [];
  const urlOf = (name: string) => servers.find((s) => s.name === name)!.url;
  const callsOf = (name: string) => servers.find((s) => s.name === name)!.calls;

  beforeAll(async () => {
    infra = makeInfra();
    // One server per identity; every call is answered trailers-only UNIMPLEMENTED (gRPC) or 404 (Connect).
    for (const name of ["audit", "kdc", "watcher"]) {
      const tls = serviceTls(infra, name);
      const server = http2.createSecureServer({ cert: tls.cert, key: tls.key, allowHTTP1: true });
      const entry = { name, url: "", server, calls: 0 };
      server.on("request", (req, res) => {
        entry.calls++;
        if (req.httpVersion === "2.0") res.writeHead(200, { "content-type": "application/grpc", "grpc-status": "12" }).end();
        else res.writeHead(404).end();
      });
      await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
      entry.url = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
      servers.push(entry);
    }
  });
  afterAll(async () => {
    for (const s of servers) await new Promise<void>((r) => s.server.close(() => r()));
  });

  async function codeOf(p: Promise<unknown>): Promise<{ code: Code; message: string }> {
    const err = await p.then(
      () => undefined,
      (e: unknown) => e,
    );
    const ce = ConnectError.from(err);
    return { code: ce.code, message: ce.rawMessage };
  }

  it("the KDC's Auditserver client refuses another kmi service posing as the Auditserver", async () => {
    const before = callsOf("watcher");
    const posing = createAuditClient({ url: urlOf("watcher"), caPem: infra.pem, certPem: "", keyPem: "" });
    const r = await codeOf(posing.client.getAttestationKey({}));
    posing.close();
    expect(r.message).toContain("is not the audit: its certificate has kmi://service/watcher, not kmi://service/audit");
    expect(callsOf("watcher")).toBe(before);
    // The real Auditserver's identity passes the check (and the call reaches it).
    const real = createAuditClient({ url: urlOf("audit"), caPem: infra.pem, certPem: "", keyPem: "" });
    const ok = await codeOf(real.client.getAttestationKey({}));
    real.close();
    expect(ok.code).toBe(Code.Unimplemented);
  });

  it("the agent's clients expect the KDC for kmi.kdc.v1 and the Auditserver for kmi.audit.v1", async () => {
    const kdcAtAudit = createPeerClient(DistributionService, urlOf("audit"), { caPem: infra.pem });
    const r1 = await codeOf(kdcAtAudit.client.fetchSecrets({}));
    kdcAtAudit.close();
    expect(r1.message).toContain("is not the kdc: its certificate has kmi://service/audit, not kmi://service/kdc");
    const auditAtKdc = createPeerClient(AuditService, urlOf("kdc"), { caPem: infra.pem });
    const r2 = await codeOf(auditAtKdc.client.getAttestationNonce({}));
    auditAtKdc.close();
    expect(r2.message).toContain("is not the audit");
    const good = createPeerClient(DistributionService, urlOf("kdc"), { caPem: infra.pem });
    const r3 = await codeOf(good.client.fetchSecrets({}));
    good.close();
    expect(r3.code).toBe(Code.Unimplemented);
  });

  it("the operator's Connect clients (kmi up, kmi ctl status) check the identity too", async () => {
    const posing = serverClients({ url: urlOf("watcher"), caPem: infra.pem, expectedService: "kdc" });
    const r = await codeOf(posing.health.check({ service: "" }));
    posing.close();
    expect(r.message).toContain("is not the kdc");
    const real = serverClients({ url: urlOf("kdc"), caPem: infra.pem, expectedService: "kdc" });
    const ok = await codeOf(real.health.check({ service: "" }));
    real.close();
    // Reached the server (its 404 is Connect's "unimplemented"), so TLS and the identity passed.
    expect(ok.code).toBe(Code.Unimplemented);
  });
});
