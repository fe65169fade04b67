/**
 * The Redis case of bench/downtime (issue 11's aim: 420 MB of data, 400,000 keys of 1 KB): Debian's
 * redis-server in the compatibility suite's image, its data in memory only (no append-only file,
 * no snapshots: what moves is the process's memory, as with the stateful app), filled by SETs
 * pipelined on one connection.
 */
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

export const REDIS_PORT = 6379;
export const REDIS_COMMAND = ['/usr/bin/redis-server', '--bind', '0.0.0.0', '--port', String(REDIS_PORT), '--protected-mode', 'no', '--appendonly', 'no', '--save', ''];
const BATCH = 1_000;

/** Resolves once Redis at `host` answers PING; throws after `timeoutMs`. */
export async function redisReady(host: string, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const socket = connect({ host, port: REDIS_PORT }, () => socket.write('PING\r\n'));
      socket.setTimeout(1_000, () => socket.destroy());
      socket.once('data', (d) => {
        resolve(d.toString().startsWith('+PONG'));
        socket.destroy();
      });
      socket.once('error', () => resolve(false));
      socket.once('close', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`Redis at ${host}:${REDIS_PORT} did not answer PING within ${timeoutMs} ms`);
    await sleep(100);
  }
}

/** SETs keys `key:0` .. `key:N-1`, each `valueBytes` of data, a batch at a time; resolves when all are acknowledged. */
export async function fillRedis(host: string, keys: number, valueBytes: number): Promise<void> {
  const socket = connect({ host, port: REDIS_PORT });
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  let pending = '';
  let acknowledged = 0;
  let waiter: (() => void) | undefined;
  let failure: Error | undefined;
  socket.on('data', (d: Buffer) => {
    pending += d.toString('latin1');
    for (let i = pending.indexOf('\r\n'); i >= 0; i = pending.indexOf('\r\n')) {
      const line = pending.slice(0, i);
      pending = pending.slice(i + 2);
      if (line === '+OK') acknowledged++;
      else failure ??= new Error(`Redis answered a SET with: ${line}`);
    }
    waiter?.();
  });
  socket.once('error', (err) => {
    failure ??= err;
    waiter?.();
  });
  const value = 'v'.repeat(valueBytes);
  try {
    for (let sent = 0; sent < keys; ) {
      const commands: string[] = [];
      for (const end = Math.min(keys, sent + BATCH); sent < end; sent++) {
        const key = `key:${sent}`;
        commands.push(`*3\r\n$3\r\nSET\r\n$${key.length}\r\n${key}\r\n$${valueBytes}\r\n${value}\r\n`);
      }
      socket.write(commands.join(''));
      while (acknowledged < sent && !failure) await new Promise<void>((resolve) => (waiter = resolve));
      if (failure) throw failure;
    }
  } finally {
    socket.destroy();
  }
}
