import { PassThrough } from "node:stream";
import { brotliCompressSync, deflateSync, gzipSync } from "node:zlib";
import { describe, expect, it } from "vitest";
import { isStreamingContentType, relayBody, type RelayResult, type RelaySink } from "../../../src/proxy/body-relay.js";
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
    relayBody(src, { eicar: true, maxBodyBytes: 1 << 20, holdMs: 0, ...settings }, hold, out, resolve, encoding),
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
  ])("isStreamingContentType(%s) = %s", (ct, want) => {
    expect(isStreamingContentType(ct)).toBe(want);
  });
});
