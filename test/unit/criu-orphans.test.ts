/**
 * killOrphanedCriuProcesses: a migration's CRIU processes a dead agent process left are found by
 * the migration's images directory among their arguments, and killed; others are left alone.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { killOrphanedCriuProcesses } from '../../src/agent/runtime/criu.js';

/**
 * A long-running process whose arguments name `imagesDir`, as `runc checkpoint --image-path DIR`
 * does, orphaned as a dead agent's are (its parent, a shell, exits at once); `pid` is its own.
 */
async function orphanNaming(imagesDir: string): Promise<{ pid: number; alive(): boolean; kill(): void }> {
  const shell = spawn('sh', ['-c', `"$0" -e 'setInterval(() => {}, 1000)' -- --image-path "$1" --work-path "$1-work" >/dev/null 2>&1 & echo $!`, process.execPath, imagesDir], { stdio: ['ignore', 'pipe', 'ignore'] });
  let out = '';
  shell.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()));
  await once(shell, 'exit');
  const pid = Number(out.trim());
  const alive = (): boolean => {
    try {
      process.kill(pid, 0);
      return !/^\S+ \([^)]*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
    } catch {
      return false;
    }
  };
  return { pid, alive, kill: () => alive() && process.kill(pid, 'SIGKILL') };
}

describe('killOrphanedCriuProcesses', () => {
  it("kills the orphaned processes naming the migration's images directory, and no other", async () => {
    const orphan = await orphanNaming('/var/lib/chipmunk-test/migrations/m-1/images');
    const other = await orphanNaming('/var/lib/chipmunk-test/migrations/m-2/images');
    // A path that only starts like it is another migration's.
    const longer = await orphanNaming('/var/lib/chipmunk-test/migrations/m-1/images-old');
    // This process's own child, naming the same directory: its to end, not an orphan.
    const own: ChildProcess = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)', '--', '--image-path', '/var/lib/chipmunk-test/migrations/m-1/images'], { stdio: 'ignore' });
    try {
      await new Promise((resolve) => setTimeout(resolve, 300));
      const killed = await killOrphanedCriuProcesses('/var/lib/chipmunk-test/migrations/m-1/images');
      assert.deepEqual(killed, [orphan.pid]);
      await new Promise((resolve) => setTimeout(resolve, 200));
      assert.deepEqual([orphan.alive(), other.alive(), longer.alive(), own.exitCode === null], [false, true, true, true]);
    } finally {
      for (const child of [orphan, other, longer]) child.kill();
      own.kill('SIGKILL');
    }
  });
});
