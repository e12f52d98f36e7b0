import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { InvalidArgument } from "../../../src/common/errors.js";
import { KeyAlgorithm } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { CreateTokenRequestSchema, IssueServiceCertificateRequestSchema, Role, TailAuditLogRequestSchema } from "../../../src/gen/kmi/kdc/v1/admin_pb.js";
import { CreateVersionRequestSchema, RevokeVersionRequestSchema, Signer, UploadIntermediateRequestSchema } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { IssueMachineCertificateRequestSchema } from "../../../src/gen/kmi/kdc/v1/peer_pb.js";
import * as v from "../../../src/kdc/validate.js";

function refused(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(InvalidArgument);
    return (err as Error).message;
  }
  throw new Error("expected InvalidArgument");
}

describe("createVersion", () => {
  const ok = { tenantId: "acme", signer: Signer.KMI_ROOT };
  it("applies defaults", () => {
    const r = v.createVersion(create(CreateVersionRequestSchema, ok));
    expect(r).toMatchObject({ tenantId: "acme", keyAlgorithm: KeyAlgorithm.ECDSA_P256, validityDays: 365, activate: false });
    expect(r.subject).toEqual({ commonName: "", organization: "", organizationalUnit: "", country: "" });
  });
  it.each([
    ["missing tenant", { ...ok, tenantId: "" }, "tenant_id: required"],
    ["uppercase tenant", { ...ok, tenantId: "Acme" }, "tenant_id:"],
    ["tenant starting with digit", { ...ok, tenantId: "1acme" }, "tenant_id:"],
    ["tenant too long", { ...ok, tenantId: "a".repeat(64) }, "tenant_id:"],
    ["missing signer", { ...ok, signer: Signer.UNSPECIFIED }, "signer: required"],
    ["unknown signer", { ...ok, signer: 9 as Signer }, "signer: unknown value 9"],
    ["unknown algorithm", { ...ok, keyAlgorithm: 7 as KeyAlgorithm }, "key_algorithm: unknown value 7"],
    ["validity too long", { ...ok, validityDays: 1826 }, "validity_days: 1826 is out of range"],
    ["activate with private CA", { ...ok, signer: Signer.PRIVATE_CA, activate: true }, "activate: only for signer KMI_ROOT"],
    ["common name too long", { ...ok, subject: { commonName: "x".repeat(65) } }, "subject.common_name: too long"],
    ["control characters", { ...ok, subject: { organization: "a\nb" } }, "subject.organization: contains control characters"],
    ["bad country", { ...ok, subject: { country: "usa" } }, "subject.country:"],
  ])("refuses %s", (_name, input, message) => {
    expect(refused(() => v.createVersion(create(CreateVersionRequestSchema, input)))).toContain(message);
  });
});

describe("other requests", () => {
  it.each([
    ["revoke without reason", () => v.revokeVersion(create(RevokeVersionRequestSchema, { tenantId: "acme", version: 1 })), "reason: required"],
    ["revoke without version", () => v.revokeVersion(create(RevokeVersionRequestSchema, { tenantId: "acme", reason: "x" })), "version: required"],
    ["upload without certificate", () => v.uploadIntermediate(create(UploadIntermediateRequestSchema, { tenantId: "acme" })), "certificate: required"],
    [
      "upload too large",
      () => v.uploadIntermediate(create(UploadIntermediateRequestSchema, { tenantId: "acme", certificate: new Uint8Array(64 * 1024 + 1) })),
      "certificate: 65537 bytes is too large",
    ],
    ["token without role", () => v.createToken(create(CreateTokenRequestSchema, {})), "role: required"],
    ["tenant-admin token without tenant", () => v.createToken(create(CreateTokenRequestSchema, { role: Role.TENANT_ADMIN })), "tenant_id: required"],
    ["operator token with tenant", () => v.createToken(create(CreateTokenRequestSchema, { role: Role.OPERATOR, tenantId: "acme" })), "tenant_id: must be empty"],
    ["token ttl over 10 years", () => v.createToken(create(CreateTokenRequestSchema, { role: Role.OPERATOR, ttlSeconds: 10n ** 10n })), "ttl_seconds:"],
    ["bad token id", () => v.tokenId("xyz"), "token_id:"],
    ["service cert without names", () => v.issueServiceCertificate(create(IssueServiceCertificateRequestSchema, { csrPem: "x", serviceName: "audit" })), "dns_names: give at least one"],
    ["service cert bad ip", () => v.issueServiceCertificate(create(IssueServiceCertificateRequestSchema, { csrPem: "x", serviceName: "audit", ipAddresses: ["1.2.3"] })), "ip_addresses[0]:"],
    ["service cert wildcard", () => v.issueServiceCertificate(create(IssueServiceCertificateRequestSchema, { csrPem: "x", serviceName: "audit", dnsNames: ["*.x.com"] })), "dns_names[0]:"],
    ["service cert without csr", () => v.issueServiceCertificate(create(IssueServiceCertificateRequestSchema, { serviceName: "audit", dnsNames: ["a"] })), "csr_pem: required"],
    ["machine ttl too short", () => v.issueMachineCertificate(create(IssueMachineCertificateRequestSchema, { csrPem: "x", machineId: "m1", group: "g", ttlSeconds: 10 })), "ttl_seconds: 10"],
    ["machine without id", () => v.issueMachineCertificate(create(IssueMachineCertificateRequestSchema, { csrPem: "x", group: "g", ttlSeconds: 600 })), "machine_id: required"],
    ["tail limit too large", () => v.tailAuditLog(create(TailAuditLogRequestSchema, { limit: 1001 })), "limit: 1001"],
  ])("refuses %s", (_name, fn, message) => {
    expect(refused(fn)).toContain(message);
  });

  it("accepts a good service certificate request and lowercases names", () => {
    const r = v.issueServiceCertificate(create(IssueServiceCertificateRequestSchema, { csrPem: "x", serviceName: "audit", dnsNames: ["Audit.Example"], ipAddresses: ["::1"] }));
    expect(r).toEqual({ csrPem: "x", serviceName: "audit", dnsNames: ["audit.example"], ipAddresses: ["::1"], validityDays: 90 });
  });

  it("echoes at most 40 characters of a bad value", () => {
    const msg = refused(() => v.tenantId("A".repeat(500)));
    expect(msg.length).toBeLessThan(200);
  });
});
