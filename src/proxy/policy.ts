/**
 * The inspection policy: which hosts are blocked or bypassed, which URLs are blocked, how
 * bodies are scanned. Read from a JSON file, validated field by field (a bad file names the
 * field and keeps the previous policy in force), and reloaded without a restart.
 *
 * ```json
 * {
 *   "blockHosts":  ["evil.example", "*.ads.example", {"name": "gambling", "pattern": "*.casino.example"}],
 *   "blockUrls":   ["*://*.example/admin*", "https://files.example/*.exe"],
 *   "bypassHosts": ["*.bank.example"],
 *   "scan":        {"eicar": true, "maxBodyBytes": 1048576, "holdMs": 2000},
 *   "autoBypass":  {"enabled": false, "threshold": 3, "windowSeconds": 300, "ttlSeconds": 3600},
 *   "nonTls":      "block",
 *   "uninspectableAlpn": "block",
 *   "clientCertOrigins": "bypass"
 * }
 * ```
 *
 * Host patterns: `host.example` matches that host only; `*.example` matches every name under
 * it at any depth (not `example` itself). URL patterns are globs (`*` = any run of
 * characters) matched against `scheme://host[:port]/path?query` (default port omitted, host
 * lowercase); a pattern without `://` matches `host[:port]/path?query` under either scheme.
 */
import { readFile } from "node:fs/promises";
import { watch, type FSWatcher } from "node:fs";
import { basename, dirname, resolve } from "node:path";
import { InvalidArgument } from "../common/errors.js";
import type { Logger } from "../common/logger.js";

/** A rule that matched, as it appears on block pages and in the access log. */
export interface PolicyRule {
  /** `block-host`, `block-url`, `bypass-host`. */
  readonly kind: "block-host" | "block-url" | "bypass-host";
  /** The rule's name, or its pattern when it has none. */
  readonly name: string;
  /** The pattern as written. */
  readonly pattern: string;
}

/** Formats a rule for a log line or page: `block-host:*.ads.example`. */
export function ruleId(rule: PolicyRule): string {
  return `${rule.kind}:${rule.name}`;
}

/** Body scanning settings. */
export interface ScanSettings {
  /** Scan bodies for the EICAR test file; default true. */
  readonly eicar: boolean;
  /** Bytes of each body that are scanned (and held back until scanned); beyond it the body passes unscanned. Default 1 MiB. */
  readonly maxBodyBytes: number;
  /**
   * Longest time a body is held back while it is scanned; after it, what was scanned is
   * released and the rest is scanned as it streams (a hit then aborts the transfer instead
   * of answering with a block page). Default 2000 ms.
   */
  readonly holdMs: number;
}

/** Automatic bypass of hosts whose clients keep rejecting the minted certificate (pinned apps). */
export interface AutoBypassSettings {
  /** Off unless set: a bypassed host is not inspected. */
  readonly enabled: boolean;
  /** Rejections (per tenant and host) within the window that trigger the bypass; default 3. */
  readonly threshold: number;
  /** Window in which rejections are counted; default 300 s. */
  readonly windowSeconds: number;
  /** How long a learned bypass lasts; default 3600 s. */
  readonly ttlSeconds: number;
}

/** The validated policy. */
export interface Policy {
  /** The rule blocking this host, if any. */
  blockedHost(host: string): PolicyRule | undefined;
  /** The rule bypassing this host, if any. */
  bypassedHost(host: string): PolicyRule | undefined;
  /** The rule blocking this URL (`scheme://host[:port]/path?query`), if any. */
  blockedUrl(url: string): PolicyRule | undefined;
  /** Body scanning. */
  readonly scan: ScanSettings;
  /** Pinned-app auto-bypass. */
  readonly autoBypass: AutoBypassSettings;
  /**
   * What a CONNECT that carries cleartext other than HTTP gets: a close (default) or a plain
   * tunnel. Cleartext HTTP is always inspected like a plain proxy request, whatever this says.
   */
  readonly nonTls: "tunnel" | "block";
  /**
   * What a ClientHello that offers only protocols the proxy cannot inspect (ALPN without h2 or
   * http/1.1) gets: a close (default) or a plain tunnel. Why block by default: the offer is the
   * client's to choose, and an origin may ignore ALPN and speak HTTP anyway, so tunnelling it
   * would let any client skip inspection by offering a made-up protocol.
   */
  readonly uninspectableAlpn: "tunnel" | "block";
  /** What an origin that demands a client certificate gets: a plain tunnel (default) or a block. */
  readonly clientCertOrigins: "bypass" | "block";
}

const DEFAULT_SCAN: ScanSettings = { eicar: true, maxBodyBytes: 1024 * 1024, holdMs: 2000 };
const DEFAULT_AUTO_BYPASS: AutoBypassSettings = { enabled: false, threshold: 3, windowSeconds: 300, ttlSeconds: 3600 };

/** Normalizes a host for matching: lowercase, no trailing dot, no brackets. */
export function normalizeHost(host: string): string {
  let h = host.toLowerCase();
  if (h.startsWith("[") && h.endsWith("]")) h = h.slice(1, -1);
  if (h.endsWith(".")) h = h.slice(0, -1);
  return h;
}

class HostMatcher {
  private readonly exact = new Map<string, PolicyRule>();
  private readonly suffix = new Map<string, PolicyRule>();

  add(pattern: string, rule: PolicyRule): void {
    if (pattern.startsWith("*.")) {
      const s = pattern.slice(1); // ".example"
      if (!this.suffix.has(s)) this.suffix.set(s, rule);
    } else if (!this.exact.has(pattern)) {
      this.exact.set(pattern, rule);
    }
  }

  match(host: string): PolicyRule | undefined {
    if (this.exact.size === 0 && this.suffix.size === 0) return undefined;
    const h = normalizeHost(host);
    const hit = this.exact.get(h);
    if (hit !== undefined) return hit;
    if (this.suffix.size === 0) return undefined;
    for (let i = h.indexOf("."); i >= 0; i = h.indexOf(".", i + 1)) {
      const r = this.suffix.get(h.slice(i));
      if (r !== undefined) return r;
    }
    return undefined;
  }
}

const HOST_PATTERN = /^(\*\.)?([a-z0-9_-]+\.)*[a-z0-9_-]+$/;

function globToRegExp(glob: string): RegExp {
  let re = "";
  for (const ch of glob) re += ch === "*" ? ".*" : ch.replace(/[.+?^${}()|[\]\\/]/g, "\\$&");
  return new RegExp(`^${re}$`, "s");
}

class CompiledPolicy implements Policy {
  constructor(
    private readonly blockHosts: HostMatcher,
    private readonly bypassHosts: HostMatcher,
    private readonly urls: { rule: PolicyRule; re: RegExp; schemeless: boolean }[],
    readonly scan: ScanSettings,
    readonly autoBypass: AutoBypassSettings,
    readonly nonTls: "tunnel" | "block",
    readonly uninspectableAlpn: "tunnel" | "block",
    readonly clientCertOrigins: "bypass" | "block",
  ) {}

  blockedHost(host: string): PolicyRule | undefined {
    return this.blockHosts.match(host);
  }

  bypassedHost(host: string): PolicyRule | undefined {
    return this.bypassHosts.match(host);
  }

  blockedUrl(url: string): PolicyRule | undefined {
    if (this.urls.length === 0) return undefined;
    const sep = url.indexOf("://");
    const rest = sep >= 0 ? url.slice(sep + 3) : url;
    for (const u of this.urls) {
      if (u.re.test(u.schemeless ? rest : url)) return u.rule;
    }
    return undefined;
  }
}

/** The policy in force when no file is configured: nothing blocked, EICAR scanned. */
export function defaultPolicy(): Policy {
  return parsePolicy({});
}

function fail(field: string, message: string): never {
  throw new InvalidArgument(`${field}: ${message}`);
}

function ruleEntries(
  value: unknown,
  field: string,
  kind: PolicyRule["kind"],
  check: (pattern: string, field: string) => string,
): { pattern: string; rule: PolicyRule }[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) fail(field, "must be a list of patterns");
  return value.map((entry, i) => {
    const f = `${field}[${i}]`;
    let pattern: unknown;
    let name: unknown;
    if (typeof entry === "string") {
      pattern = entry;
    } else if (entry !== null && typeof entry === "object" && !Array.isArray(entry)) {
      ({ pattern, name } = entry as { pattern?: unknown; name?: unknown });
      for (const k of Object.keys(entry)) if (k !== "pattern" && k !== "name") fail(`${f}.${k}`, "unknown field; use pattern and name");
      if (name !== undefined && (typeof name !== "string" || name === "" || name.length > 100)) {
        fail(`${f}.name`, "must be a non-empty string of at most 100 characters");
      }
    } else {
      fail(f, 'must be a pattern string or {"pattern": "...", "name": "..."}');
    }
    if (typeof pattern !== "string" || pattern === "") fail(f, "pattern must be a non-empty string");
    const normalized = check(pattern, f);
    return { pattern: normalized, rule: { kind, name: (name as string | undefined) ?? pattern, pattern } };
  });
}

function checkHostPattern(pattern: string, field: string): string {
  const p = normalizeHost(pattern);
  if (!HOST_PATTERN.test(p) || p.length > 253) {
    fail(field, `"${pattern}" is not a host pattern; use "host.example" or "*.example"`);
  }
  return p;
}

function checkUrlPattern(pattern: string, field: string): string {
  if (pattern.length > 2048 || /\s/.test(pattern)) fail(field, `"${pattern.slice(0, 60)}" is not a url pattern; use a glob like "*://host.example/path/*"`);
  return pattern;
}

function num(obj: Record<string, unknown>, key: string, field: string, min: number, max: number, dflt: number): number {
  const v = obj[key];
  if (v === undefined) return dflt;
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
    fail(`${field}.${key}`, `must be an integer from ${min} to ${max}`);
  }
  return v;
}

function obj(value: unknown, field: string, keys: readonly string[]): Record<string, unknown> {
  if (value === undefined) return {};
  if (value === null || typeof value !== "object" || Array.isArray(value)) fail(field, "must be an object");
  for (const k of Object.keys(value)) if (!keys.includes(k)) fail(`${field}.${k}`, `unknown field; known fields are ${keys.join(", ")}`);
  return value as Record<string, unknown>;
}

const TOP_KEYS = ["blockHosts", "blockUrls", "bypassHosts", "scan", "autoBypass", "nonTls", "uninspectableAlpn", "clientCertOrigins", "$comment"] as const;

/** Validates a parsed policy document; throws InvalidArgument naming the first bad field. */
export function parsePolicy(doc: unknown): Policy {
  const top = obj(doc, "policy", TOP_KEYS);
  const blockHosts = new HostMatcher();
  for (const { pattern, rule } of ruleEntries(top["blockHosts"], "policy.blockHosts", "block-host", checkHostPattern)) blockHosts.add(pattern, rule);
  const bypassHosts = new HostMatcher();
  for (const { pattern, rule } of ruleEntries(top["bypassHosts"], "policy.bypassHosts", "bypass-host", checkHostPattern)) bypassHosts.add(pattern, rule);
  const urls = ruleEntries(top["blockUrls"], "policy.blockUrls", "block-url", checkUrlPattern).map(({ pattern, rule }) => ({
    rule,
    re: globToRegExp(pattern),
    schemeless: !pattern.includes("://"),
  }));
  const scanObj = obj(top["scan"], "policy.scan", ["eicar", "maxBodyBytes", "holdMs"]);
  if (scanObj["eicar"] !== undefined && typeof scanObj["eicar"] !== "boolean") fail("policy.scan.eicar", "must be true or false");
  const scan: ScanSettings = {
    eicar: (scanObj["eicar"] as boolean | undefined) ?? DEFAULT_SCAN.eicar,
    maxBodyBytes: num(scanObj, "maxBodyBytes", "policy.scan", 0, 256 * 1024 * 1024, DEFAULT_SCAN.maxBodyBytes),
    holdMs: num(scanObj, "holdMs", "policy.scan", 0, 600_000, DEFAULT_SCAN.holdMs),
  };
  const abObj = obj(top["autoBypass"], "policy.autoBypass", ["enabled", "threshold", "windowSeconds", "ttlSeconds"]);
  if (abObj["enabled"] !== undefined && typeof abObj["enabled"] !== "boolean") fail("policy.autoBypass.enabled", "must be true or false");
  const autoBypass: AutoBypassSettings = {
    enabled: (abObj["enabled"] as boolean | undefined) ?? DEFAULT_AUTO_BYPASS.enabled,
    threshold: num(abObj, "threshold", "policy.autoBypass", 1, 1000, DEFAULT_AUTO_BYPASS.threshold),
    windowSeconds: num(abObj, "windowSeconds", "policy.autoBypass", 1, 86_400, DEFAULT_AUTO_BYPASS.windowSeconds),
    ttlSeconds: num(abObj, "ttlSeconds", "policy.autoBypass", 1, 30 * 86_400, DEFAULT_AUTO_BYPASS.ttlSeconds),
  };
  const nonTls = top["nonTls"] ?? "block";
  if (nonTls !== "tunnel" && nonTls !== "block") fail("policy.nonTls", 'must be "tunnel" or "block"');
  const uninspectableAlpn = top["uninspectableAlpn"] ?? "block";
  if (uninspectableAlpn !== "tunnel" && uninspectableAlpn !== "block") fail("policy.uninspectableAlpn", 'must be "tunnel" or "block"');
  const clientCertOrigins = top["clientCertOrigins"] ?? "bypass";
  if (clientCertOrigins !== "bypass" && clientCertOrigins !== "block") fail("policy.clientCertOrigins", 'must be "bypass" or "block"');
  return new CompiledPolicy(blockHosts, bypassHosts, urls, scan, autoBypass, nonTls, uninspectableAlpn, clientCertOrigins);
}

/** Reads and validates a policy file; errors name the file and the field. */
export async function loadPolicyFile(path: string): Promise<Policy> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    throw new InvalidArgument(`policy file ${path}: cannot read it (${(err as NodeJS.ErrnoException).code ?? String(err)}); check --policy`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new InvalidArgument(`policy file ${path}: not valid JSON (${(err as Error).message})`);
  }
  try {
    return parsePolicy(doc);
  } catch (err) {
    throw new InvalidArgument(`policy file ${path}: ${(err as Error).message}`);
  }
}

/**
 * Holds the policy in force and reloads it from its file: on {@link PolicyStore.reload}
 * (the server calls it on SIGHUP) and when the file changes. A file that does not load
 * leaves the previous policy in force and is logged.
 */
export class PolicyStore {
  private policy: Policy;
  private watcher: FSWatcher | undefined;
  private debounce: NodeJS.Timeout | undefined;
  private generation = 0;
  private failed = 0;

  private constructor(
    private readonly path: string | undefined,
    initial: Policy,
    private readonly logger: Logger,
    private readonly onReloadFailed: () => void = () => {},
  ) {
    this.policy = initial;
  }

  /**
   * Loads the file (if any; otherwise the default policy). A bad file at startup is an error.
   * `onReloadFailed` is called for each later reload that fails (a metric counts them).
   */
  static async create(path: string | undefined, logger: Logger, onReloadFailed?: () => void): Promise<PolicyStore> {
    const p = path === undefined ? defaultPolicy() : await loadPolicyFile(path);
    return new PolicyStore(path === undefined ? undefined : resolve(path), p, logger, onReloadFailed);
  }

  /** A store with a fixed policy (tests). */
  static fixed(policy: Policy, logger: Logger): PolicyStore {
    return new PolicyStore(undefined, policy, logger);
  }

  /** The policy in force. */
  get current(): Policy {
    return this.policy;
  }

  /** Times the policy was replaced since start. */
  get reloads(): number {
    return this.generation;
  }

  /** Reloads that failed since start (the previous policy stayed in force). */
  get failures(): number {
    return this.failed;
  }

  /** Rereads the file; returns true when the new policy is in force. */
  async reload(): Promise<boolean> {
    if (this.path === undefined) return false;
    try {
      this.policy = await loadPolicyFile(this.path);
      this.generation++;
      this.logger.info("policy reloaded", { path: this.path, generation: this.generation });
      return true;
    } catch (err) {
      this.failed++;
      // `event` is what `kmi up` picks out to print on its terminal.
      this.logger.error("policy reload failed; the previous policy stays in force", { event: "policy-reload-failed", path: this.path, error: (err as Error).message });
      this.onReloadFailed();
      return false;
    }
  }

  /**
   * Watches the file's directory (editors and config managers replace files by rename, which
   * a watch on the file itself would miss) and reloads shortly after a change.
   */
  watch(): void {
    if (this.path === undefined || this.watcher !== undefined) return;
    const name = basename(this.path);
    try {
      this.watcher = watch(dirname(this.path), { persistent: false }, (_event, file) => {
        if (file !== null && file !== name) return;
        clearTimeout(this.debounce);
        this.debounce = setTimeout(() => void this.reload(), 100);
        this.debounce.unref();
      });
      this.watcher.on("error", (err) => this.logger.warn("policy file watch failed; reload with SIGHUP", { error: err.message }));
    } catch (err) {
      this.logger.warn("cannot watch the policy file; reload with SIGHUP", { path: this.path, error: (err as Error).message });
    }
  }

  /** Stops watching. */
  close(): void {
    clearTimeout(this.debounce);
    this.watcher?.close();
    this.watcher = undefined;
  }
}
