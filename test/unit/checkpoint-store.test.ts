import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes, randomInt } from 'node:crypto';
import { lstat, mkdir, mkdtemp, open, readFile, readdir, readlink, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import Fastify, { type FastifyInstance } from 'fastify';
import { request } from 'undici';
import { fetchTree } from '../../src/agent/transfer.js';
import { CheckpointStore, CheckpointStoreClient, checkpointStoreRoutes, uploadCheckpoint, type UploadedCheckpoint } from '../../src/checkpoint-store/index.js';
import { encodeManifest, scanTar } from '../../src/checkpoint-store/manifest.js';
import { ChipmunkError, ChunkCorruptError, ConflictError, PathEscapesError, TransferFailedError } from '../../src/shared/errors.js';
import { installApiConventions } from '../../src/shared/http.js';
import { removeTree } from '../../src/shared/remove-tree.js';

const TOKEN = 'checkpoint-store-test-token';
const PAGE = 4096;
const MEMORY_BYTES = 8 * 1024 * 1024;
const PAGES = MEMORY_BYTES / PAGE;

/** Whiteouts (mknod) and trusted.* xattrs need root, as the agent has. */
const notRoot = process.getuid?.() !== 0 ? 'needs root (device nodes, trusted.* xattrs)' : false;

/** A checkpoint's two part directories: a fake CRIU image dir and the container's files. */
async function makeCheckpointDirs(root: string): Promise<{ criu: string; files: string }> {
  const criu = join(root, 'criu');
  const files = join(root, 'files');
  await mkdir(criu, { recursive: true });
  await writeFile(join(criu, 'pages-1.img'), randomBytes(MEMORY_BYTES));
  await writeFile(join(criu, 'pagemap-1.img'), randomBytes(3000));
  await writeFile(join(criu, 'core-1.img'), randomBytes(700));
  await mkdir(join(files, 'upper/etc/app'), { recursive: true });
  await writeFile(join(files, 'upper/etc/app/app.conf'), 'listen 8080\n');
  await writeFile(join(files, 'upper/etc/empty'), '');
  await writeFile(join(files, 'upper/etc/doomed'), 'soon gone\n');
  await symlink('/etc/app/app.conf', join(files, 'upper/abs-link'));
  await symlink('../..', join(files, 'upper/etc/app/up-link'));
  await symlink('/../../..', join(files, 'upper/escape'));
  await symlink('loop-b', join(files, 'upper/loop-a'));
  await symlink('loop-a', join(files, 'upper/loop-b'));
  execFileSync('mknod', [join(files, 'upper/etc/deleted-from-image'), 'c', '0', '0']);
  await mkdir(join(files, 'upper/var/cache'), { recursive: true });
  execFileSync('python3', ['-c', 'import os, sys; os.setxattr(sys.argv[1], "trusted.overlay.opaque", b"y")', join(files, 'upper/var/cache')]);
  await mkdir(join(files, 'logs'), { recursive: true });
  await writeFile(join(files, 'logs/stdout.log'), 'started\n');
  await mkdir(join(files, 'volumes/data'), { recursive: true });
  await writeFile(join(files, 'volumes/data/db.txt'), 'rows\n');
  return { criu, files };
}

/** Overwrites `count` distinct random pages of the memory image; answers the bytes changed. */
async function changePages(criu: string, count: number): Promise<number> {
  const pages = new Set<number>();
  while (pages.size < count) pages.add(randomInt(PAGES));
  const file = await open(join(criu, 'pages-1.img'), 'r+');
  for (const page of pages) await file.write(randomBytes(PAGE), 0, PAGE, page * PAGE);
  await file.close();
  return count * PAGE;
}

/** Paths below root, not following symlinks (Node 20's recursive readdir follows them). */
async function walk(root: string, prefix = ''): Promise<string[]> {
  const names: string[] = [];
  for (const entry of await readdir(join(root, prefix), { withFileTypes: true })) {
    const name = join(prefix, entry.name);
    names.push(name);
    if (entry.isDirectory()) names.push(...(await walk(root, name)));
  }
  return names.sort();
}

/** Every entry below root with what a restore must keep. */
async function describeTree(root: string): Promise<Map<string, string>> {
  const described = new Map<string, string>();
  for (const name of await walk(root)) {
    const path = join(root, name);
    const st = await lstat(path);
    let what = `${st.mode}:${st.uid}:${st.gid}`;
    if (st.isFile()) what += `:${st.size}:${createHash('sha256').update(await readFile(path)).digest('hex')}`;
    else if (st.isSymbolicLink()) what += `:${await readlink(path)}`;
    else if (st.isCharacterDevice()) what += `:${st.rdev}`;
    described.set(name, what);
  }
  return described;
}

async function fileBytes(dir: string): Promise<number> {
  let total = 0;
  for (const name of await walk(dir)) {
    const st = await lstat(join(dir, name));
    if (st.isFile()) total += st.size;
  }
  return total;
}

async function packBytes(root: string): Promise<number> {
  let total = 0;
  for (const name of await readdir(join(root, 'packs'))) total += (await stat(join(root, 'packs', name))).size;
  return total;
}

describe('checkpoint store', { skip: notRoot }, () => {
  let work: string;
  let storeRoot: string;
  let store: CheckpointStore;
  let app: FastifyInstance;
  let url: string;
  let client: CheckpointStoreClient;

  async function serve(): Promise<void> {
    store = await CheckpointStore.open({ root: storeRoot });
    app = Fastify();
    installApiConventions(app, TOKEN);
    await app.register(checkpointStoreRoutes(store));
    url = await app.listen({ host: '127.0.0.1', port: 0 });
    client = new CheckpointStoreClient({ baseUrl: url, token: TOKEN });
  }

  async function stop(): Promise<void> {
    await app.close();
    await store.close();
  }

  function upload(container: string, dirs: { criu: string; files: string }, extra: { logPosition?: { logId: string; seq: number } } = {}): Promise<UploadedCheckpoint> {
    return uploadCheckpoint({
      storeUrl: url,
      token: TOKEN,
      container,
      parts: [
        { name: 'criu', dir: dirs.criu },
        { name: 'files', dir: dirs.files },
      ],
      metadata: { volumes: [{ name: 'data', path: '/var/lib/data' }] },
      ...extra,
    });
  }

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'chipmunk-cstore-'));
    storeRoot = join(work, 'store');
    await serve();
  });

  after(async () => {
    await stop();
    await removeTree(work);
  });

  describe('two checkpoints with 1% of the pages changed', () => {
    let dirs: { criu: string; files: string };
    let first: UploadedCheckpoint;
    let second: UploadedCheckpoint;
    let changedBytes: number;

    before(async () => {
      dirs = await makeCheckpointDirs(join(work, 'app1'));
      first = await upload('app1', dirs, { logPosition: { logId: 'log-a', seq: 120 } });
      changedBytes = await changePages(dirs.criu, Math.ceil(PAGES / 100));
      await writeFile(join(dirs.files, 'upper/etc/app/app.conf'), 'listen 9090\n');
      await writeFile(join(dirs.files, 'upper/new.txt'), 'new\n');
      await removeTree(join(dirs.files, 'upper/etc/doomed'));
      execFileSync('mknod', [join(dirs.files, 'upper/etc/doomed'), 'c', '0', '0']);
      second = await upload('app1', dirs, { logPosition: { logId: 'log-a', seq: 480 } });
    });

    it('stores only the changed pages, and counts logical bytes right', async () => {
      const logical = (await fileBytes(dirs.criu)) + (await fileBytes(dirs.files));
      assert.equal(second.logicalBytes, logical);
      assert.ok(first.newBytes >= MEMORY_BYTES, `first checkpoint stores everything (${first.newBytes})`);
      // The file changes add a few small chunks on top of the pages.
      assert.ok(second.newBytes <= 1.5 * changedBytes, `newBytes ${second.newBytes} > 1.5 x ${changedBytes} changed`);
      assert.ok(second.sentBytes <= 1.5 * changedBytes, `sent ${second.sentBytes} bytes`);
      const listed = await client.list('app1');
      assert.deepEqual(
        listed.map((c) => [c.id, c.logPosition, c.newBytes, c.logicalBytes, c.corrupt ?? false]),
        [
          [second.id, { logId: 'log-a', seq: 480 }, second.newBytes, second.logicalBytes, false],
          [first.id, { logId: 'log-a', seq: 120 }, first.newBytes, first.logicalBytes, false],
        ],
      );
      const detail = await client.get('app1', second.id);
      assert.deepEqual(detail.metadata, { volumes: [{ name: 'data', path: '/var/lib/data' }] });
      assert.deepEqual(
        detail.parts.map((p) => p.name),
        ['criu', 'files'],
      );
    });

    it('restores each part with fetchTree exactly as it was', async () => {
      for (const part of ['criu', 'files'] as const) {
        const dest = join(work, `restored-${part}`);
        await fetchTree({ url: client.partUrl('app1', second.id, part), token: TOKEN, dest });
        assert.deepEqual(await describeTree(dest), await describeTree(dirs[part]));
      }
      assert.equal(execFileSync('python3', ['-c', 'import os, sys; sys.stdout.write(os.getxattr(sys.argv[1], "trusted.overlay.opaque").decode())', join(work, 'restored-files/upper/var/cache')]).toString(), 'y');
    });

    it('browses the container files at a checkpoint, whiteouts hidden, volumes mounted', async () => {
      const root = await client.files('app1', second.id, '/');
      assert.equal(root.type, 'dir');
      assert.deepEqual(root.type === 'dir' && root.entries.map((e) => e.name), ['abs-link', 'escape', 'etc', 'loop-a', 'loop-b', 'new.txt', 'var']);
      const etc = await client.files('app1', second.id, '/etc');
      assert.deepEqual(etc.type === 'dir' && etc.entries.map((e) => [e.name, e.type, e.size]), [
        ['app', 'dir', 0],
        ['empty', 'file', 0],
      ]);
      const conf = await client.files('app1', first.id, '/abs-link');
      assert.equal(conf.type === 'file' && conf.bytes.toString(), 'listen 8080\n');
      const viaDots = await client.files('app1', second.id, '/etc/app/up-link/etc/./app/../app/app.conf');
      assert.equal(viaDots.type === 'file' && viaDots.bytes.toString(), 'listen 9090\n');
      const volume = await client.files('app1', second.id, '/var/lib/data/db.txt');
      assert.equal(volume.type === 'file' && volume.bytes.toString(), 'rows\n');
      const memory = await store.readPath('app1', second.id, '/var/lib/data');
      assert.equal(memory.type, 'dir');
    });

    it('refuses paths that escape the container', async () => {
      for (const path of ['../../etc/passwd', '/etc/../../etc/passwd', '/escape', '/escape/etc/passwd', '/loop-a']) {
        await assert.rejects(client.files('app1', second.id, path), (err: unknown) => {
          assert.ok(err instanceof PathEscapesError, `${path}: ${String(err)}`);
          assert.equal(err.code, 'CHIPMUNK_PATH_ESCAPES');
          assert.equal(err.status, 400);
          return true;
        });
      }
    });

    it('diffs two checkpoints', async () => {
      assert.deepEqual(await client.diff('app1', first.id, second.id), {
        added: ['/new.txt'],
        changed: ['/etc/app/app.conf'],
        removed: ['/etc/doomed'],
      });
    });
  });

  it('refuses a chunk whose bytes do not match its hash, and a commit with chunks missing', async () => {
    const dir = join(work, 'tiny');
    await mkdir(dir);
    await writeFile(join(dir, 'a'), randomBytes(5000));
    const tar = execFileSync('tar', ['-C', dir, '-cf', '-', '.']);
    const { manifest } = await scanTar(Readable.from([tar]));
    const started = await request(`${url}/v1/checkpoints/tiny/uploads`, {
      method: 'POST',
      headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
      body: JSON.stringify({ parts: [{ name: 'files', manifest: encodeManifest(manifest).toString('base64') }], time: Date.now(), metadata: {} }),
    });
    assert.equal(started.statusCode, 201);
    const { uploadId, missingChunks } = (await started.body.json()) as { uploadId: string; missingChunks: number };
    assert.equal(missingChunks, 2);
    const frame = Buffer.alloc(36 + 10);
    manifest.entries.find((e) => e.entry.size > 0)!.hashes.copy(frame, 0, 0, 32);
    frame.writeUInt32BE(10, 32);
    const put = await request(`${url}/v1/checkpoints/uploads/${uploadId}/chunks`, {
      method: 'PUT',
      headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/octet-stream' },
      body: frame,
    });
    const body = (await put.body.json()) as { code: string };
    assert.equal(put.statusCode, 400);
    assert.equal(body.code, 'CHIPMUNK_CHUNK_CORRUPT');
    await assert.rejects(store.commit(uploadId), ConflictError);
    await store.abort(uploadId);
    assert.deepEqual(store.list('tiny'), []);
  });

  it('keeps the newest 5 checkpoints and collects the chunks only older ones used', async () => {
    const dirs = await makeCheckpointDirs(join(work, 'app2'));
    const baseline = await packBytes(storeRoot);
    const uploaded: UploadedCheckpoint[] = [];
    for (let i = 0; i < 8; i++) {
      if (i > 0) await changePages(dirs.criu, PAGES / 2);
      uploaded.push(await upload('app2', dirs));
    }
    const listed = await client.list('app2');
    assert.deepEqual(
      listed.map((c) => c.id),
      uploaded.slice(-5).reverse().map((c) => c.id),
    );
    // The first checkpoints' pages that no kept checkpoint shares are gone: most of the first
    // 8 MB pack, compacted once less than half of it was live.
    const everStored = uploaded.reduce((sum, c) => sum + c.newBytes, 0);
    const added = (await packBytes(storeRoot)) - baseline;
    assert.ok(added < everStored - MEMORY_BYTES / 2, `packs grew by ${added} bytes of the ${everStored} ever stored`);
    const dest = join(work, 'app2-restored');
    await fetchTree({ url: client.partUrl('app2', listed[4].id, 'criu'), token: TOKEN, dest });
    await client.forget('app2');
    assert.deepEqual(await client.list('app2'), []);
    // Only chunks other containers share (small files) may stay.
    assert.ok((await packBytes(storeRoot)) < baseline + 64 * 1024, 'forgetting frees the packs');
  });

  it('marks a checkpoint with a damaged chunk corrupt, and still reads the previous one', async () => {
    const dirs = await makeCheckpointDirs(join(work, 'app3'));
    const good = await upload('app3', dirs);
    const page = randomBytes(PAGE);
    const file = await open(join(dirs.criu, 'pages-1.img'), 'r+');
    await file.write(page, 0, PAGE, 17 * PAGE);
    await file.close();
    const damaged = await upload('app3', dirs);

    // Flip one byte of the new page where its pack holds it.
    let flipped = false;
    for (const name of await readdir(join(storeRoot, 'packs'))) {
      const path = join(storeRoot, 'packs', name);
      const at = (await readFile(path)).indexOf(page);
      if (at < 0) continue;
      const pack = await open(path, 'r+');
      await pack.write(Buffer.from([page[100] ^ 0xff]), 0, 1, at + 100);
      await pack.close();
      flipped = true;
    }
    assert.ok(flipped, 'found the page in a pack');

    await assert.rejects(fetchTree({ url: client.partUrl('app3', damaged.id, 'criu'), token: TOKEN, dest: join(work, 'app3-bad') }), TransferFailedError);
    await assert.rejects(
      (async () => {
        for await (const _ of store.partArchive('app3', damaged.id, 'criu'));
      })(),
      (err: unknown) => {
        assert.ok(err instanceof ChunkCorruptError);
        assert.equal(err.details.checkpoint, damaged.id);
        assert.equal(err.details.container, 'app3');
        assert.ok(typeof err.details.pack === 'string');
        return true;
      },
    );
    const listed = await client.list('app3');
    assert.deepEqual(
      listed.map((c) => [c.id, c.corrupt ?? false]),
      [
        [damaged.id, true],
        [good.id, false],
      ],
    );
    const dest = join(work, 'app3-good');
    await fetchTree({ url: client.partUrl('app3', good.id, 'criu'), token: TOKEN, dest });
    assert.deepEqual((await readFile(join(dest, 'pages-1.img'))).subarray(17 * PAGE, 18 * PAGE).equals(page), false);
  });

  it('after a crash mid-upload, keeps the previous checkpoint and deletes the orphan pack', async () => {
    const dirs = await makeCheckpointDirs(join(work, 'app4'));
    const kept = await upload('app4', dirs);
    await changePages(dirs.criu, 64);
    const before = new Set(await readdir(join(storeRoot, 'packs')));
    await stop();

    // A store process that receives every chunk of the next checkpoint and dies before the commit.
    const crash = spawnSync(
      process.execPath,
      [
        '--import',
        'tsx',
        '-e',
        `
        import { CheckpointStore } from './src/checkpoint-store/store.ts';
        import { scanTar } from './src/checkpoint-store/manifest.ts';
        import { encodeManifest } from './src/checkpoint-store/manifest.ts';
        import { execFileSync } from 'node:child_process';
        import { Readable } from 'node:stream';
        const store = await CheckpointStore.open({ root: ${JSON.stringify(storeRoot)} });
        const tar = execFileSync('tar', ['-C', ${JSON.stringify(dirs.criu)}, '-cf', '-', '.'], { maxBuffer: 1 << 30 });
        const { manifest } = await scanTar(Readable.from([tar]));
        const started = store.createUpload({ container: 'app4', parts: [{ name: 'criu', manifest: encodeManifest(manifest) }], time: Date.now(), metadata: {} });
        const missing = Buffer.from(started.missing, 'base64');
        const frames = [];
        let position = 0;
        for (const { entry, hashes } of manifest.entries) {
          const start = tar.indexOf(entry.header) + entry.header.length;
          for (let i = 0; i * 32 < hashes.length; i++, position++) {
            if (!(missing[position >> 3] & (0x80 >> (position & 7)))) continue;
            const data = tar.subarray(start + i * 4096, start + Math.min(entry.size, (i + 1) * 4096));
            const head = Buffer.alloc(36);
            hashes.copy(head, 0, i * 32, i * 32 + 32);
            head.writeUInt32BE(data.length, 32);
            frames.push(head, data);
          }
        }
        const received = await store.receiveChunks(started.uploadId, Readable.from([Buffer.concat(frames)]));
        if (received.chunks === 0) throw new Error('no chunks received');
        process.kill(process.pid, 'SIGKILL');
        `,
      ],
      { cwd: process.cwd(), encoding: 'utf8' },
    );
    assert.equal(crash.signal, 'SIGKILL', crash.stderr);
    const orphans = (await readdir(join(storeRoot, 'packs'))).filter((name) => !before.has(name));
    assert.equal(orphans.length, 1, 'the crashed upload left its pack');

    await serve();
    assert.ok(!(await readdir(join(storeRoot, 'packs'))).includes(orphans[0]), 'orphan pack deleted at open');
    assert.deepEqual(
      (await client.list('app4')).map((c) => c.id),
      [kept.id],
    );
    const dest = join(work, 'app4-restored');
    await fetchTree({ url: client.partUrl('app4', kept.id, 'files'), token: TOKEN, dest });
    assert.ok((await stat(join(dest, 'upper/etc/app/app.conf'))).isFile());
  });

  it('drops an upload left idle past the upload timeout, with its chunks', async () => {
    const root = join(work, 'timeout-store');
    const idle = await CheckpointStore.open({ root, uploadTimeoutMs: 50 });
    try {
      const dir = join(work, 'timeout-dir');
      await mkdir(dir);
      await writeFile(join(dir, 'a'), 'x');
      const tar = execFileSync('tar', ['-C', dir, '-cf', '-', '.']);
      const { manifest } = await scanTar(Readable.from([tar]));
      const { uploadId } = idle.createUpload({ container: 'idle', parts: [{ name: 'files', manifest: encodeManifest(manifest) }], time: 1, metadata: {} });
      const hash = manifest.entries.find((e) => e.entry.size > 0)!.hashes;
      const frame = Buffer.concat([hash, Buffer.from([0, 0, 0, 1]), Buffer.from('x')]);
      assert.deepEqual(await idle.receiveChunks(uploadId, Readable.from([frame])), { chunks: 1, bytes: 1 });
      assert.equal((await readdir(join(root, 'packs'))).length, 1);
      await new Promise((resolve) => setTimeout(resolve, 150));
      await assert.rejects(idle.commit(uploadId), (err: unknown) => err instanceof ChipmunkError && err.code === 'CHIPMUNK_NOT_FOUND');
      assert.deepEqual(await readdir(join(root, 'packs')), []);
    } finally {
      await idle.close();
    }
  });

  it('needs the cluster token', async () => {
    const res = await request(`${url}/v1/checkpoints/app1`);
    assert.equal(res.statusCode, 401);
    await res.body.dump();
  });

  it('answers an unknown checkpoint with NOT_FOUND', async () => {
    await assert.rejects(client.get('app1', '0123456789abcdef'), (err: unknown) => err instanceof ChipmunkError && err.code === 'CHIPMUNK_NOT_FOUND');
  });
});
