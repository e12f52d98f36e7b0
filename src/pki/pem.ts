/**
 * PEM <-> DER, and reading certificates that a person uploads (PEM or DER, one or a chain),
 * with refusals that say what was wrong with the file and what to upload instead.
 */
import { InvalidArgument } from "../common/errors.js";
import { decodeCertificate } from "./parse.js";
import { readTlv, Tag } from "./der.js";

/** Largest single-certificate upload accepted (real intermediates are 1-3 KiB). */
export const MAX_CERTIFICATE_BYTES = 64 * 1024;

/** Largest chain upload accepted by {@link splitPemCertificates} unless told otherwise. */
export const MAX_CHAIN_BYTES = 256 * 1024;

/** One PEM block: its label (e.g. `CERTIFICATE`) and decoded body. */
export interface PemBlock {
  /** The label between `-----BEGIN ` and `-----`. */
  readonly label: string;
  /** The base64-decoded body. */
  readonly der: Uint8Array;
}

/** Encodes DER as a PEM block with 64-character lines and a trailing newline. */
export function encodePem(label: string, der: Uint8Array): string {
  const b64 = Buffer.from(der.buffer, der.byteOffset, der.byteLength).toString("base64");
  const lines = b64.match(/.{1,64}/g) ?? [];
  return `-----BEGIN ${label}-----\n${lines.join("\n")}\n-----END ${label}-----\n`;
}

/** PEM `CERTIFICATE` block for a DER certificate. */
export function certificateToPem(der: Uint8Array): string {
  return encodePem("CERTIFICATE", der);
}

/** Concatenated PEM blocks for a chain (leaf first, as TLS sends it). */
export function certificatesToPem(ders: readonly Uint8Array[]): string {
  return ders.map(certificateToPem).join("");
}

const BEGIN = /-----BEGIN ([A-Z0-9 ]{1,40})-----/g;
const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

/**
 * Every PEM block in `text`, in order; explanatory text around blocks is ignored (RFC 7468).
 * Throws InvalidArgument naming `field` for a block without its END line or with a corrupt body.
 */
export function decodePemBlocks(text: string, field: string): PemBlock[] {
  const blocks: PemBlock[] = [];
  BEGIN.lastIndex = 0;
  for (let m = BEGIN.exec(text); m; m = BEGIN.exec(text)) {
    const label = m[1]!;
    const endMarker = `-----END ${label}-----`;
    const end = text.indexOf(endMarker, BEGIN.lastIndex);
    const nextBegin = text.indexOf("-----BEGIN ", BEGIN.lastIndex);
    if (end < 0 || (nextBegin >= 0 && nextBegin < end)) {
      throw new InvalidArgument(
        `${field}: truncated PEM (a ${label} block has no "${endMarker}" line); upload the whole file`,
      );
    }
    const body = text.slice(BEGIN.lastIndex, end).replace(/\s+/g, "");
    if (body.length === 0 || body.length % 4 !== 0 || !BASE64.test(body)) {
      throw new InvalidArgument(`${field}: corrupt PEM (the ${label} block is not valid base64); upload the file as the CA issued it`);
    }
    blocks.push({ label, der: new Uint8Array(Buffer.from(body, "base64")) });
    BEGIN.lastIndex = end + endMarker.length;
  }
  return blocks;
}

/** Options for reading one uploaded certificate. */
export interface ParseOneCertificateOptions {
  /** What the person should upload, for messages: default `"the certificate"`. */
  readonly expected?: string;
  /** Size cap in bytes; default {@link MAX_CERTIFICATE_BYTES}. */
  readonly maxBytes?: number;
}

const PRIVATE_KEY_LABEL = /PRIVATE KEY/;

function toBytes(input: Uint8Array | string): Uint8Array {
  return typeof input === "string" ? new Uint8Array(Buffer.from(input, "utf8")) : input;
}

function isPemText(bytes: Uint8Array): boolean {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).includes("-----BEGIN ");
}

function checkSizeAndEmpty(bytes: Uint8Array, field: string, maxBytes: number, what: string): void {
  if (bytes.length === 0 || (bytes.length < 1024 && Buffer.from(bytes).toString("latin1").trim() === "")) {
    throw new InvalidArgument(`${field}: empty; upload ${what} as PEM or DER`);
  }
  if (bytes.length > maxBytes) {
    throw new InvalidArgument(`${field}: larger than ${Math.floor(maxBytes / 1024)} KiB; upload only ${what}`);
  }
}

/** Certificate blocks of a PEM text, refusing keys, CSRs and other labels with a message that says what to do. */
function certificateBlocks(text: string, field: string, what: string): Uint8Array[] {
  const blocks = decodePemBlocks(text, field);
  const out: Uint8Array[] = [];
  for (const b of blocks) {
    if (b.label === "CERTIFICATE") out.push(b.der);
    else if (PRIVATE_KEY_LABEL.test(b.label)) {
      // Say nothing about the key's content; just refuse the whole upload.
      throw new InvalidArgument(`${field}: the file holds a private key; never upload keys, upload ${what} only`);
    } else if (b.label === "CERTIFICATE REQUEST" || b.label === "NEW CERTIFICATE REQUEST") {
      throw new InvalidArgument(`${field}: this is a CSR; upload the certificate your CA issued for it`);
    } else {
      throw new InvalidArgument(`${field}: holds a PEM "${b.label}" block, not a CERTIFICATE; upload ${what}`);
    }
  }
  return out;
}

/** Splits concatenated DER certificates (each one a top-level SEQUENCE). */
function splitDer(bytes: Uint8Array, field: string): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let at = 0; at < bytes.length; ) {
    let end: number;
    try {
      end = readTlv(bytes, at).end;
    } catch (err) {
      throw new InvalidArgument(`${field}: truncated or corrupt DER; upload the whole certificate file`, { cause: err });
    }
    out.push(bytes.subarray(at, end));
    at = end;
  }
  return out;
}

/**
 * Reads exactly one certificate from an upload (PEM text or DER bytes) and returns its DER.
 *
 * Refuses with InvalidArgument naming `field`: empty input, more than 64 KiB, bytes that are
 * neither PEM nor DER, a truncated or corrupt PEM, a PEM body that is not a certificate, a key
 * or CSR instead of a certificate, and a bundle of several certificates where one is expected.
 */
export function parseOneCertificate(
  input: Uint8Array | string,
  field: string,
  options: ParseOneCertificateOptions = {},
): Uint8Array {
  const what = options.expected ?? "the certificate";
  const bytes = toBytes(input);
  checkSizeAndEmpty(bytes, field, options.maxBytes ?? MAX_CERTIFICATE_BYTES, what);
  let ders: Uint8Array[];
  if (isPemText(bytes)) {
    ders = certificateBlocks(Buffer.from(bytes).toString("latin1"), field, what);
    if (ders.length === 0) throw new InvalidArgument(`${field}: no CERTIFICATE block in the PEM; upload ${what}`);
  } else if (bytes[0] === Tag.sequence) {
    ders = splitDer(bytes, field);
  } else {
    throw new InvalidArgument(
      `${field}: neither PEM nor DER; upload ${what} as PEM ("-----BEGIN CERTIFICATE-----") or DER`,
    );
  }
  if (ders.length > 1) {
    throw new InvalidArgument(`${field}: holds ${ders.length} certificates (a bundle); upload only ${what}, not the chain`);
  }
  return decodeCertificate(ders[0]!, field).der;
}

/** Options for reading a chain. */
export interface SplitPemCertificatesOptions {
  /** Size cap in bytes; default {@link MAX_CHAIN_BYTES}. */
  readonly maxBytes?: number;
  /** Most certificates accepted; default 10. */
  readonly maxCertificates?: number;
}

/**
 * Reads a chain (PEM with one or more CERTIFICATE blocks, or concatenated DER) into DER
 * certificates in file order; each must parse. Refuses like {@link parseOneCertificate}.
 */
export function splitPemCertificates(
  input: Uint8Array | string,
  field: string,
  options: SplitPemCertificatesOptions = {},
): Uint8Array[] {
  const what = "the certificate chain";
  const bytes = toBytes(input);
  checkSizeAndEmpty(bytes, field, options.maxBytes ?? MAX_CHAIN_BYTES, what);
  let ders: Uint8Array[];
  if (isPemText(bytes)) ders = certificateBlocks(Buffer.from(bytes).toString("latin1"), field, what);
  else if (bytes[0] === Tag.sequence) ders = splitDer(bytes, field);
  else throw new InvalidArgument(`${field}: neither PEM nor DER; upload ${what} as PEM or DER`);
  if (ders.length === 0) throw new InvalidArgument(`${field}: no CERTIFICATE block in the PEM; upload ${what}`);
  const max = options.maxCertificates ?? 10;
  if (ders.length > max) throw new InvalidArgument(`${field}: holds ${ders.length} certificates; at most ${max} are accepted`);
  return ders.map((der, i) => decodeCertificate(der, `${field}[${i}]`).der);
}
