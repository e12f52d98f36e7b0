/**
 * Test harness for the KDC's integration suites: data dirs made by `kmi kdc init`, real KDC
 * processes (`node dist/cmd/kmi.js kdc` on port 0, address read from its log), gRPC clients
 * over TLS, `kmi ctl` runs, and openssl.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type { DescService } from "@bufbuild/protobuf";

const run = promisify(execFile);

/** Repository root and the built CLI. */
export const ROOT = resolve(import.meta.dirname, "../../..");
export const KMI = join(ROOT, "dist/cmd/kmi.js");

/** A temp directory removed by `cleanup`. */
export async function tempDir(prefix = "kmi-kdc-"): Promise<string> {
  return mkdtemp(join(tmpdir(), prefix));
}

/** An initialized data dir and its first operator token. */
export interface DataDir {
  dir: string;
  dataDir: string;
  tokenFile: string;
  token: string;
  caFile: string;
  rootFile: string;
}

/** Runs `kmi kdc init` in a new temp dir. */
export async function initDataDir(extra: string[] = []): Promise<DataDir> {
  const dir = await tempDir();
  const dataDir = join(dir, "data");
  const tokenFile = join(dir, "operator.token");
  const init = await run(process.execPath, [KMI, "kdc", "init", "--data-dir", dataDir, "--token-file", tokenFile, ...extra], { env: cleanEnv(), encoding: "utf8" });
  const token = (await readFile(tokenFile, "utf8")).trim();
  // With --token-file the token goes to the file only: stdout often ends up in a log.
  if (init.stdout.includes(token) || !init.stdout.includes(tokenFile)) throw new Error(`kdc init printed the operator token, or not where it went:\n${init.stdout}`);
  return { dir, dataDir, tokenFile, token, caFile: join(dataDir, "infra-ca.pem"), rootFile: join(dataDir, "kmi-root.pem") };
}

/** The environment without any KMI_* variable of the caller. */
export function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("KMI_")) env[k] = v;
  return { ...env, ...extra };
}

/** A running KDC process. */
export interface KdcProcess {
  proc: ChildProcess;
  address: string;
  url: string;
  stderr: () => string;
  /** Sends `signal` and resolves with the exit code (or signal name). */
  stop(signal?: NodeJS.Signals): Promise<number | string>;
}

/** Starts `kmi kdc` on 127.0.0.1:0 and waits for its "kdc serving" log line. */
export async function startKdc(dataDir: string, extra: string[] = [], env: Record<string, string> = {}): Promise<KdcProcess> {
  const proc = spawn(process.execPath, [KMI, "kdc", "--data-dir", dataDir, "--listen", "127.0.0.1:0", ...extra], {
    env: cleanEnv(env),
    stdio: ["ignore", "pipe", "pipe"],
  });
  let err = "";
  const exited = new Promise<number | string>((res) => proc.once("exit", (code, sig) => res(code ?? sig ?? -1)));
  const address = await new Promise<string>((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`kdc did not start in 15 s: ${err}`)), 15_000);
    proc.stderr!.on("data", (b: Buffer) => {
      err += b.toString();
      const m = /"msg":"kdc serving".*?"address":"([^"]+)"/.exec(err);
      if (m) {
        clearTimeout(timer);
        res(m[1]!);
      }
    });
    void exited.then((c) => {
      clearTimeout(timer);
      rej(new Error(`kdc exited (${c}) before serving: ${err}`));
    });
  });
  return {
    proc,
    address,
    url: `https://${address}`,
    stderr: () => err,
    async stop(signal = "SIGTERM") {
      if (proc.exitCode !== null || proc.signalCode !== null) return proc.exitCode ?? proc.signalCode ?? -1;
      proc.kill(signal);
      return exited;
    },
  };
}

/** gRPC-over-TLS clients of a KDC, with an optional bearer token and client certificate. */
export function clients(url: string, caPem: string, opts: { token?: string; cert?: string; key?: string } = {}) {
  const auth: Interceptor = (next) => async (req) => {
    if (opts.token !== undefined) req.header.set("authorization", `Bearer ${opts.token}`);
    return next(req);
  };
  const transport = createGrpcTransport({
    baseUrl: url,
    interceptors: [auth],
    nodeOptions: { ca: caPem, ...(opts.cert !== undefined ? { cert: opts.cert, key: opts.key } : {}) },
  });
  return <S extends DescService>(service: S): Client<S> => createClient(service, transport);
}

/** Result of a `kmi ctl` run. */
export interface CtlResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `kmi ctl <args>` against a KDC. */
export async function ctl(kdc: { url: string }, data: { caFile: string; tokenFile?: string }, args: string[], env: Record<string, string> = {}): Promise<CtlResult> {
  const e = cleanEnv({ KMI_CTL_KDC: kdc.url, KMI_CTL_CA_FILE: data.caFile, ...(data.tokenFile ? { KMI_CTL_TOKEN_FILE: data.tokenFile } : {}), ...env });
  try {
    const r = await run(process.execPath, [KMI, "ctl", ...args], { env: e, encoding: "utf8", maxBuffer: 16 << 20 });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const x = err as { code?: number; stdout?: string; stderr?: string };
    if (typeof x.code !== "number") throw err;
    return { code: x.code, stdout: x.stdout ?? "", stderr: x.stderr ?? "" };
  }
}

/** Runs openssl; resolves with stdout+stderr, rejects on a non-zero exit. */
export async function openssl(args: string[], cwd?: string): Promise<string> {
  const r = await run("openssl", args, { encoding: "utf8", ...(cwd ? { cwd } : {}) });
  return r.stdout + r.stderr;
}

/** Runs openssl and returns its exit code and output without throwing. */
export async function opensslStatus(args: string[], cwd?: string): Promise<{ code: number; out: string }> {
  try {
    return { code: 0, out: await openssl(args, cwd) };
  } catch (err) {
    const x = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof x.code === "number" ? x.code : 1, out: (x.stdout ?? "") + (x.stderr ?? "") };
  }
}

/** A private CA made with openssl: root key and certificate, and a signer of CSRs. */
export interface PrivateCa {
  rootPem: string;
  rootFile: string;
  /** Signs a CSR (PEM) as an intermediate CA (or, with `ca: false`, as a leaf); returns the certificate PEM. */
  sign(csrPem: string, opts?: { ca?: boolean; days?: number }): Promise<string>;
}

/** Makes a private root CA with openssl in `dir`. */
export async function makePrivateCa(dir: string, name: string): Promise<PrivateCa> {
  const key = join(dir, `${name}.key`);
  const rootFile = join(dir, `${name}.pem`);
  await openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-subj", `/CN=${name}/O=Test Private CA`, "-days", "30", "-out", rootFile]);
  let n = 0;
  return {
    rootPem: await readFile(rootFile, "utf8"),
    rootFile,
    async sign(csrPem, opts = {}) {
      n++;
      const csr = join(dir, `${name}-${n}.csr`);
      const ext = join(dir, `${name}-${n}.ext`);
      const out = join(dir, `${name}-${n}.pem`);
      await writeFile(csr, csrPem);
      await writeFile(
        ext,
        opts.ca === false
          ? "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:leaf.example\n"
          : "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
      );
      await openssl(["x509", "-req", "-in", csr, "-CA", rootFile, "-CAkey", key, "-set_serial", String(1000 + n), "-days", String(opts.days ?? 10), "-extfile", ext, "-out", out]);
      return readFile(out, "utf8");
    },
  };
}

/** Removes temp dirs. */
export async function cleanup(...dirs: string[]): Promise<void> {
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
}
