/**
 * Measurements: a name and the SHA-256 of what it measures. The rules of
 * kmi.audit.v1.Measurement, shared by the machine that sends them and the Auditserver that
 * checks them.
 */
import { InvalidArgument } from "../common/errors.js";
import { isSha256Hex } from "./encoding.js";

/** One measurement as a plain value. */
export interface MeasurementValue {
  /** Lowercase letters, digits and "._/-", 1 to 128 characters. */
  name: string;
  /** Lowercase hex SHA-256, 64 characters. */
  sha256: string;
}

/** Most measurements in one piece of evidence (and in one group's approved set). */
export const MAX_MEASUREMENTS = 64;
/** Rule of Measurement.name. */
export const MEASUREMENT_NAME_PATTERN = /^[a-z0-9._/-]{1,128}$/;

/** Throws InvalidArgument naming `field` unless `name` is a valid measurement name. */
export function checkMeasurementName(name: string, field: string): void {
  if (!MEASUREMENT_NAME_PATTERN.test(name)) {
    throw new InvalidArgument(`${field}: "${name.slice(0, 128)}" is not a measurement name (lowercase letters, digits and "._/-", 1 to 128 characters)`);
  }
}

/** Throws InvalidArgument naming `field` unless `digest` is lowercase hex SHA-256. */
export function checkSha256Hex(digest: string, field: string): void {
  if (!isSha256Hex(digest)) throw new InvalidArgument(`${field}: want 64 lowercase hex characters (SHA-256)`);
}

/**
 * Throws InvalidArgument naming the first bad entry of a measurement list: too many, a bad
 * name or digest, or a name given twice.
 */
export function checkMeasurementList(list: readonly MeasurementValue[], field: string): void {
  if (list.length > MAX_MEASUREMENTS) throw new InvalidArgument(`${field}: ${list.length} measurements, at most ${MAX_MEASUREMENTS}`);
  const seen = new Set<string>();
  list.forEach((m, i) => {
    checkMeasurementName(m.name, `${field}[${i}].name`);
    checkSha256Hex(m.sha256, `${field}[${i}].sha256`);
    if (seen.has(m.name)) throw new InvalidArgument(`${field}[${i}].name: "${m.name}" given twice; one measurement per name`);
    seen.add(m.name);
  });
}
