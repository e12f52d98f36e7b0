/**
 * The KDC's feed of machine status from the Auditserver: a WatchMachineStatus stream (mutual
 * TLS with the KDC's kmi://service/kdc certificate) whose first message lists every quarantined
 * machine and whose later messages are single changes or keep-alives. Each is applied to the
 * quarantine registry (which pushes QUARANTINED on the machine's watch streams). The stream is
 * reopened with backoff when it fails or ends, and counted dead after `silenceMs` without any
 * message (the Auditserver sends a keep-alive every 15 s).
 */
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Logger } from "../common/logger.js";
import { MachineStatus, type MachineStatusChange, type WatchMachineStatusResponse } from "../gen/kmi/audit/v1/audit_pb.js";
import { backoffMs, sleep } from "../common/backoff.js";
import type { MachineStatusUpdate, QuarantineRegistry } from "./quarantine.js";

/** Options of the feed. */
export interface MachineStatusFeedOptions {
  /** Opens the stream (AuditService.WatchMachineStatus). */
  watch: (signal: AbortSignal) => AsyncIterable<WatchMachineStatusResponse>;
  /** The Auditserver's URL, for logs. */
  url: string;
  registry: QuarantineRegistry;
  logger: Logger;
  /** First retry delay, ms (default 500). */
  initialBackoffMs?: number;
  /** Longest retry delay, ms (default 30 000). */
  maxBackoffMs?: number;
  /** A stream silent this long is dead, ms (default 45 000: three missed keep-alives). */
  silenceMs?: number;
}

/** Whoever the feed names as actor in the audit log. */
const ACTOR = "service:audit";

function update(c: MachineStatusChange, now: Date): MachineStatusUpdate | undefined {
  if (c.machineId === "") return undefined;
  if (c.status !== MachineStatus.QUARANTINED && c.status !== MachineStatus.ACTIVE) return undefined;
  return { machineId: c.machineId, quarantined: c.status === MachineStatus.QUARANTINED, reason: c.reason, time: c.time === undefined ? now : timestampDate(c.time) };
}

/** The feed (start / close). */
export class MachineStatusFeed {
  /** True while the stream is open and its snapshot applied. */
  connected = false;
  private readonly stop = new AbortController();
  private running: Promise<void> | undefined;

  constructor(private readonly o: MachineStatusFeedOptions) {}

  /** Starts in the background. */
  start(): void {
    this.running ??= this.loop();
  }

  /** Stops and waits for the loop to end. */
  async close(): Promise<void> {
    this.stop.abort();
    await this.running;
  }

  private async loop(): Promise<void> {
    let failures = 0;
    while (!this.stop.signal.aborted) {
      let healthy = false;
      try {
        await this.session(() => {
          healthy = true;
          failures = 0;
        });
        if (!this.stop.signal.aborted) this.o.logger.warn("machine status stream ended by the Auditserver; reopening", { audit: this.o.url });
      } catch (err) {
        if (this.stop.signal.aborted) break;
        this.o.logger.warn("machine status stream failed", { audit: this.o.url, error: describe(err) });
      }
      this.connected = false;
      if (this.stop.signal.aborted) break;
      if (!healthy) failures++;
      const delay = backoffMs(Math.max(1, failures), this.o.initialBackoffMs ?? 500, this.o.maxBackoffMs ?? 30_000);
      await sleep(delay, this.stop.signal);
    }
    this.connected = false;
  }

  private async session(onSnapshot: () => void): Promise<void> {
    const abort = new AbortController();
    const onStop = () => abort.abort();
    this.stop.signal.addEventListener("abort", onStop, { once: true });
    const silenceMs = this.o.silenceMs ?? 45_000;
    let silent = false;
    let watchdog: NodeJS.Timeout | undefined;
    const pet = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => {
        silent = true;
        abort.abort();
      }, silenceMs);
    };
    try {
      pet();
      let first = true;
      for await (const msg of this.o.watch(abort.signal)) {
        pet();
        const now = new Date();
        const updates = msg.changes.map((c) => update(c, now)).filter((u): u is MachineStatusUpdate => u !== undefined);
        if (msg.snapshot) {
          await this.o.registry.replaceAll(updates.filter((u) => u.quarantined), ACTOR);
          if (first) {
            this.connected = true;
            onSnapshot();
            this.o.logger.info("machine status stream open", { audit: this.o.url, quarantined: this.o.registry.list().length });
          }
          first = false;
          continue;
        }
        if (first) throw new Error("WatchMachineStatus: the first message is not a snapshot");
        for (const u of updates) {
          await this.o.registry.apply(u, ACTOR);
          this.o.logger.info(u.quarantined ? "machine quarantined by the Auditserver" : "machine released by the Auditserver", { machine: u.machineId, reason: u.reason });
        }
      }
    } catch (err) {
      if (silent) throw new Error(`no message for ${silenceMs} ms; counting the stream as dead`);
      if (err instanceof ConnectError && err.code === Code.Canceled && this.stop.signal.aborted) return;
      throw err;
    } finally {
      clearTimeout(watchdog);
      this.stop.signal.removeEventListener("abort", onStop);
    }
  }
}

function describe(err: unknown): string {
  if (err instanceof ConnectError) return `${Code[err.code] ?? err.code}: ${err.rawMessage}`;
  return err instanceof Error ? err.message : String(err);
}
