// A real Redis (Debian's redis-server, src/devtools/compat-images.ts) keeps its clients'
// connections across a lazy and a copy move: two RESP clients on the machine, one at the
// container's cluster address and one through its published port, each send INCR every 10 ms
// over one connection and must get every reply, in order (1, 2, 3...: no lost or repeated
// command), with no reset or error; the keys written before the move are all there after it.
// Needs root and `npm run setup`; runs on the runc pair's own network:
//   CHIPMUNK_RUNC_PAIR_NET=4 node --import tsx --test test/integration/runtime-keep-connections-redis.test.ts
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ensureImage } from '../../src/devtools/images.js';
import type { ContainerSpec } from '../../src/shared/protocol.js';
import { COMPAT_PROGRAMS, describeKeys, waitUntilServing, writeKeys, type Endpoint } from '../support/compat-programs.js';
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

/** One RESP connection sending `INCR key` every 10 ms; records each integer reply and when it came. */
class IncrClient {
  private buffered = '';
  private sent = 0;
  private timer?: NodeJS.Timeout;
  readonly replies: Array<{ value: number; at: number }> = [];
  readonly errors: string[] = [];

  private constructor(
    private readonly socket: Socket,
    readonly key: string,
  ) {
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => {
      this.buffered += d;
      let end: number;
      while ((end = this.buffered.indexOf('\r\n')) >= 0) {
        const line = this.buffered.slice(0, end);
        this.buffered = this.buffered.slice(end + 2);
        if (line.startsWith(':')) this.replies.push({ value: Number(line.slice(1)), at: Date.now() });
        else this.errors.push(`unexpected reply ${line}`);
      }
    });
    socket.on('error', (err) => this.errors.push(err.message));
    socket.on('close', () => this.errors.push('connection closed'));
  }

  static async open(ep: Endpoint, key: string): Promise<IncrClient> {
    assert.match(ep.host, /^198\.1[89]\./, `${ep.host} is not a test address`);
    const socket = connect(ep);
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const client = new IncrClient(socket, key);
    client.timer = setInterval(() => {
      client.sent++;
      client.socket.write(`*2\r\n$4\r\nINCR\r\n$${Buffer.byteLength(key)}\r\n${key}\r\n`);
    }, 10);
    return client;
  }

  /** Stops sending and waits (bounded) for the reply to every command sent; returns how many were sent. */
  async stop(): Promise<number> {
    clearInterval(this.timer);
    const deadline = Date.now() + 30_000;
    while (this.replies.length < this.sent && this.errors.length === 0 && Date.now() < deadline) await sleep(20);
    this.socket.destroy();
    return this.sent;
  }

  maxGapMs(since: number): number {
    const times = this.replies.filter((r) => r.at >= since).map((r) => r.at);
    return times.reduce((gap, t, i) => (i === 0 ? 0 : Math.max(gap, t - times[i - 1]!)), 0);
  }

  assertEveryReplyInOrder(sent: number): void {
    assert.deepEqual(this.errors, [], `${this.key}: the connection must see no reset, close or error`);
    assert.equal(this.replies.length, sent, `${this.key}: every INCR sent (${sent}) must be answered, ${this.replies.length} were`);
    this.replies.forEach((r, i) => assert.equal(r.value, i + 1, `${this.key}: reply ${i + 1} is ${r.value}`));
  }
}

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
