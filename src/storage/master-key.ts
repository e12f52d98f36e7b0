/**
 * The master key: 32 random bytes that wrap every data key of the store (./seal.ts). It comes
 * from an environment value (base64, passed in by config.ts) or from a key file that only its
 * owner can read: the key itself, or the key wrapped by a PKCS#11 token's AES key
 * (./wrapped-key.ts; then the token is needed to read it).
 */
import { closeSync, constants, fstatSync, openSync, readFileSync, type Stats } from "node:fs";
import { link, open as openFile, unlink } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { randomBytes } from "node:crypto";
import { AlreadyExists, FailedPrecondition, InvalidArgument } from "../common/errors.js";
import { pathExists } from "../common/fs.js";
import { KEY_BYTES, masterKeyId } from "./seal.js";
import { describeWrappedKey, isWrappedKeyFile, unwrapMasterKey, wrapMasterKey, type MasterKeyWrap } from "./wrapped-key.js";

export { masterKeyId } from "./seal.js";

/** Where `loadMasterKey` takes the key from; exactly one of the two must be set. */
export interface MasterKeySource {
  /** The key as base64 (e.g. the value of KMI_KDC_MASTER_KEY), or undefined/empty. */
  env?: string | undefined;
  /** Name of the environment variable, for messages (default "the master key variable"). */
  envName?: string;
  /** Path of the key file, or undefined/empty. */
  file?: string | undefined;
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;
const BASE64URL = /^[A-Za-z0-9_-]*={0,2}$/;

/**
 * Decodes a base64 (or base64url) master key and checks it is 32 bytes. `what` names the
 * source in messages. Never echoes the value.
 */
export function parseMasterKey(text: string, what: string): Buffer {
  const trimmed = text.trim();
  if (trimmed.length === 0) throw new InvalidArgument(`${what}: empty; it must hold a base64 32-byte key`);
  const isUrl = !BASE64.test(trimmed) && BASE64URL.test(trimmed);
  if (!BASE64.test(trimmed) && !isUrl) {
    throw new InvalidArgument(`${what}: not base64; make a key with \`openssl rand -base64 32\``);
  }
  const key = Buffer.from(trimmed, isUrl ? "base64url" : "base64");
  if (key.length !== KEY_BYTES) {
    const got = key.length;
    key.fill(0);
    throw new InvalidArgument(`${what}: decodes to ${got} bytes, a master key is ${KEY_BYTES}; make one with \`openssl rand -base64 32\``);
  }
  return key;
}

/**
 * Loads the master key from `source.env` (base64) or `source.file`. The file must be a regular
 * file owned by this process's user with no group or other permission bits (0600 or 0400);
 * otherwise it is refused with the `chmod 600 <file>` to run. The file holds the key as base64
 * text (what `createMasterKeyFile` writes) or as exactly 32 raw bytes.
 */
export async function loadMasterKey(source: MasterKeySource): Promise<Buffer> {
  const env = source.env?.trim() ? source.env : undefined;
  const file = source.file?.trim() ? source.file : undefined;
  const envName = source.envName ?? "the master key variable";
  if (env !== undefined && file !== undefined) {
    // Why refuse instead of preferring one: two keys that disagree would seal new records
    // under one and fail to open the old ones, which is worse than not starting.
    throw new InvalidArgument(`master key: both ${envName} and a key file (${file}) are set; set only one`);
  }
  if (env !== undefined) return parseMasterKey(env, envName);
  if (file !== undefined) return readMasterKeyFile(file);
  throw new FailedPrecondition(`master key: none given; set ${envName} or a master key file (made by init)`);
}

/** How a server (KDC, Auditserver) is given its master key: a base64 value, or a key file. */
export interface MasterKeyOptions {
  /** Base64 key from the environment or a flag, if any. */
  masterKey?: string | undefined;
  /** Key file; default <data-dir>/master.key. */
  masterKeyFile?: string | undefined;
  /** The token that opens a wrapped key file (and wraps new ones), when one is configured. */
  wrap?: MasterKeyWrap | undefined;
}

/**
 * The master key of a server's initialized data directory: `opts.masterKey` (base64; `envName`
 * names it in messages), else the key file (`opts.masterKeyFile`, else `defaultFile`). A value
 * and an explicit file together are refused.
 */
export async function loadServerMasterKey(opts: MasterKeyOptions, envName: string, defaultFile: string): Promise<Buffer> {
  if (opts.masterKey !== undefined && opts.masterKey !== "") {
    if (opts.masterKeyFile !== undefined) {
      throw new FailedPrecondition(`master key: both ${envName} (or --master-key) and --master-key-file are set; set only one`);
    }
    return parseMasterKey(opts.masterKey, envName);
  }
  return readMasterKeyFile(opts.masterKeyFile ?? defaultFile, opts.wrap);
}

/**
 * The master key for a server's init: the given base64 value (no file), else the key file at
 * `file` when it exists (left by an init that stopped before its batch, or the directory's
 * own), else a new key file. `keyFile` is the file the key is in, if any.
 */
export async function initServerMasterKey(masterKey: string | undefined, envName: string, file: string, wrap?: MasterKeyWrap): Promise<{ key: Buffer; keyFile?: string }> {
  if (masterKey !== undefined && masterKey !== "") {
    if (wrap?.keyLabel !== undefined) throw new FailedPrecondition(`master key: a key given in ${envName} (or --master-key) cannot be wrapped in a token; leave it out and init makes a wrapped key file`);
    return { key: parseMasterKey(masterKey, envName) };
  }
  return { key: await readOrCreateMasterKeyFile(file, wrap), keyFile: file };
}

/** Reads the key file at `path` (checked as `readMasterKeyFile` does), or creates it (wrapped when `wrap.keyLabel` is given) when it does not exist. */
export async function readOrCreateMasterKeyFile(path: string, wrap?: MasterKeyWrap): Promise<Buffer> {
  if (!(await pathExists(path))) return (await createMasterKeyFile(path, wrap)).key;
  if (wrap?.keyLabel !== undefined && (await wrappedKeyOf(path)) === undefined) {
    throw new FailedPrecondition(`master key file ${path} exists and holds a key that is not wrapped (left by an init that stopped?); remove it to init with a wrapped key, or wrap it later with kmi kdc rekey --master-key-wrap pkcs11`);
  }
  return readMasterKeyFile(path, wrap);
}

/** What a wrapped key file says of itself (no token needed; checked as `readMasterKeyFile` does), or undefined when the file holds the key itself. */
export async function wrappedKeyOf(path: string): Promise<{ token: string; keyLabel: string; keyId: string } | undefined> {
  const data = await readCheckedKeyFile(path);
  try {
    return isWrappedKeyFile(data) ? describeWrappedKey(path, data) : undefined;
  } finally {
    data.fill(0);
  }
}

/** Reads and checks a master key file (unwrapped in `wrap`'s token when the file is a wrapped key); see `loadMasterKey`. */
export async function readMasterKeyFile(path: string, wrap?: MasterKeyWrap): Promise<Buffer> {
  return decodeKeyFile(path, await readCheckedKeyFile(path), wrap);
}

/** A key file's bytes, once it is found to be a regular file of this user, mode 0600 or 0400. */
async function readCheckedKeyFile(path: string): Promise<Buffer> {
  let handle;
  try {
    handle = await openFile(path, constants.O_RDONLY);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new FailedPrecondition(`master key file ${path} does not exist; run init or point to the right file`);
    if (code === "EACCES") throw new FailedPrecondition(`master key file ${path}: permission denied; run as the user that owns it`);
    throw new FailedPrecondition(`master key file ${path} cannot be opened (${code})`);
  }
  try {
    // Why fstat on the open descriptor: checking the path and then reading it would let the
    // file be swapped in between.
    checkKeyFileStat(path, await handle.stat());
    return await handle.readFile();
  } finally {
    await handle.close();
  }
}

/**
 * `readMasterKeyFile` without awaiting: for a keyring that meets a record sealed under a key it
 * does not hold yet (a rekey running next to this server) inside a synchronous `open`.
 */
export function readMasterKeyFileSync(path: string, wrap?: MasterKeyWrap): Buffer {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY);
  } catch (err) {
    throw new FailedPrecondition(`master key file ${path} cannot be opened (${(err as NodeJS.ErrnoException).code})`);
  }
  try {
    checkKeyFileStat(path, fstatSync(fd));
    return decodeKeyFile(path, readFileSync(fd), wrap);
  } finally {
    closeSync(fd);
  }
}

function checkKeyFileStat(path: string, st: Stats): void {
  if (!st.isFile()) throw new FailedPrecondition(`master key file ${path} is not a regular file`);
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) {
    throw new FailedPrecondition(
      `master key file ${path} is owned by uid ${st.uid}, not by this process's user (uid ${uid}); ` +
        `run as its owner or chown it, then chmod 600 ${path}`,
    );
  }
  // Why: anyone who can read this file can decrypt every key the store holds.
  if ((st.mode & 0o077) !== 0) {
    const mode = (st.mode & 0o777).toString(8).padStart(4, "0");
    throw new FailedPrecondition(`master key file ${path} is mode ${mode}; it must be readable by its owner only: chmod 600 ${path}`);
  }
}

/** The key in a key file's bytes (base64 text, 32 raw bytes, or a wrapped key); zeroes `data`. */
function decodeKeyFile(path: string, data: Buffer, wrap: MasterKeyWrap | undefined): Buffer {
  try {
    if (data.length === KEY_BYTES) return Buffer.from(data);
    if (isWrappedKeyFile(data)) return unwrapMasterKey(path, data, wrap);
    return parseMasterKey(data.toString("latin1"), `master key file ${path}`);
  } finally {
    data.fill(0);
  }
}

/**
 * Creates a new master key file at `path` with a fresh random key, mode 0600, and returns
 * the key and its id. With `wrap.keyLabel`, the file holds the key wrapped by that token key. Never overwrites: if `path` exists it is refused with AlreadyExists.
 * Atomic: the key is written and fsynced to a temporary file (O_EXCL,
 * 0600) that is then hard-linked to `path` (link fails if `path` exists, unlike rename), so a
 * crash never leaves a partial key file at `path`.
 */
export async function createMasterKeyFile(path: string, wrap?: MasterKeyWrap): Promise<{ key: Buffer; id: string }> {
  const key = randomBytes(KEY_BYTES);
  let text: Buffer | undefined;
  const tmp = join(dirname(path), `.${basename(path)}.${randomBytes(6).toString("hex")}.tmp`);
  try {
    text = wrap?.keyLabel !== undefined ? wrapMasterKey(key, wrap.token, wrap.keyLabel) : Buffer.from(key.toString("base64") + "\n", "latin1");
    const handle = await openFile(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600).catch((err: NodeJS.ErrnoException) => {
      throw err.code === "ENOENT"
        ? new FailedPrecondition(`master key file ${path}: directory ${dirname(path)} does not exist; create it first`)
        : err;
    });
    try {
      // Why chmod again: the umask can only narrow the mode, but say it outright.
      await handle.chmod(0o600);
      await handle.writeFile(text);
      await handle.sync();
    } finally {
      await handle.close();
    }
    try {
      await link(tmp, path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "EEXIST") {
        throw new AlreadyExists(`master key file ${path} exists already; it is never overwritten (move it away first if you mean to replace it)`);
      }
      throw err;
    }
    await syncDir(dirname(path));
    return { key, id: masterKeyId(key) };
  } catch (err) {
    key.fill(0);
    throw err;
  } finally {
    text?.fill(0);
    await unlink(tmp).catch(() => {});
  }
}

async function syncDir(dir: string): Promise<void> {
  // Make the new directory entry durable; best effort (not every filesystem allows it).
  const handle = await openFile(dir, constants.O_RDONLY).catch(() => undefined);
  if (!handle) return;
  try {
    await handle.sync();
  } catch {
    // ignore
  } finally {
    await handle.close();
  }
}
