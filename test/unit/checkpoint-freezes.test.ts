// CheckpointFreezes: whether a checkpoint's freeze overlapped a status read (src/agent/runtime/checkpoint-freezes.ts).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { CheckpointFreezes } from '../../src/agent/runtime/checkpoint-freezes.js';

describe('CheckpointFreezes', () => {
  it('no freeze during the read: not overlapped', () => {
    const f = new CheckpointFreezes();
    f.begin('a');
    f.end('a');
    const mark = f.mark('a');
    assert.equal(f.overlapped('a', mark), false);
  });
  it('a freeze under way when the read began, or when it ended: overlapped', () => {
    const f = new CheckpointFreezes();
    f.begin('a');
    const during = f.mark('a');
    f.end('a');
    assert.equal(f.overlapped('a', during), true, 'under way at the mark, ended since');
    const before = f.mark('a');
    f.begin('a');
    assert.equal(f.overlapped('a', before), true, 'begun since the mark, under way');
  });
  it('a freeze that began and ended within the read: overlapped', () => {
    const f = new CheckpointFreezes();
    const mark = f.mark('a');
    f.begin('a');
    f.end('a');
    assert.equal(f.overlapped('a', mark), true);
  });
  it("another container's freeze does not explain this one's pause", () => {
    const f = new CheckpointFreezes();
    const mark = f.mark('a');
    f.begin('b');
    assert.equal(f.overlapped('a', mark), false);
  });
});
