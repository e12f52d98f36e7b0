/**
 * Issue 17, "the master key can be a wrapping key inside the token", with SoftHSM2 and the real
 * programs: `kmi kdc init --master-key-wrap pkcs11` writes a master key file that holds the key
 * wrapped by an AES key made inside the token (sensitive, not extractable); the key itself is in
 * no file of the data dir; the KDC starts and serves with the token and refuses to start without
 * it, naming the token; `kmi kdc restore --check` checks a backup against the wrapped file;
 * `kmi kdc rekey` killed by SIGKILL partway leaves a store the KDC reads, and the rerun finishes
 * with the new key wrapped too; a KDC whose key file was plain is moved to a wrapped one by
 * `kmi kdc rekey --master-key-wrap pkcs11`.
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Pkcs11Token } from "../../../src/common/keys/pkcs11-token.js";
import { masterKeyId } from "../../../src/storage/seal.js";
import { MasterKeyring } from "../../../src/storage/keyring.js";
import { createMasterKeyFile, readMasterKeyFile } from "../../../src/storage/master-key.js";
import { loadKdcKeyring } from "../../../src/kdc/init.js";
import { unwrapMasterKey, type MasterKeyWrap } from "../../../src/storage/wrapped-key.js";
import { addBulkSigningKeys, openEverything, runRekey } from "../../fixtures/kdc/rekey.js";
import { findInFiles, readTree } from "../../fixtures/mesh/secrets.js";
import { cleanEnv, cleanup, ctl, KMI, startKdc, tempDir } from "./harness.js";
import { softHsmToken, type SoftHsmToken } from "../../fixtures/pkcs11/softhsm.js";

const run = promisify(execFile);
const TOKEN = "kmi-wrap-test";
const PIN = "1618-user";
const LABEL = "kmi/master-key-wrap";

let dir: string;
let hsm: SoftHsmToken;
let hsmEnv: Record<string, string>;
let tokenFlags: string[];

beforeAll(async () => {
  dir = await tempDir("kmi-master-wrap-");
  hsm = await softHsmToken(dir, TOKEN, PIN);
  hsmEnv = hsm.env;
  tokenFlags = hsm.flags;
}, 60_000);

afterAll(async () => {
  await cleanup(dir);
});

/** Runs `fn` with this process logged in to the test token, as a MasterKeyWrap (closed after). */
async function withToken<T>(fn: (wrap: MasterKeyWrap & { token: Pkcs11Token }) => T | Promise<T>): Promise<T> {
  const token = hsm.open();
  try {
    return await fn({ token });
  } finally {
    token.close();
  }
}

/** `kmi kdc init` of a new data dir (with the token; `extra` adds flags); its paths and stdout. */
async function init(name: string, extra: string[]): Promise<{ dataDir: string; tokenFile: string; caFile: string; stdout: string }> {
  const dataDir = join(dir, name);
  const tokenFile = join(dir, `${name}.token`);
  const r = await run(process.execPath, [KMI, "kdc", "init", "--data-dir", dataDir, "--token-file", tokenFile, ...tokenFlags, ...extra], { env: cleanEnv(hsmEnv), encoding: "utf8" });
  return { dataDir, tokenFile, caFile: join(dataDir, "infra-ca.pem"), stdout: r.stdout };
}

describe("a master key wrapped by a PKCS#11 token's key (SoftHSM2)", () => {
  let kdc: Awaited<ReturnType<typeof init>>;

  beforeAll(async () => {
    kdc = await init("wrapped", ["--master-key-wrap", "pkcs11"]);
  }, 60_000);

  it("init writes only the wrapped key; the wrapping key stays in the token; the key is in no file of the data dir", async () => {
    expect(kdc.stdout).toContain(`wrapped by key ${LABEL} in PKCS#11 token "${TOKEN}"`);
    const keyFile = join(kdc.dataDir, "master.key");
    const doc = JSON.parse(await readFile(keyFile, "utf8")) as Record<string, string>;
    expect(doc).toMatchObject({ format: "kmi-wrapped-master-key/1", token: TOKEN, key_label: LABEL });
    const key = await withToken((wrap) => {
      expect(wrap.token.aesKeyProtection(LABEL)).toEqual({ sensitive: true, extractable: false, alwaysSensitive: true, neverExtractable: true });
      expect(wrap.token.tryReadAesKeyValue(LABEL)).toMatch(/CKR_ATTRIBUTE_SENSITIVE/);
      return readFile(keyFile).then((data) => unwrapMasterKey(keyFile, data, wrap));
    });
    expect(masterKeyId(key)).toBe(doc["key_id"]);
    const needles = [
      { name: "master key raw", bytes: key },
      { name: "master key base64", bytes: Buffer.from(key.toString("base64")) },
      { name: "master key hex", bytes: Buffer.from(key.toString("hex")) },
    ];
    expect(findInFiles(readTree(kdc.dataDir), needles)).toEqual([]);
    // The store is sealed under that key: every sealed record opens with the unwrapped key's ring.
    const opened = await withToken((wrap) => openEverything(kdc.dataDir, wrap));
    expect(Object.keys(opened.byKey)).toEqual([doc["key_id"]]);
  });

  it("the KDC serves with the token and refuses to start without it, naming the token and the flags", async () => {
    const withHsm = await startKdc(kdc.dataDir, tokenFlags, hsmEnv);
    try {
      const made = await ctl(withHsm, kdc, ["tenant", "create", "acme", "--bootstrap"]);
      expect(made.code, made.stderr).toBe(0);
    } finally {
      expect(await withHsm.stop()).toBe(0);
    }
    const refused = await startKdc(kdc.dataDir, [], hsmEnv).then(
      async (k) => {
        await k.stop("SIGKILL");
        return "started";
      },
      (err: unknown) => String(err),
    );
    expect(refused).toContain(`is wrapped by key ${LABEL} in PKCS#11 token "${TOKEN}"; start with --pkcs11-module, --pkcs11-token and --pkcs11-pin-file`);
  });

  it("init refuses the wrap without the token, or with a key from the environment, before making anything", async () => {
    const init = (name: string, args: string[], env: Record<string, string> = {}) =>
      run(process.execPath, [KMI, "kdc", "init", "--data-dir", join(dir, name), "--master-key-wrap", "pkcs11", ...args], { env: cleanEnv({ ...hsmEnv, ...env }), encoding: "utf8" }).then(
        () => "initialized",
        (e: { stderr: string }) => e.stderr,
      );
    expect(await init("no-token", [])).toContain("--master-key-wrap pkcs11 needs the token: give --pkcs11-module, --pkcs11-token and --pkcs11-pin-file");
    expect(existsSync(join(dir, "no-token"))).toBe(false);
    const fromEnv = await init("env-key", [...tokenFlags, "--master-key-wrap-label", "kmi/never-made"], { KMI_KDC_MASTER_KEY: randomBytes(32).toString("base64") });
    expect(fromEnv).toContain("cannot be wrapped");
    expect(existsSync(join(dir, "env-key"))).toBe(false);
    expect(await withToken((wrap) => wrap.token.hasAesKey("kmi/never-made"))).toBe(false);
  });

  it("a running KDC's keyring takes up a wrapped master.key.next that a rekey beside it made (etcd replicas do)", async () => {
    const keyFile = join(kdc.dataDir, "master.key");
    await withToken(async (wrap) => {
      const ring = await loadKdcKeyring(kdc.dataDir, { wrap });
      const primary = await readMasterKeyFile(keyFile, wrap);
      const next = await createMasterKeyFile(`${keyFile}.next`, { token: wrap.token, keyLabel: LABEL });
      try {
        expect((JSON.parse(await readFile(`${keyFile}.next`, "utf8")) as { key_id: string }).key_id).toBe(next.id);
        const blob = new MasterKeyring(primary, next.key).seal(Buffer.from("sealed under the next key"), "test/record");
        expect(blob.masterKeyId).toBe(next.id);
        expect(Buffer.from(ring.open(blob, "test/record")).toString()).toBe("sealed under the next key");
        expect(ring.sealingId).toBe(next.id);
      } finally {
        ring.wipe();
        primary.fill(0);
        next.key.fill(0);
        await rm(`${keyFile}.next`);
      }
    });
  });

  it("kmi kdc restore --check checks a backup against the wrapped key file (by its key id)", async () => {
    const backup = join(dir, "wrapped.kmibak");
    const made = await run(process.execPath, [KMI, "kdc", "backup", "--data-dir", kdc.dataDir, "--out", backup], { env: cleanEnv(hsmEnv), encoding: "utf8" });
    expect(made.stderr).not.toMatch(/error/i);
    const check = (keyFile: string) =>
      run(process.execPath, [KMI, "kdc", "restore", "--data-dir", join(dir, "restored"), "--in", backup, "--check", "--master-key-file", keyFile], { env: cleanEnv(hsmEnv), encoding: "utf8" }).then(
        (r) => ({ code: 0, out: r.stdout }),
        (e: { code: number; stderr: string }) => ({ code: e.code, out: e.stderr }),
      );
    const ok = await check(join(kdc.dataDir, "master.key"));
    expect(ok.code, ok.out).toBe(0);
    expect(ok.out).toContain(`the wrapped master key file given names master key ${(JSON.parse(await readFile(join(kdc.dataDir, "master.key"), "utf8")) as { key_id: string }).key_id}, the one its keys are sealed under`);
    // Another wrapped key (the file of another KDC) is refused.
    const other = await init("other", ["--master-key-wrap", "pkcs11"]);
    const refused = await check(join(other.dataDir, "master.key"));
    expect(refused.code).not.toBe(0);
    expect(refused.out).toContain("the master key given does not open this backup");
  });

  it("rekey killed partway: the KDC reads everything with the token; the rerun finishes and the new key file is wrapped too", async () => {
    await withToken((wrap) => addBulkSigningKeys(kdc.dataDir, 300, wrap));
    const keyFile = join(kdc.dataDir, "master.key");
    const oldId = (JSON.parse(await readFile(keyFile, "utf8")) as { key_id: string }).key_id;
    const killed = await runRekey(kdc.dataDir, ["--batch-size", "1", "--progress", ...tokenFlags], true, hsmEnv);
    expect(killed.code, killed.stderr).toBe("SIGKILL");
    const next = JSON.parse(await readFile(`${keyFile}.next`, "utf8")) as { key_id: string; key_label: string };
    expect(next.key_label).toBe(LABEL);
    const half = await withToken((wrap) => openEverything(kdc.dataDir, wrap));
    expect(Object.keys(half.byKey).sort()).toEqual([oldId, next.key_id].sort());

    const served = await startKdc(kdc.dataDir, tokenFlags, hsmEnv);
    try {
      const rotate = await ctl(served, kdc, ["ca", "rotate", "--tenant", "acme", "--activate"]);
      expect(rotate.code, rotate.stderr).toBe(0);
    } finally {
      expect(await served.stop()).toBe(0);
    }
    const done = await runRekey(kdc.dataDir, ["--json", ...tokenFlags], false, hsmEnv);
    expect(done.code, done.stderr).toBe(0);
    expect(JSON.parse(done.stdout)).toMatchObject({ old_key_id: oldId, new_key_id: next.key_id, resumed: true });
    expect(JSON.parse(await readFile(keyFile, "utf8"))).toMatchObject({ format: "kmi-wrapped-master-key/1", key_id: next.key_id, key_label: LABEL });
    expect(Object.keys((await withToken((wrap) => openEverything(kdc.dataDir, wrap))).byKey)).toEqual([next.key_id]);
    // Without the token, rekey cannot read the key file and says so.
    const refused = await runRekey(kdc.dataDir, [], false, hsmEnv);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain(`wrapped by key ${LABEL} in PKCS#11 token "${TOKEN}"`);
  }, 180_000);

  it("a plain key file becomes a wrapped one with kmi kdc rekey --master-key-wrap pkcs11", async () => {
    const plain = await init("plain", []);
    const keyFile = join(plain.dataDir, "master.key");
    expect((await readFile(keyFile, "utf8")).startsWith("{")).toBe(false);
    const moved = await runRekey(plain.dataDir, ["--json", "--master-key-wrap", "pkcs11", "--master-key-wrap-label", "kmi/other-wrap", ...tokenFlags], false, hsmEnv);
    expect(moved.code, moved.stderr).toBe(0);
    const doc = JSON.parse(await readFile(keyFile, "utf8")) as { key_id: string; key_label: string };
    expect(doc).toMatchObject({ key_label: "kmi/other-wrap", key_id: (JSON.parse(moved.stdout) as { new_key_id: string }).new_key_id });
    const served = await startKdc(plain.dataDir, tokenFlags, hsmEnv);
    try {
      const status = await ctl(served, plain, ["status"]);
      expect(status.code, status.stderr).toBe(0);
    } finally {
      expect(await served.stop()).toBe(0);
    }
  }, 120_000);
});
