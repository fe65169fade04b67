import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { after, before, describe, it } from 'node:test';
import { ensureTestImages, STATEFULAPP_SOURCE, TEST_IMAGE_NAMES } from '../../src/devtools/images.js';
import { removeTree } from '../../src/shared/remove-tree.js';

describe('test images', () => {
  it('builds or reuses them, then reuses them on a second call', async () => {
    const first = await ensureTestImages();
    assert.deepEqual(first.map((r) => r.name), [...TEST_IMAGE_NAMES]);

    const started = Date.now();
    const second = await ensureTestImages();
    assert.deepEqual(
      second,
      TEST_IMAGE_NAMES.map((name) => ({ name, status: 'reused' })),
    );
    // Reuse reads and hashes the inputs (node is ~100 MB) but must not tar or import.
    assert.ok(Date.now() - started < 5000, `reuse took ${Date.now() - started} ms`);
  });

  it('lists them in the default podman store', () => {
    const listed = execFileSync('podman', ['images', '--format', '{{.Repository}}'], { encoding: 'utf8' }).split('\n');
    for (const name of TEST_IMAGE_NAMES) assert.ok(listed.includes(`localhost/${name}`), `${name} not in: ${listed.join(' ')}`);
  });

  it('puts node in the statefulapp root file system', () => {
    const rootfs = execFileSync('podman', ['image', 'mount', 'chipmunk/statefulapp'], { encoding: 'utf8' }).trim();
    try {
      assert.ok(existsSync(join(rootfs, 'usr/bin/node')), `no usr/bin/node under ${rootfs}`);
      assert.ok(existsSync(join(rootfs, 'app/server.js')), `no app/server.js under ${rootfs}`);
    } finally {
      execFileSync('podman', ['image', 'unmount', 'chipmunk/statefulapp']);
    }
  });
});

describe('statefulapp on the host', () => {
  let dataDir: string;
  let app: ChildProcess;
  let baseUrl: string;

  before(async () => {
    dataDir = mkdtempSync(join(tmpdir(), 'chipmunk-statefulapp-'));
    app = spawn(process.execPath, [STATEFULAPP_SOURCE], {
      env: { ...process.env, HOST: '127.0.0.1', PORT: '0', MEMORY_MB: '8', DATA_DIR: dataDir },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    baseUrl = await listeningUrl(app);
  });

  after(async () => {
    if (app.exitCode === null && app.signalCode === null) {
      app.kill('SIGKILL');
      await once(app, 'exit');
    }
    await removeTree(dataDir);
  });

  it('reports its state', async () => {
    const body = await getJSON('/');
    assert.equal(body.counter, 0);
    assert.equal(body.pid, app.pid);
    assert.equal(body.memoryMB, 8);
    assert.equal(typeof body.startedAt, 'string');
    assert.equal(typeof body.hostname, 'string');
    assert.equal(await (await fetch(`${baseUrl}/health`)).text(), 'ok');
  });

  it('counts increments in memory and in its log file', async () => {
    assert.deepEqual(await postJSON('/increment'), { counter: 1 });
    assert.deepEqual(await postJSON('/increment'), { counter: 2 });
    assert.equal((await getJSON('/')).counter, 2);
    assert.deepEqual(await getJSON('/file'), { lines: 2 });
  });

  it('keeps its memory pattern verifiable across touches', async () => {
    const before = await getJSON('/verify-memory');
    assert.equal(before.ok, true);
    assert.equal(before.memoryMB, 8);
    assert.deepEqual(await postJSON('/touch?percent=50'), { touchedMB: 4, memoryMB: 8 });
    const afterTouch = await getJSON('/verify-memory');
    assert.equal(afterTouch.ok, true);
    assert.notEqual(afterTouch.checksum, before.checksum);
  });

  it('exits 0 on SIGTERM', async () => {
    process.kill(app.pid!, 'SIGTERM');
    const [code, signal] = await once(app, 'exit');
    assert.deepEqual({ code, signal }, { code: 0, signal: null });
  });

  async function getJSON(path: string): Promise<Record<string, unknown>> {
    const res = await fetch(`${baseUrl}${path}`);
    assert.equal(res.status, 200, `GET ${path}`);
    return (await res.json()) as Record<string, unknown>;
  }

  async function postJSON(path: string): Promise<Record<string, unknown>> {
    const res = await fetch(`${baseUrl}${path}`, { method: 'POST' });
    assert.equal(res.status, 200, `POST ${path}`);
    return (await res.json()) as Record<string, unknown>;
  }
});

/** The app prints its address once listening; with PORT=0 that is the only way to learn the port. */
function listeningUrl(app: ChildProcess): Promise<string> {
  return new Promise((resolve, reject) => {
    let output = '';
    app.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
      output += chunk;
      const match = /statefulapp listening on ([\d.]+):(\d+)/.exec(output);
      if (match) resolve(`http://${match[1]}:${match[2]}`);
    });
    app.on('exit', (code) => reject(new Error(`statefulapp exited (${code}) before listening; it printed: ${output}`)));
  });
}
