// Redis, memcached, nginx and PostgreSQL from Debian's binaries (src/devtools/compat-images.ts) on
// the real runtime (runc + CRIU on two test hosts, test/support/runc-pair.ts), checked by their own
// clients from this machine (test/support/compat-programs.ts, shared with bench/compat): keys
// written before a copy or a lazy move are all there on the target, and writes go on there.
// Needs root and `npm run setup`. Run with its own network so other pair users can run at once:
//   CHIPMUNK_RUNC_PAIR_NET=4 node --import tsx --test test/integration/runtime-compat-programs.test.ts
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { before, describe, it, type TestContext } from 'node:test';
import { ensureImage } from '../../src/devtools/images.js';
import type { ContainerRuntime } from '../../src/agent/runtime/types.js';
import type { ChipmunkError } from '../../src/shared/errors.js';
import type { AgentContainer, ContainerSpec, MigrationMode } from '../../src/shared/protocol.js';
import { COMPAT_PROGRAMS, describeKeys, nonstopWriter, waitUntilServing, writeKeys, type CompatProgram, type Endpoint } from '../support/compat-programs.js';
import { mustExecIn } from '../support/in-container.js';
import { moveOnPair } from '../support/pair-move.js';
import { RUNC_PAIR_NODES, makeRuncPair, prepareRuncPairs } from '../support/runc-pair.js';
import { waitFor } from '../support/wait.js';

const HOST_PORT = 18090;
const timeout = 3 * 60_000;
/** Keys written before the move, and as many after it. */
const KEYS: Record<CompatProgram['name'], number> = { redis: 1000, memcached: 1000, nginx: 200, postgres: 200 };

before(async () => {
  for (const program of Object.values(COMPAT_PROGRAMS)) await ensureImage(program.image);
  await prepareRuncPairs();
});

function specFor(program: CompatProgram, name: string, command: string[]): ContainerSpec {
  return { name, image: program.image, command, env: {}, ports: [{ hostPort: HOST_PORT, containerPort: program.containerPort, protocol: 'tcp' }], memoryBytes: 0 };
}

const endpoint = (node: (typeof RUNC_PAIR_NODES)[number]): Endpoint => ({ host: node.address, port: HOST_PORT });

async function assertAllThere(program: CompatProgram, ep: Endpoint, n: number, what: string): Promise<void> {
  const { missing } = await program.check(ep, n);
  assert.deepEqual(missing, [], `${program.name} ${what}: keys ${describeKeys(missing)} of 1..${n} are missing or wrong`);
}

/** The container's processes as `ps` inside it shows them: PID and command line. */
async function processes(c: AgentContainer): Promise<Array<{ pid: number; args: string }>> {
  const out = await mustExecIn(c, ['/bin/ps', '-o', 'pid,args']);
  return out.split('\n').slice(1).map((line) => {
    const m = /^\s*(\d+)\s+(.*)$/.exec(line)!;
    return { pid: Number(m[1]), args: m[2]! };
  });
}

/**
 * Starts PROGRAM on the source, writes keys 1..n, moves it in MODE, and checks on the target
 * that keys 1..n are there and n+1..2n can be written and read back. Returns the moved container.
 */
async function writeMoveCheck(t: TestContext, program: CompatProgram, mode: MigrationMode, opts: { command?: string[] } = {}) {
  const pair = await makeRuncPair();
  try {
    if (mode === 'lazy' && !pair.source.capabilities.lazyMigration) return t.skip('no lazy migration on these hosts');
    const [src, dst] = RUNC_PAIR_NODES;
    const c = await pair.source.run(specFor(program, `${program.name}-${mode}`, opts.command ?? []));
    const startMs = await waitUntilServing(program, endpoint(src), 60_000);
    t.diagnostic(`${program.name} answered ${startMs} ms after start`);
    const n = KEYS[program.name];
    await writeKeys(program, endpoint(src), 1, n);
    await assertAllThere(program, endpoint(src), n, 'before the move');
    const before = await processes(c);

    let moved: AgentContainer;
    try {
      moved = await moveOnPair(pair, c, mode);
    } catch (err) {
      await reportFailedDump(t, `${mode} move`, program, pair.source, c, err as Error, n);
      return;
    }
    const answerMs = await waitUntilServing(program, endpoint(dst), 30_000);
    t.diagnostic(`${program.name} answered its own client ${answerMs} ms after its ${mode} restore returned`);
    await assertAllThere(program, endpoint(dst), n, `after a ${mode} move`);
    await writeKeys(program, endpoint(dst), n + 1, 2 * n);
    await assertAllThere(program, endpoint(dst), 2 * n, `after writing on after a ${mode} move`);
    const after = await processes(moved);
    assert.deepEqual(after.map((p) => p.args).sort(), before.map((p) => p.args).sort(), 'the same processes run after the move');
    return { moved, before, after };
  } finally {
    await pair.cleanup();
  }
}

/**
 * A move or checkpoint that failed: the test then checks what the user is left with (the source runs on, every
 * key is there), prints CRIU's reason, and is reported as a known limit (todo) when it is the one
 * docs/compatibility.md names: processes of another uid cannot be dumped without CAP_SYS_RESOURCE.
 */
async function reportFailedDump(t: TestContext, what: string, program: CompatProgram, source: ContainerRuntime, c: AgentContainer, err: Error, n: number): Promise<void> {
  // CRIU's first error is its reason; the message carries its last ones, the log all of them.
  const logPath = (err as ChipmunkError).details?.logPath;
  const firstError = typeof logPath === 'string' ? (await readFile(logPath, 'utf8').catch(() => '')).split('\n').find((l) => /\bError \(/.test(l) && !/RLIMIT_NOFILE/.test(l)) : undefined;
  const why = `${err.message}${firstError ? ` [first CRIU error: ${firstError.trim()}]` : ''}`;
  t.diagnostic(`${program.name}: the ${what} failed: ${why.slice(0, 1500)}`);
  const now = await source.get(c.name);
  assert.equal(now.status, 'running', `${program.name} runs on at the source after the failed ${what}`);
  await assertAllThere(program, endpoint(RUNC_PAIR_NODES[0]), n, `on the source after the failed ${what}`);
  await writeKeys(program, endpoint(RUNC_PAIR_NODES[0]), n + 1, n + 10);
  await assertAllThere(program, endpoint(RUNC_PAIR_NODES[0]), n + 10, `on the source, writing on after the failed ${what}`);
  if (/Can't get rlimit|rlimit 0/.test(why)) {
    t.todo('non-root processes cannot be dumped here (no CAP_SYS_RESOURCE): CRIU says "Can\'t get rlimit 0: Operation not permitted"; user namespaces per container will lift it');
    return;
  }
  throw err;
}

describe('Redis (redis-cli reads back what was written; append-only file on)', () => {
  for (const mode of ['copy', 'lazy'] as const) {
    it(`a ${mode} move keeps ${KEYS.redis} keys and it takes writes on the target`, { timeout }, async (t) => {
      await writeMoveCheck(t, COMPAT_PROGRAMS.redis, mode);
    });
  }
});

describe('memcached (its text protocol reads back what was written)', () => {
  for (const mode of ['copy', 'lazy'] as const) {
    it(`a ${mode} move keeps ${KEYS.memcached} items and it takes writes on the target`, { timeout }, async (t) => {
      await writeMoveCheck(t, COMPAT_PROGRAMS.memcached, mode);
    });
  }
});

describe('nginx (master + 2 workers; curl reads the served file and what WebDAV PUT wrote)', () => {
  for (const mode of ['copy', 'lazy'] as const) {
    it(`a ${mode} move keeps its files and its workers, and it takes writes on the target`, { timeout }, async (t) => {
      const result = await writeMoveCheck(t, COMPAT_PROGRAMS.nginx, mode);
      if (!result) return;
      const workers = (ps: Array<{ pid: number; args: string }>) => ps.filter((p) => p.args.startsWith('nginx: worker process')).map((p) => p.pid);
      assert.equal(workers(result.before).length, 2, 'two workers before the move');
      // The same PIDs: the workers were restored, not respawned by the master.
      assert.deepEqual(workers(result.after), workers(result.before), 'the same two workers after the move');
    });
  }
  it('with its workers as www-data (Debian\'s default user), a copy move', { timeout }, async (t) => {
    await writeMoveCheck(t, COMPAT_PROGRAMS.nginx, 'copy', { command: ['/usr/sbin/nginx', '-g', 'daemon off; user www-data;'] });
  });
});

describe('PostgreSQL (several processes, shared memory, runs as uid 101; psql checks)', () => {
  for (const mode of ['copy', 'lazy'] as const) {
    it(`a ${mode} move keeps every row and it takes inserts on the target`, { timeout }, async (t) => {
      await writeMoveCheck(t, COMPAT_PROGRAMS.postgres, mode);
    });
  }
});

/**
 * The failover path at the runtime: a checkpoint of PROGRAM (left running) after keys 1..n, the
 * source then lost, the checkpoint restored on the target: keys 1..n are there and it takes
 * writes. (Keys written after the checkpoint are not: behind the gateway an HTTP route's request
 * log replays them, a TCP route has none; bench/compat measures that.)
 */
async function checkpointRestoreCheck(t: TestContext, program: CompatProgram): Promise<void> {
  const pair = await makeRuncPair();
  try {
    const [src, dst] = RUNC_PAIR_NODES;
    const c = await pair.source.run(specFor(program, `${program.name}-ckpt`, []));
    await waitUntilServing(program, endpoint(src), 60_000);
    const n = KEYS[program.name];
    await writeKeys(program, endpoint(src), 1, n);
    const checkpointId = `ckpt-${program.name}`;
    let ckpt: Awaited<ReturnType<ContainerRuntime['checkpoint']>>;
    try {
      ckpt = await pair.source.checkpoint(c.name, checkpointId);
    } catch (err) {
      await reportFailedDump(t, 'checkpoint', program, pair.source, c, err as Error, n);
      return;
    }
    assert.equal((await pair.source.get(c.name)).status, 'running', 'a checkpoint leaves it running');
    await assertAllThere(program, endpoint(src), n, 'after the checkpoint, on the source');
    await pair.source.stop(c.name, { timeoutMs: 5_000 });
    await pair.source.remove(c.name);
    const id = `restore-${program.name}`;
    await pair.copyTrees(id, ckpt.paths);
    await pair.target.restore(c.spec, { migrationId: id, mode: 'copy', generation: c.generation + 1 });
    await pair.source.discardCheckpoint(checkpointId);
    await waitUntilServing(program, endpoint(dst), 30_000);
    await assertAllThere(program, endpoint(dst), n, 'restored from its checkpoint on another node');
    await writeKeys(program, endpoint(dst), n + 1, 2 * n);
    await assertAllThere(program, endpoint(dst), 2 * n, 'writing on after the restore');
  } finally {
    await pair.cleanup();
  }
}

// Redis (memory, an append-only file) and PostgreSQL (several processes, shared memory, a
// non-root user); memcached and nginx take the same path, and bench/compat fails them all over.
describe('a checkpoint restored on another node (the failover path)', () => {
  for (const program of [COMPAT_PROGRAMS.redis, COMPAT_PROGRAMS.postgres]) {
    it(`${program.name}: every key written before the checkpoint is there, and it takes writes`, { timeout }, async (t) => {
      await checkpointRestoreCheck(t, program);
    });
  }
});

describe('a client writing nonstop through a move (the bench\'s client, bench/compat)', () => {
  for (const [name, mode] of [['redis', 'lazy'], ['nginx', 'copy']] as const) {
    it(`${name}: every write acknowledged before, during and after a ${mode} move is there; the client reconnects to the new address`, { timeout }, async (t) => {
      const program = COMPAT_PROGRAMS[name];
      const pair = await makeRuncPair();
      const [src, dst] = RUNC_PAIR_NODES;
      let where = endpoint(src);
      let writer: ReturnType<typeof nonstopWriter> | undefined;
      try {
        if (mode === 'lazy' && !pair.source.capabilities.lazyMigration) return t.skip('no lazy migration on these hosts');
        const c = await pair.source.run(specFor(program, `${name}-nonstop`, []));
        await waitUntilServing(program, where, 60_000);
        writer = nonstopWriter(program, () => where, 1, 90_000);
        const w = writer;
        await waitFor(() => w.stats.acked >= 100, 30_000, `100 writes to ${name}`);
        await moveOnPair(pair, c, mode);
        const atMove = w.stats.acked;
        where = endpoint(dst);
        await waitFor(() => w.stats.acked >= atMove + 100, 30_000, `100 more writes to ${name} after the move`);
        const stats = await w.stop();
        t.diagnostic(`${stats.acked} writes acknowledged, ${atMove} by the move; ${stats.reconnects} reconnects, ${stats.retries} retries, slowest write ${stats.maxWriteMs} ms; ${stats.errors.slice(0, 2).join('; ')}`);
        await assertAllThere(program, where, stats.acked, `after a ${mode} move under a nonstop client`);
      } finally {
        await writer?.stop();
        await pair.cleanup();
      }
    });
  }
});
