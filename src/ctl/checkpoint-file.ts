/**
 * Audit checkpoints as `kmi ctl` exports and reads them: a file holding the proto3 JSON of one
 * kmi.common.v1.AuditCheckpoint (so a verifier in any language reads it with the proto alone),
 * and how a checkpoint and a verify result are shown to people. Shared by the KDC's and the
 * Auditserver's `audit checkpoint` and `audit verify --checkpoint`.
 */
import { fromJsonString, toJson, toJsonString } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { AuditCheckpointSchema, type AuditCheckpoint } from "../gen/kmi/common/v1/checkpoint_pb.js";
import type { CommandContext } from "./command.js";
import { renderFields, UsageError } from "./output.js";

/** The file text of an exported checkpoint. */
export function checkpointFileText(cp: AuditCheckpoint): string {
  return toJsonString(AuditCheckpointSchema, cp, { prettySpaces: 2 }) + "\n";
}

/** Reads `--checkpoint FILE`; a file that is not one is a usage error naming it. */
export function readCheckpointFile(ctx: CommandContext): AuditCheckpoint | undefined {
  const path = ctx.args.str("checkpoint");
  if (path === undefined) return undefined;
  const text = Buffer.from(ctx.readFile("checkpoint", path)).toString("utf8");
  try {
    return fromJsonString(AuditCheckpointSchema, text);
  } catch (err) {
    throw new UsageError(`--checkpoint: ${path} is not a checkpoint written by \`kmi ctl audit checkpoint --out\` (${(err as Error).message})`);
  }
}

/** The fields of a checkpoint, for people. */
export function checkpointFields(cp: AuditCheckpoint, witness: string, file?: string): string {
  return renderFields([
    ["log", cp.origin],
    ["seq", cp.seq.toString()],
    ["hash", Buffer.from(cp.hash).toString("hex")],
    ["signed", cp.time === undefined ? "-" : timestampDate(cp.time).toISOString()],
    ["key id", cp.keyId],
    ["witness", witness],
    ["written to", file],
  ]);
}

/** Runs `audit checkpoint`: writes the checkpoint to --out (or prints its JSON) and shows it. */
export function outputCheckpoint(ctx: CommandContext, cp: AuditCheckpoint, witness: string): void {
  const out = ctx.args.str("out");
  const asJson = toJson(AuditCheckpointSchema, cp) as Record<string, unknown>;
  if (out !== undefined) {
    // Not secret (a signed hash): readable by others like a certificate.
    ctx.writeFile(out, checkpointFileText(cp), 0o644);
    ctx.out.result({ checkpoint: asJson, witness, file: out }, () => checkpointFields(cp, witness, out));
    ctx.out.note(`keep ${out} away from the server; later: kmi ctl audit verify --checkpoint ${out}`);
    return;
  }
  ctx.out.result({ checkpoint: asJson, witness }, () => checkpointFileText(cp));
}

/** What a verify returns, in the shape both admin services share. */
export interface VerifyLike {
  ok: boolean;
  entries: bigint;
  firstBadSeq: bigint;
  problem: string;
  headHash: string;
  checkpointSeq: bigint;
  witness: string;
  headSeq: bigint;
}

/** The text `audit verify` prints. */
export function verifyText(res: VerifyLike, given: AuditCheckpoint | undefined): string {
  if (!res.ok) return `audit log BROKEN at entry ${res.firstBadSeq}: ${res.problem} (${res.entries} entries checked)\n`;
  const lines = [
    `audit log ok: ${res.entries} entries, head ${res.headHash}`,
    `signed checkpoint: ${res.checkpointSeq === 0n ? "none yet" : `seq ${res.checkpointSeq}`}; witness: ${res.witness || "not configured"}`,
  ];
  if (given !== undefined) lines.push(`given checkpoint: seq ${given.seq} is still part of the log`);
  return lines.join("\n") + "\n";
}
