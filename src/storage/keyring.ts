/**
 * A server's master keyring: the key its store is sealed under and, while a rotation
 * (`kmi kdc rekey`, `kmi audit rekey`, ./rekey.ts) is under way, the next one.
 *
 * | file               | holds                                         | when                         |
 * |--------------------|-----------------------------------------------|------------------------------|
 * | `master.key`       | the primary key (what `init` made, or the last rotation's) | always              |
 * | `master.key.next`  | the next key, 0600, made by the rekey         | from a rekey's start to its end |
 *
 * (`master.key` is `--master-key-file` when given; `.next` sits beside it.) Every envelope names
 * the key that sealed it (`SealedBlob.master_key_id`), so a store half rewrapped opens with the
 * two keys. New records are sealed under the next key when there is one. The rekey ends by
 * renaming `master.key.next` over `master.key`: the old key is gone from the disk.
 *
 * A server that runs through a rotation made by another process (`kmi kdc rekey` beside a
 * replica) seals under the next key once it met a record under it (the rekey proper has
 * started; `rekey --prepare` only makes the file, for other hosts to copy first), and looks at
 * `master.key` before each seal (a stat; read again only when it changed), so that it never
 * seals under the old key once the rotation has ended, even if it opened nothing meanwhile.
 */
import { existsSync, statSync } from "node:fs";
import { SealError, masterKeyId, open, seal } from "./seal.js";
import { loadServerMasterKey, readMasterKeyFile, readMasterKeyFileSync, type MasterKeyOptions } from "./master-key.js";
import type { MasterKeyWrap } from "./wrapped-key.js";
import { pathExists } from "../common/fs.js";
import type { SealedBlob } from "../gen/kmi/store/v1/envelope_pb.js";

/** The file of the next master key while a rotation runs: `<key file>.next`. */
export function nextKeyFile(keyFile: string): string {
  return `${keyFile}.next`;
}

/** The master keys a server holds: it seals under the newest, and opens under any it knows. */
export class MasterKeyring {
  readonly #keys = new Map<string, Buffer>();
  readonly #primaryId: string;
  #sealingId: string;
  /** What the key file looked like when last read (see #followKeyFile). */
  #seenKeyFile = "";

  /**
   * `primary` is the key in the key file (or the environment); `next` the rotation's new key,
   * if one is under way. `keyFile` (absent for a key from the environment) is where a next key
   * a rekey makes later is looked for, the first time a record names a key this ring lacks
   * (unwrapped by `wrap`'s token when that file is a wrapped key).
   */
  constructor(
    primary: Uint8Array,
    next?: Uint8Array,
    readonly keyFile?: string,
    private readonly wrap?: MasterKeyWrap,
  ) {
    this.#primaryId = this.#add(primary);
    this.#sealingId = next !== undefined ? this.#add(next) : this.#primaryId;
  }

  /** The id of the primary key (`master.key`). */
  get primaryId(): string {
    return this.#primaryId;
  }

  /** The id of the key new records are sealed under: the next key during a rotation, else the primary. */
  get sealingId(): string {
    return this.#sealingId;
  }

  /** The id of the next key, when a rotation is under way. */
  get nextId(): string | undefined {
    return this.#sealingId === this.#primaryId ? undefined : this.#sealingId;
  }

  /** Seals `plaintext` for the record `aad` under the sealing key (storage/seal.ts). */
  seal(plaintext: Uint8Array, aad: string): SealedBlob {
    this.#followKeyFile();
    return seal(this.#keys.get(this.#sealingId)!, plaintext, aad);
  }

  /**
   * Opens `blob` with the key it names. An envelope without a key id is the primary key's. A
   * key this ring lacks is looked for in the key files once more (a rekey may have made it since
   * this server started); else `SealError` "wrong_key" naming both ids.
   */
  open(blob: SealedBlob, aad: string): Uint8Array {
    const id = blob.masterKeyId === "" ? this.#primaryId : blob.masterKeyId;
    const key = this.#keys.get(id) ?? this.#learn(id);
    if (key === undefined) {
      throw new SealError("wrong_key", `sealed blob ${aad}: sealed under master key ${id}, which this server does not hold (it holds ${[...this.#keys.keys()].join(", ")}); load the master key this store was made with`);
    }
    return open(key, blob, aad);
  }

  /** Runs `fn` with the primary key's bytes (to derive keys from it); do not keep them. */
  withPrimaryKey<T>(fn: (key: Uint8Array) => T): T {
    return fn(this.#keys.get(this.#primaryId)!);
  }

  /** Zeroes every key; the ring is unusable afterwards. */
  wipe(): void {
    for (const key of this.#keys.values()) key.fill(0);
  }

  #add(key: Uint8Array): string {
    const id = masterKeyId(key);
    if (!this.#keys.has(id)) this.#keys.set(id, Buffer.from(key));
    return id;
  }

  /**
   * Seals under the key in `master.key` once it changed to one this ring did not seal under:
   * the rotation's key after the rekey renamed `master.key.next` over it. A changed file that
   * cannot be read fails the seal (not naming the file: the message may reach a caller).
   */
  #followKeyFile(): void {
    if (this.keyFile === undefined) return;
    let stamp: string;
    try {
      const st = statSync(this.keyFile);
      stamp = `${st.ino}:${st.size}:${st.mtimeMs}`;
    } catch {
      return; // a key file moved away meanwhile: keep what this ring holds
    }
    if (stamp === this.#seenKeyFile) return;
    let key: Buffer;
    try {
      key = readMasterKeyFileSync(this.keyFile, this.wrap);
    } catch (err) {
      throw new SealError("unreadable", `the master key file changed and cannot be read (${(err as NodeJS.ErrnoException).code ?? "invalid"}); restore it (mode 0600, the server's owner)`);
    }
    try {
      const id = this.#add(key);
      if (id !== this.#primaryId) this.#sealingId = id;
      this.#seenKeyFile = stamp;
    } finally {
      key.fill(0);
    }
  }

  // The next key file while the rekey runs, the key file itself once it has ended (renamed).
  #learn(id: string): Buffer | undefined {
    if (this.keyFile === undefined) return undefined;
    for (const file of [nextKeyFile(this.keyFile), this.keyFile]) {
      if (!existsSync(file)) continue;
      const key = readMasterKeyFileSync(file, this.wrap);
      try {
        if (masterKeyId(key) !== id) continue;
        this.#sealingId = this.#add(key);
        return this.#keys.get(id);
      } finally {
        key.fill(0);
      }
    }
    return undefined;
  }
}

/**
 * Loads a server's keyring: the master key (`opts.masterKey`, else the key file) and, when the
 * key comes from a file, the next key beside it if a rotation is under way.
 */
export async function loadMasterKeyring(opts: MasterKeyOptions, envName: string, defaultFile: string): Promise<MasterKeyring> {
  const primary = await loadServerMasterKey(opts, envName, defaultFile);
  const fromEnv = opts.masterKey !== undefined && opts.masterKey !== "";
  const keyFile = fromEnv ? undefined : (opts.masterKeyFile ?? defaultFile);
  const next = keyFile !== undefined && (await pathExists(nextKeyFile(keyFile))) ? await readMasterKeyFile(nextKeyFile(keyFile), opts.wrap) : undefined;
  try {
    return new MasterKeyring(primary, next, keyFile, opts.wrap);
  } finally {
    primary.fill(0);
    next?.fill(0);
  }
}
