import { describe, expect, it } from "vitest";
import { formatListenAddress, parseListenAddress, parseSocketMode } from "../../../src/common/listen.js";

describe("parseListenAddress", () => {
  it.each([
    ["127.0.0.1:8443", { kind: "tcp", host: "127.0.0.1", port: 8443 }],
    ["localhost:0", { kind: "tcp", host: "localhost", port: 0 }],
    ["[::1]:9000", { kind: "tcp", host: "::1", port: 9000 }],
    ["0.0.0.0:65535", { kind: "tcp", host: "0.0.0.0", port: 65535 }],
    ["unix:/run/kmi/agent.sock", { kind: "unix", path: "/run/kmi/agent.sock" }],
    ["/run/kmi/agent.sock", { kind: "unix", path: "/run/kmi/agent.sock" }],
  ])("parses %j", (input, expected) => {
    expect(parseListenAddress(input)).toEqual(expected);
    expect(parseListenAddress(formatListenAddress(parseListenAddress(input)))).toEqual(expected);
  });

  it.each([
    ["", "listen address is empty; use host:port, [ipv6]:port, unix:/absolute/path or /absolute/path"],
    ["8443", 'listen address "8443": expected host:port, [ipv6]:port, unix:/absolute/path or /absolute/path'],
    [":8443", 'listen address ":8443": expected host:port, [ipv6]:port, unix:/absolute/path or /absolute/path'],
    ["localhost:http", 'listen address "localhost:http": port "http" is not a number from 0 to 65535'],
    ["localhost:70000", 'listen address "localhost:70000": port "70000" is not a number from 0 to 65535'],
    ["::1:8443", 'listen address "::1:8443": put an IPv6 address in brackets, e.g. [::1]:8443'],
    ["[::1]8443", 'listen address "[::1]8443": expected [ipv6]:port, e.g. [::1]:8443'],
    ["[localhost]:1", 'listen address "[localhost]:1": "localhost" is not an IPv6 address'],
    ["unix:run/agent.sock", 'listen address "unix:run/agent.sock": the socket path must be absolute, e.g. unix:/run/kmi/agent.sock'],
    ["/" + "x".repeat(120), `listen address "/${"x".repeat(120)}": the socket path is longer than 107 bytes; choose a shorter path`],
  ])("refuses %j", (input, message) => {
    expect(() => parseListenAddress(input)).toThrow(message);
  });
});

describe("parseSocketMode", () => {
  it.each([["0600", 0o600], ["600", 0o600], ["0o660", 0o660], ["0660", 0o660]])("parses %j", (v, mode) => {
    expect(parseSocketMode(v)).toBe(mode);
  });
  it.each(["0666", "0777", "0644", "abc", ""])("refuses %j", (v) => {
    expect(() => parseSocketMode(v)).toThrow(/is not 0600 or 0660; another user must never reach the socket/);
  });
});

describe("listenUnixSocket", () => {
  const socketIn = async (mode: number) => {
    const { mkdtemp, chmod, rm, stat } = await import("node:fs/promises");
    const { tmpdir } = await import("node:os");
    const { join } = await import("node:path");
    const { listenUnixSocket, removeUnixSocket } = await import("../../../src/common/listen.js");
    const dir = await mkdtemp(join(tmpdir(), "kmi-listen-"));
    await chmod(dir, mode);
    const path = join(dir, "agent.sock");
    try {
      const server = await listenUnixSocket(path, { mode: 0o600 }, (s) => s.destroy());
      const st = await stat(path);
      server.close();
      await removeUnixSocket(path);
      return { ok: true as const, mode: st.mode & 0o777 };
    } catch (err) {
      return { ok: false as const, error: (err as Error).message };
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  };

  it("binds the socket 0600 in a directory only its owner writes, and in a sticky one everyone writes (like /tmp)", async () => {
    expect(await socketIn(0o700)).toEqual({ ok: true, mode: 0o600 });
    expect(await socketIn(0o1777)).toEqual({ ok: true, mode: 0o600 });
  });

  it("refuses a directory every user may write without the sticky bit, saying what to do", async () => {
    const r = await socketIn(0o777);
    expect(r.ok).toBe(false);
    expect(r).toMatchObject({ error: expect.stringMatching(/is writable by every user and has no sticky bit, so another user could replace the socket; .*chmod \+t/) });
  });
});
