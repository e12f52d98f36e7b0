/**
 * The agent's peer clients (src/agent/client.ts) when the server goes away: an Auditserver or
 * KDC that shuts down (GOAWAY on an idle session) at the moment the agent closes its client —
 * both stopped together, as on a host shutdown — must not crash the agent with an unhandled
 * 'error' event of the HTTP/2 session.
 */
import { expect, it } from "vitest";
import { createPeerClient } from "../../../src/agent/client.js";
import { AuditService } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { goawayWhileClosing } from "../../helpers/goaway-race.js";

it("a GOAWAY that arrives while the client is being closed does not crash the agent", async () => {
  const uncaught = await goawayWhileClosing("audit", (url, caPem) => {
    const peer = createPeerClient(AuditService, url, { caPem });
    return { call: () => peer.client.getAttestationNonce({}), close: () => peer.close() };
  });
  expect(uncaught).toEqual([]);
});
