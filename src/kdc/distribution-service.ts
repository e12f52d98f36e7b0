/**
 * DistributionService: the machine-facing API. Not served yet (the key agent's issue builds
 * it): every method answers UNIMPLEMENTED. The pieces it will use exist: the version record
 * holds its key sealed under the master key (`KdcOperations.unsealVersionKey`), machine
 * identity comes from `kPeer`, and rollout reports have their table (`rollout`).
 */
import { Code, ConnectError, type ServiceImpl } from "@connectrpc/connect";
import type { DistributionService } from "../gen/kmi/kdc/v1/distribution_pb.js";

function unimplemented(method: string): ConnectError {
  return new ConnectError(`${method}: secret distribution is not available in this KDC build yet`, Code.Unimplemented);
}

/** DistributionService answering UNIMPLEMENTED. */
export function createDistributionService(): ServiceImpl<typeof DistributionService> {
  return {
    fetchSecrets: async () => {
      throw unimplemented("FetchSecrets");
    },
    // eslint-disable-next-line require-yield
    watchSecrets: async function* () {
      throw unimplemented("WatchSecrets");
    },
    reportHeldVersions: async () => {
      throw unimplemented("ReportHeldVersions");
    },
  };
}
