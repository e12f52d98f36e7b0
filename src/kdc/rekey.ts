/** `kmi kdc rekey`: the KDC's side of the master-key rotation (storage/rekey-command.ts), with a key file wrapped in a PKCS#11 token. */
import type { RekeyTarget } from "../storage/rekey-command.js";
import { KDC_ETCD_PREFIX, masterKeyWrapLabel, masterKeyWrapOptions, pkcs11Flags, pkcs11Settings } from "./config.js";
import { openKdcBackend } from "./init.js";
import { T } from "./kdc-store.js";
import { PORTAL_TABLES } from "./portal-session.js";
import { masterKeyWrap, openPkcs11Token } from "./root-keys.js";

/** The KDC's store, for `rekeyMain`: every table (those without sealed records are skipped). */
export const kdcRekeyTarget: RekeyTarget = {
  program: "kdc",
  envName: "KMI_KDC_MASTER_KEY",
  defaultDataDir: "data/kdc",
  etcdPrefix: KDC_ETCD_PREFIX,
  tables: [...Object.values(T), ...Object.values(PORTAL_TABLES)],
  openStore: (dataDir, backend) => openKdcBackend(dataDir, false, backend),
  // A key file wrapped in a token needs the token; --master-key-wrap pkcs11 also wraps a key that was not (or under a new token key).
  wrapOptions: { ...pkcs11Flags, ...masterKeyWrapOptions },
  async openWrap(values) {
    const v = values as { pkcs11Module?: string; pkcs11Token?: string; pkcs11PinFile?: string; masterKeyWrap: string; masterKeyWrapLabel: string };
    const hsm = await openPkcs11Token(pkcs11Settings(v));
    try {
      return { wrap: masterKeyWrap(hsm, masterKeyWrapLabel(v)), close: () => hsm?.close() };
    } catch (err) {
      hsm?.close();
      throw err;
    }
  },
};
