// Runs `buf breaking` against a git ref: `npm run breaking -- <ref>` (default: main).
import { execFileSync } from "node:child_process";

const ref = process.argv[2] ?? "main";
const root = new URL("..", import.meta.url).pathname;
try {
  execFileSync("npx", ["--no-install", "buf", "breaking", "--against", `.git#ref=${ref}`], { cwd: root, stdio: "inherit" });
  console.log(`no breaking change against ${ref}`);
} catch {
  console.error(`buf breaking found changes against ${ref} that break the wire or on-disk format (see above)`);
  process.exit(1);
}
