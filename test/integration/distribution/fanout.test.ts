/**
 * Fan-out: 200 machines, each with its own certificate, attestation token and mutual-TLS
 * connection, hold a WatchSecrets stream open to a real KDC process; one ActivateVersion must
 * reach every one of them as ACTIVATED, wrapped to each machine's own key. The time is printed
 * (these 2-core machines are shared, so it is not asserted).
 */
import { readFile } from "node:fs/promises";
import { afterAll, beforeAll, expect, it } from "vitest";
import { KeyPurpose } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { WatchEventType, type WatchSecretsResponse } from "../../../src/gen/kmi/kdc/v1/distribution_pb.js";
import { Signer } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { formatWrapAad, keyIdOf, unwrapKey } from "../../../src/keywrap/index.js";
import { Machine, signToken, type TokenKey } from "../../fixtures/kdc/machines.js";
import { attestationKeyFile, distributionClient, issueMachines, issueService, operator } from "../../fixtures/kdc/mesh.js";
import { cleanup, initDataDir, startKdc, type DataDir, type KdcProcess } from "../kdc/harness.js";

const STREAMS = 200;
let data: DataDir;
let caPem: string;
let tokenKey: TokenKey;
let kdc: KdcProcess;
const machines = Array.from({ length: STREAMS }, (_, i) => new Machine(`m-f${String(i).padStart(15, "0")}`));
const closers: (() => void)[] = [];
const aborts: AbortController[] = [];

beforeAll(async () => {
  data = await initDataDir();
  caPem = await readFile(data.caFile, "utf8");
  const k = await attestationKeyFile(data);
  tokenKey = k.key;
  kdc = await startKdc(data.dataDir, ["--attestation-key-file", k.file]);
  const tester = await issueService(kdc.url, caPem, data.token, "audit"); // only the Auditserver may mint machine identities
  await issueMachines(kdc.url, caPem, tester, machines, 16);
  await operator(kdc.url, caPem, data.token).admin.createTenant({ tenantId: "acme", bootstrapKmiSigned: true });
});

afterAll(async () => {
  for (const a of aborts) a.abort();
  for (const c of closers) c();
  await kdc?.stop();
  if (data !== undefined) await cleanup(data.dir);
});

it(`one activation reaches ${STREAMS} open watch streams`, async () => {
  const ops = operator(kdc.url, caPem, data.token);
  const got = new Map<string, { ev: WatchSecretsResponse; at: number }>();
  let snapshots = 0;
  const streams = machines.map(async (m) => {
    const c = distributionClient(kdc.url, caPem, m);
    closers.push(c.close);
    const abort = new AbortController();
    aborts.push(abort);
    const token = signToken(tokenKey, { machineId: m.machineId, cert: m.certPem });
    try {
      for await (const ev of c.client.watchSecrets({ attestationToken: token }, { signal: abort.signal })) {
        if (ev.type === WatchEventType.SNAPSHOT) snapshots++;
        if (ev.type === WatchEventType.ACTIVATED && !got.has(m.machineId)) got.set(m.machineId, { ev, at: performance.now() });
      }
    } catch (err) {
      if (!abort.signal.aborted) throw err;
    }
  });
  const t0open = performance.now();
  for (let i = 0; i < 100 && snapshots < STREAMS; i++) await new Promise((r) => setTimeout(r, 100));
  expect(snapshots).toBe(STREAMS);
  const openMs = performance.now() - t0open;
  expect((await ops.admin.getKdcStatus({})).connectedAgents).toBe(STREAMS);

  const v2 = (await ops.ca.createVersion({ tenantId: "acme", signer: Signer.KMI_ROOT })).version!;
  const t0 = performance.now();
  await ops.ca.activateVersion({ tenantId: "acme", version: v2.version });
  const rpcMs = performance.now() - t0;
  for (let i = 0; i < 200 && got.size < STREAMS; i++) await new Promise((r) => setTimeout(r, 10));
  const lastMs = Math.max(...[...got.values()].map((g) => g.at)) - t0;
  const kdcSide = /"msg":"watch fan-out".*?"event":"activated".*?"streams":(\d+).*?"duration_ms":([\d.]+)/.exec(kdc.stderr());
  // eslint-disable-next-line no-console
  console.log(
    `fan-out: ${got.size}/${STREAMS} streams received ACTIVATED v${v2.version}; last one ${lastMs.toFixed(0)} ms after ActivateVersion was sent ` +
      `(the RPC returned after ${rpcMs.toFixed(0)} ms; the KDC audited, wrapped and queued for ${kdcSide?.[1] ?? "?"} streams in ${kdcSide?.[2] ?? "?"} ms); ` +
      `${STREAMS} streams opened in ${openMs.toFixed(0)} ms`,
  );
  expect(got.size).toBe(STREAMS);
  for (const m of machines) {
    const s = got.get(m.machineId)!.ev.secrets.find((x) => x.purpose === KeyPurpose.INTERMEDIATE_CA)!;
    expect(s.version).toBe(v2.version);
    expect(s.keyId).toBe(v2.keyId);
  }
  // Each is wrapped to its own machine: a sample opens with its key and not with a neighbour's.
  for (const i of [0, 99, 199]) {
    const m = machines[i]!;
    const s = got.get(m.machineId)!.ev.secrets.find((x) => x.purpose === KeyPurpose.INTERMEDIATE_CA)!;
    expect(keyIdOf(unwrapKey(s.wrappedKey!, m.key, { expectedAad: formatWrapAad({ machineId: m.machineId, tenantId: "acme", keyId: s.keyId, version: s.version }) }))).toBe(v2.keyId);
    expect(() => unwrapKey(s.wrappedKey!, machines[(i + 1) % STREAMS]!.key)).toThrow(/does not open/);
  }
  const release = (await ops.admin.tailAuditLog({ limit: 5, last: true })).entries.find((e) => e.action === "secret.release" && e.target === `tenant/acme/version/${v2.version}`)!;
  expect(release.details["machines"]!.split(",").length + (release.details["machines.2"]?.split(",").length ?? 0)).toBe(STREAMS);
  for (const a of aborts) a.abort();
  await Promise.all(streams);
});
