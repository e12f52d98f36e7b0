/**
 * The agent's one routes function: KeyAgentService over a context. Used by the real server
 * (through the platform's grpc-js server, which maps errors itself) and by in-process tests
 * (`createRouterTransport(routes(ctx))`), where the interceptor below maps domain errors to
 * their codes the same way.
 */
import type { ConnectRouter, Interceptor } from "@connectrpc/connect";
import { toConnectError } from "../common/error-mapping.js";
import type { Logger } from "../common/logger.js";
import { KeyAgentService } from "../gen/kmi/agent/v1/agent_pb.js";
import { createKeyAgentService } from "./agent-service.js";
import type { AgentServiceContext } from "./context.js";

/** Maps domain errors to Connect errors (unary and streaming). */
export function errorMapping(logger: Logger): Interceptor {
  return (next) => async (req) => {
    try {
      const res = await next(req);
      if (!res.stream) return res;
      const source = res.message;
      async function* mapped() {
        try {
          yield* source;
        } catch (err) {
          throw toConnectError(err, logger);
        }
      }
      return { ...res, message: mapped() };
    } catch (err) {
      throw toConnectError(err, logger);
    }
  };
}

/** Registers KeyAgentService on a Connect router. */
export function routes(ctx: AgentServiceContext): (router: ConnectRouter) => void {
  return (router) => {
    router.service(KeyAgentService, createKeyAgentService(ctx), { interceptors: [errorMapping(ctx.logger)] });
  };
}
