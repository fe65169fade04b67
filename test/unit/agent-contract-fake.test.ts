// The agent contract (test/contract/agent.contract.ts) on the in-memory agents the controller's
// unit tests drive: if a fake answers differently from a real agent, this fails.
import { describeAgentContract } from '../contract/agent.contract.js';
import { FakeCluster } from '../fakes/agents.js';

describeAgentContract('FakeCluster', async () => {
  const cluster = new FakeCluster();
  const agents = ['node1', 'node2'].map((name) => cluster.add(name));
  const gone = cluster.add('node3');
  gone.down = true;
  let port = 27000;
  return {
    nodes: agents.map((agent) => ({ name: agent.node, url: agent.registration().url, api: agent })),
    image: 'chipmunk/busybox',
    command: ['sleep', '3600'],
    storeUrl: 'http://127.0.0.1:7400',
    pageServerPort: () => port++,
    unreachable: gone,
    cleanup: async () => undefined,
  };
});
