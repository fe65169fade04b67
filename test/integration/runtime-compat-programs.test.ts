// Redis, memcached, nginx, PostgreSQL and Python services (http.server in memory, an SQLite writer)
// from Debian's binaries (src/devtools/compat-images.ts, images.ts) on
// the real runtime (runc + CRIU on two test hosts, test/support/runc-pair.ts), checked by their own
// clients from this machine (test/support/compat-programs.ts, shared with bench/compat): keys
// written before a copy or a lazy move are all there on the target, and writes go on there.
// Needs root and `npm run setup`. Run with its own network so other pair users can run at once:
//   CHIPMUNK_RUNC_PAIR_NET=4 node --import tsx --test test/integration/runtime-compat-programs.test.ts
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { before, describe, it, type TestContext } from 'node:test';
import { ensureImage } from '../../src/devtools/images.js';
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
const KEYS: Record<CompatProgram['name'], number> = { redis: 1000, memcached: 1000, nginx: 200, postgres: 200, python: 500, sqlite: 500, 'sqlite-delete': 500 };

before(async () => {
  for (const program of Object.values(COMPAT_PROGRAMS)) await ensureImage(program.image);
  await prepareRuncPairs();
});

function specFor(program: CompatProgram, name: string, command: string[]): ContainerSpec {
  return { name, image: program.image, command, env: {}, ports: [{ hostPort: HOST_PORT, containerPort: program.containerPort, protocol: 'tcp' }], memoryBytes: 0 };
}

/** Whether this process (root, as the agents are) holds CAP_SYS_RESOURCE: /proc/self/status, CapEff bit 24. */
function hostHasSysResource(): boolean {
  const capEff = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '0';
  return ((BigInt(`0x${capEff}`) >> 24n) & 1n) === 1n;
}

const endpoint = (node: (typeof RUNC_PAIR_NODES)[number]): Endpoint => ({ host: node.address, port: HOST_PORT });

async function assertAllThere(program: CompatProgram, ep: Endpoint, n: number, what: string): Promise<void> {
  const { missing } = await program.check(ep, n);
  assert.deepEqual(missing, [], `${program.name} ${what}: keys ${describeKeys(missing)} of 1..${n} are missing or wrong`);
}

/**
 * The container's long-lived processes as `ps` inside it shows them (PID and command line): not
 * `ps` itself, nor what comes and goes with clients and timers (a process that is exiting shows
 * as `[name]`; PostgreSQL's connection backends and autovacuum workers).
 */
async function processes(c: AgentContainer): Promise<Array<{ pid: number; args: string }>> {
  const out = await mustExecIn(c, ['/bin/ps', '-o', 'pid,args']);
  const transient = /^(\/bin\/ps |\[|postgres: (autovacuum worker|\S+ \S+ \S+\(\d+\)))/;
  return out
    .split('\n')
    .slice(1)
    .map((line) => {
      const m = /^\s*(\d+)\s+(.*)$/.exec(line)!;
      return { pid: Number(m[1]), args: m[2]! };
    })
    .filter((p) => !transient.test(p.args))
    .sort((a, b) => a.pid - b.pid);
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
    const c = await pair.source.run(specFor(program, `${program.name}-${mode}`, opts.command ?? program.command));
    const startMs = await waitUntilServing(program, endpoint(src), 60_000);
    t.diagnostic(`${program.name} answered ${startMs} ms after start`);
    const n = KEYS[program.name];
    await writeKeys(program, endpoint(src), 1, n);
    await assertAllThere(program, endpoint(src), n, 'before the move');
    const before = await processes(c);

    const moved = await moveOnPair(pair, c, mode);
    const answerMs = await waitUntilServing(program, endpoint(dst), 30_000);
    t.diagnostic(`${program.name} answered its own client ${answerMs} ms after its ${mode} restore returned`);
    await assertAllThere(program, endpoint(dst), n, `after a ${mode} move`);
    await writeKeys(program, endpoint(dst), n + 1, 2 * n);
    await assertAllThere(program, endpoint(dst), 2 * n, `after writing on after a ${mode} move`);
    const after = await processes(moved);
    // The same PIDs: restored, not started again.
    assert.deepEqual(after, before, 'the same processes run after the move');
    return { moved, before, after };
  } finally {
    await pair.cleanup();
  }
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
  it('without a user namespace of its own, on a host without CAP_SYS_RESOURCE: the move is refused naming it, and the server runs on and takes inserts', { timeout }, async (t) => {
    if (hostHasSysResource()) return t.skip('this host has CAP_SYS_RESOURCE: the dump works without a user namespace');
    const program = COMPAT_PROGRAMS.postgres;
    const pair = await makeRuncPair({ userNamespace: false });
    try {
      const src = endpoint(RUNC_PAIR_NODES[0]);
      const c = await pair.source.run(specFor(program, 'postgres-nouserns', []));
      await waitUntilServing(program, src, 60_000);
      await writeKeys(program, src, 1, 50);
      const err = await moveOnPair(pair, c, 'copy').then(
        () => assert.fail('the move of a uid-101 server without a user namespace worked on a host without CAP_SYS_RESOURCE'),
        (e: ChipmunkError) => e,
      );
      t.diagnostic(err.message);
      assert.equal(err.code, 'CHIPMUNK_CAPABILITY_MISSING', err.message);
      assert.match(err.message, /CAP_SYS_RESOURCE/);
      assert.match(err.message, /Can't get rlimit \d+: Operation not permitted/, "CRIU's own words");
      assert.equal((await pair.source.get(c.name)).status, 'running', 'it runs on at the source');
      await assertAllThere(program, src, 50, 'on the source after the refused move');
      await writeKeys(program, src, 51, 100);
      await assertAllThere(program, src, 100, 'on the source, inserting on after the refused move');
    } finally {
      await pair.cleanup();
    }
  });
});

describe('Python http.server: a key-value service in memory, and the SQLite writer (WAL mode; curl reads back, SQLite\'s SELECT for the rows)', () => {
  for (const program of [COMPAT_PROGRAMS.python, COMPAT_PROGRAMS.sqlite]) {
    for (const mode of ['copy', 'lazy'] as const) {
      it(`${program.name}: a ${mode} move keeps every key and it takes writes on the target`, { timeout }, async (t) => {
        await writeMoveCheck(t, program, mode);
      });
    }
  }
});

/**
 * Whether the cgroup of PID is frozen, as runc reads it for `paused`: the v1 freezer's state, or
 * the v2 group's `cgroup.freeze`.
 */
async function frozen(pid: number): Promise<boolean> {
  const groups = await readFile(`/proc/${pid}/cgroup`, 'utf8');
  const v1 = /^\d+:freezer:(.*)$/m.exec(groups)?.[1];
  if (v1 !== undefined) return (await readFile(`/sys/fs/cgroup/freezer${v1}/freezer.state`, 'utf8')).trim() !== 'THAWED';
  const v2 = /^0::(.*)$/m.exec(groups)![1]!;
  return (await readFile(`/sys/fs/cgroup${v2}/cgroup.freeze`, 'utf8')).trim() === '1';
}

describe('a checkpoint that leaves it running (what protection takes every few seconds)', () => {
  // PostgreSQL's 6 processes stay frozen for most of a checkpoint. Read as `stopped` then, a
  // protected PostgreSQL or nginx had its moves refused ("it is stopped") while it served.
  it('PostgreSQL: while the checkpoint freezes it, its status reads running', { timeout }, async (t) => {
    const program = COMPAT_PROGRAMS.postgres;
    // Its files copied wholly inside the freeze: a freeze long enough for several status reads.
    const pair = await makeRuncPair({ checkpointFreeze: 'copy-in-freeze' });
    try {
      const src = endpoint(RUNC_PAIR_NODES[0]);
      const c = await pair.source.run(specFor(program, 'postgres-frozen', []));
      assert.ok(c.pid, 'a running container has its init PID');
      await waitUntilServing(program, src, 60_000);
      await writeKeys(program, src, 1, 50);
      let done = false;
      const checkpoint = pair.source.checkpoint(c.name, 'ckpt-frozen').finally(() => (done = true));
      const whileFrozen: string[] = [];
      while (!done) {
        const before = await frozen(c.pid);
        const { status } = await pair.source.get(c.name);
        // Frozen at both ends: the read fell inside the freeze (there is one).
        if (before && (await frozen(c.pid))) whileFrozen.push(status);
        await sleep(5);
      }
      const ckpt = await checkpoint;
      t.diagnostic(`frozen ${ckpt.frozenMs} ms; ${whileFrozen.length} status reads inside the freeze: ${[...new Set(whileFrozen)].join(', ')}`);
      assert.ok(whileFrozen.length >= 3, `only ${whileFrozen.length} status reads fell inside the freeze (${ckpt.frozenMs} ms): the test saw no freeze`);
      assert.deepEqual([...new Set(whileFrozen)], ['running'], 'a container frozen by a checkpoint that leaves it running reads as running');
      assert.equal((await pair.source.get(c.name)).status, 'running', 'running after the checkpoint');
      await assertAllThere(program, src, 50, 'after the checkpoint');
      await pair.source.discardCheckpoint('ckpt-frozen');
    } finally {
      await pair.cleanup();
    }
  });
});

/**
 * The failover path at the runtime: a checkpoint of PROGRAM (left running) after keys 1..n, the
 * source then lost, the checkpoint restored on the target: keys 1..n are there and it takes
 * writes. (Keys written after the checkpoint are not: behind the gateway an HTTP route's request
 * log replays them, a TCP route has none; bench/compat measures that.)
 */
async function checkpointRestoreCheck(program: CompatProgram): Promise<void> {
  const pair = await makeRuncPair();
  try {
    const [src, dst] = RUNC_PAIR_NODES;
    const c = await pair.source.run(specFor(program, `${program.name}-ckpt`, []));
    await waitUntilServing(program, endpoint(src), 60_000);
    const n = KEYS[program.name];
    await writeKeys(program, endpoint(src), 1, n);
    const checkpointId = `ckpt-${program.name}`;
    const ckpt = await pair.source.checkpoint(c.name, checkpointId);
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
    it(`${program.name}: every key written before the checkpoint is there, and it takes writes`, { timeout }, async () => {
      await checkpointRestoreCheck(program);
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
