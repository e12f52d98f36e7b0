/**
 * The KDC's `kmi ctl` commands: tenants, tokens, the Certificate menu (`ca ...`), the audit
 * log and service certificates (`kmi ctl status`, the whole mesh's health, is src/ctl/status-command.ts).
 */
import { create, toJson, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { FailedPrecondition } from "../common/errors.js";
import { KeyAlgorithm } from "../gen/kmi/common/v1/common_pb.js";
import {
  CreateTenantResponseSchema,
  CreateTokenResponseSchema,
  GetTenantResponseSchema,
  IssueServiceCertificateResponseSchema,
  KdcAdminService,
  ListTenantsResponseSchema,
  ListTokensResponseSchema,
  RevokeTokenResponseSchema,
  Role,
  TailAuditLogResponseSchema,
  VerifyAuditLogResponseSchema,
  type AuditEntry,
  type Tenant,
  type TokenInfo,
} from "../gen/kmi/kdc/v1/admin_pb.js";
import {
  ActivateVersionResponseSchema,
  CertificateFormat,
  CreateSigningKeyResponseSchema,
  CreateVersionResponseSchema,
  DiscardPendingVersionResponseSchema,
  GetRolloutStatusResponseSchema,
  GetRotationPolicyResponseSchema,
  GetVersionCsrResponseSchema,
  IntermediateVersionSchema,
  KdcService,
  ListSigningKeysResponseSchema,
  ListVersionsResponseSchema,
  RenewVersionResponseSchema,
  RevokeSigningKeyResponseSchema,
  RevokeVersionResponseSchema,
  SetRotationPolicyResponseSchema,
  KeyCustody,
  Signer,
  UploadIntermediateResponseSchema,
  VersionState,
  type GetRolloutStatusResponse,
  type IntermediateVersion,
  type MachineRollout,
  type RotationStatus,
  type SigningKey,
} from "../gen/kmi/kdc/v1/kdc_pb.js";
import { ProgressMeter, progressWanted } from "../common/progress-meter.js";
import { outputCheckpoint, readCheckpointFile, verifyText } from "./checkpoint-file.js";
import { DEFAULT_KDC_URL, kdcConnectionFlags } from "./client.js";
import type { Command, CommandContext } from "./command.js";
import type { FlagSpecs } from "./flags.js";
import { ExitCode, renderFields, UsageError } from "./output.js";

const tenantFlag: FlagSpecs = { tenant: { type: "string", value: "ID", help: "tenant id", env: "KMI_CTL_TENANT", required: true } };
const versionFlag = (help: string, required = true): FlagSpecs => ({ version: { type: "int", value: "N", help, required } });
const ALGORITHMS = ["ecdsa-p256", "rsa-2048", "rsa-3072"] as const;
const algorithmFlag: FlagSpecs = { algorithm: { type: "string", value: "ALG", help: "key algorithm (default ecdsa-p256)", choices: ALGORITHMS } };
const custodyFlag: FlagSpecs = {
  "key-custody": {
    type: "string",
    value: "WHERE",
    help: "where the new key is held: escrow (sealed in the KDC's store, released to the agents) or token (in the KDC's PKCS#11 token, never released: the KDC signs the leaves); default: as the tenant's active (or newest) version",
    choices: ["escrow", "token"],
  },
};
const subjectFlags: FlagSpecs = {
  cn: { type: "string", value: "NAME", help: 'subject common name (default "<tenant name> MITM CA <version>")' },
  org: { type: "string", value: "NAME", help: "subject organization" },
  ou: { type: "string", value: "NAME", help: "subject organizational unit" },
  country: { type: "string", value: "CC", help: "subject two-letter country code" },
};

function kdc(ctx: CommandContext) {
  const c = ctx.clients("kdc", DEFAULT_KDC_URL);
  return { ca: c.get(KdcService), admin: c.get(KdcAdminService) };
}

function custody(ctx: CommandContext): KeyCustody {
  const v = ctx.args.str("key-custody");
  return v === "token" ? KeyCustody.TOKEN : v === "escrow" ? KeyCustody.ESCROW : KeyCustody.UNSPECIFIED;
}

function algorithm(ctx: CommandContext): KeyAlgorithm {
  switch (ctx.args.str("algorithm")) {
    case "rsa-2048":
      return KeyAlgorithm.RSA_2048;
    case "rsa-3072":
      return KeyAlgorithm.RSA_3072;
    default:
      return KeyAlgorithm.ECDSA_P256;
  }
}

/** Proto3 JSON of a message (enum names, RFC 3339 times) for --json output. */
function json<D extends DescMessage>(schema: D, msg: MessageShape<D>): unknown {
  return toJson(schema, msg, { alwaysEmitImplicit: true });
}

function time(t: Timestamp | undefined): string {
  return t === undefined ? "-" : timestampDate(t).toISOString().replace(/\.\d{3}Z$/, "Z");
}

/** Lowercase enum names for tables. */
export function stateLabel(s: VersionState): string {
  return (VersionState[s] ?? "unspecified").toLowerCase();
}

/** A version's state for people: "pending (expired)" for a PENDING version past its CSR's expiry. */
export function versionStateLabel(v: IntermediateVersion): string {
  return stateLabel(v.state) + (v.state === VersionState.PENDING && v.pendingExpired ? " (expired)" : "");
}

function signerLabel(s: Signer): string {
  return s === Signer.KMI_ROOT ? "kmi-root" : s === Signer.PRIVATE_CA ? "private-ca" : "-";
}

function algorithmLabel(a: KeyAlgorithm): string {
  return a === KeyAlgorithm.ECDSA_P256 ? "ecdsa-p256" : a === KeyAlgorithm.RSA_2048 ? "rsa-2048" : a === KeyAlgorithm.RSA_3072 ? "rsa-3072" : "-";
}

function roleLabel(r: Role): string {
  return r === Role.OPERATOR ? "operator" : r === Role.TENANT_ADMIN ? "tenant-admin" : "-";
}

function versionFields(v: IntermediateVersion): string {
  return renderFields([
    ["tenant", v.tenantId],
    ["version", v.version],
    ["state", versionStateLabel(v)],
    ["signer", signerLabel(v.signer)],
    ["algorithm", algorithmLabel(v.keyAlgorithm)],
    ["key id", v.keyId],
    ["key custody", v.keyCustody === KeyCustody.TOKEN ? "token (held in the KDC's PKCS#11 token; the KDC signs the leaves)" : "escrow"],
    ["subject", v.certificate?.subject],
    ["issuer", v.certificate?.issuer],
    ["not before", time(v.certificate?.notBefore)],
    ["not after", time(v.certificate?.notAfter)],
    ["sha256", v.certificate?.sha256Fingerprint],
    ["renewed from", v.renewedFrom === 0 ? undefined : v.renewedFrom],
    ...(v.pendingExpiresAt !== undefined ? ([["csr expires", time(v.pendingExpiresAt)]] as const) : []),
    ...(v.discardedAt !== undefined ? ([["discarded", time(v.discardedAt)], ["discard reason", v.discardReason]] as const) : []),
  ]);
}

/** Writes the CSR to --out or stdout, with a hint for the next step. */
function emitCsr(ctx: CommandContext, tenant: string, v: IntermediateVersion, csrPem: string, data: unknown): void {
  const out = ctx.args.str("out");
  if (out !== undefined) {
    ctx.writeFile(out, csrPem, 0o644);
    ctx.out.note(`wrote the CSR of version ${v.version} to ${out}`);
  }
  if (ctx.out.json) ctx.out.result(data, () => "");
  else if (out === undefined) ctx.out.raw(csrPem);
  ctx.out.note(`version ${v.version} is pending: have your private CA sign the CSR, then \`kmi ctl ca upload --tenant ${tenant} --version ${v.version} --cert signed.pem [--root root.pem] [--activate]\``);
}

const tenantCommands: Command[] = [
  {
    name: ["tenant", "create"],
    summary: "create a tenant (operator)",
    args: "TENANT_ID",
    flags: {
      ...kdcConnectionFlags,
      name: { type: "string", value: "TEXT", help: "display name (default the id)" },
      bootstrap: { type: "bool", help: "also create and activate a first KMI-signed ECDSA P-256 intermediate" },
    },
    async run(ctx) {
      const tenantId = ctx.args.positional("TENANT_ID");
      const res = await kdc(ctx).admin.createTenant({ tenantId, displayName: ctx.args.str("name") ?? "", bootstrapKmiSigned: ctx.args.bool("bootstrap") });
      ctx.out.result(json(CreateTenantResponseSchema, res), () => tenantFields(res.tenant));
    },
  },
  {
    name: ["tenant", "list"],
    summary: "list tenants with their active versions (operator)",
    flags: { ...kdcConnectionFlags },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await kdc(ctx).admin.listTenants({});
      ctx.out.table<Tenant>(
        [
          { header: "tenant", value: (t) => t.tenantId },
          { header: "name", value: (t) => t.displayName },
          { header: "active", value: (t) => (t.activeVersion === 0 ? "-" : t.activeVersion) },
          { header: "created", value: (t) => time(t.createdAt) },
        ],
        res.tenants,
        json(ListTenantsResponseSchema, res),
      );
    },
  },
  {
    name: ["tenant", "show"],
    summary: "show one tenant (operator)",
    args: "TENANT_ID",
    flags: { ...kdcConnectionFlags },
    async run(ctx) {
      const res = await kdc(ctx).admin.getTenant({ tenantId: ctx.args.positional("TENANT_ID") });
      ctx.out.result(json(GetTenantResponseSchema, res), () => tenantFields(res.tenant));
    },
  },
];

function tenantFields(t: Tenant | undefined): string {
  if (t === undefined) return "";
  return renderFields([
    ["tenant", t.tenantId],
    ["name", t.displayName],
    ["active version", t.activeVersion === 0 ? "none" : t.activeVersion],
    ["created", time(t.createdAt)],
  ]);
}

function parseDuration(flag: string, text: string | undefined): bigint {
  if (text === undefined) return 0n;
  const m = /^(\d+)([smhd]?)$/.exec(text);
  if (m === null) throw new UsageError(`--${flag}: "${text}" is not a duration; use e.g. 3600, 90m, 12h or 30d`);
  const unit = { "": 1n, s: 1n, m: 60n, h: 3600n, d: 86400n }[m[2] as "" | "s" | "m" | "h" | "d"];
  return BigInt(m[1]!) * unit;
}

const tokenCommands: Command[] = [
  {
    name: ["token", "create"],
    summary: "create a bearer token; the secret is printed once (operator)",
    details: "examples:\n  kmi ctl token create --role tenant-admin --tenant acme --ttl 30d --out acme.token\n  kmi ctl token create --role operator --description 'ci'",
    flags: {
      ...kdcConnectionFlags,
      role: { type: "string", value: "ROLE", help: "role of the token", choices: ["operator", "tenant-admin"], required: true },
      tenant: { type: "string", value: "ID", help: "tenant of a tenant-admin token" },
      description: { type: "string", value: "TEXT", help: "free text" },
      ttl: { type: "string", value: "DURATION", help: "lifetime, e.g. 12h or 30d (default: no expiry)" },
      out: { type: "string", value: "FILE", help: "write the secret to FILE (mode 0600) instead of printing it" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const role = ctx.args.str("role") === "operator" ? Role.OPERATOR : Role.TENANT_ADMIN;
      if (role === Role.TENANT_ADMIN && ctx.args.str("tenant") === undefined) throw new UsageError("--tenant is required for a tenant-admin token");
      const res = await kdc(ctx).admin.createToken({
        role,
        tenantId: ctx.args.str("tenant") ?? "",
        description: ctx.args.str("description") ?? "",
        ttlSeconds: parseDuration("ttl", ctx.args.str("ttl")),
      });
      const out = ctx.args.str("out");
      if (out !== undefined) {
        ctx.writeFile(out, res.secret + "\n", 0o600);
        ctx.out.note(`wrote the token secret to ${out} (mode 0600); use it with --token-file ${out}`);
      }
      const data = json(CreateTokenResponseSchema, res) as Record<string, unknown>;
      if (out !== undefined) delete data.secret;
      ctx.out.result(data, () =>
        renderFields([
          ["token id", res.token?.tokenId],
          ["role", roleLabel(res.token?.role ?? Role.UNSPECIFIED)],
          ["tenant", res.token?.tenantId],
          ["expires", time(res.token?.expiresAt)],
          ...(out === undefined ? ([["secret", res.secret]] as const) : []),
        ]) + (out === undefined ? "\nthe secret is shown only now; store it (it is kept only hashed)\n" : ""),
      );
    },
  },
  {
    name: ["token", "revoke"],
    summary: "revoke a token by id; it stops working at once (operator)",
    args: "TOKEN_ID",
    flags: { ...kdcConnectionFlags },
    async run(ctx) {
      const res = await kdc(ctx).admin.revokeToken({ tokenId: ctx.args.positional("TOKEN_ID") });
      ctx.out.result(json(RevokeTokenResponseSchema, res), () => `revoked token ${res.token?.tokenId ?? ""}\n`);
    },
  },
  {
    name: ["token", "list"],
    summary: "list tokens, never their secrets (operator)",
    flags: { ...kdcConnectionFlags },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await kdc(ctx).admin.listTokens({});
      ctx.out.table<TokenInfo>(
        [
          { header: "token id", value: (t) => t.tokenId },
          { header: "role", value: (t) => roleLabel(t.role) },
          { header: "tenant", value: (t) => t.tenantId },
          { header: "state", value: (t) => (t.revoked ? "revoked" : t.expiresAt !== undefined && timestampDate(t.expiresAt) <= new Date() ? "expired" : "valid") },
          { header: "expires", value: (t) => (t.expiresAt === undefined ? "never" : time(t.expiresAt)) },
          { header: "description", value: (t) => t.description },
        ],
        res.tokens,
        json(ListTokensResponseSchema, res),
      );
    },
  },
];

const caCommands: Command[] = [
  {
    name: ["ca", "download"],
    summary: "download a version's CA certificates for device trust stores, with fingerprints",
    details:
      "--part chain (default for PEM) writes intermediate then root; DER holds one certificate, so DER downloads the intermediate unless --part root.\n" +
      "examples:\n  kmi ctl ca download --tenant acme --out acme-chain.pem\n  kmi ctl ca download --tenant acme --part root --format der --out kmi-root.der",
    flags: {
      ...kdcConnectionFlags,
      ...tenantFlag,
      ...versionFlag("version to download (default: the active one)", false),
      format: { type: "string", value: "FMT", help: "encoding (default pem)", choices: ["pem", "der"] },
      part: { type: "string", value: "PART", help: "what to write", choices: ["chain", "intermediate", "root"] },
      out: { type: "string", value: "FILE", help: "write to FILE instead of stdout (required for DER)" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const der = ctx.args.str("format") === "der";
      const part = ctx.args.str("part") ?? (der ? "intermediate" : "chain");
      if (der && part === "chain") throw new UsageError("--part chain: DER holds one certificate; use --part intermediate or --part root, or --format pem");
      const out = ctx.args.str("out");
      if (der && out === undefined && !ctx.out.json) throw new UsageError("--format der: binary output needs --out FILE");
      const res = await kdc(ctx).ca.getCaCertificates({
        tenantId: ctx.args.need("tenant"),
        version: ctx.args.int("version"),
        format: der ? CertificateFormat.DER : CertificateFormat.PEM,
      });
      const bytes = part === "root" ? res.root : part === "intermediate" ? res.intermediate : res.chain;
      if (part === "root" && bytes.length === 0) {
        throw new FailedPrecondition("no root is known for this version (a private-CA version uploaded without --root); download --part intermediate and add your own root");
      }
      if (out !== undefined) {
        ctx.writeFile(out, bytes, 0o644);
        ctx.out.note(`wrote ${part} of version ${res.version?.version ?? 0} (${der ? "DER" : "PEM"}) to ${out}`);
      }
      const v = res.version;
      const data = {
        version: v === undefined ? undefined : json(IntermediateVersionSchema, v),
        intermediateSha256: res.intermediateSha256,
        rootSha256: res.rootSha256,
        ...(out === undefined ? { [part]: der ? Buffer.from(bytes).toString("base64") : Buffer.from(bytes).toString("utf8") } : { file: out }),
      };
      if (ctx.out.json) ctx.out.result(data, () => "");
      else {
        if (out === undefined) ctx.out.raw(bytes);
        ctx.out.note(`version ${v?.version ?? 0} (${stateLabel(v?.state ?? VersionState.UNSPECIFIED)})\nintermediate sha256 ${res.intermediateSha256}\nroot sha256         ${res.rootSha256 === "" ? "(none)" : res.rootSha256}`);
      }
    },
  },
  {
    name: ["ca", "csr"],
    summary: "create a new version whose key the KDC makes, and print its CSR for your private CA (or --version N: print a pending version's CSR again)",
    details: "examples:\n  kmi ctl ca csr --tenant acme --org 'ACME Corp' --out acme.csr\n  kmi ctl ca csr --tenant acme --version 4 --out acme.csr",
    flags: {
      ...kdcConnectionFlags,
      ...tenantFlag,
      ...versionFlag("print the CSR of this pending version instead of making a new one", false),
      ...algorithmFlag,
      ...custodyFlag,
      ...subjectFlags,
      out: { type: "string", value: "FILE", help: "write the CSR to FILE" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const tenantId = ctx.args.need("tenant");
      const version = ctx.args.int("version");
      if (version !== 0) {
        const res = await kdc(ctx).ca.getVersionCsr({ tenantId, version });
        const out = ctx.args.str("out");
        if (out !== undefined) {
          ctx.writeFile(out, res.csrPem, 0o644);
          ctx.out.note(`wrote the CSR of version ${version} to ${out}`);
        }
        if (ctx.out.json) ctx.out.result(json(GetVersionCsrResponseSchema, res), () => "");
        else if (out === undefined) ctx.out.raw(res.csrPem);
        return;
      }
      const res = await kdc(ctx).ca.createVersion({
        tenantId,
        signer: Signer.PRIVATE_CA,
        keyAlgorithm: algorithm(ctx),
        keyCustody: custody(ctx),
        subject: { commonName: ctx.args.str("cn") ?? "", organization: ctx.args.str("org") ?? "", organizationalUnit: ctx.args.str("ou") ?? "", country: ctx.args.str("country") ?? "" },
      });
      emitCsr(ctx, tenantId, res.version!, res.csrPem, json(CreateVersionResponseSchema, res));
    },
  },
  {
    name: ["ca", "upload"],
    summary: "attach the intermediate your private CA signed to a pending version (checked before anything changes)",
    details: "example:\n  kmi ctl ca upload --tenant acme --cert intermediate.pem --root my-root.pem --activate",
    flags: {
      ...kdcConnectionFlags,
      ...tenantFlag,
      ...versionFlag("the pending version (default: the newest pending one)", false),
      cert: { type: "string", value: "FILE", help: "the signed intermediate, PEM or DER, exactly one certificate", required: true },
      root: { type: "string", value: "FILE", help: "your private root, PEM or DER: the intermediate must chain to it; required on the tenant's first upload, then kept and reused when omitted" },
      activate: { type: "bool", help: "activate the version at once" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const rootFile = ctx.args.str("root");
      const res = await kdc(ctx).ca.uploadIntermediate({
        tenantId: ctx.args.need("tenant"),
        version: ctx.args.int("version"),
        certificate: ctx.readFile("cert", ctx.args.need("cert")),
        customerRoot: rootFile === undefined ? new Uint8Array() : ctx.readFile("root", rootFile),
        activate: ctx.args.bool("activate"),
      });
      ctx.out.result(json(UploadIntermediateResponseSchema, res), () => versionFields(res.version!));
    },
  },
  {
    name: ["ca", "rotate"],
    summary: "make a new KMI-signed version with a new key (ready at once; the active version stays until you activate)",
    details: "private-CA rotation is `kmi ctl ca csr` followed by `kmi ctl ca upload`.\nexample:\n  kmi ctl ca rotate --tenant acme --validity-days 730 --activate",
    flags: {
      ...kdcConnectionFlags,
      ...tenantFlag,
      ...algorithmFlag,
      ...custodyFlag,
      ...subjectFlags,
      "validity-days": { type: "int", value: "DAYS", help: "validity, 1 to 1825 (default 365)" },
      activate: { type: "bool", help: "activate the new version at once" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await kdc(ctx).ca.createVersion({
        tenantId: ctx.args.need("tenant"),
        signer: Signer.KMI_ROOT,
        keyAlgorithm: algorithm(ctx),
        keyCustody: custody(ctx),
        subject: { commonName: ctx.args.str("cn") ?? "", organization: ctx.args.str("org") ?? "", organizationalUnit: ctx.args.str("ou") ?? "", country: ctx.args.str("country") ?? "" },
        validityDays: ctx.args.int("validity-days"),
        activate: ctx.args.bool("activate"),
      });
      ctx.out.result(json(CreateVersionResponseSchema, res), () => versionFields(res.version!));
    },
  },
  {
    name: ["ca", "renew"],
    summary: "make a new version for an existing version's key: a KMI-signed certificate, or a CSR (--signer private-ca)",
    flags: {
      ...kdcConnectionFlags,
      ...tenantFlag,
      ...versionFlag("the version whose key is reused"),
      signer: { type: "string", value: "SIGNER", help: "who signs the new certificate (default: the same as the version's)", choices: ["kmi-root", "private-ca"] },
      "validity-days": { type: "int", value: "DAYS", help: "validity of a KMI-signed certificate, 1 to 1825 (default 365)" },
      activate: { type: "bool", help: "activate at once (KMI-signed only)" },
      out: { type: "string", value: "FILE", help: "write the CSR to FILE (private-ca)" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const tenantId = ctx.args.need("tenant");
      const version = ctx.args.int("version");
      let signer: Signer;
      const flag = ctx.args.str("signer");
      if (flag === undefined) {
        const list = await kdc(ctx).ca.listVersions({ tenantId });
        const src = list.versions.find((v) => v.version === version);
        signer = src?.signer ?? Signer.KMI_ROOT;
      } else signer = flag === "private-ca" ? Signer.PRIVATE_CA : Signer.KMI_ROOT;
      const res = await kdc(ctx).ca.renewVersion({ tenantId, version, signer, validityDays: ctx.args.int("validity-days"), activate: ctx.args.bool("activate") });
      if (signer === Signer.PRIVATE_CA) emitCsr(ctx, tenantId, res.version!, res.csrPem, json(RenewVersionResponseSchema, res));
      else ctx.out.result(json(RenewVersionResponseSchema, res), () => versionFields(res.version!));
    },
  },
  {
    name: ["ca", "activate"],
    summary: "make a ready (or retired) version the active one; the previous active version is retired",
    flags: { ...kdcConnectionFlags, ...tenantFlag, ...versionFlag("the version to activate") },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await kdc(ctx).ca.activateVersion({ tenantId: ctx.args.need("tenant"), version: ctx.args.int("version") });
      ctx.out.result(json(ActivateVersionResponseSchema, res), () =>
        `version ${res.version?.version ?? 0} is active` + (res.retired !== undefined ? `; version ${res.retired.version} is retired` : "") + "\n",
      );
    },
  },
  {
    name: ["ca", "revoke"],
    summary: "revoke a version; agents drop its key",
    flags: {
      ...kdcConnectionFlags,
      ...tenantFlag,
      ...versionFlag("the version to revoke"),
      reason: { type: "string", value: "TEXT", help: "why (kept in history and the audit log)", required: true },
      "allow-active": { type: "bool", help: "allow revoking the active version (the tenant is then left without one)" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await kdc(ctx).ca.revokeVersion({
        tenantId: ctx.args.need("tenant"),
        version: ctx.args.int("version"),
        reason: ctx.args.need("reason"),
        allowActive: ctx.args.bool("allow-active"),
      });
      ctx.out.result(json(RevokeVersionResponseSchema, res), () => `version ${res.version?.version ?? 0} is revoked\n`);
    },
  },
  {
    name: ["ca", "discard"],
    summary: "give up a pending version whose signed certificate will never come: it becomes discarded and its key is erased",
    details:
      "only a pending version (made by `ca csr` or `ca renew --signer private-ca`) can be discarded; it stays in history.\n" +
      "A pending version also expires by itself after the KDC's --pending-ttl (default 30d): an upload is then refused.\n" +
      "example:\n  kmi ctl ca discard --tenant acme --version 4 --reason 'CSR lost'",
    flags: {
      ...kdcConnectionFlags,
      ...tenantFlag,
      ...versionFlag("the pending version to discard"),
      reason: { type: "string", value: "TEXT", help: "why (kept in history and the audit log; optional)" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await kdc(ctx).ca.discardPendingVersion({ tenantId: ctx.args.need("tenant"), version: ctx.args.int("version"), reason: ctx.args.str("reason") ?? "" });
      ctx.out.result(json(DiscardPendingVersionResponseSchema, res), () => `version ${res.version?.version ?? 0} is discarded; its key is erased\n`);
    },
  },
  {
    name: ["ca", "history"],
    summary: "list a tenant's versions, newest first, with states, fingerprints and validity",
    flags: { ...kdcConnectionFlags, ...tenantFlag },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await kdc(ctx).ca.listVersions({ tenantId: ctx.args.need("tenant") });
      ctx.out.table<IntermediateVersion>(
        [
          { header: "version", value: (v) => v.version },
          { header: "state", value: (v) => versionStateLabel(v) },
          { header: "signer", value: (v) => signerLabel(v.signer) },
          { header: "algorithm", value: (v) => algorithmLabel(v.keyAlgorithm) },
          { header: "key held", value: (v) => (v.keyCustody === KeyCustody.TOKEN ? "token" : "escrow") },
          { header: "not after", value: (v) => time(v.certificate?.notAfter) },
          { header: "renewed from", value: (v) => (v.renewedFrom === 0 ? "" : v.renewedFrom) },
          { header: "sha256", value: (v) => v.certificate?.sha256Fingerprint },
        ],
        res.versions,
        json(ListVersionsResponseSchema, res),
      );
    },
  },
  {
    name: ["ca", "status"],
    summary: "show the rollout of the active version: which machines hold it, which not yet, which are unreachable (--wait: until all hold it)",
    details:
      "a machine is unreachable while its agent has no watch stream open to this KDC; it keeps what it last reported\n" +
      "(and serves from its sealed cache until the lease runs out)\n" +
      "--wait polls until every machine that reported holds the active version (exit 0), or --wait-timeout passes (exit 1);\n" +
      "meanwhile it shows \"N of M machines hold vX\" with an estimate on stderr (on a terminal, or with --progress)\n" +
      "example:\n  kmi ctl ca rotate --tenant acme --activate && kmi ctl ca status --tenant acme --wait",
    flags: {
      ...kdcConnectionFlags,
      ...tenantFlag,
      wait: { type: "bool", help: "wait until every machine holds the active version" },
      "wait-timeout": { type: "int", value: "SECONDS", help: "give up waiting after this long, exit 1 (default 600)" },
      progress: { type: "bool", help: "show the rollout's progress on stderr also when it is not a terminal" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const tenantId = ctx.args.need("tenant");
      const res = ctx.args.bool("wait") ? await waitForRollout(ctx, tenantId) : await kdc(ctx).ca.getRolloutStatus({ tenantId });
      ctx.out.result(json(GetRolloutStatusResponseSchema, res), () => {
        const unreachable = res.machines.filter((m) => !m.connected).length;
        const notYet = res.machines.filter((m) => m.connected && !m.upToDate).length;
        const head =
          `active version: ${res.activeVersion === 0 ? "none" : res.activeVersion}\n` +
          `${res.upToDateCount} of ${res.machines.length} machines hold it, ${notYet} not yet, ${unreachable} unreachable (${res.connectedCount} connected)\n` +
          rotationLines(res.rotation);
        if (res.machines.length === 0) return head + "(no machine has reported yet)\n";
        return head + "\n" + renderTableOf(res.machines);
      });
      if (ctx.args.bool("wait") && !rolloutComplete(res)) {
        ctx.out.note(`kmi ctl: the rollout of version ${res.activeVersion} is not complete after ${ctx.args.int("wait-timeout", 600)} s: ${res.upToDateCount} of ${res.machines.length} machines hold it`);
        return ExitCode.failure;
      }
    },
  },
];

/** The rotation lines of `ca status`: the policy, the next rotation, a staged version, a due CSR. */
function rotationLines(r: RotationStatus | undefined): string {
  if (r === undefined) return "";
  const lines = [`rotation policy: ${policyText(r)}`];
  if (r.nextRotationAt !== undefined) lines.push(`next rotation: ${time(r.nextRotationAt)}`);
  if (r.stagedVersion !== 0) lines.push(`staged version: ${r.stagedVersion} (since ${time(r.stagedAt)}; activated once every machine holds it, ${r.stagedHeldCount} do)`);
  if (r.csrDueVersion !== 0) lines.push(`CSR due: version ${r.csrDueVersion} waits for your private CA's signature (\`kmi ctl ca csr --version ${r.csrDueVersion}\`, then \`kmi ctl ca upload\`)`);
  return lines.join("\n") + "\n";
}

function policyText(r: RotationStatus): string {
  const p = r.policy;
  const parts: string[] = [];
  if (p !== undefined && p.rotateEveryDays > 0) parts.push(`KMI-signed: rotate every ${p.rotateEveryDays}d (activation timeout ${p.activationTimeoutHours}h)`);
  if (p !== undefined && p.csrBeforeExpiryDays > 0) parts.push(`private CA: CSR ${p.csrBeforeExpiryDays}d before expiry`);
  return parts.length === 0 ? "none (rotates only by hand; see `kmi ctl ca policy`)" : parts.join("; ");
}

/** Parses a whole number of days ("30d" or "30"); `max` days at most. */
function parseDays(flag: string, text: string): number {
  const m = /^(\d{1,4})d?$/.exec(text.trim());
  if (m === null) throw new UsageError(`--${flag}: "${text}" is not a number of days; use e.g. 30d (0 turns it off)`);
  return Number(m[1]);
}

/** Parses hours ("24h", "2d" or "24"). */
function parseHours(flag: string, text: string): number {
  const m = /^(\d{1,4})([hd]?)$/.exec(text.trim());
  if (m === null) throw new UsageError(`--${flag}: "${text}" is not a duration in hours; use e.g. 24h or 2d`);
  return Number(m[1]) * (m[2] === "d" ? 24 : 1);
}

/** "now" or an RFC 3339 time. */
function parseTime(flag: string, text: string): Date {
  const d = text.trim() === "now" ? new Date() : new Date(text);
  if (Number.isNaN(d.getTime()) || (text.trim() !== "now" && !/^\d{4}-\d{2}-\d{2}T/.test(text.trim()))) {
    throw new UsageError(`--${flag}: "${text}" is not a time; use RFC 3339 (e.g. 2026-12-07T02:00:00Z) or now`);
  }
  return d;
}

function rotationFields(tenantId: string, r: RotationStatus | undefined): string {
  if (r === undefined) return "";
  return renderFields([
    ["tenant", tenantId],
    ["policy", policyText(r)],
    ["next rotation", time(r.nextRotationAt)],
    ["last rotation", time(r.lastRotationAt)],
    ["staged version", r.stagedVersion === 0 ? "none" : `${r.stagedVersion} (${r.stagedHeldCount} machines hold it)`],
    ["CSR due", r.csrDueVersion === 0 ? "none" : `version ${r.csrDueVersion} (upload its signed certificate)`],
    ["active not after", time(r.activeNotAfter)],
  ]);
}

const POLICY_FLAGS = ["rotate-every", "csr-before-expiry", "activation-timeout", "next-rotation", "off"] as const;

/** `ca policy`: shows the tenant's rotation policy, or sets the flags given (the others keep their values). */
const policyCommand: Command = {
  name: ["ca", "policy"],
  summary: "show or set a tenant's rotation policy: KMI-signed intermediates rotate by themselves, private-CA ones get a CSR before they expire",
  details:
    "without setting flags it shows the policy; with them it sets those (the others keep their values)\n" +
    "--rotate-every: a KMI-signed active version is replaced every N days: the new version is staged first and\n" +
    "  activated once every machine that reports holds it, or after --activation-timeout (default 24h)\n" +
    "--csr-before-expiry: N days before a private-CA active version expires, a CSR is made (a pending version) and the\n" +
    "  tenant's admins are told (audit log, kmi_kdc_scheduled_rotations_total{step=\"csr-due\"}, `kmi ctl ca status`)\n" +
    "--next-rotation: when the next rotation is due (RFC 3339 or now), at most one period ahead; default: the active\n" +
    "  version's activation plus the period\n" +
    "examples:\n  kmi ctl ca policy --tenant acme --rotate-every 30d\n  kmi ctl ca policy --tenant acme --csr-before-expiry 14d\n  kmi ctl ca policy --tenant acme --off",
  flags: {
    ...kdcConnectionFlags,
    ...tenantFlag,
    "rotate-every": { type: "string", value: "DAYS", help: "rotate a KMI-signed intermediate every N days, e.g. 30d (0: never)" },
    "csr-before-expiry": { type: "string", value: "DAYS", help: "make a private-CA CSR N days before expiry, e.g. 14d (0: never)" },
    "activation-timeout": { type: "string", value: "HOURS", help: "activate a staged version after this long even if not every machine holds it, e.g. 24h (1h to 720h)" },
    "next-rotation": { type: "string", value: "TIME", help: "when the next rotation is due: RFC 3339 or now" },
    off: { type: "bool", help: "turn automatic rotation off (all 0)" },
  },
  async run(ctx) {
    ctx.args.noPositionals();
    const tenantId = ctx.args.need("tenant");
    const client = kdc(ctx).ca;
    const current = (await client.getRotationPolicy({ tenantId })).rotation;
    if (!POLICY_FLAGS.some((f) => (f === "off" ? ctx.args.bool(f) : ctx.args.str(f) !== undefined))) {
      ctx.out.result(json(GetRotationPolicyResponseSchema, create(GetRotationPolicyResponseSchema, current === undefined ? {} : { rotation: current })), () => rotationFields(tenantId, current));
      return;
    }
    const was = ctx.args.bool("off") ? undefined : current?.policy;
    const given = (flag: string, parse: (f: string, t: string) => number, old: number | undefined) => {
      const t = ctx.args.str(flag);
      return t === undefined ? (old ?? 0) : parse(flag, t);
    };
    const next = ctx.args.str("next-rotation");
    const res = await client.setRotationPolicy({
      tenantId,
      policy: {
        rotateEveryDays: given("rotate-every", parseDays, was?.rotateEveryDays),
        csrBeforeExpiryDays: given("csr-before-expiry", parseDays, was?.csrBeforeExpiryDays),
        activationTimeoutHours: given("activation-timeout", parseHours, was?.activationTimeoutHours),
      },
      ...(next !== undefined ? { nextRotationAt: timestampFromDate(parseTime("next-rotation", next)) } : {}),
    });
    ctx.out.result(json(SetRotationPolicyResponseSchema, res), () => rotationFields(tenantId, res.rotation));
  },
};

/** Every machine that reported holds the active version. */
function rolloutComplete(res: GetRolloutStatusResponse): boolean {
  return res.activeVersion !== 0 && res.machines.length > 0 && res.upToDateCount === res.machines.length;
}

/** Polls the rollout once a second until it is complete or --wait-timeout passes, with progress and an estimate on stderr. */
async function waitForRollout(ctx: CommandContext, tenantId: string): Promise<GetRolloutStatusResponse> {
  const deadline = Date.now() + ctx.args.int("wait-timeout", 600) * 1000;
  let meter: ProgressMeter | undefined;
  for (;;) {
    const res = await kdc(ctx).ca.getRolloutStatus({ tenantId });
    meter ??= new ProgressMeter({ out: ctx.stderr, label: "kmi ctl ca status", unit: `machines hold v${res.activeVersion}`, intervalMs: 0, enabled: progressWanted(ctx.stderr, ctx.args.bool("progress"), ctx.out.json) });
    meter.update(res.upToDateCount, res.machines.length);
    if (rolloutComplete(res) || Date.now() >= deadline) {
      meter.finish(rolloutComplete(res) ? `${res.upToDateCount} of ${res.machines.length} machines hold v${res.activeVersion}` : undefined);
      return res;
    }
    await new Promise((r) => setTimeout(r, Math.min(1000, Math.max(0, deadline - Date.now()))));
  }
}

/** Where a machine is in the rollout, for people. */
function rolloutState(m: MachineRollout): string {
  if (!m.connected) return m.upToDate ? "unreachable (had it)" : "unreachable";
  return m.upToDate ? "up to date" : "not yet";
}

function renderTableOf(machines: MachineRollout[]): string {
  const rows = machines.map((m) => [m.machineId, m.group, m.heldVersion === 0 ? "-" : String(m.heldVersion), rolloutState(m), m.connected ? "yes" : "no", time(m.lastReport)]);
  const headers = ["MACHINE", "GROUP", "HELD", "STATE", "CONNECTED", "LAST REPORT"];
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [headers, ...rows].map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd()).join("\n") + "\n";
}

const signingKeyCommands: Command[] = [
  {
    name: ["signing-key", "create"],
    summary: "make a plain signing key for a tenant; agents receive it at once (KEY_ADDED) and sign with it through Sign",
    args: "NAME",
    flags: { ...kdcConnectionFlags, ...tenantFlag, ...algorithmFlag },
    async run(ctx) {
      const res = await kdc(ctx).ca.createSigningKey({ tenantId: ctx.args.need("tenant"), name: ctx.args.positional("NAME"), keyAlgorithm: algorithm(ctx) });
      ctx.out.result(json(CreateSigningKeyResponseSchema, res), () => signingKeyFields(res.key));
    },
  },
  {
    name: ["signing-key", "list"],
    summary: "list a tenant's plain signing keys (public parts only)",
    flags: { ...kdcConnectionFlags, ...tenantFlag },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await kdc(ctx).ca.listSigningKeys({ tenantId: ctx.args.need("tenant") });
      ctx.out.table<SigningKey>(
        [
          { header: "name", value: (k) => k.name },
          { header: "algorithm", value: (k) => algorithmLabel(k.keyAlgorithm) },
          { header: "state", value: (k) => (k.revoked ? "revoked" : "active") },
          { header: "created", value: (k) => time(k.createdAt) },
          { header: "key id", value: (k) => k.keyId },
        ],
        res.keys,
        json(ListSigningKeysResponseSchema, res),
      );
    },
  },
  {
    name: ["signing-key", "revoke"],
    summary: "revoke a plain signing key; agents drop it at once (REVOKED)",
    args: "NAME",
    flags: { ...kdcConnectionFlags, ...tenantFlag, reason: { type: "string", value: "TEXT", help: "why (1 to 256 characters)", required: true } },
    async run(ctx) {
      const res = await kdc(ctx).ca.revokeSigningKey({ tenantId: ctx.args.need("tenant"), name: ctx.args.positional("NAME"), reason: ctx.args.need("reason") });
      ctx.out.result(json(RevokeSigningKeyResponseSchema, res), () => signingKeyFields(res.key));
    },
  },
];

function signingKeyFields(k: SigningKey | undefined): string {
  if (k === undefined) return "";
  return (
    renderFields([
      ["tenant", k.tenantId],
      ["name", k.name],
      ["algorithm", algorithmLabel(k.keyAlgorithm)],
      ["state", k.revoked ? "revoked" : "active"],
      ["key id", k.keyId],
      ["created", time(k.createdAt)],
    ]) + k.publicKeyPem
  );
}

const auditLogCommands: Command[] = [
  {
    name: ["audit", "tail"],
    summary: "print audit log entries (operator)",
    flags: {
      ...kdcConnectionFlags,
      after: { type: "int", value: "SEQ", help: "entries after this sequence number" },
      limit: { type: "int", value: "N", help: "at most N entries, 1 to 1000 (default 100)" },
      first: { type: "bool", help: "the first entries instead of the last ones (default with --after)" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const after = ctx.args.int("after");
      const res = await kdc(ctx).admin.tailAuditLog({ afterSeq: BigInt(after), limit: ctx.args.int("limit"), last: after === 0 && !ctx.args.bool("first") });
      ctx.out.table<AuditEntry>(
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
    },
  },
  {
    name: ["audit", "verify"],
    summary: "check the audit log's hash chain against its signed checkpoints and the witness's copy; exit 1 naming the first entry that differs (operator)",
    details: [
      "Checks every entry's hash and link, every signed checkpoint in the store against the entries",
      "it signed, and the copy the other server keeps as witness (the Auditserver for the KDC's log,",
      "the KDC for the Auditserver's). With --checkpoint FILE (from `kmi ctl audit checkpoint --out",
      "FILE`) it also proves the log still extends that checkpoint.",
    ].join("\n"),
    flags: { ...kdcConnectionFlags, checkpoint: { type: "string", value: "FILE", help: "an exported checkpoint the log must still extend" } },
    async run(ctx) {
      ctx.args.noPositionals();
      const given = readCheckpointFile(ctx);
      const res = await kdc(ctx).admin.verifyAuditLog(given === undefined ? {} : { checkpoint: given });
      ctx.out.result(json(VerifyAuditLogResponseSchema, res), () => verifyText(res, given));
      if (!res.ok) {
        ctx.out.note(`kmi ctl: the audit log does not verify at entry ${res.firstBadSeq}: ${res.problem}; treat the KDC's store as tampered with`);
        return ExitCode.failure;
      }
    },
  },
  {
    name: ["audit", "checkpoint"],
    summary: "sign the audit log's head now and export the checkpoint, to keep outside the server (operator)",
    details: "example:\n  kmi ctl audit checkpoint --out kdc-audit-$(date +%F).json\n  kmi ctl audit verify --checkpoint kdc-audit-2026-01-31.json",
    flags: { ...kdcConnectionFlags, out: { type: "string", value: "FILE", help: "write the checkpoint (JSON) to FILE instead of stdout" } },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await kdc(ctx).admin.getAuditCheckpoint({});
      outputCheckpoint(ctx, res.checkpoint!, res.witness);
    },
  },
];

const otherCommands: Command[] = [
  {
    name: ["service-cert", "issue"],
    summary: "sign a kmi service's CSR with the infrastructure CA: a TLS server certificate with kmi://service/<name> (operator)",
    details: "example:\n  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout audit.key -subj /CN=audit -out audit.csr\n  kmi ctl service-cert issue --name audit --csr audit.csr --dns audit.internal --out audit.pem --ca-out infra-ca.pem",
    flags: {
      ...kdcConnectionFlags,
      name: { type: "string", value: "NAME", help: "service name, e.g. audit", required: true },
      csr: { type: "string", value: "FILE", help: "PKCS#10 CSR, PEM", required: true },
      dns: { type: "list", value: "NAME", help: "DNS name for the certificate" },
      ip: { type: "list", value: "ADDR", help: "IP address for the certificate" },
      "validity-days": { type: "int", value: "DAYS", help: "1 to 825 (default 90)" },
      out: { type: "string", value: "FILE", help: "write the certificate to FILE (default stdout)" },
      "ca-out": { type: "string", value: "FILE", help: "also write the infrastructure CA certificate to FILE" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await kdc(ctx).admin.issueServiceCertificate({
        serviceName: ctx.args.need("name"),
        csrPem: Buffer.from(ctx.readFile("csr", ctx.args.need("csr"))).toString("utf8"),
        dnsNames: ctx.args.list("dns"),
        ipAddresses: ctx.args.list("ip"),
        validityDays: ctx.args.int("validity-days"),
      });
      const out = ctx.args.str("out");
      const caOut = ctx.args.str("ca-out");
      if (out !== undefined) {
        ctx.writeFile(out, res.certificatePem, 0o644);
        ctx.out.note(`wrote the certificate to ${out}`);
      }
      if (caOut !== undefined) {
        ctx.writeFile(caOut, res.caPem, 0o644);
        ctx.out.note(`wrote the infrastructure CA to ${caOut}`);
      }
      if (ctx.out.json) ctx.out.result(json(IssueServiceCertificateResponseSchema, res), () => "");
      else if (out === undefined) ctx.out.raw(res.certificatePem);
    },
  },
];

/** Every KDC command of `kmi ctl`. */
export const kdcCommands: readonly Command[] = [...tenantCommands, ...tokenCommands, ...caCommands, policyCommand, ...signingKeyCommands, ...auditLogCommands, ...otherCommands];
