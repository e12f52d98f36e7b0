/**
 * mitmdump (Debian package `mitmproxy`) as the peer proxy: started on a free loopback port
 * with its own config dir (a fresh CA), verifying the origin against the bench origin CA,
 * quiet; stopped with SIGTERM (SIGKILL after a deadline).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { createConnection } from "node:net";
import { join } from "node:path";
import { freePort } from "./ports.js";

/** A running mitmdump. */
export interface Mitm {
  readonly port: number;
  readonly pid: number;
  /** Its CA certificate, PEM (what a client trusts). */
  readonly caPem: string;
  readonly version: string;
  stop(): Promise<void>;
}

/** mitmdump's version line, or undefined when it is not installed. */
export function mitmVersion(): string | undefined {
  const r = spawnSync("mitmdump", ["--version"], { encoding: "utf8", timeout: 20_000 });
  if (r.error !== undefined || r.status !== 0) return undefined;
  return /Mitmproxy:\s*(\S+)/.exec(r.stdout)?.[1] ?? r.stdout.split("\n")[0]?.trim();
}


function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = createConnection({ host: "127.0.0.1", port });
    c.once("connect", () => {
      c.destroy();
      resolve(true);
    });
    c.once("error", () => resolve(false));
  });
}

/** Starts mitmdump; resolves once it accepts connections and its CA exists. */
export async function startMitm(dir: string, originCaPem: string): Promise<Mitm> {
  const version = mitmVersion();
  if (version === undefined) throw new Error("mitmdump is not installed");
  await mkdir(dir, { recursive: true });
  const originCaFile = join(dir, "origin-ca.pem");
  await writeFile(originCaFile, originCaPem);
  const port = await freePort();
  let err = "";
  const proc: ChildProcess = spawn(
    "mitmdump",
    [
      "--listen-host", "127.0.0.1",
      "--listen-port", String(port),
      "--set", `confdir=${dir}`,
      "--set", `ssl_verify_upstream_trusted_ca=${originCaFile}`,
      "--set", "termlog_verbosity=error",
      "--set", "flow_detail=0",
      "-q",
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  proc.stderr?.on("data", (b: Buffer) => {
    err = (err + b.toString()).slice(-4000);
  });
  const exited = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
  const stop = async () => {
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill("SIGTERM");
    const timer = setTimeout(() => proc.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(timer);
  };
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`mitmdump exited (${proc.exitCode}): ${err.trim()}`);
    if (await canConnect(port)) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`mitmdump did not listen within 30 s: ${err.trim()}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const caPem = await readFile(join(dir, "mitmproxy-ca-cert.pem"), "utf8");
  return { port, pid: proc.pid ?? -1, caPem, version, stop };
}
