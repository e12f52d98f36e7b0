/**
 * The attestation policy on measurements: a machine must present exactly its group's approved
 * names, each with one of the digests approved for it. The first difference is named in the
 * refusal, so that an operator sees at once which file changed.
 */
import type { MeasurementValue } from "../attest/index.js";
import type { ApprovedDigests } from "./validate.js";

/** One difference between presented and approved measurements. */
export interface MeasurementProblem {
  /** The measurement concerned. */
  name: string;
  /** What is wrong, one sentence naming the measurement. */
  message: string;
}

const short = (digest: string) => `${digest.slice(0, 16)}…`;

/**
 * Compares presented measurements with a group's approved set; returns every difference,
 * sorted by measurement name (empty when they match). An empty approved set matches nothing:
 * a group must approve something before any machine of it can attest.
 */
export function compareMeasurements(group: string, approved: readonly ApprovedDigests[], presented: readonly MeasurementValue[]): MeasurementProblem[] {
  if (approved.length === 0) {
    return [{ name: "", message: `group ${group} has no approved measurements; approve a set with \`kmi ctl group approve-measurements ${group}\`` }];
  }
  const problems: MeasurementProblem[] = [];
  const given = new Map(presented.map((m) => [m.name, m.sha256]));
  for (const a of approved) {
    const digest = given.get(a.name);
    if (digest === undefined) {
      problems.push({ name: a.name, message: `measurement ${a.name}: missing; group ${group} requires it` });
    } else if (!a.sha256.includes(digest)) {
      problems.push({
        name: a.name,
        message: `measurement ${a.name}: sha256 ${digest} is not approved for group ${group} (approved: ${a.sha256.map(short).join(", ")})`,
      });
    }
  }
  const approvedNames = new Set(approved.map((a) => a.name));
  for (const m of presented) {
    if (!approvedNames.has(m.name)) {
      problems.push({ name: m.name, message: `measurement ${m.name}: not approved for group ${group} (approved names: ${[...approvedNames].join(", ")})` });
    }
  }
  return problems.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/** One message for a refusal: the first problem, and how many more there are. */
export function summarizeProblems(problems: readonly MeasurementProblem[]): string {
  const [first, ...rest] = problems;
  if (first === undefined) return "";
  return rest.length === 0 ? first.message : `${first.message} (and ${rest.length} more: ${rest.map((p) => p.name).join(", ")})`;
}
