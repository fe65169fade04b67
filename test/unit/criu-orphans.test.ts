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
async function orphanNaming(imagesDir: string): Promise<{ pid: number; childPid: number; alive(pid?: number): boolean; kill(): void }> {
  // Its own child (as `criu swrk` is runc's) names no directory.
  const script = "const c = require('child_process').spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { stdio: 'ignore' }); console.log(c.pid); setInterval(() => {}, 1000)";
  const shell = spawn('sh', ['-c', `"$0" -e "$2" -- --image-path "$1" --work-path "$1-work" 2>/dev/null & echo $!`, process.execPath, imagesDir, script], { stdio: ['ignore', 'pipe', 'ignore'] });
  const lines: string[] = [];
  shell.stdout!.on('data', (chunk: Buffer) => lines.push(...chunk.toString().split('\n').filter(Boolean)));
  await once(shell, 'exit');
  while (lines.length < 2) await new Promise((resolve) => setTimeout(resolve, 20));
  const [pid, childPid] = lines.map(Number) as [number, number];
  const alive = (which = pid): boolean => {
    try {
      process.kill(which, 0);
      return !/^\S+ \([^)]*\) Z/.test(readFileSync(`/proc/${which}/stat`, 'utf8'));
    } catch {
      return false;
    }
  };
  return {
    pid,
    childPid,
    alive,
    kill: () => {
      for (const p of [childPid, pid]) if (alive(p)) process.kill(p, 'SIGKILL');
    },
  };
}

describe('killOrphanedCriuProcesses', () => {
  it("kills the orphaned processes naming the migration's images directory, with what runs below them, and no other", async () => {
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
      assert.equal(orphan.alive(orphan.childPid), false, 'what runs below it (criu swrk under runc) goes too');
      assert.equal(other.alive(other.childPid), true);
    } finally {
      for (const child of [orphan, other, longer]) child.kill();
      own.kill('SIGKILL');
    }
  });
});
