/** `kmi kdc rekey`: the KDC's side of the master-key rotation (storage/rekey-command.ts). */
import type { RekeyTarget } from "../storage/rekey-command.js";
import { KDC_ETCD_PREFIX } from "./config.js";
import { openKdcBackend } from "./init.js";
import { T } from "./kdc-store.js";
import { PORTAL_TABLES } from "./portal-session.js";

/** The KDC's store, for `rekeyMain`: every table (those without sealed records are skipped). */
export const kdcRekeyTarget: RekeyTarget = {
  program: "kdc",
  envName: "KMI_KDC_MASTER_KEY",
  defaultDataDir: "data/kdc",
  etcdPrefix: KDC_ETCD_PREFIX,
  tables: [...Object.values(T), ...Object.values(PORTAL_TABLES)],
  openStore: (dataDir, backend) => openKdcBackend(dataDir, false, backend),
};
