/**
 * Issue 17 with SoftHSM2: a KDC whose roots are in a PKCS#11 token, its master key rotated with
 * `kmi kdc rekey` killed by SIGKILL partway (`--batch-size 1`, 600 extra sealed records). The
 * KDC restarts with the token and reads everything: every sealed record opens under one of the
 * two keys, a new intermediate signed by the token's root (sealed under the new key) and a
 * renewal of the old one (its key under either). A second rekey finishes; the KDC serves again
 * with the token, and its audit log verifies.
 */
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readMasterKeyFile } from "../../../src/storage/master-key.js";
import { masterKeyId } from "../../../src/storage/seal.js";
import { addBulkSigningKeys, openEverything, runRekey } from "../../fixtures/kdc/rekey.js";
import { cleanEnv, cleanup, ctl, KMI, startKdc, tempDir } from "./harness.js";
import { softHsmToken } from "../../fixtures/pkcs11/softhsm.js";

const run = promisify(execFile);
const TOKEN = "kmi-rekey-test";
const PIN = "2718-user";

let dir: string;
let dataDir: string;
let tokenFile: string;
let hsmEnv: Record<string, string>;
let tokenFlags: string[];

beforeAll(async () => {
  dir = await tempDir("kmi-rekey-pkcs11-");
  const hsm = await softHsmToken(dir, TOKEN, PIN);
  hsmEnv = hsm.env;
  tokenFlags = hsm.flags;
  dataDir = join(dir, "data");
  tokenFile = join(dir, "operator.token");
  await run(process.execPath, [KMI, "kdc", "init", "--data-dir", dataDir, "--token-file", tokenFile, ...tokenFlags], { env: cleanEnv(hsmEnv) });
  const kdc = await startKdc(dataDir, tokenFlags, hsmEnv);
  try {
    const made = await ctl(kdc, { caFile: join(dataDir, "infra-ca.pem"), tokenFile }, ["tenant", "create", "acme", "--bootstrap"]);
    expect(made.code, made.stderr).toBe(0);
  } finally {
    await kdc.stop();
  }
  await addBulkSigningKeys(dataDir, 600);
}, 120_000);

afterAll(async () => {
  await cleanup(dir);
});

describe("kmi kdc rekey of a token-rooted KDC (SoftHSM2)", () => {
  it("killed partway, the KDC restarts with the token and reads everything; the rerun finishes", async () => {
    const keyFile = join(dataDir, "master.key");
    const oldId = masterKeyId(await readMasterKeyFile(keyFile));
    const killed = await runRekey(dataDir, ["--batch-size", "1", "--progress"], true, hsmEnv);
    expect(killed.code, killed.stderr).toBe("SIGKILL");
    const newId = masterKeyId(await readMasterKeyFile(`${keyFile}.next`));
    const half = await openEverything(dataDir);
    expect(Object.keys(half.byKey).sort()).toEqual([oldId, newId].sort());

    const data = { caFile: join(dataDir, "infra-ca.pem"), tokenFile };
    const kdc = await startKdc(dataDir, tokenFlags, hsmEnv);
    try {
      const rotate = await ctl(kdc, data, ["ca", "rotate", "--tenant", "acme", "--activate"]);
      expect(rotate.code, rotate.stderr).toBe(0);
      const renew = await ctl(kdc, data, ["ca", "renew", "--tenant", "acme", "--version", "1"]);
      expect(renew.code, renew.stderr).toBe(0);
    } finally {
      expect(await kdc.stop()).toBe(0);
    }

    const done = await runRekey(dataDir, ["--json"], false, hsmEnv);
    expect(done.code, done.stderr).toBe(0);
    expect(JSON.parse(done.stdout)).toMatchObject({ old_key_id: oldId, new_key_id: newId, resumed: true });
    expect(Object.keys((await openEverything(dataDir)).byKey)).toEqual([newId]);
    const again = await startKdc(dataDir, tokenFlags, hsmEnv);
    try {
      const verify = await ctl(again, data, ["audit", "verify"]);
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
      const rotate = await ctl(again, data, ["ca", "rotate", "--tenant", "acme"]);
      expect(rotate.code, rotate.stderr).toBe(0);
    } finally {
      expect(await again.stop()).toBe(0);
    }
  }, 180_000);
});
