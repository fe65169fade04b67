// The agent contract (test/contract/agent.contract.ts) on real agents: the agent's HTTP server
// over a real RuncRuntime in each of two test hosts (runc + CRIU dumps, restores, lazy page
// servers, checkpoints to a real checkpoint store), reached through HttpAgentApi. The fakes the
// controller's unit tests use pass the same suite (test/unit/agent-contract-fake.test.ts).
// Needs root and `npm run setup`. Uses bridge chmkr-br0 (198.18.2.0/24): not at the same time
// as runtime-runc.test.ts.
import { before } from 'node:test';
import { ensureTestImages } from '../../src/devtools/images.js';
import { describeAgentContract } from '../contract/agent.contract.js';
import { makeRuncAgents } from '../support/runc-agents.js';
import { prepareRuncPairs } from '../support/runc-pair.js';

before(async () => {
  await ensureTestImages();
  await prepareRuncPairs();
});

describeAgentContract('real agents on two test hosts', makeRuncAgents, { timeoutMs: 60_000 });
