import { execSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { measureFiles, measureValue, sha256Hex } from "../../../src/attest/index.js";

const root = mkdtempSync(join(tmpdir(), "kmi-measure-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const app = join(root, "app");
mkdirSync(join(app, "lib", "deep"), { recursive: true });
writeFileSync(join(app, "main.js"), "console.log('main')\n");
writeFileSync(join(app, "lib", "a.js"), "export const a = 1;\n");
writeFileSync(join(app, "lib", "deep", "B.js"), "export const b = 2;\n");
writeFileSync(join(root, "proxy.yaml"), "listen: 127.0.0.1:8080\n");

const sh = (cmd: string) => execSync(cmd, { cwd: root, encoding: "utf8", shell: "/bin/bash" }).split(" ")[0]!;

describe("measureFiles", () => {
  it("measures one file as sha256sum does", async () => {
    const [m] = await measureFiles({ "proxy.config": join(root, "proxy.yaml") });
    expect(m).toEqual({ name: "proxy.config", sha256: sh("sha256sum proxy.yaml") });
  });

  it("measures a directory as the documented coreutils pipeline does", async () => {
    const [m] = await measureFiles({ "agent.code": app });
    expect(m!.sha256).toBe(sh("(find -L app -type f | LC_ALL=C sort | xargs sha256sum) | sha256sum"));
  });

  it("returns one measurement per name, sorted by name", async () => {
    const ms = await measureFiles({ "proxy.config": join(root, "proxy.yaml"), "agent.code": app });
    expect(ms.map((m) => m.name)).toEqual(["agent.code", "proxy.config"]);
  });

  it("changes when one byte of one file changes, and only that measurement", async () => {
    const before = await measureFiles({ "agent.code": app, "proxy.config": join(root, "proxy.yaml") });
    writeFileSync(join(app, "lib", "deep", "B.js"), "export const b = 3;\n");
    const after = await measureFiles({ "agent.code": app, "proxy.config": join(root, "proxy.yaml") });
    expect(after[0]!.sha256).not.toBe(before[0]!.sha256);
    expect(after[1]).toEqual(before[1]);
  });

  it("changes when a file is renamed (paths are part of a directory's measurement)", async () => {
    const before = (await measureFiles({ x: app }))[0]!.sha256;
    writeFileSync(join(app, "extra.js"), "");
    const after = (await measureFiles({ x: app }))[0]!.sha256;
    expect(after).not.toBe(before);
    rmSync(join(app, "extra.js"));
    expect((await measureFiles({ x: app }))[0]!.sha256).toBe(before);
  });

  it("refuses a missing path, a bad name and a link loop, naming the measurement", async () => {
    await expect(measureFiles({ "agent.code": join(root, "nope") })).rejects.toThrow(/^measurement agent\.code: cannot read .*nope \(ENOENT\)/);
    await expect(measureFiles({ "Agent Code": app })).rejects.toThrow(/not a measurement name/);
    await expect(measureFiles({ x: [] })).rejects.toThrow(/no path given/);
    const loop = join(root, "loop");
    mkdirSync(loop);
    symlinkSync(loop, join(loop, "self"));
    await expect(measureFiles({ x: loop })).rejects.toThrow(/links back to a parent directory/);
  });

  it("measures a value as the SHA-256 of its UTF-8 bytes", () => {
    expect(measureValue("software.version", "0.1.0")).toEqual({ name: "software.version", sha256: sha256Hex("0.1.0") });
  });
});
