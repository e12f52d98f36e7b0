import { PassThrough } from "node:stream";
import { brotliCompressSync, deflateSync, gzipSync } from "node:zlib";
import { describe, expect, it } from "vitest";
import { isLiveStream, relayBody, type BodyInspector, type InspectionVerdict, type RelayResult, type RelaySink } from "../../../src/proxy/body-relay.js";
import { EICAR } from "../../../src/proxy/eicar.js";

function sink(): RelaySink & { opened: number | undefined | null; chunks: Buffer[]; ended: boolean } {
  const s = {
    opened: null as number | undefined | null,
    chunks: [] as Buffer[],
    ended: false,
    open(length: number | undefined) {
      s.opened = length;
    },
    write(c: Buffer) {
      s.chunks.push(c);
      return true;
    },
    end(last?: Buffer) {
      if (last !== undefined) s.chunks.push(last);
      s.ended = true;
    },
    onDrain(cb: () => void) {
      setImmediate(cb);
    },
  };
  return s;
}

function relay(settings: { eicar?: boolean; maxBodyBytes?: number; holdMs?: number }, hold = true, encoding?: string) {
  const src = new PassThrough();
  const out = sink();
  const result = new Promise<RelayResult>((resolve) =>
    relayBody(src, { eicar: true, maxBodyBytes: 1 << 20, holdMs: 0, uploads: true, ...settings }, hold, out, resolve, encoding),
  );
  return { src, out, result };
}

const tick = () => new Promise((r) => setImmediate(r));

describe("relayBody", () => {
  it.each([
    ["gzip", gzipSync],
    ["x-gzip", gzipSync],
    ["deflate", deflateSync],
    ["br", brotliCompressSync],
  ] as const)("scans a %s-encoded body as it decodes: EICAR inside is blocked before anything is released", async (encoding, compress) => {
    const body = compress(Buffer.concat([Buffer.from("<html>".repeat(500)), EICAR, Buffer.from("</html>")]));
    expect(body.indexOf(EICAR.subarray(0, 20))).toBe(-1); // not visible in the bytes as sent
    const { src, out, result } = relay({}, true, encoding);
    src.write(body.subarray(0, 10));
    await tick();
    src.end(body.subarray(10));
    expect(await result).toMatchObject({ kind: "blocked", released: false });
    expect(out.opened).toBeNull();
  });

  it("relays a clean encoded body as sent, whole and scanned", async () => {
    const plain = Buffer.from("clean ".repeat(2000));
    const body = gzipSync(plain);
    const { src, out, result } = relay({}, true, "gzip");
    src.end(body);
    expect(await result).toEqual({ kind: "done", bytes: body.length, scanned: plain.length, partial: false });
    expect(out.opened).toBe(body.length);
    expect(Buffer.concat(out.chunks).equals(body)).toBe(true);
  });

  it("bounds a decompression bomb by the cap and passes the rest unscanned (partial)", async () => {
    const plain = Buffer.alloc(8 << 20); // 8 MiB of zeros: ~8 KiB gzipped
    const body = gzipSync(plain);
    const { src, out, result } = relay({ maxBodyBytes: 64 * 1024 }, true, "gzip");
    src.end(body);
    const r = await result;
    expect(r).toMatchObject({ kind: "done", bytes: body.length, partial: true });
    expect((r as { scanned: number }).scanned).toBe(64 * 1024);
    expect(Buffer.concat(out.chunks).equals(body)).toBe(true);
  });

  it("passes a body that does not decode, unscanned from there (partial), bytes as sent", async () => {
    const body = Buffer.concat([gzipSync(Buffer.from("start")).subarray(0, 12), Buffer.from("not gzip at all")]);
    const { src, out, result } = relay({}, true, "gzip");
    src.end(body);
    expect(await result).toMatchObject({ kind: "done", bytes: body.length, partial: true });
    expect(Buffer.concat(out.chunks).equals(body)).toBe(true);
  });

  it("says partial for an encoding it cannot see through", async () => {
    const { src, result } = relay({}, true, "compress");
    src.end(Buffer.from("whatever"));
    expect(await result).toMatchObject({ kind: "done", partial: true });
  });

  it("holds a clean body until its end, then releases it with its length", async () => {
    const { src, out, result } = relay({});
    src.write("hello ");
    await tick();
    expect(out.opened).toBeNull();
    src.end("world");
    expect(await result).toEqual({ kind: "done", bytes: 11, scanned: 11, partial: false });
    expect(out.opened).toBe(11);
    expect(Buffer.concat(out.chunks).toString()).toBe("hello world");
    expect(out.ended).toBe(true);
  });

  it("blocks a body with EICAR straddling chunks before anything is released", async () => {
    const { src, out, result } = relay({});
    src.write(Buffer.concat([Buffer.alloc(100), EICAR.subarray(0, 20)]));
    await tick();
    src.write(EICAR.subarray(20));
    expect(await result).toMatchObject({ kind: "blocked", released: false });
    expect(out.opened).toBeNull();
    expect(out.chunks).toHaveLength(0);
  });

  it("releases at the scan cap; bytes past it pass unscanned", async () => {
    const { src, out, result } = relay({ maxBodyBytes: 10 });
    src.write("0123456789abc");
    await tick();
    expect(out.opened).toBeUndefined();
    src.end(EICAR);
    const r = await result;
    expect(r).toEqual({ kind: "done", bytes: 13 + EICAR.length, scanned: 10, partial: true });
    expect(out.ended).toBe(true);
  });

  it("after holdMs it streams on and a later hit says released (the transfer is aborted)", async () => {
    const { src, out, result } = relay({ holdMs: 20 });
    src.write("first part");
    await new Promise((r) => setTimeout(r, 40));
    expect(out.opened).toBeUndefined();
    expect(Buffer.concat(out.chunks).toString()).toBe("first part");
    src.write(EICAR);
    expect(await result).toMatchObject({ kind: "blocked", released: true });
  });

  it("streaming bodies are not held but still scanned", async () => {
    const { src, out, result } = relay({}, false);
    expect(out.opened).toBeUndefined();
    src.write("data: 1\n\n");
    await tick();
    expect(out.chunks).toHaveLength(1);
    src.write(EICAR);
    expect(await result).toMatchObject({ kind: "blocked", released: true });
  });

  it("scanning off: straight through", async () => {
    const { src, out, result } = relay({ eicar: false });
    src.end(EICAR);
    expect(await result).toMatchObject({ kind: "done", scanned: 0 });
    expect(Buffer.concat(out.chunks).equals(EICAR)).toBe(true);
  });

  it("a source that dies mid-body is an error", async () => {
    const { src, result } = relay({});
    src.write("partial");
    src.destroy(new Error("client gone"));
    expect(await result).toMatchObject({ kind: "error", bytes: 7 });
  });

  it.each([
    ["application/grpc", true],
    ["application/grpc+proto", true],
    ["text/event-stream; charset=utf-8", true],
    ["text/html", false],
    [undefined, false],
  ])("isLiveStream(%s) = %s", (ct, want) => {
    expect(isLiveStream(ct)).toBe(want);
  });

  it.each([
    ["text/event-stream", "attachment; filename=setup.exe", false],
    ["application/grpc", ' Attachment;filename="x"', false],
    ["multipart/x-mixed-replace; boundary=b", ["inline", "attachment"], false],
    ["text/event-stream", "inline", true],
    ["text/event-stream", "attachmentx", true],
  ] as const)("a %s body with Content-Disposition %j is a live stream: %s (the origin names the type; a download is a file)", (ct, cd, want) => {
    expect(isLiveStream(ct, cd as string | string[])).toBe(want);
  });
});

/** An inspector whose verdict the test gives: records what it was fed. */
function scriptedInspector(room = Infinity) {
  const s = {
    room,
    fed: [] as Buffer[],
    ended: false,
    aborted: false,
    cb: undefined as ((v: InspectionVerdict) => void) | undefined,
    drains: [] as (() => void)[],
    answer(v: InspectionVerdict) {
      s.cb?.(v);
    },
  };
  const inspector: BodyInspector = {
    write(c) {
      s.fed.push(c);
      return Buffer.concat(s.fed).length < s.room;
    },
    onDrain: (cb) => s.drains.push(cb),
    end: () => (s.ended = true),
    onVerdict: (cb) => (s.cb = cb),
    abort: () => (s.aborted = true),
  };
  return { s, inspector };
}

const PASS: InspectionVerdict = { kind: "pass", note: { service: "svc", result: "clean" } };
const BLOCK: InspectionVerdict = { kind: "block", rule: "icap:svc", reason: "Bad.Thing (icap service svc)", note: { service: "svc", result: "infection", threat: "Bad.Thing" } };

function inspected(settings: { eicar?: boolean; maxBodyBytes?: number; holdMs?: number }, room?: number) {
  const src = new PassThrough();
  const out = sink();
  const { s, inspector } = scriptedInspector(room);
  const result = new Promise<RelayResult>((resolve) =>
    relayBody(src, { eicar: true, maxBodyBytes: 1 << 20, holdMs: 0, uploads: true, ...settings }, true, out, resolve, undefined, inspector),
  );
  return { src, out, s, result };
}

describe("relayBody with an inspector", () => {
  it("holds a body that has ended until the inspector passes it, then releases it whole with the note", async () => {
    const { src, out, s, result } = inspected({ eicar: false });
    src.end("clean body");
    await tick();
    expect(s.ended).toBe(true);
    expect(out.opened).toBeNull();
    s.answer(PASS);
    expect(await result).toMatchObject({ kind: "done", bytes: 10, inspection: { service: "svc", result: "clean" } });
    expect(Buffer.concat(out.chunks).toString()).toBe("clean body");
    expect(Buffer.concat(s.fed).toString()).toBe("clean body");
  });

  it("a block before release: nothing reaches the receiver; the rule and reason are the inspector's", async () => {
    const { src, out, s, result } = inspected({});
    src.end("bad body");
    await tick();
    s.answer(BLOCK);
    expect(await result).toMatchObject({ kind: "blocked", released: false, rule: "icap:svc", reason: "Bad.Thing (icap service svc)", inspection: { threat: "Bad.Thing" } });
    expect(out.opened).toBeNull();
  });

  it("past the hold bound: released, but the latest chunk and the end wait for the verdict; a block cuts the body off", async () => {
    const { src, out, s, result } = inspected({ maxBodyBytes: 4 });
    src.write("0123456789");
    await tick();
    src.write("last");
    await tick();
    expect(out.opened).toBeUndefined();
    expect(Buffer.concat(out.chunks).toString()).toBe("0123456789");
    src.end();
    await tick();
    expect(out.ended).toBe(false);
    s.answer(BLOCK);
    expect(await result).toMatchObject({ kind: "blocked", released: true, rule: "icap:svc" });
    expect(Buffer.concat(out.chunks).toString()).toBe("0123456789");
    expect(out.ended).toBe(false);
  });

  it("past the hold bound: a pass sends the withheld chunk with the end", async () => {
    const { src, out, s, result } = inspected({ maxBodyBytes: 4 });
    src.write("0123456789");
    await tick();
    src.end("last");
    await tick();
    s.answer(PASS);
    expect(await result).toMatchObject({ kind: "done", bytes: 14 });
    expect(Buffer.concat(out.chunks).toString()).toBe("0123456789last");
    expect(out.ended).toBe(true);
  });

  it("the result is reported before the sink's last bytes, held or withheld (the access log line precedes them)", async () => {
    for (const [maxBodyBytes, body] of [
      [1 << 20, ["held ", "body"]],
      [4, ["0123456789", "last"]],
    ] as const) {
      const src = new PassThrough();
      const events: string[] = [];
      const { s, inspector } = scriptedInspector();
      const out: RelaySink = {
        open: () => events.push("open"),
        write: (c) => events.push(`write ${c.toString()}`) > 0,
        end: (last) => events.push(`end ${last?.toString() ?? ""}`),
        onDrain: (cb) => setImmediate(cb),
      };
      const result = new Promise<RelayResult>((resolve) =>
        relayBody(src, { eicar: true, maxBodyBytes, holdMs: 0, uploads: true }, true, out, (r) => {
          events.push(`result ${r.kind}`);
          resolve(r);
        }, undefined, inspector),
      );
      src.write(body[0]);
      await tick();
      src.end(body[1]);
      await tick();
      expect(events.some((e) => e.startsWith("end"))).toBe(false);
      s.answer(PASS);
      expect((await result).kind).toBe("done");
      const at = events.indexOf("result done");
      expect(events.slice(at + 1)).toEqual(maxBodyBytes === 4 ? ["end last"] : ["open", "end held body"]);
    }
  });

  it("EICAR found by the built-in scan aborts the inspector", async () => {
    const { src, s, result } = inspected({});
    src.write(Buffer.concat([Buffer.from("x"), EICAR]));
    expect(await result).toMatchObject({ kind: "blocked", rule: "eicar" });
    expect(s.aborted).toBe(true);
  });

  it("waits for the inspector's room before reading more", async () => {
    const { src, s, result } = inspected({ eicar: false }, 4);
    src.write("01234567");
    await tick();
    src.write("89");
    await tick();
    expect(Buffer.concat(s.fed).toString()).toBe("01234567");
    s.room = Infinity;
    for (const d of s.drains.splice(0)) d();
    await tick();
    expect(Buffer.concat(s.fed).toString()).toBe("0123456789");
    src.end();
    await tick();
    s.answer(PASS);
    expect((await result).kind).toBe("done");
  });
});

describe("relayBody: a body of known length ends with its last bytes", () => {
  /** A released body (past the cap) of known length or not; what the sink got before and with its end. */
  async function streamed(knownLength: boolean, hold: boolean) {
    const src = new PassThrough();
    const out = { ...sink(), knownLength, endedWith: undefined as Buffer | undefined };
    const base = out.end;
    out.end = (last?: Buffer) => {
      out.endedWith = last;
      base(last);
    };
    const result = new Promise<RelayResult>((resolve) => relayBody(src, { eicar: true, maxBodyBytes: 4, holdMs: 0, uploads: true }, hold, out, resolve));
    const parts = [Buffer.from("aaaaaa"), Buffer.from("bbb"), Buffer.from("cc")];
    const beforeEnd: number[] = [];
    for (const p of parts) {
      src.write(p);
      await tick();
      beforeEnd.push(out.chunks.length);
    }
    src.end();
    await result;
    return { out, beforeEnd, parts };
  }

  it("keeps the latest chunk back and hands it to end(), when the sink says the length is known", async () => {
    const { out, beforeEnd, parts } = await streamed(true, true);
    // Past the 4-byte cap the body streams, one chunk behind.
    expect(beforeEnd).toEqual([0, 1, 2]);
    expect(out.endedWith?.toString()).toBe("cc");
    expect(Buffer.concat(out.chunks).equals(Buffer.concat(parts))).toBe(true);
  });

  it("streams every chunk at once without a known length, or for a stream by nature", async () => {
    for (const [known, hold] of [
      [false, true],
      [true, false],
    ] as const) {
      const { out, beforeEnd, parts } = await streamed(known, hold);
      expect(beforeEnd).toEqual([1, 2, 3]);
      expect(out.endedWith).toBeUndefined();
      expect(Buffer.concat(out.chunks).equals(Buffer.concat(parts))).toBe(true);
    }
  });
});
