/**
 * The Auditserver's services, as registered by the real server and by in-process tests
 * (`createRouterTransport`).
 */
import type { ConnectRouter } from "@connectrpc/connect";
import { serviceRegistration, type ServiceRegistration } from "../common/rpc.js";
import { AuditAdminService } from "../gen/kmi/audit/v1/admin_pb.js";
import { AuditService } from "../gen/kmi/audit/v1/audit_pb.js";
import { createAuditAdminService } from "./admin-service.js";
import { createAuditService } from "./audit-service.js";
import type { AuditContext } from "./context.js";

/** Options of the services (tests shorten the watch keep-alive). */
export interface AuditServiceOptions {
  /** Keep-alive interval of WatchMachineStatus, ms. */
  keepaliveMs?: number;
}

/** Every Auditserver service over `ctx`. */
export function services(ctx: AuditContext, options: AuditServiceOptions = {}): ServiceRegistration[] {
  return [serviceRegistration(AuditService, createAuditService(ctx, options)), serviceRegistration(AuditAdminService, createAuditAdminService(ctx))];
}

/** The same services on a Connect router (in-process tests). */
export function routes(ctx: AuditContext, options: AuditServiceOptions = {}): (router: ConnectRouter) => void {
  return (router) => {
    for (const s of services(ctx, options)) router.service(s.service, s.impl);
  };
}
