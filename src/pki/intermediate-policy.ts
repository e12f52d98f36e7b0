/**
 * What an uploaded intermediate CA certificate must be for kmi to use it: a CA that can sign
 * TLS server leaves for any host, and nothing more. Each refusal names the field and says how
 * to sign it instead. Used by ./upload.ts; the written rule is in docs/security.md.
 */
import { InvalidArgument } from "../common/errors.js";
import { children, contentBytes, DerError, expectTlv, Tag } from "./der.js";
import type { CertificateInfo } from "./inspect.js";
import { Oid } from "./oids.js";
import type { DecodedCertificate } from "./parse.js";

/** The extensions file line that fixes every basicConstraints refusal. */
export const CA_EXTENSION_LINE = "basicConstraints=critical,CA:TRUE,pathlen:0";

/** What to tell the signer, for every basicConstraints refusal. */
const SIGN_WITH = `sign it with ${CA_EXTENSION_LINE}`;

/** Names of extended key usages, as openssl's extensions files spell them. */
const EKU_NAMES: Readonly<Record<string, string>> = {
  [Oid.serverAuth]: "serverAuth",
  [Oid.clientAuth]: "clientAuth",
  "1.3.6.1.5.5.7.3.3": "codeSigning",
  "1.3.6.1.5.5.7.3.4": "emailProtection",
  "1.3.6.1.5.5.7.3.8": "timeStamping",
  "1.3.6.1.5.5.7.3.9": "OCSPSigning",
  "2.5.29.37.0": "anyExtendedKeyUsage",
};

/** GeneralName CHOICE tags (context-specific), as openssl's extensions files spell them. */
const GENERAL_NAME_TYPES: Readonly<Record<number, string>> = {
  0xa0: "otherName",
  0x81: "email",
  0x82: "DNS",
  0xa3: "x400Address",
  0xa4: "dirName",
  0xa5: "ediPartyName",
  0x86: "URI",
  0x87: "IP",
  0x88: "RID",
};

/**
 * basicConstraints of an intermediate: present, critical, cA true, pathLenConstraint 0. Why
 * pathlen 0: the tenant's intermediate signs leaves only; with a larger or no pathlen, its key
 * (which kmi releases to proxy machines) could mint further CAs that every device trusts.
 */
export function checkBasicConstraints(decoded: DecodedCertificate, info: CertificateInfo, field: string): void {
  const bc = decoded.extensions.find((e) => e.oid === Oid.basicConstraints);
  if (bc === undefined) {
    throw new InvalidArgument(
      `${field}: not a CA (it has no basicConstraints extension: it was signed without extensions); sign the CSR again with an extensions file (openssl x509 -req ... -extfile ca.ext) holding ${CA_EXTENSION_LINE} and keyUsage=critical,keyCertSign,cRLSign`,
    );
  }
  if (!info.isCa) {
    throw new InvalidArgument(`${field}: not a CA (basicConstraints cA is false); upload the intermediate, not a leaf, or ${SIGN_WITH}`);
  }
  if (!bc.critical) {
    throw new InvalidArgument(`${field}: basicConstraints is not marked critical, as RFC 5280 requires of a CA; ${SIGN_WITH}`);
  }
  if (info.pathLenConstraint < 0) {
    throw new InvalidArgument(`${field}: basicConstraints has no pathlen, so its key could sign further CAs; ${SIGN_WITH}`);
  }
  if (info.pathLenConstraint > 0) {
    throw new InvalidArgument(
      `${field}: basicConstraints pathlen is ${info.pathLenConstraint}, so its key could sign further CAs; ${SIGN_WITH}`,
    );
  }
}

/**
 * extendedKeyUsage: absent, or listing serverAuth. Why: TLS clients (OpenSSL, browsers) refuse
 * a leaf whose issuer's EKU leaves out serverAuth; anyExtendedKeyUsage alone does not do.
 */
export function checkExtendedKeyUsage(info: CertificateInfo, field: string): void {
  const eku = info.extKeyUsage;
  if (eku === null || eku.includes(Oid.serverAuth)) return;
  const names = eku.map((o) => EKU_NAMES[o] ?? o).join(", ") || "empty";
  throw new InvalidArgument(
    `${field}: extendedKeyUsage (${names}) lacks serverAuth, so TLS clients would reject every leaf it signs; sign it without extendedKeyUsage, or with extendedKeyUsage=serverAuth`,
  );
}

/** The name types a NameConstraints extension constrains, as "permitted DNS, excluded IP". */
function constrainedTypes(value: Uint8Array): string[] {
  const out: string[] = [];
  const seq = expectTlv(value, 0, Tag.sequence);
  if (seq.end !== value.length) throw new DerError("trailing bytes");
  for (const part of children(value, seq)) {
    const which = part.tag === 0xa0 ? "permitted" : part.tag === 0xa1 ? "excluded" : undefined;
    if (which === undefined) throw new DerError("bad NameConstraints");
    for (const subtree of children(value, part)) {
      if (subtree.tag !== Tag.sequence) throw new DerError("bad GeneralSubtree");
      const [base] = children(value, subtree);
      if (base === undefined) throw new DerError("empty GeneralSubtree");
      const type = GENERAL_NAME_TYPES[base.tag] ?? `tag 0x${base.tag.toString(16)}`;
      const shown = `${which} ${type}`;
      if (!out.includes(shown)) out.push(shown);
    }
  }
  return out;
}

/**
 * No nameConstraints at all, on the intermediate or on its issuer. The rule, and why no
 * subset is accepted: the proxy mints leaves for whatever host its clients visit, so a
 * constraint on DNS names, IP addresses or the subject leaves out hosts it must serve (their
 * leaves would fail in every client, as a broken site, not as a policy); constraints on other
 * name types (email, URI) have no use on a CA that signs only TLS server leaves. A customer
 * who wants to keep hosts out of inspection uses the proxy's bypass rules instead.
 */
export function checkNoNameConstraints(decoded: DecodedCertificate, field: string): void {
  const nc = decoded.extensions.find((e) => e.oid === Oid.nameConstraints);
  if (nc === undefined) return;
  let types: string[];
  try {
    types = constrainedTypes(nc.value);
  } catch {
    throw new InvalidArgument(`${field}: malformed nameConstraints extension; sign it without nameConstraints`);
  }
  const what = types.length > 0 ? types.join(", ") : "no subtrees";
  throw new InvalidArgument(
    `${field}: has nameConstraints (${what}), but the proxy mints leaves for any host its clients visit and clients would reject those outside them; sign it without nameConstraints (keep hosts out of inspection with the proxy's bypass rules)`,
  );
}

/** Longest lifetime of an uploaded intermediate: 10 years (3,653 days with leap days). */
export const MAX_INTERMEDIATE_DAYS = 3653;
/** Least validity an uploaded intermediate must have left: a week, to roll it out and renew in time. */
export const MIN_REMAINING_DAYS = 7;

const DAY_MS = 86_400_000;

function day(d: Date): string {
  return d.toISOString().slice(0, 10);
}

/**
 * The intermediate's lifetime: at most {@link MAX_INTERMEDIATE_DAYS}, ending no later than its
 * issuer. (Valid now and {@link MIN_REMAINING_DAYS} left are checked by the caller, with the
 * clock: they are FailedPrecondition.)
 */
export function checkLifetime(info: CertificateInfo, issuer: CertificateInfo, field: string, issuerField: string): void {
  const days = Math.floor((info.notAfter.getTime() - info.notBefore.getTime()) / DAY_MS);
  if (days > MAX_INTERMEDIATE_DAYS) {
    throw new InvalidArgument(
      `${field}: valid for ${days} days (${day(info.notBefore)} to ${day(info.notAfter)}); kmi accepts at most ${MAX_INTERMEDIATE_DAYS} days (10 years): sign it with -days 3650 or fewer`,
    );
  }
  if (info.notAfter.getTime() > issuer.notAfter.getTime()) {
    throw new InvalidArgument(
      `${field}: valid until ${info.notAfter.toISOString()}, after its issuer ${issuerField} (until ${issuer.notAfter.toISOString()}); sign it to end by then`,
    );
  }
}
