import { PassThrough } from "node:stream";
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

function relay(settings: { eicar?: boolean; maxBodyBytes?: number; holdMs?: number }, hold = true) {
  const src = new PassThrough();
  const out = sink();
  const result = new Promise<RelayResult>((resolve) =>
    relayBody(src, { eicar: true, maxBodyBytes: 1 << 20, holdMs: 0, ...settings }, hold, out, resolve),
  );
  return { src, out, result };
}

const tick = () => new Promise((r) => setImmediate(r));

describe("relayBody", () => {
  it("holds a clean body until its end, then releases it with its length", async () => {
    const { src, out, result } = relay({});
    src.write("hello ");
    await tick();
    expect(out.opened).toBeNull();
    src.end("world");
    expect(await result).toEqual({ kind: "done", bytes: 11, scanned: 11 });
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
    expect(r).toEqual({ kind: "done", bytes: 13 + EICAR.length, scanned: 10 });
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
