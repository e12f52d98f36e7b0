/**
 * Attestation: nonces, and the check of signed evidence that ends in an attestation token.
 *
 * Attest checks, in order, and refuses at the first failure:
 *   1. the caller is an enrolled machine over mutual TLS, with its recorded certificate;
 *   2. the signature over the evidence bytes verifies with that certificate's key
 *      (UNAUTHENTICATED) — only then are the bytes decoded (INVALID_ARGUMENT naming the field);
 *   3. evidence.machine_id is the certificate's machine (UNAUTHENTICATED);
 *   4. the nonce was issued to this machine, is unexpired and unused (UNAUTHENTICATED);
 *   5. the machine is not quarantined (PERMISSION_DENIED);
 *   6. the measurements are exactly the group's approved names, each with an approved digest
 *      (FAILED_PRECONDITION naming the measurement; with the group's quarantine_on_mismatch the
 *      machine is quarantined, in its own audited batch).
 * On success ONE batch consumes the nonce, records the result and appends the audit entry,
 * conditional on the machine record and the nonce being as they were read: a nonce is used at
 * most once and a quarantine committed meanwhile (on any replica) is not missed; on a Conflict
 * the whole check runs again. The token is returned only after the batch committed. A refusal records the attempt (the `attestations`
 * observation record, with the audit entry) and changes nothing else: the nonce stays as it
 * was, the machine record is untouched (except for the quarantine of step 6).
 */
import { X509Certificate, randomBytes } from "node:crypto";
import { clone, create } from "@bufbuild/protobuf";
import { decodeEvidence, signAttestationToken, verifyEvidenceSignature, type EvidenceValue } from "../attest/index.js";
import { FailedPrecondition, PermissionDenied, ResourceExhausted, Unauthenticated, isKmiError } from "../common/errors.js";
import { MachineStatus } from "../gen/kmi/audit/v1/audit_pb.js";
import { AttestationNonceRecordSchema, AttestationResultRecordSchema, type EnrolledMachineRecord } from "../gen/kmi/store/v1/audit_pb.js";
import { retryOnConflict } from "../storage/retry.js";
import { Conflict, MAX_TXN_OPS, chunk, delOp, putOp, type BatchOp } from "../storage/store.js";
import { markAudited, refusalOutcome } from "./audited.js";
import type { AuditContext } from "./context.js";
import { loadCallerMachine, readCallerMachine, type MachineCaller } from "./identity.js";
import { quarantineOps } from "./machine-ops.js";
import { compareMeasurements, summarizeProblems } from "./measurement-policy.js";
import { approvedOf, dateOf, getGroup, guard, ts } from "./records.js";
import { RECORD_VERSION, Tables, nonceKey } from "./store.js";

/** The refusal of a quarantined machine, naming the quarantine, its reason and the way out. */
function quarantined(machine: EnrolledMachineRecord): PermissionDenied {
  return new PermissionDenied(`machine ${machine.machineId}: quarantined (${machine.statusReason}); an operator must release it (\`kmi ctl machine release ${machine.machineId}\`)`);
}

/**
 * Issues a nonce to the calling machine (PERMISSION_DENIED while it is quarantined). Nonces are not audited: see docs/audit.md. The bound
 * on unused nonces is checked on a read: calls racing each other (on several replicas) may
 * each pass it, so a machine can exceed it by the number of its concurrent calls, no more.
 */
export async function issueNonce(ctx: AuditContext, caller: MachineCaller): Promise<{ nonce: Uint8Array; expiresAt: Date }> {
  const machine = await loadCallerMachine(ctx, caller);
  // A quarantined machine gets no nonce: attest would refuse it anyway, and refusing here
  // tells its agent at the first call, and stores nothing under its id.
  if (machine.status === MachineStatus.QUARANTINED) throw quarantined(machine);
  const now = ctx.clock.now();
  const ops: BatchOp[] = [];
  let outstanding = 0;
  for await (const [key, n] of ctx.store.iterate(Tables.nonces, { prefix: `${caller.machineId}/` })) {
    // Expired ones go with this batch, within one commit's op limit (the sweep takes the rest).
    if (dateOf(n.expiresAt).getTime() <= now.getTime()) {
      if (ops.length < MAX_TXN_OPS - 1) ops.push(delOp(Tables.nonces, key));
    } else if (n.usedAt === undefined) outstanding++;
  }
  if (outstanding >= ctx.policy.maxNoncesPerMachine) {
    throw new ResourceExhausted(`nonce: ${outstanding} unused nonces outstanding for machine ${caller.machineId}; attest with one, or wait ${ctx.policy.nonceTtlMs / 1000} s`);
  }
  const nonce = randomBytes(32);
  const expiresAt = new Date(now.getTime() + ctx.policy.nonceTtlMs);
  const record = create(AttestationNonceRecordSchema, { recordVersion: RECORD_VERSION, machineId: caller.machineId, nonce, issuedAt: ts(now), expiresAt: ts(expiresAt) });
  ops.push(putOp(Tables.nonces, nonceKey(caller.machineId, nonce), record));
  await ctx.store.batch(ops);
  return { nonce, expiresAt };
}

/** What a successful attestation returns. */
export interface AttestResult {
  token: string;
  expiresAt: Date;
  jti: string;
}

/** Checks signed evidence and issues an attestation token. */
export async function attest(ctx: AuditContext, caller: MachineCaller, evidenceBytes: Uint8Array, signature: Uint8Array): Promise<AttestResult> {
  const target = `machine/${caller.machineId}`;
  const actor = `machine:${caller.machineId}`;
  return retryOnConflict(async () => {
    let machine: EnrolledMachineRecord | undefined;
    let evidence: EvidenceValue | undefined;
    const details: Record<string, string> = {};
    try {
      const read = await readCallerMachine(ctx, caller);
      machine = read.machine;
      const machineGuard = guard.machine(machine.machineId, read.modRevision);
      if (!verifyEvidenceSignature(evidenceBytes, signature, caller.certificateDer)) {
        throw new Unauthenticated("signature: does not verify with the key of your machine certificate; sign the evidence bytes with the machine key");
      }
      evidence = decodeEvidence(evidenceBytes);
      details["software_version"] = evidence.softwareVersion;
      // Recorded, not judged: freshness comes from the nonce, and machine clocks drift.
      details["evidence_time"] = evidence.time.toISOString();
      if (evidence.machineId !== caller.machineId) {
        throw new Unauthenticated(`evidence.machine_id: ${evidence.machineId} is not the machine of the client certificate (${caller.machineId})`);
      }
      const now = ctx.clock.now();
      const key = nonceKey(caller.machineId, evidence.nonce);
      const nonceRead = await ctx.store.read(Tables.nonces, key);
      const nonce = nonceRead.value;
      details["nonce"] = Buffer.from(evidence.nonce).toString("hex").slice(0, 16);
      if (nonce === undefined) throw new Unauthenticated("evidence.nonce: unknown (not issued to this machine, or expired and swept); get a new one with GetAttestationNonce");
      if (nonce.usedAt !== undefined) {
        throw new Unauthenticated(`evidence.nonce: already used at ${dateOf(nonce.usedAt).toISOString()} (a replay); get a new one with GetAttestationNonce`);
      }
      if (now.getTime() >= dateOf(nonce.expiresAt).getTime()) {
        throw new Unauthenticated(`evidence.nonce: expired at ${dateOf(nonce.expiresAt).toISOString()}; get a new one and attest within ${ctx.policy.nonceTtlMs / 1000} s`);
      }
      if (machine.status === MachineStatus.QUARANTINED) throw quarantined(machine);
      const group = await getGroup(ctx, machine.group);
      const problems = compareMeasurements(group.name, approvedOf(group), evidence.measurements);
      if (problems.length > 0) {
        const err = new FailedPrecondition(summarizeProblems(problems));
        details["mismatched"] = problems.map((p) => p.name || "(none approved)").join(",").slice(0, 4096);
        if (group.quarantineOnMismatch) {
          const reason = `attestation failed: ${err.message}`.slice(0, 256);
          const ops = quarantineOps(machine, reason, "system", now);
          await ctx.audit.append({ actor: "system", action: "machine.quarantine", target, outcome: "ok", details: { reason, policy: `group ${group.name} quarantine_on_mismatch` } }, ops, [machineGuard]);
          details["quarantined"] = "true";
        }
        throw err;
      }

      // A token never outlives the certificate it is bound to: the presented one, which may be
      // the one before the last renewal.
      const notAfter = new Date(new X509Certificate(caller.certificateDer).validTo);
      const expiresAt = new Date(Math.min(now.getTime() + group.tokenTtlSeconds * 1000, notAfter.getTime()));
      const signed = signAttestationToken(
        { machineId: machine.machineId, group: group.name, tenantIds: group.allTenants ? [] : group.tenantIds, allTenants: group.allTenants, certificateSha256: caller.certificateSha256, issuedAt: now, expiresAt, encryptionPublicKey: machine.encryptionPublicKey },
        { privateKey: ctx.attestationKey.privateKey, keyId: ctx.attestationKey.keyId },
      );
      const exp = new Date(signed.claims.exp * 1000);
      const used = clone(AttestationNonceRecordSchema, nonce);
      used.usedAt = ts(now);
      const result = create(AttestationResultRecordSchema, {
        recordVersion: RECORD_VERSION,
        machineId: machine.machineId,
        time: ts(now),
        ok: true,
        softwareVersion: evidence.softwareVersion,
        tokenId: signed.claims.jti,
        tokenExpiresAt: ts(exp),
      });
      await ctx.audit.append(
        { actor, action: "machine.attest", target, outcome: "ok", details: { ...details, jti: signed.claims.jti, expires_at: exp.toISOString(), certificate_sha256: caller.certificateSha256 } },
        [putOp(Tables.nonces, key, used), putOp(Tables.attestations, machine.machineId, result)],
        [machineGuard, guard.nonce(key, nonceRead.modRevision)],
      );
      return { token: signed.token, expiresAt: exp, jti: signed.claims.jti };
    } catch (err) {
      // A concurrent change won (the nonce used, the machine changed): the whole check runs again.
      if (err instanceof Conflict) throw err;
      await recordRefusal(ctx, { actor, target, details, machine, evidence }, err);
      throw markAudited(err as object);
    }
  });
}

/** Logs a refused attestation with its observation record (only for an enrolled machine). */
async function recordRefusal(
  ctx: AuditContext,
  p: { actor: string; target: string; details: Record<string, string>; machine: EnrolledMachineRecord | undefined; evidence: EvidenceValue | undefined },
  err: unknown,
): Promise<void> {
  const problem = isKmiError(err) ? err.message.slice(0, 1024) : "internal error (see the server log)";
  const ops: BatchOp[] = [];
  if (p.machine !== undefined) {
    ops.push(
      putOp(
        Tables.attestations,
        p.machine.machineId,
        create(AttestationResultRecordSchema, {
          recordVersion: RECORD_VERSION,
          machineId: p.machine.machineId,
          time: ts(ctx.clock.now()),
          ok: false,
          problem,
          softwareVersion: p.evidence?.softwareVersion ?? "",
        }),
      ),
    );
  }
  try {
    await ctx.audit.append({ actor: p.actor, action: "machine.attest", target: p.target, outcome: refusalOutcome(err), details: { ...p.details, reason: problem } }, ops);
  } catch (logErr) {
    ctx.logger.error("audit log: cannot record a refused attestation", { target: p.target, err: logErr });
  }
}

/** Deletes expired nonces, up to 1000 per run in commits of at most MAX_TXN_OPS (a timer runs it); returns how many. */
export async function sweepNonces(ctx: AuditContext): Promise<number> {
  const now = ctx.clock.now().getTime();
  const ops: BatchOp[] = [];
  for await (const [key, n] of ctx.store.iterate(Tables.nonces)) {
    if (dateOf(n.expiresAt).getTime() <= now) ops.push(delOp(Tables.nonces, key));
    if (ops.length >= 1000) break;
  }
  for (const part of chunk(ops, MAX_TXN_OPS)) await ctx.store.batch(part);
  return ops.length;
}
