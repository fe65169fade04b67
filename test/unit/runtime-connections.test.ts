// Which of a container's TCP connections a move that keeps connections must reset first
// (src/agent/runtime/connections.ts): from ss's output to the filter that aborts exactly those.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseConnections, ssFilter, unrestorable } from '../../src/agent/runtime/connections.js';

const SS_OUTPUT = [
  'ESTAB 0      0                  127.0.0.1:41546             127.0.0.1:7777 ',
  'ESTAB 0      0         [::ffff:198.19.128.5]:7007  [::ffff:198.18.3.11]:47080',
  'ESTAB 0      0               198.19.201.2:39139          198.18.3.1:17203',
  'FIN-WAIT-1 0 12     [::ffff:198.19.201.2]:7007      [::ffff:198.18.3.1]:5000',
  'ESTAB 0      0                      [::1]:6379                  [::1]:51000',
  '',
].join('\n');

describe('connections a move resets', () => {
  it('reads the local and peer ends of each connection, v4-mapped addresses as v4', () => {
    assert.deepEqual(parseConnections(SS_OUTPUT), [
      { local: '127.0.0.1', localPort: 41546, peer: '127.0.0.1', peerPort: 7777 },
      { local: '198.19.128.5', localPort: 7007, peer: '198.18.3.11', peerPort: 47080 },
      { local: '198.19.201.2', localPort: 39139, peer: '198.18.3.1', peerPort: 17203 },
      { local: '198.19.201.2', localPort: 7007, peer: '198.18.3.1', peerPort: 5000 },
      { local: '::1', localPort: 6379, peer: '::1', peerPort: 51000 },
    ]);
  });

  it('keeps those on the cluster address and on loopback, resets those on the CNI address', () => {
    const doomed = unrestorable(parseConnections(SS_OUTPUT), '198.19.128.5');
    assert.deepEqual(doomed.map((c) => `${c.local}:${c.localPort}`), ['198.19.201.2:39139', '198.19.201.2:7007']);
    assert.deepEqual(ssFilter(doomed).join(' '), '( src 198.19.201.2:39139 and dst 198.18.3.1:17203 ) or ( src 198.19.201.2:7007 and dst 198.18.3.1:5000 )');
    assert.deepEqual(ssFilter([{ local: 'fd00::2', localPort: 80, peer: 'fd00::1', peerPort: 9 }]).join(' '), '( src [fd00::2]:80 and dst [fd00::1]:9 )');
  });
});
