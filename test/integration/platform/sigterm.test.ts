/**
 * SIGTERM during an in-flight call: the call completes, the process exits 0. The server runs as
 * a real process (test/fixtures/platform/server-main.ts, under tsx), on both stacks.
 */
import { stat } from "node:fs/promises";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FIXTURE_ROOT_PEM } from "../../fixtures/platform/services.js";
import { REPO_ROOT, clients, insecure, tlsCredentials, unary, unixTarget } from "../../helpers/grpc-clients.js";
import { makeTestPki, type TestPki } from "../../helpers/pki.js";
import { makeTempDir, run, spawnProcess, type Spawned, type TempDir } from "../../helpers/process.js";

const MAIN = join(REPO_ROOT, "test/fixtures/platform/server-main.ts");

let tmp: TempDir;
let pki: TestPki;
const running: Spawned[] = [];

beforeAll(async () => {
  tmp = await makeTempDir("kmi-sigterm-");
  pki = await makeTestPki(tmp.path);
});

afterAll(async () => {
  for (const p of running) p.kill();
  await tmp?.cleanup();
});

function startServer(stack: string, sock: string, extra: string[] = []): Spawned {
  const p = spawnProcess(process.execPath, [
    "--import", "tsx", MAIN,
    "--stack", stack, "--unix", sock, "--listen", "127.0.0.1:0",
    "--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--tls-ca", pki.ca.cert,
    ...extra,
  ], { cwd: REPO_ROOT });
  running.push(p);
  return p;
}

function logLines(p: Spawned): Record<string, unknown>[] {
  return p
    .stderr()
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

describe.each(["connect", "grpc"])("%s stack as a process", (stack) => {
  it("finishes the in-flight call after SIGTERM, refuses new work, and exits 0", async () => {
    const sock = join(tmp.path, `${stack}.sock`);
    const p = startServer(stack, sock);
    const ready = JSON.parse(await p.waitForLine(/"ready":true/)) as { port: number; unix: string };
    expect(ready.unix).toBe(sock);

    const kdc = new clients.kdcAdmin(unixTarget(sock), insecure());
    const tlsKdc = new clients.kdcAdmin(`localhost:${ready.port}`, tlsCredentials(pki.ca.cert));
    try {
      // Warm both connections up so that the slow call is the only thing in flight.
      expect((await unary(kdc, "GetTrustBundle", {})).ok).toBe(true);
      expect((await unary(tlsKdc, "GetTrustBundle", {})).ok).toBe(true);
      const slowUnix = unary(kdc, "GetTrustBundle", {}, { "kmi-fixture-delay-ms": "1200" });
      const slowTls = unary(tlsKdc, "GetTrustBundle", {}, { "kmi-fixture-delay-ms": "1200" });
      // Both calls are in their handlers.
      await p.waitForLine(/"delayed_calls":2\b/);
      const t0 = Date.now();
      expect(p.child.kill("SIGTERM")).toBe(true);

      const expected = { ok: true, value: { kmi_root_pem: FIXTURE_ROOT_PEM, infrastructure_ca_pem: FIXTURE_ROOT_PEM } };
      expect(await slowUnix).toEqual(expected);
      expect(await slowTls).toEqual(expected);
      const exit = await p.exited;
      expect(exit).toEqual({ code: 0, signal: null });
      // It waited for the calls (about 900 ms left), not for the 10 s deadline.
      expect(Date.now() - t0).toBeGreaterThanOrEqual(700);
      expect(Date.now() - t0).toBeLessThan(8000);

      const msgs = logLines(p).map((l) => l["msg"]);
      expect(msgs).toEqual(expect.arrayContaining(["started", "signal received; shutting down", "shutting down", "stopped", "exiting"]));
      const stopped = logLines(p).find((l) => l["msg"] === "stopped");
      expect(stopped?.["forced"]).toBe(false);
      // The socket file is gone, and nothing answers any more.
      await expect(stat(sock)).rejects.toMatchObject({ code: "ENOENT" });
      const after = await unary(kdc, "GetTrustBundle", {}, {}, 1500);
      expect(after).toMatchObject({ ok: false, code: grpc.status.UNAVAILABLE });
    } finally {
      kdc.close();
      tlsKdc.close();
    }
  });

  it("exits 1 at once on a second signal while calls are still running", async () => {
    const sock = join(tmp.path, `${stack}-2.sock`);
    const p = startServer(stack, sock, ["--shutdown-timeout-ms", "30000"]);
    await p.waitForLine(/"ready":true/);
    const kdc = new clients.kdcAdmin(unixTarget(sock), insecure());
    try {
      expect((await unary(kdc, "GetTrustBundle", {})).ok).toBe(true);
      void unary(kdc, "GetTrustBundle", {}, { "kmi-fixture-delay-ms": "20000" });
      await p.waitForLine(/"delayed_calls":1\b/);
      p.child.kill("SIGTERM");
      // Shutting down, and still waiting for the call.
      await p.waitForLine(/"msg":"shutting down"/, 20_000, "stderr");
      expect(p.child.exitCode).toBe(null);
      p.child.kill("SIGINT");
      const exit = await p.exited;
      expect(exit).toEqual({ code: 1, signal: null });
      expect(logLines(p).some((l) => l["msg"] === "second signal; exiting without waiting for in-flight calls")).toBe(true);
    } finally {
      kdc.close();
    }
  });
});

describe("the fixture program's configuration", () => {
  it("prints --help generated from its options, and refuses an unknown flag with a clear message", async () => {
    const help = await run(process.execPath, ["--import", "tsx", MAIN, "--help"], { cwd: REPO_ROOT });
    expect(help.code).toBe(0);
    expect(help.stdout).toContain("--unix <path>");
    expect(help.stdout).toContain("env KMI_FIXTURE_SOCKET_MODE");
    const bad = await run(process.execPath, ["--import", "tsx", MAIN, "--no-such-flag"], { cwd: REPO_ROOT });
    expect(bad.code).toBe(2);
    expect(bad.stderr).toBe("server-main: unknown flag --no-such-flag; run `server-main --help` for the list\n");
  });
});
