/**
 * The portal's address and a one-time operator login link, for what `kmi up` prints once the
 * mesh is ready (the link is made with the operator token, through PortalService).
 */
import { createClient } from "@connectrpc/connect";
import { createGrpcClientTransport } from "../common/http2-client.js";
import { PortalService } from "../gen/kmi/kdc/v1/portal_pb.js";
import { bearerAuthorization } from "../common/bearer.js";

/** How long the printed link works, seconds. */
export const UP_LINK_TTL_SECONDS = 900;

/** A one-time operator login link to the portal at `kdcUrl`; undefined (and no failure) when it cannot be made. */
export async function operatorLoginLink(o: { kdcUrl: string; caPem: string; token: string }): Promise<string | undefined> {
  const { transport, close } = createGrpcClientTransport({
    baseUrl: o.kdcUrl,
    tls: { ca: o.caPem },
    expectedService: "kdc",
    interceptors: [(next) => (req) => (req.header.set("authorization", bearerAuthorization(o.token)), next(req))],
    defaultTimeoutMs: 10_000,
  });
  try {
    const res = await createClient(PortalService, transport).createLoginLink({ operator: true, ttlSeconds: UP_LINK_TTL_SECONDS });
    return `${new URL(o.kdcUrl).origin}/#login=${res.code}`;
  } catch {
    return undefined;
  } finally {
    close();
  }
}
