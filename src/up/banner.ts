/**
 * The text `kmi up` prints once everything is healthy: where each part listens and logs, the
 * root to trust, a curl through the proxy that works for how the mesh was started, and the
 * `alias` and `export` lines for `kmi ctl`. Every path is absolute, so the lines work when
 * pasted in any directory.
 */
import { BlockList, isIP } from "node:net";
import { attestationWord, heldVersions } from "../clients/mesh-health.js";
import type { GetStatusResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import type { UpConfig } from "./config.js";
import { ctlEnv } from "./health.js";
import type { Layout } from "./layout.js";

/** What the banner shows. */
export interface BannerInput {
  L: Layout;
  urls: { kdc: string; audit: string; proxy: string };
  cfg: Pick<UpConfig, "tenant" | "originCaFiles" | "proxyAllowPrivate">;
  /** The kmi script (absolute), for the alias line. */
  kmiScript: string;
  /** The agent's status when ready, if it answered. */
  status: GetStatusResponse | undefined;
  /** A one-time operator login link to the portal, when one could be made. */
  portal?: string | undefined;
  /** With --ha: every replica's URL (replica 1 first) and the etcd members. */
  ha?: { kdc: readonly string[]; audit: readonly string[]; etcd: readonly { name: string; url: string }[] } | undefined;
}

/** The banner's rows with --ha: each replica and etcd member (name, address, log). */
function haRows(L: Layout, ha: NonNullable<BannerInput["ha"]>): [string, string, string][] {
  const replica = (program: "kdc" | "audit", label: string, url: string, i: number): [string, string, string] => {
    const id = i === 0 ? program : (`${program}-${i + 1}` as const);
    return [`${label} ${i + 1}`, url, L.log(id)];
  };
  return [
    ...ha.etcd.map((m): [string, string, string] => [m.name, m.url, L.log(m.name as `etcd-${number}`)]),
    ...ha.kdc.map((u, i) => replica("kdc", "KDC", u, i)),
    ...ha.audit.map((u, i) => replica("audit", "Auditserver", u, i)),
  ];
}

/** True when one of the `--proxy-allow-private` ranges holds 127.0.0.1 (the proxy may reach a local origin). */
export function loopbackAllowed(ranges: readonly string[]): boolean {
  const list = new BlockList();
  for (const r of ranges) {
    const [ip, bits] = r.split("/");
    const family = isIP(ip ?? "");
    if (family === 0) continue;
    const type = family === 6 ? "ipv6" : "ipv4";
    if (bits === undefined) list.addAddress(ip!, type);
    else if (/^\d+$/.test(bits)) list.addSubnet(ip!, Number(bits), type);
  }
  return list.check("127.0.0.1", "ipv4");
}

/**
 * The "browse through the proxy" lines. Started with `--origin-ca-file` (offline, with a local
 * origin), the curl goes to an origin that CA signed, on loopback when the proxy may reach it,
 * instead of example.com.
 */
export function browseLines(proxyUrl: string, rootFile: string, cfg: BannerInput["cfg"]): string[] {
  if (cfg.originCaFiles.length === 0) {
    return ["Browse through the inspecting proxy:", `  curl -x ${proxyUrl} --cacert ${rootFile} https://example.com/`];
  }
  const loopback = loopbackAllowed(cfg.proxyAllowPrivate);
  return [
    `Browse through the inspecting proxy to an origin signed by ${cfg.originCaFiles.join(", ")} (the --origin-ca-file it was started with)` +
      (loopback ? "; loopback is allowed (--proxy-allow-private), so a local one works (<port>: the origin's):" : "; allow its address with --proxy-allow-private if it is private (<host> and <port>: the origin's):"),
    `  curl -x ${proxyUrl} --cacert ${rootFile} https://${loopback ? "localhost" : "<host>"}:<port>/`,
  ];
}

/** The banner text. */
export function banner(o: BannerInput): string {
  const { L, urls, cfg } = o;
  const env = ctlEnv(L, urls, o.ha);
  const held = o.status !== undefined ? heldVersions(o.status)[cfg.tenant] : undefined;
  const agentLine =
    o.status === undefined
      ? "status unknown"
      : `machine ${o.status.machineId}, ${attestationWord(o.status.attestation)}${held !== undefined ? `, holds ${cfg.tenant} v${held}` : ""}`;
  const rows: [string, string, string][] = [
    ...(o.ha === undefined ? ([["KDC", urls.kdc, L.log("kdc")], ["Auditserver", urls.audit, L.log("audit")]] as [string, string, string][]) : haRows(L, o.ha)),
    ["agent", L.agentSocket, `${L.log("agent")}  (${agentLine})`],
    ["proxy", urls.proxy, `${L.log("proxy")}  (default tenant ${cfg.tenant}; access log ${L.accessLog})`],
  ];
  const w0 = Math.max(...rows.map((r) => r[0].length));
  const w1 = Math.max(...rows.map((r) => r[1].length));
  const root = L.kmiRootPem;
  return [
    "",
    o.ha === undefined ? "kmi is up:" : "kmi is up, highly available (KDC and Auditserver replicas on a 3-member etcd cluster; any replica serves any call):",
    ...rows.map(([a, b, c]) => `  ${a.padEnd(w0)}  ${b.padEnd(w1)}  log ${c}`),
    "",
    `Trust this root CA on your devices (and in curl): ${root}`,
    `Operator token (secret, 0600):                    ${L.operatorToken}`,
    "",
    `Portal (the Certificate menu in a browser that trusts ${L.infraCaPem}): ${urls.kdc}/`,
    ...(o.portal !== undefined ? [`  one-time operator login link (15 min): ${o.portal}`, `  more: kmi ctl portal login-link --tenant ${cfg.tenant}`] : []),
    "",
    ...browseLines(urls.proxy, root, cfg),
    "",
    "Administer it with kmi ctl, from any directory:",
    `  alias kmi="node ${o.kmiScript}"`,
    `  export KMI_CTL_KDC=${env["KMI_CTL_KDC"]} KMI_CTL_AUDIT=${env["KMI_CTL_AUDIT"]} \\`,
    `         KMI_CTL_TOKEN_FILE=${env["KMI_CTL_TOKEN_FILE"]} KMI_CTL_CA_FILE=${env["KMI_CTL_CA_FILE"]}`,
    `  kmi ctl ca status --tenant ${cfg.tenant}`,
    `  kmi ctl machine list`,
    `  kmi up status                 (this mesh's health, from another terminal)`,
    "",
    ...(o.ha === undefined
      ? ["The same with 3 KDC and 2 Auditserver replicas on a local 3-member etcd cluster: kmi up --ha (with another --data-dir and --run-dir).", ""]
      : []),
    "Ctrl-C stops everything.",
    "",
  ].join("\n");
}
