/**
 * Session ticket key rotation in one proxy process: after `rotateTicketKeys()` (what the timer
 * of `--ticket-key-rotation-seconds` calls), a ticket issued before no longer resumes, the
 * cached leaf is still served (no new issuance), and a ticket issued after resumes.
 * The rotation across workers runs in workers.test.ts.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startOrigin, type Origin } from "../../fixtures/proxy/origins.js";
import { requestOver, startHarness, tlsViaProxy, type Harness } from "../../fixtures/proxy/harness.js";

let h: Harness;
let origin: Origin;

beforeAll(async () => {
  h = await startHarness();
  origin = await startOrigin({ cert: h.pki.good });
});

afterAll(async () => {
  await origin?.close();
  await h?.close();
});

/** A connection through the proxy with one request; whether it resumed, and its session. */
async function connect(session?: Buffer): Promise<{ resumed: boolean; session: Promise<Buffer> }> {
  const t = await tlsViaProxy(h.port, "localhost", origin.port, { ca: h.agent.rootPem("acme"), ...(session !== undefined ? { session } : {}) });
  const ticket = new Promise<Buffer>((resolve) => t.once("session", resolve));
  const resumed = t.isSessionReused();
  expect((await requestOver(t, "/hello", { host: "localhost" })).status).toBe(200);
  return { resumed, session: ticket };
}

describe("session ticket key rotation", () => {
  it("a ticket from before a rotation does a full handshake; the leaf is not minted again; a new ticket resumes", async () => {
    const first = await connect();
    const before = await first.session;
    expect((await connect(before)).resumed).toBe(true);
    const issued = h.agent.issueCount("acme");
    h.proxy.rotateTicketKeys();
    const after = await connect(before);
    expect(after.resumed).toBe(false);
    expect((await connect(await after.session)).resumed).toBe(true);
    expect(h.agent.issueCount("acme")).toBe(issued);
  });
});
