/**
 * A SoftHSM2 token made at bench time (Debian `softhsm2`): a token directory and softhsm2.conf
 * under the row's temp dir, one token initialized with `softhsm2-util`, its user PIN in a 0600
 * file, and the `--pkcs11-*` flags and environment a kmi program needs to use it. Removing the
 * directory removes the token (it lives nowhere else).
 */
import { execFile } from "node:child_process";
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { cleanEnv } from "./kmi-process.js";

const run = promisify(execFile);

/** SoftHSM2's PKCS#11 module on Debian. */
export const SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so";

/** A token made by {@link softHsmToken}. */
export interface BenchToken {
  /** The token's label. */
  readonly label: string;
  /** SOFTHSM2_CONF, for every program that uses the token. */
  readonly env: Readonly<Record<string, string>>;
  /** `--pkcs11-module`, `--pkcs11-token`, `--pkcs11-pin-file`. */
  readonly flags: readonly string[];
}

/** Initializes token `label` with a user PIN `pin` in a SoftHSM2 store under `dir` (made here, 0700). */
export async function softHsmToken(dir: string, label: string, pin: string): Promise<BenchToken> {
  const tokens = join(dir, "tokens");
  await mkdir(tokens, { recursive: true, mode: 0o700 });
  const conf = join(dir, "softhsm2.conf");
  await writeFile(conf, `directories.tokendir = ${tokens}\nobjectstore.backend = file\nlog.level = ERROR\n`, { mode: 0o600 });
  const env = { SOFTHSM2_CONF: conf };
  try {
    await run("softhsm2-util", ["--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", `so-${pin}`], { env: cleanEnv(env) });
  } catch (err) {
    // The PINs are on the command line: name the tool, not its arguments.
    const why = err instanceof Error && "stderr" in err ? String((err as { stderr: unknown }).stderr).trim() : String(err);
    throw new Error(`softhsm2-util --init-token failed (is Debian's softhsm2 installed?): ${why.slice(-400)}`);
  }
  // The KDC refuses a PIN file that others can read.
  const pinFile = join(dir, `${label}.pin`);
  await writeFile(pinFile, pin + "\n", { mode: 0o600 });
  return { label, env, flags: ["--pkcs11-module", SOFTHSM_MODULE, "--pkcs11-token", label, "--pkcs11-pin-file", pinFile] };
}
