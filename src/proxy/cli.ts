/**
 * `kmi proxy`: flags/env/config → ProxyConfig → ProxyServer → run until SIGTERM/SIGINT, with
 * SIGHUP rereading the policy and reopening the access log. A configuration mistake is one
 * stderr line and exit 2; a start failure propagates to cmd/kmi.ts (one stderr line, exit 1).
 */
import type { EventEmitter } from "node:events";
import { ConfigError, describeConfig, formatHelp, loadConfig } from "../common/config.js";
import { runUntilSignal } from "../common/lifecycle.js";
import { createLogger } from "../common/logger.js";
import { proxyProgram, resolveProxyConfig } from "./config.js";
import { ProxyServer, type ProxyAddress } from "./server.js";

/** What tests change about a run (the process's signals and exit by default). */
export interface RunProxyOptions {
  /** Where signals come from. */
  signalSource?: EventEmitter;
  /** Exits the process. */
  exit?: (code: number) => void;
  /** Called with the bound address once listening. */
  onStarted?: (address: ProxyAddress, server: ProxyServer) => void;
  /** Where --help goes. */
  stdout?: (text: string) => void;
  /** Where a configuration error goes. */
  stderr?: (text: string) => void;
}

/** Runs the proxy; resolves with the exit code. */
export async function runProxy(argv: string[], o: RunProxyOptions = {}): Promise<number> {
  const out = o.stdout ?? ((t: string) => void process.stdout.write(t));
  const err = o.stderr ?? ((t: string) => void process.stderr.write(t));
  let loaded;
  let config;
  try {
    loaded = await loadConfig(proxyProgram, argv);
    if (loaded.help) {
      out(formatHelp(proxyProgram) + "\n");
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
  const { logLevel, ...serverOptions } = config;
  const logger = createLogger({ level: logLevel, fields: { program: "proxy" } });
  logger.info("configuration", describeConfig(proxyProgram, loaded));
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

/** Entry point of `kmi proxy` (called by cmd/kmi.ts); resolves with the exit code. */
export async function main(argv: string[]): Promise<number> {
  return runProxy(argv);
}
