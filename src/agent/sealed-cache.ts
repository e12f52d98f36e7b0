/**
 * The sealed cache (`cache.pb` in the state dir): the secrets the agent holds, sealed with
 * the agent's sealing key (storage/seal.ts, AES-256-GCM envelope), rewritten atomically after
 * every change, so that a restarted agent serves at once while the KDC is unreachable, until
 * each lease runs out. A key whose lease ran out is kept without its private key, so the
 * agent answers UNAVAILABLE for it rather than NOT_FOUND.
 */
import { createPrivateKey } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { Logger } from "../common/logger.js";
import {
  AgentCachedSecretSchema,
  AgentCachedSecretsSchema,
  AgentCacheRecordSchema,
} from "../gen/kmi/store/v1/agent_pb.js";
import { open, seal } from "../storage/seal.js";
import type { HeldKey, KeyHolder, SecretInput } from "./key-holder.js";
import { STATE_FILES, type StateDir } from "./state-dir.js";

/** Format version of the cache records written by this version. */
export const CACHE_RECORD_VERSION = 1;

/** What the cache holds, read back. */
export interface CacheContents {
  secrets: SecretInput[];
  /** Staged intermediates, held beside the active ones. */
  staged: SecretInput[];
  quarantine: { reason: string; time: number } | undefined;
  lastSync: number | undefined;
  writtenAt: number;
}

/** The AAD of the sealed secrets, bound to the machine. */
function cacheAad(machineId: string): string {
  return `agent/cache/${machineId}`;
}

/** Reads and writes the sealed cache of one machine. */
export class SealedCache {
  private chain: Promise<void> = Promise.resolve();

  constructor(
    private readonly dir: StateDir,
    private readonly sealingKey: Uint8Array,
    private readonly machineId: string,
    private readonly logger: Logger,
  ) {}

  /**
   * Reads the cache; undefined when there is none, or when it cannot be used (another
   * machine's, another sealing key's, tampered, newer format): then the agent starts empty
   * and says why in the log.
   */
  async load(): Promise<CacheContents | undefined> {
    const bytes = await this.dir.read(STATE_FILES.cache);
    if (bytes === undefined) return undefined;
    try {
      const record = fromBinary(AgentCacheRecordSchema, bytes);
      if (record.recordVersion > CACHE_RECORD_VERSION) {
        this.logger.warn("sealed cache ignored: written by a newer agent", { record_version: record.recordVersion });
        return undefined;
      }
      if (record.machineId !== this.machineId) {
        this.logger.warn("sealed cache ignored: it belongs to another machine", { cache_machine: record.machineId });
        return undefined;
      }
      const secrets: SecretInput[] = [];
      const staged: SecretInput[] = [];
      if (record.secrets !== undefined) {
        const plain = open(this.sealingKey, record.secrets, cacheAad(this.machineId));
        try {
          const list = fromBinary(AgentCachedSecretsSchema, plain);
          for (const s of [...list.secrets, ...list.staged]) {
            (list.staged.includes(s) ? staged : secrets).push({
              tenantId: s.tenantId,
              purpose: s.purpose,
              keyId: s.keyId,
              version: s.version,
              name: s.name,
              keyAlgorithm: s.keyAlgorithm,
              chainPem: s.chainPem,
              publicKeyPem: s.publicKeyPem,
              privateKey: s.privateKeyPkcs8.length === 0 ? undefined : createPrivateKey({ key: Buffer.from(s.privateKeyPkcs8), format: "der", type: "pkcs8" }),
              kdcSigns: s.kdcSigns,
              leaseExpiresAt: s.leaseExpiresAt === undefined ? 0 : timestampMs(s.leaseExpiresAt),
              receivedAt: s.receivedAt === undefined ? 0 : timestampMs(s.receivedAt),
            });
            s.privateKeyPkcs8.fill(0);
          }
        } finally {
          plain.fill(0);
        }
      }
      return {
        secrets,
        staged,
        quarantine: record.quarantined ? { reason: record.quarantineReason, time: record.writtenAt === undefined ? 0 : timestampMs(record.writtenAt) } : undefined,
        lastSync: record.lastSync === undefined ? undefined : timestampMs(record.lastSync),
        writtenAt: record.writtenAt === undefined ? 0 : timestampMs(record.writtenAt),
      };
    } catch (err) {
      this.logger.warn("sealed cache ignored: it does not open", { error: err instanceof Error ? err.message : String(err) });
      return undefined;
    }
  }

  /**
   * Writes what the holder holds now. Writes are serialized: each one snapshots the holder
   * when its turn comes, so the last write always reflects the latest state.
   */
  write(holder: KeyHolder, now: number, lastSync: number | undefined): Promise<void> {
    const next = this.chain.then(() => this.writeNow(holder, now, lastSync));
    this.chain = next.catch(() => undefined);
    return next;
  }

  private async writeNow(holder: KeyHolder, now: number, lastSync: number | undefined): Promise<void> {
    const keys = holder.keys();
    const staged = holder.stagedKeys();
    const quarantined = holder.quarantineReason !== undefined;
    let sealed;
    if (keys.length + staged.length > 0) {
      const cached = keys.map(toCached);
      const cachedStaged = staged.map(toCached);
      const plain = toBinary(AgentCachedSecretsSchema, create(AgentCachedSecretsSchema, { recordVersion: CACHE_RECORD_VERSION, secrets: cached, staged: cachedStaged }));
      try {
        sealed = seal(this.sealingKey, plain, cacheAad(this.machineId));
      } finally {
        // Best effort: the plaintext copies of the keys should not outlive the write.
        plain.fill(0);
        for (const c of [...cached, ...cachedStaged]) c.privateKeyPkcs8.fill(0);
      }
    }
    const record = create(AgentCacheRecordSchema, {
      recordVersion: CACHE_RECORD_VERSION,
      machineId: this.machineId,
      writtenAt: timestampFromMs(now),
      lastSync: lastSync === undefined ? undefined : timestampFromMs(lastSync),
      quarantined,
      quarantineReason: holder.quarantineReason ?? "",
      secrets: sealed,
    });
    await this.dir.write(STATE_FILES.cache, toBinary(AgentCacheRecordSchema, record));
  }
}

function toCached(k: HeldKey) {
  return create(AgentCachedSecretSchema, {
    tenantId: k.tenantId,
    purpose: k.purpose,
    keyId: k.keyId,
    version: k.version,
    name: k.name,
    keyAlgorithm: k.keyAlgorithm,
    chainPem: k.chainPem,
    publicKeyPem: k.publicKeyPem,
    privateKeyPkcs8: k.privateKey === undefined ? new Uint8Array(0) : k.privateKey.export({ format: "der", type: "pkcs8" }),
    kdcSigns: k.kdcSigns === true,
    leaseExpiresAt: timestampFromMs(k.leaseExpiresAt),
    receivedAt: timestampFromMs(k.receivedAt),
  });
}
