/**
 * `kmi agent` as a process (dist/cmd/kmi.js, built by `npm test` / `npx tsc -p tsconfig.json`):
 * --help, configuration errors, and a real run against the fixture Auditserver and KDC —
 * enrollment from KMI_AGENT_JOIN_TOKEN, a signature over the socket, clean exit on SIGTERM,
 * also when the SIGTERM comes while the agent waits for the Auditserver's Attest answer.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { verify } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SignatureAlgorithm } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { FixtureAudit } from "../../fixtures/agent/fixture-audit.js";
import { FixtureKdc } from "../../fixtures/agent/fixture-kdc.js";
import { AgentGrpcClient } from "../../fixtures/agent/grpc-client.js";
import { makeInfra, type TestInfra } from "../../fixtures/agent/infra.js";
import { intermediateSecret, makeIntermediate, makeRoot, makeSigningKey, signingSecret, type TestSigningKey } from "../../fixtures/agent/tenant-ca.js";

const kmi = new URL("../../../dist/cmd/kmi.js", import.meta.url).pathname;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(args: string[], env: Record<string, string> = {}, timeoutMs = 15_000): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [kmi, ...args], { env: { PATH: process.env["PATH"] ?? "", ...env } });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const t = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`kmi ${args.join(" ")} did not exit; stderr: ${stderr}`));
    }, timeoutMs);
    child.on("exit", (code) => {
      clearTimeout(t);
      resolve({ code, stdout, stderr });
    });
  });
}

let dir: string;
let infra: TestInfra;
let audit: FixtureAudit;
let kdc: FixtureKdc;
let signer: TestSigningKey;
let child: ChildProcess | undefined;

beforeAll(async () => {
  expect(existsSync(kmi), "dist/cmd/kmi.js is missing: run `npx tsc -p tsconfig.json` first").toBe(true);
  dir = mkdtempSync(join(tmpdir(), "kmi-agent-cli-"));
  infra = makeInfra();
  writeFileSync(join(dir, "infra-ca.pem"), infra.pem);
  writeFileSync(join(dir, "agent.json"), JSON.stringify({ "log-level": "info", "heartbeat-timeout-ms": 5000 }));
  audit = new FixtureAudit(infra);
  await audit.start();
  kdc = new FixtureKdc(infra, audit.tokenKey.publicKey, { heartbeatMs: 1000 });
  await kdc.start();
  const root = makeRoot(Date.now() - 86_400_000);
  signer = makeSigningKey("acme", "signer");
  kdc.tenants.set("acme", [intermediateSecret(makeIntermediate(root, "acme", 1, { now: Date.now() - 86_400_000 })), signingSecret(signer)]);
});

afterAll(async () => {
  child?.kill("SIGKILL");
  await kdc?.stop();
  await audit?.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe("kmi agent", () => {
  it("--help lists the flags with their environment variables", async () => {
    const r = await run(["agent", "--help"]);
    expect(r.code).toBe(0);
    for (const s of ["usage: kmi agent", "--socket <path>", "--socket-group", "--state-dir", "--audit-url", "--kdc-url", "--ca-file", "--join-token-file", "KMI_AGENT_JOIN_TOKEN", "--measure", "--max-leaf-lifetime-days", "default 47"]) {
      expect(r.stdout).toContain(s);
    }
  });

  it("a missing required flag is one line on stderr and exit 2", async () => {
    const r = await run(["agent", "--kdc-url", "https://localhost:1", "--ca-file", join(dir, "infra-ca.pem")]);
    expect(r.code).toBe(2);
    expect(r.stderr.trim()).toBe('kmi agent: --audit-url is required (or KMI_AGENT_AUDIT_URL, or "audit-url" in the config file)');
  });

  it("a first start without a join token says how to enroll", async () => {
    const r = await run(["agent", "--audit-url", audit.url, "--kdc-url", kdc.url, "--ca-file", join(dir, "infra-ca.pem"), "--state-dir", join(dir, "unenrolled"), "--socket", join(dir, "u.sock")]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/this machine is not enrolled .* give a join token for the first start with --join-token-file, KMI_AGENT_JOIN_TOKEN/);
  });

  it("enrolls from KMI_AGENT_JOIN_TOKEN, syncs, signs over its socket and exits 0 on SIGTERM", async () => {
    audit.joinTokens.set("kmij_cli_token", "edge");
    const socket = join(dir, "agent.sock");
    const args = [
      kmi,
      "agent",
      "--config",
      join(dir, "agent.json"),
      "--audit-url",
      audit.url,
      "--kdc-url",
      kdc.url,
      "--ca-file",
      join(dir, "infra-ca.pem"),
      "--state-dir",
      join(dir, "state"),
      "--socket",
      socket,
      "--measure",
      `agent.config=${join(dir, "agent.json")}`,
    ];
    let stderr = "";
    const proc = spawn(process.execPath, args, { env: { PATH: process.env["PATH"] ?? "", KMI_AGENT_JOIN_TOKEN: "kmij_cli_token" } });
    child = proc;
    proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => proc.on("exit", (code) => resolve(code)));

    const t0 = Date.now();
    while (!existsSync(socket) && Date.now() - t0 < 10_000) await new Promise((r) => setTimeout(r, 50));
    expect(existsSync(socket), stderr).toBe(true);
    expect(statSync(socket).mode & 0o777).toBe(0o600);
    const client = new AgentGrpcClient(socket);
    try {
      for (let i = 0; i < 200 && !(await client.unary("getStatus", {})).kdcConnected; i++) await new Promise((r) => setTimeout(r, 25));
      const st = await client.unary("getStatus", {});
      expect(st.kdcConnected).toBe(true);
      expect(st.machineId).toMatch(/^m-[0-9a-f]{16}$/);
      const res = await client.unary("sign", { keyId: "acme/signer", message: Buffer.from("from a process"), algorithm: SignatureAlgorithm.ECDSA_SHA256 });
      expect(verify("sha256", Buffer.from("from a process"), { key: signer.publicKey, dsaEncoding: "der" }, res.signature)).toBe(true);
    } finally {
      client.close();
    }
    // The join token never reaches the log; the log is JSON lines.
    expect(stderr).not.toContain("kmij_cli_token");
    proc.kill("SIGTERM");
    const code = await Promise.race([exited, new Promise<"timeout">((r) => setTimeout(() => r("timeout"), 10_000))]);
    expect(code, stderr).toBe(0);
    expect(existsSync(socket)).toBe(false);
    const lines = stderr.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.some((l) => l["msg"] === "enrolled")).toBe(true);
    expect(lines.some((l) => l["msg"] === "message signed" && l["tenant"] === "acme")).toBe(true);
    expect(lines.at(-1)).toMatchObject({ msg: "exiting", code: 0 });
    child = undefined;
  });

  it("exits 0 within seconds on SIGTERM while it waits for the Auditserver's Attest answer", async () => {
    audit.joinTokens.set("kmij_cli_slow", "edge");
    let arrived = () => {};
    const attesting = new Promise<void>((r) => (arrived = r));
    let answer = () => {};
    const answered = new Promise<void>((r) => (answer = r));
    // A slow Auditserver: Attest answers 6 s late (or when the test ends), long after the SIGTERM.
    audit.beforeAttest = async () => {
      arrived();
      await Promise.race([answered, new Promise((r) => setTimeout(r, 6000))]);
    };
    const socket = join(dir, "slow.sock");
    const args = [kmi, "agent", "--audit-url", audit.url, "--kdc-url", kdc.url, "--ca-file", join(dir, "infra-ca.pem"), "--state-dir", join(dir, "state-slow"), "--socket", socket];
    let stderr = "";
    const proc = spawn(process.execPath, args, { env: { PATH: process.env["PATH"] ?? "", KMI_AGENT_JOIN_TOKEN: "kmij_cli_slow" } });
    child = proc;
    proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => proc.on("exit", (code) => resolve(code)));
    try {
      const got = await Promise.race([attesting.then(() => "attesting" as const), exited.then(() => "exited" as const), new Promise<"timeout">((r) => setTimeout(() => r("timeout"), 10_000))]);
      expect(got, stderr).toBe("attesting");
      proc.kill("SIGTERM");
      // Stop wins over the attestation in flight: the agent neither waits for the answer nor
      // opens its watch stream after it (which kept it running until kmi up's SIGKILL).
      const code = await Promise.race([exited, new Promise<"timeout">((r) => setTimeout(() => r("timeout"), 4000))]);
      expect(code, stderr).toBe(0);
      expect(existsSync(socket)).toBe(false);
      const lines = stderr.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(lines.at(-1)).toMatchObject({ msg: "exiting", code: 0 });
      child = undefined;
    } finally {
      audit.beforeAttest = undefined;
      answer();
    }
  });
});
