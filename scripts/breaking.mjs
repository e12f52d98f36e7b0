// Runs `buf breaking` against a git ref: `npm run breaking -- <ref>` (default: main), or
// `--release`: against the newest release tag (v*), the check `npm test` runs. Until the first
// release there is no tag and the contracts may still change freely, so `--release` passes.
import { execFileSync, spawnSync } from "node:child_process";

const root = new URL("..", import.meta.url).pathname;
const git = (...args) => spawnSync("git", args, { cwd: root, encoding: "utf8" });

let ref = process.argv[2] ?? "main";
if (ref === "--release") {
  // versionsort.suffix: v1.0.0-rc1 sorts before v1.0.0.
  const tags = git("-c", "versionsort.suffix=-", "tag", "--list", "v*", "--sort=-v:refname");
  const latest = tags.status === 0 ? tags.stdout.split("\n").find((t) => t.trim() !== "") : undefined;
  if (latest === undefined) {
    const shallow = git("rev-parse", "--is-shallow-repository").stdout.trim() === "true";
    if (tags.status !== 0 || shallow) {
      console.warn(`buf breaking: cannot see the release tags (${tags.status !== 0 ? "not a git checkout" : "a shallow clone"}); run git fetch --tags --unshallow for the check`);
    } else {
      console.log("buf breaking: no release tag (v*) yet, so the contracts may still change; the check starts at the first release");
    }
    process.exit(0);
  }
  ref = latest.trim();
}
if (git("rev-parse", "--verify", "--quiet", `${ref}^{commit}`).status !== 0) {
  console.error(`buf breaking: "${ref}" is not a git ref here (a branch, tag or commit; a shallow clone may lack it: git fetch --tags)`);
  process.exit(2);
}
try {
  execFileSync("npx", ["--no-install", "buf", "breaking", "--against", `.git#ref=${ref}`], { cwd: root, stdio: "inherit" });
  console.log(`buf breaking: no breaking change against ${ref}`);
} catch (err) {
  // buf exits 100 when it found breaking changes; anything else is buf failing to run.
  if (err.status === 100) {
    console.error(`buf breaking: the changes above break the wire or on-disk format against ${ref}`);
    process.exit(1);
  }
  console.error(`buf breaking could not run against ${ref} (exit ${err.status ?? "?"}; see above)`);
  process.exit(2);
}
