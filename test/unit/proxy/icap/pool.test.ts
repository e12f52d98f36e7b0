/**
 * The ICAP connection pool over real loopback sockets (a plain TCP server stands in for the
 * ICAP server: the pool only connects, counts and reuses).
 */
import { createServer, type Server, type Socket } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { IcapPool } from "../../../../src/proxy/icap/pool.js";

let server: Server;
let port: number;
const accepted: Socket[] = [];

beforeAll(async () => {
  server = createServer((s) => {
    accepted.push(s);
    s.on("error", () => {});
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  port = (server.address() as { port: number }).port;
});

afterAll(async () => {
  for (const s of accepted) s.destroy();
  await new Promise((r) => server.close(r));
});

function pool(max: number, connectTimeoutMs = 2000, p = port) {
  return new IcapPool({ host: "127.0.0.1", port: p, maxConnections: max, connectTimeoutMs, idleTimeoutMs: 30_000 });
}

describe("IcapPool", () => {
  it("reuses a released connection instead of dialing again", async () => {
    const p = pool(4);
    const before = accepted.length;
    const a = await p.acquire();
    p.release(a, true);
    const b = await p.acquire();
    expect(b).toBe(a);
    expect(accepted.length).toBe(before + 1);
    p.release(b, false);
    expect(p.size).toBe(0);
    p.close();
  });

  it("at the ceiling, the next caller waits for a release; past the connect timeout it is refused", async () => {
    const p = pool(1, 300);
    const a = await p.acquire();
    const waiting = p.acquire();
    p.release(a, true);
    expect(await waiting).toBe(a);
    await expect(p.acquire()).rejects.toThrow("no free icap connection within 300 ms (1 busy)");
    p.close();
  });

  it("a server that went away is a connect error naming the address", async () => {
    const dead = createServer();
    await new Promise<void>((r) => dead.listen(0, "127.0.0.1", r));
    const deadPort = (dead.address() as { port: number }).port;
    await new Promise((r) => dead.close(r));
    const p = pool(2, 2000, deadPort);
    await expect(p.acquire()).rejects.toThrow(`icap connect to 127.0.0.1:${deadPort}: ECONNREFUSED`);
    expect(p.size).toBe(0);
    p.close();
  });

  it("a connection the server closed while idle is not handed out again", async () => {
    const p = pool(2);
    const before = accepted.length;
    const a = await p.acquire();
    p.release(a, true);
    accepted[before]!.destroy();
    await new Promise((r) => setTimeout(r, 50));
    const b = await p.acquire();
    expect(b).not.toBe(a);
    p.close();
  });
});
