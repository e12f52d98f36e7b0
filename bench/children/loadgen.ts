/**
 * The load generator of the proxy throughput row, in its own process: a fixed number of
 * connections, a bounded window, requests back to back (closed loop). Modes:
 *   h1       HTTP/1.1 keep-alive, one request in flight per connection
 *   h2       HTTP/2, `streams` requests in flight per connection
 *   newconn  a new TCP (+CONNECT) + TLS handshake + one request per operation (full
 *            handshakes, or resumed ones with `resume`)
 * It also holds idle HTTP/2 connections open on command (idle:open, idle:close), for the
 * memory per connection of whatever they go through, and reads the CPU time of given processes
 * over each measured window (/proc, their descendants included).
 */
import type { ClientHttp2Session } from "node:http2";
import type { TLSSocket } from "node:tls";
import { H1Conn, h2Get, h2Session, openTls, type Destination } from "../lib/https-client.js";
import { closedLoop, type LoopResult } from "../lib/loop.js";
import { cpuSeconds } from "../lib/proc.js";
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
  /** newconn only: resume the latest TLS session (a ticket) instead of a full handshake. */
  readonly resume?: boolean;
  /** Processes (by name) whose CPU seconds over the measured window are returned, descendants included. */
  readonly cpuPids?: Readonly<Record<string, number>>;
}

/** What a run measured (latencies left out). */
export type LoadResult = Omit<LoopResult, "latencies"> & {
  readonly bytes: number;
  /** CPU seconds of each of `cpuPids` over the measured window (absent where /proc is missing). */
  readonly cpu?: Record<string, number>;
  /** newconn: measured connections whose TLS session was resumed. */
  readonly resumed?: number;
};

/** CPU seconds of each process now. */
function cpuNow(pids: Readonly<Record<string, number>>): Record<string, number | undefined> {
  const out: Record<string, number | undefined> = {};
  for (const [k, pid] of Object.entries(pids)) out[k] = cpuSeconds(pid);
  return out;
}

async function runLoad(spec: LoadSpec): Promise<LoadResult> {
  let bytes = 0;
  const count = (n: number) => {
    bytes += n;
  };
  const pids = spec.cpuPids ?? {};
  let before: Record<string, number | undefined> = {};
  const cpu: Record<string, number> = {};
  let measuring = false;
  let resumed = 0;
  const onWindow = {
    start: () => {
      measuring = true;
      before = cpuNow(pids);
    },
    end: () => {
      measuring = false;
      const after = cpuNow(pids);
      for (const k of Object.keys(pids)) {
        const a = after[k];
        const b = before[k];
        if (a !== undefined && b !== undefined) cpu[k] = a - b;
      }
    },
  };
  const loop = (op: () => Promise<unknown>, concurrency: number) =>
    closedLoop(op, { concurrency, durationMs: spec.durationMs, onWindow, ...(spec.warmupMs !== undefined ? { warmupMs: spec.warmupMs } : {}) });
  let result: LoopResult;
  if (spec.mode === "newconn") {
    // The latest session ticket any connection received (TLS 1.3 sends them after the handshake).
    let session: Buffer | undefined;
    result = await loop(async () => {
      const s: TLSSocket = await openTls(spec.dest, ["http/1.1"], undefined, spec.resume === true ? session : undefined);
      if (spec.resume === true) s.on("session", (t: Buffer) => (session = t));
      const c = new H1Conn(s, spec.dest.servername);
      try {
        count(await c.get(spec.path, true));
        if (measuring && s.isSessionReused()) resumed++;
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
  return { ...rest, bytes, ...(Object.keys(cpu).length > 0 ? { cpu } : {}), ...(spec.mode === "newconn" ? { resumed } : {}) };
}

/** Idle HTTP/2 connections held open (each has answered one request). */
const idle = new Set<ClientHttp2Session>();

/** What idle:open did. */
export interface IdleResult {
  /** Connections open now. */
  readonly open: number;
  /** Connections that failed to open (or to answer their request). */
  readonly errors: number;
  readonly firstError?: string;
}

/** Opens idle h2 connections to `dest` until `count` are open, `concurrency` at a time; each answers one GET of `path` first. */
async function openIdle(a: { dest: Destination; count: number; concurrency: number; path: string }): Promise<IdleResult> {
  let errors = 0;
  let firstError: string | undefined;
  let toOpen = Math.max(0, a.count - idle.size);
  // Resumed handshakes where the server allows (cheaper for every side; the memory held is the same).
  let ticket: Buffer | undefined;
  const worker = async (): Promise<void> => {
    while (toOpen > 0 && errors <= a.count / 100 + 5) {
      toOpen--;
      try {
        const s = await openTls(a.dest, ["h2"], undefined, ticket);
        s.on("session", (t: Buffer) => (ticket = t));
        if (s.alpnProtocol !== "h2") {
          s.destroy();
          throw new Error(`ALPN chose ${String(s.alpnProtocol)}, not h2`);
        }
        const session = h2Session(s, a.dest.servername);
        idle.add(session);
        session.once("close", () => idle.delete(session));
        await h2Get(session, a.path);
      } catch (err) {
        errors++;
        firstError ??= err instanceof Error ? err.message : String(err);
      }
    }
  };
  await Promise.all(Array.from({ length: a.concurrency }, worker));
  return { open: idle.size, errors, ...(firstError !== undefined ? { firstError } : {}) };
}

/** Closes every idle connection; resolves once they are closed. */
async function closeIdle(): Promise<{ closed: number }> {
  const all = [...idle];
  await Promise.all(
    all.map(
      (s) =>
        new Promise<void>((resolve) => {
          if (s.destroyed) return resolve();
          s.once("close", () => resolve());
          s.destroy();
        }),
    ),
  );
  idle.clear();
  return { closed: all.length };
}

async function main(): Promise<void> {
  childConfig<Record<string, never>>();
  await serveParent(
    { pid: process.pid },
    {
      run: (args) => runLoad(args as LoadSpec),
      "idle:open": (args) => openIdle(args as Parameters<typeof openIdle>[0]),
      "idle:close": () => closeIdle(),
    },
    async () => void (await closeIdle()),
  );
}

dieOnError(main());
