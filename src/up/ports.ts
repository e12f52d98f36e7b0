/**
 * TCP addresses: port 0 resolved to a concrete free port once at start (so that a restarted
 * part comes back on the same address the others were given), a check that a fixed port is
 * free before anything starts, and the URL a client uses for a bind address.
 */
import { createServer } from "node:net";
import { isIP } from "node:net";
import type { TcpAddress } from "./config.js";

function tryListen(host: string, port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.once("error", reject);
    srv.listen({ host, port, exclusive: true }, () => {
      const bound = (srv.address() as { port: number }).port;
      srv.close(() => resolve(bound));
    });
  });
}

/** A port is in use, or the host cannot be bound. */
export class PortError extends Error {
  override name = "PortError";
}

/**
 * Resolves port 0 to a free port and checks that a fixed port can be bound. `part` names what
 * listens there, `flag` and `env` how to move it (for the message).
 */
export async function resolvePort(addr: TcpAddress, part: string, flag: string, env: string): Promise<TcpAddress> {
  try {
    const port = await tryListen(addr.host, addr.port);
    return { host: addr.host, port };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? String(err);
    const any = `${addr.host}:0`;
    if (code === "EADDRINUSE") {
      throw new PortError(
        `${formatHostPort(addr)} (the ${part}) is already in use, by another kmi up or another program; free it, or move the ${part}: ${flag} ${any} (or ${env}=${any}) picks any free port`,
      );
    }
    throw new PortError(`cannot listen on ${formatHostPort(addr)} for the ${part} (${code}); check ${flag} / ${env}`);
  }
}

/** `host:port`, IPv6 in brackets. */
export function formatHostPort(a: TcpAddress): string {
  return isIP(a.host) === 6 ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

/** The address a local client connects to for a bind address (a wildcard becomes loopback). */
export function connectHost(host: string): string {
  if (host === "0.0.0.0" || host === "") return "127.0.0.1";
  if (host === "::" || host === "[::]") return "::1";
  return host;
}

/** `https://host:port` for a client of a server bound to `a`. */
export function httpsUrl(a: TcpAddress): string {
  return `https://${formatHostPort({ host: connectHost(a.host), port: a.port })}`;
}

/** `http://host:port` for a client of a server bound to `a`. */
export function httpUrl(a: TcpAddress): string {
  return `http://${formatHostPort({ host: connectHost(a.host), port: a.port })}`;
}
