/**
 * `npm run bench` — kmi's benchmarks (issue 8), run side by side with their baselines on this
 * machine, printed as a table and written to docs/benchmarks.md.
 *
 *   --quick        every benchmark for about a second or two (the test runs this); writes no file
 *   --json         print the results as JSON on stdout (the table goes to stderr)
 *   --only 1,3     run only these rows (the others print "not measured: skipped")
 *   --out FILE     write the Markdown here (default docs/benchmarks.md on a full run)
 *   --profile      take CPU profiles where a target is missed (default on a full run)
 *   --no-profile   never profile
 *   --quiet        no progress lines
 *   --sessions N   row 9: watch sessions over the replicas (default 5000; 30 with --quick), 1 to 20000
 *   --agents N     row 11: agents on the KDC replica that is killed (default 2000; 20 with --quick), 1 to 20000
 *
 * Every server it starts listens on loopback or a temp Unix socket and is stopped at the end.
 * It exits 1 when any row fails (a server that does not start, calls that fail, requests through
 * kmi or to the origin that fail beyond the limit); the reason is on stderr and in the table.
 * Only the comparisons with mitmdump, a peer tool that may be absent, are "not measured".
 */
import { writeFile } from "node:fs/promises";
import { loadavg } from "node:os";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Env } from "./lib/env.js";
import { describeMachine, renderMarkdown, renderText, rowHeading } from "./lib/report.js";
import { RowBuilder, type RowResult } from "./lib/results.js";
import { ROW_TITLES, runIcap, runKdc, runMinting, runRotation, runSigning, runStore, runThroughput, runFailover, runProxyCost, runReplicas, runReattach, runTokenLeaves } from "./rows/index.js";

interface Args {
  quick: boolean;
  json: boolean;
  only: Set<string> | undefined;
  out: string | undefined;
  profile: boolean | undefined;
  quiet: boolean;
  sessions: number | undefined;
  agents: number | undefined;
}

/** `--help`: the flags, and the rows `--only` takes. */
function usage(): string {
  return [
    "usage: npm run bench -- [flags]",
    "",
    "Runs kmi's benchmarks beside their baselines on this machine; every ratio is taken within the run.",
    "A full run writes docs/benchmarks.md (about half an hour on 2 cores); it exits 1 when a row fails.",
    "",
    "  --quick              every benchmark for a second or two (what the test runs); writes no file",
    "  --json               the results as JSON on stdout (the table goes to stderr)",
    "  --only 3,10          only these rows (the others print \"not measured: skipped\")",
    "  --out FILE           write the Markdown here (default docs/benchmarks.md on a full run)",
    "  --profile            CPU profiles where a target is missed (default on a full run)",
    "  --no-profile         never profile",
    "  --quiet              no progress lines",
    "  --sessions N         row 9: watch sessions over the replicas (default 5000; 30 with --quick), 1 to 20000",
    "  --agents N           row 11: agents on the KDC replica that is killed (default 2000; 20 with --quick), 1 to 20000",
    "",
    "rows:",
    ...Object.entries(ROW_TITLES).map(([id, title]) => `  ${id.padStart(2)}  ${title}`),
    "",
  ].join("\n");
}

function parseArgs(argv: string[]): Args {
  const a: Args = { quick: false, json: false, only: undefined, out: undefined, profile: undefined, quiet: false, sessions: undefined, agents: undefined };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i]!;
    const value = (): string => {
      const eq = v.indexOf("=");
      if (eq >= 0) return v.slice(eq + 1);
      const next = argv[++i];
      if (next === undefined) throw new Error(`${v} needs a value`);
      return next;
    };
    if (v === "--quick") a.quick = true;
    else if (v === "--json") a.json = true;
    else if (v === "--profile") a.profile = true;
    else if (v === "--no-profile") a.profile = false;
    else if (v === "--quiet") a.quiet = true;
    else if (v.startsWith("--only")) {
      a.only = new Set(value().split(",").map((s) => s.trim()));
      const unknown = [...a.only].filter((id) => ROW_TITLES[id] === undefined);
      if (unknown.length > 0) throw new Error(`--only: no row ${unknown.join(", ")}; the rows are ${Object.keys(ROW_TITLES).join(", ")} (see --help)`);
    }
    else if (v.startsWith("--out")) a.out = value();
    else if (v.startsWith("--sessions")) {
      const n = Number(value());
      if (!Number.isInteger(n) || n < 1 || n > 20_000) throw new Error("--sessions: give a whole number from 1 to 20000");
      a.sessions = n;
    } else if (v.startsWith("--agents")) {
      const n = Number(value());
      if (!Number.isInteger(n) || n < 1 || n > 20_000) throw new Error("--agents: give a whole number from 1 to 20000");
      a.agents = n;
    }
    else if (v === "--help" || v === "-h") {
      process.stdout.write(usage());
      process.exit(0);
    } else throw new Error(`unknown argument ${v}; see --help`);
  }
  return a;
}

/** An error as one line for the table (the full stack goes to stderr). */
function oneLine(err: unknown): string {
  const s = (err instanceof Error ? err.message : String(err)).replace(/\s+/g, " ").trim();
  return s.length > 500 ? `${s.slice(0, 500)}…` : s;
}

const ROWS: { id: string; run: (env: Env) => Promise<RowBuilder> }[] = [
  { id: "1", run: runSigning },
  { id: "2", run: runMinting },
  { id: "3", run: runThroughput },
  { id: "4", run: runRotation },
  { id: "5", run: runKdc },
  { id: "6", run: runIcap },
  { id: "7", run: runStore },
  { id: "8", run: runFailover },
  { id: "9", run: runReplicas },
  { id: "10", run: runProxyCost },
  { id: "11", run: runReattach },
  { id: "12", run: runTokenLeaves },
];

async function main(): Promise<number> {
  // A reader that went away (a killed test runner) must not crash the run before it cleans up.
  process.stdout.on("error", () => {});
  process.stderr.on("error", () => {});
  const args = parseArgs(process.argv.slice(2));
  const mode = args.quick ? "quick" : "full";
  const env = await Env.create(mode, !args.quiet, args.profile ?? mode === "full", args.sessions, args.agents);
  const machine = describeMachine();
  const print = (s: string) => (args.json ? process.stderr : process.stdout).write(s);
  if (mode === "full" && machine.loadBefore[0]! > 1.5) {
    process.stderr.write(`warning: load average is ${machine.loadBefore[0]} (over 1.5): other work shares the CPU, so these figures are noisy\n`);
  }
  const rows: RowResult[] = [];
  let failed = false;
  const stopAll = async () => {
    await env.close();
  };
  const onSignal = () => {
    void stopAll().finally(() => process.exit(130));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  // Bounded in time whatever happens: a hung server stops the run, not the machine.
  const limitS = mode === "quick" ? 300 : 1800;
  const watchdog = setTimeout(() => {
    process.stderr.write(`bench: still running after ${limitS} s; stopping every server and giving up\n`);
    void stopAll().finally(() => process.exit(1));
  }, limitS * 1000);
  watchdog.unref();
  try {
    for (const r of ROWS) {
      const title = ROW_TITLES[r.id]!;
      const t0 = performance.now();
      let result: RowResult;
      if (args.only !== undefined && !args.only.has(r.id)) {
        const b = new RowBuilder(r.id, title, "");
        b.notMeasured(`row${r.id}`, title, "skipped (--only)");
        result = b.result;
      } else {
        if (!args.quiet) process.stderr.write(`running ${rowHeading({ id: r.id, title })}\n`);
        try {
          result = (await r.run(env)).result;
        } catch (err) {
          // A row that throws is a failure of the bench, never "not measured": a KDC that does not
          // start is exactly what this must catch. (Only the mitmdump comparisons, a peer tool that
          // may be absent, are "not measured", and row 3 records those itself.)
          failed = true;
          const b = new RowBuilder(r.id, title, "");
          b.notMeasured(`row${r.id}`, title, `the benchmark failed: ${oneLine(err)}`);
          process.stderr.write(`row ${r.id} failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
          result = b.result;
        }
        for (const f of result.failures) {
          failed = true;
          process.stderr.write(`row ${r.id} failed: ${f}\n`);
        }
      }
      result.seconds = (performance.now() - t0) / 1000;
      rows.push(result);
    }
  } finally {
    clearTimeout(watchdog);
    await stopAll();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
  machine.loadAfter = loadavg().map((v) => Math.round(v * 100) / 100);
  print(renderText(machine, mode, rows));
  if (failed) {
    const which = rows.filter((r) => r.failures.length > 0 || r.notMeasured.some((n) => n.reason.startsWith("the benchmark failed"))).map((r) => r.id);
    process.stderr.write(`bench: failed (row ${which.join(", ")}); the reasons are above\n`);
  }
  const out = args.out ?? (mode === "full" && args.only === undefined ? resolve(dirname(fileURLToPath(import.meta.url)), "../../docs/benchmarks.md") : undefined);
  if (out !== undefined) {
    const command = `npm run bench${args.quick ? " -- --quick" : ""}`;
    await writeFile(out, renderMarkdown(machine, mode, rows, command));
    if (!args.quiet) process.stderr.write(`wrote ${out}\n`);
  }
  if (args.json) process.stdout.write(JSON.stringify({ mode, machine, tempDir: env.dir, rows }, null, 2) + "\n");
  return failed ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
