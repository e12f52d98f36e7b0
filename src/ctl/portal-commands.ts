/**
 * `kmi ctl portal ...`: one-time login links for the web portal the KDC serves, and the
 * operator's view of portal sessions (list, revoke).
 */
import { toJson } from "@bufbuild/protobuf";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { Role } from "../gen/kmi/kdc/v1/admin_pb.js";
import { CreateLoginLinkResponseSchema, ListSessionsResponseSchema, PortalService, type Session } from "../gen/kmi/kdc/v1/portal_pb.js";
import { DEFAULT_KDC_URL, kdcConnectionFlags } from "./client.js";
import type { Command, CommandContext } from "./command.js";
import { UsageError } from "./output.js";

function portal(ctx: CommandContext) {
  return ctx.clients("kdc", DEFAULT_KDC_URL).get(PortalService);
}

function time(t: Timestamp | undefined): string {
  return t === undefined ? "" : timestampDate(t).toISOString().replace(/\.\d{3}Z$/, "Z");
}

/**
 * The link a browser opens: the portal at the KDC's URL, the code in the fragment (a fragment
 * never reaches a server's request log; the page exchanges it for a session and removes it).
 */
export function loginLink(kdcUrl: string, code: string): string {
  return `${new URL(kdcUrl).origin}/#login=${code}`;
}

/** The portal's commands. */
export const portalCommands: Command[] = [
  {
    name: ["portal", "login-link"],
    summary: "print a one-time link that signs a new tenant admin (--tenant) or operator (--operator) in to the portal (operator)",
    details:
      "The link works once, for --ttl seconds (default 900). Opening it gives a portal session of 8 hours; the\n" +
      "link's code is then gone from the address bar. Send it over a channel you trust: it is a credential until used.",
    flags: {
      ...kdcConnectionFlags,
      tenant: { type: "string", value: "ID", help: "the tenant the new session administers" },
      operator: { type: "bool", help: "an operator session instead" },
      ttl: { type: "int", value: "SECONDS", help: "how long the link works, 60 to 86400 (default 900)" },
    },
    async run(ctx) {
      ctx.args.noPositionals();
      const tenant = ctx.args.str("tenant");
      const operator = ctx.args.bool("operator");
      if ((tenant === undefined) === !operator) throw new UsageError("give exactly one of --tenant ID and --operator");
      const res = await portal(ctx).createLoginLink({ tenantId: tenant ?? "", operator, ttlSeconds: ctx.args.int("ttl", 0) });
      const url = loginLink(ctx.args.str("kdc") ?? DEFAULT_KDC_URL, res.code);
      ctx.out.result({ ...(toJson(CreateLoginLinkResponseSchema, res) as object), url }, () => `${url}\n(one use, until ${time(res.expiresAt)})\n`);
    },
  },
  {
    name: ["portal", "sessions"],
    summary: "list portal sessions that have not ended (operator)",
    flags: { ...kdcConnectionFlags },
    async run(ctx) {
      ctx.args.noPositionals();
      const res = await portal(ctx).listSessions({});
      ctx.out.table<Session>(
        [
          { header: "session id", value: (s) => s.sessionId },
          { header: "role", value: (s) => (s.role === Role.OPERATOR ? "operator" : "tenant-admin") },
          { header: "tenant", value: (s) => s.tenantId },
          { header: "source", value: (s) => s.source },
          { header: "created", value: (s) => time(s.createdAt) },
          { header: "expires", value: (s) => time(s.expiresAt) },
        ],
        res.sessions,
        toJson(ListSessionsResponseSchema, res),
      );
    },
  },
  {
    name: ["portal", "revoke-session"],
    summary: "end a portal session by id; its cookie stops working at once (operator)",
    args: "SESSION_ID",
    flags: { ...kdcConnectionFlags },
    async run(ctx) {
      const id = ctx.args.positional("SESSION_ID");
      await portal(ctx).revokeSession({ sessionId: id });
      ctx.out.result({ sessionId: id, revoked: true }, () => `revoked session ${id}\n`);
    },
  },
];
