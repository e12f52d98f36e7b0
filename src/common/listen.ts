/**
 * Listen addresses (`host:port`, `[::1]:port`, `unix:/path` or an absolute path) and the
 * Unix-socket listener whose file mode is set before any client can connect.
 */
import { chmod, chown, lstat, mkdtemp, readFile, rename, rm, stat, unlink } from "node:fs/promises";
import { isIP, createConnection, createServer, type Server, type Socket } from "node:net";
import { basename, dirname, isAbsolute, join } from "node:path";

/** A parsed listen address. */
export type ListenAddress = { kind: "tcp"; host: string; port: number } | { kind: "unix"; path: string };

/** Thrown by {@link parseListenAddress} with a message that shows the accepted forms. */
export class ListenAddressError extends Error {
  override name = "ListenAddressError";
}

const FORMS = "host:port, [ipv6]:port, unix:/absolute/path or /absolute/path";

/**
 * Parses a listen address: `127.0.0.1:8443`, `localhost:0`, `[::1]:8443`, `unix:/run/kmi.sock`
 * or `/run/kmi.sock`. Port 0 asks the OS for a free port.
 */
export function parseListenAddress(value: string): ListenAddress {
  const v = value.trim();
  if (v === "") throw new ListenAddressError(`listen address is empty; use ${FORMS}`);
  if (v.startsWith("unix:") || v.startsWith("/")) {
    const path = v.startsWith("unix:") ? v.slice("unix:".length) : v;
    if (!isAbsolute(path)) {
      throw new ListenAddressError(`listen address "${value}": the socket path must be absolute, e.g. unix:/run/kmi/agent.sock`);
    }
    // sun_path is 108 bytes on Linux, including the terminating NUL.
    if (Buffer.byteLength(path) > 107) {
      throw new ListenAddressError(`listen address "${value}": the socket path is longer than 107 bytes; choose a shorter path`);
    }
    return { kind: "unix", path };
  }
  let host: string;
  let portText: string;
  if (v.startsWith("[")) {
    const end = v.indexOf("]");
    if (end < 0 || v[end + 1] !== ":") {
      throw new ListenAddressError(`listen address "${value}": expected [ipv6]:port, e.g. [::1]:8443`);
    }
    host = v.slice(1, end);
    portText = v.slice(end + 2);
    if (isIP(host) !== 6) throw new ListenAddressError(`listen address "${value}": "${host}" is not an IPv6 address`);
  } else {
    const colon = v.lastIndexOf(":");
    if (colon <= 0) throw new ListenAddressError(`listen address "${value}": expected ${FORMS}`);
    host = v.slice(0, colon);
    portText = v.slice(colon + 1);
    if (host.includes(":")) {
      throw new ListenAddressError(`listen address "${value}": put an IPv6 address in brackets, e.g. [::1]:8443`);
    }
  }
  if (!/^\d{1,5}$/.test(portText) || Number(portText) > 65535) {
    throw new ListenAddressError(`listen address "${value}": port "${portText}" is not a number from 0 to 65535`);
  }
  return { kind: "tcp", host, port: Number(portText) };
}

/** Formats an address back to the form {@link parseListenAddress} reads. */
export function formatListenAddress(addr: ListenAddress): string {
  if (addr.kind === "unix") return `unix:${addr.path}`;
  return isIP(addr.host) === 6 ? `[${addr.host}]:${addr.port}` : `${addr.host}:${addr.port}`;
}

/** File mode and owner group of a Unix socket. */
export interface UnixSocketOptions {
  /** 0o600 (owner only, the default) or 0o660 (owner and `group`). */
  mode?: 0o600 | 0o660;
  /** Group (name or numeric id) that owns the socket; meaningful with mode 0o660. */
  group?: string | number;
}

/** Parses a socket mode given as octal text ("0600", "600", "0o660"); only 0600 and 0660 are accepted. */
export function parseSocketMode(value: string): 0o600 | 0o660 {
  const v = value.trim().replace(/^0o/i, "");
  const n = /^[0-7]{3,4}$/.test(v) ? parseInt(v, 8) : NaN;
  if (n === 0o600 || n === 0o660) return n;
  throw new Error(`socket mode "${value}" is not 0600 or 0660; another user must never reach the socket`);
}

/** Resolves a group name or id to a numeric gid (from /etc/group). */
export async function resolveGroupId(group: string | number): Promise<number> {
  if (typeof group === "number") return group;
  if (/^\d+$/.test(group)) return Number(group);
  const text = await readFile("/etc/group", "utf8").catch(() => "");
  for (const line of text.split("\n")) {
    const [name, , gid] = line.split(":");
    if (name === group && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new Error(`socket group "${group}" does not exist; create it or give a numeric gid`);
}

/** Refuses to replace anything but a stale socket at `path`. */
async function clearStaleSocket(path: string): Promise<void> {
  let st;
  try {
    st = await lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
    throw err;
  }
  if (!st.isSocket()) {
    throw new Error(`${path} exists and is not a socket; remove it or choose another socket path`);
  }
  const alive = await new Promise<boolean>((resolve) => {
    const s = createConnection(path);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
  if (alive) throw new Error(`${path} is in use by another running server; stop it or choose another socket path`);
  await unlink(path).catch(() => {});
}

/**
 * Refuses a socket directory that every user may write without the sticky bit: any of them could
 * rename the socket away and put their own in its place, and the clients would talk to it.
 */
async function refuseOpenDirectory(dir: string): Promise<void> {
  const st = await stat(dir).catch(() => undefined);
  if (st !== undefined && (st.mode & 0o002) !== 0 && (st.mode & 0o1000) === 0) {
    throw new Error(`${dir} is writable by every user and has no sticky bit, so another user could replace the socket; put the socket in a directory only its owner (and group) can write, e.g. /run/kmi (0750), or chmod +t ${dir}`);
  }
}

/**
 * Listens on a Unix socket whose mode (and group) are set before any client can connect.
 *
 * Why: Node has no peer-credential check, so the socket's file mode is the access control.
 * A socket created at its final path would exist, connectable, with the umask's mode for a
 * moment before chmod. So the socket is bound inside a fresh 0700 directory next to the final
 * path (no other user can reach it there), chmod/chowned, and only then renamed into place;
 * rename(2) is atomic, so the path never shows a socket with another mode.
 *
 * `onConnection` gets each accepted socket. Returns the listening server; `close` it and
 * call {@link removeUnixSocket} to clean up.
 */
export async function listenUnixSocket(
  path: string,
  options: UnixSocketOptions,
  onConnection: (socket: Socket) => void,
): Promise<Server> {
  const mode = options.mode ?? 0o600;
  if (mode !== 0o600 && mode !== 0o660) throw new Error(`socket mode ${(mode as number).toString(8)} is not 0600 or 0660`);
  const gid = options.group !== undefined ? await resolveGroupId(options.group) : undefined;
  const dir = dirname(path);
  await refuseOpenDirectory(dir);
  await clearStaleSocket(path);
  // mkdtemp creates the directory 0700.
  const privateDir = await mkdtemp(join(dir, `.${basename(path)}.`)).catch((err: NodeJS.ErrnoException) => {
    throw new Error(`cannot create the socket under ${dir}: ${err.code ?? err.message}; does the directory exist and is it writable?`);
  });
  const tmpPath = join(privateDir, "s");
  const server = createServer({ pauseOnConnect: false }, onConnection);
  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(tmpPath, () => {
        server.off("error", reject);
        resolve();
      });
    });
    await chmod(tmpPath, mode);
    if (gid !== undefined) await chown(tmpPath, -1, gid);
    await rename(tmpPath, path);
  } catch (err) {
    server.close();
    await rm(privateDir, { recursive: true, force: true });
    throw err;
  }
  await rm(privateDir, { recursive: true, force: true });
  return server;
}

/** Removes a socket file left by {@link listenUnixSocket} (only if it is still a socket). */
export async function removeUnixSocket(path: string): Promise<void> {
  try {
    const st = await lstat(path);
    if (st.isSocket()) await unlink(path);
  } catch {
    // Already gone.
  }
}
