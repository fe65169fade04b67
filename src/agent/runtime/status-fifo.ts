/**
 * The FIFO whose write end a lazy `runc checkpoint` gets as --status-fd (criu.ts): CRIU writes one
 * byte to it when its page server is ready.
 */
import { closeSync, constants, openSync } from 'node:fs';
import { Socket } from 'node:net';
import { runUnchecked } from '../../shared/exec.js';

/**
 * runc wants a writable file descriptor for --status-fd, and the stdio "pipes" node creates are
 * socket pairs runc rejects: so a FIFO, opened for reading first (non-blocking) so that opening
 * its write end does not block.
 */
export interface StatusFifo {
  writeFd: number;
  readable: NodeJS.ReadableStream & { destroy(): void };
  closeWriteEnd(): void;
}

export async function openStatusFifo(path: string): Promise<StatusFifo> {
  await runUnchecked('rm', ['-f', path]);
  await runUnchecked('mkfifo', ['-m', '600', path]);
  const readFd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  const writeFd = openSync(path, constants.O_WRONLY);
  // A libuv pipe handle, not an fs stream: fs streams fail with EAGAIN on a non-blocking FIFO.
  const readable = new Socket({ fd: readFd, readable: true, writable: false });
  let writeOpen = true;
  const closeWriteEnd = () => {
    if (writeOpen) closeSync(writeFd);
    writeOpen = false;
  };
  return { writeFd, readable, closeWriteEnd };
}
