/**
 * The source agent's page server port: the controller's choice unless something on this host
 * holds it (a page server an earlier leader's migration left, any program), then the next free
 * port of the range.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:net';
import { freePageServerPort } from '../../src/agent/host/page-server-port.js';

/** Unref'd: a server left open by a failed test must not keep the test file's process from exiting. */
function listen(port: number): Promise<Server> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once('error', reject);
    server.listen({ host: '127.0.0.1', port }, () => resolve(server));
  });
}

/** Holds `ports` of a fresh free range (`pick` chooses which), trying other ranges while another program takes one first. */
async function holdPorts(pick: (range: { first: number; last: number }) => number[]): Promise<{ range: { first: number; last: number }; held: Server[] }> {
  for (let attempt = 0; ; attempt++) {
    const range = await freeRange();
    const results = await Promise.allSettled(pick(range).map((port) => listen(port)));
    const held = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    if (held.length === results.length) return { range, held };
    for (const server of held) server.close();
    if (attempt === 10) throw new Error('could not hold three consecutive ports in 10 tries');
  }
}

/** Three consecutive ports nobody holds now. */
async function freeRange(): Promise<{ first: number; last: number }> {
  const probe = await listen(0);
  const port = (probe.address() as { port: number }).port;
  await new Promise((resolve) => probe.close(resolve));
  return { first: port, last: port + 2 };
}

describe('page server port', () => {
  it('is the one asked for when it is free', async () => {
    const range = await freeRange();
    assert.equal(await freePageServerPort('127.0.0.1', range.first + 1, range), range.first + 1);
  });

  it('is the next free one of the range when the one asked for is held, wrapping around', async () => {
    const { range, held } = await holdPorts((r) => [r.last, r.first]);
    try {
      assert.equal(await freePageServerPort('127.0.0.1', range.last, range), range.first + 1);
    } finally {
      for (const server of held) server.close();
    }
  });

  it('is the one asked for when this process cannot tell (the address is not in its network namespace)', async () => {
    const range = await freeRange();
    assert.equal(await freePageServerPort('198.19.254.254', range.first, range), range.first);
  });

  it('fails clearly when every port of the range is held', async () => {
    const { range, held } = await holdPorts((r) => [r.first, r.first + 1, r.last]);
    try {
      await assert.rejects(freePageServerPort('127.0.0.1', range.first, range), (err: Error & { code?: string }) => {
        assert.equal(err.code, 'CHIPMUNK_UNAVAILABLE');
        assert.match(err.message, /no page server port .* is free on 127\.0\.0\.1/);
        return true;
      });
    } finally {
      for (const server of held) server.close();
    }
  });
});
