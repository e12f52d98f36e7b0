/** The refusals of `kmi kdc backup` and `kmi kdc restore`, each with its own exit code (./cli.ts). */
import { FailedPrecondition, InvalidArgument } from "../../common/errors.js";

/** The data dir is locked by another process (a running KDC). */
export class StoreInUse extends FailedPrecondition {}
/** The backup file is not one restore accepts. */
export class BadBackup extends InvalidArgument {}
/** The destination (the --out file, the restore data dir) or the given master key is refused. */
export class DestinationRefused extends FailedPrecondition {}
