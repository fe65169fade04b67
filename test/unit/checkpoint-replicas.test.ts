/**
 * Checkpoints on several hosts: real checkpoint stores (temp dirs, real HTTP on loopback) as
 * replicas, the agent's upload to all of them, the controller's catalog over them (commit
 * records in a memory state store), reads that fall through a damaged replica, a replica dead
 * at upload time, and re-replication after a replica is gone.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, open, readFile, readdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import Fastify, { type FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { fetchTreeFromAny } from '../../src/agent/transfer.js';
import { CheckpointStore, CheckpointStoreClient, checkpointPartUrl, checkpointStoreRoutes, uploadCheckpoint } from '../../src/checkpoint-store/index.js';
import { ReplicatedCatalog } from '../../src/controller/checkpoint-replicas.js';
import { checkpointReplicaCount, startController } from '../../src/controller/index.js';
import { MemoryStore } from '../../src/controller/store/memory.js';
import { ChipmunkError, InvalidInputError, UnavailableError } from '../../src/shared/errors.js';
import { installApiConventions } from '../../src/shared/http.js';
import { removeTree } from '../../src/shared/remove-tree.js';

const TOKEN = 'checkpoint-replicas-test-token';
const MEMORY_BYTES = 2 * 1024 * 1024;
const PAGE = 4096;

/** A checkpoint store served as a controller serves it (token, /healthz, the store's routes). */
class Replica {
  store!: CheckpointStore;
  app!: FastifyInstance;
  url = '';

  constructor(readonly root: string) {}

  async start(): Promise<this> {
    this.store = await CheckpointStore.open({ root: this.root });
    this.app = Fastify();
    installApiConventions(this.app, TOKEN);
    this.app.get('/healthz', async () => ({ ok: true }));
    await this.app.register(checkpointStoreRoutes(this.store));
    // The same port again after a restart: replicas are known by URL.
    const port = this.url ? Number(new URL(this.url).port) : 0;
    this.url = (await this.app.listen({ host: '127.0.0.1', port })).replace(/\/$/, '');
    return this;
  }

  /** Its host dies: connections cut, nothing answers any more. */
  async kill(): Promise<void> {
    this.app.server.closeAllConnections();
    await this.app.close();
    await this.store.close();
  }

  client(): CheckpointStoreClient {
    return new CheckpointStoreClient({ baseUrl: this.url, token: TOKEN });
  }
}

/** The log lines of a pino logger, parsed. */
function capturedLogger() {
  const lines: { level: number; msg: string }[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(line));
      done();
    },
  });
  return { log: pino({ level: 'info' }, sink), lines };
}

async function makeDirs(root: string): Promise<{ criu: string; files: string }> {
  const criu = join(root, 'criu');
  const files = join(root, 'files');
  await mkdir(criu, { recursive: true });
  await mkdir(join(files, 'upper/etc'), { recursive: true });
  await writeFile(join(criu, 'pages-1.img'), randomBytes(MEMORY_BYTES));
  await writeFile(join(criu, 'core-1.img'), randomBytes(700));
  await writeFile(join(files, 'upper/etc/app.conf'), 'listen 8080\n');
  return { criu, files };
}

/** A few pages of the memory image change, as between two checkpoints of a running program. */
async function changePages(criu: string): Promise<void> {
  const file = await open(join(criu, 'pages-1.img'), 'r+');
  for (const page of [3, 100, 300]) await file.write(randomBytes(PAGE), 0, PAGE, page * PAGE);
  await file.close();
}

describe('checkpoints on several store replicas', () => {
  let work: string;
  let a: Replica;
  let b: Replica;
  let c: Replica;
  let dirs: { criu: string; files: string };
  const state = new MemoryStore();
  const captured = capturedLogger();
  let replicaUrls: string[];
  let catalog: ReplicatedCatalog;

  /** What CheckpointService does with an agent: targets from the catalog, the agent's upload, the commit record. */
  async function checkpoint(container: string) {
    const [storeUrl, ...rest] = await catalog.uploadTargets();
    const info = await uploadCheckpoint({
      storeUrl: storeUrl!,
      replicaUrls: rest,
      token: TOKEN,
      container,
      parts: [
        { name: 'criu', dir: dirs.criu },
        { name: 'files', dir: dirs.files },
      ],
      metadata: {},
    });
    await catalog.committed(info, [storeUrl!, ...rest]);
    return info;
  }

  async function restoreFrom(container: string, id: string, dest: string) {
    const stores = await catalog.readFrom(container, id);
    const skipped: string[] = [];
    const got = await fetchTreeFromAny(
      stores.map((store) => checkpointPartUrl(store, container, id, 'criu')),
      { token: TOKEN, dest },
      (url) => skipped.push(url),
    );
    return { ...got, skipped };
  }

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'chipmunk-replicas-'));
    a = await new Replica(join(work, 'a')).start();
    b = await new Replica(join(work, 'b')).start();
    c = await new Replica(join(work, 'c')).start();
    dirs = await makeDirs(join(work, 'app'));
    // Replicas a and b at first; c is known from the re-replication test on.
    replicaUrls = [a.url, b.url];
    catalog = new ReplicatedCatalog({ state, replicaUrls: () => replicaUrls, replicas: 2, token: TOKEN, log: captured.log, replicaTimeoutMs: 1_000 });
  });

  after(async () => {
    for (const replica of [a, b, c]) await replica?.kill().catch(() => undefined);
    await removeTree(work);
  });

  it('commits a checkpoint on both replicas under one id, each deduplicating on its own, and lists where it is', async () => {
    const first = await checkpoint('app');
    assert.deepEqual(first.replicas.map((r) => r.url), [a.url, b.url]);
    assert.ok(first.sentBytes >= 2 * MEMORY_BYTES, `both replicas got the whole image (${first.sentBytes} bytes sent)`);
    await changePages(dirs.criu);
    const second = await checkpoint('app');
    // Each replica already had all but the 3 changed pages.
    assert.ok(second.sentBytes <= 2 * 4 * PAGE, `only the changed pages went to each replica (${second.sentBytes} bytes sent)`);
    for (const replica of [a, b]) assert.deepEqual((await replica.client().list('app')).map((x) => x.id), [second.id, first.id]);

    const listed = await catalog.list('app');
    assert.deepEqual(
      listed.map((x) => [x.id, x.corrupt ?? false, x.replicas]),
      [second.id, first.id].map((id) => [id, false, [{ url: a.url, state: 'intact' }, { url: b.url, state: 'intact' }]]),
    );
  });

  it('reads a checkpoint with a damaged chunk on one replica from the other, lists that replica as corrupt, then repairs it', async () => {
    const [newest, older] = await catalog.list('app');
    // Bit rot in a chunk both checkpoints share (memory page 0 never changed) on a's disk.
    const page0 = (await readFile(join(dirs.criu, 'pages-1.img'))).subarray(0, PAGE);
    let flipped = 0;
    for (const name of await readdir(join(a.root, 'packs'))) {
      const path = join(a.root, 'packs', name);
      const at = (await readFile(path)).indexOf(page0);
      if (at < 0) continue;
      const pack = await open(path, 'r+');
      await pack.write(Buffer.from([page0[10]! ^ 0xff]), 0, 1, at + 10);
      await pack.close();
      flipped++;
    }
    assert.equal(flipped, 1, 'a stores the shared page once');
    const dest = join(work, 'restored-1');
    // The agent is handed a first, as before the damage was known: the read falls through to b.
    const got = await fetchTreeFromAny(
      [a.url, b.url].map((store) => checkpointPartUrl(store, 'app', newest!.id, 'criu')),
      { token: TOKEN, dest },
    );
    assert.equal(got.url, checkpointPartUrl(b.url, 'app', newest!.id, 'criu'));
    assert.ok((await readFile(join(dest, 'pages-1.img'))).equals(await readFile(join(dirs.criu, 'pages-1.img'))), 'restored memory image is the checkpointed one');

    const listed = (await catalog.list('app')).find((x) => x.id === newest!.id)!;
    assert.equal(listed.corrupt, undefined, 'still counts: one replica holds it intact');
    assert.deepEqual(listed.replicas, [
      { url: a.url, state: 'corrupt' },
      { url: b.url, state: 'intact' },
    ]);
    assert.deepEqual(await catalog.readFrom('app', newest!.id), [b.url], 'later restores read the intact replica only');

    // The next pass replaces a's damaged copy with b's: a asks for the damaged chunk again (the
    // older checkpoint still uses it, so only a's memory of the damage makes it ask).
    await catalog.replicate();
    assert.deepEqual((await catalog.list('app')).find((x) => x.id === newest!.id)!.replicas, [
      { url: a.url, state: 'intact' },
      { url: b.url, state: 'intact' },
    ]);
    const healed = join(work, 'restored-healed');
    await fetchTreeFromAny([checkpointPartUrl(a.url, 'app', newest!.id, 'criu')], { token: TOKEN, dest: healed });
    assert.ok((await readFile(join(healed, 'pages-1.img'))).equals(await readFile(join(dirs.criu, 'pages-1.img'))), "a's repaired copy reads whole");
    // The older checkpoint shared the damaged chunk: the good copy serves it too.
    await fetchTreeFromAny([checkpointPartUrl(a.url, 'app', older!.id, 'criu')], { token: TOKEN, dest: join(work, 'restored-older') });
  });

  it('does not count a checkpoint a replica could not commit, and the previous one stays valid', async () => {
    const before = await catalog.list('app');
    await changePages(dirs.criu);
    // b dies after every chunk reached both replicas, right before the commits: a commits, b cannot.
    let aCopy: string | undefined;
    await assert.rejects(
      uploadCheckpoint({
        storeUrl: a.url,
        replicaUrls: [b.url],
        token: TOKEN,
        container: 'app',
        parts: [{ name: 'criu', dir: dirs.criu }],
        metadata: {},
        beforeCommit: async () => {
          await b.kill();
        },
      }),
      (err: unknown) => err instanceof ChipmunkError,
    );
    aCopy = (await a.client().list('app')).find((x) => !before.some((y) => y.id === x.id))?.id;
    assert.equal(aCopy, undefined, "the copy a committed was removed: it is on every replica or on none");

    // With b down, a new checkpoint is refused before anything is taken.
    await assert.rejects(checkpoint('app'), (err: unknown) => err instanceof UnavailableError && /only 1 of the 2 checkpoint store replicas/.test(err.message));

    const listed = await catalog.list('app');
    assert.deepEqual(listed.map((x) => x.id), before.map((x) => x.id), 'the same checkpoints count as before');
    assert.deepEqual(listed[1]!.replicas, [
      { url: a.url, state: 'intact' },
      { url: b.url, state: 'unreachable' },
    ]);
    const dest = join(work, 'restored-2');
    const got = await restoreFrom('app', listed[1]!.id, dest);
    assert.equal(got.url, checkpointPartUrl(a.url, 'app', listed[1]!.id, 'criu'), 'the previous checkpoint reads from the replica left');
  });

  it('after a replica is lost, copies the checkpoints it held to another replica, chunks verified, and logs it', async () => {
    replicaUrls = [a.url, b.url, c.url];
    const listed = await catalog.list('app');
    const older = listed[1]!;
    await catalog.replicate();

    const copied = captured.lines.filter((line) => line.level === 30 && /copied it from/.test(line.msg));
    assert.ok(copied.some((line) => line.msg.includes(older.id) && line.msg.includes(c.url)), `the log says the copy was made: ${JSON.stringify(copied.map((l) => l.msg))}`);
    assert.deepEqual((await catalog.list('app')).find((x) => x.id === older.id)!.replicas, [
      { url: a.url, state: 'intact' },
      { url: b.url, state: 'unreachable' },
      { url: c.url, state: 'intact' },
    ]);
    const newest = listed[0]!;
    assert.equal((await c.client().list('app')).some((x) => x.id === newest.id), true, 'the newest (repaired on a) was copied too');

    // a is lost too: the copy on c is what a restore reads.
    await a.kill();
    const got = await restoreFrom('app', older.id, join(work, 'restored-3'));
    assert.equal(got.url, checkpointPartUrl(c.url, 'app', older.id, 'criu'));
    assert.deepEqual(got.skipped, [], 'the catalog handed the intact replica first');
  });

  it('with fewer than N replicas left, keeps counting what was committed on N and says so once', async () => {
    const listed = await catalog.list('app');
    assert.ok(listed.some((x) => !x.corrupt && x.replicas!.some((r) => r.url === c.url && r.state === 'intact')));
    await catalog.replicate();
    await catalog.replicate();
    const stuck = captured.lines.filter((line) => line.level === 40 && /no other replica can take a copy/.test(line.msg));
    assert.equal(new Set(stuck.map((l) => l.msg)).size, stuck.length, 'each stuck checkpoint is reported once');
    assert.ok(stuck.length >= 1);
  });
});

describe('checkpoint replica count', () => {
  it('is 2 by default with a peer, 1 with a warning without one, and refuses more than the replicas known', () => {
    const { log, lines } = capturedLogger();
    assert.equal(checkpointReplicaCount(undefined, ['http://10.0.0.2:7000'], log), 2);
    assert.equal(checkpointReplicaCount(undefined, [], log), 1);
    assert.match(lines.at(-1)?.msg ?? '', /checkpoints live on one host/);
    assert.equal(checkpointReplicaCount(1, ['http://10.0.0.2:7000'], log), 1);
    assert.throws(() => checkpointReplicaCount(3, ['http://10.0.0.2:7000'], log), (err: unknown) => err instanceof InvalidInputError && /knows 2/.test(err.message));
  });

  it('stops a controller start asking for more replicas than it knows, and one given a peer that is no URL', async () => {
    const base = { listen: { host: '127.0.0.1', port: 0 }, token: TOKEN, storeSpec: 'memory:', logger: pino({ level: 'silent' }) };
    await assert.rejects(startController({ ...base, checkpointReplicas: 2 }), (err: unknown) => err instanceof InvalidInputError && /--checkpoint-replicas 2 needs 2 .* knows 1/.test(err.message));
    await assert.rejects(startController({ ...base, checkpointStorePeers: ['10.0.0.2:7000'] }), (err: unknown) => err instanceof InvalidInputError && /not an http\(s\) URL|not a URL/.test(err.message));
  });
});
