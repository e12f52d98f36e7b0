/**
 * A local etcd cluster on loopback, for the benchmark and the tests (test/fixtures/storage
 * re-exports it): N members (default 3) of the system's `etcd` (Debian `etcd-server`) on random
 * ports, TLS for clients and peers with client certificates required (`--client-cert-auth`,
 * `--peer-client-cert-auth`), from a throw-away CA made with openssl; data in a temp dir.
 * `leader()` names the Raft leader (fault tests kill it), `restart()` starts a killed member again,
 * `stop()` SIGKILLs every member and removes the dir.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freePort } from "./ports.js";

/** Paths of a certificate and its key. */
export interface CertFiles {
  cert: string;
  key: string;
}

/** Result of an `etcdctl` run. */
export interface EtcdctlResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** One running member. */
export interface EtcdMember {
  /** Member name (m0, m1, …). */
  name: string;
  /** Its client URL. */
  endpoint: string;
  /** The process. */
  child: ChildProcess;
  /** What it wrote on stderr so far (the last 64 KiB). */
  stderr(): string;
}

/** A running cluster and what a client needs to reach it. */
export interface EtcdCluster {
  /** Client URLs of every member. */
  endpoints: string[];
  /** The members. */
  members: EtcdMember[];
  /** PEM of the CA, and of a client certificate and key it signed. */
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  /** The same as files, for etcdctl and kmi's flags. */
  files: { ca: string; cert: string; key: string };
  /** A client certificate from a CA the cluster does not trust. */
  strangerFiles: CertFiles;
  /** Runs `etcdctl` (API v3) against the cluster with the client certificate. */
  etcdctl(args: readonly string[]): Promise<EtcdctlResult>;
  /** The member that is the Raft leader now (asked of the members that run), or undefined during an election. */
  leader(): Promise<EtcdMember | undefined>;
  /** Starts a stopped (killed) member again on its data dir, where it rejoins the cluster; resolves once every member is healthy. */
  restart(member: EtcdMember): Promise<void>;
  /** SIGKILLs every member and removes the data. */
  stop(): Promise<void>;
}

function exec(cmd: string, args: readonly string[], env: Record<string, string> = {}): Promise<EtcdctlResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { env: { ...process.env, ...env }, timeout: 20_000, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof (err as { code?: unknown }).code === "number" ? ((err as { code: number }).code) : null;
      resolve({ code, stdout, stderr });
    });
  });
}

async function openssl(args: string[]): Promise<void> {
  const r = await exec("openssl", args);
  if (r.code !== 0) throw new Error(`openssl ${args[0]} failed: ${r.stderr.slice(-1000)}`);
}

async function makeCa(dir: string, name: string, cn: string): Promise<CertFiles> {
  const f = { cert: join(dir, `${name}.pem`), key: join(dir, `${name}.key`) };
  await openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f.key, "-out", f.cert, "-days", "2", "-subj", `/CN=${cn}`, "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
  return f;
}

async function makeLeaf(dir: string, name: string, ca: CertFiles, ext: string): Promise<CertFiles> {
  const f = { cert: join(dir, `${name}.pem`), key: join(dir, `${name}.key`) };
  const csr = join(dir, `${name}.csr`);
  const extFile = join(dir, `${name}.ext`);
  await writeFile(extFile, `basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n${ext}\n`);
  await openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f.key, "-out", csr, "-subj", `/CN=${name}`]);
  await openssl(["x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial", "0x" + randomBytes(12).toString("hex"), "-out", f.cert, "-days", "2", "-extfile", extFile]);
  return f;
}


/** Parses `etcdctl endpoint status -w json`: endpoint -> [its member id, the leader's id] (decimal strings: ids exceed 2^53). */
function parseStatus(stdout: string): Map<string, [string, string]> {
  const out = new Map<string, [string, string]>();
  if (!stdout.trim().startsWith("[")) return out;
  const rows = JSON.parse(stdout.replace(/":\s*(\d{16,})/g, '":"$1"')) as Array<{ Endpoint: string; Status: { header: { member_id: string | number }; leader: string | number } }>;
  for (const r of rows) out.set(r.Endpoint, [String(r.Status.header.member_id), String(r.Status.leader)]);
  return out;
}

function startMember(name: string, args: string[]): EtcdMember {
  const child = spawn("etcd", args, { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (err = (err + d).slice(-65536)));
  child.once("error", (e) => (err += `\n${e.message}`));
  return { name, endpoint: "", child, stderr: () => err };
}

async function kill(members: EtcdMember[]): Promise<void> {
  await Promise.all(
    members.map((m) =>
      m.child.exitCode !== null || m.child.signalCode !== null
        ? undefined
        : new Promise<void>((resolve) => {
            m.child.once("exit", () => resolve());
            m.child.kill("SIGKILL");
          }),
    ),
  );
}

/** Starts a cluster of `size` members and waits until it answers over TLS (at most 60 s). */
export async function startEtcdCluster(size = 3): Promise<EtcdCluster> {
  const dir = await mkdtemp(join(tmpdir(), "kmi-etcd-"));
  const members: EtcdMember[] = [];
  try {
    const ca = await makeCa(dir, "etcd-ca", "kmi local etcd CA");
    const stranger = await makeCa(dir, "stranger-ca", "a CA etcd does not trust");
    // Members use one certificate as server (for clients and peers) and as client (to peers).
    const member = await makeLeaf(dir, "member", ca, "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1");
    const client = await makeLeaf(dir, "client", ca, "extendedKeyUsage=clientAuth");
    const strangerFiles = await makeLeaf(dir, "stranger", stranger, "extendedKeyUsage=clientAuth");
    const ports = await Promise.all(Array.from({ length: size * 2 }, () => freePort()));
    const peerUrl = (i: number) => `https://127.0.0.1:${ports[2 * i + 1]}`;
    const initialCluster = Array.from({ length: size }, (_, i) => `m${i}=${peerUrl(i)}`).join(",");
    const memberArgs = new Map<string, string[]>();
    for (let i = 0; i < size; i++) {
      const endpoint = `https://127.0.0.1:${ports[2 * i]}`;
      const args = [
        "--name", `m${i}`,
        "--data-dir", join(dir, `m${i}`),
        "--listen-client-urls", endpoint,
        "--advertise-client-urls", endpoint,
        "--listen-peer-urls", peerUrl(i),
        "--initial-advertise-peer-urls", peerUrl(i),
        "--initial-cluster", initialCluster,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", `kmi-${process.pid}-${ports[0]}`,
        "--client-cert-auth", "--trusted-ca-file", ca.cert, "--cert-file", member.cert, "--key-file", member.key,
        "--peer-client-cert-auth", "--peer-trusted-ca-file", ca.cert, "--peer-cert-file", member.cert, "--peer-key-file", member.key,
        "--logger", "zap", "--log-level", "error",
      ];
      memberArgs.set(`m${i}`, args);
      const m = startMember(`m${i}`, args);
      m.endpoint = endpoint;
      members.push(m);
    }
    const files = { ca: ca.cert, cert: client.cert, key: client.key };
    const endpoints = members.map((m) => m.endpoint);
    const etcdctl = (args: readonly string[]) =>
      exec("etcdctl", [`--endpoints=${endpoints.join(",")}`, `--cacert=${files.ca}`, `--cert=${files.cert}`, `--key=${files.key}`, ...args], { ETCDCTL_API: "3" });
    await waitHealthy(members, etcdctl);
    return {
      endpoints,
      members,
      ca: await readFile(files.ca),
      cert: await readFile(files.cert),
      key: await readFile(files.key),
      files,
      strangerFiles,
      etcdctl,
      async leader() {
        const live = members.filter((m) => m.child.exitCode === null && m.child.signalCode === null);
        const r = await exec("etcdctl", [`--endpoints=${live.map((m) => m.endpoint).join(",")}`, `--cacert=${files.ca}`, `--cert=${files.cert}`, `--key=${files.key}`, "endpoint", "status", "-w", "json"], { ETCDCTL_API: "3" });
        const status = parseStatus(r.stdout);
        return live.find((m) => {
          const s = status.get(m.endpoint);
          return s !== undefined && s[1] !== "0" && s[0] === s[1];
        });
      },
      async restart(member) {
        const i = members.indexOf(member);
        if (i < 0) throw new Error(`etcd member ${member.name} is not of this cluster`);
        if (member.child.exitCode === null && member.child.signalCode === null) throw new Error(`etcd member ${member.name} still runs`);
        const again = startMember(member.name, memberArgs.get(member.name)!);
        again.endpoint = member.endpoint;
        members[i] = again;
        await waitHealthy(members, etcdctl);
      },
      async stop() {
        await kill(members);
        await rm(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await kill(members);
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}

async function waitHealthy(members: EtcdMember[], etcdctl: (args: readonly string[]) => Promise<EtcdctlResult>): Promise<void> {
  const end = Date.now() + 60_000;
  for (;;) {
    for (const m of members) {
      if (m.child.exitCode !== null || m.child.signalCode !== null) {
        throw new Error(`etcd ${m.name} exited at start (is etcd-server installed? apt-get install etcd-server): ${m.stderr().slice(-2000)}`);
      }
    }
    const r = await etcdctl(["endpoint", "health"]);
    if (r.code === 0) return;
    if (Date.now() > end) throw new Error(`etcd cluster not healthy within 60 s: ${r.stderr.slice(-2000)}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}
