/**
 * The access log line of one CONNECT, built up as the stages of the interception learn its
 * fields (target, tenant, SNI host): each stage gets a log and passes on a copy with more, so
 * no stage changes a record another one holds.
 */
import type { AccessRecord, Decision } from "./access-log.js";
import type { ProxyContext } from "./context.js";

/** The fields a stage may add to or set on the line. */
export type ConnectFields = Partial<Pick<AccessRecord, "tenant" | "host" | "path" | "status" | "bytes_up" | "bytes_down">>;

/** A CONNECT's log line so far; {@link ConnectLog.write} writes it once the outcome is known. */
export class ConnectLog {
  private constructor(
    private readonly ctx: Pick<ProxyContext, "accessLog" | "counters">,
    private readonly start: number,
    private readonly fields: AccessRecord,
  ) {}

  /** A log for a CONNECT from `client` (`address:port`) that started at `start` (performance.now()). */
  static begin(ctx: Pick<ProxyContext, "accessLog" | "counters">, client: string, start: number): ConnectLog {
    return new ConnectLog(ctx, start, {
      tenant: "",
      client,
      host: "",
      method: "CONNECT",
      path: "",
      status: 0,
      bytes_up: 0,
      bytes_down: 0,
      decision: "allow",
      duration_ms: 0,
      proto: "tunnel",
    });
  }

  /** This log with more fields. */
  with(fields: ConnectFields): ConnectLog {
    return new ConnectLog(this.ctx, this.start, { ...this.fields, ...fields });
  }

  /** The host logged so far. */
  get host(): string {
    return this.fields.host;
  }

  /** Writes the line with the outcome (and counts the decision). */
  write(decision: Decision, rule: string | undefined, error?: string, fields: ConnectFields = {}): void {
    const rec: AccessRecord = { ...this.fields, ...fields, decision, duration_ms: Math.round((performance.now() - this.start) * 10) / 10 };
    if (rule !== undefined) rec.rule = rule;
    if (error !== undefined) rec.error = error;
    this.ctx.counters.decision(decision, rec.tenant);
    this.ctx.accessLog.write(rec);
  }
}
