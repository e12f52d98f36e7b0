import { describe, expect, it } from "vitest";
import { run } from "../../../src/ctl/cli.js";
import type { Command } from "../../../src/ctl/command.js";
import { auditCommands, parseMeasurementFlags, registerAuditCommands } from "../../../src/ctl/audit-commands.js";
import { UsageError } from "../../../src/ctl/output.js";

function streams() {
  const out: string[] = [];
  const err: string[] = [];
  return { s: { stdout: { write: (c: string | Uint8Array) => out.push(String(c)) }, stderr: { write: (c: string) => err.push(c) } }, out: () => out.join(""), err: () => err.join("") };
}

describe("kmi ctl: Auditserver commands", () => {
  it("parses --measurement NAME=SHA256[,SHA256] and merges a name given twice", () => {
    const a = "a".repeat(64);
    const b = "B".repeat(64);
    const m = parseMeasurementFlags([`agent.code=${a},${b}`, `agent.code=${a}`, `proxy.config=${a}`]);
    expect([...m].map(([k, v]) => [k, [...v]])).toEqual([
      ["agent.code", [a, b.toLowerCase()]],
      ["proxy.config", [a]],
    ]);
    expect(() => parseMeasurementFlags(["agent.code"])).toThrow(UsageError);
    expect(() => parseMeasurementFlags(["agent.code="])).toThrow(/no digest/);
    expect(() => parseMeasurementFlags(["agent.code=abc"])).toThrow(/not 64 hex characters/);
  });

  it("adds its commands to the table and gives the KDC's audit tail/verify/checkpoint a --server flag", async () => {
    const calls: string[] = [];
    const kdcTail: Command = { name: ["audit", "tail"], summary: "print audit log entries (operator)", flags: {}, run: async () => void calls.push("kdc tail") };
    const table = registerAuditCommands([kdcTail]);
    expect(table.map((c) => c.name.join(" "))).toEqual(["audit tail", "audit verify", "audit checkpoint", ...auditCommands.map((c) => c.name.join(" "))]);
    expect(Object.keys(table[0]!.flags)).toEqual(expect.arrayContaining(["server", "audit"]));
    const io = streams();
    expect(await run(["audit", "tail"], { streams: io.s, env: {}, commands: table })).toBe(0);
    expect(calls).toEqual(["kdc tail"]);
    expect(await run(["audit", "tail", "--server", "nope"], { streams: io.s, env: {}, commands: table })).toBe(2);
  });

  it.each<[string, string[], RegExp]>([
    ["approve-measurements without any measurement", ["group", "approve-measurements", "edge"], /at least one --measurement/],
    ["approve-measurements with a bad --measure", ["group", "approve-measurements", "edge", "--measure", "agent.code"], /not NAME=PATH/],
    ["join-token create without a group", ["join-token", "create"], /missing GROUP/],
    ["machine quarantine without a reason", ["machine", "quarantine", "m-0000000000000000"], /--reason is required/],
    ["group create with a plain-http URL", ["group", "create", "edge", "--tenant", "acme", "--audit", "http://127.0.0.1:7444"], /use an https:\/\/ URL/],
    // An unreachable --audit with a token: reaching for the server would be exit 1, not 2.
    [
      "group create without --tenant or --all-tenants",
      ["group", "create", "edge", "--audit", "https://127.0.0.1:1", "--token", "kmi_x"],
      /^kmi ctl: give --tenant <id> \(repeatable\) for the tenants this group serves, or --all-tenants to serve every tenant \(see --help\)\n$/,
    ],
    ["group create with both --tenant and --all-tenants", ["group", "create", "edge", "--tenant", "acme", "--all-tenants", "--audit", "https://127.0.0.1:1", "--token", "kmi_x"], /^kmi ctl: give either --tenant or --all-tenants, not both/],
  ])("refuses %s with exit code 2 before calling anything", async (_name, argv, message) => {
    const io = streams();
    expect(await run(argv, { streams: io.s, env: {} })).toBe(2);
    expect(io.err()).toMatch(message);
  });

  it("documents --tenant and --all-tenants in group create --help", async () => {
    const io = streams();
    expect(await run(["group", "create", "--help"], { streams: io.s, env: {} })).toBe(0);
    expect(io.out()).toMatch(/--tenant ID .*this or --all-tenants is required/);
    expect(io.out()).toMatch(/--all-tenants .*every tenant's secrets/);
    expect(io.out()).toContain("kmi ctl group create core --all-tenants");
  });

  it("fails with exit code 1 and a clear line when the Auditserver cannot be reached", async () => {
    const io = streams();
    const code = await run(["group", "list", "--audit", "https://127.0.0.1:1", "--token", "kmi_x", "--timeout", "5"], { streams: io.s, env: {} });
    expect(code).toBe(1);
    expect(io.err()).toMatch(/^kmi ctl: /);
  });
});
