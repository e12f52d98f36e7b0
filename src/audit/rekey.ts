/** `kmi audit rekey`: the Auditserver's side of the master-key rotation (storage/rekey-command.ts). */
import type { RekeyTarget } from "../storage/rekey-command.js";
import { AUDIT_ETCD_PREFIX } from "./config.js";
import { openAuditStore } from "./init.js";
import { Tables } from "./store.js";

/** The Auditserver's store, for `rekeyMain`: every table (those without sealed records are skipped). */
export const auditRekeyTarget: RekeyTarget = {
  program: "audit",
  envName: "KMI_AUDIT_MASTER_KEY",
  defaultDataDir: "data/audit",
  etcdPrefix: AUDIT_ETCD_PREFIX,
  tables: Object.values(Tables),
  openStore: (dataDir, backend) => openAuditStore(dataDir, false, backend),
};
