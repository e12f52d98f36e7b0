/**
 * The one home for service URLs given on the command line: `https://host:port`, or a
 * comma-separated list of them where a service runs as several replicas (the agent, the KDC and
 * the Auditserver take every replica's URL and fail over between them).
 */

/** Throws (with the fix) when `value` is not one https:// URL. */
export function httpsUrl(value: string): void {
  let u: URL;
  try {
    u = new URL(value);
  } catch {
    throw new Error(`"${value}" is not a URL; use e.g. https://127.0.0.1:7443`);
  }
  if (u.protocol !== "https:") throw new Error(`"${value}" must use https:// (kmi servers speak TLS only)`);
}

/** The URLs of a comma-separated list, trimmed, empty entries and repeats left out. */
export function urlList(value: string): string[] {
  return [...new Set(value.split(",").map((s) => s.trim()).filter((s) => s !== ""))];
}

/** Throws (with the fix) unless `value` is a non-empty comma-separated list of https:// URLs. */
export function httpsUrlList(value: string): void {
  const urls = urlList(value);
  if (urls.length === 0) throw new Error("give at least one https://host:port (several replicas: comma-separated)");
  for (const u of urls) httpsUrl(u);
}
