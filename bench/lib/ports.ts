/** Ports for the programs a bench row starts that must be told theirs (etcd, c-icap, mitmdump, a KDC restarted on its port). */
import { createServer } from "node:net";

/** A TCP port on 127.0.0.1 that was free a moment ago (bound on port 0, then released). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}
