/**
 * The one pipeline of every KDC handler: authenticate -> parse into a validated domain type
 * -> authorize -> act -> map to proto. A refused change (bad input, wrong caller, a state
 * that forbids it) is written to the audit log with who, what, target and the code; so is a
 * refused read when the caller was not allowed (PERMISSION_DENIED), since that is a probe.
 */
import type { HandlerContext } from "@connectrpc/connect";
import { isKmiError, Unauthenticated } from "../common/errors.js";
import { recordRefusal, refusalMessage } from "../common/refusal-audit.js";
import { kPeer, kPeerAddress, peerSource } from "../common/rpc.js";
import { actorOf, authenticateToken, authorize, callerFromPeer, type Caller, type Requirement } from "./authz.js";
import type { KdcContext } from "./context.js";
import { authenticateMachine } from "./machine-auth.js";
import { authenticateSession } from "./portal-session.js";
import { neutralizeControlChars } from "../common/control-chars.js";

/**
 * How a call authenticates its caller: a bearer token, a kmi service's mutual-TLS certificate,
 * a machine's mutual-TLS certificate plus its attestation token (`Call.attestationToken`), or
 * nothing.
 */
export type AuthMode = "token" | "peer" | "machine" | "none";

/** One handler, described step by step. */
export interface Call<Req, In, Out> {
  /** Audit action of a change ("ca.version.activate"); absent for reads. */
  action?: string;
  /** Audit target, taken from the raw request (it may not have validated). */
  target: (req: Req) => string;
  /** How the caller proves who it is. */
  auth: AuthMode;
  /** For `auth: "machine"`: the attestation token in the request. */
  attestationToken?: (req: Req) => string;
  /** Request -> validated input (throws InvalidArgument naming the field). */
  parse: (req: Req) => In;
  /** What the caller must be for this input. */
  need: (input: In) => Requirement;
  /** The operation; returns the response message. */
  act: (caller: Caller, input: In) => Promise<Out>;
}

const MAX_TARGET = 200;

function clean(s: string): string {
  // eslint-disable-next-line no-control-regex
  const t = neutralizeControlChars(s);
  return t.length > MAX_TARGET ? t.slice(0, MAX_TARGET) + "..." : t;
}

/**
 * The caller of a call made with a bearer token or, without one, a portal session cookie
 * (CSRF-checked; it stands for the same caller).
 */
export async function authenticateTokenOrSession(ctx: KdcContext, hctx: HandlerContext): Promise<Caller & { kind: "token" }> {
  const authorization = hctx.requestHeader.get("authorization");
  const session = authorization === null ? await authenticateSession(hctx, ctx.store, ctx.clock.now()) : undefined;
  return session ?? authenticateToken(authorization, ctx.store, ctx.clock.now());
}

async function authenticate(ctx: KdcContext, hctx: HandlerContext, mode: AuthMode, token: string): Promise<Caller> {
  switch (mode) {
    case "machine":
      return authenticateMachine(ctx, hctx.values.get(kPeer), token);
    case "none":
      return { kind: "anonymous" };
    case "token":
      return authenticateTokenOrSession(ctx, hctx);
    case "peer": {
      const peer = hctx.values.get(kPeer);
      if (peer === undefined || !peer.authorized) {
        throw new Unauthenticated(
          peer === undefined
            ? "client certificate required: connect with a kmi://service/<name> certificate from the KDC's infrastructure CA (`kmi ctl service-cert issue`)"
            : `client certificate not trusted (${peer.authorizationError ?? "unknown reason"}); use one issued by the KDC's infrastructure CA`,
        );
      }
      return callerFromPeer(peer);
    }
  }
}

/** Runs one call through the pipeline. */
export async function handle<Req, In, Out>(ctx: KdcContext, hctx: HandlerContext, req: Req, call: Call<Req, In, Out>): Promise<Out> {
  let caller: Caller = { kind: "anonymous" };
  const token = call.attestationToken === undefined ? "" : safeString(() => call.attestationToken!(req));
  try {
    caller = await authenticate(ctx, hctx, call.auth, token);
    const input = call.parse(req);
    authorize(caller, call.need(input));
    return await call.act(caller, input);
  } catch (err) {
    if (call.action !== undefined || (isKmiError(err) && err.code === "permission_denied")) {
      const details: Record<string, string> = { error: clean(refusalMessage(err)) };
      if (call.auth === "machine") {
        const peer = hctx.values.get(kPeer);
        if (peer !== undefined) details["peer_cert_sha256"] = peer.fingerprint256;
        // The token is a bearer credential for its lifetime: only its keyed hash is logged.
        details["attestation_token"] = token === "" ? "none" : ctx.sealer.keyedHash(token);
      }
      const who = refusalActor(caller, call.auth, hctx);
      await recordRefusal(ctx.audit, ctx.logger, {
        actor: actorOf(who),
        action: call.action ?? `${hctx.method.parent.name}.${hctx.method.name}`,
        target: clean(safeTarget(call, req)),
        details,
        // A caller that proved nothing writes within a budget per address (a flood must not fill the disk).
        source: who.kind === "anonymous" ? peerSource(hctx.values.get(kPeerAddress)) : undefined,
      }, err);
    }
    throw err;
  }
}

/**
 * Who a refused call came from. A machine whose certificate verified but whose token did not is
 * still named by its certificate (the refusal is about that machine).
 */
function refusalActor(caller: Caller, mode: AuthMode, hctx: HandlerContext): Caller {
  if (caller.kind !== "anonymous" || mode !== "machine") return caller;
  const peer = hctx.values.get(kPeer);
  return peer?.authorized === true && peer.machineId !== undefined ? { kind: "machine", machineId: peer.machineId } : caller;
}

function safeString(fn: () => string): string {
  try {
    return fn();
  } catch {
    return "";
  }
}

function safeTarget<Req>(call: { target: (req: Req) => string }, req: Req): string {
  try {
    return call.target(req);
  } catch {
    return "";
  }
}
