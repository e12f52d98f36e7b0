/**
 * keywrap: wraps a private key to a machine's P-256 key (ECIES, distribution.proto's
 * WrappedKey) and unwraps it on the machine. Shared by the KDC (wrap) and the agent (unwrap).
 */
export { formatWrapAad, parseWrapAad, type WrapAadParts } from "./aad.js";
export {
  machinePublicKeyFromCertificate,
  unwrapKey,
  wrapKeyForMachine,
  WRAP_INFO_PREFIX,
  type MachinePublicKeyInput,
  type UnwrapKeyOptions,
  type WrapKeyOptions,
  type WrappedKeyFields,
} from "./ecies.js";
export { keyIdOf } from "./key-id.js";
