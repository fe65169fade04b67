// The runtime contract on the real runtime: two RuncRuntimes, each driving its own test host
// (a network namespace on this machine, see src/cluster/testhost.ts) through `hostNetns`,
// with real runc + CRIU dumps, checkpoints, restores and lazy page servers between them.
// Needs root and `npm run setup` (CRIU >= 4.2 at /opt/chipmunk/bin/criu, runc, podman, CNI,
// fs.pipe-max-size >= 4 MiB for lazy migration).
import { before } from 'node:test';
import { ensureTestImages } from '../../src/devtools/images.js';
import { describeRuntimeContract } from '../contract/runtime.contract.js';
import { makeRuncPair, prepareRuncPairs } from '../support/runc-pair.js';

before(async () => {
  await ensureTestImages();
  await prepareRuncPairs();
});

describeRuntimeContract('RuncRuntime on two test hosts', makeRuncPair, { timeoutMs: 5 * 60_000 });
