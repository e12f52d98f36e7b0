/**
 * The one place that sets pkijs's crypto engine: WebCrypto from node:crypto.
 *
 * kmi signs and verifies with node:crypto directly and uses pkijs only for ASN.1 structures,
 * but pkijs reaches for its engine in a few helpers; pinning it here means no pkijs code path
 * ever depends on whatever `globalThis.crypto` a host happens to provide. Every src/pki module
 * that uses pkijs imports this file first (for its side effect) so the order never matters.
 */
import { webcrypto } from "node:crypto";
import * as pkijs from "pkijs";

const ENGINE_NAME = "kmi-node-webcrypto";

/** Installs node:crypto's WebCrypto as pkijs's engine; idempotent. */
export function ensurePkijsEngine(): void {
  let current: string | undefined;
  try {
    current = pkijs.getEngine().name;
  } catch {
    current = undefined; // pkijs throws until an engine is set
  }
  if (current === ENGINE_NAME) return;
  // pkijs types its parameter as the DOM `Crypto`; node's webcrypto is that interface.
  const crypto = webcrypto as unknown as ConstructorParameters<typeof pkijs.CryptoEngine>[0]["crypto"];
  pkijs.setEngine(ENGINE_NAME, new pkijs.CryptoEngine({ name: ENGINE_NAME, crypto }));
}

ensurePkijsEngine();
