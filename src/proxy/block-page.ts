/**
 * The pages the proxy answers with instead of the origin's: short HTML that says what
 * happened, to which host, and which rule or error decided it. The same facts go into the
 * `X-Kmi-Decision` / `X-Kmi-Rule` headers, so scripts need not parse HTML.
 */

/** A page to send. */
export interface BlockPage {
  /** HTTP status: 403 (policy), 407 (credentials), 502 (origin), 503 (agent), 429 (rate). */
  readonly status: number;
  /** Headers (lowercase names). */
  readonly headers: Record<string, string>;
  /** Body, UTF-8. */
  readonly body: Buffer;
}

const TITLES: Record<number, string> = {
  400: "Bad request",
  403: "Blocked by policy",
  407: "Proxy authentication required",
  429: "Too many new hosts",
  502: "Origin refused",
  503: "Inspection unavailable",
};

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** Header values must stay on one line and in Latin-1. */
function headerSafe(s: string): string {
  return s.replace(/[^\x20-\x7e]/g, "?").slice(0, 300);
}

/**
 * Renders a page. `reason` is a sentence; `rule` the rule id or error class; `decision` what
 * the access log calls it (default: `error` for 502/503, else `block`).
 */
export function renderBlockPage(status: number, host: string, reason: string, rule: string | undefined, decision?: "block" | "error"): BlockPage {
  const title = TITLES[status] ?? "Refused";
  const html =
    `<!doctype html>\n<html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>\n` +
    `<body style="font-family:sans-serif;max-width:40em;margin:3em auto">\n` +
    `<h1>${escapeHtml(title)}</h1>\n` +
    `<p>The kmi proxy did not let this request through.</p>\n` +
    `<p>host: <code>${escapeHtml(host)}</code></p>\n` +
    `<p>reason: ${escapeHtml(reason)}</p>\n` +
    (rule !== undefined ? `<p>rule: <code>${escapeHtml(rule)}</code></p>\n` : "") +
    `<p>status: ${status}</p>\n</body></html>\n`;
  const body = Buffer.from(html, "utf8");
  const headers: Record<string, string> = {
    "content-type": "text/html; charset=utf-8",
    "content-length": String(body.length),
    "cache-control": "no-store",
    "x-kmi-decision": decision ?? (status === 502 || status === 503 ? "error" : "block"),
    "x-kmi-reason": headerSafe(reason),
  };
  if (rule !== undefined) headers["x-kmi-rule"] = headerSafe(rule);
  return { status, headers, body };
}

/** The page as raw HTTP/1.1 bytes (for a socket that has no HTTP server on it). */
export function rawHttpResponse(page: BlockPage, extraHeaders: Record<string, string> = {}): Buffer {
  const head = [`HTTP/1.1 ${page.status} ${TITLES[page.status] ?? "Refused"}`];
  for (const [k, v] of Object.entries({ ...page.headers, connection: "close", ...extraHeaders })) head.push(`${k}: ${v}`);
  return Buffer.concat([Buffer.from(head.join("\r\n") + "\r\n\r\n", "latin1"), page.body]);
}
