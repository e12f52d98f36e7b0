/**
 * The KDC's services, as registered by the real server and by in-process tests
 * (`createRouterTransport`).
 */
import type { Client, ConnectRouter } from "@connectrpc/connect";
import { serviceRegistration, type ServiceRegistration } from "../common/rpc.js";
import { AuditAdminService } from "../gen/kmi/audit/v1/admin_pb.js";
import { KdcAdminService } from "../gen/kmi/kdc/v1/admin_pb.js";
import { DistributionService } from "../gen/kmi/kdc/v1/distribution_pb.js";
import { KdcService } from "../gen/kmi/kdc/v1/kdc_pb.js";
import { PeerService } from "../gen/kmi/kdc/v1/peer_pb.js";
import { PortalService } from "../gen/kmi/kdc/v1/portal_pb.js";
import { createAdminService } from "./admin-service.js";
import { createAuditAdminRelay } from "./audit-relay.js";
import type { KdcContext } from "./context.js";
import { createDistributionService } from "./distribution-service.js";
import { createKdcService } from "./kdc-service.js";
import { KdcOperations } from "./operations.js";
import { createPeerService } from "./peer-service.js";
import { createPortalService } from "./portal-service.js";

/**
 * Every KDC service over `ctx`; with `auditAdmin` (the KDC's client of the Auditserver), also the
 * portal's relay of AuditAdminService.
 */
export function services(ctx: KdcContext, ops = new KdcOperations(ctx), auditAdmin?: () => Client<typeof AuditAdminService> | undefined): ServiceRegistration[] {
  return [
    serviceRegistration(KdcService, createKdcService(ctx, ops)),
    serviceRegistration(KdcAdminService, createAdminService(ctx, ops)),
    serviceRegistration(PeerService, createPeerService(ctx, ops)),
    serviceRegistration(DistributionService, createDistributionService(ctx, ops)),
    serviceRegistration(PortalService, createPortalService(ctx, ops)),
    ...(auditAdmin !== undefined ? [serviceRegistration(AuditAdminService, createAuditAdminRelay(ctx, auditAdmin))] : []),
  ];
}

/** The same services on a Connect router (in-process tests). */
export function routes(ctx: KdcContext): (router: ConnectRouter) => void {
  return (router) => {
    for (const s of services(ctx)) router.service(s.service, s.impl);
  };
}
