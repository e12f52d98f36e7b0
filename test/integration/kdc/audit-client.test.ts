/**
 * The KDC's client of the Auditserver (src/kdc/audit-client.ts) when the Auditserver goes away:
 * one that shuts down (GOAWAY on an idle session, e.g. between two WatchMachineStatus streams)
 * at the moment the KDC closes the client on its own SIGTERM must not crash the KDC with an
 * unhandled 'error' event of the HTTP/2 session.
 */
import { expect, it } from "vitest";
import { createAuditClient } from "../../../src/kdc/audit-client.js";
import { goawayWhileClosing } from "../../helpers/goaway-race.js";

it("a GOAWAY that arrives while the client is being closed does not crash the KDC", async () => {
  const uncaught = await goawayWhileClosing("audit", (url, caPem) => {
    // The fake server asks for no client certificate: the KDC's own does not matter here.
    const audit = createAuditClient({ url, caPem, certPem: "", keyPem: "" });
    return { call: () => audit.client.getAttestationKey({}), close: () => audit.close() };
  });
  expect(uncaught).toEqual([]);
});
