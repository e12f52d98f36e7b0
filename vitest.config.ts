import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Integration suites start real servers and processes; two workers match the 2-core machines.
    pool: "forks",
    maxWorkers: 2,
  },
});
