/**
 * `kmi proxy`: flags/env/config → ProxyConfig → ProxyServer → run until SIGTERM/SIGINT, with
 * SIGHUP rereading the policy and reopening the access log. A configuration mistake is one
 * stderr line and exit 2; a start failure propagates to cmd/kmi.ts (one stderr line, exit 1).
 * Also `kmi proxy hash-password`, which makes the tenants file's `passwordHash` of a proxy user.
 */
import type { EventEmitter } from "node:events";
import { parseArgs } from "node:util";
import { ConfigError, describeConfig, formatHelp, loadConfig } from "../common/config.js";
import { runUntilSignal } from "../common/lifecycle.js";
import { createLogger, type Logger } from "../common/logger.js";
import { proxyProgram, resolveProxyConfig, type ProxyConfig } from "./config.js";
import { ProxyPrimary } from "./primary.js";
import { logFdLimit } from "./fd-limit.js";
import { ProxyServer, type ProxyAddress } from "./server.js";
import { hashPassword } from "./tenants.js";
import { isProxyWorker, runProxyWorker, workerId } from "./worker.js";

/** What tests change about a run (the process's signals and exit by default). */
export interface RunProxyOptions {
  /** Where signals come from. */
  signalSource?: EventEmitter;
  /** Exits the process. */
  exit?: (code: number) => void;
  /** Called with the bound address once listening. */
  onStarted?: (address: ProxyAddress, server: ProxyServer) => void;
  /** Called with the bound address once every worker listens (`--workers`). */
  onPrimaryStarted?: (address: ProxyAddress, primary: ProxyPrimary) => void;
  /** Where --help (and hash-password's hash) goes. */
  stdout?: (text: string) => void;
  /** Where a configuration error goes. */
  stderr?: (text: string) => void;
  /** Where hash-password reads the password; default `process.stdin`. */
  stdin?: NodeJS.ReadableStream & { isTTY?: boolean };
  /** The script workers run (`--workers`); default this process's (`dist/cmd/kmi.js`), with `proxy` and the same flags. */
  workerScript?: string;
}

const COMMANDS_HELP = ["", "commands:", "  kmi proxy hash-password --help   make a proxy user's passwordHash for the tenants file"].join("\n");

/** Longest password `hash-password` takes, bytes (a Basic credential travels in one header). */
const MAX_PASSWORD_BYTES = 1024;
/** Shorter passwords get a warning: they are guessable even through scrypt. */
const SHORT_PASSWORD_CHARS = 16;

const HASH_PASSWORD_HELP = [
  "usage: kmi proxy hash-password < password-file",
  "",
  "Reads one proxy user's password from stdin (one line; the trailing newline is dropped) and prints its passwordHash",
  "for the tenants file: scrypt$N$r$p$salt$hash (N=16384, r=8, p=1, a random 16-byte salt and a 32-byte hash, both",
  "base64). The password itself is never printed. Use a random token, not a word:",
  "",
  "  umask 077; openssl rand -base64 24 > bob.password",
  "  kmi proxy hash-password < bob.password",
  '  # tenants file: "users": [{"name": "bob", "passwordHash": "<the line printed>"}]',
  "  # the client sends bob:<the password> as its proxy credentials (Proxy-Authorization: Basic)",
  "",
  "flags:",
  "  -h, --help   show this help",
  "",
  "exit codes: 0 ok; 2 a wrong flag, or an empty, multi-line or too long (> 1024 bytes) password",
].join("\n");

/** Reads stdin to its end (a terminal: to the first newline), keeping at most a little past the limit. */
async function readPassword(stdin: NodeJS.ReadableStream & { isTTY?: boolean }): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of stdin) {
    const b = typeof chunk === "string" ? Buffer.from(chunk, "utf8") : (chunk as Buffer);
    chunks.push(b);
    size += b.length;
    if (size > MAX_PASSWORD_BYTES + 2 || (stdin.isTTY === true && b.includes(0x0a))) break;
  }
  return Buffer.concat(chunks);
}

/** `kmi proxy hash-password`: password on stdin, passwordHash on stdout; resolves with the exit code. */
export async function runHashPassword(argv: string[], o: RunProxyOptions = {}): Promise<number> {
  const out = o.stdout ?? ((t: string) => void process.stdout.write(t));
  const err = o.stderr ?? ((t: string) => void process.stderr.write(t));
  const fail = (message: string): number => {
    err(`kmi proxy hash-password: ${message}\n`);
    return 2;
  };
  let help: boolean | undefined;
  try {
    help = parseArgs({ args: argv, options: { help: { type: "boolean", short: "h" } }, strict: true, allowPositionals: false }).values.help;
  } catch (e) {
    const code = (e as { code?: string }).code;
    // A positional argument is most likely the password itself: say so, never echo it.
    if (code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL") return fail("unexpected argument; the password goes on stdin, never on the command line");
    const flag = /'([^']+)'/.exec((e as Error).message)?.[1] ?? "";
    return fail(`unknown flag ${flag}; run \`kmi proxy hash-password --help\``);
  }
  if (help === true) {
    out(HASH_PASSWORD_HELP + "\n");
    return 0;
  }
  const stdin = o.stdin ?? process.stdin;
  if (stdin.isTTY === true) err("password (shown as typed; end with Enter): ");
  let text = (await readPassword(stdin)).toString("utf8");
  if (stdin.isTTY === true) text = text.split("\n")[0] ?? "";
  text = text.replace(/\r?\n$/, "");
  // Never the password in a message: only what is wrong with it.
  if (text === "") return fail("stdin: no password; give it on stdin, e.g. kmi proxy hash-password < bob.password");
  if (/[\r\n]/.test(text)) return fail("stdin: more than one line; give only the password");
  if (Buffer.byteLength(text, "utf8") > MAX_PASSWORD_BYTES) return fail(`stdin: the password is longer than ${MAX_PASSWORD_BYTES} bytes`);
  if ([...text].length < SHORT_PASSWORD_CHARS) {
    err(`kmi proxy hash-password: warning: a password of fewer than ${SHORT_PASSWORD_CHARS} characters is weak; use a random token (openssl rand -base64 24)\n`);
  }
  out((await hashPassword(text)) + "\n");
  return 0;
}

/** Runs the proxy (or its `hash-password` command); resolves with the exit code. */
export async function runProxy(argv: string[], o: RunProxyOptions = {}): Promise<number> {
  if (argv[0] === "hash-password") return runHashPassword(argv.slice(1), o);
  const out = o.stdout ?? ((t: string) => void process.stdout.write(t));
  const err = o.stderr ?? ((t: string) => void process.stderr.write(t));
  let loaded;
  let config;
  try {
    loaded = await loadConfig(proxyProgram, argv);
    if (loaded.help) {
      out(formatHelp(proxyProgram) + "\n" + COMMANDS_HELP + "\n");
      return 0;
    }
    config = await resolveProxyConfig(loaded);
  } catch (e) {
    if (e instanceof ConfigError) {
      err(`kmi proxy: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
  const { logLevel, workers, allocator: _allocator, ...serverOptions } = config;
  if (isProxyWorker()) {
    const logger = createLogger({ level: logLevel, fields: { program: "proxy", worker: workerId() } });
    return runProxyWorker(serverOptions, logger);
  }
  const logger = createLogger({ level: logLevel, fields: { program: "proxy" } });
  logger.info("configuration", describeConfig(proxyProgram, loaded));
  logFdLimit(logger);
  if (workers > 0) return runPrimary(argv, config, logger, o);
  let server: ProxyServer;
  try {
    server = await ProxyServer.create({ ...serverOptions, logger });
  } catch (e) {
    err(`kmi proxy: ${(e as Error).message}\n`);
    return 2;
  }
  const signals = o.signalSource ?? process;
  // SIGHUP: the operator edited the policy, or rotated the access log.
  const onHup = (): void => {
    logger.info("SIGHUP: reloading the policy and reopening the access log");
    void server.reload();
  };
  signals.on("SIGHUP", onHup);
  try {
    return await runUntilSignal(server, {
      logger,
      signalSource: signals,
      exit: o.exit,
      onStarted: (address) => o.onStarted?.(address, server),
    });
  } catch (e) {
    await server.destroy().catch(() => undefined);
    throw e;
  } finally {
    signals.off("SIGHUP", onHup);
  }
}

/** `--workers N`: the primary forks the workers (each runs `kmi proxy` with the same flags) and serves what they share. */
async function runPrimary(argv: string[], config: ProxyConfig, logger: Logger, o: RunProxyOptions): Promise<number> {
  const exec = o.workerScript ?? process.argv[1];
  if (exec === undefined) throw new Error("--workers: cannot tell which script the workers run; give --workers 0");
  const primary = ProxyPrimary.create({
    workers: config.workers,
    exec,
    args: ["proxy", ...argv],
    workerEnv: config.allocator.env,
    host: config.host,
    ...(config.agentSocket !== undefined ? { agentSocket: config.agentSocket } : {}),
    ...(config.leafCacheSize !== undefined ? { leafCacheSize: config.leafCacheSize } : {}),
    ...(config.leafMaxLifetimeMs !== undefined ? { leafMaxLifetimeMs: config.leafMaxLifetimeMs } : {}),
    ...(config.issueRatePerSecond !== undefined ? { issueRatePerSecond: config.issueRatePerSecond } : {}),
    ...(config.issueBurst !== undefined ? { issueBurst: config.issueBurst } : {}),
    ...(config.metricsListen !== undefined ? { metricsListen: config.metricsListen } : {}),
    ...(config.shutdownGraceMs !== undefined ? { shutdownGraceMs: config.shutdownGraceMs } : {}),
    ...(config.ticketKeyRotationMs !== undefined ? { ticketKeyRotationMs: config.ticketKeyRotationMs } : {}),
    logger,
  });
  logger.info("worker allocator", { allocator: config.allocator.name, ...(config.allocator.library !== undefined ? { library: config.allocator.library } : {}) });
  const signals = o.signalSource ?? process;
  const onHup = (): void => {
    logger.info("SIGHUP: relayed to every worker (policy reload, access log reopen)");
    primary.reload();
  };
  signals.on("SIGHUP", onHup);
  try {
    return await runUntilSignal(primary, { logger, signalSource: signals, exit: o.exit, onStarted: (address) => o.onPrimaryStarted?.(address, primary) });
  } finally {
    signals.off("SIGHUP", onHup);
  }
}

/** Entry point of `kmi proxy` (called by cmd/kmi.ts); resolves with the exit code. */
export async function main(argv: string[]): Promise<number> {
  return runProxy(argv);
}
