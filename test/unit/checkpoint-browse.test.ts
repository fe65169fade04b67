/**
 * `chipmunk files` and `diff` as the controller answers them (checkpoint-browse.ts): from the
 * replicas that hold the checkpoint, whichever controller is asked. Real checkpoint stores on
 * loopback, the catalog's commit records in a memory state store.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { uploadCheckpoint, type DirectoryListing } from '../../src/checkpoint-store/index.js';
import { CheckpointBrowser } from '../../src/controller/checkpoint-browse.js';
import { ReplicatedCatalog } from '../../src/controller/checkpoint-replicas.js';
import { MemoryStore } from '../../src/controller/store/memory.js';
import { ChipmunkError, NotFoundError, UnavailableError } from '../../src/shared/errors.js';
import { removeTree } from '../../src/shared/remove-tree.js';
import { Replica } from '../support/store-replica.js';

const TOKEN = 'checkpoint-browse-token';

describe('reading checkpoints from the replicas that hold them', () => {
  let work: string;
  let a: Replica;
  let b: Replica;
  let catalog: ReplicatedCatalog;
  let browser: CheckpointBrowser;
  const ids: Record<string, string> = {};

  /** A checkpoint of the app's files as they are now, committed on REPLICAS only. */
  async function checkpointOn(replicas: Replica[]): Promise<string> {
    const urls = replicas.map((r) => r.url);
    const info = await uploadCheckpoint({
      storeUrl: urls[0]!,
      replicaUrls: urls.slice(1),
      token: TOKEN,
      container: 'app',
      parts: [
        { name: 'criu', dir: join(work, 'app/criu') },
        { name: 'files', dir: join(work, 'app/files') },
      ],
      metadata: {},
    });
    await catalog.committed(info, urls);
    return info.id;
  }

  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'chipmunk-browse-'));
    a = await new Replica(join(work, 'a'), TOKEN).start();
    b = await new Replica(join(work, 'b'), TOKEN).start();
    await mkdir(join(work, 'app/criu'), { recursive: true });
    await mkdir(join(work, 'app/files/upper/etc'), { recursive: true });
    await writeFile(join(work, 'app/criu/pages-1.img'), randomBytes(64 * 1024));
    catalog = new ReplicatedCatalog({ state: new MemoryStore(), replicaUrls: () => [a.url, b.url], replicas: 1, token: TOKEN, log: pino({ level: 'silent' }), replicaTimeoutMs: 1_000 });
    browser = new CheckpointBrowser({ catalog, token: TOKEN, timeoutMs: 2_000 });

    await writeFile(join(work, 'app/files/upper/etc/app.conf'), 'listen 8080\n');
    ids.onA = await checkpointOn([a]);
    await writeFile(join(work, 'app/files/upper/etc/app.conf'), 'listen 9090\n');
    await writeFile(join(work, 'app/files/upper/etc/new.txt'), 'new\n');
    ids.onB = await checkpointOn([b]);
    ids.onBoth = await checkpointOn([a, b]);
  });

  after(async () => {
    for (const replica of [a, b]) await replica?.kill().catch(() => undefined);
    await removeTree(work);
  });

  it('reads a file and a directory from the one replica holding the checkpoint, whichever comes first', async () => {
    const onB = await browser.files('app', ids.onB!, '/etc/app.conf');
    assert.equal(onB.headers['content-type'], 'application/octet-stream');
    assert.equal(await onB.body.text(), 'listen 9090\n');
    const onA = await browser.files('app', ids.onA!, '/etc');
    const listing = (await onA.body.json()) as DirectoryListing;
    assert.deepEqual(listing.entries.map((e) => e.name), ['app.conf']);
  });

  it('diffs two checkpoints no replica holds both of, from their manifests', async () => {
    assert.deepEqual(await browser.diff('app', ids.onA!, ids.onB!), { added: ['/etc/new.txt'], changed: ['/etc/app.conf'], removed: [] });
    assert.deepEqual(await browser.diff('app', ids.onB!, ids.onBoth!), { added: [], changed: [], removed: [] });
  });

  it("gives the path's own answer as it is, names an unknown checkpoint, and passes over a dead replica", async () => {
    await assert.rejects(browser.files('app', ids.onBoth!, '/etc/nope'), (err: unknown) => err instanceof NotFoundError && /no \/etc\/nope/.test(err.message));
    await assert.rejects(browser.files('app', 'feedfacefeedface', '/'), (err: unknown) => err instanceof NotFoundError && /chipmunk checkpoints app/.test(err.message));
    await a.kill();
    assert.equal(await (await browser.files('app', ids.onBoth!, '/etc/app.conf')).body.text(), 'listen 9090\n', 'read from b');
    await assert.rejects(browser.files('app', ids.onA!, '/etc/app.conf'), (err: unknown) => err instanceof UnavailableError && err instanceof ChipmunkError && err.message.includes(a.url));
  });
});
