/** The controller's pause points (fault harness): a migration waits at the armed step, says so, and goes on when resumed. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { request } from 'undici';
import { startController } from '../../src/controller/index.js';
import { ApiClient } from '../../src/shared/http.js';
import type { MigrationRecord } from '../../src/shared/protocol.js';
import { FakeCluster } from '../fakes/agents.js';

const TOKEN = 'pause-token';

test('a migration pauses at migration:transfer (recorded in that phase) until resumed; the route is off without CHIPMUNK_ENABLE_FAULTS', async () => {
  const cluster = new FakeCluster();
  for (const node of ['node1', 'node2']) cluster.add(node);
  const saved = process.env.CHIPMUNK_ENABLE_FAULTS;
  process.env.CHIPMUNK_ENABLE_FAULTS = '1';
  const controller = await startController({ listen: { host: '127.0.0.1', port: 0 }, token: TOKEN, storeSpec: 'memory:', logger: pino({ level: 'silent' }), agentFactory: cluster.resolver });
  if (saved === undefined) delete process.env.CHIPMUNK_ENABLE_FAULTS;
  else process.env.CHIPMUNK_ENABLE_FAULTS = saved;
  try {
    const client = new ApiClient({ baseUrl: controller.url, token: TOKEN, peer: 'controller' });
    for (const node of ['node1', 'node2']) {
      const res = await request(`${controller.url}/v1/nodes/${node}`, {
        method: 'PUT',
        headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
        body: JSON.stringify(cluster.agent(node).registration()),
      });
      assert.equal(res.statusCode, 200, await res.body.text());
    }
    await client.post('/v1/containers', { spec: { name: 'web', image: 'counter' }, node: 'node1' });
    await assert.rejects(client.post('/v1/debug/faults', { pauseAt: 'migration:nowhere' }), /pauseAt/, 'an unknown step is refused');
    await client.post('/v1/debug/faults', { pauseAt: 'migration:transfer' });

    let finished = false;
    const migration = client.stream('POST', '/v1/containers/web/migrate', { to: 'node2' }).then(async (res) => {
      const text = await res.body.text();
      finished = true;
      return text;
    });
    for (let i = 0; i < 100 && !(await client.get<{ reached: boolean }>('/v1/debug/faults')).reached; i++) await sleep(20);
    assert.equal((await client.get<{ reached: boolean; step: string }>('/v1/debug/faults')).step, 'migration:transfer');
    const [record] = await client.get<MigrationRecord[]>('/v1/migrations');
    assert.equal(record!.phase, 'transfer', 'paused right after the phase was recorded');
    await sleep(100);
    assert.equal(finished, false, 'the migration waits at the step');
    assert.equal(cluster.runningCopies('web'), 0, 'dumped on the source, not yet restored on the target');

    await client.post('/v1/debug/faults/resume');
    assert.match(await migration, /"summary"/);
    assert.equal(cluster.runningCopies('web'), 1);
  } finally {
    await controller.close();
  }
});
