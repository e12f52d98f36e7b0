import { X509Certificate, createPublicKey } from "node:crypto";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { MachineStatus } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { Tables } from "../../../src/audit/store.js";
import { asPeer, makeHarness, newMachineKey, type Harness } from "./harness.js";
import { enrollMachine, expectCode, joinToken, lastEntry, makeGroup } from "./flows.js";

let h: Harness;
beforeEach(async () => {
  h = await makeHarness();
  await makeGroup(h, "edge");
  await makeGroup(h, "core");
});
afterEach(async () => h.close());

describe("enrollment", () => {
  it("gives a machine certificate of the token's group, signed by the infrastructure CA", async () => {
    const { csrPem, key } = newMachineKey();
    const res = await h.audit.enroll({ joinToken: await joinToken(h, "core"), csrPem, hostname: "proxy-1.example" });
    expect(res.machineId).toMatch(/^m-[0-9a-f]{16}$/);
    expect(res.group).toBe("core");
    const cert = new X509Certificate(res.certificatePem);
    expect(cert.verify(new X509Certificate(res.caPem).publicKey)).toBe(true);
    expect(cert.subjectAltName).toBe(`URI:kmi://machine/${res.machineId}`);
    expect(cert.subject).toContain("OU=core");
    expect(cert.publicKey.export({ type: "spki", format: "der" })).toEqual(createPublicKey(key).export({ type: "spki", format: "der" }));
    const machine = await h.store.get(Tables.machines, res.machineId);
    expect(machine).toMatchObject({ group: "core", hostname: "proxy-1.example", status: MachineStatus.ACTIVE });
    expect(machine!.certificateSha256).toBe(cert.fingerprint256.replaceAll(":", "").toLowerCase());
    expect(await lastEntry(h)).toMatchObject({ action: "machine.enroll", outcome: "ok", target: `machine/${res.machineId}` });
  });

  it("refuses the same token a second time and changes nothing", async () => {
    const token = await joinToken(h);
    const first = await h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" });
    const before = await h.snapshot();
    const issued = h.kdc.issued;
    await expectCode(h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" }), "unauthenticated", new RegExp(`already used .*machine ${first.machineId}`));
    expect(await h.snapshot()).toEqual(before);
    expect(h.kdc.issued).toBe(issued);
    expect(await lastEntry(h)).toMatchObject({ action: "machine.enroll", outcome: "refused: unauthenticated" });
  });

  it("lets exactly one of eight concurrent enrollments with one token through (no lock: a conditional batch)", async () => {
    const token = await joinToken(h);
    const results = await Promise.allSettled(Array.from({ length: 8 }, () => h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" })));
    const ok = results.filter((r) => r.status === "fulfilled");
    expect(ok).toHaveLength(1);
    const machineId = (ok[0] as PromiseFulfilledResult<{ machineId: string }>).value.machineId;
    for (const r of results.filter((x) => x.status === "rejected")) expect(String((r as PromiseRejectedResult).reason)).toMatch(new RegExp(`already used .*machine ${machineId}`));
    const machines: string[] = [];
    for await (const [id] of h.store.iterate(Tables.machines)) machines.push(id);
    expect(machines).toEqual([machineId]);
    expect(await h.ctx.audit.verify()).toMatchObject({ ok: true });
  });

  it("refuses an expired token (the clock past its TTL) and changes nothing", async () => {
    const token = await joinToken(h, "edge", 60);
    h.clock.advance(60);
    const before = await h.snapshot();
    await expectCode(h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" }), "unauthenticated", /join_token: expired at 2030-01-01T00:01:00\.000Z/);
    expect(await h.snapshot()).toEqual(before);
    expect(await lastEntry(h)).toMatchObject({ outcome: "refused: unauthenticated", details: expect.objectContaining({ reason: expect.stringMatching(/expired/) }) });
  });

  it("accepts a token one second before it expires", async () => {
    const token = await joinToken(h, "edge", 60);
    h.clock.advance(59);
    await expect(h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" })).resolves.toMatchObject({ group: "edge" });
  });

  it("answers an unknown token and a wrong secret alike", async () => {
    const token = await joinToken(h);
    const wrongSecret = token.slice(0, -1) + (token.endsWith("A") ? "B" : "A");
    const unknownId = "kmij_0123456789abcdef_" + token.split("_").slice(2).join("_");
    const a = await expectCode(h.audit.enroll({ joinToken: wrongSecret, csrPem: newMachineKey().csrPem, hostname: "" }), "unauthenticated");
    const b = await expectCode(h.audit.enroll({ joinToken: unknownId, csrPem: newMachineKey().csrPem, hostname: "" }), "unauthenticated");
    expect(a.rawMessage).toBe(b.rawMessage);
    // The right secret still works: a wrong guess does not burn the token.
    await expect(h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" })).resolves.toBeTruthy();
  });

  it("lets exactly one of two concurrent enrollments with one token win", async () => {
    const token = await joinToken(h);
    const results = await Promise.allSettled([1, 2, 3].map(() => h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" })));
    expect(results.filter((r) => r.status === "fulfilled")).toHaveLength(1);
    let machines = 0;
    for await (const _ of h.store.iterate(Tables.machines)) machines++;
    expect(machines).toBe(1);
  });

  it.each<[string, () => Promise<{ joinToken: string; csrPem: string; hostname: string }>, string, RegExp]>([
    ["no token", async () => ({ joinToken: "", csrPem: newMachineKey().csrPem, hostname: "" }), "invalid_argument", /^join_token: required/],
    ["a malformed token", async () => ({ joinToken: "kmi_abc", csrPem: newMachineKey().csrPem, hostname: "" }), "invalid_argument", /^join_token: not a join token/],
    ["no CSR", async () => ({ joinToken: await joinToken(h), csrPem: "", hostname: "" }), "invalid_argument", /^csr_pem: required/],
    ["a garbage CSR", async () => ({ joinToken: await joinToken(h), csrPem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", hostname: "" }), "invalid_argument", /^csr_pem: /],
    ["a CSR with a broken signature", async () => {
      const { csrPem } = newMachineKey();
      const der = Buffer.from(csrPem.replace(/-----[^-]+-----/g, "").replace(/\s/g, ""), "base64");
      der[der.length - 3]! ^= 0xff;
      return { joinToken: await joinToken(h), csrPem: `-----BEGIN CERTIFICATE REQUEST-----\n${der.toString("base64")}\n-----END CERTIFICATE REQUEST-----\n`, hostname: "" };
    }, "invalid_argument", /^csr_pem: /],
    ["a bad hostname", async () => ({ joinToken: await joinToken(h), csrPem: newMachineKey().csrPem, hostname: "a b" }), "invalid_argument", /^hostname: /],
  ])("refuses %s before the token is touched", async (_name, make, code, message) => {
    const req = await make();
    const before = await h.snapshot();
    await expectCode(h.audit.enroll(req), code, message);
    expect(await h.snapshot()).toEqual(before);
    expect((await lastEntry(h)).outcome).toBe(`refused: ${code}`);
  });

  it("logs each refusal exactly once, whichever layer refused it", async () => {
    const token = await joinToken(h);
    await h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" });
    for (const req of [
      { joinToken: "bad", csrPem: newMachineKey().csrPem, hostname: "" }, // the validation layer
      { joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" }, // the domain layer
    ]) {
      const { seq } = await h.ctx.audit.head();
      await expectCode(h.audit.enroll(req), req.joinToken === "bad" ? "invalid_argument" : "unauthenticated");
      expect((await h.ctx.audit.head()).seq).toBe(seq + 1n);
    }
  });

  it("a flood of unknown join tokens writes at most the address's budget; a replayed real token is always written", async () => {
    const token = await joinToken(h);
    await h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" });
    const { seq } = await h.ctx.audit.head();
    const { csrPem } = newMachineKey();
    const unknown = "kmij_0123456789abcdef_" + token.split("_").slice(2).join("_");
    const started = performance.now();
    for (let i = 0; i < 60; i++) await expectCode(h.audit.enroll({ joinToken: unknown, csrPem, hostname: "" }), "unauthenticated");
    // The burst (30), plus what the budget refilled meanwhile (30 a minute, by the monotonic clock).
    const refilled = Math.ceil((performance.now() - started) / 2000);
    const flood = (await h.ctx.audit.tail({ afterSeq: seq, limit: 1000 })).filter((e) => e.action === "machine.enroll");
    expect(flood.length).toBeGreaterThan(0);
    expect(flood.length).toBeLessThanOrEqual(30 + refilled);
    expect(flood.length).toBeLessThan(60);
    // The log says it was flooded.
    const summary = (await h.ctx.audit.tail({ afterSeq: seq, limit: 1000 })).find((e) => e.action === "audit.refusals_suppressed");
    expect(summary?.actor).toBe("system");
    expect(Number(summary?.details["suppressed_refusals"])).toBeGreaterThan(0);
    // The holder of a real (used) token proved it knows the secret: its refusals are never budgeted.
    for (let i = 0; i < 3; i++) {
      const before = (await h.ctx.audit.head()).seq;
      await expectCode(h.audit.enroll({ joinToken: token, csrPem, hostname: "" }), "unauthenticated", /already used/);
      expect((await h.ctx.audit.head()).seq).toBe(before + 1n);
      expect((await lastEntry(h)).outcome).toBe("refused: unauthenticated");
    }
  });

  it("never leaks the token into the audit log", async () => {
    const token = await joinToken(h);
    await h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" });
    // The reuse must be refused (and audited as such) for the scan below to cover a refusal entry.
    await expectCode(h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" }), "unauthenticated", /already used/);
    expect((await lastEntry(h)).outcome).toMatch(/^refused/);
    const secret = token.split("_").slice(2).join("_");
    for (const e of await h.ctx.audit.tail({ limit: 1000 })) expect(JSON.stringify(e, (_k, v) => (typeof v === "bigint" ? String(v) : v))).not.toContain(secret);
  });

  it("refuses a certificate from the KDC that names another machine, and records nothing", async () => {
    const token = await joinToken(h);
    const before = await h.snapshot();
    h.kdc.wrongMachineNext = true;
    await expectCode(h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" }), "internal");
    expect(await h.snapshot()).toEqual(before);
    await expect(h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" })).resolves.toBeTruthy();
  });

  it("is UNAVAILABLE when the KDC is down, and the token still works afterwards", async () => {
    const token = await joinToken(h);
    h.kdc.down = true;
    await expectCode(h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" }), "unavailable");
    h.kdc.down = false;
    await expect(h.audit.enroll({ joinToken: token, csrPem: newMachineKey().csrPem, hostname: "" })).resolves.toBeTruthy();
  });
});

describe("renewal", () => {
  it("issues a new certificate for the same machine and keeps the previous one usable once", async () => {
    const m = await enrollMachine(h);
    const next = newMachineKey();
    h.clock.advance(3600);
    const res = await h.audit.renewMachineCertificate({ csrPem: next.csrPem }, asPeer(m.certificateDer));
    const cert = new X509Certificate(res.certificatePem);
    expect(cert.subjectAltName).toBe(`URI:kmi://machine/${m.machineId}`);
    const record = await h.store.get(Tables.machines, m.machineId);
    expect(record!.certificateSha256).toBe(cert.fingerprint256.replaceAll(":", "").toLowerCase());
    expect(record!.previousCertificateSha256).toBe(new X509Certificate(m.certificatePem).fingerprint256.replaceAll(":", "").toLowerCase());
    // The new certificate works; the one before the previous does not.
    const renewed = new Uint8Array(cert.raw);
    await h.audit.renewMachineCertificate({ csrPem: next.csrPem }, asPeer(renewed));
    await expectCode(h.audit.renewMachineCertificate({ csrPem: next.csrPem }, asPeer(m.certificateDer)), "unauthenticated", /not the current certificate/);
  });

  it.each<[string, (m: { certificateDer: Uint8Array }) => { headers: Record<string, string> } | undefined, string, RegExp]>([
    ["no client certificate", () => undefined, "unauthenticated", /client certificate required/],
    ["an untrusted certificate", (m) => asPeer(m.certificateDer, false), "unauthenticated", /not trusted/],
  ])("refuses %s", async (_name, peer, code, message) => {
    const m = await enrollMachine(h);
    const before = await h.snapshot();
    await expectCode(h.audit.renewMachineCertificate({ csrPem: newMachineKey().csrPem }, peer(m)), code, message);
    expect(await h.snapshot()).toEqual(before);
    expect((await lastEntry(h)).outcome).toBe(`refused: ${code}`);
  });
});
