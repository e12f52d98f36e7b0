/**
 * The pieces of `kmi up`'s start banner and waiting lines that need no process: the curl line for
 * how the mesh was started, absolute paths, and the grace period before the agent's KDC-link
 * error is shown. (test/integration/up/npm-start.test.ts runs the banner's lines for real.)
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { AttestationState, GetStatusResponseSchema } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { banner, browseLines, loopbackAllowed } from "../../../src/up/banner.js";
import { layout } from "../../../src/up/layout.js";
import { SECRETS_WAIT_GRACE_MS, shouldReportSecretsWait } from "../../../src/up/mesh.js";

const L = layout("/home/u/kmi/data", "/home/u/kmi/run");
const urls = { kdc: "https://127.0.0.1:7443", audit: "https://127.0.0.1:7444", proxy: "http://127.0.0.1:8080" };

describe("the start banner", () => {
  it("prints absolute paths in its alias, export and curl lines", () => {
    const text = banner({ L, urls, cfg: { tenant: "dev", originCaFiles: [], proxyAllowPrivate: [] }, kmiScript: "/home/u/kmi/dist/cmd/kmi.js", status: undefined });
    expect(text).toContain('  alias kmi="node /home/u/kmi/dist/cmd/kmi.js"\n');
    expect(text).toContain("KMI_CTL_TOKEN_FILE=/home/u/kmi/data/operator.token KMI_CTL_CA_FILE=/home/u/kmi/data/kdc/infra-ca.pem");
    expect(text).toContain("  curl -x http://127.0.0.1:8080 --cacert /home/u/kmi/data/kdc/kmi-root.pem https://example.com/\n");
  });

  it.each([
    ["online", [], [], "https://example.com/"],
    ["offline with an origin CA, loopback allowed", ["/ca/origin.pem"], ["127.0.0.0/8"], "https://localhost:<port>/"],
    ["offline with an origin CA, one loopback address allowed", ["/ca/origin.pem"], ["10.0.0.0/8", "127.0.0.1"], "https://localhost:<port>/"],
    ["offline with an origin CA, loopback not allowed", ["/ca/origin.pem"], ["10.0.0.0/8"], "https://<host>:<port>/"],
  ] as const)("%s: the curl goes to %s", (_name, originCaFiles, proxyAllowPrivate, target) => {
    const lines = browseLines(urls.proxy, "/r/root.pem", { tenant: "dev", originCaFiles, proxyAllowPrivate });
    expect(lines[1]).toBe(`  curl -x http://127.0.0.1:8080 --cacert /r/root.pem ${target}`);
    if (originCaFiles.length > 0) expect(lines[0]).toContain("/ca/origin.pem");
  });

  it.each([
    [["127.0.0.0/8"], true],
    [["0.0.0.0/0"], true],
    [["::1/128"], false],
    [["10.0.0.0/8", "192.168.0.0/16"], false],
    [["not-a-range"], false],
  ])("loopbackAllowed(%j) is %s", (ranges, allowed) => {
    expect(loopbackAllowed(ranges)).toBe(allowed);
  });
});

describe("waiting for the agent's secrets", () => {
  const status = (kdcError: string, attestation = AttestationState.ATTESTED) => create(GetStatusResponseSchema, { kdcError, attestation });
  const unavailable = "Unavailable: attestation key not loaded yet; is the Auditserver up?";

  it.each([
    ["within the grace period", status(unavailable), "", SECRETS_WAIT_GRACE_MS - 1, false],
    ["after the grace period", status(unavailable), "", SECRETS_WAIT_GRACE_MS, true],
    ["the same error again", status(unavailable), unavailable, 60_000, false],
    ["no error", status(""), "", 60_000, false],
    ["between two attestations", status(unavailable, AttestationState.NOT_ATTESTED), "", 60_000, true],
    ["attestation refused (its own line)", status(unavailable, AttestationState.REFUSED), "", 60_000, false],
  ])("%s: report %#", (_name, s, last, waited, report) => {
    expect(shouldReportSecretsWait(s, { kdcError: last }, waited)).toBe(report);
  });
});
