/**
 * bench/migration: what moving a container costs, side by side in one run.
 *
 * For each memory size (the app touches every page of it), three ways to move it:
 *   lazy   chipmunk, post-copy (CRIU page server + userfaultfd), node1 -> node2
 *   copy   chipmunk, stop-and-copy, node1 -> node2
 *   podman `podman container checkpoint --export`, copy the archive, `podman container restore --import`
 * Downtime is what a client polling about every millisecond sees: last answer from the source
 * to first answer from the target. Total is the whole operation, until the target answered.
 *
 * Usage: npm run bench:migration [-- --sizes 64,256,1024 --modes lazy,copy,podman]
 * Prints a table and writes it to bench/results/migration.md.
 */
import { mkdir, mkdtemp, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { request } from 'undici';
import { DowntimeProbe, AnswerWatch, firstAnswer } from '../../src/devtools/downtime-probe.js';
import { ensureTestImages } from '../../src/devtools/images.js';
import { runChipmunk } from '../../src/devtools/run-chipmunk.js';
import { run, runUnchecked } from '../../src/shared/exec.js';
import { removeTree } from '../../src/shared/remove-tree.js';

const RESULTS = fileURLToPath(new URL('../results/migration.md', import.meta.url));
const PORT = 8080;
const SRC = '198.18.0.11';
const DST = '198.18.0.12';
const PODMAN_NET = 'chmk-bench';
const PODMAN_SUBNET = '198.19.250.0/24';
const PODMAN_ENV = { ...process.env, CONTAINERS_CONF: '/etc/chipmunk/containers.conf' };

type Way = 'lazy' | 'copy' | 'podman';
interface Row {
  sizeMB: number;
  way: Way;
  downtimeMs?: number;
  totalMs: number;
  frozenMs?: number;
  bytes?: number;
  note?: string;
}

const { values } = parseArgs({
  options: { sizes: { type: 'string', default: '64,256,1024' }, modes: { type: 'string', default: 'lazy,copy,podman' } },
});
const sizes = values.sizes!.split(',').map(Number);
const ways = values.modes!.split(',') as Way[];


async function waitForAnswer(url: string, timeoutMs = 120_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    try {
      const res = await request(url, { headersTimeout: 2_000, bodyTimeout: 2_000 });
      await res.body.dump();
      if (res.statusCode === 200) return;
    } catch {
      // not yet
    }
    if (Date.now() > until) throw new Error(`${url} did not answer within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function chipmunkWay(sizeMB: number, mode: 'lazy' | 'copy'): Promise<Row> {
  const name = `bench-${mode}-${sizeMB}`;
  await runChipmunk(['run', '--name', name, '--node', 'node1', '-p', `${PORT}:8080`, '-e', `MEMORY_MB=${sizeMB}`, 'chipmunk/statefulapp']);
  try {
    await waitForAnswer(`http://${SRC}:${PORT}/health`);
    const probe = new DowntimeProbe(`http://${SRC}:${PORT}/health`, `http://${DST}:${PORT}/health`);
    probe.start();
    await new Promise((r) => setTimeout(r, 200));
    const started = Date.now();
    const summary = JSON.parse(await runChipmunk(['migrate', name, '--to', 'node2', '--mode', mode, '--json'])) as {
      downtimeMs: number;
      totalMs: number;
      bytesTransferred: number;
    };
    const seen = await probe.stop();
    const verify = (await (await request(`http://${DST}:${PORT}/verify-memory`, { bodyTimeout: 60_000 })).body.json()) as { ok: boolean };
    return {
      sizeMB,
      way: mode,
      downtimeMs: seen.downtimeMs,
      totalMs: Math.max(summary.totalMs, (seen.firstTargetAnswerAt ?? started) - started),
      frozenMs: summary.downtimeMs,
      bytes: summary.bytesTransferred,
      note: verify.ok ? undefined : 'MEMORY CORRUPTED',
    };
  } finally {
    await runChipmunk(['rm', name]).catch(() => undefined);
  }
}

async function podmanWay(sizeMB: number, scratch: string): Promise<Row> {
  const name = `chmk-bench-${sizeMB}`;
  const podman = (args: string[], op: string) => run('podman', args, { env: PODMAN_ENV, op, timeoutMs: 600_000 });
  await runUnchecked('podman', ['rm', '-f', name, `${name}-restored`], { env: PODMAN_ENV });
  // Same CRIU options chipmunk uses (podman 4.3 has no --tcp-skip-in-flight): the polling
  // client always has a connection in the listen backlog, which would fail the dump.
  const criuConf = join(scratch, 'criu.conf');
  await writeFile(criuConf, 'skip-in-flight\ntcp-close\n');
  await podman(
    ['run', '-d', '--name', name, '--network', PODMAN_NET, '--annotation', `org.criu.config=${criuConf}`, '-e', `MEMORY_MB=${sizeMB}`, 'chipmunk/statefulapp'],
    'podman run',
  );
  try {
    const ip = (await podman(['inspect', '-f', '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}', name], 'podman inspect')).stdout.trim();
    if (!ip.startsWith('198.19.250.')) throw new Error(`podman gave the container address ${ip}, outside ${PODMAN_SUBNET}`);
    const url = `http://${ip}:${PORT}/health`;
    await waitForAnswer(url);
    const probe = new AnswerWatch(url);
    probe.start();
    await new Promise((r) => setTimeout(r, 200));
    const archive = join(scratch, `${name}.tar`);
    const copied = join(scratch, 'target', `${name}.tar`);
    await mkdir(join(scratch, 'target'), { recursive: true });
    const started = Date.now();
    await podman(['container', 'checkpoint', '--tcp-established', '--export', archive, name], 'podman container checkpoint');
    const frozenAt = Date.now();
    // "copy the archive": to another directory here, as it would go to another host.
    await run('cp', [archive, copied], { op: 'copy archive' });
    const bytes = (await stat(copied)).size;
    await podman(['container', 'restore', '--import', copied, '--name', `${name}-restored`], 'podman container restore');
    // The restored container may get another address: poll wherever it is now.
    const newIp = (await podman(['inspect', '-f', '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}', `${name}-restored`], 'podman inspect')).stdout.trim();
    const answered = await firstAnswer(`http://${newIp}:${PORT}/health`);
    const lastBefore = probe.lastAnswerBefore(frozenAt);
    await probe.stop();
    const seen = { downtimeMs: lastBefore !== undefined ? answered - lastBefore : undefined };
    return { sizeMB, way: 'podman', downtimeMs: seen.downtimeMs, totalMs: answered - started, bytes };
  } finally {
    await runUnchecked('podman', ['rm', '-f', name, `${name}-restored`], { env: PODMAN_ENV });
  }
}

function table(rows: Row[]): string {
  const lines = [
    '| memory | way | client-seen downtime | total | frozen (agents) | moved |',
    '|---:|---|---:|---:|---:|---:|',
  ];
  for (const r of rows) {
    lines.push(
      `| ${r.sizeMB} MB | ${r.way} | ${r.downtimeMs ?? '?'} ms | ${r.totalMs} ms | ${r.frozenMs !== undefined ? `${r.frozenMs} ms` : '-'} | ${
        r.bytes !== undefined ? `${(r.bytes / 2 ** 20).toFixed(1)} MiB` : '-'
      }${r.note ? ` ${r.note}` : ''} |`,
    );
  }
  for (const size of sizes) {
    const lazy = rows.find((r) => r.sizeMB === size && r.way === 'lazy');
    const pod = rows.find((r) => r.sizeMB === size && r.way === 'podman');
    if (lazy?.downtimeMs !== undefined && pod?.downtimeMs) {
      lines.push('', `${size} MB: lazy downtime is ${((lazy.downtimeMs / pod.downtimeMs) * 100).toFixed(1)}% of the Podman way's.`);
    }
  }
  return lines.join('\n');
}

async function main(): Promise<void> {
  await ensureTestImages();
  const scratch = await mkdtemp(join(tmpdir(), 'chipmunk-bench-'));
  const rows: Row[] = [];
  const usesCluster = ways.some((w) => w !== 'podman');
  try {
    if (usesCluster) {
      await runChipmunk(['cluster', 'down']).catch(() => undefined);
      await runChipmunk(['cluster', 'up', '--nodes', '2']);
    }
    if (ways.includes('podman')) {
      const exists = await runUnchecked('podman', ['network', 'exists', PODMAN_NET], { env: PODMAN_ENV });
      if (exists.code !== 0) await run('podman', ['network', 'create', '--subnet', PODMAN_SUBNET, PODMAN_NET], { env: PODMAN_ENV, op: 'podman network create' });
    }
    for (const size of sizes) {
      for (const way of ways) {
        process.stderr.write(`${size} MB, ${way}... `);
        const row = way === 'podman' ? await podmanWay(size, scratch) : await chipmunkWay(size, way);
        rows.push(row);
        process.stderr.write(`downtime ${row.downtimeMs} ms, total ${row.totalMs} ms\n`);
      }
    }
  } finally {
    if (usesCluster) await runChipmunk(['cluster', 'down']).catch(() => undefined);
    if (ways.includes('podman')) await runUnchecked('podman', ['network', 'rm', '-f', PODMAN_NET], { env: PODMAN_ENV });
    await removeTree(scratch);
  }
  const out = table(rows);
  console.log(out);
  const header = `# bench/migration\n\nMeasured ${new Date().toISOString()} on this machine (${(await run('nproc', [])).stdout.trim()} cores), one run, all ways side by side.\n\n`;
  await mkdir(join(RESULTS, '..'), { recursive: true });
  await writeFile(RESULTS, header + out + '\n');
}

await main();
