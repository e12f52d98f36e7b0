/**
 * The associated data of a wrapped key: "<machine_id>|<tenant_id>|<key_id>|<version>", as
 * distribution.proto's WrappedKey.aad says. It is mixed into the HKDF info, so a wrapped key
 * opened for another machine, tenant, key or version fails its GCM tag check.
 */
import { InvalidArgument } from "../common/errors.js";

/** The parts of a wrapped key's associated data. */
export interface WrapAadParts {
  /** The receiving machine's id (e.g. "m-0123456789abcdef"). */
  machineId: string;
  /** The tenant the key belongs to. */
  tenantId: string;
  /** Key id: lowercase hex SHA-256 of the DER SubjectPublicKeyInfo. */
  keyId: string;
  /** Intermediate version, or 0 for a plain signing key. */
  version: number;
}

/** The separator between the parts; no part may contain it. */
const SEP = "|";

/** Formats the associated data of a wrapped key; throws InvalidArgument on a part that would make it ambiguous. */
export function formatWrapAad(parts: WrapAadParts): string {
  for (const [field, value] of [
    ["machine_id", parts.machineId],
    ["tenant_id", parts.tenantId],
    ["key_id", parts.keyId],
  ] as const) {
    if (value.length === 0) throw new InvalidArgument(`${field}: required to form the wrap aad`);
    if (value.includes(SEP)) throw new InvalidArgument(`${field}: must not contain "|" (it separates the wrap aad's parts)`);
  }
  if (!Number.isInteger(parts.version) || parts.version < 0 || parts.version > 0xffffffff) {
    throw new InvalidArgument("version: must be an unsigned 32-bit integer");
  }
  return [parts.machineId, parts.tenantId, parts.keyId, String(parts.version)].join(SEP);
}

/** Parses "<machine_id>|<tenant_id>|<key_id>|<version>"; throws InvalidArgument when it is not that shape. */
export function parseWrapAad(aad: string): WrapAadParts {
  const parts = aad.split(SEP);
  if (parts.length !== 4 || parts.slice(0, 3).some((p) => p.length === 0) || !/^(0|[1-9][0-9]{0,9})$/.test(parts[3]!)) {
    throw new InvalidArgument('wrapped_key.aad: want "<machine_id>|<tenant_id>|<key_id>|<version>"');
  }
  const version = Number(parts[3]);
  if (version > 0xffffffff) throw new InvalidArgument("wrapped_key.aad: version out of range");
  return { machineId: parts[0]!, tenantId: parts[1]!, keyId: parts[2]!, version };
}
