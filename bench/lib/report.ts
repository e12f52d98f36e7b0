/**
 * Output of a run: the table printed to the terminal, docs/benchmarks.md, and --json.
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { cpus, loadavg, totalmem } from "node:os";
import { latencyText, ratioText, targetText, valueText, type RowResult } from "./results.js";

/** The machine and the moment of a run. */
export interface Machine {
  readonly cpuModel: string;
  readonly cores: number;
  readonly memoryGiB: number;
  readonly node: string;
  readonly openssl: string;
  readonly date: string;
  readonly loadBefore: number[];
  loadAfter: number[];
  readonly commit: string;
}

function cpuModel(): string {
  try {
    const m = /model name\s*:\s*(.+)/.exec(readFileSync("/proc/cpuinfo", "utf8"));
    if (m) return m[1]!.trim();
  } catch {
    // not Linux
  }
  return cpus()[0]?.model ?? "unknown";
}

function commit(): string {
  try {
    const head = execFileSync("git", ["rev-parse", "--short", "HEAD"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
    const dirty = execFileSync("git", ["status", "--porcelain"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim() !== "";
    return dirty ? `${head} + uncommitted changes` : head;
  } catch {
    return "unknown";
  }
}

/** Describes this machine now. */
export function describeMachine(): Machine {
  return {
    cpuModel: cpuModel(),
    cores: cpus().length,
    memoryGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    node: process.version,
    openssl: process.versions.openssl ?? "unknown",
    date: new Date().toISOString(),
    loadBefore: loadavg().map((v) => Math.round(v * 100) / 100),
    loadAfter: [],
    commit: commit(),
  };
}

function pad(s: string, n: number): string {
  return s.length >= n ? s : s + " ".repeat(n - s.length);
}

/** The row's heading, as printed (the test looks for these). */
export function rowHeading(r: Pick<RowResult, "id" | "title">): string {
  return `${r.id}. ${r.title}`;
}

/** The terminal table. */
export function renderText(machine: Machine, mode: string, rows: readonly RowResult[]): string {
  const out: string[] = [];
  out.push(`kmi benchmarks (${mode}) — ${machine.cpuModel}, ${machine.cores} cores, Node ${machine.node}, OpenSSL ${machine.openssl}, ${machine.date}`);
  out.push(`load average before ${machine.loadBefore.join(" ")}, after ${machine.loadAfter.join(" ")}; commit ${machine.commit}`);
  for (const r of rows) {
    out.push("");
    out.push(`${rowHeading(r)}  (${r.seconds.toFixed(1)} s)`);
    const w = Math.min(64, Math.max(10, ...r.figures.map((f) => f.label.length)));
    // A not-judged figure's reason is long; it does not widen the value column of the others.
    const vw = Math.max(10, ...r.figures.filter((f) => f.notJudged === undefined).map((f) => valueText(f).length));
    for (const f of r.figures) {
      const parts = [pad(f.label, w), pad(valueText(f), vw)];
      const lat = latencyText(f);
      if (lat !== "") parts.push(lat);
      const ratio = ratioText(f);
      if (ratio !== "") parts.push(ratio);
      const target = targetText(f);
      if (target !== "") parts.push(`target ${target}`);
      out.push(`  ${parts.join("  |  ")}`);
    }
    for (const n of r.notMeasured) out.push(`  ${pad(n.label, w)}  not measured: ${n.reason}`);
    for (const f of r.failures) out.push(`  FAILED: ${f}`);
    for (const n of r.notes) out.push(`  note: ${n}`);
  }
  return out.join("\n") + "\n";
}

function md(s: string): string {
  return s.replace(/\|/g, "\\|");
}

/** docs/benchmarks.md. */
export function renderMarkdown(machine: Machine, mode: string, rows: readonly RowResult[], command: string): string {
  const out: string[] = [];
  out.push("# kmi benchmarks");
  out.push("");
  out.push(`Written by \`${command}\` (${mode} run). Each figure is the median over its repeats, with min–max in parentheses; every ratio divides by a baseline measured in the same run on the same machine. Rates count successful requests only; a figure whose requests failed too often is marked "not judged" and nothing is compared with it. Targets are those of issue 8. A figure that could not be measured says why; nothing here is estimated.`);
  out.push("");
  out.push("| machine | |");
  out.push("|---|---|");
  out.push(`| CPU | ${md(machine.cpuModel)}, ${machine.cores} cores, ${machine.memoryGiB} GiB |`);
  out.push(`| Node | ${machine.node} |`);
  out.push(`| OpenSSL (Node's) | ${machine.openssl} |`);
  out.push(`| date | ${machine.date} |`);
  out.push(`| load average (1, 5, 15 min) | before ${machine.loadBefore.join(", ")}; after ${machine.loadAfter.join(", ")} |`);
  out.push(`| commit | ${md(machine.commit)} |`);
  for (const r of rows) {
    out.push("");
    out.push(`## ${rowHeading(r)}`);
    out.push("");
    out.push(r.method);
    out.push("");
    if (r.figures.length > 0) {
      out.push("| figure | value | latency | ratio (same run) | target |");
      out.push("|---|---|---|---|---|");
      for (const f of r.figures) {
        out.push(`| ${md(f.label)}${f.baseline ? " *(baseline)*" : ""} | ${md(valueText(f))} | ${md(latencyText(f))} | ${md(ratioText(f))} | ${md(targetText(f))} |`);
      }
      out.push("");
    }
    for (const n of r.notMeasured) out.push(`- **${md(n.label)}**: not measured: ${md(n.reason)}`);
    if (r.notMeasured.length > 0) out.push("");
    for (const f of r.failures) out.push(`- **FAILED**: ${md(f)}`);
    if (r.failures.length > 0) out.push("");
    for (const n of r.notes) out.push(`- ${n}`);
    if (r.notes.length > 0) out.push("");
  }
  return out.join("\n").replace(/\n+$/, "\n");
}
