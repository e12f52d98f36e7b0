/**
 * `kmi up` waiting for the agent's secrets, run for real (issue #15, item 7): a healthy first
 * start says nothing about the KDC link's transient errors, and a start where the KDC keeps
 * refusing the agent says so, naming the error, only once the grace period
 * (SECRETS_WAIT_GRACE_MS) has passed.
 *
 * The lasting refusal is made the way an operator could make it by mistake: between two starts
 * the Auditserver's attestation-key.pem (which the KDC reads at start) is replaced by another
 * key, so the KDC refuses every attestation token, and the agent's sealed cache is removed so
 * the agent must fetch its key again.
 */
import { generateKeyPairSync, createPublicKey } from "node:crypto";
import { readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SECRETS_WAIT_GRACE_MS } from "../../../src/up/mesh.js";
import { makeTempDir, type TempDir } from "../../helpers/process.js";
import { startSession, type Session } from "../../fixtures/up/session.js";

const KMI = fileURLToPath(new URL("../../../dist/cmd/kmi.js", import.meta.url));
const WAITING = /still waiting for its secrets from the KDC after (\d+) s \((.+)\)/;

let tmp: TempDir;
const sessions: Session[] = [];

function up(extra: readonly string[] = []): Session {
  const argv = [process.execPath, KMI, "up", "--data-dir", join(tmp.path, "data"), "--run-dir", join(tmp.path, "run")];
  argv.push("--kdc-listen", "127.0.0.1:0", "--audit-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", ...extra);
  const s = startSession(argv, { cwd: tmp.path, env: { ...process.env, NO_COLOR: "1" } });
  sessions.push(s);
  return s;
}

async function stop(s: Session): Promise<void> {
  s.interrupt();
  const timer = setTimeout(() => s.killGroup(), 30_000);
  await s.closed;
  clearTimeout(timer);
}

beforeAll(async () => {
  tmp = await makeTempDir("kmi-up-wait-");
});

afterAll(async () => {
  for (const s of sessions) s.killGroup();
  await tmp?.cleanup();
});

describe("kmi up: waiting for the agent's secrets", () => {
  it("a healthy first start prints no KDC-link error; a lasting refusal is shown once the grace period has passed", { timeout: 300_000 }, async () => {
    const first = up();
    await first.waitForLine(/ready in [\d.]+ s/, 150_000);
    expect(first.output()).toMatch(/holds tenant dev's intermediate v1/);
    expect(first.output()).not.toMatch(WAITING);
    await stop(first);

    // Another attestation key where the KDC reads it, and no sealed cache: the KDC refuses every token.
    const pemFile = join(tmp.path, "data", "audit", "attestation-key.pem");
    const real = createPublicKey(await readFile(pemFile, "utf8"));
    const other = generateKeyPairSync("ec", { namedCurve: real.asymmetricKeyDetails?.namedCurve ?? "prime256v1" });
    await writeFile(pemFile, other.publicKey.export({ type: "spki", format: "pem" }));
    await rm(join(tmp.path, "data", "agent", "cache.pb"), { force: true });

    // Long enough for the grace period to pass on a loaded machine before `kmi up` gives up.
    const second = up(["--ready-timeout-seconds", String(Math.ceil(SECRETS_WAIT_GRACE_MS / 1000) + 90)]);
    const line = await second.waitForLine(WAITING, 150_000);
    const [, seconds, error] = WAITING.exec(line)!;
    expect(Number(seconds) * 1000).toBeGreaterThanOrEqual(SECRETS_WAIT_GRACE_MS);
    expect(error).toMatch(/Unauthenticated/);
    const out = second.output();
    // Said once for one error, not once per poll.
    expect(out.split("\n").filter((l) => WAITING.test(l))).toHaveLength(1);
    await stop(second);
  });
});
