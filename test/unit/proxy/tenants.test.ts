import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import {
  budgetKey,
  createTenantResolver,
  DEFAULT_SCRYPT_PARAMS,
  formatPasswordHash,
  hashPassword,
  nodeScrypt,
  normalizeClientAddress,
  parsePasswordHash,
  verifyPassword,
  type ScryptFunction,
  type ScryptParams,
  type TenantConfig,
  type TenantMatch,
  type TenantResolverOptions,
} from "../../../src/proxy/tenants.js";

const sha = (s: string) => createHash("sha256").update(s).digest("hex");
const basic = (s: string) => `Basic ${Buffer.from(s).toString("base64")}`;
const WRONG = { kind: "auth-required", reason: "unknown proxy user or wrong password" };
const OVER_BUDGET = { kind: "auth-required", reason: "too many failed proxy logins from this address; wait a few seconds" };

/** A fast stand-in for scrypt that records every call (a salted SHA-256: deterministic, password-dependent). */
function countingHasher(): ScryptFunction & { calls: { params: ScryptParams; salt: Buffer }[] } {
  const calls: { params: ScryptParams; salt: Buffer }[] = [];
  const f = async (password: Buffer, salt: Buffer, keylen: number, params: ScryptParams): Promise<Buffer> => {
    calls.push({ params, salt });
    return createHash("sha256").update(salt).update(password).digest().subarray(0, keylen);
  };
  return Object.assign(f, { calls });
}

/** A hash string in the passwordHash format, from parts. */
const hashString = (o: { N?: number | string; r?: number | string; p?: number | string; salt?: string; hash?: string } = {}) =>
  `scrypt$${o.N ?? 16384}$${o.r ?? 8}$${o.p ?? 1}$${o.salt ?? Buffer.alloc(16, 1).toString("base64")}$${o.hash ?? Buffer.alloc(32, 2).toString("base64")}`;

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
    ["10.1.2.3", basic("bob:PW"), WRONG],
    ["10.1.2.3", basic("eve:pw"), WRONG],
    ["10.1.2.3", "Bearer abc", { kind: "auth-required", reason: "proxy-authorization is not Basic credentials" }],
  ])("%s with %s", (addr, auth, want) => {
    // Without scrypt users every answer is synchronous, as before.
    const got = r.resolve(addr, auth);
    expect(got).not.toBeInstanceOf(Promise);
    expect(got).toEqual(want);
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
    ["a bad sha-256", [{ id: "a", users: [{ name: "u", passwordSha256: "abc" }] }], "tenants[0].users[0].passwordSha256: must be 64 hex digits"],
    ["a user with a colon", [{ id: "a", users: [{ name: "u:v", passwordSha256: sha("x") }] }], "tenants[0].users[0].name"],
    ["a user with both hashes", [{ id: "a", users: [{ name: "u", passwordHash: hashString(), passwordSha256: sha("x") }] }], "tenants[0].users[0]: has both passwordHash and passwordSha256; keep only passwordHash"],
    ["a user with neither hash", [{ id: "a", users: [{ name: "u" }] }], "tenants[0].users[0].passwordHash: missing; make one with `kmi proxy hash-password`"],
    ["a user configured twice", [{ id: "a", users: [{ name: "u", passwordHash: hashString() }] }, { id: "b", users: [{ name: "u", passwordSha256: sha("x") }] }], "tenants[1].users[0].name: user \"u\" is configured twice"],
  ])("refuses %s", (_n, tenants, message) => {
    expect(() => createTenantResolver(tenants as never, undefined)).toThrow(InvalidArgument);
    expect(() => createTenantResolver(tenants as never, undefined)).toThrow(message);
  });

  it("normalizes IPv4-mapped addresses", () => {
    expect(normalizeClientAddress("::ffff:127.0.0.1")).toBe("127.0.0.1");
    expect(normalizeClientAddress("::1")).toBe("::1");
  });
});

describe("passwordHash", () => {
  it("accepts what formatPasswordHash writes, and round-trips it", () => {
    const h = parsePasswordHash(hashString(), "f");
    expect(h.params).toEqual(DEFAULT_SCRYPT_PARAMS);
    expect(h.salt).toEqual(Buffer.alloc(16, 1));
    expect(h.hash).toEqual(Buffer.alloc(32, 2));
    expect(formatPasswordHash(h)).toBe(hashString());
    expect(parsePasswordHash(hashString({ N: 2 ** 20, r: 2, p: 16, salt: Buffer.alloc(64).toString("base64"), hash: Buffer.alloc(64).toString("base64") }), "f").params).toEqual({ N: 2 ** 20, r: 2, p: 16 });
  });

  const b64 = (n: number) => Buffer.alloc(n, 7).toString("base64");
  it.each([
    ["not a string", 42, "must be scrypt$<N>$<r>$<p>$<salt base64>$<hash base64>; make one with `kmi proxy hash-password`"],
    ["another algorithm", hashString().replace("scrypt", "bcrypt"), "must be scrypt$<N>$<r>$<p>$"],
    ["a missing part", "scrypt$16384$8$1$" + b64(16), "must be scrypt$<N>$<r>$<p>$"],
    ["an extra part", hashString() + "$x", "must be scrypt$<N>$<r>$<p>$"],
    ["a non-numeric N", hashString({ N: "16k" }), 'N "16k" is not a positive integer'],
    ["a zero r", hashString({ r: 0 }), 'r "0" is not a positive integer'],
    ["a leading zero", hashString({ p: "01" }), 'p "01" is not a positive integer'],
    ["N below 2^14", hashString({ N: 1024 }), "N must be a power of two from 16384 to 1048576, not 1024"],
    ["N above 2^20", hashString({ N: 2 ** 21 }), "N must be a power of two from 16384 to 1048576, not 2097152"],
    ["N not a power of two", hashString({ N: 20000 }), "N must be a power of two from 16384 to 1048576, not 20000"],
    ["r above 32", hashString({ r: 33 }), "r must be 1 to 32, not 33"],
    ["p above 16", hashString({ p: 17 }), "p must be 1 to 16, not 17"],
    ["too much memory", hashString({ N: 2 ** 20, r: 4 }), "N and r need 512 MiB per check; at most 256 MiB"],
    ["a short salt", hashString({ salt: b64(8) }), "the salt must be 16 to 64 bytes, not 8"],
    ["a long salt", hashString({ salt: b64(65) }), "the salt must be 16 to 64 bytes, not 65"],
    ["a salt that is not base64", hashString({ salt: "not*base64*at*all*here!!" }), "the salt is not padded base64"],
    ["an empty salt", hashString({ salt: "" }), "the salt is not padded base64"],
    ["a short hash", hashString({ hash: b64(16) }), "the hash must be 32 to 64 bytes, not 16"],
    ["an unpadded hash", hashString({ hash: b64(32).replace(/=+$/, "") }), "the hash is not padded base64"],
  ])("refuses %s, naming the field", (_n, value, message) => {
    const tenants = [{ id: "a", users: [{ name: "u", passwordSha256: sha("x") }, { name: "v", passwordHash: value }] }];
    expect(() => createTenantResolver(tenants as never, undefined)).toThrow(InvalidArgument);
    expect(() => createTenantResolver(tenants as never, undefined)).toThrow(`tenants[0].users[1].passwordHash: ${message}`);
  });

  it("hashes with scrypt (default parameters, fresh salt) and verifies right and wrong passwords", async () => {
    const a = await hashPassword("correct horse battery staple");
    const b = await hashPassword("correct horse battery staple");
    expect(a).toMatch(/^scrypt\$16384\$8\$1\$[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=$/);
    expect(a).not.toBe(b); // salted
    const h = parsePasswordHash(a, "f");
    // An independent computation of the same scrypt.
    const expected = await new Promise<Buffer>((res, rej) =>
      import("node:crypto").then((c) => c.scrypt("correct horse battery staple", h.salt, 32, { N: 16384, r: 8, p: 1 }, (e, k) => (e ? rej(e) : res(k)))),
    );
    expect(h.hash).toEqual(expected);
    expect(await verifyPassword("correct horse battery staple", h)).toBe(true);
    expect(await verifyPassword("correct horse battery stapl", h)).toBe(false);
    expect(await verifyPassword("", h)).toBe(false);
  });

  it("nodeScrypt gives scrypt the memory its parameters need (beyond Node's 32 MiB default)", async () => {
    const key = await nodeScrypt(Buffer.from("x"), Buffer.alloc(16), 32, { N: 2 ** 16, r: 8, p: 1 }); // 64 MiB
    expect(key).toHaveLength(32);
  });
});

describe("budgetKey", () => {
  it.each([
    ["10.0.0.1", "10.0.0.1"],
    ["::ffff:10.0.0.1", "10.0.0.1"],
    ["2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"],
    ["2001:db8:1:2::ffff", "2001:db8:1:2::/64"],
    ["2001:0db8:0001:0002:aaaa::1", "2001:db8:1:2::/64"],
    ["2001:db8::1", "2001:db8:0:0::/64"],
    ["::1", "0:0:0:0::/64"],
    ["fe80::1%eth0", "fe80:0:0:0::/64"],
    ["", ""],
  ])("%s → %s", (address, key) => {
    expect(budgetKey(address)).toBe(key);
  });
});

describe("scrypt users", () => {
  async function setup(o: TenantResolverOptions = {}, extra: TenantConfig[] = []) {
    const hasher = countingHasher();
    const warnings: { msg: string; fields: unknown }[] = [];
    const errors: { msg: string; fields: unknown }[] = [];
    const logger = { warn: (msg: string, fields?: unknown) => warnings.push({ msg, fields }), error: (msg: string, fields?: unknown) => errors.push({ msg, fields }) };
    // The same code as `kmi proxy hash-password`, with the counting hasher.
    const tenants: TenantConfig[] = [
      { id: "globex", users: [{ name: "dave", passwordHash: await hashPassword("dave-token", hasher) }, { name: "erin", passwordHash: await hashPassword("erin-token", hasher) }] },
      { id: "initech", users: [{ name: "bob", passwordSha256: sha("bob-token") }] },
      ...extra,
    ];
    hasher.calls.length = 0;
    let now = 1_000_000;
    const r = createTenantResolver(tenants, "dev", false, { scrypt: hasher, logger, now: () => now, ...o });
    return { r, hasher, warnings, errors, tick: (ms: number) => (now += ms) };
  }
  const DAVE: TenantMatch = { kind: "tenant", tenant: "globex", via: "credentials", user: "dave" };

  it("verifies asynchronously: the right password gives the tenant, a wrong one 407", async () => {
    const { r, hasher } = await setup();
    const ok = r.resolve("10.0.0.1", basic("dave:dave-token"));
    expect(ok).toBeInstanceOf(Promise);
    expect(await ok).toEqual(DAVE);
    const bad = r.resolve("10.0.0.1", basic("dave:dave-tokeN"));
    expect(bad).toBeInstanceOf(Promise);
    expect(await bad).toEqual(WRONG);
    expect(hasher.calls).toHaveLength(2);
  });

  it("with the real scrypt too", async () => {
    const r = createTenantResolver([{ id: "globex", users: [{ name: "dave", passwordHash: await hashPassword("dave-token") }] }], undefined);
    expect(await r.resolve("10.0.0.1", basic("dave:dave-token"))).toEqual(DAVE);
    expect(await r.resolve("10.0.0.1", basic("dave:wrong"))).toEqual(WRONG);
    expect(await r.resolve("10.0.0.1", basic("nobody:dave-token"))).toEqual(WRONG);
  });

  it("remembers a success: the next resolve is synchronous and costs no scrypt", async () => {
    const { r, hasher } = await setup();
    expect(await r.resolve("10.0.0.1", basic("dave:dave-token"))).toEqual(DAVE);
    expect(hasher.calls).toHaveLength(1);
    for (let i = 0; i < 10; i++) {
      const again = r.resolve(`10.0.0.${i + 2}`, basic("dave:dave-token"));
      expect(again).not.toBeInstanceOf(Promise);
      expect(again).toEqual(DAVE);
    }
    expect(hasher.calls).toHaveLength(1);
    // Only the exact credentials: another password for the same user is checked again.
    expect(await r.resolve("10.0.0.1", basic("dave:dave-token2"))).toEqual(WRONG);
    expect(hasher.calls).toHaveLength(2);
  });

  it("does not remember failures", async () => {
    const { r, hasher } = await setup();
    expect(await r.resolve("10.0.0.1", basic("dave:nope"))).toEqual(WRONG);
    expect(await r.resolve("10.0.0.1", basic("dave:nope"))).toEqual(WRONG);
    expect(hasher.calls).toHaveLength(2);
  });

  it("parallel resolves of the same credentials share one scrypt", async () => {
    const { r, hasher } = await setup();
    const all = await Promise.all(Array.from({ length: 8 }, (_, i) => r.resolve(`10.0.0.${i}`, basic("dave:dave-token"))));
    expect(all).toEqual(Array(8).fill(DAVE));
    expect(hasher.calls).toHaveLength(1);
  });

  it("the cache is bounded: the least recently used success is forgotten", async () => {
    const { r, hasher } = await setup({ cacheSize: 1 });
    expect(await r.resolve("10.0.0.1", basic("dave:dave-token"))).toEqual(DAVE);
    expect(await r.resolve("10.0.0.1", basic("erin:erin-token"))).toMatchObject({ kind: "tenant", user: "erin" });
    expect(r.resolve("10.0.0.1", basic("erin:erin-token"))).not.toBeInstanceOf(Promise);
    const dave = r.resolve("10.0.0.1", basic("dave:dave-token"));
    expect(dave).toBeInstanceOf(Promise);
    expect(await dave).toEqual(DAVE);
    expect(hasher.calls).toHaveLength(3);
  });

  it("a new resolver (a reloaded configuration) starts with an empty cache", async () => {
    const { r, hasher } = await setup();
    await r.resolve("10.0.0.1", basic("dave:dave-token"));
    const tenants: TenantConfig[] = [{ id: "globex", users: [{ name: "dave", passwordHash: await hashPassword("dave-token", hasher) }] }];
    const r2 = createTenantResolver(tenants, undefined, false, { scrypt: hasher });
    expect(r2.resolve("10.0.0.1", basic("dave:dave-token"))).toBeInstanceOf(Promise);
  });

  it("an unknown user costs the same scrypt (same parameters) as a known one, and 407", async () => {
    const { r, hasher } = await setup();
    expect(await r.resolve("10.0.0.1", basic("mallory:dave-token"))).toEqual(WRONG);
    expect(await r.resolve("10.0.0.1", basic("dave:wrong"))).toEqual(WRONG);
    expect(hasher.calls).toHaveLength(2);
    expect(hasher.calls[0]!.params).toEqual(hasher.calls[1]!.params);
    expect(hasher.calls[0]!.salt).toHaveLength(16);
  });

  it("a wrong password costs a scrypt only within the per-address budget; past it, 407 at once", async () => {
    const { r, hasher, tick } = await setup();
    for (let i = 0; i < 5; i++) expect(await r.resolve("10.0.0.1", basic(i % 2 === 0 ? "dave:guess" + i : "mallory:x" + i))).toEqual(WRONG);
    expect(hasher.calls).toHaveLength(5);
    for (const creds of ["dave:guess9", "mallory:y", "dave:dave-token"]) {
      const over = r.resolve("10.0.0.1", basic(creds));
      expect(over).not.toBeInstanceOf(Promise);
      expect(over).toEqual(OVER_BUDGET);
    }
    expect(hasher.calls).toHaveLength(5);
    // Other addresses have their own budget.
    expect(await r.resolve("10.0.0.2", basic("dave:dave-token"))).toEqual(DAVE);
    expect(hasher.calls).toHaveLength(6);
    // A remembered success still works from the exhausted address.
    expect(r.resolve("10.0.0.1", basic("dave:dave-token"))).toEqual(DAVE);
    // passwordSha256 users are not hashed with scrypt and keep their synchronous answer.
    expect(r.resolve("10.0.0.1", basic("bob:bob-token"))).toEqual({ kind: "tenant", tenant: "initech", via: "credentials", user: "bob" });
    // The window slides: after 10 s the address may try again.
    tick(10_001);
    expect(await r.resolve("10.0.0.1", basic("erin:erin-token"))).toMatchObject({ kind: "tenant", user: "erin" });
    expect(hasher.calls).toHaveLength(7);
  });

  it("checks running at once count against the budget (no burst of parallel guesses)", async () => {
    const { r, hasher } = await setup();
    const answers = Array.from({ length: 8 }, (_, i) => r.resolve("10.0.0.1", basic(`dave:guess${i}`)));
    expect(answers.filter((a) => a instanceof Promise)).toHaveLength(5);
    expect(answers.filter((a) => !(a instanceof Promise))).toEqual(Array(3).fill(OVER_BUDGET));
    expect(await Promise.all(answers)).toEqual([...Array(5).fill(WRONG), ...Array(3).fill(OVER_BUDGET)]);
    expect(hasher.calls).toHaveLength(5);
  });

  it("an IPv6 client's budget covers its whole /64", async () => {
    const { r, hasher } = await setup();
    for (let i = 0; i < 5; i++) expect(await r.resolve(`2001:db8:1:2::${i + 1}`, basic(`dave:guess${i}`))).toEqual(WRONG);
    expect(r.resolve("2001:db8:1:2:ffff::9", basic("dave:guess"))).toEqual(OVER_BUDGET);
    expect(await r.resolve("2001:db8:1:3::1", basic("dave:guess"))).toEqual(WRONG);
    expect(hasher.calls).toHaveLength(6);
  });

  it("runs at most maxConcurrentHashes scrypts at once", async () => {
    let running = 0;
    let peak = 0;
    const slow: ScryptFunction = async (password, salt, keylen) => {
      running++;
      peak = Math.max(peak, running);
      await new Promise((res) => setTimeout(res, 5));
      running--;
      return createHash("sha256").update(salt).update(password).digest().subarray(0, keylen);
    };
    const tenants: TenantConfig[] = [{ id: "globex", users: [{ name: "dave", passwordHash: await hashPassword("dave-token", slow) }] }];
    const r = createTenantResolver(tenants, undefined, false, { scrypt: slow, maxConcurrentHashes: 2 });
    const answers = await Promise.all(Array.from({ length: 9 }, (_, i) => r.resolve(`10.0.${i}.1`, basic(i === 4 ? "dave:dave-token" : `dave:guess${i}`))));
    expect(answers.filter((a) => a.kind === "tenant")).toHaveLength(1);
    expect(peak).toBe(2);
  });

  it("a failing scrypt is a 407 and an error log line, never a rejection", async () => {
    const failing: ScryptFunction = async () => {
      throw new Error("out of memory");
    };
    const errors: unknown[] = [];
    const tenants: TenantConfig[] = [{ id: "globex", users: [{ name: "dave", passwordHash: hashString() }] }];
    const r = createTenantResolver(tenants, undefined, false, { scrypt: failing, logger: { warn: () => {}, error: (m) => errors.push(m) } });
    expect(await r.resolve("10.0.0.1", basic("dave:x"))).toEqual(WRONG);
    expect(errors).toEqual(["proxy password check failed"]);
  });

  it("warns once per passwordSha256 user at construction, naming it, never for passwordHash users", async () => {
    const { warnings, r } = await setup({}, [{ id: "umbrella", users: [{ name: "carol", passwordSha256: sha("c") }] }]);
    expect(warnings.map((w) => w.fields)).toEqual([
      { tenant: "initech", user: "bob" },
      { tenant: "umbrella", user: "carol" },
    ]);
    expect(warnings[0]!.msg).toContain("unsalted passwordSha256");
    expect(warnings[0]!.msg).toContain("kmi proxy hash-password");
    r.resolve("10.0.0.1", basic("bob:bob-token"));
    expect(warnings).toHaveLength(2);
  });

  it("address and default matches stay synchronous next to scrypt users", async () => {
    const { r, hasher } = await setup({}, [{ id: "acme", cidrs: ["10.9.0.0/16"] }]);
    expect(r.resolve("10.9.1.1", undefined)).toEqual({ kind: "tenant", tenant: "acme", via: "address" });
    expect(r.resolve("10.8.1.1", undefined)).toEqual({ kind: "tenant", tenant: "dev", via: "default" });
    expect(hasher.calls).toHaveLength(0);
  });
});
