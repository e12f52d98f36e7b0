/**
 * End to end, as a newcomer runs it: a fresh copy of the repository, the start command read
 * from README.md's "Two commands" block and run there (`npm start`: build, then `kmi up`), then
 * every command of README.md's "A five-minute tour", read from the README and run through
 * `bash -c` in the copy as a person pastes them: browsing through the proxy with
 * `curl --cacert <the KMI root>`, downloading the CA, the private-CA flow with openssl as the
 * private CA, a rotation whose rollout `kmi ctl ca status` shows complete, a quarantine after
 * which the proxy refuses, then Ctrl-C (SIGINT to the process group) and a check that every part
 * exited. A second `npm start` reuses the state and keeps the quarantine until the tour's
 * `machine release`; the tour's `audit verify` passes, and SIGINT stops it.
 *
 * What a person would change in the tour on their machine is changed here, in `localize()` and
 * nothing else: the default ports become the ones `kmi up` bound, example.com becomes a local
 * HTTPS origin, `<machine id>` the machine's id. The README's `alias kmi=…` becomes a shell
 * function (aliases do not expand in non-interactive bash).
 *
 * Ports: KMI_UP_KDC_LISTEN, KMI_UP_AUDIT_LISTEN and KMI_UP_PROXY_LISTEN are 127.0.0.1:0 (the
 * defaults 7443, 7444 and 8080 may be taken on a shared machine); the test origin's CA is given
 * to the proxy with KMI_UP_ORIGIN_CA_FILE, and loopback is allowed with
 * KMI_UP_PROXY_ALLOW_PRIVATE, as the tour says to do without Internet access.
 * KMI_E2E_DUMP=<file> saves the first run's output there (for looking at what `npm start` printed).
 */
import { X509Certificate } from "node:crypto";
import { mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { alive, makeTempDir, run, type RunResult, type TempDir } from "../../helpers/process.js";
import { copyRepo } from "../../fixtures/up/copy-repo.js";
import { makeOriginCa, type Origin, type OriginCa } from "../../fixtures/up/origin.js";
import { fiveMinuteTour, readmeCommands, readmeTour, tourStep, type TourCommand, type TourStep } from "../../fixtures/up/readme.js";
import { startSession, type Session } from "../../fixtures/up/session.js";

const REPO = fileURLToPath(new URL("../../../", import.meta.url));
const PARTS = ["kdc", "audit", "agent", "proxy"] as const;

let tmp: TempDir;
let copy: string;
let ca: OriginCa;
let origin: Origin;
const origins: Origin[] = [];
let session: Session | undefined;
let upEnv: Record<string, string | undefined>;
let tour: TourStep[];
/** The running mesh's addresses, as `kmi up` printed them. */
let site: Site;
/** The environment `kmi up` printed, paths made absolute. */
let ctlEnv: Record<string, string>;
let rootFile: string;
/** Every pid the run-state file ever named (kmi up and its parts), for the final check and cleanup. */
const seenPids = new Map<number, string>();
/** The tour commands run so far, as "step:index" (the last test checks that none was left out). */
const ran = new Set<string>();

interface RunState {
  pid: number;
  urls: { kdc: string; audit: string; proxy: string };
  parts: Record<string, { pid: number | null; state: string }>;
}

async function runState(): Promise<RunState> {
  const s = JSON.parse(await readFile(join(copy, "run", "up.json"), "utf8")) as RunState;
  seenPids.set(s.pid, "up");
  for (const [name, p] of Object.entries(s.parts)) if (p.pid !== null) seenPids.set(p.pid, name);
  return s;
}

async function waitUntil<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined>, intervalMs = 250): Promise<T> {
  const end = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last !== undefined ? ` (last error: ${String(last)})` : ""}\n--- kmi up output ---\n${session?.output() ?? ""}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Where this run's mesh is: what replaces the README's default addresses. */
interface Site {
  /** host:port of the KDC, the Auditserver and the proxy (README: 127.0.0.1:7443, :7444, :8080). */
  readonly kdc: string;
  readonly audit: string;
  readonly proxy: string;
  /** The machine's id (README: `<machine id>`), once the tour's `machine list` named it. */
  machineId?: string;
}

/**
 * What a person would change in a tour command on their machine, and nothing else: the default
 * ports 7443, 7444 and 8080 become the ones this `kmi up` bound (it runs with port 0),
 * example.com (`https://example.com/`, `-connect example.com:443`, `-servername example.com`)
 * becomes the local origin on `originPort`, and `<machine id>` the machine's id. Throws when
 * the command still holds a default port, example.com or a `<placeholder>` afterwards, so a
 * README edit that needs a new substitution is named instead of run against the wrong thing.
 */
function localize(text: string, at: Site, originPort: number): string {
  const ports: Record<string, string> = { "7443": at.kdc, "7444": at.audit, "8080": at.proxy };
  let out = text
    .replace(/\b127\.0\.0\.1:(7443|7444|8080)\b/g, (_, port: string) => ports[port]!)
    .replaceAll("https://example.com/", `https://localhost:${originPort}/`)
    .replaceAll("-connect example.com:443", `-connect localhost:${originPort}`)
    .replaceAll("-servername example.com", "-servername localhost");
  if (at.machineId !== undefined) out = out.replaceAll("<machine id>", at.machineId);
  const left = /example\.com|<[a-z][\w ]*>|\b(?:7443|7444|8080)\b/.exec(out);
  if (left !== null) throw new Error(`README tour: "${text}": "${left[0]}" has no substitution in this test (see localize())`);
  return out;
}

/**
 * The tour's setup lines as a bash prelude: the `alias kmi=…` line verbatim, then turned into a
 * function with the alias's own text (non-interactive bash does not expand aliases), and the
 * `export KMI_CTL_…` line with this run's addresses.
 */
function prelude(at: Site): string {
  const lines: string[] = [];
  tourStep(tour, 0).commands.forEach((c, i) => {
    const alias = /^alias (\w+)=/.exec(c.text);
    if (alias !== null) {
      const name = alias[1]!;
      lines.push(c.text, 'eval "' + name + "() { ${BASH_ALIASES[" + name + ']} \\"\\$@\\"; }"', `unalias ${name}`);
    } else if (/^export /.test(c.text)) {
      lines.push(localize(c.text, at, 0));
    } else return;
    ran.add(`0:${i}`);
  });
  return lines.join("\n");
}

/** The one command of tour step `step` that `match` finds (throws when none or several do). */
function pick(step: number, match: RegExp, nth = 0): { cmd: TourCommand; key: string } {
  const found = tourStep(tour, step)
    .commands.map((cmd, i) => ({ cmd, key: `${step}:${i}` }))
    .filter((c) => match.test(c.cmd.text));
  if (found.length <= nth) throw new Error(`README tour step ${step} has no command matching ${match}`);
  if (nth === 0 && found.length > 1) throw new Error(`README tour step ${step} has several commands matching ${match}`);
  return found[nth]!;
}

/** What a tour command printed, with the command as run (after localize). */
interface Ran extends RunResult {
  readonly command: string;
}

function shown(r: Ran): string {
  return `$ ${r.command}\nexit ${r.code}${r.signal !== null ? ` (${r.signal})` : ""}\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`;
}

/**
 * Runs the tour command of step `step` that `match` finds, through `bash -c` in the copy after
 * the prelude, with `through` as the origin for example.com. Throws unless it succeeds, or, for
 * a command the README marks `# refused`, unless it fails.
 */
async function tourCommand(step: number, match: RegExp, through: Origin = origin, nth = 0): Promise<Ran> {
  const { cmd, key } = pick(step, match, nth);
  const command = localize(cmd.text, site, through.port);
  // timeout(1) stops bash and what it started (curl, openssl) if one hangs.
  const r = await run("timeout", ["-k", "5", "40", "bash", "-c", `${prelude(site)}\n${command}`], { cwd: copy, timeoutMs: 50_000 });
  ran.add(key);
  const out: Ran = { ...r, command };
  if (cmd.expectFailure ? r.code === 0 : r.code !== 0) throw new Error(`README tour step ${step}: expected ${cmd.expectFailure ? "a failure" : "success"}\n${shown(out)}`);
  return out;
}

/** Retries a tour command until it succeeds (as a person would, while a rollout lands). */
function tourCommandEventually(what: string, step: number, match: RegExp, through: Origin = origin, timeoutMs = 20_000): Promise<Ran> {
  return waitUntil(what, timeoutMs, () => tourCommand(step, match, through));
}

interface Rollout {
  machines: { id: string; held: string; state: string }[];
}

/** Waits until the tour's `kmi ctl ca status` shows `version` active and held by every machine. */
async function rolloutComplete(version: number): Promise<Rollout> {
  return waitUntil(`the rollout of v${version} in the tour's kmi ctl ca status`, 20_000, async () => {
    const r = await tourCommand(5, /ca status/);
    const active = /^active version: (\d+)$/m.exec(r.stdout);
    const counts = /^(\d+) of (\d+) machines hold it, (\d+) not yet, (\d+) unreachable/m.exec(r.stdout);
    const table = r.stdout.split("\n\n")[1] ?? "";
    const machines = table
      .trim()
      .split("\n")
      .slice(1)
      .filter((l) => l !== "")
      .map((l) => {
        const cols = l.split(/ {2,}/);
        return { id: cols[0]!, held: cols[2]!, state: cols[3]! };
      });
    const complete =
      Number(active?.[1]) === version &&
      counts !== null &&
      Number(counts[2]) > 0 &&
      counts[1] === counts[2] &&
      machines.length === Number(counts[2]) &&
      machines.every((m) => m.held === String(version) && m.state === "up to date");
    return complete ? { machines } : undefined;
  });
}

/** Where the banner `kmi up` printed says everything is. */
function readBanner(out: string): { site: Site; env: Record<string, string>; root: string; curl: string; machine: string | undefined } {
  const curlLine = /curl -x (http:\/\/(127\.0\.0\.1:\d+)) --cacert (\S+) https:\/\/\S+/.exec(out);
  expect(curlLine, out).not.toBeNull();
  const env = (name: string) => {
    const v = new RegExp(`${name}=(\\S+)`).exec(out)?.[1];
    expect(v, `${name} in\n${out}`).toBeDefined();
    return v!;
  };
  const kdc = env("KMI_CTL_KDC");
  const audit = env("KMI_CTL_AUDIT");
  expect(kdc).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
  expect(audit).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
  const machine = /agent .*\(machine (\S+),/.exec(out)?.[1];
  return {
    site: { kdc: new URL(kdc).host, audit: new URL(audit).host, proxy: curlLine![2]! },
    env: {
      KMI_CTL_KDC: kdc,
      KMI_CTL_AUDIT: audit,
      KMI_CTL_TOKEN_FILE: resolve(copy, env("KMI_CTL_TOKEN_FILE")),
      KMI_CTL_CA_FILE: resolve(copy, env("KMI_CTL_CA_FILE")),
    },
    root: resolve(copy, curlLine![3]!),
    curl: curlLine![0],
    machine,
  };
}

/** `kmi up status --json` in the copy; it exits 1 while a part is not healthy (a quarantined agent holds no key). */
async function upStatusJson(code = 0): Promise<Record<string, Record<string, unknown>>> {
  const st = await run(process.execPath, [join(copy, "dist", "cmd", "kmi.js"), "up", "status", "--json"], { cwd: copy });
  expect(st.code, st.stdout + st.stderr).toBe(code);
  return JSON.parse(st.stdout) as Record<string, Record<string, unknown>>;
}

function certificates(pem: string): X509Certificate[] {
  return [...pem.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g)].map((m) => new X509Certificate(m[0]));
}

function commonName(c: X509Certificate): string {
  return /^CN=(.*)$/m.exec(c.subject)?.[1] ?? "";
}

beforeAll(async () => {
  tmp = await makeTempDir("kmi-up-e2e-");
  copy = join(tmp.path, "kmi");
  await mkdir(copy);
  await copyRepo(REPO, copy);
  tour = await readmeTour(join(copy, "README.md"));
  ca = await makeOriginCa(tmp.path);
  origin = await ca.start("origin-a", "hello from origin a\n");
  origins.push(origin);
  upEnv = {
    ...process.env,
    KMI_UP_KDC_LISTEN: "127.0.0.1:0",
    KMI_UP_AUDIT_LISTEN: "127.0.0.1:0",
    KMI_UP_PROXY_LISTEN: "127.0.0.1:0",
    KMI_UP_ORIGIN_CA_FILE: ca.caFile,
    // The test origins listen on loopback, which the proxy refuses unless allowed.
    KMI_UP_PROXY_ALLOW_PRIVATE: "127.0.0.0/8",
    NO_COLOR: "1",
  };
});

afterAll(async () => {
  if (session !== undefined) {
    session.interrupt();
    const t = setTimeout(() => session?.killGroup(), 30_000);
    await session.closed;
    clearTimeout(t);
  }
  // Never leave a part running on a shared machine, whatever failed above.
  for (const pid of seenPids.keys()) {
    if (alive(pid)) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
  }
  for (const o of origins) await o.close();
  await tmp?.cleanup();
});

describe("README.md, as the end-to-end test reads it", () => {
  it("README's Two commands are npm start and npm test", async () => {
    const commands = await readmeCommands(join(copy, "README.md"));
    expect(commands.map((c) => c.argv.join(" "))).toEqual(["npm start", "npm test"]);
  });

  it("README's five-minute tour parses into numbered steps that this test can run", () => {
    expect(tour.map((s) => s.step)).toEqual([0, 1, 2, 3, 4, 5, 6]);
    const setup = tourStep(tour, 0).commands.map((c) => c.text);
    expect(setup[0]).toMatch(/^alias kmi=/);
    // The continuation is joined: one export with all four variables.
    expect(setup[1]).toMatch(/^export KMI_CTL_KDC=\S+ KMI_CTL_AUDIT=\S+ KMI_CTL_TOKEN_FILE=\S+ KMI_CTL_CA_FILE=\S+$/);
    expect(tourStep(tour, 1).commands).toEqual([]);
    expect(tourStep(tour, 4).commands[0]!.text).toMatch(/^openssl req -x509 .* -keyout private-root\.key -out private-root\.pem .*-addext keyUsage=critical,keyCertSign,cRLSign$/);
    // The one command the README expects to fail is the curl after the quarantine.
    const refused = tour.flatMap((s) => s.commands.filter((c) => c.expectFailure).map((c) => ({ step: s.step, text: c.text })));
    expect(refused).toEqual([{ step: 6, text: expect.stringMatching(/^curl /) }]);
    // Every command the test picks is there, once; every command has the substitutions it needs.
    for (const [step, match] of [[2, /^curl /], [2, /^tail /], [2, /s_client/], [3, /ca download .*--out dev-chain/], [3, /--format der/], [4, /ca csr/], [4, /ca upload/], [4, /^curl /],
      [5, /ca rotate/], [5, /ca status/], [5, /ca history/], [6, /machine list/], [6, /machine quarantine/], [6, /^curl /], [6, /machine release/], [6, /audit verify --server audit$/], [6, /audit verify$/]] as const) {
      expect(() => pick(step, match)).not.toThrow();
    }
    const at: Site = { kdc: "127.0.0.1:1", audit: "127.0.0.1:2", proxy: "127.0.0.1:3", machineId: "m-0" };
    for (const s of tour) for (const c of s.commands) expect(() => localize(c.text, at, 4)).not.toThrow();
  });

  it("reads a tour: steps, \\ continuations, end-of-line comments (not inside quotes), refused", () => {
    const readme = [
      "## A five-minute tour",
      "",
      "```sh",
      'alias k="echo $PWD"',
      "k up status    # health",
      "```",
      "",
      "**1. First.** Text.",
      "",
      "```sh",
      "openssl req -a \\",
      "    -b 'x # y' \\",
      '    -c "z#w"   # made',
      "",
      "curl https://h/   # refused",
      "```",
      "",
      "```text",
      "not a command",
      "```",
      "",
      "**2. Second**",
      "",
      "## Next",
      "```sh",
      "other",
      "```",
    ].join("\n");
    expect(fiveMinuteTour(readme)).toEqual([
      { step: 0, title: "setup", commands: [{ text: 'alias k="echo $PWD"', comment: "", expectFailure: false }, { text: "k up status", comment: "health", expectFailure: false }] },
      {
        step: 1,
        title: "First.",
        commands: [
          { text: "openssl req -a -b 'x # y' -c \"z#w\"", comment: "made", expectFailure: false },
          { text: "curl https://h/", comment: "refused", expectFailure: true },
        ],
      },
      { step: 2, title: "Second", commands: [] },
    ]);
  });

  it.each([
    ["no tour section", "# x\n\n## Two commands\n", /no "## A five-minute tour" section/],
    ["no sh block", "## A five-minute tour\n\nText only.\n", /has no ```sh block/],
    ["steps out of order", "## A five-minute tour\n\n```sh\na\n```\n\n**2. Two.**\n", /step "\*\*2\. Two\.\*\*" comes where step 1 should/],
    ["a dangling continuation", "## A five-minute tour\n\n```sh\na \\\n```\n", /ends inside a \\ continuation/],
    ["an unclosed quote", "## A five-minute tour\n\n```sh\necho 'a\n```\n", /unclosed '/],
    ["an unclosed block", "## A five-minute tour\n\n```sh\na\n", /is not closed/],
  ])("refuses a tour with %s", (_name, readme, message) => {
    expect(() => fiveMinuteTour(readme)).toThrow(message);
  });
});

describe("npm start and the five-minute tour, exactly as README.md says", () => {
  it("comes up in a fresh copy and prints where everything is", { timeout: 150_000 }, async () => {
    const start = (await readmeCommands(join(copy, "README.md"))).find((c) => c.argv[0] === "npm" && c.argv[1] === "start")!;
    session = startSession(start.argv, { cwd: copy, env: upEnv });
    await session.waitForLine(/ up: ready in [\d.]+ s/, 140_000);
    await session.waitForLine(/^Ctrl-C stops everything\.$/, 5_000);
    const out = session.output();
    // One progress line per step, then the banner.
    expect(out).toMatch(/kdc: first run: generating the master key, the KMI root CA and the infrastructure CA/);
    expect(out).toMatch(/audit: healthy on 127\.0\.0\.1:\d+/);
    expect(out).toMatch(/agent: holds tenant dev's intermediate v1/);
    const banner = readBanner(out);
    site = banner.site;
    ctlEnv = banner.env;
    rootFile = banner.root;
    expect(rootFile).toBe(join(copy, "data", "kdc", "kmi-root.pem"));
    // Started offline with an origin CA and loopback allowed, the banner's curl goes to a local
    // origin that CA signed (not example.com), with absolute paths: it works from any directory.
    expect(banner.curl).toBe(`curl -x http://${site.proxy} --cacert ${rootFile} https://localhost:<port>/`);
    const curl = await run("bash", ["-c", banner.curl.replace("<port>", String(origin.port))], { cwd: tmp.path });
    expect(curl.stdout, curl.stderr).toBe(origin.body);
    // The banner's alias and export lines, pasted in another directory, reach this mesh.
    const paste = /^ {2}(alias kmi="node \/\S+"\n {2}export KMI_CTL_KDC=\S+ KMI_CTL_AUDIT=\S+ \\\n {9}KMI_CTL_TOKEN_FILE=\/\S+ KMI_CTL_CA_FILE=\/\S+)$/m.exec(out);
    expect(paste, out).not.toBeNull();
    const pasted = await run("bash", ["-O", "expand_aliases", "-c", `${paste![1]!}\nkmi ctl tenant list`], { cwd: tmp.path });
    expect(pasted.code, pasted.stderr).toBe(0);
    expect(pasted.stdout).toMatch(/^dev\s/m);
    // kmi up approves every measurement its agent presents, the proxy's config file included.
    const groups = await run("bash", ["-O", "expand_aliases", "-c", `${paste![1]!}\nkmi ctl group list --json`], { cwd: tmp.path });
    const local = (JSON.parse(groups.stdout) as { groups: { name: string; approved: { name: string }[] }[] }).groups.find((g) => g.name === "local");
    expect(local?.approved.map((a) => a.name).sort()).toEqual(["agent.code", "agent.config", "agent.deps", "agent.node", "proxy.config", "software.version"]);
    expect(ctlEnv.KMI_CTL_TOKEN_FILE).toBe(join(copy, "data", "operator.token"));
    // The portal's address and a one-time operator login link to it.
    expect(out).toContain(`Portal (the Certificate menu in a browser that trusts ${ctlEnv.KMI_CTL_CA_FILE}): ${ctlEnv.KMI_CTL_KDC}/`);
    expect(out).toMatch(new RegExp(`one-time operator login link \\(15 min\\): ${ctlEnv.KMI_CTL_KDC.replace(/\./g, "\\.")}/#login=[A-Za-z0-9_-]{43}$`, "m"));
    expect((await stat(ctlEnv.KMI_CTL_TOKEN_FILE)).mode & 0o777).toBe(0o600);
    // The join token was spent and removed; every part logs to data/logs.
    await expect(stat(join(copy, "data", "agent-join.token"))).rejects.toThrow();
    for (const p of PARTS) expect((await stat(join(copy, "data", "logs", `${p}.log`))).size).toBeGreaterThan(0);
    const state = await runState();
    for (const p of PARTS) expect(state.parts[p]?.state).toBe("running");

    // The tour's setup: its export (with this run's ports) is the environment kmi up printed, and kmi is the built CLI.
    const env = await run("bash", ["-c", `${prelude(site)}\ntype kmi >/dev/null && env`], { cwd: copy });
    expect(env.code, env.stderr).toBe(0);
    const exported = Object.fromEntries(env.stdout.split("\n").filter((l) => l.startsWith("KMI_CTL_")).map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
    expect(exported).toEqual(ctlEnv);
    expect(banner.machine).toMatch(/^m-[0-9a-f]+$/);
    const healthy = new RegExp(`machine ${banner.machine}: attested, KDC link up, holds dev v1`);
    // The agent's rollout report reaches the KDC a moment after "ready".
    const status = await waitUntil("the tour's kmi up status to show the agent up to date", 15_000, async () => {
      const r = await tourCommand(0, /^kmi up status$/);
      return /tenant dev active v1 \(1\/1 machines up to date\)/.test(r.stdout) && healthy.test(r.stdout) ? r : undefined;
    });
    expect(status.stdout).toMatch(/^kmi up ready \(pid \d+\), data /);
  });

  it("tour steps 2 and 3: browses through the proxy trusting only the printed root, and downloads the CA", { timeout: 60_000 }, async () => {
    const r = await tourCommandEventually("the tour's curl through the proxy", 2, /^curl /);
    expect(r.stdout).toBe(origin.body);
    const log = await waitUntil("the request in the tour's tail of the access log", 10_000, async () => {
      const t = await tourCommand(2, /^tail /);
      const rec = JSON.parse(t.stdout) as Record<string, unknown>;
      return rec["host"] === "localhost" && rec["decision"] === "allow" ? rec : undefined;
    });
    expect(log).toMatchObject({ tenant: "dev", status: 200 });
    const presented = await tourCommand(2, /s_client/);
    expect(presented.stdout).toMatch(/^subject=CN ?= ?localhost$/m);
    const issuer = /^issuer=(.*)$/m.exec(presented.stdout)?.[1];
    expect(issuer, shown(presented)).toBeDefined();

    // Step 3: the chain is the intermediate that issued the proxy's leaf, then the root kmi up printed.
    const chainRun = await tourCommand(3, /ca download .*--out dev-chain/);
    const root = new X509Certificate(await readFile(rootFile));
    const chain = certificates(await readFile(join(copy, "dev-chain.pem"), "utf8"));
    expect(chain).toHaveLength(2);
    const [intermediate, chainRoot] = chain as [X509Certificate, X509Certificate];
    expect(chainRoot.raw.equals(root.raw)).toBe(true);
    expect(intermediate.checkIssued(root) && intermediate.verify(root.publicKey)).toBe(true);
    expect(issuer).toContain(commonName(intermediate));
    expect(chainRun.stderr).toMatch(/^version 1 \(active\)$/m);
    expect(chainRun.stderr).toContain(`intermediate sha256 ${intermediate.fingerprint256}`);
    expect(chainRun.stderr).toMatch(new RegExp(`^root sha256 +${root.fingerprint256}$`, "m"));
    await tourCommand(3, /--format der/);
    expect((await readFile(join(copy, "kmi-root.der"))).equals(root.raw)).toBe(true);
  });

  it("tour step 4: the private-CA flow with openssl as the private CA, via kmi ctl ca csr / ca upload", { timeout: 90_000 }, async () => {
    // openssl is the customer's private CA: the commands run in the README's order.
    await tourCommand(4, /^openssl req -x509/);
    const csr = await tourCommand(4, /ca csr/);
    expect(csr.stderr).toMatch(/wrote the CSR of version 2 to dev\.csr/);
    expect(csr.stderr).toMatch(/version 2 is pending/);
    await tourCommand(4, /^printf /);
    await tourCommand(4, /^openssl x509 -req/);
    const privateRoot = new X509Certificate(await readFile(join(copy, "private-root.pem")));
    const signed = new X509Certificate(await readFile(join(copy, "dev-intermediate.pem")));
    expect(signed.checkIssued(privateRoot) && signed.verify(privateRoot.publicKey)).toBe(true);
    const uploaded = await tourCommand(4, /ca upload/);
    expect(uploaded.stdout).toMatch(/^version: +2$/m);
    expect(uploaded.stdout).toMatch(/^state: +active$/m);
    expect(uploaded.stdout).toMatch(/^signer: +private-ca$/m);
    await rolloutComplete(2);
    // New interceptions are certified by the private CA's intermediate: trusting only the private root works.
    const r = await tourCommandEventually("the tour's curl trusting only the private root", 4, /^curl /);
    expect(r.stdout).toBe(origin.body);
    // What the npm start terminal shows (and what step 5's "(was v2)" needs first).
    await session!.waitForLine(/agent: tenant dev: now holds intermediate v2 \(was v1\)/, 10_000);
  });

  it("tour step 5: rotates, and kmi ctl ca status shows the rollout complete", { timeout: 60_000 }, async () => {
    const rotated = await tourCommand(5, /ca rotate/);
    expect(rotated.stdout).toMatch(/^version: +3$/m);
    expect(rotated.stdout).toMatch(/^state: +active$/m);
    const status = await rolloutComplete(3);
    expect(status.machines).toHaveLength(1);
    await session!.waitForLine(/agent: tenant dev: now holds intermediate v3 \(was v2\)/, 10_000);
    const history = await tourCommand(5, /ca history/);
    const versions = history.stdout
      .trim()
      .split("\n")
      .slice(1)
      .map((l) => l.split(/ {2,}/).slice(0, 3).join(" "));
    expect(versions).toEqual(["3 active kmi-root", "2 retired private-ca", "1 retired kmi-root"]);
    const r = await tourCommandEventually("the tour's curl after the rotation", 2, /^curl /);
    expect(r.stdout).toBe(origin.body);
    // kmi up status reports the same health as kmi up --json.
    const summary = await upStatusJson();
    expect(summary["agent"]).toMatchObject({ attestation: "attested", kdc_connected: true, holds_tenant_key: true });
    expect(summary["kdc"]!["tenants"]).toEqual([expect.objectContaining({ tenant: "dev", active_version: 3 })]);
    expect(summary["audit"]).toMatchObject({ healthy: true, machines: [expect.objectContaining({ status: "active" })] });
    expect(summary["proxy"]).toMatchObject({ healthy: true, state: "running" });
    expect(summary["proxy"]!["leaf_cache_entries"]).toBeGreaterThanOrEqual(1);
    // kmi up runs the proxy with two workers (--proxy-workers).
    expect(summary["proxy"]!["workers"]).toHaveLength(2);
  });

  it("restarts a part that dies, says which and why, and the mesh keeps working", { timeout: 60_000 }, async () => {
    const before = await runState();
    const agentPid = before.parts["agent"]!.pid!;
    process.kill(agentPid, "SIGKILL");
    await session!.waitForLine(new RegExp(`agent: died: killed by SIGKILL after .* \\(pid ${agentPid}\\); its last log lines`), 10_000);
    await session!.waitForLine(/agent: restarting in (\d+ ms|1 s) \(restart 1\)/, 5_000);
    await session!.waitForLine(/agent: back: serving on run\/agent\.sock/, 20_000);
    const after = await runState();
    expect(after.parts["agent"]!.pid).not.toBe(agentPid);
    expect(after.parts["agent"]!.state).toBe("running");
    // The restarted agent serves from its sealed cache and resyncs; the proxy reconnects to it.
    const fresh = await ca.start("origin-c", "hello from origin c\n");
    origins.push(fresh);
    const r = await tourCommandEventually("the tour's curl after the agent's restart", 2, /^curl /, fresh);
    expect(r.stdout).toBe(fresh.body);
  });

  it("a bad edit of the proxy's policy file is printed on the kmi up terminal; the previous policy stays in force", { timeout: 30_000 }, async () => {
    const file = join(copy, "data", "config", "proxy-policy.json");
    const good = await readFile(file, "utf8");
    await writeFile(file, '{"blockHosts": ["a b"]}\n');
    await session!.waitForLine(/proxy: warning: policy not reloaded, the previous one stays in force: .*policy\.blockHosts\[0\]/, 15_000);
    await writeFile(file, good);
    // The terminal line comes from this record of the proxy's own log (the file may get it a moment after the terminal).
    const logFile = join(copy, "data", "logs", "proxy.log");
    const rec = await waitUntil("the policy failure in proxy.log", 5_000, async () => {
      const text = await readFile(logFile, "utf8");
      return text.includes('"event":"policy-reload-failed"') ? text : undefined;
    }).catch(async () => readFile(logFile, "utf8"));
    expect(rec).toContain('"event":"policy-reload-failed"');
  });

  it("tour step 6: quarantines the machine; the proxy then refuses new interceptions", { timeout: 60_000 }, async () => {
    const list = await tourCommand(6, /machine list/);
    const rows = list.stdout.trim().split("\n");
    expect(rows[0]).toMatch(/^MACHINE +GROUP +HOSTNAME +STATUS/);
    expect(rows, list.stdout).toHaveLength(2);
    const [id, group, , state] = rows[1]!.split(/ {2,}/);
    expect(id).toBe(readBanner(session!.output()).machine);
    expect([group, state]).toEqual(["local", "active"]);
    site.machineId = id!;
    const q = await tourCommand(6, /machine quarantine/);
    expect(q.stdout).toMatch(/^status: +QUARANTINED$/m);
    expect(q.stdout).toMatch(/^status reason: +lost laptop$/m);
    await session!.waitForLine(/agent: .*quarantined/, 15_000);
    // A host the proxy never minted a leaf for: the tour's "# refused" curl fails (tourCommand checks).
    const fresh = await ca.start("origin-b", "hello from origin b\n");
    origins.push(fresh);
    const r = await tourCommand(6, /^curl /, fresh);
    expect(r.stdout).not.toContain(fresh.body);
    // Nor an origin it intercepted before.
    const again = await tourCommand(6, /^curl /, origin);
    expect(again.stdout).not.toContain(origin.body);
    // The access log says why: the agent refuses to certify for a quarantined machine.
    const log = (await readFile(join(copy, "data", "logs", "proxy-access.log"), "utf8"))
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    const refused = log.filter((x) => String(x["host"] ?? "").includes("localhost") && x["decision"] !== "allow");
    expect(refused.length, JSON.stringify(log.slice(-5))).toBeGreaterThan(0);
    expect(JSON.stringify(refused), JSON.stringify(refused)).toMatch(/quarantin/i);
  });

  it("Ctrl-C stops every part in reverse order, and no process is left", { timeout: 60_000 }, async () => {
    const state = await runState();
    const pids = [state.pid, ...PARTS.map((p) => state.parts[p]!.pid!)];
    for (const pid of pids) expect(alive(pid)).toBe(true);
    session!.interrupt();
    await session!.closed;
    const out = session!.output();
    if (process.env["KMI_E2E_DUMP"]) await writeFile(process.env["KMI_E2E_DUMP"], out);
    expect(out).toMatch(/up: stopped; every part has exited/);
    const order = PARTS.map((p) => out.indexOf(`${p}: stopping (pid`));
    expect(order.every((i) => i > 0)).toBe(true);
    expect([...order].sort((a, b) => b - a)).toEqual(order);
    for (const pid of pids) expect(alive(pid), `pid ${pid} (${seenPids.get(pid)}) still runs`).toBe(false);
    await expect(stat(join(copy, "run", "up.json"))).rejects.toThrow();
    session = undefined;
  });

  it("a second npm start reuses the state (no re-init), keeps the quarantine until the tour's release, and stops on SIGINT", { timeout: 150_000 }, async () => {
    const start = (await readmeCommands(join(copy, "README.md"))).find((c) => c.argv[0] === "npm" && c.argv[1] === "start")!;
    session = startSession(start.argv, { cwd: copy, env: upEnv });
    await session.waitForLine(/ up: ready in [\d.]+ s/, 120_000);
    await session.waitForLine(/^Ctrl-C stops everything\.$/, 5_000);
    const out = session.output();
    expect(out).toMatch(/kdc: reusing data\/kdc/);
    expect(out).toMatch(/audit: reusing data\/audit/);
    expect(out).not.toMatch(/first run/);
    const machineId = site.machineId;
    site = { ...readBanner(out).site, machineId };
    await runState();
    const summary = await upStatusJson(1);
    expect(summary["kmi_up"]!["ready"]).toBe(true);
    expect(summary["kdc"]!["tenants"]).toEqual([expect.objectContaining({ tenant: "dev", active_version: 3 })]);
    // The quarantine outlives restarts until an operator releases the machine.
    expect(summary["agent"]).toMatchObject({ attestation: "quarantined" });

    // The rest of tour step 6: release ("back within seconds"), then the audit log verifies.
    const released = await tourCommand(6, /machine release/);
    expect(released.stdout).toMatch(/^status: +active$/m);
    await session.waitForLine(/agent: attestation: attested/, 30_000);
    const r = await tourCommandEventually("the tour's curl after the release", 2, /^curl /, origin, 30_000);
    expect(r.stdout).toBe(origin.body);
    expect(await upStatusJson()).toMatchObject({ agent: { attestation: "attested", holds_tenant_key: true } });
    // Both logs: the Auditserver's (quarantine, release) and the KDC's (releases, refusals).
    const verifyAudit = await tourCommand(6, /audit verify --server audit$/);
    expect(verifyAudit.stdout).toMatch(/^audit log ok: \d+ entries, head \S+$/m);
    const verify = await tourCommand(6, /audit verify$/);
    expect(verify.stdout).toMatch(/^audit log ok: \d+ entries, head \S+$/m);

    await runState();
    session.interrupt();
    const exit = await session.closed;
    // kmi up exited 0: it prints "stopped; every part has exited" only then. npm itself ends as
    // any Ctrl-C'd npm script does (its sh dies of the SIGINT, and npm re-raises it).
    expect(session.output()).toMatch(/up: stopped; every part has exited/);
    expect(session.output()).not.toMatch(/up: .*had to kill/);
    expect([{ code: 0, signal: null }, { code: 130, signal: null }, { code: null, signal: "SIGINT" }]).toContainEqual(exit);
    await expect(stat(join(copy, "run", "up.json"))).rejects.toThrow();
    for (const pid of seenPids.keys()) expect(alive(pid)).toBe(false);
    session = undefined;
  });

  it("ran every command of the tour", () => {
    const all = tour.flatMap((s) => s.commands.map((c, i) => ({ key: `${s.step}:${i}`, text: c.text })));
    expect(all.filter((c) => !ran.has(c.key))).toEqual([]);
  });
});
