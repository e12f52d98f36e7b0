/**
 * No message of KeyAgentService may carry private key material. This walks every message
 * reachable from the service (requests, responses, and recursively every message-typed field,
 * map values and oneofs included) and applies one strict rule:
 *
 *  1. A string or bytes field whose name contains any of the words or fragments
 *     key, private, priv, secret, pkcs, der, seed, pass, wrap, seal, material, jwk, pem
 *     is refused unless it is in NAMED_ALLOWED below, exactly (message.field), each with
 *     the reason it holds public data only.
 *  2. Every bytes field is refused unless it is in BYTES_ALLOWED, exactly: bytes can hold
 *     anything, so each one must be justified.
 *  3. google.protobuf.Any, Struct and Value are refused anywhere (they can hold anything).
 *
 * A new field that matches the rule fails this test until someone decides, here, in review,
 * that it is public.
 */
import type { DescField, DescMessage, DescService } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { KeyAgentService } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { ReleasedSecretSchema } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { AgentCachedSecretSchema } from "../../../src/gen/kmi/store/v1/agent_pb.js";

const SENSITIVE = /(^|_)(key|keys|der|pem|jwk)(_|$)|private|priv|secret|pkcs|seed|pass|wrap|seal|material/;

/** Fields whose names match SENSITIVE but that hold public data only. */
const NAMED_ALLOWED: Record<string, string> = {
  "kmi.agent.v1.IssueLeafCertificateRequest.public_key": "the leaf's PUBLIC key (SubjectPublicKeyInfo) the caller sends",
  "kmi.agent.v1.IssueLeafCertificateResponse.certificate_pem": "a certificate",
  "kmi.agent.v1.IssueLeafCertificateResponse.chain_pem": "certificates",
  "kmi.agent.v1.IssueLeafCertificateResponse.issuer_key_id": "a SHA-256 of a public key",
  "kmi.agent.v1.SignRequest.key_id": "a SHA-256 of a public key, or <tenant>/<name>",
  "kmi.agent.v1.SignResponse.key_id": "a SHA-256 of a public key",
  "kmi.agent.v1.KeyInfo.key_id": "a SHA-256 of a public key",
  "kmi.agent.v1.KeyInfo.public_key_pem": "a PUBLIC key",
  "kmi.agent.v1.GetCertificateChainResponse.chain_pem": "certificates",
  "kmi.agent.v1.GetCertificateChainResponse.key_id": "a SHA-256 of a public key",
  "kmi.common.v1.CertificateInfo.subject_key_id_hex": "an X.509 extension of a public key",
  "kmi.common.v1.CertificateInfo.authority_key_id_hex": "an X.509 extension of a public key",
};

/** bytes fields, each public. */
const BYTES_ALLOWED: Record<string, string> = {
  "kmi.agent.v1.IssueLeafCertificateRequest.public_key": "the leaf's PUBLIC key",
  "kmi.agent.v1.SignRequest.message": "the caller's message to sign",
  "kmi.agent.v1.SignResponse.signature": "a signature",
};

const OPAQUE = new Set(["google.protobuf.Any", "google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"]);

interface Walk {
  visited: Set<string>;
  problems: string[];
  checkedFields: number;
}

function messageOf(field: DescField): DescMessage | undefined {
  if (field.fieldKind === "message") return field.message;
  if (field.fieldKind === "list" && field.listKind === "message") return field.message;
  if (field.fieldKind === "map" && field.mapKind === "message") return field.message;
  return undefined;
}

function scalarKind(field: DescField): "string" | "bytes" | "other" {
  // ScalarType.STRING = 9, ScalarType.BYTES = 12
  const scalar = field.fieldKind === "scalar" ? field.scalar : field.fieldKind === "list" && field.listKind === "scalar" ? field.scalar : field.fieldKind === "map" && field.mapKind === "scalar" ? field.scalar : undefined;
  if (scalar === 9) return "string";
  if (scalar === 12) return "bytes";
  return "other";
}

function walkMessage(msg: DescMessage, w: Walk): void {
  if (w.visited.has(msg.typeName)) return;
  w.visited.add(msg.typeName);
  if (OPAQUE.has(msg.typeName)) {
    w.problems.push(`${msg.typeName}: an opaque message can carry anything`);
    return;
  }
  for (const field of msg.fields) {
    const full = `${msg.typeName}.${field.name}`;
    w.checkedFields++;
    const kind = scalarKind(field);
    if (kind !== "other" && SENSITIVE.test(field.name) && NAMED_ALLOWED[full] === undefined) {
      w.problems.push(`${full}: a ${kind} field named like key material`);
    }
    if (kind === "bytes" && BYTES_ALLOWED[full] === undefined) {
      w.problems.push(`${full}: a bytes field not known to be public`);
    }
    const sub = messageOf(field);
    if (sub !== undefined) walkMessage(sub, w);
  }
}

function walkService(service: DescService): Walk {
  const w: Walk = { visited: new Set(), problems: [], checkedFields: 0 };
  for (const m of service.methods) {
    walkMessage(m.input, w);
    walkMessage(m.output, w);
  }
  return w;
}

function walkOne(msg: DescMessage): Walk {
  const w: Walk = { visited: new Set(), problems: [], checkedFields: 0 };
  walkMessage(msg, w);
  return w;
}

describe("KeyAgentService carries no private key material", () => {
  it("every field reachable from the service passes the rule", () => {
    const w = walkService(KeyAgentService);
    expect(w.problems).toEqual([]);
    // The walk really covered the API, nested messages included.
    expect(w.visited).toContain("kmi.agent.v1.KeyInfo");
    expect(w.visited).toContain("kmi.common.v1.CertificateInfo");
    expect(w.visited).toContain("google.protobuf.Timestamp");
    expect(w.visited).toContain("kmi.agent.v1.WatchKeysResponse");
    expect(w.checkedFields).toBeGreaterThan(60);
  });

  it("every allow-list entry names a field that exists (no stale exceptions)", () => {
    const w = walkService(KeyAgentService);
    const all = new Set<string>();
    const collect = (msg: DescMessage, seen: Set<string>) => {
      if (seen.has(msg.typeName)) return;
      seen.add(msg.typeName);
      for (const f of msg.fields) {
        all.add(`${msg.typeName}.${f.name}`);
        const sub = messageOf(f);
        if (sub) collect(sub, seen);
      }
    };
    const seen = new Set<string>();
    for (const m of KeyAgentService.methods) {
      collect(m.input, seen);
      collect(m.output, seen);
    }
    expect(w.visited.size).toBe(seen.size);
    for (const name of [...Object.keys(NAMED_ALLOWED), ...Object.keys(BYTES_ALLOWED)]) expect(all).toContain(name);
  });

  it("the rule catches the messages that do carry keys (negative controls)", () => {
    const released = walkOne(ReleasedSecretSchema);
    expect(released.problems).toContain("kmi.kdc.v1.ReleasedSecret.public_key_pem: a string field named like key material");
    expect(released.problems).toContain("kmi.kdc.v1.WrappedKey.ciphertext: a bytes field not known to be public");
    expect(released.problems).toContain("kmi.kdc.v1.WrappedKey.ephemeral_public_key: a bytes field named like key material");
    const cached = walkOne(AgentCachedSecretSchema);
    expect(cached.problems).toContain("kmi.store.v1.AgentCachedSecret.private_key_pkcs8: a bytes field named like key material");
  });

  it.each([["private_key"], ["key"], ["signing_key_der"], ["pkcs8"], ["secret"], ["wrapped"], ["seed_bytes"], ["passphrase"], ["key_pem"], ["der"], ["jwk"]])(
    "the name pattern flags %s",
    (name) => {
      expect(SENSITIVE.test(name)).toBe(true);
    },
  );

  it.each([["message"], ["signature"], ["tenant_id"], ["dns_names"], ["reason"], ["serial_hex"], ["version"]])("the name pattern lets %s through", (name) => {
    expect(SENSITIVE.test(name)).toBe(false);
  });
});
