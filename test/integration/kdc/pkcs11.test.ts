/**
 * Issue 17: the KDC's roots in a PKCS#11 token (SoftHSM2, a token folder of this test's own).
 * `kmi kdc init --pkcs11-*` makes the KMI root and the infrastructure CA inside the token; the
 * KDC process (configured through KMI_KDC_PKCS11_* this time) signs a tenant's intermediate
 * with the token's root and its TLS certificate chains to the token's infrastructure CA; a leaf
 * of that intermediate passes `openssl verify` root → intermediate → leaf.
 *
 * What "the root's private key is nowhere in the KDC's files" can honestly mean, since the
 * key never left the token and so its bytes are unknown to the test too: the root credentials
 * in the store carry no sealed key, only a token label; every key the store does seal (the
 * KDC's TLS key, the tenant's intermediate), unsealed with the master key, is another key than
 * either root's; no file in the data dir holds a PEM private key; and the token itself reports
 * the root key sensitive and never extractable, and refuses to return its value.
 */
import { execFile } from "node:child_process";
import { createPrivateKey, createPublicKey, generateKeyPairSync, X509Certificate } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Pkcs11Token } from "../../../src/common/keys/pkcs11-token.js";
import { loadKdcMasterKey, openKdcStore } from "../../../src/kdc/init.js";
import { CREDENTIAL, credentialAad, KdcStore } from "../../../src/kdc/kdc-store.js";
import { createSealer } from "../../../src/kdc/sealer.js";
import { createLeafIssuer } from "../../../src/pki/leaf.js";
import { certificateToPem } from "../../../src/pki/pem.js";
import { findInFiles, PEM_PRIVATE_KEY, readTree, unsealIntermediates } from "../../fixtures/mesh/secrets.js";
import { cleanEnv, cleanup, ctl, KMI, openssl, startKdc, tempDir, type KdcProcess } from "./harness.js";
import { SOFTHSM_MODULE, softHsmToken, type SoftHsmToken } from "../../fixtures/pkcs11/softhsm.js";

const run = promisify(execFile);
const MODULE = SOFTHSM_MODULE;
const TOKEN = "kmi-kdc-test";
const PIN = "4711-user";

let dir: string;
let dataDir: string;
let tokenFile: string;
let pinFile: string;
let hsmEnv: Record<string, string>;
let hsm: SoftHsmToken;
let initOut: string;
let kdc: KdcProcess | undefined;

const spkiOfCert = (pem: string) => new X509Certificate(pem).publicKey.export({ type: "spki", format: "der" });

beforeAll(async () => {
  dir = await tempDir("kmi-pkcs11-");
  hsm = await softHsmToken(dir, TOKEN, PIN);
  hsmEnv = hsm.env;
  pinFile = hsm.pinFile;
  dataDir = join(dir, "data");
  tokenFile = join(dir, "operator.token");
  const init = await run(
    process.execPath,
    [KMI, "kdc", "init", "--data-dir", dataDir, "--token-file", tokenFile, "--pkcs11-module", MODULE, "--pkcs11-token", TOKEN, "--pkcs11-pin-file", pinFile],
    { env: cleanEnv(hsmEnv), encoding: "utf8" },
  );
  initOut = init.stdout;
}, 60_000);

afterAll(async () => {
  await kdc?.stop("SIGKILL");
  await cleanup(dir);
});

function openToken(): Pkcs11Token {
  return hsm.open();
}

async function kdcId(): Promise<string> {
  return /kdc id ([0-9a-f]{16})/.exec(initOut)![1]!;
}

describe("the KDC's roots in a PKCS#11 token (SoftHSM2)", () => {
  it("init says where the root keys are, and the store keeps only their token labels", async () => {
    expect(initOut).toContain(`root keys:           in PKCS#11 token "${TOKEN}" (non-extractable)`);
    const store = await openKdcStore(dataDir, false);
    try {
      const kdcStore = new KdcStore(store);
      for (const name of [CREDENTIAL.kmiRoot, CREDENTIAL.infraCa]) {
        const c = (await kdcStore.getCredential(name))!;
        expect(c.privateKey, name).toBeUndefined();
        expect(c.tokenKeyLabel).toBe(`kmi/${await kdcId()}/${name}`);
      }
      expect((await kdcStore.getCredential(CREDENTIAL.kdcTls))!.privateKey).toBeDefined();
    } finally {
      await store.close();
    }
  });

  it("the token holds both root keys as sensitive, never-extractable objects whose public halves are the certificates'", async () => {
    const token = openToken();
    try {
      const id = await kdcId();
      for (const [name, pem] of [
        [CREDENTIAL.kmiRoot, "kmi-root.pem"],
        [CREDENTIAL.infraCa, "infra-ca.pem"],
      ] as const) {
        const label = `kmi/${id}/${name}`;
        expect(token.protection(label)).toEqual({ sensitive: true, extractable: false, alwaysSensitive: true, neverExtractable: true });
        expect(token.tryReadPrivateValue(label)).toMatch(/CKR_ATTRIBUTE_SENSITIVE/);
        expect(Buffer.from(token.findKey(label)!.spkiDer)).toEqual(spkiOfCert(await readFile(join(dataDir, pem), "utf8")));
      }
    } finally {
      token.close();
    }
  });

  it("serves with the token (settings from KMI_KDC_PKCS11_*): a tenant intermediate signed by the token's root, and a leaf of it, pass openssl verify", async () => {
    kdc = await startKdc(dataDir, [], { ...hsmEnv, KMI_KDC_PKCS11_MODULE: MODULE, KMI_KDC_PKCS11_TOKEN: TOKEN, KMI_KDC_PKCS11_PIN_FILE: pinFile });
    const data = { caFile: join(dataDir, "infra-ca.pem"), tokenFile };
    const made = await ctl(kdc, data, ["tenant", "create", "acme", "--bootstrap"]);
    expect(made.code, made.stderr).toBe(0);
    // The KDC's TLS certificate was signed by the infrastructure CA in the token: kmi ctl trusted it.
    expect(await kdc.stop()).toBe(0);
    kdc = undefined;

    const [version] = await readVersions();
    const [key] = await unsealIntermediates(dataDir, "acme");
    const leafKey = generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey.export({ type: "spki", format: "der" });
    const issuer = createLeafIssuer({ certificateDer: version!.certificateDer, privateKey: createPrivateKey({ key: key!.pkcs8, format: "der", type: "pkcs8" }) });
    const now = new Date();
    const leaf = issuer.issueLeaf({ publicKeySpkiDer: leafKey, dnsNames: ["www.example.test"], ipAddresses: [], notBefore: now, notAfter: new Date(now.getTime() + 86_400_000) });
    await writeFile(join(dir, "intermediate.pem"), certificateToPem(version!.certificateDer));
    await writeFile(join(dir, "leaf.pem"), certificateToPem(leaf));
    const out = await openssl(["verify", "-x509_strict", "-CAfile", join(dataDir, "kmi-root.pem"), "-untrusted", join(dir, "intermediate.pem"), join(dir, "leaf.pem")]);
    expect(out.trim()).toBe(`${join(dir, "leaf.pem")}: OK`);
    // The KDC's TLS certificate, signed at init by the infrastructure CA in the token.
    await writeFile(join(dir, "kdc-tls.pem"), certificateToPem(await readCredentialCert(CREDENTIAL.kdcTls)));
    const tlsOut = await openssl(["verify", "-x509_strict", "-CAfile", join(dataDir, "infra-ca.pem"), join(dir, "kdc-tls.pem")]);
    expect(tlsOut.trim()).toBe(`${join(dir, "kdc-tls.pem")}: OK`);
  }, 60_000);

  it("keeps no root key in the store or the data dir: every sealed key is another key, and no file holds a PEM private key", async () => {
    const rootSpkis = [spkiOfCert(await readFile(join(dataDir, "kmi-root.pem"), "utf8")), spkiOfCert(await readFile(join(dataDir, "infra-ca.pem"), "utf8"))];
    const sealed: Buffer[] = (await unsealIntermediates(dataDir, "acme")).map((k) => k.pkcs8);
    const store = await openKdcStore(dataDir, false);
    try {
      const sealer = createSealer(await loadKdcMasterKey(dataDir, {}));
      const tls = (await new KdcStore(store).getCredential(CREDENTIAL.kdcTls))!;
      sealed.push(Buffer.from(sealer.open(tls.privateKey!, credentialAad(CREDENTIAL.kdcTls))));
    } finally {
      await store.close();
    }
    expect(sealed.length).toBeGreaterThanOrEqual(2);
    for (const pkcs8 of sealed) {
      const spki = createPublicKey(createPrivateKey({ key: pkcs8, format: "der", type: "pkcs8" })).export({ type: "spki", format: "der" });
      for (const root of rootSpkis) expect(spki.equals(root)).toBe(false);
    }
    expect(findInFiles(readTree(dataDir), [PEM_PRIVATE_KEY])).toEqual([]);
  });

  it("backs up and restores a token-rooted store: the master key is checked on the TLS key, the restored KDC serves with the token", async () => {
    const kbk = join(dir, "kdc.kbk");
    await run(process.execPath, [KMI, "kdc", "backup", "--data-dir", dataDir, "--out", kbk], { env: cleanEnv() });
    const wrongKey = join(dir, "wrong.key");
    await writeFile(wrongKey, Buffer.alloc(32, 7).toString("base64") + "\n", { mode: 0o600 });
    const refused = await run(process.execPath, [KMI, "kdc", "restore", "--data-dir", join(dir, "r1"), "--in", kbk, "--master-key-file", wrongKey], { env: cleanEnv() }).catch((e: { code: number; stderr: string }) => e);
    expect((refused as { stderr: string }).stderr).toMatch(/the master key given does not open this backup/);
    const restored = join(dir, "restored");
    await run(process.execPath, [KMI, "kdc", "restore", "--data-dir", restored, "--in", kbk, "--master-key-file", join(dataDir, "master.key")], { env: cleanEnv() });
    const again = await startKdc(restored, ["--master-key-file", join(dataDir, "master.key"), "--pkcs11-module", MODULE, "--pkcs11-token", TOKEN, "--pkcs11-pin-file", pinFile], hsmEnv);
    try {
      const r = await ctl(again, { caFile: join(restored, "infra-ca.pem"), tokenFile }, ["ca", "rotate", "--tenant", "acme"]);
      expect(r.code, r.stderr).toBe(0);
    } finally {
      expect(await again.stop()).toBe(0);
    }
  }, 60_000);

  it("refuses to start without the token, saying which flags to give", async () => {
    await expect(startKdc(dataDir, [], hsmEnv)).rejects.toThrow(/key is in a PKCS#11 token \(kmi\/[0-9a-f]{16}\/kmi-root\); start the KDC with --pkcs11-module, --pkcs11-token and --pkcs11-pin-file/);
  });

  it("refuses a PIN file other users can read, a wrong PIN without printing it, and half-given settings", async () => {
    await writeFile(join(dir, "open.pin"), PIN + "\n", { mode: 0o644 });
    await expect(startKdc(dataDir, ["--pkcs11-module", MODULE, "--pkcs11-token", TOKEN, "--pkcs11-pin-file", join(dir, "open.pin")], hsmEnv)).rejects.toThrow(
      /--pkcs11-pin-file .*open\.pin is mode 0644; it must be readable by its owner only: chmod 600/,
    );
    await writeFile(join(dir, "wrong.pin"), "0000-wrong\n", { mode: 0o600 });
    const wrong = startKdc(dataDir, ["--pkcs11-module", MODULE, "--pkcs11-token", TOKEN, "--pkcs11-pin-file", join(dir, "wrong.pin")], hsmEnv);
    await expect(wrong).rejects.toThrow(/pkcs11 token "kmi-kdc-test": login refused \(CKR_PIN_INCORRECT\); check the PIN file/);
    await expect(wrong).rejects.not.toThrow(/0000-wrong/);
    const half = await run(process.execPath, [KMI, "kdc", "init", "--data-dir", join(dir, "other"), "--pkcs11-module", MODULE], { env: cleanEnv(hsmEnv) }).catch((e: { code: number; stderr: string }) => e);
    expect(half).toMatchObject({ code: 2 });
    expect((half as { stderr: string }).stderr).toMatch(/--pkcs11-module, --pkcs11-token and --pkcs11-pin-file go together/);
  });
});

async function readCredentialCert(name: string): Promise<Uint8Array> {
  const store = await openKdcStore(dataDir, false);
  try {
    return (await new KdcStore(store).getCredential(name))!.certificateDer;
  } finally {
    await store.close();
  }
}

async function readVersions() {
  const store = await openKdcStore(dataDir, false);
  try {
    return (await new KdcStore(store).listVersions("acme")).filter((v) => v.certificateDer.length > 0);
  } finally {
    await store.close();
  }
}
