import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { appendFile, mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { RequestLog, type LogRecord, type LoggedRequest } from '../../src/gateway/request-log.js';

async function withDir(run: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'chipmunk-request-log-'));
  try {
    await run(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function increment(n: number): LoggedRequest {
  return { method: 'POST', url: `/increment?n=${n}`, headers: ['host', 'app', 'x-n', String(n)], body: Buffer.from(`body ${n}`) };
}

async function collect(records: AsyncIterable<LogRecord>): Promise<LogRecord[]> {
  const out: LogRecord[] = [];
  for await (const record of records) out.push(record);
  return out;
}

describe('gateway: request log file', () => {
  it('keeps records in append order with their method, url, headers and body', () =>
    withDir(async (dir) => {
      const log = await RequestLog.open(dir);
      const seqs = await Promise.all([1, 2, 3, 4, 5].map((n) => log.append(increment(n))));
      assert.deepEqual(seqs, [1, 2, 3, 4, 5]);
      await log.append({ method: 'GET', url: '/', headers: [], body: null });
      const records = await collect(log.read(0));
      assert.deepEqual(records.map((r) => r.seq), [1, 2, 3, 4, 5, 6]);
      assert.deepEqual(
        { method: records[2].method, url: records[2].url, headers: records[2].headers, body: records[2].body?.toString() },
        { method: 'POST', url: '/increment?n=3', headers: ['host', 'app', 'x-n', '3'], body: 'body 3' },
      );
      assert.equal(records[5].body, null);
      assert.deepEqual((await collect(log.read(4))).map((r) => r.seq), [5, 6]);
      assert.deepEqual(log.state(), { logId: log.id, firstSeq: 1, lastSeq: 6, bytes: (await stat(join(dir, '00000000000000000001.log'))).size });
      assert.match(log.id, /^[0-9a-f]{16}$/);
      await log.close();
    }));

  it('resolves an append only after its sync, and syncs appends that arrive meanwhile together', () =>
    withDir(async (dir) => {
      const syncs: number[] = [];
      let syncing = false;
      const log = await RequestLog.open(dir, {
        datasync: async (file) => {
          syncing = true;
          await sleep(20);
          await file.datasync();
          syncing = false;
        },
        onBatch: (records) => syncs.push(records),
      });
      const first = log.append(increment(0));
      let firstDone = false;
      void first.then(() => (firstDone = true));
      await sleep(5);
      assert.ok(syncing && !firstDone, 'the first append waits for its sync');
      // These arrive while the first batch syncs: they go together in the next one.
      const rest = Array.from({ length: 50 }, (_, i) => log.append(increment(i + 1)));
      await Promise.all([first, ...rest]);
      assert.deepEqual(syncs, [1, 50]);
      await log.close();
    }));

  it('continues the seq after a restart and truncates a torn record at the end', () =>
    withDir(async (dir) => {
      const log = await RequestLog.open(dir);
      for (let n = 1; n <= 3; n++) await log.append(increment(n));
      await log.close();
      const segment = join(dir, '00000000000000000001.log');
      const good = (await stat(segment)).size;
      // A crash in the middle of a write: half a frame header and some bytes.
      await appendFile(segment, Buffer.from([200, 0, 0, 0, 1, 2, 3]));

      const reopened = await RequestLog.open(dir);
      assert.equal((await stat(segment)).size, good, 'the torn tail is cut off');
      assert.equal(reopened.lastSeq, 3);
      assert.equal(await reopened.append(increment(4)), 4);
      assert.deepEqual((await collect(reopened.read(0))).map((r) => r.seq), [1, 2, 3, 4]);
      await reopened.close();
    }));

  it('trims behind a log that keeps growing: a trim short of its end still lets the records up to it go, one trim later (found by the failover soak: replays got slower with every kill)', () =>
    withDir(async (dir) => {
      const log = await RequestLog.open(dir);
      for (let n = 1; n <= 100; n++) await log.append(increment(n));
      const perRecord = log.state().bytes / 100;
      // Checkpoints cut at 50, then at 150, while requests keep coming: never at the log's end.
      await log.trim(50);
      for (let n = 101; n <= 200; n++) await log.append(increment(n));
      await log.trim(150);
      for (let n = 201; n <= 210; n++) await log.append(increment(n));
      const { firstSeq, bytes } = log.state();
      assert.equal(firstSeq, 151);
      // What a replay reads through: the records up to the first trim are gone from disk, not only skipped.
      assert.ok(bytes <= 115 * perRecord, `at most the 110 records since the first trim are on disk: ${Math.round(bytes / perRecord)} are`);
      assert.deepEqual((await collect(log.read(160))).map((r) => r.seq).slice(0, 2), [161, 162]);
      await log.close();
    }));

  it('trims whole segments, keeps the seq going across a trim of everything and a restart', () =>
    withDir(async (dir) => {
      const log = await RequestLog.open(dir, { segmentBytes: 200 });
      for (let n = 1; n <= 10; n++) await log.append(increment(n));
      const segmentsBefore = (await readdir(dir)).length;
      assert.ok(segmentsBefore > 2, `small segments roll (${segmentsBefore})`);

      await log.trim(6);
      assert.equal(log.state().firstSeq, 7);
      assert.deepEqual((await collect(log.read(0))).map((r) => r.seq), [7, 8, 9, 10]);
      assert.deepEqual((await collect(log.read(8))).map((r) => r.seq), [9, 10]);
      assert.ok((await readdir(dir)).length < segmentsBefore, 'segments with only trimmed records are deleted');

      await log.trim(10);
      assert.deepEqual(await collect(log.read(0)), []);
      assert.deepEqual(await readdir(dir), ['00000000000000000011.log', 'log-id'], 'one empty segment named after the next seq, and the id');
      await log.close();

      const reopened = await RequestLog.open(dir);
      assert.deepEqual(reopened.state(), { logId: log.id, firstSeq: 11, lastSeq: 10, bytes: 0 });
      assert.equal(await reopened.append(increment(11)), 11);
      assert.deepEqual((await collect(reopened.read(0))).map((r) => r.seq), [11]);
      await reopened.close();
    }));

  it('refuses to open a log with a corrupt record before its last segment', () =>
    withDir(async (dir) => {
      const log = await RequestLog.open(dir, { segmentBytes: 100 });
      for (let n = 1; n <= 4; n++) await log.append(increment(n));
      await log.close();
      await appendFile(join(dir, '00000000000000000001.log'), Buffer.from('garbage!'));
      await assert.rejects(RequestLog.open(dir), /corrupt/);
    }));
});
