/** kmi's software version, reported by every program and in attestation evidence. */
export const VERSION = "0.1.0";
