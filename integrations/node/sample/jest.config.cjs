// The sample suite's Jest config: what a user's looks like, plus `roots` and
// `transform` to keep the sample apart and fast.
module.exports = {
  roots: ['<rootDir>/jest'],
  transform: {},
  setupFilesAfterEnv: ['<rootDir>/../jest.cjs'],
};
