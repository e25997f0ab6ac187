// The end-to-end suite's Vitest config: the user's one line (setupFiles),
// plus `include` to keep the suite apart.
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['vitest/**/*.test.mjs'],
    setupFiles: ['../vitest.mjs'],
  },
});
