import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { leaderOnly } from '../../src/controller/forward.js';

describe('which requests a follower passes on to the leader', () => {
  it('passes on mutations and checkpoint-store requests; keeps reads and heartbeats', () => {
    const cases: [string, string, boolean][] = [
      ['POST', '/v1/containers', true],
      ['POST', '/v1/containers/web/migrate', true],
      ['DELETE', '/v1/containers/web', true],
      ['PUT', '/v1/containers/web/protection', true],
      ['PUT', '/v1/checkpoints/uploads/u1/chunks', true],
      ['GET', '/v1/checkpoints/web/c1/files?path=/', true],
      ['GET', '/v1/containers/web/checkpoints', true],
      ['PUT', '/v1/nodes/node1', false],
      ['GET', '/v1/containers', false],
      ['GET', '/v1/containers/web/logs?tail=5', false],
      ['GET', '/v1/nodes', false],
      ['GET', '/healthz', false],
      ['POST', '/v1/debug/faults', false],
    ];
    for (const [method, url, expected] of cases) assert.equal(leaderOnly(method, url), expected, `${method} ${url}`);
  });
});
