/**
 * Summaries of `--cpu-prof` profiles: self time by area (a package, a Node subsystem, a kmi
 * source file, GC) and the hottest functions, idle time left out.
 */
import { readdir, readFile } from "node:fs/promises";
import { basename, join } from "node:path";

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

/** The area a frame belongs to. */
export function areaOf(f: CallFrame): string {
  const u = f.url;
  if (u === "") {
    if (f.functionName === "(garbage collector)") return "GC";
    if (f.functionName === "(program)") return "(program: native, not attributed)";
    return `native ${f.functionName || "(anonymous)"}`;
  }
  const nm = /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(u);
  if (nm) return nm[1]!;
  const src = /\/dist\/(src|bench)\/(.+)\.js$/.exec(u);
  if (src) return `kmi ${src[1]}/${src[2]}`;
  if (u.startsWith("node:")) return `node:${u.replace(/^node:(internal\/)?/, "").split("/")[0]}`;
  return basename(u);
}

/** Self time by area and the hottest functions of the profiles in `dir`, as one line. */
export async function profileSummary(dir: string, topAreas = 8, topFunctions = 6): Promise<string> {
  const files = (await readdir(dir).catch(() => [] as string[])).filter((f) => f.endsWith(".cpuprofile"));
  if (files.length === 0) return "no profile was written";
  const byArea = new Map<string, number>();
  const byFn = new Map<string, number>();
  let total = 0;
  for (const f of files) {
    const p = JSON.parse(await readFile(join(dir, f), "utf8")) as CpuProfile;
    const frames = new Map<number, CallFrame>();
    for (const n of p.nodes) frames.set(n.id, n.callFrame);
    for (let i = 0; i < p.samples.length; i++) {
      const cf = frames.get(p.samples[i]!);
      const dt = p.timeDeltas[i + 1] ?? 0;
      if (cf === undefined || cf.functionName === "(idle)") continue;
      total += dt;
      const area = areaOf(cf);
      byArea.set(area, (byArea.get(area) ?? 0) + dt);
      const fn = `${cf.functionName || "(anonymous)"} (${cf.url === "" ? "native" : `${basename(cf.url)}:${cf.lineNumber + 1}`})`;
      byFn.set(fn, (byFn.get(fn) ?? 0) + dt);
    }
  }
  if (total === 0) return "the profile holds no busy samples";
  const pct = (v: number) => `${((v / total) * 100).toFixed(1)}%`;
  const areas = [...byArea].sort((a, b) => b[1] - a[1]).slice(0, topAreas).map(([k, v]) => `${k} ${pct(v)}`);
  const fns = [...byFn].sort((a, b) => b[1] - a[1]).slice(0, topFunctions).map(([k, v]) => `${k} ${pct(v)}`);
  return `by area: ${areas.join(", ")}; hottest functions: ${fns.join(", ")} (busy time ${(total / 1e6).toFixed(2)} s).`;
}
