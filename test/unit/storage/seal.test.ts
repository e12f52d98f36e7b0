import { randomBytes } from "node:crypto";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { create, clone } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { SealedBlobSchema, type SealedBlob } from "../../../src/gen/kmi/store/v1/envelope_pb.js";
import { StoreRecordSchema } from "../../../src/gen/kmi/store/v1/store_pb.js";
import { openLevelStore } from "../../../src/storage/level-store.js";
import { SealError, masterKeyId, open, seal } from "../../../src/storage/seal.js";
import { defineTable, putOp } from "../../../src/storage/store.js";
import { tempDir } from "./tmp-dir.js";

const key = randomBytes(32);
const aad = "tenant/acme/version/3/key";

function openError(fn: () => unknown): SealError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(SealError);
    return err as SealError;
  }
  throw new Error("expected open to throw");
}

describe("seal / open", () => {
  it("round-trips, with fresh data keys and nonces on every seal", () => {
    const plaintext = randomBytes(100);
    const a = seal(key, plaintext, aad);
    const b = seal(key, plaintext, aad);
    expect(Buffer.from(open(key, a, aad))).toEqual(plaintext);
    expect(a.masterKeyId).toBe(masterKeyId(key));
    expect(a.masterKeyId).toMatch(/^[0-9a-f]{16}$/);
    expect(Buffer.from(a.wrappedDataKey)).not.toEqual(Buffer.from(b.wrappedDataKey));
    expect(Buffer.from(a.ciphertext)).not.toEqual(Buffer.from(b.ciphertext));
    expect(Buffer.from(a.ciphertext).includes(plaintext.subarray(0, 16))).toBe(false);
    expect(Buffer.from(open(key, seal(key, new Uint8Array(0), aad), aad))).toHaveLength(0);
  });

  it("names both key ids when the master key is wrong", () => {
    const other = randomBytes(32);
    const err = openError(() => open(other, seal(key, Buffer.from("secret"), aad), aad));
    expect(err.reason).toBe("wrong_key");
    expect(err.message).toContain(`sealed under master key ${masterKeyId(key)}, but the loaded key is ${masterKeyId(other)}`);
  });

  it("refuses a blob opened under another record's aad", () => {
    const err = openError(() => open(key, seal(key, Buffer.from("secret"), aad), "tenant/evil/version/1/key"));
    expect(err.reason).toBe("aad_mismatch");
    expect(err.message).toMatch(/labelled "tenant\/acme\/version\/3\/key"; it was moved from another record/);
  });

  it.each<[string, (b: SealedBlob) => void, string]>([
    ["a flipped ciphertext bit", (b) => { b.ciphertext[0]! ^= 1; }, "payload does not authenticate"],
    ["a flipped payload tag bit", (b) => { b.tag[15]! ^= 0x80; }, "payload does not authenticate"],
    ["a flipped wrapped-key bit", (b) => { b.wrappedDataKey[3]! ^= 1; }, "data key does not authenticate"],
    ["a flipped wrap nonce bit", (b) => { b.wrapNonce[0]! ^= 1; }, "data key does not authenticate"],
    // The label is rewritten to match the new record: the GCM tags (which bind the aad) refuse it.
    ["a relabelled aad", (b) => { b.aad = "tenant/evil/version/1/key"; }, "does not authenticate"],
    ["another blob's wrapped key swapped in", (b) => {
      const other = seal(key, Buffer.from("other secret"), "tenant/evil/version/1/key");
      b.wrappedDataKey = other.wrappedDataKey; b.wrapNonce = other.wrapNonce; b.wrapTag = other.wrapTag;
    }, "data key does not authenticate"],
  ])("refuses %s as tampered", (_name, tamper, message) => {
    const blob = clone(SealedBlobSchema, seal(key, Buffer.from("the secret"), aad));
    tamper(blob);
    const target = blob.aad === aad ? aad : blob.aad;
    const err = openError(() => open(key, blob, target));
    expect(err.reason).toBe("tampered");
    expect(err.message).toContain(message);
  });

  it("refuses malformed blobs and bad keys", () => {
    const blob = seal(key, Buffer.from("x"), aad);
    expect(openError(() => open(key, create(SealedBlobSchema, { ...blob, format: 2 }), aad)).reason).toBe("malformed");
    expect(openError(() => open(key, create(SealedBlobSchema, { ...blob, tag: new Uint8Array(4) }), aad)).reason).toBe("malformed");
    expect(() => seal(randomBytes(16), Buffer.from("x"), aad)).toThrow(/master key: must be 32 bytes/);
    expect(() => seal(key, Buffer.from("x"), "")).toThrow(/aad: must be a non-empty string/);
  });
});

async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await filesUnder(p)));
    else out.push(p);
  }
  return out;
}

async function dirContains(dir: string, needle: Buffer): Promise<boolean> {
  for (const file of await filesUnder(dir)) if ((await readFile(file)).includes(needle)) return true;
  return false;
}

describe("no plaintext at rest", () => {
  it("leaves no trace of a sealed secret in any file of the data dir, while an unsealed control is found", async () => {
    const dir = await tempDir();
    const Secrets = defineTable("secrets", SealedBlobSchema);
    const Plain = defineTable("plain", StoreRecordSchema);
    const marker = randomBytes(32);
    const control = randomBytes(32);
    const store = await openLevelStore(dir);
    await store.batch([
      putOp(Secrets, "k1", seal(key, Buffer.concat([Buffer.from("pkcs8:"), marker]), "secrets/k1")),
      // Control: the scan must find this one, or the test proves nothing.
      putOp(Plain, "c1", create(StoreRecordSchema, { table: "x", key: "y", value: control })),
    ]);
    await store.close();

    expect((await filesUnder(dir)).length).toBeGreaterThan(2);
    expect(await dirContains(dir, control)).toBe(true);
    expect(await dirContains(dir, marker)).toBe(false);
    expect(await dirContains(dir, Buffer.from(marker.toString("base64")))).toBe(false);
    expect(await dirContains(dir, Buffer.from(marker.toString("hex")))).toBe(false);
    expect(await dirContains(dir, key)).toBe(false);

    // And it is still there, sealed, after a reopen.
    const again = await openLevelStore(dir);
    const blob = await again.get(Secrets, "k1");
    expect(Buffer.from(open(key, blob!, "secrets/k1")).subarray(-32)).toEqual(marker);
    await again.close();
  });
});
