/**
 * The portal's clients: the same services `kmi ctl` calls, over the Connect protocol on the
 * page's own origin. The session cookie goes along by itself (same-origin, HttpOnly: this code
 * never sees it); connect-web sends `Connect-Protocol-Version`, which the KDC requires.
 */
import { createClient, type Client } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import type { DescService } from "@bufbuild/protobuf";
import { AuditAdminService } from "../../src/gen/kmi/audit/v1/admin_pb.js";
import { KdcAdminService, Role } from "../../src/gen/kmi/kdc/v1/admin_pb.js";
import { KdcService } from "../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { PortalService, type Session } from "../../src/gen/kmi/kdc/v1/portal_pb.js";

const transport = createConnectTransport({ baseUrl: location.origin });

function client<S extends DescService>(s: S): Client<S> {
  return createClient(s, transport);
}

/** The KDC's services, and the Auditserver's admin service as the KDC relays it. */
export const api = {
  portal: client(PortalService),
  ca: client(KdcService),
  admin: client(KdcAdminService),
  audit: client(AuditAdminService),
};

/** Who is signed in. */
export interface Who {
  session: Session;
  operator: boolean;
  /** The tenant of a tenant admin; "" for operators. */
  tenant: string;
}

/** The signed-in session, or undefined. */
export async function whoAmI(): Promise<Who | undefined> {
  try {
    const { session } = await api.portal.getSession({});
    if (session === undefined) return undefined;
    return { session, operator: session.role === Role.OPERATOR, tenant: session.tenantId };
  } catch {
    return undefined;
  }
}

/** True when `err` says the session is gone (sign in again). */
export function isUnauthenticated(err: unknown): boolean {
  return (err as { code?: unknown }).code === 16;
}
