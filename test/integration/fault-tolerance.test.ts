/**
 * Fault tolerance on a real local cluster: protected containers are checkpointed (memory and
 * files, cut at a position of the gateway's request log) into the controller's checkpoint store;
 * when their test host dies (`chipmunk cluster kill`: every process of it at once) they come back
 * on another host from the newest good checkpoint, with the logged requests replayed, and no
 * client request fails. Also: a host dying mid-checkpoint, a corrupted chunk, the dead host's
 * return (fencing), and file versions.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { request } from 'undici';
import { steadyIncrements } from '../support/clients.js';
import { agentContainers, armControllerFault, armFault, cli, cliFails, cliOk, ps, runningCopies, startLocalCluster, stopLocalCluster, waitFor } from '../support/local-cluster.js';

const GATEWAY = '127.0.0.1';
/** 1 s leases: a killed host is declared dead about a second later. */
const NODE_LEASE_MS = 1_000;

interface Checkpoint {
  id: string;
  time: number;
  logicalBytes: number;
  newBytes: number;
  logPosition: { logId: string | null; seq: number } | null;
  corrupt?: boolean;
}

interface Failover {
  id: string;
  name: string;
  from: string;
  to?: string;
  checkpoint?: string;
  skipped: Array<{ checkpoint: string; reason: string }>;
  outcome: string;
  replayed?: number;
  detectedAt: number;
  finishedAt?: number;
}

before(async () => {
  await startLocalCluster(3, { nodeLeaseMs: NODE_LEASE_MS });
}, { timeout: 300_000 });

after(async () => {
  await stopLocalCluster();
}, { timeout: 120_000 });

async function get<T>(port: number, path: string): Promise<T> {
  const res = await request(`http://${GATEWAY}:${port}${path}`, { headersTimeout: 30_000 });
  assert.equal(res.statusCode, 200, `GET ${path} through the gateway`);
  return (await res.body.json()) as T;
}

async function post(port: number, path: string, method: 'POST' | 'DELETE' = 'POST'): Promise<void> {
  const res = await request(`http://${GATEWAY}:${port}${path}`, { method, headersTimeout: 30_000 });
  assert.equal(res.statusCode, 200, `${method} ${path} through the gateway: ${await res.body.text()}`);
  await res.body.dump().catch(() => undefined);
}

/** Runs a protected statefulapp on `node`, exposed on gateway port `listen`, and waits for it to answer there. */
async function protectedApp(name: string, node: string, listen: number, every: string, extra: string[] = []): Promise<void> {
  await cliOk(['run', '--name', name, '--node', node, '-p', `${listen}:8080`, '-e', 'MEMORY_MB=32', '--checkpoint-every', every, ...extra, 'chipmunk/statefulapp']);
  await cliOk(['expose', name, '--port', '8080', '--listen', String(listen)]);
  await waitFor(async () => {
    const res = await request(`http://${GATEWAY}:${listen}/health`).catch(() => undefined);
    await res?.body.dump();
    return res?.statusCode === 200;
  }, 30_000, `${name} answers through the gateway`);
  // Exposing a protected container checkpoints it at once, at a position of the new request log.
  await waitFor(async () => (await checkpoints(name)).some((c) => c.logPosition !== null), 30_000, `a checkpoint of ${name} cut at a log position`);
}

const checkpoints = (name: string) => cliOk<Checkpoint[]>(['checkpoints', name]);
const failoversOf = async (name: string) => (await cliOk<Failover[]>(['failovers'])).filter((f) => f.name === name);

async function waitForFailover(name: string, timeoutMs = 90_000): Promise<Failover> {
  return waitFor(async () => (await failoversOf(name)).find((f) => f.outcome !== 'running'), timeoutMs, `failover of ${name}`);
}

describe('fault tolerance', { timeout: 900_000 }, () => {
  it('a protected container survives its host dying: no client request fails, every acknowledged increment is there', async () => {
    const port = 28180;
    await protectedApp('ft-counter', 'node1', port, '2s');

    const client = steadyIncrements(`http://${GATEWAY}:${port}`, 2, 180_000);
    await sleep(3_500);
    const killedAt = Date.now();
    await cliOk(['cluster', 'kill', 'node1']);
    const failover = await waitForFailover('ft-counter');
    assert.equal(failover.outcome, 'done', `failover: ${JSON.stringify(failover)}`);
    await sleep(1_500);
    const stats = await client.stop();

    assert.deepEqual(stats.errors, [], 'no client request failed');
    assert.ok(stats.ok > 50, `the clients kept going (${stats.ok} acknowledged)`);
    const { counter } = await get<{ counter: number }>(port, '/');
    assert.equal(counter, stats.ok, 'the counter holds every acknowledged increment, once');
    const { lines } = await get<{ lines: number }>(port, '/file');
    assert.equal(lines, counter, 'the file appended to per request matches the counter');
    assert.ok((failover.replayed ?? 0) > 0, `requests after the checkpoint were replayed (${failover.replayed})`);
    assert.notEqual(failover.to, 'node1');
    const row = (await ps()).find((c) => c.name === 'ft-counter');
    assert.equal(row?.node, failover.to);
    assert.equal(row?.status, 'running');
    process.stderr.write(`failover of ft-counter: ${failover.finishedAt! - killedAt} ms from kill to done, ${failover.replayed} replayed\n`);
  });

  it('the dead host returns: the moved container does not run there and nothing routes to it', async () => {
    const before = (await ps()).find((c) => c.name === 'ft-counter');
    await cliOk(['cluster', 'revive', 'node1']);
    await waitFor(async () => !(await agentContainers('node1')).some((c) => c.name === 'ft-counter'), 30_000, 'node1 forgets its stale ft-counter (fencing)');
    assert.deepEqual((await runningCopies('ft-counter')).map((c) => c.node), [before!.node], 'exactly one copy runs, on the new node');
    // Traffic still reaches the new copy: the count goes on from where it was.
    const { counter } = await get<{ counter: number }>(28180, '/');
    await post(28180, '/increment');
    assert.equal((await get<{ counter: number }>(28180, '/')).counter, counter + 1);
    assert.equal((await ps()).find((c) => c.name === 'ft-counter')?.node, before!.node);
  });

  it('the host dies in the middle of a checkpoint: the previous checkpoint is used', async () => {
    const port = 28181;
    await protectedApp('ft-midway', 'node2', port, '1h');
    for (let i = 0; i < 5; i++) await post(port, '/increment');
    const second = await cliOk<Checkpoint>(['checkpoint', 'ft-midway']);
    for (let i = 0; i < 3; i++) await post(port, '/increment');

    await armFault('node2', { dieBeforeCheckpointCommit: true });
    const interrupted = await cli(['checkpoint', 'ft-midway'], { timeoutMs: 60_000 });
    assert.notEqual(interrupted.code, 0, 'the checkpoint whose host died did not succeed');
    await cliOk(['cluster', 'kill', 'node2']);
    const failover = await waitForFailover('ft-midway');
    assert.equal(failover.outcome, 'done', JSON.stringify(failover));
    assert.equal(failover.checkpoint, second.id, 'restored from the last checkpoint that was committed');
    assert.equal((await checkpoints('ft-midway'))[0]?.id !== undefined, true);
    assert.ok(!(await checkpoints('ft-midway')).some((c) => c.time > second.time && c.id !== second.id && c.logPosition?.seq === second.logPosition?.seq && c.logPosition?.logId === second.logPosition?.logId), 'the interrupted checkpoint never counted');
    assert.equal((await get<{ counter: number }>(port, '/')).counter, 8, 'its state: the checkpoint plus the replayed requests');
    assert.equal((await get<{ lines: number }>(port, '/file')).lines, 8);
    await cliOk(['cluster', 'revive', 'node2']);
  });

  it('a corrupted chunk is detected and reported, and the previous checkpoint is used', async () => {
    const port = 28182;
    await protectedApp('ft-corrupt', 'node3', port, '1h');
    for (let i = 0; i < 4; i++) await post(port, '/increment');
    await post(port, '/touch?percent=10');
    const newest = await cliOk<Checkpoint>(['checkpoint', 'ft-corrupt']);
    const previous = (await checkpoints('ft-corrupt')).find((c) => c.id !== newest.id && c.logPosition !== null)!;
    for (let i = 0; i < 2; i++) await post(port, '/increment');

    await armControllerFault({ corruptChunkOf: { container: 'ft-corrupt', checkpoint: newest.id } });
    await cliOk(['cluster', 'kill', 'node3']);
    const failover = await waitForFailover('ft-corrupt');
    assert.equal(failover.outcome, 'done', JSON.stringify(failover));
    // Also listed as skipped: a checkpoint cut before the route logged (not in its request log).
    const corrupt = failover.skipped.find((s) => s.checkpoint === newest.id);
    assert.ok(corrupt, JSON.stringify(failover));
    assert.match(corrupt.reason, /corrupt/i, 'the failover reports the corruption');
    assert.equal(failover.checkpoint, previous.id, `the checkpoint before was used: ${JSON.stringify({ failover, checkpoints: await checkpoints('ft-corrupt') })}`);
    assert.equal((await checkpoints('ft-corrupt')).find((c) => c.id === newest.id)?.corrupt, true, '`checkpoints` shows it corrupt');
    assert.equal((await get<{ counter: number }>(port, '/')).counter, 6, 'nothing acknowledged was lost: the log reaches back to the older checkpoint');
    assert.equal((await get<{ ok: boolean }>(port, '/verify-memory')).ok, true);
    await cliOk(['cluster', 'revive', 'node3']);
  });

  it('file versions (its data in a named volume): files, diff and restore --from; paths cannot escape the container', async () => {
    const port = 28183;
    await protectedApp('ft-files', 'node1', port, '1h', ['-v', 'appdata:/data']);
    await post(port, '/files?name=kept.txt&content=one');
    await post(port, '/files?name=gone.txt&content=bye');
    for (let i = 0; i < 2; i++) await post(port, '/increment');
    const a = await cliOk<Checkpoint>(['checkpoint', 'ft-files']);

    await post(port, '/files?name=kept.txt&content=two');
    await post(port, '/files?name=gone.txt', 'DELETE');
    await post(port, '/files?name=new.txt&content=hello');
    for (let i = 0; i < 3; i++) await post(port, '/increment');
    const b = await cliOk<Checkpoint>(['checkpoint', 'ft-files']);

    const listing = await cliOk<{ entries: Array<{ name: string }> }>(['files', 'ft-files', '/data', '--at', a.id]);
    assert.deepEqual(listing.entries.map((e) => e.name).sort(), ['gone.txt', 'kept.txt', 'log.txt']);
    const kept = await cli(['files', 'ft-files', '/data/kept.txt', '--at', a.id]);
    assert.equal(kept.stdout, 'one\n', 'a file prints as it was at the checkpoint');
    assert.equal((await cli(['files', 'ft-files', '/data/kept.txt', '--at', b.id])).stdout, 'two\n');

    const diff = await cliOk<{ added: string[]; changed: string[]; removed: string[] }>(['diff', 'ft-files', a.id, b.id]);
    assert.ok(diff.added.includes('/data/new.txt'), JSON.stringify(diff));
    assert.ok(diff.changed.includes('/data/kept.txt') && diff.changed.includes('/data/log.txt'), JSON.stringify(diff));
    assert.ok(diff.removed.includes('/data/gone.txt'), JSON.stringify(diff));

    for (const escape of ['../../etc/passwd', '/data/../../../etc/shadow']) {
      const refused = await cliFails(['files', 'ft-files', escape, '--at', a.id]);
      assert.match(refused.error.code, /PATH_ESCAPES|INVALID_INPUT/, `${escape}: ${JSON.stringify(refused.error)}`);
    }

    const restored = await cliOk<{ restoredFrom: string }>(['restore', 'ft-files', '--from', a.id], { timeoutMs: 120_000 });
    assert.equal(restored.restoredFrom, a.id);
    assert.equal((await get<{ counter: number }>(port, '/')).counter, 2, 'memory is back to checkpoint A');
    assert.equal((await get<{ lines: number }>(port, '/file')).lines, 2, 'and so are the files');
    await post(port, '/increment');
    assert.equal((await get<{ counter: number }>(port, '/')).counter, 3, 'and it keeps working');
    // The volume travels with a migration too.
    await cliOk(['migrate', 'ft-files', '--to', 'node3', '--mode', 'copy'], { timeoutMs: 120_000 });
    assert.equal((await get<{ lines: number }>(port, '/file')).lines, 3, 'the volume moved with the container');
    const newest = (await checkpoints('ft-files'))[0]!;
    const afterRestore = await cliOk<{ entries: Array<{ name: string }> }>(['files', 'ft-files', '/data', '--at', newest.id]);
    assert.deepEqual(afterRestore.entries.map((e) => e.name).sort(), ['gone.txt', 'kept.txt', 'log.txt'], 'the newest checkpoint is the restored state');

    const unknown = await cliFails(['restore', 'ft-files', '--from', '0123456789abcdef']);
    assert.equal(unknown.error.code, 'CHIPMUNK_NOT_FOUND');
  });

  it('bad input: unknown container, bad interval, a volume given twice, unprotect of an unprotected container', async () => {
    assert.equal((await cliFails(['checkpoint', 'no-such'])).error.code, 'CHIPMUNK_NOT_FOUND');
    assert.equal((await cliFails(['checkpoints', 'no-such'])).error.code, 'CHIPMUNK_NOT_FOUND');
    const twice = await cliFails(['run', '--name', 'ft-dup', '-v', 'data:/a', '-v', 'data:/b', 'chipmunk/statefulapp']);
    assert.equal(twice.error.code, 'CHIPMUNK_INVALID_INPUT');
    assert.match(twice.error.message, /volume 'data' is given twice/);
    assert.ok(!(await ps()).some((c) => c.name === 'ft-dup'), 'nothing was created');
    assert.equal((await cliFails(['protect', 'ft-files', '--every', '10ms'])).code, 2, 'an interval under 1s is a usage error');
    await cliOk(['unprotect', 'ft-files']);
    assert.equal((await cliFails(['unprotect', 'ft-files'])).error.code, 'CHIPMUNK_INVALID_INPUT');
    const policy = await cliOk<{ protection: { everyMs: number } }>(['protect', 'ft-files', '--every', '30s']);
    assert.equal(policy.protection.everyMs, 30_000);
  });

  it('rm takes the route and the checkpoints with it: a new container of that name starts clean', async () => {
    await cliOk(['rm', 'ft-files']);
    await cliOk(['run', '--name', 'ft-files', '--node', 'node2', '-p', '28183:8080', '-e', 'MEMORY_MB=16', 'chipmunk/statefulapp']);
    await cliOk(['expose', 'ft-files', '--port', '8080', '--listen', '28183']);
    assert.deepEqual(await checkpoints('ft-files'), [], 'no checkpoint of the old ft-files');
    await waitFor(async () => {
      const res = await request(`http://${GATEWAY}:28183/`).catch(() => undefined);
      return res?.statusCode === 200 && ((await res.body.json()) as { counter: number }).counter === 0;
    }, 30_000, 'the new ft-files answers through the gateway, from zero');
  });
});
