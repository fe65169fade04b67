/**
 * The compatibility suite's programs (src/devtools/compat-images.ts) as their users see them:
 * how to wait until one answers, how to write to it, and how to check with its *own* client
 * (redis-cli, psql, curl) that every acknowledged write is there. Shared by the runc-pair tests
 * (test/integration/runtime-compat-programs.test.ts) and bench/compat on the local cluster.
 *
 * A write is key i (1, 2, ...) with value `v-i`: writers write in order and retry a write that
 * got no acknowledgement, so the acknowledged keys are always 1..n and a check names what is
 * missing. Every write is idempotent (SET, PUT, an upsert), so a retried one is harmless.
 * memcached has no client of its own in Debian: its check speaks the text protocol here.
 *
 * Traffic goes to test hosts (198.18.0.0/15) or the local gateway (127.0.0.1) only.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, request } from 'undici';
import { COMPAT_PORTS, NGINX_FILE } from '../../src/devtools/compat-images.js';
import type { TestImageName } from '../../src/devtools/images.js';

export interface Endpoint {
  host: string;
  port: number;
}

/** One open client connection that writes keys; `write` rejects on any failure (then close it). */
export interface KeyWriter {
  write(i: number): Promise<void>;
  close(): void;
}

export interface CheckResult {
  /** Keys of 1..n that are absent or hold another value. */
  missing: number[];
}

export interface CompatProgram {
  name: 'redis' | 'postgres' | 'nginx' | 'memcached' | 'python' | 'sqlite' | 'sqlite-delete';
  image: TestImageName;
  /** Run instead of the image's CMD; empty: the image's CMD. */
  command: string[];
  containerPort: number;
  protocol: 'http' | 'tcp';
  /** Resolves once the program answers a request of its own protocol. */
  ping(ep: Endpoint): Promise<void>;
  openWriter(ep: Endpoint): Promise<KeyWriter>;
  /** Reads keys 1..n back with the program's own client. */
  check(ep: Endpoint, n: number): Promise<CheckResult>;
}

const WRITE_TIMEOUT_MS = 5_000;
const CHUNK = 400;
const value = (i: number) => `v-${i}`;

function assertAllowed(ep: Endpoint): void {
  if (!/^(127\.0\.0\.1|198\.1[89]\.\d{1,3}\.\d{1,3})$/.test(ep.host)) throw new Error(`refusing to send traffic to ${ep.host}: only test hosts (198.18.0.0/15) and the local gateway`);
}

function chunks(n: number): number[][] {
  const out: number[][] = [];
  for (let start = 1; start <= n; start += CHUNK) out.push(Array.from({ length: Math.min(CHUNK, n - start + 1) }, (_, j) => start + j));
  return out;
}

/** Runs a client program to its end; rejects when it fails or outlives TIMEOUTMS. */
function runClient(command: string, args: string[], opts: { env?: Record<string, string>; input?: string; timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env: { ...process.env, ...opts.env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 30_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(stdout);
      else reject(new Error(`${command} ${args.slice(0, 6).join(' ')}... exited ${code ?? signal}: ${stderr.trim().slice(0, 400)}`));
    });
    // A client that exits at once (nothing listens yet) closes its stdin: its exit code says why.
    child.stdin.on('error', () => undefined);
    child.stdin.end(opts.input ?? '');
  });
}

/**
 * A TCP connection for line-answered protocols (Redis inline commands, memcached text): sends a
 * request, resolves with the reply once `complete` says it is whole.
 */
async function lineConnection(ep: Endpoint): Promise<{ ask(req: string, complete: (reply: string) => boolean): Promise<string>; close(): void }> {
  assertAllowed(ep);
  const socket: Socket = await new Promise((resolve, reject) => {
    const s = connect({ host: ep.host, port: ep.port });
    const timer = setTimeout(() => s.destroy(new Error(`connect ${ep.host}:${ep.port}: timed out`)), WRITE_TIMEOUT_MS);
    s.once('connect', () => (clearTimeout(timer), resolve(s)));
    s.once('error', (err) => (clearTimeout(timer), reject(err)));
  });
  socket.setEncoding('latin1');
  let buffer = '';
  let waiting: { complete: (r: string) => boolean; resolve: (r: string) => void; reject: (e: Error) => void } | undefined;
  const fail = (err: Error) => {
    waiting?.reject(err);
    waiting = undefined;
  };
  socket.on('data', (d: string) => {
    buffer += d;
    if (waiting?.complete(buffer)) {
      const reply = buffer;
      buffer = '';
      const w = waiting;
      waiting = undefined;
      w.resolve(reply);
    }
  });
  socket.on('error', fail);
  socket.on('close', () => fail(new Error('connection closed')));
  return {
    ask(req, complete) {
      if (socket.destroyed) return Promise.reject(new Error('connection closed'));
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => fail(new Error(`no answer within ${WRITE_TIMEOUT_MS} ms`)), WRITE_TIMEOUT_MS);
        waiting = { complete, resolve: (r) => (clearTimeout(timer), resolve(r)), reject: (e) => (clearTimeout(timer), reject(e)) };
        socket.write(req, 'latin1');
      });
    },
    close: () => socket.destroy(),
  };
}

const endsWithLine = (r: string) => r.endsWith('\r\n');

const redis: CompatProgram = {
  name: 'redis',
  image: 'chipmunk/redis',
  command: [],
  containerPort: COMPAT_PORTS['chipmunk/redis'],
  protocol: 'tcp',
  async ping(ep) {
    assertAllowed(ep);
    const out = await runClient('redis-cli', ['-h', ep.host, '-p', String(ep.port), 'PING'], { timeoutMs: 5_000 });
    if (out.trim() !== 'PONG') throw new Error(`redis-cli PING: ${out.trim()}`);
  },
  async openWriter(ep) {
    const conn = await lineConnection(ep);
    return {
      async write(i) {
        const reply = await conn.ask(`SET k:${i} ${value(i)}\r\n`, endsWithLine);
        if (reply !== '+OK\r\n') throw new Error(`SET k:${i}: ${reply.trim()}`);
      },
      close: conn.close,
    };
  },
  async check(ep, n) {
    assertAllowed(ep);
    const missing: number[] = [];
    for (const keys of chunks(n)) {
      const out = await runClient('redis-cli', ['-h', ep.host, '-p', String(ep.port), '--raw', 'MGET', ...keys.map((i) => `k:${i}`)]);
      const values = out.split('\n');
      keys.forEach((i, j) => values[j] !== value(i) && missing.push(i));
    }
    return { missing };
  },
};

const memcached: CompatProgram = {
  name: 'memcached',
  image: 'chipmunk/memcached',
  command: [],
  containerPort: COMPAT_PORTS['chipmunk/memcached'],
  protocol: 'tcp',
  async ping(ep) {
    const conn = await lineConnection(ep);
    try {
      const reply = await conn.ask('version\r\n', endsWithLine);
      if (!reply.startsWith('VERSION ')) throw new Error(`memcached version: ${reply.trim()}`);
    } finally {
      conn.close();
    }
  },
  async openWriter(ep) {
    const conn = await lineConnection(ep);
    return {
      async write(i) {
        const v = value(i);
        const reply = await conn.ask(`set k:${i} 0 0 ${v.length}\r\n${v}\r\n`, endsWithLine);
        if (reply !== 'STORED\r\n') throw new Error(`set k:${i}: ${reply.trim()}`);
      },
      close: conn.close,
    };
  },
  async check(ep, n) {
    const conn = await lineConnection(ep);
    const missing: number[] = [];
    try {
      for (const keys of chunks(n)) {
        const reply = await conn.ask(`get ${keys.map((i) => `k:${i}`).join(' ')}\r\n`, (r) => r.endsWith('END\r\n'));
        const got = new Map([...reply.matchAll(/^VALUE (\S+) \d+ \d+\r\n(.*)\r\n/gm)].map((m) => [m[1]!, m[2]!]));
        for (const i of keys) if (got.get(`k:${i}`) !== value(i)) missing.push(i);
      }
    } finally {
      conn.close();
    }
    return { missing };
  },
};

const nginx: CompatProgram = {
  name: 'nginx',
  image: 'chipmunk/nginx',
  command: [],
  containerPort: COMPAT_PORTS['chipmunk/nginx'],
  protocol: 'http',
  async ping(ep) {
    assertAllowed(ep);
    const body = await runClient('curl', ['-sS', '--fail', '--max-time', '5', `http://${ep.host}:${ep.port}${NGINX_FILE.path}`]);
    if (body !== NGINX_FILE.content) throw new Error(`curl ${NGINX_FILE.path}: ${body.length} bytes, not the ${NGINX_FILE.content.length} of the file`);
  },
  async openWriter(ep) {
    assertAllowed(ep);
    // Its own keep-alive pool: a connection must not outlive the writer (another test host may take the address).
    const dispatcher = new Agent({ connections: 1 });
    return {
      async write(i) {
        const res = await request(`http://${ep.host}:${ep.port}/dav/k-${i}`, { method: 'PUT', body: value(i), dispatcher, headersTimeout: WRITE_TIMEOUT_MS, bodyTimeout: WRITE_TIMEOUT_MS });
        const text = await res.body.text();
        if (res.statusCode !== 201 && res.statusCode !== 204) throw new Error(`PUT /dav/k-${i}: HTTP ${res.statusCode} ${text.slice(0, 200)}`);
      },
      close() {
        void dispatcher.destroy();
      },
    };
  },
  async check(ep, n) {
    assertAllowed(ep);
    if (n === 0) return { missing: [] };
    const missing: number[] = [];
    for (const keys of chunks(n)) {
      // One curl for many files (URL globbing); each answer on its own line: BODY STATUS.
      const out = await runClient('curl', ['-sS', '--max-time', '60', '-w', ' %{http_code}\\n', `http://${ep.host}:${ep.port}/dav/k-[${keys[0]}-${keys.at(-1)}]`]);
      const lines = out.split('\n');
      keys.forEach((i, j) => lines[j] !== `${value(i)} 200` && missing.push(i));
    }
    return { missing };
  },
};

const PSQL_ENV = { PGCONNECT_TIMEOUT: '5', PGUSER: 'postgres', PGDATABASE: 'postgres' };
const psqlArgs = (ep: Endpoint) => ['-h', ep.host, '-p', String(ep.port), '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1'];

const postgres: CompatProgram = {
  name: 'postgres',
  image: 'chipmunk/postgres',
  command: [],
  containerPort: COMPAT_PORTS['chipmunk/postgres'],
  protocol: 'tcp',
  async ping(ep) {
    assertAllowed(ep);
    await runClient('psql', [...psqlArgs(ep), '-c', 'CREATE TABLE IF NOT EXISTS kv (id int PRIMARY KEY, v text NOT NULL)'], { env: PSQL_ENV, timeoutMs: 10_000 });
  },
  async openWriter(ep) {
    assertAllowed(ep);
    // One psql session fed statement by statement: each acknowledged insert prints its id.
    const child: ChildProcessWithoutNullStreams = spawn('psql', psqlArgs(ep), { env: { ...process.env, ...PSQL_ENV } });
    let out = '';
    let err = '';
    let waiting: { i: number; resolve: () => void; reject: (e: Error) => void } | undefined;
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      const lines = out.split('\n');
      out = lines.pop()!;
      if (waiting && lines.includes(String(waiting.i))) {
        const w = waiting;
        waiting = undefined;
        w.resolve();
      }
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    child.stdin.on('error', () => undefined); // psql gone: 'close' rejects the write
    child.on('close', (code) => waiting?.reject(new Error(`psql exited ${code}: ${err.trim().slice(0, 300)}`)));
    child.on('error', (e) => waiting?.reject(e));
    return {
      write(i) {
        if (child.exitCode !== null) return Promise.reject(new Error(`psql exited ${child.exitCode}: ${err.trim().slice(0, 300)}`));
        return new Promise((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`insert ${i}: no answer within ${WRITE_TIMEOUT_MS} ms`)), WRITE_TIMEOUT_MS);
          waiting = { i, resolve: () => (clearTimeout(timer), resolve()), reject: (e) => (clearTimeout(timer), reject(e)) };
          child.stdin.write(`INSERT INTO kv VALUES (${i}, '${value(i)}') ON CONFLICT (id) DO UPDATE SET v = excluded.v RETURNING id;\n`);
        });
      },
      close() {
        child.kill('SIGKILL');
      },
    };
  },
  async check(ep, n) {
    assertAllowed(ep);
    const sql = `SELECT coalesce(string_agg(g::text, ','), '') FROM generate_series(1, ${n}) g LEFT JOIN kv ON kv.id = g AND kv.v = 'v-' || g WHERE kv.id IS NULL`;
    const out = (await runClient('psql', [...psqlArgs(ep), '-c', sql], { env: PSQL_ENV })).trim();
    return { missing: out ? out.split(',').map(Number) : [] };
  },
};

/** src/devtools/python/kv-server.py, run with `python3 -c` (the python image stays as other tests know it). */
const KV_SERVER = readFileSync(new URL('../../src/devtools/python/kv-server.py', import.meta.url), 'utf8');
const KV_PORT = 8080;
/** Keys per `GET /range`: one answer of at most ~100 KB. */
const KV_RANGE = 5_000;

/**
 * A key-value service on Python's http.server (one thread, one keep-alive connection at a time),
 * keeping its keys in memory or, for the SQLite writer, as rows of an SQLite database in the
 * container's writable layer (WAL or DELETE journal mode). Written with HTTP PUTs (each answered once stored, SQLite:
 * committed); checked with curl, the rows read back by SQLite's own SELECT.
 */
function kvProgram(name: 'python' | 'sqlite' | 'sqlite-delete', store: 'memory' | 'wal' | 'delete'): CompatProgram {
  const base = (ep: Endpoint) => `http://${ep.host}:${ep.port}`;
  return {
    name,
    image: 'chipmunk/python',
    command: ['/usr/bin/python3', '-c', KV_SERVER, String(KV_PORT), store],
    containerPort: KV_PORT,
    protocol: 'http',
    async ping(ep) {
      assertAllowed(ep);
      const body = await runClient('curl', ['-sS', '--fail', '--max-time', '5', `${base(ep)}/ping`]);
      if (body !== 'ok') throw new Error(`curl /ping: ${body.slice(0, 200)}`);
    },
    async openWriter(ep) {
      assertAllowed(ep);
      const dispatcher = new Agent({ connections: 1 });
      return {
        async write(i) {
          const res = await request(`${base(ep)}/k/${i}`, { method: 'PUT', body: value(i), dispatcher, headersTimeout: WRITE_TIMEOUT_MS, bodyTimeout: WRITE_TIMEOUT_MS });
          const text = await res.body.text();
          if (res.statusCode !== 204) throw new Error(`PUT /k/${i}: HTTP ${res.statusCode} ${text.slice(0, 200)}`);
        },
        close() {
          void dispatcher.destroy();
        },
      };
    },
    async check(ep, n) {
      assertAllowed(ep);
      const missing: number[] = [];
      for (let first = 1; first <= n; first += KV_RANGE) {
        const last = Math.min(n, first + KV_RANGE - 1);
        const out = await runClient('curl', ['-sS', '--fail', '--max-time', '60', `${base(ep)}/range?from=${first}&to=${last}`]);
        const got = new Map(out.split('\n').filter(Boolean).map((line) => line.split(' ') as [string, string]));
        for (let i = first; i <= last; i++) if (got.get(String(i)) !== value(i)) missing.push(i);
      }
      return { missing };
    },
  };
}

export const COMPAT_PROGRAMS: Record<CompatProgram['name'], CompatProgram> = {
  redis,
  postgres,
  nginx,
  memcached,
  python: kvProgram('python', 'memory'),
  sqlite: kvProgram('sqlite', 'wal'),
  /** Needs image writable layers (`agent --writable-layer image`): on a copied directory layer every write after a move fails (SQLITE_READONLY_DBMOVED). */
  'sqlite-delete': kvProgram('sqlite-delete', 'delete'),
};

/** Waits (bounded) until the program answers at EP. */
export async function waitUntilServing(program: CompatProgram, ep: Endpoint, timeoutMs = 30_000): Promise<number> {
  const started = Date.now();
  for (;;) {
    try {
      await program.ping(ep);
      return Date.now() - started;
    } catch (err) {
      if (Date.now() - started > timeoutMs) throw new Error(`${program.name} at ${ep.host}:${ep.port} did not answer within ${timeoutMs} ms: ${(err as Error).message}`);
      await sleep(100);
    }
  }
}

/** Writes keys FROM..TO on one connection; any failure throws (for tests, where nothing moves meanwhile). */
export async function writeKeys(program: CompatProgram, ep: Endpoint, from: number, to: number): Promise<void> {
  const writer = await program.openWriter(ep);
  try {
    for (let i = from; i <= to; i++) await writer.write(i);
  } finally {
    writer.close();
  }
}

export interface NonstopStats {
  /** Keys 1..acked are acknowledged. */
  acked: number;
  /** Connections opened again after a failure (TCP connections do not survive a move). */
  reconnects: number;
  /** Writes that failed and were retried. */
  retries: number;
  /** The longest time one key took from its first attempt to its acknowledgement. */
  maxWriteMs: number;
  errors: string[];
}

/**
 * A client writing nonstop from key FROM on, until stopped or for at most MAXMS (load is
 * bounded): on a failure it opens a new connection, to where ENDPOINT says the program is now
 * (the gateway's address never changes; a test host's does with a move), and writes the same
 * key again.
 */
export function nonstopWriter(program: CompatProgram, endpoint: () => Endpoint, from: number, maxMs: number) {
  const stats: NonstopStats = { acked: from - 1, reconnects: 0, retries: 0, maxWriteMs: 0, errors: [] };
  let stop = false;
  const deadline = setTimeout(() => (stop = true), maxMs);
  const loop = (async () => {
    let writer: KeyWriter | undefined;
    let i = from;
    let firstTry = Date.now();
    while (!stop) {
      try {
        if (!writer) writer = await program.openWriter(endpoint());
        await writer.write(i);
        stats.acked = i;
        stats.maxWriteMs = Math.max(stats.maxWriteMs, Date.now() - firstTry);
        i++;
        firstTry = Date.now();
      } catch (err) {
        stats.retries++;
        if (stats.errors.length < 20) stats.errors.push(`key ${i}: ${(err as Error).message}`);
        if (writer) {
          writer.close();
          writer = undefined;
          stats.reconnects++;
        }
        // Nothing listens while the route is being set up or held: do not spin.
        await sleep(100);
      }
    }
    writer?.close();
  })();
  return {
    stats,
    async stop(): Promise<NonstopStats> {
      stop = true;
      clearTimeout(deadline);
      await loop;
      return stats;
    },
  };
}

/** "1-3, 7": a short account of missing keys for reports. */
export function describeKeys(keys: number[]): string {
  const ranges: string[] = [];
  for (let j = 0; j < keys.length; ) {
    let k = j;
    while (k + 1 < keys.length && keys[k + 1] === keys[k]! + 1) k++;
    ranges.push(k === j ? String(keys[j]) : `${keys[j]}-${keys[k]}`);
    j = k + 1;
  }
  return ranges.length > 8 ? `${ranges.slice(0, 8).join(', ')}, ... (${keys.length} keys)` : ranges.join(', ');
}
