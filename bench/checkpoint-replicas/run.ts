/**
 * bench/checkpoint-replicas: what a second checkpoint store replica costs a checkpoint upload.
 *
 * A 64 MB app's checkpoint (random memory image + a small files part) is uploaded by the agent's
 * uploadCheckpoint to 1 and to 2 real checkpoint stores (temp dirs, HTTP on loopback, served in
 * this process): the first checkpoint (every chunk new) and the next one after 1% of the pages
 * changed (deduplicated). Wall time from the start of the upload to the last commit.
 *
 * Usage: npm run bench:replicas [-- --size-mb 64 --runs 3]
 * Prints the table and writes it to bench/results/checkpoint-replicas.md.
 */
import { randomBytes, randomInt } from 'node:crypto';
import { mkdir, mkdtemp, open, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import Fastify, { type FastifyInstance } from 'fastify';
import { CheckpointStore, checkpointStoreRoutes, uploadCheckpoint } from '../../src/checkpoint-store/index.js';
import { installApiConventions } from '../../src/shared/http.js';
import { removeTree } from '../../src/shared/remove-tree.js';

const RESULTS = fileURLToPath(new URL('../results/checkpoint-replicas.md', import.meta.url));
const TOKEN = 'bench-token';
const PAGE = 4096;
const MiB = 1024 * 1024;

const { values } = parseArgs({ options: { 'size-mb': { type: 'string', default: '64' }, runs: { type: 'string', default: '3' } } });
const sizeMb = Number(values['size-mb']);
const runs = Number(values.runs);

async function serveStore(root: string): Promise<{ url: string; close(): Promise<void> }> {
  const store = await CheckpointStore.open({ root });
  const app: FastifyInstance = Fastify();
  installApiConventions(app, TOKEN);
  await app.register(checkpointStoreRoutes(store));
  const url = (await app.listen({ host: '127.0.0.1', port: 0 })).replace(/\/$/, '');
  return { url, close: async () => (await app.close(), await store.close()) };
}

async function changePages(file: string, fraction: number): Promise<void> {
  const pages = (sizeMb * MiB) / PAGE;
  const handle = await open(file, 'r+');
  for (let i = 0; i < pages * fraction; i++) await handle.write(randomBytes(PAGE), 0, PAGE, randomInt(pages) * PAGE);
  await handle.close();
}

const work = await mkdtemp(join(tmpdir(), 'chipmunk-bench-replicas-'));
const rows: string[][] = [];
try {
  const criu = join(work, 'app/criu');
  const files = join(work, 'app/files/upper/etc');
  await mkdir(criu, { recursive: true });
  await mkdir(files, { recursive: true });
  await writeFile(join(files, 'app.conf'), 'listen 8080\n');
  const pagesFile = join(criu, 'pages-1.img');
  const results = new Map<string, number[]>();
  for (let run = 1; run <= runs; run++) {
    for (const replicas of [1, 2]) {
      await writeFile(pagesFile, randomBytes(sizeMb * MiB));
      const stores = [];
      for (let i = 0; i < replicas; i++) stores.push(await serveStore(join(work, `run${run}-r${replicas}-${i}`)));
      try {
        for (const kind of ['first (all new)', 'next (1% changed)']) {
          if (kind.startsWith('next')) await changePages(pagesFile, 0.01);
          const t = performance.now();
          const done = await uploadCheckpoint({
            storeUrl: stores[0]!.url,
            replicaUrls: stores.slice(1).map((s) => s.url),
            token: TOKEN,
            container: 'bench',
            parts: [
              { name: 'criu', dir: criu },
              { name: 'files', dir: join(work, 'app/files') },
            ],
            metadata: {},
          });
          const ms = performance.now() - t;
          const key = `${kind}|${replicas}`;
          results.set(key, [...(results.get(key) ?? []), ms]);
          process.stderr.write(`run ${run}: ${replicas} replica(s), ${kind}: ${ms.toFixed(0)} ms, ${(done.sentBytes / MiB).toFixed(1)} MiB sent\n`);
        }
      } finally {
        for (const store of stores) await store.close();
      }
    }
  }
  for (const kind of ['first (all new)', 'next (1% changed)']) {
    const one = results.get(`${kind}|1`)!;
    const two = results.get(`${kind}|2`)!;
    const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
    rows.push([kind, one.map((x) => x.toFixed(0)).join(', '), two.map((x) => x.toFixed(0)).join(', '), `${(median(two) / median(one)).toFixed(2)}x`]);
  }
} finally {
  await removeTree(work);
}

const table = [
  `Checkpoint upload of a ${sizeMb} MB app, agent uploadCheckpoint to real stores on loopback (one process, ${runs} runs), ms:`,
  '',
  '| checkpoint | 1 replica | 2 replicas | 2 vs 1 (median) |',
  '|---|---|---|---|',
  ...rows.map((r) => `| ${r.join(' | ')} |`),
  '',
].join('\n');
process.stdout.write(`${table}\n`);
await mkdir(join(RESULTS, '..'), { recursive: true });
await writeFile(RESULTS, `# bench/checkpoint-replicas\n\n${new Date().toISOString()}\n\n${table}`);
