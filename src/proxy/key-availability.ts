/**
 * What the proxy knows, from the agent's WatchKeys stream, about whether a tenant's
 * connections can be intercepted at all: the machine is quarantined, the tenant's active
 * intermediate was revoked or its lease ran out, or the agent holds none for it. A CONNECT of
 * such a tenant is then answered 503 on the CONNECT itself, with the reason, instead of a page
 * under the untrusted kmi-blocked CA after the 200 (which a client reports as broken trust).
 *
 * Known only while the watch stream is up: with the stream down (agent restarting) nothing is
 * refused here and issuance is tried as before; the next SNAPSHOT sets the state again.
 */
import { KeyEventType, KeyState, type KeyInfo, type WatchKeysResponse } from "../gen/kmi/agent/v1/agent_pb.js";
import { KeyPurpose } from "../gen/kmi/common/v1/common_pb.js";

/** Why a tenant's connections cannot be intercepted: the access log rule and a sentence. */
export interface KeyRefusal {
  /** `quarantined`, `tenant-revoked`, `no-key`. */
  readonly rule: string;
  /** What happened and what fixes it. */
  readonly reason: string;
}

const isIntermediate = (k: KeyInfo): boolean => k.purpose === KeyPurpose.INTERMEDIATE_CA;

/** The tenants' key state as the agent's events tell it. */
export class KeyAvailability {
  private connected = false;
  /** Tenant → key id of its active intermediate, from the last snapshot and later events; undefined before the first snapshot. */
  private active: Map<string, string> | undefined;
  /** Tenants whose active intermediate went away, and why. */
  private readonly gone = new Map<string, KeyRefusal>();
  private quarantine: string | undefined;

  /** The watch stream went up or down. */
  onWatchState(connected: boolean): void {
    this.connected = connected;
  }

  /** Applies one WatchKeys message. */
  onEvent(e: WatchKeysResponse): void {
    switch (e.type) {
      case KeyEventType.SNAPSHOT:
        this.connected = true;
        this.quarantine = e.reason !== "" && /quarantine/i.test(e.reason) ? e.reason : undefined;
        this.active = new Map();
        for (const k of e.keys) if (isIntermediate(k) && k.state === KeyState.ACTIVE) this.active.set(k.tenantId, k.keyId);
        for (const t of this.active.keys()) this.gone.delete(t);
        break;
      case KeyEventType.ROTATED:
      case KeyEventType.ADDED:
        for (const k of e.keys) {
          if (!isIntermediate(k)) continue;
          // Keys come back after a release: the quarantine is over.
          this.quarantine = undefined;
          this.active?.set(k.tenantId, k.keyId);
          this.gone.delete(k.tenantId);
        }
        break;
      case KeyEventType.REVOKED:
      case KeyEventType.LEASE_EXPIRED:
        for (const k of e.keys) {
          if (!isIntermediate(k) || this.active?.get(k.tenantId) !== k.keyId) continue;
          this.active.delete(k.tenantId);
          this.gone.set(k.tenantId, droppedRefusal(e, k.tenantId));
        }
        break;
      case KeyEventType.QUARANTINED:
        this.quarantine = e.reason === "" ? "quarantined" : e.reason;
        this.active?.clear();
        break;
      default:
        break;
    }
  }

  /** Why `tenant`'s connections cannot be intercepted now; undefined when they may be (or nothing is known). */
  refusal(tenant: string): KeyRefusal | undefined {
    if (!this.connected || this.active === undefined) return undefined;
    if (this.quarantine !== undefined) {
      return {
        rule: "quarantined",
        reason: `this proxy machine is quarantined (${this.quarantine}); its key agent holds no keys until an operator releases it (kmi ctl machine release)`,
      };
    }
    if (this.active.has(tenant)) return undefined;
    return (
      this.gone.get(tenant) ?? {
        rule: "no-key",
        reason: `the key agent holds no active intermediate for tenant "${tenant}"; activate one (kmi ctl ca rotate --tenant ${tenant} --activate)`,
      }
    );
  }
}

function droppedRefusal(e: WatchKeysResponse, tenant: string): KeyRefusal {
  if (e.type === KeyEventType.LEASE_EXPIRED) {
    return { rule: "no-key", reason: `the key agent's lease on tenant "${tenant}"'s intermediate ran out while the KDC is unreachable` };
  }
  const why = e.reason === "" ? "" : ` (${e.reason})`;
  return { rule: "tenant-revoked", reason: `the intermediate of tenant "${tenant}" was revoked${why}; wait for a new version to be activated` };
}
