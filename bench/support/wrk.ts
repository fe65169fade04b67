/** wrk, the HTTP load generator (Debian package, installed by setup), and its numbers. */
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from '../../src/shared/exec.js';
import { removeTree } from '../../src/shared/remove-tree.js';

export interface LoadRow {
  path: string;
  rps: number;
  p50Ms: number;
  p99Ms: number;
  errors: number;
}

export interface WrkOptions {
  connections: number;
  seconds: number;
  /** POST instead of GET (an empty body). */
  method?: 'GET' | 'POST';
}

/** Loads `url` at fixed concurrency for a fixed time; wrk's requests/s, latency percentiles, and non-2xx/socket errors. */
export async function wrk(name: string, url: string, opts: WrkOptions): Promise<LoadRow> {
  const scriptDir = opts.method === 'POST' ? await mkdtemp(join(tmpdir(), 'chipmunk-wrk-')) : undefined;
  try {
    const script: string[] = [];
    if (scriptDir) {
      await writeFile(join(scriptDir, 'post.lua'), 'wrk.method = "POST"\n');
      script.push('-s', join(scriptDir, 'post.lua'));
    }
    const res = await run('wrk', ['-t', '2', '-c', String(opts.connections), '-d', `${opts.seconds}s`, '--latency', ...script, url], {
      op: 'wrk',
      timeoutMs: (opts.seconds + 30) * 1000,
    });
    const out = res.stdout;
    const ms = (label: string) => {
      const m = new RegExp(`^\\s*${label}\\s+([\\d.]+)(us|ms|s)\\s*$`, 'm').exec(out);
      if (!m) throw new Error(`wrk printed no ${label} latency:\n${out}`);
      return Number(m[1]) * (m[2] === 'us' ? 0.001 : m[2] === 's' ? 1000 : 1);
    };
    const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1]);
    const non2xx = Number(/Non-2xx or 3xx responses:\s+(\d+)/.exec(out)?.[1] ?? 0);
    const socketErrors = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
    const errors = non2xx + (socketErrors ? socketErrors.slice(1).reduce((a, b) => a + Number(b), 0) : 0);
    return { path: name, rps, p50Ms: ms('50%'), p99Ms: ms('99%'), errors };
  } finally {
    if (scriptDir) await removeTree(scriptDir);
  }
}
