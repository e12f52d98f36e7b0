/**
 * The load generator of the proxy throughput row, in its own process: a fixed number of
 * connections, a bounded window, requests back to back (closed loop). Modes:
 *   h1       HTTP/1.1 keep-alive, one request in flight per connection
 *   h2       HTTP/2, `streams` requests in flight per connection
 *   newconn  a new TCP (+CONNECT) + full TLS handshake + one request per operation
 */
import type { ClientHttp2Session } from "node:http2";
import { H1Conn, h2Get, h2Session, openTls, type Destination } from "../lib/https-client.js";
import { closedLoop, type LoopResult } from "../lib/loop.js";
import { childConfig, dieOnError, serveParent } from "../lib/serve.js";

/** One load run. */
export interface LoadSpec {
  readonly mode: "h1" | "h2" | "newconn";
  readonly dest: Destination;
  readonly path: string;
  readonly connections: number;
  /** h2 only: requests in flight per connection. */
  readonly streams?: number;
  readonly durationMs: number;
  readonly warmupMs?: number;
}

/** What a run measured (latencies left out). */
export type LoadResult = Omit<LoopResult, "latencies"> & { readonly bytes: number };

async function runLoad(spec: LoadSpec): Promise<LoadResult> {
  let bytes = 0;
  const count = (n: number) => {
    bytes += n;
  };
  const loop = (op: () => Promise<unknown>, concurrency: number) =>
    closedLoop(op, { concurrency, durationMs: spec.durationMs, ...(spec.warmupMs !== undefined ? { warmupMs: spec.warmupMs } : {}) });
  let result: LoopResult;
  if (spec.mode === "newconn") {
    result = await loop(async () => {
      const s = await openTls(spec.dest, ["http/1.1"]);
      const c = new H1Conn(s, spec.dest.servername);
      try {
        count(await c.get(spec.path, true));
      } finally {
        c.close();
      }
    }, spec.connections);
  } else if (spec.mode === "h1") {
    const open = async () => new H1Conn(await openTls(spec.dest, ["http/1.1"]), spec.dest.servername);
    const idle: H1Conn[] = await Promise.all(Array.from({ length: spec.connections }, open));
    const all = new Set(idle);
    try {
      result = await loop(async () => {
        let c = idle.pop()!;
        try {
          count(await c.get(spec.path));
        } catch (err) {
          all.delete(c);
          c.close();
          c = await open();
          all.add(c);
          throw err;
        } finally {
          if (c.closing) {
            all.delete(c);
            c.close();
            c = await open();
            all.add(c);
          }
          idle.push(c);
        }
      }, spec.connections);
    } finally {
      for (const c of all) c.close();
    }
  } else {
    const streams = spec.streams ?? 1;
    const sessions: ClientHttp2Session[] = await Promise.all(
      Array.from({ length: spec.connections }, async () => {
        const s = await openTls(spec.dest, ["h2"]);
        if (s.alpnProtocol !== "h2") {
          s.destroy();
          throw new Error(`ALPN chose ${String(s.alpnProtocol)}, not h2`);
        }
        return h2Session(s, spec.dest.servername);
      }),
    );
    let next = 0;
    try {
      result = await loop(async () => {
        const s = sessions[next++ % sessions.length]!;
        count(await h2Get(s, spec.path));
      }, spec.connections * streams);
    } finally {
      for (const s of sessions) s.destroy();
    }
  }
  const { latencies: _omit, ...rest } = result;
  return { ...rest, bytes };
}

async function main(): Promise<void> {
  childConfig<Record<string, never>>();
  await serveParent({ pid: process.pid }, { run: (args) => runLoad(args as LoadSpec) }, async () => {});
}

dieOnError(main());
