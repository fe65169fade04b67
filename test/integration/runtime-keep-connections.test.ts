// A container keeps its cluster address (ContainerSpec.address) across moves, and an established
// TCP connection to it survives a lazy and a copy move: a client on the machine sends a line every
// 10 ms over one connection to an echo server (busybox nc + cat) and must get every line back, in
// order, with no reset or error, across both moves; so does one through a published port, while
// a connection the container opened itself is reset. The test plays the part the local cluster
// gives the controller: after each restore it routes the address to the new node
// (test/support/pair-addresses.ts). Needs root and `npm run setup`; runs on the runc pair's own network:
//   CHIPMUNK_RUNC_PAIR_NET=4 node --import tsx --test test/integration/runtime-keep-connections.test.ts
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer, type Server, type Socket } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ensureImage } from '../../src/devtools/images.js';
import { runUnchecked } from '../../src/shared/exec.js';
import type { AgentContainer, ContainerSpec } from '../../src/shared/protocol.js';
import { mustExecIn } from '../support/in-container.js';
import { EchoClient } from '../support/kept-connection-clients.js';
import { PairAddressRoutes, pairAddress as addressOf, pairHostNetns } from '../support/pair-addresses.js';
import { RUNC_PAIR_NET, RUNC_PAIR_NODES, makeRuncPair, prepareRuncPairs } from '../support/runc-pair.js';

const IMAGE = 'chipmunk/busybox';
const ECHO_PORT = 7007;
const timeout = 4 * 60_000;
const [SOURCE, TARGET] = RUNC_PAIR_NODES;
/** The machine's address on the pair's bridge: the clients' side. */
const MACHINE = `198.18.${RUNC_PAIR_NET}.1`;
const PUBLISHED_PORT = 17100 + RUNC_PAIR_NET;
const OUTBOUND_PORT = 17200 + RUNC_PAIR_NET;
let routes: PairAddressRoutes;

before(async () => {
  await ensureImage(IMAGE);
  await prepareRuncPairs();
  routes = await PairAddressRoutes.create();
});

after(async () => {
  await routes?.cleanup();
});

function echoSpec(name: string, address: string): ContainerSpec {
  return { name, image: IMAGE, command: ['nc', '-ll', '-p', String(ECHO_PORT), '-e', '/bin/cat'], env: {}, ports: [], memoryBytes: 0, address };
}

async function containerAddresses(c: AgentContainer): Promise<string> {
  return mustExecIn(c, ['ip', '-4', '-o', 'addr', 'show', 'dev', 'eth0']);
}

describe('a container keeps its cluster address and its established connections across moves', { timeout }, () => {
  for (const mode of ['lazy', 'copy'] as const) {
    it(`an echo connection sending every 10 ms gets every reply in order across a ${mode} move`, async () => {
      const pair = await makeRuncPair();
      try {
        const address = addressOf(mode === 'lazy' ? 1 : 2);
        const c = await pair.source.run(echoSpec(`keepconn-${mode}`, address));
        await routes.routeTo(address, SOURCE);
        assert.match(await containerAddresses(c), new RegExp(`${address.replace(/\./g, '\\.')}/32`));
        const client = await EchoClient.open({ host: address, port: ECHO_PORT });
        await sleep(300);
        assert.ok(client.replies.length > 0, 'the echo server answers on the cluster address');
        const since = Date.now();
        const moved = await routes.move(pair, c, mode);
        await sleep(500);
        const gap = client.maxGapMs(since);
        assert.deepEqual(client.errors, [], `after the ${mode} move the connection must still be open`);
        assert.match(await containerAddresses(moved), new RegExp(`${address.replace(/\./g, '\\.')}/32`), 'the moved container has its address');
        const sent = await client.stop();
        client.assertAllInOrder(sent);
        console.log(`${mode} move: kept connection, ${sent} lines echoed in order; longest gap between replies ${gap} ms`);
      } finally {
        await pair.cleanup();
      }
    });
  }

  it('two containers moved at once keep their addresses and their connections', async () => {
    const pair = await makeRuncPair();
    try {
      const names = ['keepconn-a', 'keepconn-b'];
      const addresses = [addressOf(3), addressOf(4)];
      const containers = await Promise.all(names.map((name, i) => pair.source.run(echoSpec(name, addresses[i]!))));
      for (const address of addresses) await routes.routeTo(address, SOURCE);
      const clients = await Promise.all(addresses.map((address) => EchoClient.open({ host: address, port: ECHO_PORT })));
      await sleep(300);
      const moved = await Promise.all(containers.map((c) => routes.move(pair, c, 'lazy')));
      await sleep(500);
      for (const [i, c] of moved.entries()) {
        assert.match(await containerAddresses(c), new RegExp(`${addresses[i]!.replace(/\./g, '\\.')}/32`), `${c.name} keeps its address`);
        const sent = await clients[i]!.stop();
        clients[i]!.assertAllInOrder(sent);
      }
    } finally {
      await pair.cleanup();
    }
  });

  it('a move keeps the connection through a published port too, and resets the one the container opened itself', async () => {
    const pair = await makeRuncPair();
    const outbound = await outboundPeer(OUTBOUND_PORT);
    try {
      const address = addressOf(6);
      // The echo server, and a connection of the container's own to the machine (bound to its node's CNI address).
      const spec: ContainerSpec = {
        ...echoSpec('keepconn-published', address),
        command: ['sh', '-c', `nc ${MACHINE} ${OUTBOUND_PORT} -e /bin/cat & exec nc -ll -p ${ECHO_PORT} -e /bin/cat`],
        ports: [{ hostPort: PUBLISHED_PORT, containerPort: ECHO_PORT, protocol: 'tcp' }],
      };
      const c = await pair.source.run(spec);
      await routes.routeTo(address, SOURCE);
      const direct = await EchoClient.open({ host: address, port: ECHO_PORT });
      const published = await EchoClient.open({ host: SOURCE.address, port: PUBLISHED_PORT });
      await sleep(300);
      const deadline = Date.now() + 10_000;
      while ((outbound.peers[0]?.echoed ?? 0) === 0 && Date.now() < deadline) await sleep(20);
      assert.ok((outbound.peers[0]?.echoed ?? 0) > 0, "the container's own connection to the machine echoes");
      assert.ok(direct.replies.length > 0 && published.replies.length > 0, 'both clients get answers before the move');

      const since = Date.now();
      const moved = await routes.move(pair, c, 'lazy');
      await sleep(500);
      assert.match(await containerAddresses(moved), new RegExp(`${address.replace(/\./g, '\\.')}/32`));
      assert.deepEqual(outbound.peers[0]!.errors, ['ECONNRESET'], "the container's own connection is reset (its address stays behind), never left silent");
      const sourceNat = await runUnchecked('nsenter', [`--net=${pairHostNetns(SOURCE)}`, '--', 'iptables-save', '-t', 'nat']);
      assert.doesNotMatch(sourceNat.stdout, /chipmunk published/, 'the source dropped its SNAT rule with the container (conntrack keeps the connection)');
      for (const [what, client] of [['cluster address', direct], ['published port', published]] as const) {
        const gap = client.maxGapMs(since);
        const sent = await client.stop();
        client.assertAllInOrder(sent);
        console.log(`published-port move: the ${what} client kept its connection, ${sent} lines in order, longest gap ${gap} ms`);
      }
      const fresh = await EchoClient.open({ host: TARGET.address, port: PUBLISHED_PORT });
      await sleep(300);
      const sent = await fresh.stop();
      fresh.assertAllInOrder(sent);
      assert.ok(sent > 0, 'a new connection to the published port on the new node works');
    } finally {
      for (const peer of outbound.peers) peer.stop();
      outbound.server.close();
      await pair.cleanup();
    }
  });

  it('after a failover (a restore from a checkpoint) the old connection is reset at its next packet, and a new one works', async () => {
    const pair = await makeRuncPair();
    try {
      const address = addressOf(5);
      const c = await pair.source.run(echoSpec('keepconn-failover', address));
      await routes.routeTo(address, SOURCE);
      const client = await EchoClient.open({ host: address, port: ECHO_PORT });
      await sleep(300);
      const ckpt = await pair.source.checkpoint(c.name, `ckpt-${randomBytes(3).toString('hex')}`);
      // The source host dies: nothing of it reaches the client any more (no FIN, no reset), then its container goes.
      await runIn(pairHostNetns(SOURCE), 'iptables', ['-I', 'FORWARD', '-s', address, '-j', 'DROP']);
      await pair.source.remove(c.name, { force: true });
      const restoreId = `from-ckpt-${randomBytes(3).toString('hex')}`;
      await pair.copyTrees(restoreId, ckpt.paths);
      await pair.target.restore(c.spec, { migrationId: restoreId, mode: 'copy', generation: c.generation + 1 });
      await routes.routeTo(address, TARGET);
      const routedAt = Date.now();
      const deadline = routedAt + 10_000;
      while (client.errors.length === 0 && Date.now() < deadline) await sleep(10);
      const resetAfterMs = Date.now() - routedAt;
      await client.stop();
      assert.match(client.errors[0] ?? 'still silent after 10 s', /ECONNRESET/, 'the old connection is reset, not left silent');
      console.log(`failover: the old connection was reset ${resetAfterMs} ms after the address moved`);
      const fresh = await EchoClient.open({ host: address, port: ECHO_PORT });
      await sleep(300);
      const sent = await fresh.stop();
      fresh.assertAllInOrder(sent);
      assert.ok(sent > 0);
    } finally {
      await pair.cleanup();
    }
  });
});

/** A listener on the machine's end of the pair's bridge; the container opens a connection to it and echoes. */
async function outboundPeer(port: number): Promise<{ server: Server; peers: EchoPeer[] }> {
  const peers: EchoPeer[] = [];
  const server = createServer((socket) => peers.push(new EchoPeer(socket)));
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(port, MACHINE, resolve));
  return { server, peers };
}

/** The machine's end of a connection the container opened: sends a line every 10 ms, records echoes and errors. */
class EchoPeer {
  readonly errors: string[] = [];
  echoed = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly socket: Socket) {
    socket.on('data', (d) => (this.echoed += d.toString().split('\n').length - 1));
    socket.on('error', (err) => this.errors.push((err as NodeJS.ErrnoException).code ?? err.message));
    socket.on('close', () => clearInterval(this.timer));
    this.timer = setInterval(() => socket.write('ping\n'), 10);
  }

  stop(): void {
    clearInterval(this.timer);
    this.socket.destroy();
  }
}

async function runIn(netns: string, cmd: string, args: string[]): Promise<void> {
  const res = await runUnchecked('nsenter', [`--net=${netns}`, '--', cmd, ...args]);
  assert.equal(res.code, 0, `${cmd} ${args.join(' ')} in ${netns}: ${res.stderr}`);
}
