/**
 * The Auditserver's `kmi ctl` commands: machine groups and their approved measurements, join
 * tokens, machines and quarantine, and `audit tail|verify|checkpoint --server audit`.
 *
 * They talk to the Auditserver (`--audit URL`, KMI_CTL_AUDIT, default https://127.0.0.1:7444)
 * with the same operator token and CA file as the KDC's commands (the Auditserver checks the
 * token with the KDC; both servers' certificates come from the infrastructure CA).
 *
 * `registerAuditCommands(kdcCommands)` returns the command table with these commands added,
 * and with the KDC's `audit tail`, `audit verify` and `audit checkpoint` taking `--server kdc|audit`.
 */
import { toJson, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { measureFiles } from "../attest/measure.js";
import {
  ApproveMeasurementsResponseSchema,
  AuditAdminService,
  CreateGroupResponseSchema,
  CreateJoinTokenResponseSchema,
  GetMachineResponseSchema,
  ListGroupsResponseSchema,
  ListMachinesResponseSchema,
  QuarantineMachineResponseSchema,
  ReleaseMachineResponseSchema,
  TailAuditLogResponseSchema,
  VerifyAuditLogResponseSchema,
  type AuditLogEntry,
  type Group,
  type Machine,
} from "../gen/kmi/audit/v1/admin_pb.js";
import { MachineStatus } from "../gen/kmi/audit/v1/audit_pb.js";
import { outputCheckpoint, readCheckpointFile, verifyText } from "./checkpoint-file.js";
import { kdcConnectionFlags } from "./client.js";
import type { Command, CommandContext } from "./command.js";
import type { FlagSpecs } from "./flags.js";
import { ExitCode, renderFields, UsageError } from "./output.js";

/** Default Auditserver address (what `kmi audit` listens on by default). */
export const DEFAULT_AUDIT_URL = "https://127.0.0.1:7444";

const { kdc: _kdcUrlFlag, ...sharedConnectionFlags } = kdcConnectionFlags;

/** The flags of every command that talks to the Auditserver. */
export const auditConnectionFlags: FlagSpecs = {
  audit: { type: "string", value: "URL[,URL...]", help: `Auditserver address, or every replica's, comma-separated (default ${DEFAULT_AUDIT_URL})`, env: "KMI_CTL_AUDIT" },
  ...sharedConnectionFlags,
};

function admin(ctx: CommandContext) {
  return ctx.clients("audit", DEFAULT_AUDIT_URL).get(AuditAdminService);
}

function json<D extends DescMessage>(schema: D, msg: MessageShape<D>): unknown {
  return toJson(schema, msg, { alwaysEmitImplicit: true });
}

function time(t: Timestamp | undefined): string {
  return t === undefined ? "-" : timestampDate(t).toISOString().replace(/\.\d{3}Z$/, "Z");
}

function status(s: MachineStatus): string {
  return s === MachineStatus.QUARANTINED ? "QUARANTINED" : s === MachineStatus.ACTIVE ? "active" : "?";
}

const HEX64 = /^[0-9a-f]{64}$/;

/**
 * Parses `--measurement name=sha256[,sha256…]` values (repeatable; a name given twice gets
 * the union of its digests).
 */
export function parseMeasurementFlags(values: readonly string[]): Map<string, Set<string>> {
  const out = new Map<string, Set<string>>();
  for (const v of values) {
    const eq = v.indexOf("=");
    if (eq <= 0) throw new UsageError(`--measurement: "${v}" is not NAME=SHA256[,SHA256…]`);
    const name = v.slice(0, eq);
    const digests = v.slice(eq + 1).split(/[,+]/).map((d) => d.trim().toLowerCase()).filter((d) => d !== "");
    if (digests.length === 0) throw new UsageError(`--measurement ${name}: no digest given`);
    for (const d of digests) if (!HEX64.test(d)) throw new UsageError(`--measurement ${name}: "${d}" is not 64 hex characters (SHA-256)`);
    const set = out.get(name) ?? new Set<string>();
    for (const d of digests) set.add(d);
    out.set(name, set);
  }
  return out;
}

/**
 * The tenants a group serves, for people: `all` for an all_tenants group, "none" for a group
 * stored with neither (made before all_tenants existed; it serves no tenant now).
 */
function groupTenants(g: Group, sep: string, all: string): string {
  if (g.allTenants) return all;
  return g.tenantIds.length === 0 ? "none" : g.tenantIds.join(sep);
}

const groupColumns = [
  { header: "name", value: (g: Group) => g.name },
  { header: "tenants", value: (g: Group) => groupTenants(g, ",", "*") },
  { header: "measurements", value: (g: Group) => g.approved.map((a) => `${a.name}(${a.sha256.length})`).join(",") },
  { header: "quarantine on mismatch", value: (g: Group) => (g.quarantineOnMismatch ? "yes" : "no") },
  { header: "cert ttl", value: (g: Group) => `${g.certificateTtlSeconds}s` },
  { header: "token ttl", value: (g: Group) => `${g.tokenTtlSeconds}s` },
];

function groupFields(g: Group): string {
  return (
    renderFields([
      ["group", g.name],
      ["tenants", groupTenants(g, ", ", "* (all tenants)")],
      ["quarantine on mismatch", g.quarantineOnMismatch ? "yes" : "no"],
      ["certificate ttl", `${g.certificateTtlSeconds} s`],
      ["token ttl", `${g.tokenTtlSeconds} s`],
      ["created", time(g.createdAt)],
    ]) + (g.approved.length === 0 ? "approved measurements: none (no machine of this group can attest yet)\n" : "approved measurements:\n" + g.approved.map((a) => `  ${a.name}  ${a.sha256.join(" ")}`).join("\n") + "\n")
  );
}

function machineFields(m: Machine): string {
  const a = m.lastAttestation;
  return renderFields([
    ["machine", m.machineId],
    ["group", m.group],
    ["hostname", m.hostname],
    ["status", status(m.status)],
    ["status reason", m.statusReason],
    ["enrolled", time(m.enrolledAt)],
    ["certificate sha256", m.certificateSha256],
    ["certificate not after", time(m.certificateNotAfter)],
    // Why say "none (legacy)": its secrets are then wrapped to the machine key, which an operator should know.
    ["encryption key id", m.encryptionKeyId === "" ? "none (legacy: secrets wrapped to the machine key)" : m.encryptionKeyId],
    ["last attestation", a === undefined ? "never" : `${time(a.time)} ${a.ok ? "ok" : "REFUSED"}`],
    ["attestation problem", a?.problem],
    ["software version", a?.softwareVersion],
  ]);
}

const groupCommands: Command[] = [
  {
    name: ["group", "create"],
    args: "NAME",
    summary: "make a machine group (operator)",
    details: [
      "Give the tenants the group's machines serve: --tenant ID (repeatable), or --all-tenants to",
      "serve every tenant, present and future. One of them is required: a group never serves every",
      "tenant by default.",
      "",
      "example:",
      "  kmi ctl group create edge --tenant acme --tenant globex --quarantine-on-mismatch",
      "  kmi ctl group create core --all-tenants",
      "  kmi ctl group approve-measurements edge --measure agent.code=/opt/kmi/dist --measure proxy.config=/etc/kmi/proxy.json",
    ].join("\n"),
    flags: {
      ...auditConnectionFlags,
      tenant: { type: "list", value: "ID", help: "a tenant whose secrets the group's machines receive; this or --all-tenants is required" },
      "all-tenants": { type: "bool", help: "the group's machines receive every tenant's secrets, present and future" },
      "quarantine-on-mismatch": { type: "bool", help: "quarantine a machine automatically when its attestation fails on a measurement" },
      "cert-ttl": { type: "int", value: "SECONDS", help: "machine certificate lifetime, 300 to 2592000 (default 86400)" },
      "token-ttl": { type: "int", value: "SECONDS", help: "attestation token lifetime, 60 to 3600 (default 300)" },
    },
    async run(ctx) {
      const name = ctx.args.positional("NAME");
      const tenantIds = ctx.args.list("tenant");
      const allTenants = ctx.args.bool("all-tenants");
      if (tenantIds.length === 0 && !allTenants) throw new UsageError("give --tenant <id> (repeatable) for the tenants this group serves, or --all-tenants to serve every tenant");
      if (tenantIds.length > 0 && allTenants) throw new UsageError("give either --tenant or --all-tenants, not both");
      const res = await admin(ctx).createGroup({
        name,
        tenantIds,
        allTenants,
        quarantineOnMismatch: ctx.args.bool("quarantine-on-mismatch"),
        certificateTtlSeconds: ctx.args.int("cert-ttl"),
        tokenTtlSeconds: ctx.args.int("token-ttl"),
      });
      ctx.out.result(json(CreateGroupResponseSchema, res), () => groupFields(res.group!));
      ctx.out.note(`next: kmi ctl group approve-measurements ${res.group!.name} --measure NAME=PATH …, then kmi ctl join-token create ${res.group!.name}`);
    },
  },
  {
    name: ["group", "list"],
    summary: "list machine groups (operator)",
    flags: { ...auditConnectionFlags },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await admin(ctx).listGroups({});
      ctx.out.table(groupColumns, res.groups, json(ListGroupsResponseSchema, res));
    },
  },
  {
    name: ["group", "approve-measurements"],
    args: "NAME",
    summary: "set a group's approved measurements, replacing the previous set (operator)",
    details: [
      "Give every measurement the machines must present, each with its approved digests:",
      "  --measurement NAME=SHA256[,SHA256…]   digests as the agent reports them (more than one during a rollout)",
      "  --measure NAME=PATH                   computed here from a file or directory, as the agent measures it",
      "Both are repeatable and may be mixed; a name given twice gets all its digests.",
      "",
      "example:",
      "  kmi ctl group approve-measurements edge --measure agent.code=/opt/kmi/dist --measurement proxy.config=3f2a…",
    ].join("\n"),
    flags: {
      ...auditConnectionFlags,
      measurement: { type: "list", value: "NAME=SHA256[,SHA256...]", help: "an approved digest, or several for one name" },
      measure: { type: "list", value: "NAME=PATH", help: "approve the digest of this file or directory, measured here" },
    },
    async run(ctx) {
      const group = ctx.args.positional("NAME");
      // Not ctx.args.list(): a digest list is comma-separated, and so may a path be.
      const raw = (name: string): string[] => {
        const v = ctx.args.parsed.flags.get(name);
        return Array.isArray(v) ? v : [];
      };
      const approved = parseMeasurementFlags(raw("measurement"));
      const sources: Record<string, string> = {};
      for (const v of raw("measure")) {
        const eq = v.indexOf("=");
        if (eq <= 0 || eq === v.length - 1) throw new UsageError(`--measure: "${v}" is not NAME=PATH`);
        sources[v.slice(0, eq)] = v.slice(eq + 1);
      }
      for (const m of await measureFiles(sources)) {
        const set = approved.get(m.name) ?? new Set<string>();
        set.add(m.sha256);
        approved.set(m.name, set);
      }
      if (approved.size === 0) {
        throw new UsageError("give at least one --measurement NAME=SHA256 or --measure NAME=PATH (an empty set would stop every machine of the group from attesting)");
      }
      const res = await admin(ctx).approveMeasurements({ group, approved: [...approved].map(([name, set]) => ({ name, sha256: [...set] })) });
      ctx.out.result(json(ApproveMeasurementsResponseSchema, res), () => groupFields(res.group!));
    },
  },
];

const joinTokenCommands: Command[] = [
  {
    name: ["join-token", "create"],
    args: "GROUP",
    summary: "make a one-time join token for a machine of GROUP; the secret is shown once (operator)",
    details: "The machine's agent enrolls with it once (kmi agent --join-token-file FILE). Prefer --out FILE (mode 0600) over the terminal.",
    flags: {
      ...auditConnectionFlags,
      ttl: { type: "int", value: "SECONDS", help: "lifetime, 60 to 604800 (default 3600)" },
      description: { type: "string", value: "TEXT", help: "free text, e.g. the machine it is for" },
      out: { type: "string", value: "FILE", help: "write the token to FILE (mode 0600) instead of stdout" },
    },
    async run(ctx) {
      const res = await admin(ctx).createJoinToken({ group: ctx.args.positional("GROUP"), ttlSeconds: ctx.args.int("ttl"), description: ctx.args.str("description") ?? "" });
      const out = ctx.args.str("out");
      if (out !== undefined) {
        ctx.writeFile(out, res.secret + "\n", 0o600);
        const { secret: _secret, ...rest } = json(CreateJoinTokenResponseSchema, res) as Record<string, unknown>;
        ctx.out.result({ ...rest, file: out }, () => renderFields([["token id", res.tokenId], ["written to", out], ["expires", time(res.expiresAt)]]));
        return;
      }
      ctx.out.result(json(CreateJoinTokenResponseSchema, res), () => `${res.secret}\n`);
      ctx.out.note(`join token ${res.tokenId}: works once, until ${time(res.expiresAt)}; it is not shown again`);
    },
  },
];

const machineCommands: Command[] = [
  {
    name: ["machine", "list"],
    summary: "list enrolled machines with their status and last attestation (operator)",
    flags: { ...auditConnectionFlags, group: { type: "string", value: "NAME", help: "only machines of this group" } },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await admin(ctx).listMachines({ group: ctx.args.str("group") ?? "" });
      ctx.out.table<Machine>(
        [
          { header: "machine", value: (m) => m.machineId },
          { header: "group", value: (m) => m.group },
          { header: "hostname", value: (m) => m.hostname },
          { header: "status", value: (m) => status(m.status) },
          { header: "last attestation", value: (m) => (m.lastAttestation === undefined ? "never" : `${time(m.lastAttestation.time)} ${m.lastAttestation.ok ? "ok" : "REFUSED"}`) },
          { header: "cert not after", value: (m) => time(m.certificateNotAfter) },
        ],
        res.machines,
        json(ListMachinesResponseSchema, res),
      );
    },
  },
  {
    name: ["machine", "show"],
    args: "MACHINE_ID",
    summary: "show one machine, with its last attestation and why it failed (operator)",
    flags: { ...auditConnectionFlags },
    async run(ctx) {
      const res = await admin(ctx).getMachine({ machineId: ctx.args.positional("MACHINE_ID") });
      ctx.out.result(json(GetMachineResponseSchema, res), () => machineFields(res.machine!));
    },
  },
  {
    name: ["machine", "quarantine"],
    args: "MACHINE_ID",
    summary: "mark a machine compromised: no renewal, no attestation, the KDC refuses it, until released (operator)",
    flags: { ...auditConnectionFlags, reason: { type: "string", value: "TEXT", help: "why (kept on the machine and in the audit log)", required: true } },
    async run(ctx) {
      const res = await admin(ctx).quarantineMachine({ machineId: ctx.args.positional("MACHINE_ID"), reason: ctx.args.need("reason") });
      ctx.out.result(json(QuarantineMachineResponseSchema, res), () => machineFields(res.machine!));
    },
  },
  {
    name: ["machine", "release"],
    args: "MACHINE_ID",
    summary: "lift a machine's quarantine (operator)",
    flags: { ...auditConnectionFlags, reason: { type: "string", value: "TEXT", help: "why (kept in the audit log)", required: true } },
    async run(ctx) {
      const res = await admin(ctx).releaseMachine({ machineId: ctx.args.positional("MACHINE_ID"), reason: ctx.args.need("reason") });
      ctx.out.result(json(ReleaseMachineResponseSchema, res), () => machineFields(res.machine!));
    },
  },
];

const serverFlag: FlagSpecs = {
  server: { type: "string", value: "NAME", help: "whose audit log: the KDC's or the Auditserver's (default kdc)", choices: ["kdc", "audit"] },
  audit: auditConnectionFlags["audit"]!,
};

/** `audit tail --server audit`. */
async function tailAudit(ctx: CommandContext): Promise<void> {
  ctx.args.noPositionals();
  const after = ctx.args.int("after");
  const res = await admin(ctx).tailAuditLog({ afterSeq: BigInt(after), limit: ctx.args.int("limit"), last: after === 0 && !ctx.args.bool("first") });
  ctx.out.table<AuditLogEntry>(
    [
      { header: "seq", value: (e) => e.seq.toString() },
      { header: "time", value: (e) => time(e.time) },
      { header: "actor", value: (e) => e.actor },
      { header: "action", value: (e) => e.action },
      { header: "target", value: (e) => e.target },
      { header: "outcome", value: (e) => e.outcome },
      { header: "details", value: (e) => Object.entries(e.details).sort().map(([k, v]) => `${k}=${v}`).join(" ") },
    ],
    res.entries,
    json(TailAuditLogResponseSchema, res),
  );
}

/** `audit verify --server audit`. */
async function verifyAudit(ctx: CommandContext): Promise<number | void> {
  ctx.args.noPositionals();
  const given = readCheckpointFile(ctx);
  const res = await admin(ctx).verifyAuditLog(given === undefined ? {} : { checkpoint: given });
  ctx.out.result(json(VerifyAuditLogResponseSchema, res), () => verifyText(res, given));
  if (!res.ok) {
    ctx.out.note(`kmi ctl: the Auditserver's audit log does not verify at entry ${res.firstBadSeq}: ${res.problem}; treat its store as tampered with`);
    return ExitCode.failure;
  }
}

/** `audit checkpoint --server audit`. */
async function checkpointAudit(ctx: CommandContext): Promise<void> {
  ctx.args.noPositionals();
  const res = await admin(ctx).getAuditCheckpoint({});
  outputCheckpoint(ctx, res.checkpoint!, res.witness);
}

/** Wraps the KDC's `audit tail`/`audit verify` so that `--server audit` asks the Auditserver. */
function withServerFlag(kdcCommand: Command, auditRun: (ctx: CommandContext) => Promise<number | void>): Command {
  return {
    ...kdcCommand,
    summary: `${kdcCommand.summary.replace(/ \(operator\)$/, "")}; --server audit for the Auditserver's log (operator)`,
    flags: { ...kdcCommand.flags, ...serverFlag },
    run: (ctx) => ((ctx.args.str("server") ?? "kdc") === "audit" ? auditRun(ctx) : kdcCommand.run(ctx)),
  };
}

/** The Auditserver's own commands. */
export const auditCommands: readonly Command[] = [...groupCommands, ...joinTokenCommands, ...machineCommands];

/**
 * The command table with the Auditserver's commands: `base` (the KDC's table) with its
 * `audit tail` and `audit verify` taking `--server kdc|audit`, plus `auditCommands`. When
 * `base` has no such commands, standalone ones are added.
 */
export function registerAuditCommands(base: readonly Command[]): Command[] {
  const isName = (c: Command, verb: string) => c.name.length === 2 && c.name[0] === "audit" && c.name[1] === verb;
  const out = base.map((c) =>
    isName(c, "tail") ? withServerFlag(c, tailAudit) : isName(c, "verify") ? withServerFlag(c, verifyAudit) : isName(c, "checkpoint") ? withServerFlag(c, checkpointAudit) : c,
  );
  if (!base.some((c) => isName(c, "tail"))) {
    out.push({
      name: ["audit", "tail"],
      summary: "print the Auditserver's audit log entries (operator)",
      flags: { ...auditConnectionFlags, ...serverFlag, after: { type: "int", value: "SEQ", help: "entries after this sequence number" }, limit: { type: "int", value: "N", help: "at most N entries, 1 to 1000 (default 100)" }, first: { type: "bool", help: "the first entries instead of the last ones" } },
      run: tailAudit,
    });
  }
  if (!base.some((c) => isName(c, "verify"))) {
    out.push({ name: ["audit", "verify"], summary: "check the Auditserver's audit log against its signed checkpoints (operator)", flags: { ...auditConnectionFlags, ...serverFlag, checkpoint: { type: "string", value: "FILE", help: "an exported checkpoint the log must still extend" } }, run: verifyAudit });
  }
  if (!base.some((c) => isName(c, "checkpoint"))) {
    out.push({ name: ["audit", "checkpoint"], summary: "export a signed checkpoint of the Auditserver's audit log (operator)", flags: { ...auditConnectionFlags, ...serverFlag, out: { type: "string", value: "FILE", help: "write it to FILE" } }, run: checkpointAudit });
  }
  return [...out, ...auditCommands];
}
