/** Labels of the KDC's enums and times, in the words `kmi ctl` uses. */
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { KeyAlgorithm } from "../../src/gen/kmi/common/v1/common_pb.js";
import { Signer, VersionState } from "../../src/gen/kmi/kdc/v1/kdc_pb.js";

/** A timestamp as a Date (undefined stays undefined). */
export function date(t: Timestamp | undefined): Date | undefined {
  return t === undefined ? undefined : timestampDate(t);
}

/** "pending", "ready", "active", "retired", "revoked", "discarded". */
export function stateLabel(s: VersionState): string {
  return VersionState[s]?.toLowerCase() ?? "unknown";
}

/** A version's state for people, as `kmi ctl ca history` prints it: "pending (expired)" for a PENDING version past its CSR's expiry. */
export function versionStateText(v: { state: VersionState; pendingExpired: boolean }): string {
  return stateLabel(v.state) + (v.state === VersionState.PENDING && v.pendingExpired ? " (expired)" : "");
}

/** Where a version's certificate comes from. */
export function signerLabel(s: Signer): string {
  return s === Signer.KMI_ROOT ? "KMI-signed" : s === Signer.PRIVATE_CA ? "private CA" : "unknown";
}

/** "ecdsa-p256", "rsa-2048", "rsa-3072". */
export function algorithmLabel(a: KeyAlgorithm): string {
  switch (a) {
    case KeyAlgorithm.ECDSA_P256:
      return "ecdsa-p256";
    case KeyAlgorithm.RSA_2048:
      return "rsa-2048";
    case KeyAlgorithm.RSA_3072:
      return "rsa-3072";
    default:
      return "unknown";
  }
}
