import { describe, expect, it } from "vitest";
import { DestinationDenied, DestinationGuard, isDestinationDenied } from "../../../src/proxy/destinations.js";

describe("DestinationGuard.refusal", () => {
  const guard = new DestinationGuard([], []);

  it.each([
    ["127.0.0.1", "loopback address"],
    ["127.255.1.2", "loopback address"],
    ["0.0.0.0", "\"this network\" address"],
    ["10.20.30.40", "private address"],
    ["172.16.0.1", "private address"],
    ["172.31.255.254", "private address"],
    ["192.168.1.1", "private address"],
    ["100.64.0.1", "shared (carrier-grade NAT) address"],
    ["169.254.169.254", "link-local address (cloud metadata lives here)"],
    ["224.0.0.1", "multicast address"],
    ["255.255.255.255", "reserved address"],
    ["::1", "loopback address"],
    ["::", "unspecified address"],
    ["fd00::1", "unique-local (private) address"],
    ["fe80::1", "link-local address"],
    ["fe80::1%eth0", "link-local address"],
    ["[::1]", "loopback address"],
    ["ff02::1", "multicast address"],
    // IPv4 inside IPv6, in the spellings a client can send.
    ["::ffff:127.0.0.1", "loopback address"],
    ["::ffff:7f00:1", "loopback address"],
    ["0:0:0:0:0:ffff:a9fe:a9fe", "link-local address (cloud metadata lives here)"],
    ["::10.0.0.1", "private address"],
    ["64:ff9b::192.168.0.1", "private address"],
    ["::ffff:0:7f00:1", "loopback address"],
    ["64:ff9b:1::a9fe:a9fe", "link-local address (cloud metadata lives here)"],
    ["2002:7f00:1::", "loopback address"],
    ["2002:a00:1::1", "private address"],
    ["fec0::1", "site-local (private) address"],
  ])("refuses %s as a %s", (address, kind) => {
    expect(guard.refusal(address)).toBe(kind);
  });

  it.each(["93.184.215.14", "8.8.8.8", "172.32.0.1", "172.15.255.255", "100.128.0.1", "2606:4700::6810:84e5", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8"])(
    "lets the public address %s through",
    (address) => {
      expect(guard.refusal(address)).toBeUndefined();
    },
  );

  it("refuses this machine's own addresses, public ones included, unless allowed; rereads them on refresh", () => {
    const g = new DestinationGuard([], ["203.0.113.7", "2001:db8::7", "127.0.0.1"]);
    expect(g.refusal("203.0.113.7")).toBe("address of this machine");
    expect(g.refusal("::ffff:203.0.113.7")).toBe("address of this machine");
    expect(g.refusal("2001:DB8::7")).toBe("address of this machine");
    expect(g.refusal("203.0.113.8")).toBeUndefined();
    g.refreshOwnAddresses(["203.0.113.8"]);
    expect(g.refusal("203.0.113.7")).toBeUndefined();
    expect(g.refusal("203.0.113.8")).toBe("address of this machine");
    expect(new DestinationGuard(["203.0.113.0/24"], ["203.0.113.7"]).refusal("203.0.113.7")).toBeUndefined();
    // By default the interfaces' addresses: loopback at least.
    expect(new DestinationGuard().refusal("127.0.0.1")).toBe("loopback address");
  });

  it("lets allowed ranges through and nothing more", () => {
    const g = new DestinationGuard(["127.0.0.0/8", "10.1.0.0/16", "fd12::/16"]);
    expect(g.refusal("127.0.0.1")).toBeUndefined();
    expect(g.refusal("::ffff:127.0.0.1")).toBeUndefined();
    expect(g.refusal("10.1.200.3")).toBeUndefined();
    expect(g.refusal("fd12:3::1")).toBeUndefined();
    expect(g.refusal("10.2.0.1")).toBe("private address");
    expect(g.refusal("::1")).toBe("loopback address");
    expect(g.refusal("169.254.169.254")).toBe("link-local address (cloud metadata lives here)");
    expect(g.allowPrivate).toEqual(["127.0.0.0/8", "10.1.0.0/16", "fd12::/16"]);
  });

  it("refuses a bad range naming the entry", () => {
    expect(() => new DestinationGuard(["127.0.0.0/8", "10.0.0.0/40"])).toThrow('allowPrivate[1]: prefix length in "10.0.0.0/40" must be 0 to 32');
    expect(() => new DestinationGuard(["intranet"])).toThrow('allowPrivate[0]: "intranet" is not an address range');
  });
});

describe("DestinationGuard.checkLiteral and lookup", () => {
  const guard = new DestinationGuard();
  const lookup = (g: DestinationGuard, host: string, all: boolean) =>
    new Promise<{ err: Error | null; address?: unknown }>((resolve) => {
      g.lookup(host, { all } as never, ((err: Error | null, address?: unknown) => resolve({ err, address })) as never);
    });

  it("checkLiteral throws DestinationDenied for a refused IP literal and ignores names", () => {
    let err: unknown;
    try {
      guard.checkLiteral("[::ffff:10.0.0.1]");
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(DestinationDenied);
    expect(isDestinationDenied(err)).toBe(true);
    expect((err as DestinationDenied).message).toBe(
      "::ffff:10.0.0.1 is a private address; the proxy does not connect to private or special-use addresses unless the operator allows the range (kmi proxy --allow-private)",
    );
    expect(() => guard.checkLiteral("8.8.8.8")).not.toThrow();
    expect(() => guard.checkLiteral("example.com")).not.toThrow();
  });

  it("a name that resolves only to loopback is refused after resolution, naming the name and the address", async () => {
    const r = await lookup(guard, "localhost", true);
    expect(isDestinationDenied(r.err)).toBe(true);
    expect(r.err?.message).toMatch(/^localhost \((127\.0\.0\.1|::1)\) is a loopback address; /);
  });

  it("with loopback allowed, the lookup answers in the form asked for (one address, or all)", async () => {
    const g = new DestinationGuard(["127.0.0.0/8", "::1"]);
    const all = await lookup(g, "localhost", true);
    expect(all.err).toBeNull();
    expect(Array.isArray(all.address)).toBe(true);
    expect((all.address as { address: string }[]).map((a) => a.address)).toEqual(expect.arrayContaining([expect.stringMatching(/^(127\.0\.0\.1|::1)$/)]));
    const one = await lookup(g, "localhost", false);
    expect(one.err).toBeNull();
    expect(one.address).toMatch(/^(127\.0\.0\.1|::1)$/);
  });

  it("keeps only the allowed addresses of a name", async () => {
    // localhost may resolve to both 127.0.0.1 and ::1; allowing only IPv4 loopback leaves only it.
    const g = new DestinationGuard(["127.0.0.0/8"]);
    const all = await lookup(g, "localhost", true);
    expect(all.err).toBeNull();
    expect((all.address as { address: string }[]).map((a) => a.address)).toEqual(["127.0.0.1"]);
  });

  it("passes a resolver failure through unchanged", async () => {
    const r = await lookup(guard, "no-such-host.invalid", true);
    expect(isDestinationDenied(r.err)).toBe(false);
    expect((r.err as NodeJS.ErrnoException).code).toMatch(/^(ENOTFOUND|EAI_AGAIN)$/);
  }, 20_000);
});
