/**
 * One election candidate in a process of its own, for tests that kill a leader's process:
 * `node --import tsx election-candidate.ts ENDPOINTS ID TTL_MS`. Prints one JSON line per leader it
 * sees ({"leader": {...} | null, "at": ms since the epoch}), after {"started": true}.
 */
import { Election } from '../../src/controller/election.js';
import { EtcdStore } from '../../src/controller/store/index.js';

const [endpoints, id, ttl] = process.argv.slice(2);
const store = await EtcdStore.open(endpoints.split(','));
const print = (line: object) => process.stdout.write(`${JSON.stringify({ ...line, at: Date.now() })}\n`);
const election = new Election({ store, candidate: { id, url: `http://${id}` }, ttlMs: Number(ttl), onChange: (leader) => print({ leader: leader ?? null }) });
await election.start();
print({ started: true });
process.on('SIGTERM', () => void election.close().then(() => store.close()).then(() => process.exit(0)));
