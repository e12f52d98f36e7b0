/**
 * The KDC's services in-process: connect clients over createRouterTransport(routes(ctx)), with
 * errors mapped to their gRPC codes as the real server maps them, and an optional bearer token.
 */
import { Code, ConnectError, createClient, createRouterTransport, type Interceptor } from "@connectrpc/connect";
import { expect } from "vitest";
import { toConnectError } from "../../src/common/error-mapping.js";
import { createNopLogger } from "../../src/common/logger.js";
import { KdcAdminService } from "../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService } from "../../src/gen/kmi/kdc/v1/kdc_pb.js";
import type { KdcContext } from "../../src/kdc/context.js";
import { routes } from "../../src/kdc/routes.js";

/** A router interceptor that maps a handler's error to its gRPC code, as the real server does. */
export function mapErrorsAsServer(): Interceptor {
  const logger = createNopLogger();
  return (next) => async (req) => {
    try {
      return await next(req);
    } catch (err) {
      throw toConnectError(err, logger);
    }
  };
}

/** KdcService and KdcAdminService clients of `ctx`, calling as `token` (none: unauthenticated). */
export function kdcRouterClients(ctx: KdcContext, token?: string) {
  const mapErrors = mapErrorsAsServer();
  const auth: Interceptor = (next) => async (req) => {
    if (token !== undefined) req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const t = createRouterTransport(routes(ctx), { router: { interceptors: [mapErrors] }, transport: { interceptors: [auth] } });
  return { ca: createClient(KdcService, t), admin: createClient(KdcAdminService, t) };
}

/** "Code: message" of the ConnectError `p` rejects with (fails the test when it resolves). */
export async function errorCode(p: Promise<unknown>): Promise<string> {
  const e = await p.then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(ConnectError);
  return `${Code[(e as ConnectError).code]}: ${(e as ConnectError).rawMessage}`;
}
