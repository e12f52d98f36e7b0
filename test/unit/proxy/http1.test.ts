import { describe, expect, it } from "vitest";
import { endToEndHeaders, normalizedPath, requestBlockRule } from "../../../src/proxy/http1.js";
import { parsePolicy } from "../../../src/proxy/policy.js";

describe("endToEndHeaders", () => {
  it("drops hop-by-hop headers, those the Connection header lists, and proxy credentials", () => {
    const raw = [
      "Host", "a.example",
      "Connection", "keep-alive, X-Private",
      "Keep-Alive", "timeout=5",
      "Proxy-Authorization", "Basic abc",
      "Proxy-Connection", "keep-alive",
      "Transfer-Encoding", "chunked",
      "TE", "trailers",
      "X-Private", "secret",
      "Accept", "*/*",
      "Expect", "100-continue",
    ];
    expect(endToEndHeaders(raw)).toEqual(["Host", "a.example", "Accept", "*/*"]);
  });

  it("keeps a WebSocket handshake's Upgrade, with exactly Connection: Upgrade", () => {
    const raw = ["Host", "a", "Connection", "Upgrade, keep-alive", "Upgrade", "websocket", "Sec-WebSocket-Key", "k"];
    expect(endToEndHeaders(raw, true)).toEqual(["Host", "a", "Upgrade", "websocket", "Sec-WebSocket-Key", "k", "Connection", "Upgrade"]);
  });

  it("replaces Host with the absolute URL's authority for plain proxy requests", () => {
    expect(endToEndHeaders(["host", "evil.example", "Accept", "x"], false, "real.example:8080")).toEqual(["Host", "real.example:8080", "Accept", "x"]);
  });
});

describe("requestBlockRule", () => {
  const p = parsePolicy({ blockHosts: ["evil.example"], blockUrls: ["https://a.example/x*"] });
  it.each([
    ["https", "evil.example:443", "/", undefined, "block-host:evil.example"],
    ["https", "a.example:443", "/x1", undefined, "block-url:https://a.example/x*"],
    ["https", "A.EXAMPLE", "/x1", undefined, "block-url:https://a.example/x*"],
    ["http", "a.example", "/x1", undefined, undefined],
    ["https", "front.example", "/", "evil.example", "block-host:evil.example"],
    ["https", "a.example:8443", "/x1", undefined, undefined],
    // A trailing dot names the same host.
    ["https", "a.example.", "/x1", undefined, "block-url:https://a.example/x*"],
    ["https", "A.example.:443", "/x1", undefined, "block-url:https://a.example/x*"],
    // Inside a tunnel the request goes to the tunnel's host whatever Host says.
    ["https", "front.example", "/x1", "a.example:443", "block-url:https://a.example/x*"],
    ["https", "front.example", "/x1", "a.example:8443", undefined],
    // Spellings a normalizing origin serves as /x1 match too.
    ["https", "a.example", "/%78%31", undefined, "block-url:https://a.example/x*"],
    ["https", "a.example", "/./x1", undefined, "block-url:https://a.example/x*"],
    ["https", "a.example", "//x1", undefined, "block-url:https://a.example/x*"],
    ["https", "a.example", "/y/../x1", undefined, "block-url:https://a.example/x*"],
    ["https", "a.example", "/%2e%2e/x1", undefined, "block-url:https://a.example/x*"],
    ["https", "front.example", "/y/%2E/../x1?q=1", "a.example:443", "block-url:https://a.example/x*"],
    // Not the same path: an encoded slash stays encoded, and a query is not a path.
    ["https", "a.example", "/%2Fx1", undefined, undefined],
    ["https", "a.example", "/y?/../x1", undefined, undefined],
  ])("%s://%s%s (tunnel %s) → %s", (scheme, authority, path, tunnelHost, want) => {
    expect(requestBlockRule(p, scheme, authority, path, tunnelHost)).toBe(want);
  });
});

describe("normalizedPath", () => {
  it.each([
    ["/", "/"],
    ["/a/b/c", "/a/b/c"],
    ["/%61%62c", "/abc"],
    ["/%7e%2d%5F", "/~-_"],
    ["/a%2fb%3F", "/a%2Fb%3F"],
    ["/a/./b/../c/", "/a/c/"],
    ["/a/b/..", "/a/"],
    ["/a/b/.", "/a/b/"],
    ["/../../a", "/a"],
    ["///a//b", "/a/b"],
    ["/a/%2E%2E/b", "/b"],
    ["/a/b?x=/../y", "/a/b?x=/../y"],
    ["*", "*"],
  ])("%s → %s", (path, want) => {
    expect(normalizedPath(path)).toBe(want);
  });
});

describe("describeError", () => {
  it("keeps OpenSSL's reason and the code, not its source paths", async () => {
    const { describeError } = await import("../../../src/proxy/origin.js");
    const e = Object.assign(new Error("4017C10F287F0000:error:0A000410:SSL routines:ssl3_read_bytes:sslv3 alert handshake failure:../deps/openssl/openssl/ssl/record/rec_layer_s3.c:1601:SSL alert number 40\n"), { code: "ERR_SSL_SSLV3_ALERT_HANDSHAKE_FAILURE" });
    expect(describeError(e)).toBe("sslv3 alert handshake failure (ERR_SSL_SSLV3_ALERT_HANDSHAKE_FAILURE)");
    expect(describeError(Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:1"), { code: "ECONNREFUSED" }))).toBe("refused the connection (ECONNREFUSED)");
  });
});
