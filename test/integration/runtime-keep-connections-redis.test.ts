// A real Redis (Debian's redis-server, src/devtools/compat-images.ts) keeps its clients'
// connections across a lazy and a copy move: two RESP clients on the machine, one at the
// container's cluster address and one through its published port, each send INCR every 10 ms
// over one connection and must get every reply, in order (1, 2, 3...: no lost or repeated
// command), with no reset or error; the keys written before the move are all there after it.
// Needs root and `npm run setup`; runs on the runc pair's own network:
//   CHIPMUNK_RUNC_PAIR_NET=4 node --import tsx --test test/integration/runtime-keep-connections-redis.test.ts
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ensureImage } from '../../src/devtools/images.js';
import type { ContainerSpec } from '../../src/shared/protocol.js';
import { COMPAT_PROGRAMS, describeKeys, waitUntilServing, writeKeys, type Endpoint } from '../support/compat-programs.js';
import { IncrClient } from '../support/kept-connection-clients.js';
import { PairAddressRoutes, pairAddress } from '../support/pair-addresses.js';
import { RUNC_PAIR_NET, RUNC_PAIR_NODES, makeRuncPair, prepareRuncPairs } from '../support/runc-pair.js';

const redis = COMPAT_PROGRAMS.redis;
const PUBLISHED_PORT = 17300 + RUNC_PAIR_NET;
const KEYS = 2000;
const timeout = 4 * 60_000;
const [SOURCE, TARGET] = RUNC_PAIR_NODES;
let routes: PairAddressRoutes;

before(async () => {
  await ensureImage(redis.image);
  await prepareRuncPairs();
  routes = await PairAddressRoutes.create();
});

after(async () => {
  await routes?.cleanup();
});

describe('Redis clients keep their connections across moves', { timeout }, () => {
  for (const [i, mode] of (['lazy', 'copy'] as const).entries()) {
    it(`INCR every 10 ms at the cluster address and through the published port: every reply in order across a ${mode} move`, async () => {
      const pair = await makeRuncPair();
      try {
        const address = pairAddress(7 + i);
        const spec: ContainerSpec = {
          name: `keepconn-redis-${mode}`,
          image: redis.image,
          command: [],
          env: {},
          ports: [{ hostPort: PUBLISHED_PORT, containerPort: redis.containerPort, protocol: 'tcp' }],
          memoryBytes: 0,
          address,
        };
        const c = await pair.source.run(spec);
        await routes.routeTo(address, SOURCE);
        const direct: Endpoint = { host: address, port: redis.containerPort };
        await waitUntilServing(redis, direct, 60_000);
        await writeKeys(redis, direct, 1, KEYS);
        const clients = [await IncrClient.open(direct, 'at-address'), await IncrClient.open({ host: SOURCE.address, port: PUBLISHED_PORT }, 'published')];
        await sleep(300);
        assert.ok(clients.every((cl) => cl.replies.length > 0), 'both clients are answered before the move');

        const since = Date.now();
        await routes.move(pair, c, mode);
        await sleep(500);
        for (const client of clients) {
          const gap = client.maxGapMs(since);
          const sent = await client.stop();
          client.assertEveryReplyInOrder(sent);
          console.log(`redis ${mode} move, client ${client.key}: ${sent} INCRs answered in order on one connection; longest gap ${gap} ms`);
        }
        const { missing } = await redis.check({ host: TARGET.address, port: PUBLISHED_PORT }, KEYS);
        assert.deepEqual(missing, [], `keys ${describeKeys(missing)} of 1..${KEYS} are missing after the move`);
      } finally {
        await pair.cleanup();
      }
    });
  }
});
