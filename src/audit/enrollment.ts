/**
 * Machine identity: enrollment with a one-time join token, and certificate renewal over
 * mutual TLS.
 *
 * Enrollment checks, in order: the request's fields, the CSR (parses, self-signature, P-256),
 * the encryption key when given (P-256, not the CSR's key, its binding signed by the CSR's key;
 * src/attest/encryption-key.ts), then the token (known, secret matches, unused, unexpired) and its group; then the KDC signs
 * the certificate; then ONE batch marks the token used, creates the machine and appends the
 * audit entry, conditional on the token being unchanged since it was read and the machine id
 * being unused: of two enrollments with one token (on one replica or two) exactly one commits;
 * the other runs again, reads the token used and is refused. A refusal at any step changes
 * nothing; if the batch fails, the certificate the KDC signed is never returned nor recorded,
 * so it proves nothing (see ./identity.ts).
 */
import { createPublicKey, randomBytes } from "node:crypto";
import { sha256Hex, verifyEncryptionKeyBinding } from "../attest/index.js";
import { clone, create } from "@bufbuild/protobuf";
import { PermissionDenied, Unauthenticated } from "../common/errors.js";
import { MachineStatus } from "../gen/kmi/audit/v1/audit_pb.js";
import { EnrolledMachineRecordSchema, JoinTokenRecordSchema } from "../gen/kmi/store/v1/audit_pb.js";
import { retryOnConflict } from "../storage/retry.js";
import { putOp } from "../storage/store.js";
import { audited } from "./audited.js";
import type { AuditContext } from "./context.js";
import { checkIssuedCertificate, readCallerMachine, type MachineCaller } from "./identity.js";
import { joinSecretMatches } from "./join-token.js";
import { dateOf, getGroup, guard, ts } from "./records.js";
import { RECORD_VERSION, Tables } from "./store.js";
import type { EnrollInput } from "./validate.js";
import { peerSource } from "../common/rpc.js";

/** What enrollment returns. */
export interface EnrollResult {
  machineId: string;
  group: string;
  certificatePem: string;
  caPem: string;
  notAfter: Date;
}

/** A fresh machine id: "m-" and 16 random hex characters. */
export function newMachineId(): string {
  return `m-${randomBytes(8).toString("hex")}`;
}

const UNKNOWN_TOKEN = "join_token: unknown; ask an operator for a new one (`kmi ctl join-token create`)";

/** Enrolls a machine. `peerAddress` goes into the audit entry. */
export async function enroll(ctx: AuditContext, input: EnrollInput, peerAddress: string): Promise<EnrollResult> {
  const details: Record<string, string> = { peer: peerAddress };
  if (input.hostname !== "") details["hostname"] = input.hostname;
  let target = `join_token/${input.tokenId}`;
  // Until the token's secret matched, the caller proved nothing (see AuditSubject.source).
  let proven = false;
  return audited(
    ctx,
    () => ({ actor: `join_token:${input.tokenId}`, action: "machine.enroll", target, details, ...(proven ? {} : { source: peerSource(peerAddress) }) }),
    async () => {
      const csr = ctx.csr.check(input.csrPem, "csr_pem");
      if (input.encryption !== undefined) {
        verifyEncryptionKeyBinding(createPublicKey({ key: Buffer.from(csr.spki), format: "der", type: "spki" }), input.encryption);
        details["encryption_key_id"] = sha256Hex(input.encryption.publicKeyDer);
      }
      return retryOnConflict(async () => {
        const read = await ctx.store.read(Tables.joinTokens, input.tokenId);
        const token = read.value;
        // Why one message for "no such id" and "wrong secret": only the holder of the real
        // secret learns anything more about the token (used, expired).
        if (token === undefined || !joinSecretMatches(input.secretPart, token.secretSha256)) throw new Unauthenticated(UNKNOWN_TOKEN);
        proven = true;
        details["group"] = token.group;
        if (token.usedAt !== undefined) {
          throw new Unauthenticated(`join_token: already used at ${dateOf(token.usedAt).toISOString()} (machine ${token.machineId}); a join token works once, ask for a new one`);
        }
        const now = ctx.clock.now();
        if (now.getTime() >= dateOf(token.expiresAt).getTime()) {
          throw new Unauthenticated(`join_token: expired at ${dateOf(token.expiresAt).toISOString()}; ask an operator for a new one`);
        }
        const group = await getGroup(ctx, token.group);
        let machineId = newMachineId();
        while (await ctx.store.has(Tables.machines, machineId)) machineId = newMachineId();
        target = `machine/${machineId}`;
        details["join_token"] = token.tokenId;

        const issued = await ctx.kdc.issueMachineCertificate({ csrPem: input.csrPem, machineId, group: group.name, ttlSeconds: group.certificateTtlSeconds });
        const cert = checkIssuedCertificate({ certificatePem: issued.certificatePem, caPem: ctx.caPem, machineId, spki: csr.spki });

        const used = clone(JoinTokenRecordSchema, token);
        used.usedAt = ts(now);
        used.machineId = machineId;
        const machine = create(EnrolledMachineRecordSchema, {
          recordVersion: RECORD_VERSION,
          machineId,
          group: group.name,
          hostname: input.hostname,
          status: MachineStatus.ACTIVE,
          enrolledAt: ts(now),
          joinTokenId: token.tokenId,
          certificateDer: cert.der,
          certificateSha256: cert.sha256,
          certificateNotAfter: ts(cert.notAfter),
          encryptionPublicKey: input.encryption?.publicKeyDer ?? new Uint8Array(0),
        });
        await ctx.audit.append(
          { actor: `join_token:${token.tokenId}`, action: "machine.enroll", target, outcome: "ok", details: { ...details, certificate_sha256: cert.sha256, not_after: cert.notAfter.toISOString() } },
          [putOp(Tables.joinTokens, token.tokenId, used), putOp(Tables.machines, machineId, machine)],
          [guard.joinToken(token.tokenId, read.modRevision), guard.machine(machineId, 0n)],
        );
        return { machineId, group: group.name, certificatePem: issued.certificatePem, caPem: ctx.caPem, notAfter: cert.notAfter };
      });
    },
  );
}

/** What renewal returns. */
export interface RenewResult {
  certificatePem: string;
  caPem: string;
  notAfter: Date;
}

/** Renews a machine's certificate; the caller is the machine over mutual TLS. */
export async function renew(ctx: AuditContext, caller: MachineCaller, csrPem: string): Promise<RenewResult> {
  const target = `machine/${caller.machineId}`;
  return audited(
    ctx,
    () => ({ actor: `machine:${caller.machineId}`, action: "machine.renew", target, details: { presented_certificate_sha256: caller.certificateSha256 } }),
    async () => {
      const csr = ctx.csr.check(csrPem, "csr_pem");
      return retryOnConflict(async () => {
        const { machine, modRevision } = await readCallerMachine(ctx, caller);
        if (machine.status === MachineStatus.QUARANTINED) {
          throw new PermissionDenied(`machine ${machine.machineId}: quarantined (${machine.statusReason}); its certificate is not renewed until an operator releases it`);
        }
        const group = await getGroup(ctx, machine.group);
        const issued = await ctx.kdc.issueMachineCertificate({ csrPem, machineId: machine.machineId, group: group.name, ttlSeconds: group.certificateTtlSeconds });
        const cert = checkIssuedCertificate({ certificatePem: issued.certificatePem, caPem: ctx.caPem, machineId: machine.machineId, spki: csr.spki });
        const now = ctx.clock.now();
        const next = clone(EnrolledMachineRecordSchema, machine);
        next.recordVersion = RECORD_VERSION;
        next.previousCertificateSha256 = machine.certificateSha256;
        next.certificateDer = cert.der;
        next.certificateSha256 = cert.sha256;
        next.certificateNotAfter = ts(cert.notAfter);
        next.renewedAt = ts(now);
        await ctx.audit.append(
          {
            actor: `machine:${machine.machineId}`,
            action: "machine.renew",
            target,
            outcome: "ok",
            details: { certificate_sha256: cert.sha256, previous_certificate_sha256: machine.certificateSha256, not_after: cert.notAfter.toISOString() },
          },
          [putOp(Tables.machines, machine.machineId, next)],
          [guard.machine(machine.machineId, modRevision)],
        );
        return { certificatePem: issued.certificatePem, caPem: ctx.caPem, notAfter: cert.notAfter };
      });
    },
  );
}
