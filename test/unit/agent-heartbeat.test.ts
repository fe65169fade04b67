// The agent's heartbeat loop (src/agent/heartbeat.ts) against a stand-in controller on loopback:
// acting on an answer (fencing a copy that was restored elsewhere: runc, mounts, network, which
// take seconds on a loaded host) must not hold back the heartbeats, or the node's lease runs out
// meanwhile and the node is judged dead again.
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { startHeartbeats } from '../../src/agent/heartbeat.js';
import type { HeartbeatResponse } from '../../src/shared/protocol.js';

const registration = { name: 'n1', address: '127.0.0.1', url: 'http://127.0.0.1:1', capabilities: { lazyMigration: true, softDirty: false, cgroupMode: 'v2' as const } };

/** A controller that answers every heartbeat with a fence list of one container, and counts them. */
async function controller(): Promise<{ url: string; beats: () => number; close: () => Promise<void> }> {
  let beats = 0;
  const server: Server = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      beats += 1;
      const answer: HeartbeatResponse = { ...registration, status: 'ready', heartbeatMs: 50, fence: [{ name: 'web', generation: 3 }] };
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(answer));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}`, beats: () => beats, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

describe('agent heartbeats', () => {
  it('go on every interval while a slow fencing pass runs, and fencing passes do not overlap', async () => {
    const ctl = await controller();
    let running = 0;
    let overlapped = false;
    let passes = 0;
    const heartbeats = await startHeartbeats({
      controllerUrls: [ctl.url],
      token: 't',
      registration,
      log: pino({ level: 'silent' }),
      onAnswer: async () => {
        passes += 1;
        running += 1;
        if (running > 1) overlapped = true;
        await sleep(1_000);
        running -= 1;
      },
    });
    try {
      const during = ctl.beats();
      await sleep(600);
      // Every 50 ms: a dozen in 600 ms, bar a loaded machine; held back, there would be none.
      assert.ok(ctl.beats() - during >= 3, `heartbeats went on during the fencing pass: ${ctl.beats() - during} in 600 ms`);
      assert.equal(passes, 1, 'one fencing pass at a time: the answers meanwhile list the same containers');
      await sleep(700);
      assert.ok(passes >= 2, 'the next answer after the pass ended starts another');
      assert.equal(overlapped, false);
    } finally {
      heartbeats.stop();
      await sleep(1_100);
      await ctl.close();
    }
  });
});
