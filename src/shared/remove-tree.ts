import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);

/**
 * Deletes a directory tree without crossing into other file systems. A mount left below a
 * work directory (a container's root bind-mounted by a failed restore, a CRIU cgroup yard)
 * would otherwise have its contents deleted too; `fs.rm` has no such guard, so use rm's.
 */
export async function removeTree(path: string): Promise<void> {
  await execFileAsync('rm', ['-rf', '--one-file-system', '--', path]);
}
