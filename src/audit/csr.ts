/**
 * Machine CSRs, checked before a join token is touched: a PKCS#10 request whose
 * self-signature verifies (the machine holds the key) for an ECDSA P-256 key (audit.proto:
 * "for an ECDSA P-256 key the machine made"). The subject is ignored: the KDC names the
 * certificate from the machine id and group.
 */
import { InvalidArgument } from "../common/errors.js";
import { parseCsr } from "../pki/csr.js";
import type { CsrChecker } from "./context.js";

/** The CSR checker of the real server, on src/pki. */
export function createCsrChecker(): CsrChecker {
  return {
    check(pem, field) {
      const info = parseCsr(pem, field);
      if (info.keyAlgorithm !== "ecdsa-p256") {
        throw new InvalidArgument(`${field}: the key is ${info.keyAlgorithm}; a machine key must be ECDSA P-256`);
      }
      return { spki: info.spkiDer };
    },
  };
}
