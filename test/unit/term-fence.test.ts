// The term fence on its own: what it lets through, what it refuses, and that the newest term
// survives a restart (it is in a file).
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { InvalidInputError, StaleTermError } from '../../src/shared/errors.js';
import { TermFence, parseTerm } from '../../src/shared/term-fence.js';

describe('term fence', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'chipmunk-term-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('lets the newest term and newer ones through, refuses older ones, and remembers across a restart', async () => {
    const file = join(dir, 'a');
    const fence = await TermFence.open(file);
    assert.equal(fence.newestTerm, 0);
    await fence.admit(5);
    await fence.admit(5);
    await assert.rejects(fence.admit(4), (err: unknown) => err instanceof StaleTermError && err.code === 'CHIPMUNK_STALE_TERM' && err.status === 409);
    await fence.admit(9);
    await assert.rejects(fence.admit(5), StaleTermError);
    assert.equal((await readFile(file, 'utf8')).trim(), '9');

    const restarted = await TermFence.open(file);
    assert.equal(restarted.newestTerm, 9);
    await assert.rejects(restarted.admit(8), StaleTermError);
  });

  it('ends at the highest of raises that come at once', async () => {
    const file = join(dir, 'b');
    const fence = await TermFence.open(file);
    const results = await Promise.allSettled([fence.admit(3), fence.admit(7), fence.admit(5), fence.admit(6)]);
    assert.deepEqual(results.map((r) => r.status), ['fulfilled', 'fulfilled', 'rejected', 'rejected']);
    assert.equal((await readFile(file, 'utf8')).trim(), '7');
    assert.equal((await TermFence.open(file)).newestTerm, 7);
  });

  it('refuses to start on a damaged term file, saying what to do', async () => {
    const file = join(dir, 'c');
    await writeFile(file, 'garbage\n');
    await assert.rejects(TermFence.open(file), (err: unknown) => err instanceof InvalidInputError && /not a term/.test(err.message));
  });

  it('parses the header strictly', () => {
    assert.equal(parseTerm(undefined), undefined);
    assert.equal(parseTerm('42'), 42);
    for (const bad of ['', '0', '-1', '1.5', 'abc', '9999999999999999']) assert.throws(() => parseTerm(bad), InvalidInputError, bad);
  });
});
