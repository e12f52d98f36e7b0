import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Integration suites start real servers and processes; two workers match the 2-core machines.
    pool: "forks",
    maxWorkers: 2,
    // The default report, then one plain closing line "N passed, N failed" for CI.
    reporters: ["default", "./test/helpers/summary-reporter.ts"],
  },
});
