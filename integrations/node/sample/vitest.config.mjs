// The sample suite's Vitest config: what a user's looks like, plus `include`
// to keep the sample apart.
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['vitest/**/*.test.mjs'],
    setupFiles: ['../vitest.mjs'],
  },
});
