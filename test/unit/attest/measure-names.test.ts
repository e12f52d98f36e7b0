import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { measureFiles, sha256Hex } from "../../../src/attest/index.js";

const root = mkdtempSync(join(tmpdir(), "kmi-measure-names-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe("measureFiles and file names that would break the manifest's lines", () => {
  it("does not give a tree whose file name holds a newline the measurement of another tree", async () => {
    // The approved tree: two files.
    const approved = join(root, "approved", "app");
    mkdirSync(approved, { recursive: true });
    writeFileSync(join(approved, "a.js"), "export const a = 1;\n");
    writeFileSync(join(approved, "policy.js"), "export const strict = true;\n");
    // Another tree: a.js and policy.js are gone; a directory whose name carries the end of
    // a.js's manifest line and the start of policy.js's, holding one file with a.js's bytes.
    const forged = join(root, "forged", "app");
    const odd = join(forged, `a.js\n${sha256Hex("export const strict = true;\n")}  app`);
    mkdirSync(odd, { recursive: true });
    writeFileSync(join(odd, "policy.js"), "export const a = 1;\n");

    const [good] = await measureFiles({ "agent.code": approved });
    let forgedDigest: string | undefined;
    try {
      forgedDigest = (await measureFiles({ "agent.code": forged }))[0]!.sha256;
    } catch (err) {
      // Refusing such a name is the fix: it names the measurement and the file.
      expect(String(err)).toMatch(/measurement agent\.code: .*line break/);
      return;
    }
    expect(forgedDigest).not.toBe(good!.sha256);
  });

  it("refuses a newline in a directory name too", async () => {
    const tree = join(root, "dirs", "app");
    mkdirSync(join(tree, "x\ny"), { recursive: true });
    writeFileSync(join(tree, "x\ny", "f.js"), "1\n");
    await expect(measureFiles({ "agent.code": tree })).rejects.toThrow(/line break/);
  });
});
