/**
 * Machine identity against a real KDC and a real Auditserver: groups and join tokens through
 * `kmi ctl`, enrollment over TLS, renewal over mutual TLS, certificates judged by openssl.
 */
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { auditClients, ctl, KMI, sh, startMesh, TestMachine, type Mesh } from "./harness.js";

let mesh: Mesh;
beforeAll(async () => {
  mesh = await startMesh();
  for (const [name, extra] of [["edge", ["--tenant", "acme"]], ["core", ["--all-tenants"]]] as const) {
    const r = await ctl(mesh, ["group", "create", name, ...extra]);
    expect(r, r.stderr).toMatchObject({ code: 0 });
    const a = await ctl(mesh, ["group", "approve-measurements", name, "--measurement", `agent.code=${"a".repeat(64)}`]);
    expect(a, a.stderr).toMatchObject({ code: 0 });
  }
});
afterAll(async () => mesh?.close());

async function joinToken(group: string, extra: string[] = []): Promise<string> {
  const r = await ctl(mesh, ["join-token", "create", group, "--json", ...extra]);
  expect(r, r.stderr).toMatchObject({ code: 0 });
  return JSON.parse(r.stdout).secret as string;
}

function codeOf(err: unknown): string {
  return ConnectError.from(err).code.toString();
}

describe("groups through kmi ctl", () => {
  it("refuses group create without --tenant or --all-tenants before calling the Auditserver, and makes nothing", async () => {
    const r = await ctl(mesh, ["group", "create", "nobody"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^kmi ctl: give --tenant <id> \(repeatable\) for the tenants this group serves, or --all-tenants to serve every tenant/);
    const list = await ctl(mesh, ["group", "list", "--json"]);
    expect(JSON.parse(list.stdout).groups.map((g: { name: string }) => g.name)).not.toContain("nobody");
  });

  it("lists an all-tenants group as * and carries allTenants in --json", async () => {
    const human = await ctl(mesh, ["group", "list"]);
    expect(human.code).toBe(0);
    expect(human.stdout).toMatch(/^core\s+\*\s/m);
    expect(human.stdout).toMatch(/^edge\s+acme\s/m);
    const list = await ctl(mesh, ["group", "list", "--json"]);
    const groups = JSON.parse(list.stdout).groups as { name: string; tenantIds: string[]; allTenants: boolean }[];
    expect(groups.find((g) => g.name === "core")).toMatchObject({ tenantIds: [], allTenants: true });
    expect(groups.find((g) => g.name === "edge")).toMatchObject({ tenantIds: ["acme"], allTenants: false });
  });
});

describe("enrollment with a real KDC", () => {
  it("gives a token of group edge an edge identity: URI SAN and OU as openssl reads them, chained to the infrastructure CA", async () => {
    const m = new TestMachine(mesh);
    const res = await m.enroll(await joinToken("edge"), "proxy-7.example");
    expect(res.group).toBe("edge");
    expect(res.caPem.trim()).toBe(mesh.caPem.trim());
    const certFile = join(mesh.dir, `${m.machineId}.pem`);
    await writeFile(certFile, res.certificatePem);
    const text = await sh("openssl", ["x509", "-noout", "-text", "-in", certFile]);
    expect(text.code).toBe(0);
    expect(text.out).toContain(`URI:kmi://machine/${m.machineId}`);
    expect(text.out).toMatch(/Subject: .*OU ?= ?edge/);
    expect(text.out).toMatch(new RegExp(`Subject: .*CN ?= ?${m.machineId}`));
    expect(text.out).toContain("TLS Web Client Authentication");
    expect(text.out).toMatch(/CA:FALSE/);
    const verify = await sh("openssl", ["verify", "-CAfile", mesh.caFile, "-purpose", "sslclient", certFile]);
    expect(verify).toMatchObject({ code: 0, out: expect.stringContaining(": OK") });

    const shown = await ctl(mesh, ["machine", "show", m.machineId]);
    expect(shown.stdout).toMatch(/group:\s+edge/);
    expect(shown.stdout).toMatch(/hostname:\s+proxy-7\.example/);
    expect(shown.stdout).toContain(m.certSha256);
  });

  it("gives a token of group core a core identity", async () => {
    const m = new TestMachine(mesh);
    await m.enroll(await joinToken("core"));
    const certFile = join(mesh.dir, `${m.machineId}.pem`);
    await writeFile(certFile, m.certPem);
    expect((await sh("openssl", ["x509", "-noout", "-subject", "-in", certFile])).out).toMatch(/OU ?= ?core/);
    const list = await ctl(mesh, ["machine", "list", "--group", "core", "--json"]);
    expect(JSON.parse(list.stdout).machines.map((x: { machineId: string }) => x.machineId)).toContain(m.machineId);
  });

  it("refuses the same token a second time", async () => {
    const token = await joinToken("edge");
    await new TestMachine(mesh).enroll(token);
    const second = new TestMachine(mesh);
    const err = await second.enroll(token).catch((e: unknown) => e);
    expect(ConnectError.from(err).code).toBe(16); // UNAUTHENTICATED
    expect(ConnectError.from(err).rawMessage).toMatch(/^join_token: already used at .* a join token works once/);
  });

  it("refuses a token once its TTL has passed (the Auditserver's clock moved on by 120 s)", async () => {
    const token = await joinToken("edge", ["--ttl", "60"]);
    await mesh.restartAudit(["--clock-offset-seconds", "120"]);
    try {
      const err = await new TestMachine(mesh).enroll(token).catch((e: unknown) => e);
      expect(ConnectError.from(err).code).toBe(16);
      expect(ConnectError.from(err).rawMessage).toMatch(/^join_token: expired at /);
    } finally {
      await mesh.restartAudit();
    }
    // The refusal burnt nothing: at the real time the token still works.
    await expect(new TestMachine(mesh).enroll(token)).resolves.toMatchObject({ group: "edge" });
  });

  it("renews over mutual TLS with the current certificate, and refuses without one", async () => {
    const m = new TestMachine(mesh);
    await m.enroll(await joinToken("edge"));
    const old = m.certSha256;
    const res = await m.mtls().audit.renewMachineCertificate({ csrPem: m.csrPem() });
    m.certPem = res.certificatePem;
    expect(m.certSha256).not.toBe(old);
    const show = JSON.parse((await ctl(mesh, ["machine", "show", m.machineId, "--json"])).stdout);
    expect(show.machine.certificateSha256).toBe(m.certSha256);
    const err = await auditClients(mesh).audit.renewMachineCertificate({ csrPem: m.csrPem() }).catch((e: unknown) => e);
    expect(codeOf(err)).toBe("16");
    expect(ConnectError.from(err).rawMessage).toMatch(/client certificate required/);
  });

  it("refuses an operator call without a token, and answers GetAttestationKey over the Connect protocol (JSON)", async () => {
    const err = await auditClients(mesh).admin.listGroups({}).catch((e: unknown) => e);
    expect(codeOf(err)).toBe("16");
    const r = await sh("curl", ["-sS", "--cacert", mesh.caFile, "-H", "content-type: application/json", "-d", "{}", `${mesh.audit.url}/kmi.audit.v1.AuditService/GetAttestationKey`]);
    expect(r.code).toBe(0);
    const body = JSON.parse(r.out);
    expect(body.publicKeyPem).toContain("BEGIN PUBLIC KEY");
    expect(body.keyId).toMatch(/^[A-Za-z0-9_-]{43}$/);
  });

  it("init refuses an initialized data dir; --reissue-certificate replaces only the TLS identity; serve refuses an empty dir", async () => {
    const m = new TestMachine(mesh);
    await m.enroll(await joinToken("edge"));
    await mesh.stopAudit();
    const args = ["audit", "init", "--data-dir", mesh.auditDataDir, "--kdc", mesh.kdc.url, "--kdc-ca-file", mesh.caFile, "--token-file", mesh.tokenFile];
    const again = await sh(process.execPath, [KMI, ...args]);
    expect(again.code).toBe(1);
    expect(again.out).toMatch(/is initialized already/);
    const keyBefore = await readFile(join(mesh.auditDataDir, "attestation-key.pem"), "utf8");
    const reissue = await sh(process.execPath, [KMI, ...args, "--reissue-certificate"]);
    expect(reissue.code, reissue.out).toBe(0);
    expect(reissue.out).toMatch(/re-issued the Auditserver's TLS certificate/);
    expect(await readFile(join(mesh.auditDataDir, "attestation-key.pem"), "utf8")).toBe(keyBefore);
    await mesh.restartAudit();
    // Machines and their certificates survive; the server presents the new certificate.
    await expect(m.mtls().audit.renewMachineCertificate({ csrPem: m.csrPem() })).resolves.toBeTruthy();
    const empty = await sh(process.execPath, [KMI, "audit", "--data-dir", join(mesh.dir, "nothing-here"), "--listen", "127.0.0.1:0"]);
    expect(empty.code).toBe(1);
    expect(empty.out).toMatch(/^kmi audit: data dir .* is not initialized; run `kmi audit init/m);
    const log = await ctl(mesh, ["audit", "tail", "--server", "audit", "--json"]);
    expect(JSON.parse(log.stdout).entries.map((e: { action: string }) => e.action)).toContain("audit.tls.reissue");
  });
});
