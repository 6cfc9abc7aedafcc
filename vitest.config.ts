import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Emulators start as child processes per test file; forks keep files isolated.
    pool: 'forks',
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Two cores: more files at once only makes emulators fight for CPU.
    maxWorkers: 2,
  },
});
