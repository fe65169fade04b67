// Live migration end to end: the real `chipmunk` CLI against a real 3-node local cluster
// (runc + CRIU in test hosts on this machine), with the statefulapp image. Needs root and
// scripts/setup.sh. Traffic goes to the local cluster's 198.18.0.x addresses only.
//
// Order matters: the describes run top to bottom on one cluster, and the last one kills agents
// (fault injection: the target agent dies before restoring). Nothing may run after it; a new
// test that needs all nodes goes above it.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';

import {
  agentContainers,
  answers,
  armFault,
  cli,
  cliFails,
  cliOk,
  controllerContainers,
  http,
  migrationLeftovers,
  ps,
  runcList,
  runningCopies,
  useLocalCluster,
  waitFor,
  type CliResult,
} from '../support/local-cluster.js';

const cluster = useLocalCluster({ nodes: 3 });

const MiB = 1024 * 1024;
const IMAGE = 'chipmunk/statefulapp';
const APP_PORT = 8080;
/** statefulapp's first line on stdout. */
const START_LINE = /statefulapp listening on 0\.0\.0\.0:8080 \(pid \d+, memory (\d+) MB\)/g;

interface MigrationJson {
  name: string;
  from: string;
  to: string;
  mode: 'lazy' | 'copy';
  downtimeMs: number;
  totalMs: number;
  bytesTransferred: number;
}

interface AppState {
  counter: number;
  lines: number;
  memoryOk: boolean;
  memoryMB: number;
}

/** Runs statefulapp on NODE with MEMORY_MB, publishing APP_PORT as HOSTPORT, and waits until it answers. */
async function runApp(name: string, node: string, memoryMB: number, hostPort?: number): Promise<void> {
  const ports = hostPort === undefined ? [] : ['-p', `${hostPort}:${APP_PORT}`];
  const view = await cliOk<{ name: string; node: string; status: string }>(['run', '--name', name, '--node', node, ...ports, '-e', `MEMORY_MB=${memoryMB}`, IMAGE]);
  assert.equal(view.node, node);
  assert.equal(view.status, 'running');
  if (hostPort !== undefined) await waitFor(() => answers(node, hostPort), 30_000, `${name} answering on ${node}:${hostPort}`);
}

async function increment(node: string, port: number, times: number): Promise<number> {
  let counter = 0;
  for (let i = 0; i < times; i++) counter = (await http<{ counter: number }>(node, port, '/increment', 'POST')).body.counter;
  return counter;
}

async function appState(node: string, port: number): Promise<AppState> {
  const root = await http<{ counter: number }>(node, port, '/');
  const file = await http<{ lines: number }>(node, port, '/file');
  // Hashes all of its memory: a second or so for 256 MB.
  const memory = await http<{ ok: boolean; memoryMB: number }>(node, port, '/verify-memory', 'GET', { timeoutMs: 30_000 });
  return { counter: root.body.counter, lines: file.body.lines, memoryOk: memory.body.ok, memoryMB: memory.body.memoryMB };
}

async function psEntry(name: string) {
  const entry = (await ps()).find((c) => c.name === name);
  assert.ok(entry, `${name} missing from chipmunk ps`);
  return entry;
}

/** Everything a successful move must show: summary, state on the target, nothing left on the source. */
async function assertMigrated(
  summary: MigrationJson,
  want: { name: string; from: string; to: string; mode: 'lazy' | 'copy'; port: number; state: AppState; minBytes: number },
): Promise<void> {
  const { name, from, to, mode, port } = want;
  assert.deepEqual(Object.keys(summary).sort(), ['bytesTransferred', 'downtimeMs', 'from', 'mode', 'name', 'to', 'totalMs']);
  assert.deepEqual({ name: summary.name, from: summary.from, to: summary.to, mode: summary.mode }, { name, from, to, mode });
  assert.ok(Number.isFinite(summary.totalMs) && summary.totalMs > 0 && summary.totalMs < 180_000, `totalMs ${summary.totalMs}`);
  assert.ok(Number.isFinite(summary.downtimeMs) && summary.downtimeMs > 0, `downtimeMs ${summary.downtimeMs}`);
  assert.ok(summary.downtimeMs <= summary.totalMs, `downtime ${summary.downtimeMs} ms exceeds the total ${summary.totalMs} ms`);
  assert.ok(Number.isInteger(summary.bytesTransferred), `bytesTransferred ${summary.bytesTransferred}`);
  assert.ok(summary.bytesTransferred >= want.minBytes, `bytesTransferred ${summary.bytesTransferred} < ${want.minBytes}`);
  // Memory plus images, file layer and logs: not several times the memory.
  assert.ok(summary.bytesTransferred < want.state.memoryMB * MiB * 2 + 100 * MiB, `bytesTransferred ${summary.bytesTransferred} is implausibly large`);

  assert.deepEqual(await appState(to, port), want.state, `state of ${name} on ${to}`);
  assert.equal(await answers(from, port), false, `something still answers on ${from}:${port} after ${name} moved to ${to}`);

  const entry = await psEntry(name);
  assert.equal(entry.node, to);
  assert.equal(entry.status, 'running');
  assert.deepEqual(entry.ports, [`${cluster().address(to)}:${port}->${APP_PORT}/tcp`]);
  const copies = await runningCopies(name);
  assert.deepEqual(copies.map((c) => c.node), [to], `running copies of ${name}: ${JSON.stringify(copies)}`);
  await assertNoLeftovers([from, to]);
}

/** No CRIU images or staged files left on NODES (the source's may take a moment after a lazy rollback). */
async function assertNoLeftovers(nodes: string[]): Promise<void> {
  let left: string[] = [];
  try {
    await waitFor(async () => {
      left = (await Promise.all(nodes.map(migrationLeftovers))).flat();
      return left.length === 0;
    }, 15_000, 'migration data to be removed');
  } catch {
    assert.deepEqual(left, [], 'migration data left behind');
  }
}

// ---------------------------------------------------------------- successful migrations

describe('migrating a container with 256 MB of memory, a published port and a file', () => {
  const name = 'web';
  const port = 8080;
  let state: AppState;

  it('runs on node1 and writes its file after start', async () => {
    await runApp(name, 'node1', 256, port);
    const counter = await increment('node1', port, 3);
    assert.equal(counter, 3);
    state = await appState('node1', port);
    assert.deepEqual(state, { counter: 3, lines: 3, memoryOk: true, memoryMB: 256 });
  });

  it('moves node1 -> node2 in lazy mode with counter, file and memory intact', async () => {
    const summary = await cliOk<MigrationJson>(['migrate', name, '--to', 'node2', '--mode', 'lazy'], { timeoutMs: 180_000 });
    // Lazily copied pages count: the memory crossed over after the restore.
    await assertMigrated(summary, { name, from: 'node1', to: 'node2', mode: 'lazy', port, state, minBytes: 200 * MiB });
  });

  it('keeps working on node2, then moves node2 -> node3 in copy mode', async () => {
    assert.equal(await increment('node2', port, 2), 5);
    state = { ...state, counter: 5, lines: 5 };
    const summary = await cliOk<MigrationJson>(['migrate', name, '--to', 'node3', '--mode', 'copy'], { timeoutMs: 180_000 });
    await assertMigrated(summary, { name, from: 'node2', to: 'node3', mode: 'copy', port, state, minBytes: 200 * MiB });
    assert.equal(await increment('node3', port, 1), 6);
  });

  after(async () => {
    await cli(['rm', name]);
  });
});

describe('logs', () => {
  const name = 'chatty';

  it('shows the start line, also after a migration (the log travels with the container)', async () => {
    await runApp(name, 'node1', 32);
    const before = await waitFor(
      async () => {
        const { logs } = await cliOk<{ name: string; logs: string }>(['logs', name]);
        return [...logs.matchAll(START_LINE)].length > 0 ? logs : undefined;
      },
      30_000,
      `the start line in chipmunk logs ${name}`,
    );
    assert.equal([...before.matchAll(START_LINE)][0]![1], '32');

    await cliOk(['migrate', name, '--to', 'node3', '--mode', 'lazy']);
    const { name: shown, logs } = await cliOk<{ name: string; logs: string }>(['logs', name]);
    assert.equal(shown, name);
    // Exactly one start line: the log came along, and the app was not started afresh.
    assert.equal([...logs.matchAll(START_LINE)].length, 1, `logs after the migration:\n${logs}`);
    assert.ok(logs.startsWith(before), 'the log after the migration does not begin with the log from before it');
    assert.equal((await psEntry(name)).node, 'node3');
  });

  after(async () => {
    await cli(['rm', name]);
  });
});

describe('a second migration while one runs', () => {
  const name = 'busy';
  const port = 8082;

  it('is refused with CHIPMUNK_MIGRATION_IN_PROGRESS and the first one completes', async () => {
    // 256 MB in copy mode takes seconds: time for a second CLI to start and ask.
    await runApp(name, 'node1', 256, port);
    assert.equal(await increment('node1', port, 1), 1);
    const first = cli<MigrationJson>(['migrate', name, '--to', 'node2', '--mode', 'copy'], { timeoutMs: 180_000 });
    await waitFor(
      async () => (await controllerContainers()).find((c) => c.name === name)?.status === 'migrating',
      30_000,
      `${name} to be migrating`,
    );
    const second = await cli(['migrate', name, '--to', 'node3', '--mode', 'copy']);
    const firstResult = await first;

    assert.equal(second.code, 1, `second migrate: ${second.stderr}`);
    assert.ok(second.error, `second migrate printed no JSON error: ${second.stdout}`);
    assert.equal(second.error.code, 'CHIPMUNK_MIGRATION_IN_PROGRESS');
    assert.match(second.error.message, /container busy is already being migrated/);
    assert.match(second.stderr, /CHIPMUNK_MIGRATION_IN_PROGRESS/);

    assert.equal(firstResult.code, 0, `first migrate: ${firstResult.stdout} ${firstResult.stderr}`);
    assert.equal(firstResult.json?.to, 'node2');
    assert.equal((await appState('node2', port)).counter, 1);
    assert.equal((await psEntry(name)).node, 'node2');
    assert.deepEqual((await runningCopies(name)).map((c) => c.node), ['node2']);
  });

  after(async () => {
    await cli(['rm', name]);
  });
});

// ---------------------------------------------------------------- bad input

describe('bad input changes nothing', () => {
  const name = 'steady';
  const port = 8091;
  let psBefore: Awaited<ReturnType<typeof ps>>;
  let runcBefore: string[];

  async function runcIds(): Promise<string[]> {
    const ids: string[] = [];
    for (const node of cluster().nodes) for (const c of await runcList(node)) ids.push(`${node}/${c.id}/${c.status}`);
    return ids.sort();
  }

  before(async () => {
    await runApp(name, 'node1', 32, port);
    psBefore = await ps();
    runcBefore = await runcIds();
  });

  const cases: Array<{ what: string; args: string[]; exit: number; code: string; message: RegExp }> = [
    {
      what: 'an unknown image',
      args: ['run', '--name', 'bad-image', '--node', 'node1', 'chipmunk/no-such-image'],
      exit: 1,
      code: 'CHIPMUNK_INVALID_INPUT',
      message: /unknown image 'chipmunk\/no-such-image'/,
    },
    {
      what: 'run on an unknown node',
      args: ['run', '--name', 'bad-node', '--node', 'node9', IMAGE],
      exit: 1,
      code: 'CHIPMUNK_INVALID_INPUT',
      message: /unknown node "node9"/,
    },
    {
      what: 'a node name that cannot be one',
      args: ['run', '--name', 'bad-node', '--node', 'nodeX', IMAGE],
      exit: 2,
      code: 'CHIPMUNK_INVALID_INPUT',
      message: /bad node name 'nodeX'/,
    },
    {
      what: 'migrate to an unknown node',
      args: ['migrate', name, '--to', 'node9'],
      exit: 1,
      code: 'CHIPMUNK_INVALID_INPUT',
      message: /unknown node "node9"/,
    },
    {
      what: 'a name already in use',
      args: ['run', '--name', name, '--node', 'node2', IMAGE],
      exit: 1,
      code: 'CHIPMUNK_CONFLICT',
      message: /container name "steady" is already in use/,
    },
    {
      what: 'migrate to the node it is on',
      args: ['migrate', name, '--to', 'node1'],
      exit: 1,
      code: 'CHIPMUNK_INVALID_INPUT',
      message: /container steady is already on node node1/,
    },
    {
      what: 'migrate an unknown container',
      args: ['migrate', 'no-such-container', '--to', 'node2'],
      exit: 1,
      code: 'CHIPMUNK_NOT_FOUND',
      message: /unknown container "no-such-container"/,
    },
    {
      what: 'a bad memory size',
      args: ['run', '--name', 'bad-memory', '--memory', '12q', IMAGE],
      exit: 2,
      code: 'CHIPMUNK_INVALID_INPUT',
      message: /bad memory size '12q'/,
    },
    {
      what: 'a bad port spec',
      args: ['run', '--name', 'bad-port', '-p', '80', IMAGE],
      exit: 2,
      code: 'CHIPMUNK_INVALID_INPUT',
      message: /bad port spec '80'/,
    },
    {
      what: 'a port already taken on that node',
      args: ['run', '--name', 'bad-port', '--node', 'node1', '-p', `${port}:${APP_PORT}`, IMAGE],
      exit: 1,
      code: 'CHIPMUNK_CONFLICT',
      message: new RegExp(`host port ${port}/tcp is already published by container 'steady' on node node1`),
    },
  ];

  for (const c of cases) {
    it(`refuses ${c.what} with a clear error`, async () => {
      const res = await cliFails(c.args);
      assert.equal(res.code, c.exit, `exit code: ${res.stderr}`);
      assert.equal(res.error.code, c.code);
      assert.match(res.error.message, c.message);
      // The same message for people, on stderr.
      assert.match(res.stderr, new RegExp(`^error: .*\\(${c.code}\\)`, 'm'));
    });
  }

  it('left containers and nodes as they were', async () => {
    assert.deepEqual(await ps(), psBefore);
    assert.deepEqual(await runcIds(), runcBefore);
    assert.deepEqual((await appState('node1', port)).counter, 0);
  });

  after(async () => {
    await cli(['rm', name]);
  });
});

// ---------------------------------------------------------------- failures

describe('a failed migration leaves the container running on its source (last: kills agents)', () => {
  const name = 'fragile';
  const port = 8090;
  const source = 'node1';
  let counter = 0;

  before(async () => {
    await runApp(name, source, 32, port);
  });

  /**
   * Arms the fault, migrates, and checks the failure and that nothing changed: the container
   * runs once, on the source, with its state, and answers there.
   */
  async function failingMigration(opts: {
    to: string;
    mode: 'lazy' | 'copy';
    arm: () => Promise<void>;
    phases: string[];
    targetAlive: boolean;
  }): Promise<CliResult> {
    counter = await increment(source, port, 2);
    await opts.arm();
    const res = await cliFails(['migrate', name, '--to', opts.to, '--mode', opts.mode]);
    assert.equal(res.code, 1, res.stderr);
    assert.equal(res.error.code, 'CHIPMUNK_MIGRATION_FAILED', res.stdout);
    const details = res.error.details ?? {};
    assert.ok(opts.phases.includes(details.phase as string), `phase ${String(details.phase)} not in ${opts.phases.join(', ')}`);
    assert.equal(details.node, opts.to);
    assert.equal(details.rolledBack, true, res.stdout);
    assert.match(res.error.message, new RegExp(`failed in phase ${String(details.phase)}`));
    assert.match(res.error.message, /fragile runs on node1 again/);
    assert.match(res.stderr, /\(CHIPMUNK_MIGRATION_FAILED\)/);
    // A log the error points at must be there to read.
    if (typeof details.logPath === 'string') {
      assert.ok(existsSync(details.logPath), `the error names ${details.logPath}, which does not exist`);
      assert.match(res.stderr, new RegExp(`log: ${details.logPath}`));
    }

    const state = await appState(source, port);
    assert.deepEqual(state, { counter, lines: counter, memoryOk: true, memoryMB: 32 });
    if (opts.targetAlive || !(await answers(opts.to, port))) {
      assert.equal(await answers(opts.to, port), false, `something answers on ${opts.to}:${port}`);
    } else {
      // The dead target's agent could not take back its published port: the rule, left until the
      // agent returns, leads to the container's cluster address, that is to the one live copy.
      assert.deepEqual(await appState(opts.to, port), state, `what answers on ${opts.to}:${port} is the copy on ${source}`);
    }
    const entry = await psEntry(name);
    assert.equal(entry.node, source);
    assert.equal(entry.status, 'running');
    assert.deepEqual((await runningCopies(name)).map((c) => c.node), [source]);
    if (opts.targetAlive) assert.deepEqual((await agentContainers(opts.to)).map((c) => c.name), []);
    const onSource = (await agentContainers(source)).find((c) => c.name === name);
    assert.equal(onSource?.status, 'running');
    await assertNoLeftovers(opts.targetAlive ? [source, opts.to] : [source]);
    return res;
  }

  it('(b) transfer cut midway, copy mode', async () => {
    await failingMigration({
      to: 'node2',
      mode: 'copy',
      arm: () => armFault(source, { cutTransferAfterBytes: 100_000 }),
      phases: ['transfer'],
      targetAlive: true,
    });
  });

  it('(b) transfer cut midway, lazy mode', async () => {
    await failingMigration({
      to: 'node2',
      mode: 'lazy',
      arm: () => armFault(source, { cutTransferAfterBytes: 100_000 }),
      phases: ['transfer'],
      targetAlive: true,
    });
  });

  it('(c) restore fails on the target, lazy mode', async () => {
    await failingMigration({
      to: 'node2',
      mode: 'lazy',
      arm: () => armFault('node2', { corruptImagesBeforeRestore: true }),
      phases: ['restore'],
      targetAlive: true,
    });
  });

  it('(c) restore fails on the target, copy mode', async () => {
    await failingMigration({
      to: 'node3',
      mode: 'copy',
      arm: () => armFault('node3', { corruptImagesBeforeRestore: true }),
      phases: ['restore'],
      targetAlive: true,
    });
  });

  it('still migrates there and back once the faults are gone', async () => {
    // Faults fire once; a clean round trip proves nothing was left armed or behind, on the
    // source in particular (its port must serve the container again when it comes back).
    const state: AppState = { counter, lines: counter, memoryOk: true, memoryMB: 32 };
    const there = await cliOk<MigrationJson>(['migrate', name, '--to', 'node2', '--mode', 'copy']);
    await assertMigrated(there, { name, from: source, to: 'node2', mode: 'copy', port, state, minBytes: 24 * MiB });
    const back = await cliOk<MigrationJson>(['migrate', name, '--to', source, '--mode', 'lazy']);
    await assertMigrated(back, { name, from: 'node2', to: source, mode: 'lazy', port, state, minBytes: 24 * MiB });
  });

  // Destructive: each kills its target's agent for good, so each takes a node of its own and
  // they come last. The cluster is taken down after them.
  it('(a) the target agent dies before restoring, lazy mode (node2 stays down)', async () => {
    await failingMigration({
      to: 'node2',
      mode: 'lazy',
      arm: () => armFault('node2', { dieBeforeRestore: true }),
      phases: ['transfer', 'restore'],
      targetAlive: false,
    });
    assert.equal(await answers('node2', 7401, '/healthz'), false, 'the agent of node2 should be dead');
  });

  it('(a) the target agent dies before restoring, copy mode (node3 stays down)', async () => {
    await failingMigration({
      to: 'node3',
      mode: 'copy',
      arm: () => armFault('node3', { dieBeforeRestore: true }),
      phases: ['transfer', 'restore'],
      targetAlive: false,
    });
    assert.equal(await answers('node3', 7401, '/healthz'), false, 'the agent of node3 should be dead');
  });
});
