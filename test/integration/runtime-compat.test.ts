// Real programs on the real runtime (runc + CRIU on two test hosts, test/support/runc-pair.ts),
// checked by their own clients: an SQLite writer (sqlite3 in the container reads and writes
// after each move), a server running as a non-root user (its memory and user after a
// checkpoint and moves) and Python's http.server (answers within 2 s of start, on its new
// address after a move). Image chipmunk/python (src/devtools/images.ts): Debian's python3 and sqlite3.
// Needs root and `npm run setup`. Run with its own network so other pair users can run at once:
//   CHIPMUNK_RUNC_PAIR_NET=3 node --import tsx --test test/integration/runtime-compat.test.ts
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { request } from 'node:http';
import { before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ensureImage } from '../../src/devtools/images.js';
import type { WritableLayerKind } from '../../src/agent/runtime/rootfs.js';
import type { ChipmunkError } from '../../src/shared/errors.js';
import type { AgentContainer, ContainerSpec, MigrationMode } from '../../src/shared/protocol.js';
import type { RuntimePair } from '../contract/runtime.contract.js';
import { execIn, mustExecIn } from '../support/in-container.js';
import { RUNC_PAIR_NODES, makeRuncPair, prepareRuncPairs } from '../support/runc-pair.js';

const IMAGE = 'chipmunk/python';
const HTTP_PORT = 8080;
const HOST_PORT = 18080;
const timeout = 4 * 60_000;

before(async () => {
  await ensureImage(IMAGE);
  await prepareRuncPairs();
});

async function withPair(fn: (pair: RuntimePair) => Promise<void>, opts: { writableLayer?: WritableLayerKind; userNamespace?: boolean } = {}): Promise<void> {
  const pair = await makeRuncPair(opts);
  try {
    await fn(pair);
  } finally {
    await pair.cleanup();
  }
}

function spec(name: string, command: string[]): ContainerSpec {
  return { name, image: IMAGE, command, env: {}, ports: [{ hostPort: HOST_PORT, containerPort: HTTP_PORT, protocol: 'tcp' }], memoryBytes: 0 };
}

/** A move of `c` from the pair's source to its target, the way the controller drives one. */
async function move(pair: RuntimePair, c: AgentContainer, mode: MigrationMode): Promise<AgentContainer> {
  const id = `mig-${mode}-${randomBytes(3).toString('hex')}`;
  const pageServer = mode === 'lazy' ? pair.pageServer() : undefined;
  await pair.target.prepareRestore(c.spec, { migrationId: id, mode, generation: c.generation + 1 });
  await pair.source.dump(c.name, { migrationId: id, mode, ...(pageServer ? { pageServer } : {}) });
  await pair.copyTrees(id);
  const restored = await pair.target.restore(c.spec, { migrationId: id, mode, generation: c.generation + 1, ...(pageServer ? { pageServer } : {}) });
  await pair.source.finishMigration(id);
  await pair.target.settleRestore(id);
  return restored;
}

// ------------------------------------------------------------------ SQLite

/** sqlite3 in the container; it waits for the writer's lock like any second client should. */
const sql = (c: AgentContainer, statement: string) => mustExecIn(c, ['/usr/bin/sqlite3', '-cmd', '.timeout 5000', '/data/app.db', statement]);

/** Rows the writer committed: they are numbered 1..n, so count and max agree when none is lost. */
async function committedRows(c: AgentContainer): Promise<number> {
  const [count, max] = (await sql(c, 'SELECT COUNT(*), COALESCE(MAX(n), 0) FROM t WHERE n > 0')).split('|').map(Number);
  assert.equal(count, max, `rows 1..${max} should all be there, ${count} are`);
  return count!;
}

async function waitForRows(c: AgentContainer, atLeast: number): Promise<number> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const res = await execIn(c, ['/usr/bin/sqlite3', '-cmd', '.timeout 5000', '/data/app.db', 'SELECT COUNT(*) FROM t WHERE n > 0']);
    const n = res.code === 0 ? Number(res.stdout.trim()) : 0;
    if (n >= atLeast) return n;
    assert.ok(Date.now() < deadline, `the writer in ${c.name} did not reach ${atLeast} rows (at ${n}): ${res.stderr}`);
    await sleep(100);
  }
}

/** After a checkpoint: every row is there, sqlite3 writes, the writer writes on and reports no failure. */
async function assertDatabaseWorks(rt: RuntimePair['source'], c: AgentContainer, rowsBefore: number, what: string): Promise<void> {
  try {
    const rows = await committedRows(c);
    assert.ok(rows >= rowsBefore, `${what}: ${rows} rows, ${rowsBefore} were committed before`);
    assert.equal(await sql(c, 'PRAGMA integrity_check'), 'ok', `${what}: integrity`);
    const marker = -Math.floor(Math.random() * 1e9) - 1;
    await sql(c, `INSERT INTO t (n, at) VALUES (${marker}, 0)`);
    assert.equal(await sql(c, `SELECT COUNT(*) FROM t WHERE n = ${marker}`), '1', `${what}: sqlite3's own write is there`);
    await waitForRows(c, rows + 10);
    const logs = await rt.logs(c.name);
    assert.doesNotMatch(logs, /failed/, `${what}: the writer reported failures:\n${logs}`);
  } catch (err) {
    // Whether the writer is still there, and what it said, is most of the diagnosis.
    const now = await rt.get(c.name).catch((e: Error) => ({ status: e.message, pid: undefined }));
    const logs = await rt.logs(c.name).catch(() => '');
    (err as Error).message += `\n${what}: container ${c.name} is ${now.status} (pid ${now.pid ?? '-'}, was ${c.pid}); its logs:\n${logs}`;
    throw err;
  }
}

/**
 * The writer's own account (its `check` lines) after `after` rows: it holds the only connection,
 * which is all that is safe after a restore (docs/compatibility.md: CRIU gives a restored
 * process back no lock on a file it has mapped, here the WAL index `-shm`, so a second
 * connection would take the index for abandoned and reset it under the writer).
 */
async function writerChecks(rt: RuntimePair['source'], c: AgentContainer, after: number, what: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const logs = await rt.logs(c.name);
    assert.doesNotMatch(logs, /failed/, `${what}: the writer reported failures:\n${logs}`);
    const checks = [...logs.matchAll(/^check rows=(\d+) max=(\d+) integrity=(.*)$/gm)].map((m) => ({ rows: Number(m[1]), max: Number(m[2]), integrity: m[3] }));
    for (const ch of checks) {
      assert.equal(ch.rows, ch.max, `${what}: rows 1..${ch.max} should all be there, ${ch.rows} are`);
      assert.equal(ch.integrity, 'ok', `${what}: integrity`);
    }
    if (checks.some((ch) => ch.rows >= after + 40)) return;
    const now = await rt.get(c.name);
    assert.ok(Date.now() < deadline && now.status === 'running', `${what}: the writer did not write on past row ${after + 40} (container ${now.status}); its logs:\n${logs}`);
    await sleep(200);
  }
}

/** The writer's row count at its last check. */
async function lastCheckedRows(rt: RuntimePair['source'], c: AgentContainer): Promise<number> {
  const checks = [...(await rt.logs(c.name)).matchAll(/^check rows=(\d+)/gm)];
  return checks.length ? Number(checks.at(-1)![1]) : 0;
}

describe('SQLite in WAL mode (POSIX locks: CRIU needs --file-locks)', () => {
  it('a checkpoint leaves it running, and sqlite3 reads and writes beside it; a copy move keeps every row and it writes on', { timeout }, () =>
    withPair(async (pair) => {
      let c = await pair.source.run(spec('sqlite-wal', ['/usr/bin/python3', '/app/sqlite-writer.py', 'wal']));
      const rows = await waitForRows(c, 20);
      assert.equal(await sql(c, 'PRAGMA journal_mode'), 'wal');
      const checkpointId = `ckpt-${randomBytes(3).toString('hex')}`;
      await pair.source.checkpoint(c.name, checkpointId);
      c = await pair.source.get(c.name);
      assert.equal(c.status, 'running');
      // Left running, the writer keeps its locks: a second connection is safe.
      await assertDatabaseWorks(pair.source, c, rows, 'after a checkpoint');
      await pair.source.discardCheckpoint(checkpointId);

      const before = await lastCheckedRows(pair.source, c);
      const moved = await move(pair, c, 'copy');
      await writerChecks(pair.target, moved, before, 'after a copy move');
    }));

  it('a lazy move keeps every row and it writes on', { timeout }, (t) =>
    withPair(async (pair) => {
      if (!pair.source.capabilities.lazyMigration) return t.skip('no lazy migration on these hosts');
      const c = await pair.source.run(spec('sqlite-wal-lazy', ['/usr/bin/python3', '/app/sqlite-writer.py', 'wal']));
      await writerChecks(pair.source, c, 0, 'before the move');
      const before = await lastCheckedRows(pair.source, c);
      const moved = await move(pair, c, 'lazy');
      await writerChecks(pair.target, moved, before, 'after a lazy move');
    }));
});

describe('SQLite in DELETE journal mode (remembers its database file\'s inode number)', () => {
  for (const mode of ['copy', 'lazy'] as const) {
    it(`on an image writable layer, a ${mode} move keeps every row and the inode number, and it writes on`, { timeout }, (t) =>
      withPair(
        async (pair) => {
          if (mode === 'lazy' && !pair.source.capabilities.lazyMigration) return t.skip('no lazy migration on these hosts');
          const c = await pair.source.run(spec(`sqlite-del-${mode}`, ['/usr/bin/python3', '/app/sqlite-writer.py', 'delete']));
          await writerChecks(pair.source, c, 0, 'before the move');
          assert.match(await pair.source.logs(c.name), /^journal_mode delete$/m);
          const inode = await mustExecIn(c, ['/bin/busybox', 'stat', '-c', '%i', '/data/app.db']);
          const before = await lastCheckedRows(pair.source, c);
          const moved = await move(pair, c, mode);
          await writerChecks(pair.target, moved, before, `after a ${mode} move`);
          assert.equal(await mustExecIn(moved, ['/bin/busybox', 'stat', '-c', '%i', '/data/app.db']), inode, 'the database keeps its inode number');
          // No shared-memory index in this mode: a second connection is safe after a restore.
          assert.equal(await sql(moved, 'PRAGMA integrity_check'), 'ok');
          await sql(moved, 'INSERT INTO t (n, at) VALUES (-1, 0)');
        },
        { writableLayer: 'image' },
      ));
  }

  it('on an image writable layer, a checkpoint restored on another node (the failover path) keeps every row and it writes on', { timeout }, () =>
    withPair(
      async (pair) => {
        const c = await pair.source.run(spec('sqlite-del-ckpt', ['/usr/bin/python3', '/app/sqlite-writer.py', 'delete']));
        await writerChecks(pair.source, c, 0, 'before the checkpoint');
        const inode = await mustExecIn(c, ['/bin/busybox', 'stat', '-c', '%i', '/data/app.db']);
        const rows = await lastCheckedRows(pair.source, c);
        const checkpointId = `ckpt-${randomBytes(3).toString('hex')}`;
        const ckpt = await pair.source.checkpoint(c.name, checkpointId);
        // The source is lost; the checkpoint's copy comes back on the target.
        await pair.source.stop(c.name, { timeoutMs: 5_000 });
        await pair.source.remove(c.name);
        const id = `restore-${randomBytes(3).toString('hex')}`;
        await pair.copyTrees(id, ckpt.paths);
        const back = await pair.target.restore(c.spec, { migrationId: id, mode: 'copy', generation: c.generation + 1 });
        await pair.source.discardCheckpoint(checkpointId);
        await writerChecks(pair.target, back, rows, 'after a restore of a checkpoint');
        assert.equal(await mustExecIn(back, ['/bin/busybox', 'stat', '-c', '%i', '/data/app.db']), inode, 'the database keeps its inode number');
      },
      { writableLayer: 'image' },
    ));

  it('on a directory writable layer, every write after a move fails with SQLITE_READONLY_DBMOVED (why image layers exist)', { timeout }, (t) =>
    withPair(
      async (pair) => {
        const c = await pair.source.run(spec('sqlite-del-dir', ['/usr/bin/python3', '/app/sqlite-writer.py', 'delete']));
        await writerChecks(pair.source, c, 0, 'before the move');
        const moved = await move(pair, c, 'copy');
        const deadline = Date.now() + 15_000;
        while (!/SQLITE_READONLY_DBMOVED/.test(await pair.target.logs(moved.name))) {
          assert.ok(Date.now() < deadline, `the writer reported no SQLITE_READONLY_DBMOVED:\n${await pair.target.logs(moved.name)}`);
          await sleep(200);
        }
        t.diagnostic((await pair.target.logs(moved.name)).split('\n').find((l) => l.includes('DBMOVED'))!);
      },
      { writableLayer: 'directory' },
    ));
});

// ------------------------------------------------------------------ a non-root user

/**
 * A server that drops to uid/gid 101 (what Debian's postgres user is) and keeps its state in
 * memory: a counter POST / increments and a token drawn at its start, so a restart (a fresh
 * token, count 0) cannot pass for a restore.
 */
const NON_ROOT_SERVER = `
import http.server, json, os
os.setgroups([]); os.setgid(101); os.setuid(101)
token = os.urandom(8).hex()
count = 0
class H(http.server.BaseHTTPRequestHandler):
    def answer(self):
        body = json.dumps({"token": token, "count": count, "uid": os.getuid(), "gid": os.getgid()}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_GET(self): self.answer()
    def do_POST(self):
        global count
        count += 1
        self.answer()
    def log_message(self, *args): pass
http.server.HTTPServer(("0.0.0.0", ${HTTP_PORT}), H).serve_forever()
`;

interface ServerState {
  token: string;
  count: number;
  uid: number;
  gid: number;
}

/** One request to the server on a test host of this pair; retried until it answers (a restore's first moments). */
async function serverState(address: string, method: 'GET' | 'POST'): Promise<ServerState> {
  assert.ok(RUNC_PAIR_NODES.some((n) => n.address === address), `${address} is not a test host of this pair`);
  const deadline = Date.now() + 15_000;
  for (;;) {
    try {
      return await new Promise<ServerState>((resolve, reject) => {
        const req = request({ host: address, port: HOST_PORT, path: '/', method, agent: false, timeout: 2_000 }, (res) => {
          let body = '';
          res.setEncoding('utf8').on('data', (d: string) => (body += d));
          res.on('end', () => (res.statusCode === 200 ? resolve(JSON.parse(body) as ServerState) : reject(new Error(`HTTP ${res.statusCode}`))));
        });
        req.on('timeout', () => req.destroy(new Error('timed out')));
        req.on('error', reject);
        req.end();
      });
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`${method} http://${address}:${HOST_PORT}/: ${(err as Error).message}`);
      await sleep(100);
    }
  }
}

/** Runs the server on the pair's source and counts to 3; returns it and what it said. */
async function startNonRootServer(pair: RuntimePair, name: string): Promise<{ c: AgentContainer; state: ServerState }> {
  const c = await pair.source.run(spec(name, ['/usr/bin/python3', '-c', NON_ROOT_SERVER]));
  const src = RUNC_PAIR_NODES[0].address;
  for (let i = 0; i < 3; i++) await serverState(src, 'POST');
  const state = await serverState(src, 'GET');
  assert.deepEqual({ uid: state.uid, gid: state.gid, count: state.count }, { uid: 101, gid: 101, count: 3 }, 'the server runs as 101 and counted to 3');
  return { c, state };
}

/** On the target: the same process memory (token), the count it had, still uid 101, and it counts on. */
async function assertSameServer(before: ServerState, what: string): Promise<void> {
  const dst = RUNC_PAIR_NODES[1].address;
  const after = await serverState(dst, 'GET');
  assert.deepEqual(after, before, `${what}: the server kept its memory and user`);
  assert.equal((await serverState(dst, 'POST')).count, before.count + 1, `${what}: it counts on`);
}

describe('a process running as a non-root user (uid 101), in a user namespace of its own', () => {
  it('a checkpoint leaves it running, and restored on another node (the failover path) it has its memory', { timeout }, () =>
    withPair(async (pair) => {
      const { c, state } = await startNonRootServer(pair, 'nonroot-ckpt');
      const checkpointId = `ckpt-${randomBytes(3).toString('hex')}`;
      const ckpt = await pair.source.checkpoint(c.name, checkpointId);
      assert.equal((await pair.source.get(c.name)).status, 'running');
      assert.deepEqual(await serverState(RUNC_PAIR_NODES[0].address, 'GET'), state, 'it runs on after the checkpoint');
      await pair.source.stop(c.name, { timeoutMs: 5_000 });
      await pair.source.remove(c.name);
      const id = `restore-${randomBytes(3).toString('hex')}`;
      await pair.target.prepareRestore(c.spec, { migrationId: id, mode: 'copy', generation: c.generation + 1 });
      await pair.copyTrees(id, ckpt.paths);
      await pair.target.restore(c.spec, { migrationId: id, mode: 'copy', generation: c.generation + 1 });
      await pair.source.discardCheckpoint(checkpointId);
      await assertSameServer(state, 'after a restore of its checkpoint');
    }));

  for (const mode of ['copy', 'lazy'] as const) {
    it(`a ${mode} move keeps its memory and user`, { timeout }, (t) =>
      withPair(async (pair) => {
        if (mode === 'lazy' && !pair.source.capabilities.lazyMigration) return t.skip('no lazy migration on these hosts');
        const { c, state } = await startNonRootServer(pair, `nonroot-${mode}`);
        await move(pair, c, mode);
        await assertSameServer(state, `after a ${mode} move`);
      }));
  }

  it('without a user namespace (agent --userns off), a dump on a node without CAP_SYS_RESOURCE fails naming the capability and the fix', { timeout }, (t) =>
    withPair(
      async (pair) => {
        const capEff = /^CapEff:\s*([0-9a-f]+)/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]!;
        if ((BigInt(`0x${capEff}`) >> 24n) & 1n) return t.skip('this host grants CAP_SYS_RESOURCE: CRIU can read any rlimit');
        const { c, state } = await startNonRootServer(pair, 'nonroot-off');
        const id = `mig-copy-${randomBytes(3).toString('hex')}`;
        await assert.rejects(pair.source.dump(c.name, { migrationId: id, mode: 'copy' }), (err: ChipmunkError) => {
          assert.equal(err.code, 'CHIPMUNK_CAPABILITY_MISSING', err.message);
          assert.match(err.message, /CAP_SYS_RESOURCE/);
          assert.match(err.message, /user namespace/);
          assert.doesNotMatch(err.message, /NOTIFY/);
          return true;
        });
        assert.deepEqual(await serverState(RUNC_PAIR_NODES[0].address, 'GET'), state, 'the failed dump left it running as it was');
      },
      { userNamespace: false },
    ));
});

// ------------------------------------------------------------------ Python http.server

/** ms from now until the server answers GET / on the test host's address (or fails after `limitMs`). */
async function msUntilAnswer(address: string, port: number, limitMs: number): Promise<number> {
  assert.ok(RUNC_PAIR_NODES.some((n) => n.address === address), `${address} is not a test host of this pair`);
  const start = Date.now();
  for (;;) {
    const status = await httpStatus(address, port).catch(() => 0);
    if (status === 200) return Date.now() - start;
    if (Date.now() - start > limitMs) return Date.now() - start;
    await sleep(25);
  }
}

function httpStatus(host: string, port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ host, port, path: '/', agent: false, timeout: 1_000 }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    req.end();
  });
}

describe('Python http.server (looks up its own name before it listens)', () => {
  it('answers within 2 s of start, and within 2 s of a move on its new address; /etc/hosts names the new one', { timeout }, (t) =>
    withPair(async (pair) => {
      const [src, dst] = RUNC_PAIR_NODES;
      const c = await pair.source.run(spec('web', ['/usr/bin/python3', '-m', 'http.server', String(HTTP_PORT)]));
      const startMs = await msUntilAnswer(src.address, HOST_PORT, 15_000);
      t.diagnostic(`http.server answered ${startMs} ms after start`);
      assert.ok(startMs < 2_000, `http.server answered ${startMs} ms after start`);
      assert.ok(c.ip, 'the container has an address');
      assert.match(await mustExecIn(c, ['/bin/cat', '/etc/hosts']), new RegExp(`^${c.ip!.replace(/\./g, '\\.')}\\tweb$`, 'm'));
      assert.equal(await mustExecIn(c, ['/bin/hostname']), 'web');
      assert.doesNotMatch(await mustExecIn(c, ['/bin/cat', '/etc/resolv.conf']), /^nameserver/m, 'loopback name servers are left out');
      assert.equal(await mustExecIn(c, ['/usr/bin/python3', '-c', 'import socket; print(socket.gethostbyname(socket.gethostname()))']), c.ip);

      const moved = await move(pair, c, 'copy');
      const afterMoveMs = await msUntilAnswer(dst.address, HOST_PORT, 15_000);
      t.diagnostic(`http.server answered ${afterMoveMs} ms after its restore on the target`);
      assert.ok(afterMoveMs < 2_000, `http.server answered ${afterMoveMs} ms after its move`);
      assert.ok(moved.ip && moved.ip !== c.ip, `a new address on the target (${moved.ip}, was ${c.ip})`);
      assert.match(await mustExecIn(moved, ['/bin/cat', '/etc/hosts']), new RegExp(`^${moved.ip!.replace(/\./g, '\\.')}\\tweb$`, 'm'));
      assert.equal(await mustExecIn(moved, ['/usr/bin/python3', '-c', 'import socket; print(socket.gethostbyname(socket.gethostname()))']), moved.ip);
      // A fresh start on the target, the case a failover restarts into.
      await pair.target.stop(moved.name, { timeoutMs: 5_000 });
      await pair.target.remove(moved.name);
      await pair.target.run(spec('web', ['/usr/bin/python3', '-m', 'http.server', String(HTTP_PORT)]));
      const restartMs = await msUntilAnswer(dst.address, HOST_PORT, 15_000);
      t.diagnostic(`http.server answered ${restartMs} ms after a start on the target`);
      assert.ok(restartMs < 2_000, `http.server answered ${restartMs} ms after a start on the target`);
    }));
});
