import { randomBytes } from "node:crypto";
import { chmod, chown, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { AlreadyExists, FailedPrecondition, InvalidArgument } from "../../../src/common/errors.js";
import { createMasterKeyFile, initServerMasterKey, loadMasterKey, loadServerMasterKey, masterKeyId } from "../../../src/storage/master-key.js";
import { tempDir } from "./tmp-dir.js";

describe("master key file", () => {
  it("is created 0600 with a fresh key that loads back, and never overwritten", async () => {
    const path = join(await tempDir(), "master.key");
    const made = await createMasterKeyFile(path);
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    expect(made.key).toHaveLength(32);
    expect(made.id).toBe(masterKeyId(made.key));
    const loaded = await loadMasterKey({ file: path });
    expect(loaded.equals(made.key)).toBe(true);

    const before = await readFile(path);
    const err = await createMasterKeyFile(path).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AlreadyExists);
    expect((await readFile(path)).equals(before)).toBe(true);
    // No temporary file is left behind.
    const { readdir } = await import("node:fs/promises");
    expect(await readdir(join(path, ".."))).toEqual(["master.key"]);
  });

  it.each([0o644, 0o640, 0o604, 0o660])("is refused at mode %o with the chmod to run", async (mode) => {
    const path = join(await tempDir(), "master.key");
    await createMasterKeyFile(path);
    await chmod(path, mode);
    const err = await loadMasterKey({ file: path }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FailedPrecondition);
    expect((err as Error).message).toContain(`is mode 0${mode.toString(8)}; it must be readable by its owner only: chmod 600 ${path}`);
  });

  it("is accepted at mode 0400, and as 32 raw bytes", async () => {
    const dir = await tempDir();
    const path = join(dir, "master.key");
    const { key } = await createMasterKeyFile(path);
    await chmod(path, 0o400);
    expect((await loadMasterKey({ file: path })).equals(key)).toBe(true);
    const raw = join(dir, "raw.key");
    const bytes = randomBytes(32);
    await writeFile(raw, bytes, { mode: 0o600 });
    expect((await loadMasterKey({ file: raw })).equals(bytes)).toBe(true);
  });

  it.runIf(process.getuid?.() === 0)("is refused when another user owns it", async () => {
    const path = join(await tempDir(), "master.key");
    await createMasterKeyFile(path);
    await chown(path, 65534, 65534);
    await expect(loadMasterKey({ file: path })).rejects.toThrow(/is owned by uid 65534, not by this process's user \(uid 0\)/);
  });

  it("refuses a missing file and a file of the wrong length", async () => {
    const dir = await tempDir();
    await expect(loadMasterKey({ file: join(dir, "nope") })).rejects.toThrow(/does not exist/);
    const short = join(dir, "short.key");
    await writeFile(short, randomBytes(16).toString("base64") + "\n", { mode: 0o600 });
    await expect(loadMasterKey({ file: short })).rejects.toThrow(/decodes to 16 bytes, a master key is 32/);
  });
});

describe("master key from the environment", () => {
  const envName = "KMI_KDC_MASTER_KEY";

  it("loads a base64 value", async () => {
    const key = randomBytes(32);
    expect((await loadMasterKey({ env: key.toString("base64"), envName })).equals(key)).toBe(true);
    expect((await loadMasterKey({ env: key.toString("base64url"), envName })).equals(key)).toBe(true);
  });

  it.each([
    ["the wrong length", randomBytes(31).toString("base64"), /KMI_KDC_MASTER_KEY: decodes to 31 bytes, a master key is 32/],
    ["not base64", "not base64 at all!", /KMI_KDC_MASTER_KEY: not base64/],
  ])("refuses %s without echoing the value", async (_name, value, message) => {
    const err = await loadMasterKey({ env: value, envName }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidArgument);
    expect((err as Error).message).toMatch(message);
    expect((err as Error).message).not.toContain(value);
  });

  it("refuses both sources at once, and none", async () => {
    const path = join(await tempDir(), "master.key");
    await createMasterKeyFile(path);
    await expect(loadMasterKey({ env: randomBytes(32).toString("base64"), envName, file: path })).rejects.toThrow(
      /both KMI_KDC_MASTER_KEY and a key file .* are set; set only one/,
    );
    await expect(loadMasterKey({ envName })).rejects.toThrow(/none given; set KMI_KDC_MASTER_KEY/);
  });
});

describe("a server's master key (KDC, Auditserver)", () => {
  it("init creates the key file once and reuses it; a given value writes no file", async () => {
    const dir = await tempDir();
    const path = join(dir, "master.key");
    const made = await initServerMasterKey(undefined, "KMI_KDC_MASTER_KEY", path);
    expect(made.keyFile).toBe(path);
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    const again = await initServerMasterKey("", "KMI_KDC_MASTER_KEY", path);
    expect(again.key.equals(made.key)).toBe(true);
    const given = randomBytes(32);
    const other = join(dir, "unused.key");
    const fromValue = await initServerMasterKey(given.toString("base64"), "KMI_KDC_MASTER_KEY", other);
    expect(fromValue).toEqual({ key: given });
    await expect(stat(other)).rejects.toThrow(/ENOENT/);
  });

  it("loads the value, else the explicit file, else the data dir's; a value and an explicit file together are refused", async () => {
    const dir = await tempDir();
    const dataDirKey = (await createMasterKeyFile(join(dir, "master.key"))).key;
    const explicit = (await createMasterKeyFile(join(dir, "elsewhere.key"))).key;
    const given = randomBytes(32);
    const defaultFile = join(dir, "master.key");
    expect((await loadServerMasterKey({ masterKey: given.toString("base64") }, "KMI_AUDIT_MASTER_KEY", defaultFile)).equals(given)).toBe(true);
    expect((await loadServerMasterKey({ masterKeyFile: join(dir, "elsewhere.key") }, "KMI_AUDIT_MASTER_KEY", defaultFile)).equals(explicit)).toBe(true);
    expect((await loadServerMasterKey({}, "KMI_AUDIT_MASTER_KEY", defaultFile)).equals(dataDirKey)).toBe(true);
    const err = await loadServerMasterKey({ masterKey: given.toString("base64"), masterKeyFile: defaultFile }, "KMI_AUDIT_MASTER_KEY", defaultFile).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FailedPrecondition);
    expect((err as Error).message).toBe("master key: both KMI_AUDIT_MASTER_KEY (or --master-key) and --master-key-file are set; set only one");
  });
});
