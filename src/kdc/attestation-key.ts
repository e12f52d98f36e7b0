/**
 * Where the KDC gets the Auditserver's attestation-token public key: a PEM file
 * (`--attestation-key-file`), or AuditService.GetAttestationKey at `--audit-url`, fetched in the
 * background with backoff until it answers. Until a key is loaded every distribution call is
 * UNAVAILABLE with a message that names the Auditserver.
 */
import type { KeyObject } from "node:crypto";
import { readFile } from "node:fs/promises";
import { attestationKeyId, toP256PublicKey } from "../attest/index.js";
import { FailedPrecondition, Unavailable } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { backoffMs, sleep } from "../common/backoff.js";
import type { AttestationKeyProvider } from "./context.js";

/** No key configured at all: every distribution call says how to configure one. */
export class NoAttestationKey implements AttestationKeyProvider {
  readonly loaded = false;
  current(): KeyObject {
    throw new Unavailable("attestation key not configured; start the KDC with --audit-url (to fetch it from the Auditserver) or --attestation-key-file");
  }
  keyMismatch(): void {}
}

/** A key read from a PEM file at start. */
export class FileAttestationKey implements AttestationKeyProvider {
  readonly loaded = true;
  private constructor(
    private readonly key: KeyObject,
    /** The key id (`kid` of the tokens it signs). */
    readonly keyId: string,
  ) {}

  /** Reads and checks the file (an ECDSA P-256 public key, PEM). */
  static async load(path: string): Promise<FileAttestationKey> {
    let pem: string;
    try {
      pem = await readFile(path, "utf8");
    } catch (err) {
      throw new FailedPrecondition(`--attestation-key-file: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? "error"}); give the Auditserver's attestation-key.pem`);
    }
    const key = toP256PublicKey(pem, "--attestation-key-file");
    return new FileAttestationKey(key, attestationKeyId(key));
  }

  current(): KeyObject {
    return this.key;
  }
  keyMismatch(): void {}
}

/** What a fetch returns (AuditService.GetAttestationKey). */
export interface FetchedKey {
  publicKeyPem: string;
  keyId: string;
}

/** Options of the fetching provider. */
export interface FetchedAttestationKeyOptions {
  /** Calls GetAttestationKey. */
  fetch: (signal: AbortSignal) => Promise<FetchedKey>;
  /** The Auditserver's URL, for messages. */
  url: string;
  logger: Logger;
  /** First retry delay, ms (default 500). */
  initialBackoffMs?: number;
  /** Longest retry delay, ms (default 30 000). */
  maxBackoffMs?: number;
  /** A refetch after a token with an unknown key id happens at most this often, ms (default 30 000). */
  refetchIntervalMs?: number;
}

/** A key fetched from the Auditserver, retried in the background until it is loaded. */
export class FetchedAttestationKey implements AttestationKeyProvider {
  private key: KeyObject | undefined;
  private keyIdValue = "";
  private readonly stop = new AbortController();
  private running: Promise<void> | undefined;
  private lastFetch = 0;

  constructor(private readonly o: FetchedAttestationKeyOptions) {}

  get loaded(): boolean {
    return this.key !== undefined;
  }

  /** The loaded key's id ("" before). */
  get keyId(): string {
    return this.keyIdValue;
  }

  /** Starts fetching in the background (retries until it succeeds). */
  start(): void {
    this.running ??= this.loop().finally(() => (this.running = undefined));
  }

  /** Stops retrying. */
  async close(): Promise<void> {
    this.stop.abort();
    await this.running;
  }

  current(): KeyObject {
    if (this.key === undefined) throw new Unavailable(`attestation key not loaded yet; is the Auditserver at ${this.o.url} up?`);
    return this.key;
  }

  keyMismatch(): void {
    // The Auditserver may have a new key; the current one stays in use until another arrives.
    if (this.running === undefined && Date.now() - this.lastFetch >= (this.o.refetchIntervalMs ?? 30_000)) this.start();
  }

  private async loop(): Promise<void> {
    let failures = 0;
    while (!this.stop.signal.aborted) {
      this.lastFetch = Date.now();
      try {
        const res = await this.o.fetch(this.stop.signal);
        const key = toP256PublicKey(res.publicKeyPem, "GetAttestationKey public_key_pem");
        const id = attestationKeyId(key);
        if (res.keyId !== "" && res.keyId !== id) throw new Error(`GetAttestationKey: key_id ${res.keyId} is not the key's thumbprint ${id}`);
        const changed = id !== this.keyIdValue;
        this.key = key;
        this.keyIdValue = id;
        if (changed) this.o.logger.info("attestation key loaded", { audit: this.o.url, key_id: id });
        return;
      } catch (err) {
        if (this.stop.signal.aborted) return;
        failures++;
        const delay = backoffMs(failures, this.o.initialBackoffMs ?? 500, this.o.maxBackoffMs ?? 30_000);
        this.o.logger.warn("cannot fetch the attestation key; retrying", { audit: this.o.url, error: err instanceof Error ? err.message : String(err), retry_in_ms: delay, attempt: failures });
        // A key that was loaded before stays in use (a refetch after an unknown kid failed).
        await sleep(delay, this.stop.signal);
      }
    }
  }
}
