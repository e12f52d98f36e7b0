/**
 * A real ICAP service for the proxy's scanner tests and its ICAP bench row: Debian's c-icap with its virus_scan module over clamd
 * (ClamAV), in a temp folder. No signature can be downloaded, so the database is made here
 * with ClamAV's own `sigtool`: an MD5 signature (.hdb) of one exact test body, and body
 * signatures (.ndb) for a marker string and the EICAR test file (ClamAV finds EICAR only with
 * a signature for it). clamd listens on a Unix socket in the folder, c-icap on a free port
 * (it cannot take port 0); both run in the foreground in process groups of their own, killed
 * with SIGKILL by {@link IcapPeer.stop}.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { EICAR } from "../../src/proxy/eicar.js";
import { freePort } from "./ports.js";

/** Test bodies the database knows. */
export const MARKER = Buffer.from("KMI-ICAP-TEST-MALWARE-SIGNATURE-5d1c9e", "latin1");
/** The name ClamAV gives a body carrying {@link MARKER}. */
export const MARKER_THREAT = "Kmi.Test.Marker.UNOFFICIAL";

/** The name ClamAV gives {@link IcapPeer.hashedBody} (sigtool names an MD5 signature after its file). */
export const HASHED_THREAT = "hashed.bin.UNOFFICIAL";

/** A running c-icap + clamd. */
export interface IcapPeer {
  readonly dir: string;
  readonly port: number;
  /** The virus_scan service URL (alias with allow204=on and mode=simple). */
  readonly url: string;
  /** A body detected by its MD5 only (no marker, no EICAR). */
  readonly hashedBody: Buffer;
  /** c-icap's log, for a failing test's message. */
  log(): string;
  /** SIGKILLs c-icap (clamd stays); {@link IcapPeer.restart} brings it back on the same port. */
  killIcap(): Promise<void>;
  /** Starts c-icap again after {@link IcapPeer.killIcap}. */
  restart(): Promise<void>;
  /** SIGKILLs both and removes the folder. */
  stop(): Promise<void>;
}


function hexOf(b: Buffer): string {
  return b.toString("hex");
}

function killGroup(p: ChildProcess | undefined): Promise<void> {
  if (p === undefined || p.exitCode !== null || p.signalCode !== null || p.pid === undefined) return Promise.resolve();
  return new Promise((resolve) => {
    p.once("exit", () => resolve());
    try {
      // The group holds the program and any child it forked (c-icap runs its servers as children).
      process.kill(-p.pid!, "SIGKILL");
    } catch {
      resolve();
    }
  });
}

async function until(what: string, fn: () => Promise<boolean>, timeoutMs: number, log: () => string): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await fn())) {
    if (Date.now() > end) throw new Error(`${what}: not ready within ${timeoutMs} ms\n${log()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function probe(target: { path: string } | { port: number }, send: string, expect: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = "path" in target ? connect(target.path) : connect({ host: "127.0.0.1", port: target.port });
    let got = "";
    const done = (ok: boolean): void => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(2000, () => done(false));
    s.on("error", () => done(false));
    s.on("connect", () => s.write(send));
    s.on("data", (d) => {
      got += d.toString("latin1");
      if (got.includes(expect)) done(true);
    });
    s.on("close", () => done(got.includes(expect)));
  });
}

/** Starts clamd and c-icap with a test database. */
export async function startIcapPeer(): Promise<IcapPeer> {
  const dir = mkdtempSync(join(tmpdir(), "kmi-icap-"));
  const db = join(dir, "db");
  const tmp = join(dir, "tmp");
  execFileSync("mkdir", ["-p", db, tmp]);
  const hashedBody = Buffer.concat([Buffer.from("kmi icap test body known by its md5 only\n"), randomBytes(32)]);
  writeFileSync(join(dir, "hashed.bin"), hashedBody);
  // sigtool --md5 prints "md5:size:name" for the file: the .hdb line.
  writeFileSync(join(db, "kmi-test.hdb"), execFileSync("sigtool", ["--md5", join(dir, "hashed.bin")]));
  writeFileSync(join(db, "kmi-test.ndb"), [`Kmi.Test.Marker:0:*:${hexOf(MARKER)}`, `Kmi.Test.Eicar:0:*:${hexOf(EICAR)}`, ""].join("\n"));
  const clamdSock = join(dir, "clamd.sock");
  writeFileSync(
    join(dir, "clamd.conf"),
    [`LocalSocket ${clamdSock}`, `DatabaseDirectory ${db}`, "Foreground yes", `TemporaryDirectory ${tmp}`, `LogFile ${join(dir, "clamd.log")}`, "MaxThreads 4", ""].join("\n"),
  );
  const port = await freePort();
  writeFileSync(
    join(dir, "c-icap.conf"),
    [
      `PidFile ${join(dir, "c-icap.pid")}`,
      `CommandsSocket ${join(dir, "c-icap.ctl")}`,
      "Timeout 60",
      "MaxKeepAliveRequests 1000",
      "KeepAliveTimeout 600",
      "StartServers 1",
      "MaxServers 1",
      "MinSpareThreads 2",
      "MaxSpareThreads 20",
      "ThreadsPerChild 20",
      `Port 127.0.0.1:${port}`,
      `TmpDir ${tmp}`,
      "MaxMemObject 131072",
      "DebugLevel 1",
      "ModulesDir /usr/lib/x86_64-linux-gnu/c_icap",
      "ServicesDir /usr/lib/x86_64-linux-gnu/c_icap",
      "TemplateDir /usr/share/c_icap/templates/",
      "TemplateDefaultLanguage en",
      "LoadMagicFile /etc/c-icap/c-icap.magic",
      `ServerLog ${join(dir, "server.log")}`,
      `AccessLog ${join(dir, "access.log")}`,
      // clamd_mod talks to clamd over its socket (clamav_mod would load the database into c-icap itself).
      "Module common clamd_mod.so",
      `clamd_mod.ClamdSocket ${clamdSock}`,
      "Service virus_scan virus_scan.so",
      // mode=simple: the whole body is scanned before the answer (other modes send bodies past the preview back empty).
      "ServiceAlias avscan virus_scan?allow204=on&mode=simple",
      "virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GIF JPEG MSOFFICE",
      "virus_scan.MaxObjectSize 64M",
      "virus_scan.DefaultEngine clamd",
      "",
    ].join("\n"),
  );
  let out = "";
  const keep = (p: ChildProcess): void => {
    p.stdout?.on("data", (d: Buffer) => (out = (out + d.toString()).slice(-8000)));
    p.stderr?.on("data", (d: Buffer) => (out = (out + d.toString()).slice(-8000)));
  };
  const log = (): string => out;
  const clamd = spawn("clamd", [`--config-file=${join(dir, "clamd.conf")}`], { detached: true, stdio: ["ignore", "pipe", "pipe"] });
  keep(clamd);
  let icap: ChildProcess | undefined;
  const startIcap = async (): Promise<void> => {
    icap = spawn("c-icap", ["-N", "-D", "-f", join(dir, "c-icap.conf")], { detached: true, stdio: ["ignore", "pipe", "pipe"] });
    keep(icap);
    const options = `OPTIONS icap://127.0.0.1:${port}/avscan ICAP/1.0\r\nHost: 127.0.0.1:${port}\r\nEncapsulated: null-body=0\r\n\r\n`;
    await until("c-icap", () => probe({ port }, options, "ISTag"), 60_000, log);
  };
  try {
    await until("clamd", () => probe({ path: clamdSock }, "zPING\0", "PONG"), 120_000, log);
    await startIcap();
  } catch (err) {
    await killGroup(icap);
    await killGroup(clamd);
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    dir,
    port,
    url: `icap://127.0.0.1:${port}/avscan`,
    hashedBody,
    log,
    killIcap: () => killGroup(icap),
    restart: startIcap,
    async stop() {
      await killGroup(icap);
      await killGroup(clamd);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
