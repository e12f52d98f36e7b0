/**
 * The etcd client's retry policy (etcd-store.ts): a read that fails with UNAVAILABLE is sent again
 * (up to 3 more times, as etcd3 does by default); a Txn, run inside `unretried`, never is: its answer
 * may have been lost after it was applied, and sent again it would look like a Conflict.
 */
import { GRPCUnavailableError } from "etcd3";
import { describe, expect, it } from "vitest";
import { etcdRetryPolicy, unretried } from "../../../src/storage/etcd-store.js";

/** How etcd3's connection pool calls the policy: from inside its own async method. */
async function exec(policy: ReturnType<typeof etcdRetryPolicy>, attempt: () => Promise<string>): Promise<string> {
  await Promise.resolve();
  return policy.execute(() => attempt());
}

function failing(): { calls: number; attempt: () => Promise<string> } {
  const f = {
    calls: 0,
    attempt: async () => {
      f.calls++;
      throw new GRPCUnavailableError("unavailable");
    },
  };
  return f;
}

describe("etcdRetryPolicy", () => {
  it("sends a read again after UNAVAILABLE, up to three more times (etcd3's default)", async () => {
    const f = failing();
    await expect(exec(etcdRetryPolicy(), f.attempt)).rejects.toBeInstanceOf(GRPCUnavailableError);
    expect(f.calls).toBe(4);
  });

  it("sends a Txn once: a failure inside unretried is not retried", async () => {
    const f = failing();
    await expect(unretried(() => exec(etcdRetryPolicy(), f.attempt))).rejects.toBeInstanceOf(GRPCUnavailableError);
    expect(f.calls).toBe(1);
  });

  it("does not retry other errors, and a success is returned as is", async () => {
    let calls = 0;
    await expect(exec(etcdRetryPolicy(), async () => (calls++, Promise.reject(new Error("no"))))).rejects.toThrow("no");
    expect(calls).toBe(1);
    await expect(exec(etcdRetryPolicy(), async () => "ok")).resolves.toBe("ok");
  });
});
