import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import { createTenantResolver, normalizeClientAddress } from "../../../src/proxy/tenants.js";

const sha = (s: string) => createHash("sha256").update(s).digest("hex");
const basic = (s: string) => `Basic ${Buffer.from(s).toString("base64")}`;

describe("tenant resolver", () => {
  const r = createTenantResolver(
    [
      { id: "acme", cidrs: ["10.0.0.0/8", "fd00::/8"] },
      { id: "globex", cidrs: ["10.1.0.0/16", "192.0.2.7"], users: [{ name: "bob", passwordSha256: sha("pw") }] },
    ],
    "dev",
  );

  it.each([
    ["10.1.2.3", undefined, { kind: "tenant", tenant: "acme", via: "address" }], // first match in config order
    ["::ffff:192.0.2.7", undefined, { kind: "tenant", tenant: "globex", via: "address" }],
    ["fd12::1", undefined, { kind: "tenant", tenant: "acme", via: "address" }],
    ["203.0.113.9", undefined, { kind: "tenant", tenant: "dev", via: "default" }],
    ["10.1.2.3", basic("bob:pw"), { kind: "tenant", tenant: "globex", via: "credentials", user: "bob" }],
    ["10.1.2.3", basic("bob:PW"), { kind: "auth-required", reason: "unknown proxy user or wrong password" }],
    ["10.1.2.3", basic("eve:pw"), { kind: "auth-required", reason: "unknown proxy user or wrong password" }],
    ["10.1.2.3", "Bearer abc", { kind: "auth-required", reason: "proxy-authorization is not Basic credentials" }],
  ])("%s with %s", (addr, auth, want) => {
    expect(r.resolve(addr, auth)).toEqual(want);
  });

  it("without a default tenant an unmatched client has none; requireAuth demands credentials", () => {
    expect(createTenantResolver([{ id: "a", cidrs: ["10.0.0.0/8"] }], undefined).resolve("1.2.3.4", undefined)).toEqual({ kind: "no-tenant" });
    expect(createTenantResolver([], "dev", true).resolve("1.2.3.4", undefined)).toEqual({ kind: "auth-required", reason: "proxy credentials required" });
  });

  it.each([
    ["a bad tenant id", [{ id: "no spaces" }], "tenants[0].id"],
    ["a duplicate tenant", [{ id: "a" }, { id: "a" }], "tenants[1].id: tenant \"a\" is configured twice"],
    ["a bad range", [{ id: "a", cidrs: ["10.0.0.0/40"] }], "tenants[0].cidrs[0]: prefix length"],
    ["a non-address", [{ id: "a", cidrs: ["example.com/8"] }], "tenants[0].cidrs[0]: \"example.com/8\" is not an address range"],
    ["a bad hash", [{ id: "a", users: [{ name: "u", passwordSha256: "abc" }] }], "tenants[0].users[0].passwordSha256: must be 64 hex digits"],
    ["a user with a colon", [{ id: "a", users: [{ name: "u:v", passwordSha256: sha("x") }] }], "tenants[0].users[0].name"],
  ])("refuses %s", (_n, tenants, message) => {
    expect(() => createTenantResolver(tenants as never, undefined)).toThrow(InvalidArgument);
    expect(() => createTenantResolver(tenants as never, undefined)).toThrow(message);
  });

  it("normalizes IPv4-mapped addresses", () => {
    expect(normalizeClientAddress("::ffff:127.0.0.1")).toBe("127.0.0.1");
    expect(normalizeClientAddress("::1")).toBe("::1");
  });
});
