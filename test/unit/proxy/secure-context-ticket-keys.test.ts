/**
 * Contract test of src/proxy/secure-context-ticket-keys.ts: replacing a SecureContext's ticket
 * keys makes a ticket issued under the old keys stop resuming, and putting the old keys back
 * makes it resume again (so the keys, nothing else, changed), on server-side TLSSockets made
 * with `new TLSSocket(socket, { isServer: true, secureContext })` as the proxy makes them.
 */
import { randomBytes } from "node:crypto";
import { createServer as createNetServer, type AddressInfo, type Socket } from "node:net";
import { connect as tlsConnect, createSecureContext, TLSSocket } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { setTicketKeys } from "../../../src/proxy/secure-context-ticket-keys.js";
import { makeOriginPki, type OriginPki } from "../../fixtures/proxy/origins.js";

let pki: OriginPki;
const keysA = randomBytes(48);
const keysB = randomBytes(48);
let context: ReturnType<typeof createSecureContext>;
const tcp = createNetServer((socket: Socket) => {
  const tls = new TLSSocket(socket, { isServer: true, secureContext: context });
  tls.on("error", () => {});
  tls.once("secure", () => tls.end("hi"));
});

beforeAll(async () => {
  pki = makeOriginPki();
  context = createSecureContext({ cert: pki.good.cert, key: pki.good.key, ticketKeys: keysA, sessionIdContext: "contract" });
  await new Promise<void>((r) => tcp.listen(0, "127.0.0.1", r));
});
afterAll(() => void tcp.close());

/** One connection: whether it resumed, and the session it was given. */
function connect(session?: Buffer): Promise<{ resumed: boolean; session: Buffer }> {
  return new Promise((resolve, reject) => {
    const port = (tcp.address() as AddressInfo).port;
    const t = tlsConnect({ host: "127.0.0.1", port, servername: "localhost", ca: pki.caPem, ...(session !== undefined ? { session } : {}) });
    let got: Buffer | undefined;
    let resumed = false;
    t.once("secureConnect", () => (resumed = t.isSessionReused()));
    t.on("session", (s: Buffer) => (got = s));
    t.on("error", reject);
    t.on("data", () => {});
    t.on("close", () => {
      const s = got ?? session;
      if (s === undefined) reject(new Error("no session"));
      else resolve({ resumed, session: s });
    });
  });
}

describe("setTicketKeys on a SecureContext", () => {
  it("a ticket stops resuming once the keys change, and resumes again under the old keys", async () => {
    const first = await connect();
    expect(first.resumed).toBe(false);
    expect((await connect(first.session)).resumed).toBe(true);
    setTicketKeys(context, keysB);
    expect((await connect(first.session)).resumed).toBe(false);
    setTicketKeys(context, keysA);
    expect((await connect(first.session)).resumed).toBe(true);
  });

  it("refuses keys that are not 48 bytes", () => {
    expect(() => setTicketKeys(context, randomBytes(32))).toThrow("ticket keys: must be 48 bytes");
  });
});
