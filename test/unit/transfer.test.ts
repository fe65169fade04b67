import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { lstat, mkdir, mkdtemp, open, readFile, readdir, readlink, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Fastify, { type FastifyInstance } from 'fastify';
import { fetchTree, serveTree, treeSize, type TransferResult } from '../../src/agent/transfer.js';
import { BYTES_TRAILER, SHA256_TRAILER } from '../../src/shared/tree-archive.js';
import { InvalidInputError, NotFoundError, TransferFailedError, UnauthorizedError } from '../../src/shared/errors.js';
import { installApiConventions } from '../../src/shared/http.js';
import { removeTree } from '../../src/shared/remove-tree.js';

const TOKEN = 'transfer-test-token';
const BIG_FILE_BYTES = 5 * 1024 * 1024;
const SPARSE_FILE_BYTES = 64 * 1024 * 1024;

/** Whiteouts (mknod) and trusted.* xattrs need root, as the agent has. */
const notRoot = process.getuid?.() !== 0 ? 'needs root (device nodes, trusted.* xattrs)' : false;

function getXattr(path: string, name: string): string {
  return execFileSync('python3', ['-c', 'import os, sys; sys.stdout.write(os.getxattr(sys.argv[1], sys.argv[2]).decode())', path, name]).toString();
}

/** A tree with everything an overlay upper layer or a checkpoint image directory may hold. */
async function makeSourceTree(root: string): Promise<void> {
  await mkdir(join(root, 'etc/app/conf.d'), { recursive: true });
  await writeFile(join(root, 'etc/app/conf.d/main.conf'), 'listen 8080\n');
  await writeFile(join(root, 'big.bin'), randomBytes(BIG_FILE_BYTES));
  const sparse = await open(join(root, 'sparse.img'), 'w');
  await sparse.write(Buffer.alloc(4096, 7), 0, 4096, 16 * 1024 * 1024);
  await sparse.truncate(SPARSE_FILE_BYTES);
  await sparse.close();
  await symlink('etc/app/conf.d/main.conf', join(root, 'config-link'));
  await writeFile(join(root, 'secret.key'), 'hunter2\n', { mode: 0o600 });
  execFileSync('mknod', [join(root, 'deleted-file'), 'c', '0', '0']);
  await mkdir(join(root, 'var/lib/replaced'), { recursive: true });
  await writeFile(join(root, 'var/lib/replaced/new.db'), 'fresh\n');
  execFileSync('python3', ['-c', 'import os, sys; os.setxattr(sys.argv[1], "trusted.overlay.opaque", b"y")', join(root, 'var/lib/replaced')]);
}

/** Every entry below root with what a transfer must keep: type, mode, owner, content. */
async function describeTree(root: string): Promise<Map<string, Record<string, unknown>>> {
  const described = new Map<string, Record<string, unknown>>();
  for (const name of (await readdir(root, { recursive: true })).sort()) {
    const path = join(root, name);
    const st = await lstat(path);
    const entry: Record<string, unknown> = { mode: st.mode, uid: st.uid, gid: st.gid };
    if (st.isFile()) {
      entry.size = st.size;
      entry.mtimeSeconds = Math.floor(st.mtimeMs / 1000);
      entry.sha256 = createHash('sha256').update(await readFile(path)).digest('hex');
    } else if (st.isSymbolicLink()) {
      entry.target = await readlink(path);
    } else if (st.isCharacterDevice()) {
      entry.rdev = st.rdev;
    }
    described.set(name, entry);
  }
  return described;
}

async function partialsNextTo(dest: string, parent: string): Promise<string[]> {
  const prefix = `${dest.slice(parent.length + 1)}.partial-`;
  return (await readdir(parent)).filter((name) => name.startsWith(prefix));
}

describe('tree transfer', { skip: notRoot }, () => {
  let work: string;
  let source: string;
  let archive: Buffer;
  let app: FastifyInstance;
  let baseUrl: string;
  let served: Promise<TransferResult> | undefined;
  const sourceProgress: number[] = [];

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'chipmunk-transfer-'));
    source = join(work, 'source');
    await mkdir(source);
    await makeSourceTree(source);
    archive = execFileSync('tar', ['-C', source, '-cf', '-', '--numeric-owner', '--xattrs', '--xattrs-include=*', '-S', '.'], {
      maxBuffer: 64 * 1024 * 1024,
    });

    app = Fastify();
    installApiConventions(app, TOKEN);
    app.get('/tree.tar', (_req, reply) => {
      served = serveTree(reply, source, { onProgress: (bytes) => sourceProgress.push(bytes) });
      return served;
    });
    app.get('/cut.tar', (_req, reply) => {
      served = serveTree(reply, source, { cutAfterBytes: 1024 * 1024 });
      return served;
    });
    app.get('/missing.tar', (_req, reply) => serveTree(reply, join(work, 'no-such-dir')));
    // A valid archive whose trailers lie or are absent, as after corruption in flight or from a
    // source that never finished the archive properly.
    app.get('/wrong-trailer.tar', (_req, reply) => {
      reply.hijack();
      reply.raw.writeHead(200, { 'content-type': 'application/x-tar', trailer: `${SHA256_TRAILER}, ${BYTES_TRAILER}` });
      reply.raw.write(archive);
      reply.raw.addTrailers({ [SHA256_TRAILER]: '0'.repeat(64), [BYTES_TRAILER]: String(archive.length) });
      reply.raw.end();
    });
    app.get('/no-trailer.tar', (_req, reply) => {
      reply.hijack();
      reply.raw.writeHead(200, { 'content-type': 'application/x-tar' });
      reply.raw.end(archive);
    });
    baseUrl = await app.listen({ host: '127.0.0.1', port: 0 });
  });

  after(async () => {
    await app?.close();
    if (work) await removeTree(work);
  });

  it('copies the tree with contents, modes, owners, symlinks, sparse files, whiteouts and overlay xattrs', async () => {
    const dest = join(work, 'fetched/images');
    const targetProgress: number[] = [];
    sourceProgress.length = 0;

    const received = await fetchTree({ url: `${baseUrl}/tree.tar`, token: TOKEN, dest, onProgress: (bytes) => targetProgress.push(bytes) });
    const sent = await served!;

    assert.deepEqual(received, sent);
    assert.match(received.sha256, /^[0-9a-f]{64}$/);
    assert.ok(received.bytes > BIG_FILE_BYTES);
    assert.deepEqual(await describeTree(dest), await describeTree(source));

    const whiteout = await lstat(join(dest, 'deleted-file'));
    assert.ok(whiteout.isCharacterDevice(), 'whiteout is a char device');
    assert.equal(whiteout.rdev, 0, 'whiteout is device 0/0');
    assert.equal((await lstat(join(dest, 'secret.key'))).mode & 0o777, 0o600);
    assert.equal(await readlink(join(dest, 'config-link')), 'etc/app/conf.d/main.conf');
    assert.equal(getXattr(join(dest, 'var/lib/replaced'), 'trusted.overlay.opaque'), 'y');
    const sparse = await lstat(join(dest, 'sparse.img'));
    assert.ok(sparse.blocks * 512 < SPARSE_FILE_BYTES / 4, `sparse file stays sparse (${sparse.blocks} blocks)`);
    assert.deepEqual(await partialsNextTo(dest, join(work, 'fetched')), []);

    for (const [side, calls, total] of [
      ['target', targetProgress, received.bytes],
      ['source', sourceProgress, sent.bytes],
    ] as const) {
      assert.ok(calls.length > 1, `${side} reported progress more than once`);
      calls.slice(1).forEach((bytes, i) => assert.ok(bytes > calls[i]!, `${side} progress is increasing: ${calls[i]} then ${bytes}`));
      assert.equal(calls.at(-1), total, `${side}'s last progress call is the total`);
    }
  });

  it('accepts an existing empty destination directory', async () => {
    const dest = join(work, 'empty-dest');
    await mkdir(dest);
    await fetchTree({ url: `${baseUrl}/tree.tar`, token: TOKEN, dest });
    await served;
    assert.equal((await lstat(join(dest, 'big.bin'))).size, BIG_FILE_BYTES);
  });

  it('fails a transfer cut midway and leaves neither the destination nor a partial tree', async () => {
    const dest = join(work, 'cut');
    await assert.rejects(fetchTree({ url: `${baseUrl}/cut.tar`, token: TOKEN, dest }), (err: unknown) => {
      assert.ok(err instanceof TransferFailedError, String(err));
      assert.equal(err.details.url, `${baseUrl}/cut.tar`);
      assert.ok((err.details.bytes as number) <= 1024 * 1024, `received ${err.details.bytes} bytes`);
      return true;
    });
    await assert.rejects(served!, TransferFailedError);
    await assert.rejects(lstat(dest), { code: 'ENOENT' });
    assert.deepEqual(await partialsNextTo(dest, work), []);
  });

  it('fails on a checksum trailer that does not match the bytes received', async () => {
    const dest = join(work, 'tampered');
    await assert.rejects(fetchTree({ url: `${baseUrl}/wrong-trailer.tar`, token: TOKEN, dest }), (err: unknown) => {
      assert.ok(err instanceof TransferFailedError, String(err));
      assert.equal(err.details.expected, '0'.repeat(64));
      assert.equal(err.details.actual, createHash('sha256').update(archive).digest('hex'));
      assert.equal(err.details.bytes, archive.length);
      return true;
    });
    await assert.rejects(lstat(dest), { code: 'ENOENT' });
    assert.deepEqual(await partialsNextTo(dest, work), []);
  });

  it('fails when the checksum trailer is missing', async () => {
    const dest = join(work, 'untrailed');
    await assert.rejects(fetchTree({ url: `${baseUrl}/no-trailer.tar`, token: TOKEN, dest }), TransferFailedError);
    await assert.rejects(lstat(dest), { code: 'ENOENT' });
    assert.deepEqual(await partialsNextTo(dest, work), []);
  });

  it('passes on the source error when the source directory or the token is wrong', async () => {
    await assert.rejects(fetchTree({ url: `${baseUrl}/missing.tar`, token: TOKEN, dest: join(work, 'never') }), (err: unknown) => {
      assert.ok(err instanceof TransferFailedError, String(err));
      assert.ok(err.cause instanceof NotFoundError, String(err.cause));
      return true;
    });
    await assert.rejects(fetchTree({ url: `${baseUrl}/tree.tar`, token: 'wrong', dest: join(work, 'never') }), (err: unknown) => {
      assert.ok(err instanceof TransferFailedError, String(err));
      assert.ok(err.cause instanceof UnauthorizedError, String(err.cause));
      return true;
    });
    assert.deepEqual(await partialsNextTo(join(work, 'never'), work), []);
  });

  it('refuses a non-empty destination and leaves it untouched', async () => {
    const dest = join(work, 'occupied');
    await mkdir(dest);
    await writeFile(join(dest, 'keep.txt'), 'mine\n');
    await assert.rejects(fetchTree({ url: `${baseUrl}/tree.tar`, token: TOKEN, dest }), InvalidInputError);
    assert.deepEqual(await readdir(dest), ['keep.txt']);
  });

  it('measures a tree by its regular files, sparse files by their data', async () => {
    const size = await treeSize(source);
    assert.ok(size >= BIG_FILE_BYTES, `${size} covers the big file`);
    assert.ok(size < BIG_FILE_BYTES + SPARSE_FILE_BYTES / 4, `${size} does not count the sparse file's holes`);
  });
});
