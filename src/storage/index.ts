/**
 * The storage layer: the `Store` interface and its LevelDB implementation, envelope
 * encryption of secrets at rest, the master key, and the hash-chained audit log.
 */
export * from "./store.js";
export * from "./level-store.js";
export * from "./seal.js";
export * from "./master-key.js";
export * from "./audit-log.js";
export * from "./mutex.js";
