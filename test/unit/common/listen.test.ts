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
