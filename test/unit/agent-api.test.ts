/**
 * The agent's HTTP API as the controller's client calls it (HttpAgentApi against
 * buildAgentServer, over loopback), on a FakeRuntime: the routes of a dump and of a checkpoint
 * taken on the agent, so client and server cannot name them differently.
 */
import assert from 'node:assert/strict';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { FaultInjector } from '../../src/agent/faults.js';
import type { ImageStore } from '../../src/agent/runtime/images.js';
import { FakeRuntime } from '../../src/agent/runtime/fake-runtime.js';
import { buildAgentServer } from '../../src/agent/server.js';
import { HttpAgentApi } from '../../src/controller/agent-client.js';
import { NotFoundError, StaleTermError, UnauthorizedError } from '../../src/shared/errors.js';
import { TermFence } from '../../src/shared/term-fence.js';
import { removeTree } from '../../src/shared/remove-tree.js';

const TOKEN = 'agent-api-test';

describe('agent API over HTTP', () => {
  let app: FastifyInstance;
  let api: HttpAgentApi;
  let runtime: FakeRuntime;
  let scratch: string;
  let url: string;

  before(async () => {
    scratch = await mkdtemp(join(tmpdir(), 'chipmunk-agent-api-'));
    runtime = new FakeRuntime({ node: 'n1', dataDir: join(scratch, 'data') });
    const images = { exists: async () => true } as unknown as ImageStore;
    app = buildAgentServer({
      info: { node: 'n1', address: '127.0.0.1', apiPort: 0, capabilities: runtime.capabilities, version: 'test' },
      token: TOKEN,
      runtime,
      images,
      scratchDir: join(scratch, 'scratch'),
      faults: new FaultInjector(false),
      termFence: await TermFence.open(join(scratch, 'leader-term')),
    });
    await app.listen({ host: '127.0.0.1', port: 0 });
    const address = app.server.address();
    assert.ok(address && typeof address === 'object');
    url = `http://127.0.0.1:${address.port}`;
    api = new HttpAgentApi({ node: 'n1', url, token: TOKEN });
    await api.run({ name: 'web', image: 'chipmunk/statefulapp', command: [], env: {}, ports: [], memoryBytes: 0 });
  });

  after(async () => {
    await app?.close();
    await runtime?.close();
    if (scratch) await removeTree(scratch);
  });

  it('a dump freezes the container for a migration; a rollback runs it again', async () => {
    const dumped = await api.dump('web', { migrationId: 'm1', mode: 'copy' });
    assert.equal(dumped.migrationId, 'm1');
    assert.ok(dumped.imageBytes > 0);
    assert.equal((await api.get('web')).status, 'migrating');
    assert.equal((await api.rollback('m1')).status, 'running');
  });

  it('refuses calls from a deposed controller leader once a newer one has called', async () => {
    const asLeader = (term: number, token = TOKEN) => new HttpAgentApi({ node: 'n1', url, token, term: () => term });
    assert.equal((await asLeader(5).get('web')).name, 'web');
    await assert.rejects(asLeader(99, 'wrong-token').get('web'), UnauthorizedError, 'a caller without the token raises nothing');
    assert.equal((await asLeader(5).get('web')).name, 'web');
    await asLeader(6).get('web');
    await assert.rejects(asLeader(5).stop('web'), (err: unknown) => err instanceof StaleTermError && /term 6/.test(err.message));
    assert.equal((await api.get('web')).status, 'running', 'the stale stop changed nothing; a call without a term still passes');
  });

  it('answers reads from a deposed leader (a follower now, answering `ps`): only what changes something is fenced', async () => {
    const asLeader = (term: number) => new HttpAgentApi({ node: 'n1', url, token: TOKEN, term: () => term });
    await asLeader(20).get('web');
    assert.deepEqual((await asLeader(19).listContainers()).map((c) => [c.name, c.status]), [['web', 'running']], 'the old term still reads what runs');
    assert.equal((await asLeader(19).get('web')).status, 'running');
    await assert.rejects(asLeader(19).stop('web'), StaleTermError, 'a command under the old term is still refused');
    assert.equal((await api.get('web')).status, 'running');
  });

  it('a checkpoint leaves the container running; its trees wait on the agent until discarded', async () => {
    const taken = await api.checkpoint('web', { checkpointId: 'c1' });
    assert.equal(taken.checkpointId, 'c1');
    assert.ok(taken.imageBytes > 0);
    assert.equal((await api.get('web')).status, 'running');
    await api.discardCheckpoint('c1');
    const upload = api.uploadCheckpoint('c1', { container: 'web', storeUrl: 'http://127.0.0.1:1', logPosition: null, metadata: {} });
    await assert.rejects(upload, (err: unknown) => err instanceof NotFoundError && /no checkpoint c1 on node n1/.test(err.message));
  });

  it('logs no line per request, and fastify warns of no deprecated option (FSTDEP023: disableRequestLogging at the top level)', async () => {
    const warnings: string[] = [];
    const onWarning = (warning: Error & { code?: string }) => warnings.push(warning.code ?? warning.name);
    process.on('warning', onWarning);
    const lines: string[] = [];
    const logger = pino({ level: 'info' }, { write: (line: string) => void lines.push(line) });
    const quiet = buildAgentServer({
      info: { node: 'n2', address: '127.0.0.1', apiPort: 0, capabilities: runtime.capabilities, version: 'test' },
      token: TOKEN,
      runtime,
      images: { exists: async () => true } as unknown as ImageStore,
      scratchDir: join(scratch, 'scratch-quiet'),
      faults: new FaultInjector(false),
      termFence: await TermFence.open(join(scratch, 'leader-term-quiet')),
      logger,
    });
    try {
      const res = await quiet.inject({ method: 'GET', url: '/healthz' });
      assert.equal(res.statusCode, 200);
      // Process warnings are emitted on a later tick.
      await new Promise((resolve) => setImmediate(resolve));
    } finally {
      process.off('warning', onWarning);
      await quiet.close();
    }
    assert.deepEqual(warnings.filter((code) => code.startsWith('FSTDEP')), []);
    assert.deepEqual(lines.filter((line) => /incoming request|request completed/.test(line)), []);
  });
});
