import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it, vi } from "vitest";
import { createAccessLog, loggedPath, MemoryAccessLog, type AccessRecord } from "../../../src/proxy/access-log.js";

const dir = mkdtempSync(join(tmpdir(), "kmi-access-log-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const record = (path: string): AccessRecord => ({
  tenant: "acme",
  client: "127.0.0.1:5000",
  host: "example.com",
  method: "GET",
  path,
  status: 200,
  bytes_up: 0,
  bytes_down: 12,
  decision: "allow",
  duration_ms: 1.5,
  proto: "http/1.1",
});

describe("access log lines in a terminal", () => {
  it("writes a client's C1 control characters as escapes: the line holds no raw U+009B, and reads back the same", async () => {
    const file = join(dir, "c1.log");
    const log = createAccessLog(file, undefined);
    // A Host header may carry any byte from 0x80 (node:http reads it as Latin-1): U+009B is a CSI.
    const host = "evil\u009b2J\u009d0;owned\u2028x";
    log.write({ ...record("/a"), host });
    await log.close();
    const text = readFileSync(file, "utf8");
    expect(text).not.toMatch(/[\u007f-\u009f\u2028\u2029]/);
    expect(text).toContain("evil\\u009b2J\\u009d0;owned\\u2028x");
    expect((JSON.parse(text.trim()) as { host: string }).host).toBe(host);
  });
});

describe("access log query strings", () => {
  it.each([
    ["/search?q=secret&token=abc", false, "/search?"],
    ["/search?q=secret&token=abc", true, "/search?q=secret&token=abc"],
    ["/plain/path", false, "/plain/path"],
    ["/?", false, "/?"],
    ["", false, ""],
    ["example.com:443", false, "example.com:443"],
  ])("loggedPath(%j, query=%s) is %j", (path, query, expected) => {
    expect(loggedPath(path, query)).toBe(expected);
  });

  it("the file log strips queries by default (file 0600) and keeps them when asked", async () => {
    const stripped = join(dir, "stripped.log");
    const log = createAccessLog(stripped, undefined);
    const r = record("/login?session=s3cr3t-session-id");
    log.write(r);
    log.write(record("/static/app.js"));
    await log.close();
    const lines = readFileSync(stripped, "utf8").trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.map((l) => l["path"])).toEqual(["/login?", "/static/app.js"]);
    expect(readFileSync(stripped, "utf8")).not.toContain("s3cr3t");
    expect(statSync(stripped).mode & 0o777).toBe(0o600);
    // The caller's record is not changed (the policy and the relay still see the whole URL).
    expect(r.path).toBe("/login?session=s3cr3t-session-id");

    const kept = join(dir, "kept.log");
    const log2 = createAccessLog(kept, undefined, { query: true });
    log2.write(record("/login?session=abc"));
    await log2.close();
    expect(JSON.parse(readFileSync(kept, "utf8").trim())).toMatchObject({ path: "/login?session=abc", tenant: "acme", status: 200 });
  });

  it("the in-memory log strips as the file log does, unless told not to", () => {
    const m = new MemoryAccessLog();
    m.write(record("/a?b=c"));
    expect(m.records[0]!.path).toBe("/a?");
    const k = new MemoryAccessLog({ query: true });
    k.write(record("/a?b=c"));
    expect(k.records[0]!.path).toBe("/a?b=c");
  });
});

describe("access log of a worker (kmi proxy --workers)", () => {
  /** What the stdout sink wrote for `r`, each write captured whole. */
  function stdoutWrites(r: AccessRecord): string[] {
    const writes: string[] = [];
    const spy = vi.spyOn(process.stdout, "write").mockImplementation((chunk: string | Uint8Array) => {
      writes.push(String(chunk));
      return true;
    });
    try {
      createAccessLog("-", undefined, { worker: 3, query: true }).write(r);
    } finally {
      spy.mockRestore();
    }
    return writes;
  }

  it("adds the worker's id to every line (file and stdout)", () => {
    const file = join(dir, "worker.log");
    const log = createAccessLog(file, undefined, { worker: 2 });
    log.write(record("/a"));
    const line = JSON.parse(readFileSync(file, "utf8").trim()) as Record<string, unknown>;
    expect(line).toMatchObject({ path: "/a", worker: 2 });
    expect(line["truncated"]).toBeUndefined();
    const [out] = stdoutWrites(record("/b"));
    expect(JSON.parse(out!)).toMatchObject({ path: "/b", worker: 3 });
  });

  it("keeps a stdout line within PIPE_BUF (one atomic pipe write): a long path and error are cut and marked", () => {
    const long = { ...record("/" + "p".repeat(10_000)), error: "e".repeat(6_000) };
    const writes = stdoutWrites(long);
    expect(writes).toHaveLength(1);
    expect(Buffer.byteLength(writes[0]!)).toBeLessThanOrEqual(4096);
    expect(writes[0]!.endsWith("}\n")).toBe(true);
    const line = JSON.parse(writes[0]!) as Record<string, unknown>;
    expect(line).toMatchObject({ worker: 3, truncated: true, host: "example.com", status: 200 });
    expect(line["path"]).toBe("/" + "p".repeat(1023));
    expect(line["error"]).toBe("e".repeat(1024));
  });
});

describe("access log lines written before their responses end (writeThen)", () => {
  const lines = (file: string): string[] =>
    readFileSync(file, "utf8")
      .trimEnd()
      .split("\n")
      .filter((l) => l !== "")
      .map((l) => (JSON.parse(l) as { path: string }).path);

  it("gathers a turn's lines and writes them before any of their callbacks runs, in order", async () => {
    const file = join(dir, "batched.log");
    const log = createAccessLog(file, undefined);
    const seen: string[][] = [];
    for (const p of ["/1", "/2", "/3"]) log.writeThen(record(p), () => seen.push(lines(file)));
    // Nothing is written, and no response ends, within the turn that logged them.
    expect(seen).toEqual([]);
    expect(readFileSync(file, "utf8")).toBe("");
    await new Promise((r) => setImmediate(r));
    // Each callback found every line of its turn already in the file.
    expect(seen).toEqual([
      ["/1", "/2", "/3"],
      ["/1", "/2", "/3"],
      ["/1", "/2", "/3"],
    ]);
    await log.close();
  });

  it("a plain write goes out at once, after the lines gathered before it", async () => {
    const file = join(dir, "mixed.log");
    const log = createAccessLog(file, undefined);
    let ended = false;
    log.writeThen(record("/gathered"), () => (ended = true));
    log.write(record("/at-once"));
    expect(lines(file)).toEqual(["/gathered", "/at-once"]);
    expect(ended).toBe(false);
    await new Promise((r) => setImmediate(r));
    expect(ended).toBe(true);
    await log.close();
  });

  it("close writes what was gathered and lets those responses end", async () => {
    const file = join(dir, "closing.log");
    const log = createAccessLog(file, undefined);
    let ended = 0;
    log.writeThen(record("/last"), () => ended++);
    await log.close();
    expect(lines(file)).toEqual(["/last"]);
    expect(ended).toBe(1);
  });

  it("a failed write (a full disk) is reported once, and the responses still end", async () => {
    const errors: string[] = [];
    const logger = { error: (msg: string, f?: Record<string, unknown>) => errors.push(`${msg}: ${String(f?.["error"])}`) } as unknown as Parameters<typeof createAccessLog>[1];
    const log = createAccessLog("/dev/full", logger);
    let ended = 0;
    for (let i = 0; i < 3; i++) log.writeThen(record(`/${i}`), () => ended++);
    await new Promise((r) => setImmediate(r));
    log.writeThen(record("/again"), () => ended++);
    await new Promise((r) => setImmediate(r));
    expect(ended).toBe(4);
    expect(errors).toHaveLength(1);
    expect(errors[0]).toMatch(/access log write failed: .*ENOSPC/);
    await log.close();
  });

  it("the memory log ends the response at once, after the line", () => {
    const m = new MemoryAccessLog();
    let count = -1;
    m.writeThen(record("/m"), () => (count = m.records.length));
    expect(count).toBe(1);
  });
});
