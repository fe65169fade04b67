// statefulapp: a small HTTP server whose state lives in its process (a counter, a block of
// memory with a verifiable pattern) and on disk (a log file), so a migration can be checked
// for losing any of it. Standard library only: it runs from a bare image with just node.
import { createHash } from 'node:crypto';
import { appendFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { hostname } from 'node:os';
import { join } from 'node:path';

const HOST = process.env.HOST || '0.0.0.0';
const PORT = Number(process.env.PORT ?? 8080);
const MEMORY_MB = Number(process.env.MEMORY_MB ?? 0);
const DATA_DIR = process.env.DATA_DIR || '/data';
const LOG_FILE = join(DATA_DIR, 'log.txt');

const MB = 1024 * 1024;
// A prime length, so the repeated block lands at a different offset on every page and no
// two pages of a buffer are identical.
const PATTERN_BLOCK_BYTES = 4093;

/** Pseudo-random bytes, never zero (every page must really be written), from (index, generation). */
function patternBlock(index, generation) {
  const block = Buffer.allocUnsafe(PATTERN_BLOCK_BYTES);
  let x = (Math.imul(index + 1, 0x9e3779b1) ^ Math.imul(generation + 1, 0x85ebca6b)) >>> 0 || 1;
  for (let i = 0; i < block.length; i++) {
    // xorshift32
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    block[i] = (x & 0xff) | 1;
  }
  return block;
}

function matchesPattern(buffer, block) {
  for (let offset = 0; offset < buffer.length; offset += block.length) {
    const end = Math.min(offset + block.length, buffer.length);
    if (buffer.compare(block, 0, end - offset, offset, end) !== 0) return false;
  }
  return true;
}

function memoryChecksum() {
  const hash = createHash('sha256');
  for (const buffer of memory) hash.update(buffer);
  return hash.digest('hex');
}

const memory = [];
const generations = [];
for (let i = 0; i < MEMORY_MB; i++) {
  memory.push(Buffer.allocUnsafeSlow(MB).fill(patternBlock(i, 0)));
  generations.push(0);
}
let checksum = memoryChecksum();
// Where the next /touch starts, so repeated touches walk over all of the memory.
let touchCursor = 0;

let counter = 0;
const startedAt = new Date().toISOString();
mkdirSync(DATA_DIR, { recursive: true });

function logLineCount() {
  try {
    return readFileSync(LOG_FILE, 'utf8').split('\n').filter((line) => line !== '').length;
  } catch (err) {
    if (err.code === 'ENOENT') return 0;
    throw err;
  }
}

/** ?name=: a plain file name in DATA_DIR (no slashes), or a 400 answer. */
function fileName(url, res) {
  const name = url.searchParams.get('name') ?? '';
  if (!/^[A-Za-z0-9._-]{1,64}$/.test(name) || name.startsWith('.')) {
    sendJSON(res, 400, { error: 'name must be a plain file name' });
    return undefined;
  }
  return name;
}

function sendJSON(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

const routes = {
  'GET /': (_url, res) =>
    sendJSON(res, 200, { counter, pid: process.pid, startedAt, memoryMB: MEMORY_MB, hostname: hostname() }),

  'POST /increment': (_url, res) => {
    counter += 1;
    appendFileSync(LOG_FILE, `${new Date().toISOString()} pid=${process.pid} counter=${counter}\n`);
    sendJSON(res, 200, { counter });
  },

  'GET /file': (_url, res) => sendJSON(res, 200, { lines: logLineCount() }),

  // Named files in DATA_DIR, for file-version tests: POST writes (or replaces) one, DELETE removes it.
  'POST /files': (url, res) => {
    const name = fileName(url, res);
    if (!name) return;
    writeFileSync(join(DATA_DIR, name), `${url.searchParams.get('content') ?? ''}\n`);
    sendJSON(res, 200, { written: name });
  },

  'DELETE /files': (url, res) => {
    const name = fileName(url, res);
    if (!name) return;
    rmSync(join(DATA_DIR, name), { force: true });
    sendJSON(res, 200, { removed: name });
  },

  'GET /verify-memory': (_url, res) => {
    const patternOk = memory.every((buffer, i) => matchesPattern(buffer, patternBlock(i, generations[i])));
    const currentChecksum = memoryChecksum();
    sendJSON(res, 200, { ok: patternOk && currentChecksum === checksum, memoryMB: MEMORY_MB, checksum: currentChecksum });
  },

  'POST /touch': (url, res) => {
    const percent = Number(url.searchParams.get('percent'));
    if (!url.searchParams.has('percent') || !Number.isFinite(percent) || percent < 0 || percent > 100) {
      sendJSON(res, 400, { error: 'percent must be a number from 0 to 100' });
      return;
    }
    const count = Math.round((memory.length * percent) / 100);
    for (let n = 0; n < count; n++) {
      const i = (touchCursor + n) % memory.length;
      generations[i] += 1;
      memory[i].fill(patternBlock(i, generations[i]));
    }
    if (memory.length > 0) touchCursor = (touchCursor + count) % memory.length;
    checksum = memoryChecksum();
    sendJSON(res, 200, { touchedMB: count, memoryMB: MEMORY_MB });
  },

  'GET /health': (_url, res) => {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok');
  },
};

const server = createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://statefulapp');
  const route = routes[`${req.method} ${url.pathname}`];
  if (!route) {
    sendJSON(res, 404, { error: `no route ${req.method} ${url.pathname}` });
    return;
  }
  try {
    route(url, res);
  } catch (err) {
    process.stderr.write(`statefulapp: ${req.method} ${url.pathname} failed: ${err.stack ?? err}\n`);
    sendJSON(res, 500, { error: String(err.message ?? err) });
  }
});

server.listen(PORT, HOST, () => {
  const { address, port } = server.address();
  process.stdout.write(`statefulapp listening on ${address}:${port} (pid ${process.pid}, memory ${MEMORY_MB} MB)\n`);
});

// As PID 1 of a container, node gets no default signal handling: without this, SIGTERM
// would be ignored and `stop` would wait for its SIGKILL timeout.
process.on('SIGTERM', () => process.exit(0));
