/**
 * The agent's state directory: 0700, files 0600, every write atomic (temporary file in the
 * same directory, fsync, rename, fsync of the directory). The file layout is documented in
 * proto/kmi/store/v1/agent.proto.
 */
import { randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { chmod, lstat, mkdir, open, readdir, rename, rm } from "node:fs/promises";
import { basename, join } from "node:path";
import { FailedPrecondition } from "../common/errors.js";
import { readOrCreateMasterKeyFile } from "../storage/master-key.js";

/** File names in the state directory. */
export const STATE_FILES = {
  sealingKey: "sealing.key",
  /** The sealing key encrypted in a PKCS#11 token (`--sealing-key pkcs11`). */
  tokenSealingKey: "sealing.key.p11",
  /** The sealing key as a systemd credential, outside a unit (`--sealing-key systemd-creds`). */
  systemdCredential: "sealing.key.cred",
  identity: "identity.pb",
  cache: "cache.pb",
} as const;

/** The state directory of one agent. */
export class StateDir {
  private constructor(readonly path: string) {}

  /**
   * Opens (and on first start creates) the state directory. Why refuse a directory that
   * others can enter instead of fixing it: files in it may already have been read.
   */
  static async open(path: string): Promise<StateDir> {
    await mkdir(path, { recursive: true, mode: 0o700 });
    const st = await lstat(path);
    if (!st.isDirectory()) throw new FailedPrecondition(`state dir ${path}: not a directory`);
    const uid = process.getuid?.();
    if (uid !== undefined && st.uid !== uid) {
      throw new FailedPrecondition(`state dir ${path}: owned by uid ${st.uid}, not by this process's user (uid ${uid}); run the agent as its owner`);
    }
    if ((st.mode & 0o077) !== 0) {
      if (await isEmpty(path)) {
        // A directory we just made under a loose umask: tighten it before anything is written.
        await chmod(path, 0o700);
      } else {
        const mode = (st.mode & 0o777).toString(8).padStart(4, "0");
        throw new FailedPrecondition(`state dir ${path}: mode ${mode} lets other users in; chmod 700 ${path}`);
      }
    }
    return new StateDir(path);
  }

  /** The path of a file in the directory. */
  file(name: string): string {
    return join(this.path, name);
  }

  /** The sealing key: read from `sealing.key` (0600, checked), created on first start. */
  async sealingKey(): Promise<Buffer> {
    return readOrCreateMasterKeyFile(this.file(STATE_FILES.sealingKey));
  }

  /** Reads a file (checked: regular, ours, 0600); undefined when it does not exist. */
  async read(name: string): Promise<Buffer | undefined> {
    const path = this.file(name);
    let handle;
    try {
      handle = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw new FailedPrecondition(`state file ${path}: cannot open (${(err as NodeJS.ErrnoException).code ?? "error"})`);
    }
    try {
      const st = await handle.stat();
      if (!st.isFile()) throw new FailedPrecondition(`state file ${path}: not a regular file`);
      if ((st.mode & 0o077) !== 0) {
        throw new FailedPrecondition(`state file ${path}: mode ${(st.mode & 0o777).toString(8)} lets other users read it; chmod 600 ${path}`);
      }
      return await handle.readFile();
    } finally {
      await handle.close();
    }
  }

  /** Replaces a file atomically with `data`, mode 0600. */
  async write(name: string, data: Uint8Array): Promise<void> {
    const path = this.file(name);
    const tmp = join(this.path, `.${basename(name)}.${randomBytes(6).toString("hex")}.tmp`);
    const handle = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
    try {
      await handle.chmod(0o600);
      await handle.writeFile(data);
      await handle.sync();
    } catch (err) {
      await handle.close();
      await rm(tmp, { force: true });
      throw err;
    }
    await handle.close();
    try {
      await rename(tmp, path);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
    await this.syncDir();
  }

  /** Removes a file if present. */
  async remove(name: string): Promise<void> {
    await rm(this.file(name), { force: true });
    await this.syncDir();
  }

  private async syncDir(): Promise<void> {
    const dir = await open(this.path, constants.O_RDONLY);
    try {
      await dir.sync();
    } catch {
      // Some filesystems refuse fsync on a directory; the rename is still atomic.
    } finally {
      await dir.close();
    }
  }
}

async function isEmpty(path: string): Promise<boolean> {
  return (await readdir(path)).length === 0;
}
