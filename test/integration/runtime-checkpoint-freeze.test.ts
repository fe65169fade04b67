// A checkpoint whose files were copied before its freeze and mended inside it (pre-copy,
// src/agent/runtime/checkpoint-files.ts), restored on another node, its program written to
// nonstop through the checkpoint:
// - the stateful app's counter (memory) and its log file (one line per increment) come back of
//   the same instant: as many lines as the counter says, which a copy missing what the pre-copy
//   could not see fails;
// - PostgreSQL comes back with every row its client had acknowledged before the freeze, and takes
//   writes (psql checks).
// Needs root and `npm run setup`. Run with its own network:
//   CHIPMUNK_RUNC_PAIR_NET=5 node --import tsx --test test/integration/runtime-checkpoint-freeze.test.ts
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { ensureImage } from '../../src/devtools/images.js';
import type { ContainerSpec } from '../../src/shared/protocol.js';
import { APP_PORT } from '../contract/runtime.contract.js';
import { COMPAT_PROGRAMS, describeKeys, waitUntilServing, writeKeys, type Endpoint } from '../support/compat-programs.js';
import { RUNC_PAIR_NODES, makeRuncPair, prepareRuncPairs } from '../support/runc-pair.js';
import { waitFor } from '../support/wait.js';

const HOST_PORT = 18091;
const program = COMPAT_PROGRAMS.postgres;
const endpoint = (node: (typeof RUNC_PAIR_NODES)[number]): Endpoint => ({ host: node.address, port: HOST_PORT });

before(async () => {
  await ensureImage(program.image);
  await prepareRuncPairs();
});

/** Writes keys FROM, FROM+1, ... on one connection until stopped; when each was acknowledged. */
function timedWriter(ep: Endpoint, from: number) {
  const ackedAt: number[] = [];
  let stop = false;
  const loop = (async () => {
    const writer = await program.openWriter(ep);
    try {
      for (let i = from; !stop; i++) {
        await writer.write(i);
        ackedAt[i] = Date.now();
      }
    } finally {
      writer.close();
    }
  })();
  return {
    ackedAt,
    async stop() {
      stop = true;
      await loop;
    },
  };
}

describe('a pre-copy checkpoint restored on another node (the failover path)', () => {
  it('the stateful app incremented nonstop: its counter (memory) and its log file (files) are of the same instant', { timeout: 4 * 60_000 }, async () => {
    const pair = await makeRuncPair({ checkpointFreeze: 'pre-copy' });
    let stop = false;
    let incrementer: Promise<number> | undefined;
    try {
      const spec: ContainerSpec = { name: 'app-precopy', image: pair.image, command: [], env: { MEMORY_MB: '32' }, ports: [{ hostPort: HOST_PORT, containerPort: APP_PORT, protocol: 'tcp' }], memoryBytes: 0 };
      const c = await pair.source.run(spec);
      const app = (await pair.reach(pair.source, c))!;
      incrementer = (async () => {
        let n = 0;
        while (!stop) n = (await app.post('/increment')).counter;
        return n;
      })();
      await waitFor(async () => (await app.get('/')).counter >= 20, 30_000, '20 increments');
      const ckpt = await pair.source.checkpoint(c.name, 'ckpt-app');
      stop = true;
      const last = await incrementer;
      assert.ok(ckpt.frozenPhases.preCopyMs > 0, 'the files were copied before the freeze');

      await pair.source.stop(c.name, { timeoutMs: 5_000 });
      await pair.source.remove(c.name);
      await pair.copyTrees('restore-app', ckpt.paths);
      const back = await pair.target.restore(c.spec, { migrationId: 'restore-app', mode: 'copy', generation: c.generation + 1 });
      await pair.source.discardCheckpoint('ckpt-app');
      const restored = (await pair.reach(pair.target, back))!;
      const counter = (await restored.get('/')).counter as number;
      assert.ok(counter >= 20 && counter <= last, `the counter ${counter} is one the source had (20..${last})`);
      assert.equal((await restored.get('/file')).lines, counter, 'the log file has exactly as many lines as the counter: files and memory of the same instant');
      assert.equal((await restored.get('/verify-memory')).ok, true, 'the memory pattern is intact');
    } finally {
      stop = true;
      await incrementer?.catch(() => undefined);
      await pair.cleanup();
    }
  });

  it('PostgreSQL writing nonstop: every row acknowledged before the freeze is there, and it writes on', { timeout: 4 * 60_000 }, async () => {
    const pair = await makeRuncPair({ checkpointFreeze: 'pre-copy' });
    const [src, dst] = RUNC_PAIR_NODES;
    let writer: ReturnType<typeof timedWriter> | undefined;
    try {
      const spec: ContainerSpec = { name: 'pg-precopy', image: program.image, command: [], env: {}, ports: [{ hostPort: HOST_PORT, containerPort: program.containerPort, protocol: 'tcp' }], memoryBytes: 0 };
      const c = await pair.source.run(spec);
      await waitUntilServing(program, endpoint(src), 60_000);
      await writeKeys(program, endpoint(src), 1, 200);
      writer = timedWriter(endpoint(src), 201);
      const w = writer;
      await waitFor(() => w.ackedAt.length > 250, 30_000, '50 rows written nonstop');

      const called = Date.now();
      const ckpt = await pair.source.checkpoint(c.name, 'ckpt-precopy');
      await writer.stop();
      assert.ok(ckpt.frozenPhases.preCopyMs > 0, 'the files were copied before the freeze');
      // The freeze began after the pre-copy ended: rows acknowledged before this are in the checkpoint.
      const freezeNotBefore = called + ckpt.frozenPhases.preCopyMs;
      const mustHave = writer.ackedAt.reduce((last, at, i) => (at < freezeNotBefore ? i : last), 200);
      const duringPreCopy = writer.ackedAt.filter((at) => at >= called && at < freezeNotBefore).length;
      assert.ok(duringPreCopy > 0, `rows were written while the pre-copy ran (${ckpt.frozenPhases.preCopyMs} ms): the test exercised the mending`);

      await pair.source.stop(c.name, { timeoutMs: 5_000 });
      await pair.source.remove(c.name);
      await pair.copyTrees('restore-precopy', ckpt.paths);
      await pair.target.restore(c.spec, { migrationId: 'restore-precopy', mode: 'copy', generation: c.generation + 1 });
      await pair.source.discardCheckpoint('ckpt-precopy');
      await waitUntilServing(program, endpoint(dst), 30_000);
      const { missing } = await program.check(endpoint(dst), mustHave);
      assert.deepEqual(missing, [], `rows ${describeKeys(missing)} of 1..${mustHave} (${duringPreCopy} written during the pre-copy) are missing or wrong after the restore`);
      const next = writer.ackedAt.length + 1;
      await writeKeys(program, endpoint(dst), next, next + 99);
      assert.deepEqual((await program.check(endpoint(dst), mustHave)).missing, [], 'the rows are still there after more writes');
    } finally {
      await writer?.stop().catch(() => undefined);
      await pair.cleanup();
    }
  });
});
