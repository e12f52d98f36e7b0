/**
 * `--json` on every command that prints: this test walks `kmi ctl`'s command table and runs each
 * command (the built program, `node dist/cmd/kmi.js ctl …`) with `--json` against a real KDC and
 * Auditserver. Where the command can run it exits 0 and its stdout is one JSON document; where it
 * cannot here (a machine that never enrolled) its stderr is the JSON error. A command added to
 * the table without an entry here fails the first test, so it gets --json checked too.
 */
import { execFile } from "node:child_process";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { commandTable, run as runCtl } from "../../../src/ctl/cli.js";
import { startRealAudit, type RealAudit } from "../../fixtures/kdc/real-audit.js";
import { ctl, makePrivateCa, type CtlResult } from "../kdc/harness.js";

const exec = promisify(execFile);
let mesh: RealAudit;
/** Values one command leaves for a later one (a token id, a CSR, a version number). */
const state: Record<string, string> = {};

type Json = Record<string, unknown>;
interface Case {
  argv: () => string[] | Promise<string[]>;
  /** Exit code expected; 0 unless the command cannot succeed here. */
  code?: number;
  /** Keeps what later commands need from the JSON result. */
  keep?: (j: Json) => void;
}

const HEX = "ab".repeat(32);

/** One entry per command of the table, in the table's order (some use what earlier ones made). */
const cases: Record<string, Case> = {
  "tenant create": { argv: () => ["tenant", "create", "json-t"] },
  "tenant list": { argv: () => ["tenant", "list"] },
  "tenant show": { argv: () => ["tenant", "show", "acme"] },
  "token create": { argv: () => ["token", "create", "--role", "tenant-admin", "--tenant", "acme", "--ttl", "1h"], keep: (j) => (state.tokenId = String((j.token as Json).tokenId)) },
  "token revoke": { argv: () => ["token", "revoke", state.tokenId!] },
  "token list": { argv: () => ["token", "list"] },
  "ca download": { argv: () => ["ca", "download", "--tenant", "acme"] },
  "ca csr": { argv: () => ["ca", "csr", "--tenant", "acme"], keep: (j) => ((state.csr = String(j.csrPem)), (state.pending = String((j.version as Json).version))) },
  "ca upload": {
    argv: async () => {
      const ca = await makePrivateCa(mesh.data.dir, "json-corp");
      const cert = join(mesh.data.dir, "json-intermediate.pem");
      await writeFile(cert, await ca.sign(state.csr!));
      return ["ca", "upload", "--tenant", "acme", "--version", state.pending!, "--cert", cert, "--root", ca.rootFile];
    },
  },
  "ca rotate": { argv: () => ["ca", "rotate", "--tenant", "acme"], keep: (j) => (state.rotated = String((j.version as Json).version)) },
  "ca renew": { argv: () => ["ca", "renew", "--tenant", "acme", "--version", "1", "--signer", "kmi-root"] },
  "ca activate": { argv: () => ["ca", "activate", "--tenant", "acme", "--version", state.rotated!] },
  "ca revoke": { argv: () => ["ca", "revoke", "--tenant", "acme", "--version", state.pending!, "--reason", "json test"] },
  "ca discard": {
    argv: async () => {
      const r = await run(["ca", "csr", "--tenant", "acme", "--json"]);
      return ["ca", "discard", "--tenant", "acme", "--version", String(((JSON.parse(r.stdout) as Json).version as Json).version)];
    },
  },
  "ca history": { argv: () => ["ca", "history", "--tenant", "acme"] },
  "ca status": { argv: () => ["ca", "status", "--tenant", "acme"] },
  "ca policy": { argv: () => ["ca", "policy", "--tenant", "acme", "--rotate-every", "30d", "--csr-before-expiry", "14d"], keep: (j) => expect((j.rotation as Json).policy).toMatchObject({ rotateEveryDays: 30, csrBeforeExpiryDays: 14, activationTimeoutHours: 24 }) },
  "signing-key create": { argv: () => ["signing-key", "create", "sk1", "--tenant", "acme"] },
  "signing-key list": { argv: () => ["signing-key", "list", "--tenant", "acme"] },
  "signing-key revoke": { argv: () => ["signing-key", "revoke", "sk1", "--tenant", "acme", "--reason", "json test"] },
  "audit tail": { argv: () => ["audit", "tail", "--limit", "5"] },
  "audit verify": { argv: () => ["audit", "verify"] },
  "audit checkpoint": { argv: () => ["audit", "checkpoint"] },
  "service-cert issue": {
    argv: async () => {
      const csr = join(mesh.data.dir, "svc.csr");
      await exec("openssl", ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", join(mesh.data.dir, "svc.key"), "-subj", "/CN=svc", "-out", csr]);
      return ["service-cert", "issue", "--name", "svc", "--csr", csr, "--dns", "svc.internal"];
    },
  },
  "group create": { argv: () => ["group", "create", "edge", "--tenant", "acme"] },
  "group list": { argv: () => ["group", "list"] },
  "group approve-measurements": { argv: () => ["group", "approve-measurements", "edge", "--measurement", `agent.code=${HEX}`] },
  "join-token create": { argv: () => ["join-token", "create", "edge"] },
  "machine list": { argv: () => ["machine", "list"] },
  // No machine enrolls in this test: these three answer NOT_FOUND, as a JSON error.
  "machine show": { argv: () => ["machine", "show", "m-0123456789abcdef"], code: 3 },
  "machine quarantine": { argv: () => ["machine", "quarantine", "m-0123456789abcdef", "--reason", "json test"], code: 3 },
  "machine release": { argv: () => ["machine", "release", "m-0123456789abcdef", "--reason", "json test"], code: 3 },
  "portal login-link": { argv: () => ["portal", "login-link", "--tenant", "acme"] },
  "portal sessions": { argv: () => ["portal", "sessions"] },
  // No one signs in to the portal in this test: the session is unknown, a JSON NOT_FOUND error.
  "portal revoke-session": { argv: () => ["portal", "revoke-session", "0123456789abcdef"], code: 3 },
  status: { argv: () => ["status"] },
};

function run(argv: string[]): Promise<CtlResult> {
  return ctl(mesh.kdc, mesh.data, argv, { KMI_CTL_AUDIT: mesh.auditUrl });
}

beforeAll(async () => {
  mesh = await startRealAudit();
  const r = await run(["tenant", "create", "acme", "--bootstrap"]);
  expect(r.code, r.stderr).toBe(0);
}, 60_000);

afterAll(async () => {
  await mesh?.stop();
});

describe("--json on every command of kmi ctl", () => {
  it("this test has a case for every command of the table (and no other)", () => {
    expect(Object.keys(cases).sort()).toEqual(commandTable.map((c) => c.name.join(" ")).sort());
  });

  it("every command's --help lists --json (in-process: the help comes from the same table)", async () => {
    for (const c of commandTable) {
      let out = "";
      const code = await runCtl([...c.name, "--help"], { streams: { stdout: { write: (t: string | Uint8Array) => (out += String(t)) }, stderr: { write: () => undefined } }, env: {} });
      expect(code, c.name.join(" ")).toBe(0);
      expect(out, c.name.join(" ")).toMatch(/^ {2}--json\s+print results as JSON/m);
    }
  });

  it.each(commandTable.map((c) => c.name.join(" ")))("kmi ctl %s --json prints one JSON document", async (name) => {
    const c = cases[name]!;
    const r = await run([...(await c.argv()), "--json"]);
    expect(r.code, `${name}\n${r.stderr}`).toBe(c.code ?? 0);
    if (r.code === 0) {
      const j = JSON.parse(r.stdout) as Json;
      expect(typeof j).toBe("object");
      c.keep?.(j);
    } else {
      expect(r.stdout).toBe("");
      const e = JSON.parse(r.stderr) as { error: { code: string; message: string } };
      expect(e.error.code).toBe("NotFound");
    }
  });

  it("the Auditserver's audit log through --server audit, as JSON too", async () => {
    for (const verb of ["tail", "verify"]) {
      const r = await run(["audit", verb, "--server", "audit", "--json"]);
      expect(r.code, r.stderr).toBe(0);
      expect(typeof JSON.parse(r.stdout)).toBe("object");
    }
  });

  it("the version, as JSON", async () => {
    const r = await run(["--version", "--json"]);
    expect(JSON.parse(r.stdout)).toEqual({ version: "0.1.0" });
  });
});
