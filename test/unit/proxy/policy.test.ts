import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import { compilePolicies, defaultPolicy, parsePolicy, ruleId } from "../../../src/proxy/policy.js";

describe("parsePolicy", () => {
  it("an empty document is the default: nothing blocked, EICAR scanned up to 1 MiB, auto-bypass off", () => {
    const p = parsePolicy({});
    expect(p.blockedHost("anything.example")).toBeUndefined();
    expect(p.scan).toEqual({ eicar: true, maxBodyBytes: 1048576, holdMs: 2000, uploads: true });
    expect(p.icap).toEqual({});
    expect(p.autoBypass.enabled).toBe(false);
    expect(p.nonTls).toBe("block");
    expect(p.uninspectableAlpn).toBe("block");
    expect(p.clientCertOrigins).toBe("bypass");
    expect(defaultPolicy().scan.eicar).toBe(true);
  });

  it.each([
    ["not an object", [], "policy: must be an object"],
    ["an unknown key", { blockHost: [] }, "policy.blockHost: unknown field"],
    ["blockHosts not a list", { blockHosts: "x" }, "policy.blockHosts: must be a list of patterns"],
    ["a host with a space", { blockHosts: ["a b"] }, 'policy.blockHosts[0]: "a b" is not a host pattern'],
    ["a wildcard in the middle", { blockHosts: ["ok.example", "a.*.example"] }, 'policy.blockHosts[1]: "a.*.example" is not a host pattern'],
    ["a rule object with an unknown field", { blockHosts: [{ pattern: "x.example", why: "y" }] }, "policy.blockHosts[0].why: unknown field"],
    ["an empty rule name", { bypassHosts: [{ pattern: "x.example", name: "" }] }, "policy.bypassHosts[0].name: must be a non-empty string"],
    ["a url pattern with a space", { blockUrls: ["http://a b"] }, "policy.blockUrls[0]:"],
    ["a negative scan size", { scan: { maxBodyBytes: -1 } }, "policy.scan.maxBodyBytes: must be an integer from 0"],
    ["eicar not a boolean", { scan: { eicar: "yes" } }, "policy.scan.eicar: must be true or false"],
    ["a zero threshold", { autoBypass: { threshold: 0 } }, "policy.autoBypass.threshold: must be an integer from 1"],
    ["a bad nonTls", { nonTls: "drop" }, 'policy.nonTls: must be "tunnel" or "block"'],
    ["a bad uninspectableAlpn", { uninspectableAlpn: "bypass" }, 'policy.uninspectableAlpn: must be "tunnel" or "block"'],
    ["a bad clientCertOrigins", { clientCertOrigins: "tunnel" }, 'policy.clientCertOrigins: must be "bypass" or "block"'],
    ["uploads not a boolean", { scan: { uploads: 1 } }, "policy.scan.uploads: must be true or false"],
    ["an unknown icap side", { icap: { options: {} } }, "policy.icap.options: unknown field"],
    ["an icap url that is not icap://", { icap: { respmod: { url: "http://x/y" } } }, "policy.icap.respmod.url: must be an icap:// url"],
    ["a bad fail mode", { icap: { reqmod: { url: "icap://x/y", failMode: "maybe" } } }, 'policy.icap.reqmod.failMode: must be "open"'],
    ["a zero read timeout", { icap: { respmod: { url: "icap://x/y", readTimeoutMs: 0 } } }, "policy.icap.respmod.readTimeoutMs: must be an integer from 1"],
    ["a bad service name", { icap: { respmod: { url: "icap://x/y", name: "a b" } } }, "policy.icap.respmod.name: must be 1 to 64"],
  ])("refuses %s, naming the field", (_n, doc, message) => {
    expect(() => parsePolicy(doc)).toThrow(InvalidArgument);
    expect(() => parsePolicy(doc)).toThrow(message);
  });
});

describe("icap settings and tenant policies", () => {
  it("reads a service with its defaults: fail-closed, 2 s connect, 30 s read, 32 connections", () => {
    const p = parsePolicy({ icap: { respmod: { url: "icap://127.0.0.1:1344/avscan" } } });
    expect(p.icap.respmod).toMatchObject({ name: "127.0.0.1:1344", failMode: "closed", connectTimeoutMs: 2000, readTimeoutMs: 30000, maxConnections: 32 });
    expect(p.icap.reqmod).toBeUndefined();
  });

  it("a tenant's fields replace the global ones; the rest are inherited", () => {
    const global = { blockHosts: ["evil.example"], scan: { maxBodyBytes: 10 }, icap: { respmod: { url: "icap://i/s" } } };
    const set = compilePolicies(global, [{ id: "a" }, { id: "b", policy: { icap: {}, blockUrls: ["*/x"] } }]);
    expect(set.byTenant.has("a")).toBe(false);
    const b = set.byTenant.get("b")!;
    expect(b.icap).toEqual({});
    expect(b.blockedUrl("https://h/x")).toBeDefined();
    expect(b.blockedHost("evil.example")).toBeDefined();
    expect(b.scan.maxBodyBytes).toBe(10);
    expect(set.global.blockedUrl("https://h/x")).toBeUndefined();
  });

  it("a bad tenant policy names the tenant and the field", () => {
    expect(() => compilePolicies({}, [{ id: "b", policy: { scan: { holdMs: -1 } } }])).toThrow('tenant "b": policy.scan.holdMs: must be an integer');
  });
});

describe("host rules", () => {
  const p = parsePolicy({ blockHosts: ["Evil.Example.", { name: "ads", pattern: "*.ads.example" }], bypassHosts: ["*.bank.example", "10.1.2.3"] });

  it.each([
    ["evil.example", "block-host:Evil.Example."],
    ["EVIL.example.", "block-host:Evil.Example."],
    ["x.ads.example", "block-host:ads"],
    ["a.b.c.ads.example", "block-host:ads"],
    ["ads.example", undefined],
    ["notads.example", undefined],
    ["evil.example.com", undefined],
  ])("blockedHost(%s) → %s", (host, rule) => {
    const r = p.blockedHost(host);
    expect(r === undefined ? undefined : ruleId(r)).toBe(rule);
  });

  it("bypass patterns, including IP literals", () => {
    expect(p.bypassedHost("www.bank.example")?.kind).toBe("bypass-host");
    expect(p.bypassedHost("10.1.2.3")?.name).toBe("10.1.2.3");
    expect(p.bypassedHost("[10.1.2.3]")?.name).toBe("10.1.2.3");
    expect(p.bypassedHost("bank.example")).toBeUndefined();
  });
});

describe("url rules", () => {
  const p = parsePolicy({ blockUrls: ["https://files.example/*.exe", { name: "admin", pattern: "*/admin*" }, "*://*.example/secret?id=*"] });

  it.each([
    ["https://files.example/tools/setup.exe", "block-url:https://files.example/*.exe"],
    ["http://files.example/setup.exe", undefined],
    ["https://files.example/setup.exe.txt", undefined],
    ["https://a.example:8443/admin/x", "block-url:admin"],
    ["http://b.example/admin", "block-url:admin"],
    ["https://x.example/secret?id=1", "block-url:*://*.example/secret?id=*"],
    ["https://x.example/secretive", undefined],
  ])("blockedUrl(%s) → %s", (url, rule) => {
    const r = p.blockedUrl(url);
    expect(r === undefined ? undefined : ruleId(r)).toBe(rule);
  });

  it("regex characters in patterns are literal", () => {
    const q = parsePolicy({ blockUrls: ["https://a.example/(x)+[y].php"] });
    expect(q.blockedUrl("https://a.example/(x)+[y].php")).toBeDefined();
    expect(q.blockedUrl("https://a.example/xx[y]Xphp")).toBeUndefined();
  });
});
