/** Each row's title (printed even when the row is not measured; the bench test looks for them). */
export const ROW_TITLES: Readonly<Record<string, string>> = {
  "1": "Agent signing over the Unix socket",
  "2": "Leaf minting in the proxy",
  "3": "Proxy throughput",
  "4": "Rotation propagation",
  "5": "KDC: Certificate menu and secret releases",
  "6": "Proxy with ICAP scanning",
  "7": "Store: conditional batches on LevelDB and on etcd",
  "8": "Failover: kill -9 of an agent's KDC replica",
  "9": "KDC replicas on etcd: rotation fan-out and the Certificate menu",
  "10": "Proxy cost: CPU per request, resumption, memory per connection",
  "11": "Reattachment: the agents of a killed KDC replica attach elsewhere",
  "12": "Leaves signed through a token-held intermediate (KDC SignLeaf) vs escrowed",
};
