/**
 * workerAllocator: which allocator `kmi proxy`'s workers are forked with, for each
 * `--allocator` choice, with jemalloc present or absent (a temp file stands for the library)
 * and with an LD_PRELOAD the operator already set.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { JEMALLOC_CONF, workerAllocator } from "../../../src/proxy/allocator.js";

const dir = mkdtempSync(join(tmpdir(), "kmi-allocator-"));
const lib = join(dir, "libjemalloc.so.2");
writeFileSync(lib, "");
const present = [join(dir, "absent.so"), lib];
const absent = [join(dir, "absent.so")];
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("workerAllocator", () => {
  it.each([
    ["auto, installed: jemalloc preloaded with its settings", "auto", {}, present, { name: "jemalloc", library: lib, env: { LD_PRELOAD: lib, MALLOC_CONF: JEMALLOC_CONF } }],
    ["auto, not installed: the C library's", "auto", {}, absent, { name: "system", env: {} }],
    ["jemalloc, installed", "jemalloc", {}, present, { name: "jemalloc", library: lib, env: { LD_PRELOAD: lib, MALLOC_CONF: JEMALLOC_CONF } }],
    ["system, even when jemalloc is installed", "system", {}, present, { name: "system", env: {} }],
    ["the operator's MALLOC_CONF is kept", "auto", { MALLOC_CONF: "narenas:2" }, present, { name: "jemalloc", library: lib, env: { LD_PRELOAD: lib, MALLOC_CONF: "narenas:2" } }],
    ["the operator's LD_PRELOAD of jemalloc is left as it is", "auto", { LD_PRELOAD: "/opt/j/libjemalloc.so" }, present, { name: "jemalloc", library: "/opt/j/libjemalloc.so", env: {} }],
    ["another LD_PRELOAD is not replaced", "auto", { LD_PRELOAD: "/opt/x/libother.so" }, present, { name: "system", env: {} }],
  ] as const)("%s", (_name, choice, env, paths, want) => {
    expect(workerAllocator(choice, env, paths)).toEqual(want);
  });

  it("refuses jemalloc when it is not installed, saying what to do", () => {
    expect(() => workerAllocator("jemalloc", {}, absent)).toThrow(/^allocator: jemalloc is not installed \(looked for .*\); install libjemalloc2, or give --allocator auto or system$/);
  });
});
