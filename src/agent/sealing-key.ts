/**
 * Where the agent's sealing key comes from (`--sealing-key`). The sealing key (AES-256) seals
 * the machine identity and the secrets cache through storage/seal.ts; the providers differ in
 * what is on disk and what else is needed to get the key back:
 *
 *   file           `sealing.key` in the state dir (0600, made on first start): the default.
 *   systemd-creds  the credential systemd decrypted for this service into $CREDENTIALS_DIRECTORY
 *                  (LoadCredentialEncrypted=, sealed to the host and/or TPM2), or, outside a unit,
 *                  `systemd-creds decrypt` of `sealing.key.cred` in the state dir. Nothing made
 *                  here: the operator provisions the credential (docs/agent.md).
 *   pkcs11         a random sealing key encrypted (AES-256-GCM) inside a PKCS#11 token by a
 *                  non-extractable AES key made there on first start; on disk only that
 *                  ciphertext (`sealing.key.p11`), so the state dir opens only with the token.
 *
 * A state dir is sealed under one provider's key: switching providers is refused with a
 * message (re-enroll with a fresh state dir) rather than leaving the identity unreadable.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { access, open as openFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { FailedPrecondition, errorText } from "../common/errors.js";
import { Pkcs11Token } from "../common/keys/pkcs11-token.js";
import { AgentTokenSealingKeyRecordSchema } from "../gen/kmi/store/v1/agent_pb.js";
import { parseMasterKey } from "../storage/master-key.js";
import { KEY_BYTES } from "../storage/seal.js";
import { STATE_FILES, type StateDir } from "./state-dir.js";

/** The sealing-key providers `--sealing-key` names. */
export const SEALING_KEY_PROVIDERS = ["file", "systemd-creds", "pkcs11"] as const;

/** Where the sealing key comes from, resolved by config.ts. */
export type SealingKeySource =
  | { readonly kind: "file" }
  | {
      readonly kind: "systemd-creds";
      /** The credential's name (LoadCredentialEncrypted=<name>:…). */
      readonly credential: string;
      /** $CREDENTIALS_DIRECTORY, when systemd set it. */
      readonly credentialsDirectory: string | undefined;
    }
  | {
      readonly kind: "pkcs11";
      readonly module: string;
      readonly token: string;
      /** The user PIN (read from --pkcs11-pin-file); never logged. */
      readonly pin: string;
      /** Label of the AES key in the token. */
      readonly keyLabel: string;
    };

/** How `systemd-creds decrypt` is run (a seam for tests). */
export type RunCommand = (file: string, args: readonly string[]) => Promise<{ stdout: Buffer }>;

const runCommand: RunCommand = async (file, args) => {
  const { stdout } = await promisify(execFile)(file, [...args], { encoding: "buffer", maxBuffer: 64 * 1024 });
  return { stdout };
};

/** GCM additional data of the token-encrypted sealing key: names what the ciphertext is. */
const TOKEN_SEAL_AAD = Buffer.from("kmi agent sealing key v1", "utf8");
const TOKEN_RECORD_VERSION = 1;

/** Loads (and for `file` and `pkcs11`, makes on first start) the sealing key from its provider. */
export async function loadSealingKey(dir: StateDir, source: SealingKeySource, run: RunCommand = runCommand): Promise<Buffer> {
  await refuseProviderSwitch(dir, source);
  switch (source.kind) {
    case "file":
      return dir.sealingKey();
    case "systemd-creds":
      return systemdCredential(dir, source, run);
    case "pkcs11":
      return tokenSealingKey(dir, source);
  }
}

/** The file each provider leaves in the state dir (none for systemd-creds' $CREDENTIALS_DIRECTORY). */
function providerFile(kind: SealingKeySource["kind"]): string | undefined {
  return kind === "file" ? STATE_FILES.sealingKey : kind === "pkcs11" ? STATE_FILES.tokenSealingKey : undefined;
}

/**
 * Why refuse a switch: the identity and cache were sealed under the other provider's key, and a
 * new key would make them unreadable (the agent would then look unenrolled).
 */
async function refuseProviderSwitch(dir: StateDir, source: SealingKeySource): Promise<void> {
  for (const other of SEALING_KEY_PROVIDERS) {
    const file = providerFile(other);
    if (other === source.kind || file === undefined) continue;
    if (await exists(dir.file(file))) {
      throw new FailedPrecondition(
        `--sealing-key ${source.kind}: state dir ${dir.path} is sealed with --sealing-key ${other} (${file}); keep --sealing-key ${other}, or move the state dir away and enroll again with a new join token`,
      );
    }
  }
}

async function systemdCredential(dir: StateDir, source: Extract<SealingKeySource, { kind: "systemd-creds" }>, run: RunCommand): Promise<Buffer> {
  const what = `systemd credential ${source.credential}`;
  if (source.credentialsDirectory !== undefined && source.credentialsDirectory !== "") {
    const path = join(source.credentialsDirectory, source.credential);
    const bytes = await readPrivateFile(path, what);
    return decodeKey(bytes, `${what} (${path})`);
  }
  const encrypted = dir.file(STATE_FILES.systemdCredential);
  if (!(await exists(encrypted))) {
    throw new FailedPrecondition(
      `--sealing-key systemd-creds: $CREDENTIALS_DIRECTORY is not set and ${encrypted} does not exist; start the agent from a systemd unit with ` +
        `LoadCredentialEncrypted=${source.credential}:<file>, or make the file with \`openssl rand -base64 32 | systemd-creds encrypt --name=${source.credential} - ${encrypted}\``,
    );
  }
  let out: Buffer;
  try {
    out = (await run("systemd-creds", ["decrypt", `--name=${source.credential}`, encrypted, "-"])).stdout;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new FailedPrecondition("--sealing-key systemd-creds: the systemd-creds command is not installed (systemd 250 or later); use --sealing-key file or pkcs11");
    // Only the command's own message: its stdout (the key, if any) is never echoed.
    throw new FailedPrecondition(`--sealing-key systemd-creds: \`systemd-creds decrypt\` of ${encrypted} failed (${firstLine((err as { stderr?: Buffer }).stderr) ?? errorText(err)})`);
  }
  try {
    return decodeKey(out, `${what} (${encrypted})`);
  } finally {
    out.fill(0);
  }
}

async function tokenSealingKey(dir: StateDir, source: Extract<SealingKeySource, { kind: "pkcs11" }>): Promise<Buffer> {
  const token = Pkcs11Token.open({ module: source.module, token: source.token, pin: source.pin });
  try {
    const stored = await dir.read(STATE_FILES.tokenSealingKey);
    if (stored !== undefined) return openTokenRecord(token, stored, dir.file(STATE_FILES.tokenSealingKey), source.keyLabel);
    // First start: the AES key is made in the token (unless an operator made it), then a fresh
    // sealing key is encrypted by it; only the ciphertext is written.
    if (!token.hasAesKey(source.keyLabel)) token.generateAesKey(source.keyLabel);
    const key = randomBytes(KEY_BYTES);
    const { nonce, sealed } = token.encryptAesGcm(source.keyLabel, key, TOKEN_SEAL_AAD);
    const record = create(AgentTokenSealingKeyRecordSchema, { recordVersion: TOKEN_RECORD_VERSION, tokenLabel: token.label, keyLabel: source.keyLabel, nonce, ciphertext: sealed });
    await dir.write(STATE_FILES.tokenSealingKey, toBinary(AgentTokenSealingKeyRecordSchema, record));
    return key;
  } finally {
    token.close();
  }
}

function openTokenRecord(token: Pkcs11Token, bytes: Buffer, path: string, keyLabel: string): Buffer {
  let record;
  try {
    record = fromBinary(AgentTokenSealingKeyRecordSchema, bytes);
  } catch (err) {
    throw new FailedPrecondition(`${path}: does not parse; move the state dir away and enroll again`, { cause: err });
  }
  if (record.recordVersion > TOKEN_RECORD_VERSION) throw new FailedPrecondition(`${path}: record version ${record.recordVersion} is newer than this agent knows; upgrade kmi`);
  if (record.keyLabel !== keyLabel) {
    throw new FailedPrecondition(`${path}: sealed by token key ${record.keyLabel}, not --pkcs11-key-label ${keyLabel}; give the label it was made with`);
  }
  if (!token.hasAesKey(keyLabel)) {
    throw new FailedPrecondition(`pkcs11 token "${token.label}": no AES key labelled ${keyLabel}, which sealed ${path} (in token "${record.tokenLabel}"); give the token it was made in`);
  }
  const key = token.decryptAesGcm(keyLabel, record.nonce, record.ciphertext, TOKEN_SEAL_AAD);
  if (key.length !== KEY_BYTES) {
    key.fill(0);
    throw new FailedPrecondition(`${path}: opens to ${key.length} bytes, not a ${KEY_BYTES}-byte sealing key`);
  }
  return key;
}

/** A credential as 32 raw bytes or as base64 text of 32 bytes (what `openssl rand -base64 32` makes). */
function decodeKey(bytes: Buffer, what: string): Buffer {
  if (bytes.length === KEY_BYTES) return Buffer.from(bytes);
  try {
    return parseMasterKey(bytes.toString("utf8"), what);
  } catch (err) {
    throw new FailedPrecondition(errorText(err));
  }
}

/** Reads a credential file: regular, not readable by group or others (systemd makes them 0400). */
async function readPrivateFile(path: string, what: string): Promise<Buffer> {
  let handle;
  try {
    handle = await openFile(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new FailedPrecondition(
      code === "ENOENT"
        ? `${what}: ${path} does not exist; name the credential of the unit's LoadCredentialEncrypted= with --sealing-key-credential`
        : `${what}: cannot open ${path} (${code ?? "error"})`,
    );
  }
  try {
    const st = await handle.stat();
    if (!st.isFile()) throw new FailedPrecondition(`${what}: ${path} is not a regular file`);
    if ((st.mode & 0o077) !== 0) throw new FailedPrecondition(`${what}: ${path} has mode ${(st.mode & 0o777).toString(8)}, readable by others; it must be 0400 or 0600`);
    return await handle.readFile();
  } finally {
    await handle.close();
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

function firstLine(b: Buffer | undefined): string | undefined {
  const line = b?.toString("utf8").trim().split("\n")[0];
  return line === undefined || line === "" ? undefined : line.slice(0, 200);
}
