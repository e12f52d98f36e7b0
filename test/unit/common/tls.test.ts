import { readFile } from "node:fs/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { X509Certificate } from "node:crypto";
import { loadTlsMaterial, parseMtlsMode, parseSubjectAltNames, peerIdentityFromDer, serverTlsOptions } from "../../../src/common/tls.js";
import { makeTestPki, type TestPki } from "../../helpers/pki.js";
import { makeTempDir, type TempDir } from "../../helpers/process.js";

let tmp: TempDir;
let pki: TestPki;
beforeAll(async () => {
  tmp = await makeTempDir("kmi-tls-unit-");
  pki = await makeTestPki(tmp.path);
});
afterAll(() => tmp.cleanup());

describe("tls", () => {
  it("parses Node's subjectAltName text, quoted values included", () => {
    expect(parseSubjectAltNames('DNS:localhost, IP Address:127.0.0.1, URI:kmi://machine/m-1, URI:"kmi://service/a, b"')).toEqual([
      { type: "DNS", value: "localhost" },
      { type: "IP Address", value: "127.0.0.1" },
      { type: "URI", value: "kmi://machine/m-1" },
      { type: "URI", value: "kmi://service/a, b" },
    ]);
    expect(parseSubjectAltNames(undefined)).toEqual([]);
    // The proxy copies an origin's names through the same parser: quoted values with commas, other types kept.
    expect(parseSubjectAltNames('DNS:a.example, IP Address:10.0.0.1, DNS:"b,c.example", URI:https://x, email:a@b')).toEqual([
      { type: "DNS", value: "a.example" },
      { type: "IP Address", value: "10.0.0.1" },
      { type: "DNS", value: "b,c.example" },
      { type: "URI", value: "https://x" },
      { type: "email", value: "a@b" },
    ]);
    // An unparsable quoted value yields nothing usable, never its raw text.
    expect(parseSubjectAltNames('URI:"kmi://machine/m-1\\x", DNS:b.example')).toEqual([
      { type: "URI", value: "" },
      { type: "DNS", value: "b.example" },
    ]);
  });

  it("extracts the identity of a verified machine certificate", async () => {
    const der = new X509Certificate(await readFile(pki.client.cert)).raw;
    const id = peerIdentityFromDer(new Uint8Array(der), true);
    expect(id.authorized).toBe(true);
    expect(id.uris).toEqual([`kmi://machine/${pki.machineId}`]);
    expect(id.machineId).toBe(pki.machineId);
    expect(id.serviceName).toBeUndefined();
    expect(id.fingerprint256).toMatch(/^[0-9a-f]{64}$/);
    expect(id.subject).toBe(`CN=${pki.machineId}`);
    expect(Object.isFrozen(id)).toBe(true);
  });

  it("extracts a service name, and never a machine or service id from an unverified certificate", async () => {
    const svc = peerIdentityFromDer(new Uint8Array(new X509Certificate(await readFile(pki.serviceClient.cert)).raw), true);
    expect(svc.serviceName).toBe(pki.serviceName);
    const other = peerIdentityFromDer(new Uint8Array(new X509Certificate(await readFile(pki.otherClient.cert)).raw), false, "UNABLE_TO_VERIFY_LEAF_SIGNATURE");
    expect(other.uris).toEqual([`kmi://machine/${pki.machineId}`]);
    expect(other.machineId).toBeUndefined();
    expect(other.authorizationError).toBe("UNABLE_TO_VERIFY_LEAF_SIGNATURE");
  });

  it("builds server options per mutual-TLS mode", async () => {
    const m = await loadTlsMaterial({ certFile: pki.server.cert, keyFile: pki.server.key, caFile: pki.ca.cert });
    expect(serverTlsOptions(m, "none")).toMatchObject({ requestCert: false, rejectUnauthorized: false, minVersion: "TLSv1.2" });
    expect(serverTlsOptions(m, "none").ca).toBeUndefined();
    expect(serverTlsOptions(m, "optional")).toMatchObject({ requestCert: true, rejectUnauthorized: false });
    expect(serverTlsOptions(m, "required")).toMatchObject({ requestCert: true, rejectUnauthorized: true });
    const noCa = await loadTlsMaterial({ certFile: pki.server.cert, keyFile: pki.server.key });
    expect(() => serverTlsOptions(noCa, "required")).toThrow('mutual TLS mode "required" needs a client CA file');
  });

  it("names the file and the problem when material does not load", async () => {
    await expect(loadTlsMaterial({ certFile: "/nope.pem", keyFile: pki.server.key })).rejects.toThrow("TLS certificate /nope.pem: cannot read (ENOENT)");
    await expect(loadTlsMaterial({ certFile: pki.server.key, keyFile: pki.server.key })).rejects.toThrow(`TLS certificate ${pki.server.key}: no PEM block found`);
    await expect(loadTlsMaterial({ certFile: pki.server.cert, keyFile: pki.server.cert })).rejects.toThrow(`TLS key ${pki.server.cert}: no PEM block found`);
  });

  it("parses mode names", () => {
    expect(parseMtlsMode("required")).toBe("required");
    expect(() => parseMtlsMode("yes")).toThrow('mutual TLS mode "yes" is not one of none, optional, required');
  });
});
