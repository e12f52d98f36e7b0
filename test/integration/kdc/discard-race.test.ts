/**
 * A discard racing an upload of the same pending version (in-process KDC on a real LevelDB, the
 * certificate signed by an openssl private CA): at most one of them wins, and the version ends
 * as the winner left it. Before the discard moved the tenant record, both could succeed and the
 * upload brought the discarded version back, with the key the discard had erased.
 */
import { join } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNopLogger } from "../../../src/common/logger.js";
import { Signer, VersionState } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { initKdc, openKdc, type OpenedKdc } from "../../../src/kdc/init.js";
import { kdcRouterClients } from "../../helpers/kdc-router.js";
import { cleanup, makePrivateCa, tempDir, type PrivateCa } from "./harness.js";

let dir: string;
let kdc: OpenedKdc;
let ca: PrivateCa;
let api: ReturnType<typeof kdcRouterClients>;

beforeAll(async () => {
  dir = await tempDir("kmi-discard-race-");
  const r = await initKdc({ dataDir: join(dir, "data"), tls: { dnsNames: [], ipAddresses: [] } });
  kdc = await openKdc({ dataDir: join(dir, "data"), logger: createNopLogger() });
  api = kdcRouterClients(kdc.ctx, r.operatorToken);
  await api.admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
  ca = await makePrivateCa(dir, "race-root");
}, 60_000);

afterAll(async () => {
  await kdc?.store.close();
  await cleanup(dir);
});

describe("DiscardPendingVersion racing UploadIntermediate", () => {
  it("never lets both win: the version ends discarded (no key) or uploaded, as the one that succeeded says", async () => {
    for (let round = 0; round < 6; round++) {
      const version = (await api.ca.createVersion({ tenantId: "acme", signer: Signer.PRIVATE_CA })).version!.version;
      const csr = (await api.ca.getVersionCsr({ tenantId: "acme", version })).csrPem;
      const certificate = Buffer.from(await ca.sign(csr));
      const [upload, discard] = await Promise.allSettled([
        api.ca.uploadIntermediate({ tenantId: "acme", version, certificate, customerRoot: Buffer.from(ca.rootPem) }),
        api.ca.discardPendingVersion({ tenantId: "acme", version, reason: `race ${round}` }),
      ]);
      const state = (await api.ca.listVersions({ tenantId: "acme" })).versions.find((x) => x.version === version)!.state;
      const record = await kdc.ctx.store.getVersion("acme", version);
      // Which one wins depends on timing; either is legal, a double win is not.
      expect([upload.status, discard.status], `round ${round}`).not.toEqual(["fulfilled", "fulfilled"]);
      if (discard.status === "fulfilled") {
        expect(state).toBe(VersionState.DISCARDED);
        expect(record?.privateKey).toBeUndefined();
        expect((upload as PromiseRejectedResult).reason).toBeInstanceOf(ConnectError);
        expect(((upload as PromiseRejectedResult).reason as ConnectError).code).toBe(Code.FailedPrecondition);
      } else {
        expect(upload.status).toBe("fulfilled");
        expect(state).toBe(VersionState.READY);
        expect(record?.privateKey).toBeDefined();
      }
    }
  }, 120_000);
});
