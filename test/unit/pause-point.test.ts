import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { PausePoints } from '../../src/shared/pause-point.js';

test('an armed step pauses once, reports it reached, and goes on when resumed', async () => {
  const pauses = new PausePoints();
  await pauses.at('a'); // not armed: returns at once
  pauses.arm('b');
  await pauses.at('a'); // another step: returns at once
  assert.deepEqual(pauses.status(), { step: 'b', reached: false, resumed: false });
  let passed = false;
  const waiting = pauses.at('b').then(() => (passed = true));
  await sleep(20);
  assert.equal(passed, false, 'it waits at the step');
  assert.equal(pauses.status().reached, true);
  pauses.resume();
  await waiting;
  assert.equal(passed, true);
  assert.equal(pauses.status().resumed, true);
  await pauses.at('b'); // fired once: no second pause
});

test('a pause ends by itself after its bound; resume before it is reached disarms', async () => {
  const pauses = new PausePoints();
  pauses.arm('x', 30);
  const t = Date.now();
  await pauses.at('x');
  assert.ok(Date.now() - t >= 25);
  pauses.arm('y');
  pauses.resume();
  assert.equal(pauses.isArmed('y'), false);
  await pauses.at('y');
});
