/**
 * The storage layer: the `Store` interface (revisions, conditional batches, the change feed)
 * and its LevelDB and etcd implementations, the conflict-retry helper, envelope encryption of
 * secrets at rest, the master key, and the hash-chained audit log.
 */
export * from "./store.js";
export * from "./level-store.js";
export * from "./etcd-store.js";
export * from "./retry.js";
export * from "./backend.js";
export * from "./seal.js";
export * from "./master-key.js";
export * from "./audit-log.js";
export * from "./mutex.js";
