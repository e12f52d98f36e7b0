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
 *   "scan":        {"eicar": true, "maxBodyBytes": 1048576, "holdMs": 2000, "uploads": true},
 *   "icap":        {"respmod": {"name": "clamav", "url": "icap://127.0.0.1:1344/virus_scan", "failMode": "closed"},
 *                   "reqmod":  {"name": "clamav", "url": "icap://127.0.0.1:1344/virus_scan", "failMode": "closed"}},
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
 *
 * Per tenant: a tenant in the tenants file may carry a `policy` of the same shape. Each
 * top-level field it sets replaces the global policy's; the fields it leaves out are
 * inherited. A tenant without one has the global policy.
 */
import { readFile } from "node:fs/promises";
import { watch, type FSWatcher } from "node:fs";
import { basename, dirname, resolve } from "node:path";
import { InvalidArgument } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import type { IcapServiceConfig } from "./icap/service.js";
import { parseIcapUrl } from "./icap/wire.js";

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
  /** Inspect uploads (request bodies) too, with the built-in scan and the REQMOD service; default true. */
  readonly uploads: boolean;
}

/** The ICAP services bodies are sent to (none by default: the built-in EICAR scan needs nothing). */
export interface IcapSettings {
  /** The service responses go to (RESPMOD). */
  readonly respmod?: IcapServiceConfig;
  /** The service uploads go to (REQMOD), when uploads are inspected. */
  readonly reqmod?: IcapServiceConfig;
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
  /** True when the policy has URL rules (a request's URLs need not be built otherwise). */
  readonly hasUrlRules: boolean;
  /** Body scanning. */
  readonly scan: ScanSettings;
  /** ICAP services. */
  readonly icap: IcapSettings;
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

const DEFAULT_SCAN: ScanSettings = { eicar: true, maxBodyBytes: 1024 * 1024, holdMs: 2000, uploads: true };
const ICAP_SERVICE_KEYS = ["name", "url", "failMode", "connectTimeoutMs", "readTimeoutMs", "maxConnections"] as const;
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
    readonly icap: IcapSettings,
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

  get hasUrlRules(): boolean {
    return this.urls.length > 0;
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

const TOP_KEYS = ["blockHosts", "blockUrls", "bypassHosts", "scan", "icap", "autoBypass", "nonTls", "uninspectableAlpn", "clientCertOrigins", "$comment"] as const;

function icapService(value: unknown, field: string): IcapServiceConfig | undefined {
  if (value === undefined) return undefined;
  const o = obj(value, field, ICAP_SERVICE_KEYS);
  const url = parseIcapUrl(o["url"], `${field}.url`);
  const name = o["name"] ?? `${url.host}:${url.port}`;
  if (typeof name !== "string" || !/^[A-Za-z0-9._:-]{1,64}$/.test(name)) fail(`${field}.name`, "must be 1 to 64 letters, digits, '.', ':', '_' or '-'");
  const failMode = o["failMode"] ?? "closed";
  if (failMode !== "open" && failMode !== "closed") fail(`${field}.failMode`, 'must be "open" (pass bodies unscanned when the service is down) or "closed" (block them)');
  return {
    name,
    url,
    failMode,
    connectTimeoutMs: num(o, "connectTimeoutMs", field, 1, 60_000, 2_000),
    readTimeoutMs: num(o, "readTimeoutMs", field, 1, 600_000, 30_000),
    maxConnections: num(o, "maxConnections", field, 1, 1024, 32),
  };
}

function icapSettings(value: unknown): IcapSettings {
  const o = obj(value, "policy.icap", ["respmod", "reqmod"]);
  const respmod = icapService(o["respmod"], "policy.icap.respmod");
  const reqmod = icapService(o["reqmod"], "policy.icap.reqmod");
  return { ...(respmod !== undefined ? { respmod } : {}), ...(reqmod !== undefined ? { reqmod } : {}) };
}

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
  const scanObj = obj(top["scan"], "policy.scan", ["eicar", "maxBodyBytes", "holdMs", "uploads"]);
  if (scanObj["eicar"] !== undefined && typeof scanObj["eicar"] !== "boolean") fail("policy.scan.eicar", "must be true or false");
  if (scanObj["uploads"] !== undefined && typeof scanObj["uploads"] !== "boolean") fail("policy.scan.uploads", "must be true or false");
  const scan: ScanSettings = {
    eicar: (scanObj["eicar"] as boolean | undefined) ?? DEFAULT_SCAN.eicar,
    maxBodyBytes: num(scanObj, "maxBodyBytes", "policy.scan", 0, 256 * 1024 * 1024, DEFAULT_SCAN.maxBodyBytes),
    holdMs: num(scanObj, "holdMs", "policy.scan", 0, 600_000, DEFAULT_SCAN.holdMs),
    uploads: (scanObj["uploads"] as boolean | undefined) ?? DEFAULT_SCAN.uploads,
  };
  const icap = icapSettings(top["icap"]);
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
  return new CompiledPolicy(blockHosts, bypassHosts, urls, scan, icap, autoBypass, nonTls, uninspectableAlpn, clientCertOrigins);
}

/** Reads a JSON file; errors name the file and say what to check. */
async function readJson(path: string, what: string, flag: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    throw new InvalidArgument(`${what} ${path}: cannot read it (${(err as NodeJS.ErrnoException).code ?? String(err)}); check ${flag}`);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new InvalidArgument(`${what} ${path}: not valid JSON (${(err as Error).message})`);
  }
}

/** A tenant's own policy document, as the tenants file carries it. */
export interface TenantPolicyEntry {
  readonly id: string;
  readonly policy?: unknown;
}

/** The policies in force: the global one and each tenant's own. */
export interface PolicySet {
  readonly global: Policy;
  readonly byTenant: ReadonlyMap<string, Policy>;
}

/**
 * Compiles the global policy document and each tenant's: a tenant's top-level fields replace
 * the global ones. Throws InvalidArgument naming the tenant and the field.
 */
export function compilePolicies(globalDoc: unknown, tenants: readonly TenantPolicyEntry[]): PolicySet {
  const global = parsePolicy(globalDoc);
  const base = obj(globalDoc, "policy", TOP_KEYS);
  const byTenant = new Map<string, Policy>();
  for (const t of tenants) {
    if (t.policy === undefined) continue;
    try {
      byTenant.set(t.id, parsePolicy({ ...base, ...obj(t.policy, "policy", TOP_KEYS) }));
    } catch (err) {
      throw new InvalidArgument(`tenant "${t.id}": ${(err as Error).message}`);
    }
  }
  return { global, byTenant };
}

/** Reads the tenants file's per-tenant policies (its users and ranges are the resolver's). */
async function readTenantPolicies(path: string): Promise<TenantPolicyEntry[]> {
  const doc = await readJson(path, "tenants file", "--tenants-file");
  const tenants = (doc as { tenants?: unknown } | null)?.tenants;
  if (tenants === undefined) return [];
  if (!Array.isArray(tenants)) throw new InvalidArgument(`tenants file ${path}: "tenants" must be a list`);
  return tenants.map((t: unknown, i) => {
    const e = t as { id?: unknown; policy?: unknown } | null;
    if (e === null || typeof e !== "object" || typeof e.id !== "string") throw new InvalidArgument(`tenants file ${path}: tenants[${i}].id: must be a string`);
    return { id: e.id, policy: e.policy };
  });
}

/** Options of {@link PolicyStore.create}. */
export interface PolicyStoreOptions {
  /** The tenants as configured at start (their `policy` fields). */
  readonly tenants?: readonly TenantPolicyEntry[];
  /** The tenants file, reread (for its policies) on every reload. */
  readonly tenantsFile?: string;
  /** Called when a reload is refused (a metric counts it). */
  readonly onReloadFailed?: (error: string) => void;
}

/**
 * Holds the policies in force (the global one and each tenant's) and reloads them from
 * their files: on {@link PolicyStore.reload} (the server calls it on SIGHUP) and when a file
 * changes. A reload that does not load leaves every previous policy in force, is logged as
 * an error and counted; requests and connections in flight keep the policy they started with.
 */
export class PolicyStore {
  private set: PolicySet;
  private readonly watchers: FSWatcher[] = [];
  private debounce: NodeJS.Timeout | undefined;
  private generation = 0;
  private failed = 0;

  private constructor(
    private readonly path: string | undefined,
    initial: PolicySet,
    private readonly logger: Logger,
    private readonly options: PolicyStoreOptions,
  ) {
    this.set = initial;
  }

  /** Loads the file (if any; otherwise the default policy) and the tenants' policies. A bad one at startup is an error. */
  static async create(path: string | undefined, logger: Logger, options: PolicyStoreOptions = {}): Promise<PolicyStore> {
    const doc = path === undefined ? {} : await readJson(path, "policy file", "--policy");
    const set = PolicyStore.compile(path, doc, options.tenants ?? [], options.tenantsFile);
    const tenantsFile = options.tenantsFile === undefined ? undefined : resolve(options.tenantsFile);
    return new PolicyStore(path === undefined ? undefined : resolve(path), set, logger, { ...options, tenantsFile });
  }

  /** A store with a fixed policy (tests). */
  static fixed(policy: Policy, logger: Logger): PolicyStore {
    return new PolicyStore(undefined, { global: policy, byTenant: new Map() }, logger, {});
  }

  private static compile(path: string | undefined, doc: unknown, tenants: readonly TenantPolicyEntry[], tenantsFile: string | undefined): PolicySet {
    try {
      return compilePolicies(doc, tenants);
    } catch (err) {
      const msg = (err as Error).message;
      if (msg.startsWith("tenant ")) throw new InvalidArgument(tenantsFile === undefined ? msg : `tenants file ${tenantsFile}: ${msg}`);
      throw new InvalidArgument(path === undefined ? msg : `policy file ${path}: ${msg}`);
    }
  }

  /** The global policy in force. */
  get current(): Policy {
    return this.set.global;
  }

  /** The policy in force for a tenant: its own, or the global one. */
  forTenant(tenant: string): Policy {
    return this.set.byTenant.get(tenant) ?? this.set.global;
  }

  /** Times the policy was replaced since start. */
  get reloads(): number {
    return this.generation;
  }

  /** Reloads that failed since start (the previous policies stayed in force). */
  get failures(): number {
    return this.failed;
  }

  /** Rereads the files; returns true when the new policies are in force. */
  async reload(): Promise<boolean> {
    const tenantsFile = this.options.tenantsFile;
    if (this.path === undefined && tenantsFile === undefined) return false;
    try {
      const doc = this.path === undefined ? {} : await readJson(this.path, "policy file", "--policy");
      const tenants = tenantsFile === undefined ? (this.options.tenants ?? []) : await readTenantPolicies(tenantsFile);
      this.set = PolicyStore.compile(this.path, doc, tenants, tenantsFile);
      this.generation++;
      this.logger.info("policy reloaded", { path: this.path, tenantsFile, generation: this.generation, tenantPolicies: this.set.byTenant.size });
      return true;
    } catch (err) {
      const error = (err as Error).message;
      this.failed++;
      // `event` is what `kmi up` picks out to print on its terminal.
      this.logger.error("policy reload failed; the previous policy stays in force", { event: "policy-reload-failed", path: this.path, tenantsFile, error });
      this.options.onReloadFailed?.(error);
      return false;
    }
  }

  /**
   * Watches the files' directories (editors and config managers replace files by rename,
   * which a watch on the file itself would miss) and reloads shortly after a change.
   */
  watch(): void {
    if (this.watchers.length > 0) return;
    const files = [this.path, this.options.tenantsFile].filter((f): f is string => f !== undefined);
    for (const file of files) {
      const name = basename(file);
      try {
        const w = watch(dirname(file), { persistent: false }, (_event, changed) => {
          if (changed !== null && changed !== name) return;
          clearTimeout(this.debounce);
          this.debounce = setTimeout(() => void this.reload(), 100);
          this.debounce.unref();
        });
        w.on("error", (err) => this.logger.warn("policy file watch failed; reload with SIGHUP", { path: file, error: err.message }));
        this.watchers.push(w);
      } catch (err) {
        this.logger.warn("cannot watch the policy file; reload with SIGHUP", { path: file, error: (err as Error).message });
      }
    }
  }

  /** Stops watching. */
  close(): void {
    clearTimeout(this.debounce);
    for (const w of this.watchers.splice(0)) w.close();
  }
}
