/** The rows of the benchmark, in the order. */
export { runSigning } from "./signing.js";
export { runMinting } from "./minting.js";
export { runThroughput } from "./throughput.js";
export { runRotation } from "./rotation.js";
export { runKdc } from "./kdc.js";
export { runIcap } from "./icap.js";
export { runStore } from "./store.js";
export { runFailover } from "./failover.js";
export { runProxyCost } from "./proxy-cost.js";
export { runReplicas } from "./replicas.js";
export { runReattach } from "./reattach.js";
export { runTokenLeaves } from "./token-leaves.js";

export { ROW_TITLES } from "./titles.js";
