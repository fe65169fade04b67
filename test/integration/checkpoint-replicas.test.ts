// Checkpoints on two store replicas with real agents: a real agent (runc + CRIU in a test host
// of a runc pair, test/support/runc-agents.ts) checkpoints a container and uploads it to two
// checkpoint stores at once; the first store then dies with its host, and the other test host
// restores the container from the checkpoint, reading it from the replica left.
// Needs root and `npm run setup`; set CHIPMUNK_RUNC_PAIR_NET to a network no other suite uses.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Fastify, { type FastifyInstance } from 'fastify';
import { CheckpointStore, CheckpointStoreClient, checkpointStoreRoutes } from '../../src/checkpoint-store/index.js';
import { ensureTestImages } from '../../src/devtools/images.js';
import { installApiConventions } from '../../src/shared/http.js';
import { removeTree } from '../../src/shared/remove-tree.js';
import { makeRuncAgents, type RuncAgents } from '../support/runc-agents.js';
import { prepareRuncPairs } from '../support/runc-pair.js';

/** The token makeRuncAgents' agents and store use. */
const TOKEN = 'agent-contract-token';

describe('checkpoints on two store replicas, real agents', { timeout: 180_000 }, () => {
  let cluster: RuncAgents;
  let work: string;
  let second: { store: CheckpointStore; app: FastifyInstance; url: string };

  before(async () => {
    await ensureTestImages();
    await prepareRuncPairs();
    cluster = await makeRuncAgents();
    work = await mkdtemp(join(tmpdir(), 'chipmunk-replica-it-'));
    const store = await CheckpointStore.open({ root: join(work, 'store-2') });
    const app = Fastify();
    installApiConventions(app, TOKEN);
    await app.register(checkpointStoreRoutes(store));
    second = { store, app, url: (await app.listen({ host: '127.0.0.1', port: 0 })).replace(/\/$/, '') };
  });

  after(async () => {
    await second?.app.close().catch(() => undefined);
    await second?.store.close().catch(() => undefined);
    await cluster?.cleanup();
    if (work) await removeTree(work);
  });

  it('uploads one checkpoint to both replicas and restores it on the other node from the replica left', async () => {
    const [home, other] = [cluster.nodes[0]!, cluster.nodes[1]!];
    const name = `rep-${randomBytes(3).toString('hex')}`;
    const c = await home.api.run({ name, image: cluster.image, command: cluster.command, env: {}, ports: [], memoryBytes: 128 * 1024 * 1024 });
    const cid = `ckpt-${randomBytes(4).toString('hex')}`;
    await home.api.checkpoint(name, { checkpointId: cid });
    const t = Date.now();
    const stored = await home.api.uploadCheckpoint(cid, { container: name, storeUrl: cluster.storeUrl, replicaUrls: [second.url], logPosition: null, metadata: { spec: c.spec, generation: c.generation } });
    const uploadMs = Date.now() - t;
    await home.api.discardCheckpoint(cid);
    for (const url of [cluster.storeUrl, second.url]) {
      const listed = await new CheckpointStoreClient({ baseUrl: url, token: TOKEN }).list(name);
      assert.deepEqual(listed.map((x) => x.id), [stored.id], `replica ${url} holds the checkpoint under the same id`);
    }

    // The first replica's host dies; the container's node too.
    const first = new CheckpointStoreClient({ baseUrl: cluster.storeUrl, token: TOKEN });
    await home.api.remove(name);
    await cluster.killStore();
    await assert.rejects(first.list(name), 'the first replica no longer answers');

    const op = `mig-rep-${randomBytes(4).toString('hex')}`;
    const t2 = Date.now();
    const restored = await other.api.restore(op, {
      migrationId: op,
      mode: 'copy',
      spec: c.spec,
      generation: c.generation + 1,
      source: { node: home.name, url: home.url },
      checkpoint: { storeUrl: cluster.storeUrl, replicaUrls: [second.url], id: stored.id },
    });
    await other.api.settle(op);
    assert.equal(restored.container.status, 'running');
    assert.equal((await other.api.get(name)).generation, c.generation + 1);
    process.stderr.write(`upload to 2 replicas: ${uploadMs} ms; restore from the second replica (first dead): ${Date.now() - t2} ms\n`);
    await other.api.remove(name);
  });
});
