/**
 * One worker of `kmi proxy --workers N`: a ProxyServer whose listener is shared through
 * node:cluster, whose leaves and key events come from the primary (./worker-ipc.ts), whose
 * new-host limit is the primary's (its CONNECT check reads the primary's word on empty
 * buckets), whose metrics the primary collects, and whose access log lines carry its id. It drains and exits
 * on the primary's shutdown message, on SIGTERM/SIGINT, or when the primary goes away; SIGHUP
 * (its own, or relayed by the primary) reloads the policy and reopens the access log.
 */
import cluster from "node:cluster";
import { EventEmitter } from "node:events";
import { runUntilSignal } from "../common/lifecycle.js";
import type { Logger } from "../common/logger.js";
import { createMetricsRegistry } from "../common/metrics.js";
import { createAccessLog } from "./access-log.js";
import { ProxyServer, type ProxyAddress, type ProxyServerOptions } from "./server.js";
import { bufferOf, createWorkerAgent, createWorkerLeafMinter, processChannel } from "./worker-ipc.js";

/** True in a process forked by `kmi proxy --workers`. */
export function isProxyWorker(): boolean {
  return cluster.isWorker;
}

/** This worker's cluster id. */
export function workerId(): number {
  return cluster.worker?.id ?? 0;
}

/** Runs this process as a worker until told to stop; resolves with the exit code. */
export async function runProxyWorker(options: Omit<ProxyServerOptions, "logger">, logger: Logger, onStarted?: (a: ProxyAddress) => void): Promise<number> {
  const id = workerId();
  const channel = processChannel();
  const minter = createWorkerLeafMinter(channel);
  const metrics = createMetricsRegistry();
  const destination = typeof options.accessLog === "object" ? options.accessLog : createAccessLog(options.accessLog ?? "-", logger, { query: options.accessLogQuery ?? false, worker: id });
  const { metricsListen: _primaryServesMetrics, ...rest } = options;
  // Ticket keys are the primary's: it rotates them and sends them to every worker.
  const server = await ProxyServer.create({ ...rest, logger, agent: createWorkerAgent(channel), minter, metrics, accessLog: destination, ticketKeyRotationMs: 0 });
  // One stop however many reasons arrive (the primary's message and the group's SIGTERM both come on a shutdown).
  const stop = new EventEmitter();
  let stopping = false;
  const stopOnce = (): void => {
    if (stopping) return;
    stopping = true;
    stop.emit("SIGTERM");
  };
  const onHup = (): void => void server.reload();
  const onGone = (): void => {
    logger.warn("the proxy's primary process went away; draining");
    stopOnce();
  };
  const off = channel.on((m) => {
    if (m.type === "kmi:reload") onHup();
    else if (m.type === "kmi:ticket-keys") server.replaceTicketKeys(m.tenant, bufferOf(m.keys));
    else if (m.type === "kmi:issue-limited") server.assumeIssuanceTokens(m.client, m.tokens);
    else if (m.type === "kmi:shutdown") stopOnce();
    else if (m.type === "kmi:metrics") {
      void metrics.prom.getMetricsAsJSON().then((list) => channel.send({ type: "kmi:metrics", id: m.id, metrics: list }));
    }
  });
  process.on("SIGHUP", onHup);
  process.on("SIGTERM", stopOnce);
  process.on("SIGINT", stopOnce);
  process.on("disconnect", onGone);
  try {
    return await runUntilSignal(server, {
      logger,
      signalSource: stop,
      signals: ["SIGTERM"],
      onStarted: (a) => onStarted?.(a),
      onStopped: () => minter.close(),
    });
  } catch (err) {
    // A worker that cannot start (its listen failed) exits at once, so that the primary sees it:
    // the IPC channel would otherwise keep this process alive.
    process.stderr.write(`kmi proxy: worker ${id}: ${err instanceof Error ? err.message : String(err)}\n`);
    await server.destroy().catch(() => undefined);
    process.exit(1);
  } finally {
    off();
    process.off("SIGHUP", onHup);
    process.off("SIGTERM", stopOnce);
    process.off("SIGINT", stopOnce);
    process.off("disconnect", onGone);
  }
}
