/**
 * The one place that reaches into node:tls's SecureContext to replace its session ticket keys:
 * Node has `tls.Server.setTicketKeys()`, but the proxy terminates TLS with contexts of its own
 * (one per leaf, see ./leaf-minter.ts), and `tls.Server.setTicketKeys` does exactly this on the
 * server's context (`this._sharedCreds.context.setTicketKeys(keys)`). Rotating a tenant's ticket
 * keys this way keeps its leaves' contexts (no re-mint). test/unit/proxy/secure-context-ticket-keys.test.ts
 * fails when Node changes it.
 */
import type { SecureContext } from "node:tls";

/** Replaces the 48-byte session ticket keys of `context` (tickets under the old keys no longer resume). */
export function setTicketKeys(context: SecureContext, keys: Buffer): void {
  if (keys.length !== 48) throw new Error("ticket keys: must be 48 bytes");
  (context as SecureContext & { context: { setTicketKeys(k: Buffer): void } }).context.setTicketKeys(keys);
}
