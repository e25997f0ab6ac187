// The end-to-end suite's Jest config: the user's one line
// (setupFilesAfterEnv), plus `roots` to keep the suite apart.
module.exports = {
  roots: ['<rootDir>/jest'],
  transform: {},
  setupFilesAfterEnv: ['<rootDir>/../jest.cjs'],
};
