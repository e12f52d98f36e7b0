/**
 * `grpc.health.v1.Health`, written once in Connect's handler style and served by both stacks.
 *
 * Statuses are kept per service name; `""` is the server as a whole. Check of an unknown service
 * is NOT_FOUND and Watch of one reports SERVICE_UNKNOWN, as the gRPC health protocol says.
 * When the server starts shutting down every status turns NOT_SERVING and Watch streams end,
 * so load balancers stop sending work and the streams do not hold the shutdown up.
 */
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus as ServingStatus } from "../gen/grpc/health/v1/health_pb.js";

export { ServingStatus };

/** The serving status of every service of one server. */
export class HealthStatus {
  private readonly statuses = new Map<string, ServingStatus>();
  private readonly listeners = new Set<() => void>();
  private closed = false;
  private version = 0;

  constructor() {
    this.statuses.set("", ServingStatus.SERVING);
  }

  /** Sets the status of `service` (`""` is the whole server) and wakes its watchers. */
  set(service: string, status: ServingStatus): void {
    if (this.closed) return;
    this.statuses.set(service, status);
    this.notify();
  }

  /** The status of `service`, or undefined when it is unknown. */
  get(service: string): ServingStatus | undefined {
    return this.statuses.get(service);
  }

  /** Turns every status NOT_SERVING and ends all Watch streams; later `set` calls are ignored. */
  shutdown(): void {
    if (this.closed) return;
    for (const k of this.statuses.keys()) this.statuses.set(k, ServingStatus.NOT_SERVING);
    this.closed = true;
    this.notify();
  }

  /** True once {@link shutdown} ran. */
  get isShutdown(): boolean {
    return this.closed;
  }

  private notify(): void {
    this.version++;
    for (const l of [...this.listeners]) l();
  }

  /** Resolves at the first change after `seen` (at once if there was one), shutdown or abort of `signal`. */
  private nextChange(seen: number, signal: AbortSignal): Promise<void> {
    return new Promise<void>((resolve) => {
      if (this.version !== seen || signal.aborted) return resolve();
      const done = () => {
        this.listeners.delete(done);
        signal.removeEventListener("abort", done);
        resolve();
      };
      this.listeners.add(done);
      signal.addEventListener("abort", done, { once: true });
    });
  }

  /** The Health service implementation over these statuses. */
  service(): ServiceImpl<typeof Health> {
    const check = (request: { service: string }) => {
      const status = this.statuses.get(request.service);
      if (status === undefined) {
        throw new ConnectError(`health: unknown service "${request.service}"; list services with server reflection`, Code.NotFound);
      }
      return { status };
    };
    const self = this;
    return {
      check,
      async *watch(request, ctx: HandlerContext) {
        let last: ServingStatus | undefined;
        for (;;) {
          // Read the version before the status: a change while the consumer handles the
          // yielded value is then seen by nextChange instead of being missed.
          const seen = self.version;
          const status = self.statuses.get(request.service) ?? ServingStatus.SERVICE_UNKNOWN;
          if (status !== last) {
            last = status;
            yield { status };
            continue;
          }
          if (self.closed || ctx.signal.aborted) return;
          await self.nextChange(seen, ctx.signal);
        }
      },
    };
  }
}
