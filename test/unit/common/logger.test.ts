import { describe, expect, it } from "vitest";
import { createLogger, isSecretFieldName, parseLogLevel, secretDigest } from "../../../src/common/logger.js";

function capture(level?: "debug" | "info" | "warn" | "error") {
  const lines: string[] = [];
  const logger = createLogger({ ...(level ? { level } : {}), write: (l) => void lines.push(l), now: () => new Date("2026-01-02T03:04:05.000Z") });
  return { logger, lines, parsed: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

describe("logger", () => {
  it("writes one JSON object per line with time, level, msg and fields", () => {
    const { logger, lines } = capture();
    logger.info("listening", { port: 8443, tls: true });
    expect(lines).toEqual(['{"time":"2026-01-02T03:04:05.000Z","level":"info","msg":"listening","port":8443,"tls":true}\n']);
  });

  it("drops lines below its level", () => {
    const { logger, parsed } = capture("warn");
    logger.debug("d");
    logger.info("i");
    logger.warn("w");
    logger.error("e");
    expect(parsed().map((l) => l["level"])).toEqual(["warn", "error"]);
    expect(logger.enabled("info")).toBe(false);
    expect(logger.enabled("error")).toBe(true);
  });

  it("child loggers add their fields; call fields win", () => {
    const { logger, parsed } = capture();
    logger.child({ program: "kdc", a: 1 }).child({ server: "x" }).info("m", { a: 2 });
    expect(parsed()[0]).toMatchObject({ program: "kdc", server: "x", a: 2 });
  });

  it("never writes a secret-named field: it logs the digest instead", () => {
    const { logger, lines } = capture();
    logger.info("token made", { token: "s3cr3t-value", privateKey: new Uint8Array([1, 2, 3]), nested: { password: "hunter2" }, tokenId: "tok-1" });
    const text = lines.join("");
    expect(text).not.toContain("s3cr3t-value");
    expect(text).not.toContain("hunter2");
    const line = JSON.parse(text) as Record<string, unknown>;
    expect(line["token"]).toBe(secretDigest("s3cr3t-value"));
    expect(line["privateKey"]).toBe(secretDigest(new Uint8Array([1, 2, 3])));
    expect(line["nested"]).toEqual({ password: secretDigest("hunter2") });
    expect(line["tokenId"]).toBe("tok-1");
  });

  it("serializes errors with their cause, bigints, bytes, and survives cycles", () => {
    const { logger, parsed } = capture();
    const cyclic: Record<string, unknown> = { a: 1 };
    cyclic["self"] = cyclic;
    logger.error("failed", { err: new Error("outer", { cause: new Error("inner") }), n: 10n, b: new Uint8Array(4), cyclic });
    const l = parsed()[0]!;
    expect(l["err"]).toMatchObject({ name: "Error", message: "outer", cause: { message: "inner" } });
    expect(l["n"]).toBe("10");
    expect(l["b"]).toBe("<4 bytes>");
    expect(l["cyclic"]).toEqual({ a: 1, self: "[circular]" });
  });

  it("secretDigest is a stable, short sha256 prefix", () => {
    expect(secretDigest("abc")).toBe("sha256:ba7816bf8f01cfea");
    expect(secretDigest(Buffer.from("abc"))).toBe("sha256:ba7816bf8f01cfea");
  });

  it.each([
    ["token", true],
    ["Authorization", true],
    ["private_key", true],
    ["join-token", true],
    ["tokenId", false],
    ["keyId", false],
    ["fingerprint", false],
  ])("isSecretFieldName(%j) is %s", (name, secret) => {
    expect(isSecretFieldName(name)).toBe(secret);
  });

  it("parses level names and refuses others with the list", () => {
    expect(parseLogLevel("DEBUG")).toBe("debug");
    expect(() => parseLogLevel("verbose")).toThrow('log level "verbose" is not one of debug, info, warn, error');
  });
});
