/**
 * The plain Podman way to move a container, for comparison (bench/migration): `podman container
 * checkpoint --export`, the archive copied (to another directory here, as it would go to another
 * host), `podman container restore --import`; a client polling the container's address about
 * every millisecond sees the downtime. On this machine's own Podman, in a Podman network of the
 * test range (198.19.250.0/24), not on the runc pair.
 */
import { mkdir, mkdtemp, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AnswerWatch, firstAnswer } from '../../src/devtools/downtime-probe.js';
import { run, runUnchecked } from '../../src/shared/exec.js';
import { removeTree } from '../../src/shared/remove-tree.js';

const PORT = 8080;
const PODMAN_NET = 'chmk-bench';
const PODMAN_SUBNET = '198.19.250.0/24';
const PODMAN_ENV = { ...process.env, CONTAINERS_CONF: '/etc/chipmunk/containers.conf' };

export interface PodmanMove {
  downtimeMs?: number;
  totalMs: number;
  bytes: number;
}

/** `moves` moves of the stateful app holding `sizeMB`, each with a container of its own. */
export async function podmanMoves(sizeMB: number, moves: number): Promise<PodmanMove[]> {
  const scratch = await mkdtemp(join(tmpdir(), 'chipmunk-bench-podman-'));
  const exists = await runUnchecked('podman', ['network', 'exists', PODMAN_NET], { env: PODMAN_ENV });
  if (exists.code !== 0) await run('podman', ['network', 'create', '--subnet', PODMAN_SUBNET, PODMAN_NET], { env: PODMAN_ENV, op: 'podman network create' });
  try {
    const results: PodmanMove[] = [];
    for (let i = 0; i < moves; i++) {
      results.push(await podmanMove(sizeMB, scratch));
      process.stderr.write(`  ${sizeMB} MB podman move ${i + 1}/${moves}: downtime ${results.at(-1)!.downtimeMs ?? '?'} ms\n`);
    }
    return results;
  } finally {
    await runUnchecked('podman', ['network', 'rm', '-f', PODMAN_NET], { env: PODMAN_ENV });
    await removeTree(scratch);
  }
}

async function podmanMove(sizeMB: number, scratch: string): Promise<PodmanMove> {
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
    await firstAnswer(url, 300_000);
    const probe = new AnswerWatch(url);
    probe.start();
    await new Promise((r) => setTimeout(r, 200));
    const archive = join(scratch, `${name}.tar`);
    const copied = join(scratch, 'target', `${name}.tar`);
    await mkdir(join(scratch, 'target'), { recursive: true });
    const started = Date.now();
    await podman(['container', 'checkpoint', '--tcp-established', '--export', archive, name], 'podman container checkpoint');
    const frozenAt = Date.now();
    await run('cp', [archive, copied], { op: 'copy archive' });
    const bytes = (await stat(copied)).size;
    await podman(['container', 'restore', '--import', copied, '--name', `${name}-restored`], 'podman container restore');
    // The restored container may get another address: poll wherever it is now.
    const newIp = (await podman(['inspect', '-f', '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}', `${name}-restored`], 'podman inspect')).stdout.trim();
    const answered = await firstAnswer(`http://${newIp}:${PORT}/health`);
    const lastBefore = probe.lastAnswerBefore(frozenAt);
    await probe.stop();
    return { downtimeMs: lastBefore !== undefined ? answered - lastBefore : undefined, totalMs: answered - started, bytes };
  } finally {
    await runUnchecked('podman', ['rm', '-f', name, `${name}-restored`], { env: PODMAN_ENV });
  }
}
