/**
 * The portal's files (the bundle `npm run build:web` writes to dist/web), served by the KDC on
 * the origin of its Connect API for every path that is no RPC. The files are read once at start
 * into memory. Every answer carries the portal's security headers: CSP `default-src 'self'`
 * (nothing loads from elsewhere, no inline script), no framing, no sniffing, no referrer.
 */
import { existsSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import { extname, join, resolve } from "node:path";
import type { NodeRequest, NodeResponse } from "../common/connect-server.js";

/** The headers of every portal answer. */
export const PORTAL_HEADERS: Readonly<Record<string, string>> = {
  "content-security-policy": "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'",
  "x-content-type-options": "nosniff",
  "x-frame-options": "DENY",
  "referrer-policy": "no-referrer",
  "cross-origin-opener-policy": "same-origin",
  "cross-origin-resource-policy": "same-origin",
};

const TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
};

interface PortalFile {
  body: Buffer;
  type: string;
}

/** Where the bundle is when no folder is configured: dist/web, from dist/src/kdc or from src/kdc. */
export function defaultPortalDir(): string | undefined {
  const candidates = [resolve(import.meta.dirname, "../../web"), resolve(import.meta.dirname, "../../dist/web")];
  return candidates.find((d) => existsSync(join(d, "index.html")));
}

/** The portal's files, loaded from `dir`, answering GET and HEAD. */
export class PortalSite {
  private constructor(private readonly files: Map<string, PortalFile>) {}

  /** Loads every file of `dir` (one level; the bundle is flat). */
  static async load(dir: string): Promise<PortalSite> {
    const files = new Map<string, PortalFile>();
    for (const name of await readdir(dir)) {
      const type = TYPES[extname(name)];
      if (type === undefined) continue;
      files.set(`/${name}`, { body: await readFile(join(dir, name)), type });
    }
    if (!files.has("/index.html")) throw new Error(`portal folder ${dir} has no index.html; run \`npm run build:web\``);
    files.set("/", files.get("/index.html")!);
    return new PortalSite(files);
  }

  /** Answers one request (anything that is no RPC). */
  serve(req: NodeRequest, res: NodeResponse): void {
    const path = (req.url ?? "/").split("?", 1)[0] ?? "/";
    const file = this.files.get(path);
    const headers: Record<string, string> = { ...PORTAL_HEADERS, "cache-control": "no-cache" };
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { ...headers, allow: "GET, HEAD", "content-type": "text/plain; charset=utf-8" });
      res.end(`method ${req.method ?? ""} not allowed on ${path}; RPCs are POSTed to /<package.Service>/<Method>\n`);
      return;
    }
    if (file === undefined) {
      res.writeHead(404, { ...headers, "content-type": "text/plain; charset=utf-8" });
      res.end(`no such page or method: ${path}; the portal is at /\n`);
      return;
    }
    res.writeHead(200, { ...headers, "content-type": file.type, "content-length": String(file.body.length) });
    if (req.method === "HEAD") res.end();
    else res.end(file.body);
  }
}
