// The compatibility suite's nonstop client (test/support/compat-programs.ts): a failed write is
// written again on a new connection, to wherever the endpoint now points, so the acknowledged keys
// stay 1..n; and its short account of missing keys.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { describeKeys, nonstopWriter, type CompatProgram, type Endpoint } from '../support/compat-programs.js';

/** A program whose connection fails once at each key of FAILAT (ONFAIL is told), recording what went where. */
function flakyProgram(failAt: Set<number>, onFail: () => void = () => {}) {
  const written: Array<{ key: number; host: string }> = [];
  let opened = 0;
  const program: CompatProgram = {
    name: 'redis',
    image: 'chipmunk/redis',
    command: [],
    containerPort: 6379,
    protocol: 'tcp',
    ping: async () => undefined,
    check: async () => ({ missing: [] }),
    async openWriter(ep: Endpoint) {
      opened++;
      return {
        async write(i: number) {
          // A real write waits on I/O; one that never yields would starve every timer.
          await new Promise((r) => setImmediate(r));
          if (failAt.delete(i)) {
            onFail();
            throw new Error(`connection to ${ep.host} lost at ${i}`);
          }
          written.push({ key: i, host: ep.host });
        },
        close() {},
      };
    },
  };
  return { program, written, opened: () => opened };
}

describe('nonstopWriter', () => {
  it('writes a failed key again on a new connection to where the endpoint points now', async () => {
    let host = '198.18.4.11';
    // The connection breaks at key 5 because the program moved: it is at the new address from then on.
    const { program, written, opened } = flakyProgram(new Set([5]), () => (host = '198.18.4.12'));
    const writer = nonstopWriter(program, () => ({ host, port: 1 }), 1, 10_000);
    while (writer.stats.acked < 8) await new Promise((r) => setTimeout(r, 10));
    const stats = await writer.stop();
    assert.equal(stats.reconnects, 1);
    assert.equal(stats.retries, 1);
    assert.match(stats.errors[0]!, /key 5: connection to 198\.18\.4\.11 lost at 5/);
    assert.equal(opened(), 2);
    const keys = written.map((w) => w.key);
    assert.deepEqual(keys, Array.from({ length: keys.length }, (_, j) => j + 1), 'keys 1..n in order, none skipped');
    assert.equal(written.find((w) => w.key === 5)?.host, '198.18.4.12', 'key 5 went to the new address');
    assert.equal(stats.acked, keys.length);
  });

  it('starts at the key it is given and stops within its time bound', async () => {
    const { program, written } = flakyProgram(new Set());
    const writer = nonstopWriter(program, () => ({ host: '127.0.0.1', port: 1 }), 101, 50);
    await new Promise((r) => setTimeout(r, 100));
    const stats = await writer.stop();
    assert.equal(written[0]?.key, 101);
    const count = written.length;
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(written.length, count, 'nothing written after the bound');
    assert.equal(stats.acked, 100 + count);
  });
});

describe('describeKeys', () => {
  it('names runs of keys, and counts them when there are many', () => {
    assert.equal(describeKeys([1, 2, 3, 7, 9, 10]), '1-3, 7, 9-10');
    assert.equal(describeKeys([]), '');
    assert.match(describeKeys(Array.from({ length: 20 }, (_, i) => i * 2)), /, \.\.\. \(20 keys\)$/);
  });
});
