/**
 * bench/compat: the compatibility suite on a 3-node local cluster (1 s node lease). For each of
 * Redis, memcached, nginx, PostgreSQL (Debian's binaries, src/devtools/compat-images.ts), a
 * key-value service on Python's http.server and an SQLite writer (WAL) behind HTTP
 * (src/devtools/python/kv-server.py):
 * protected (checkpoint every 2 s), exposed behind the gateway, a client of its own protocol
 * writing nonstop, then a lazy move, a copy move and a failover (its host killed, revived);
 * after each, the program's own client checks every acknowledged write (bench/compat/cells.ts).
 *
 * Usage: npm run bench:compat [-- --only REGEX] [--write-ms 3000] [--writable-layer image]
 *   --only REGEX      programs whose name matches (redis, memcached, nginx, postgres, python,
 *                     sqlite, sqlite-delete)
 *   --write-ms MS     how long the client writes before and after each operation
 *   --writable-layer  the agents' kind of writable layer (cluster up --writable-layer): directory
 *                     (the default) or image
 * Needs the local cluster to itself (it brings one up and takes it down). Prints the table and
 * writes it into docs/compatibility.md between its markers (a table per kind of layer).
 */
import { readFile, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ensureImage } from '../../src/devtools/images.js';
import { COMPAT_PROGRAMS } from '../../test/support/compat-programs.js';
import { ensureClusterHealthy, startLocalCluster, stopLocalCluster } from '../../test/support/local-cluster.js';
import { resultsTable, runProgram, type ProgramResult } from './cells.js';

const DOC = fileURLToPath(new URL('../../docs/compatibility.md', import.meta.url));
const NODE_LEASE_MS = 1_000;

const { values } = parseArgs({
  options: {
    only: { type: 'string' },
    'write-ms': { type: 'string', default: '3000' },
    'writable-layer': { type: 'string', default: 'directory' },
  },
});
const layer = writableLayer(values['writable-layer']);
const BEGIN = layer === 'directory' ? '<!-- bench:compat -->' : `<!-- bench:compat ${layer} layers -->`;
const END = layer === 'directory' ? '<!-- /bench:compat -->' : `<!-- /bench:compat ${layer} layers -->`;

async function main(): Promise<void> {
  const writeMs = Number(values['write-ms']);
  if (!Number.isInteger(writeMs) || writeMs < 500) throw new Error(`--write-ms '${values['write-ms']}': use a whole number of milliseconds, at least 500`);
  const programs = Object.values(COMPAT_PROGRAMS).filter((p) => !values.only || new RegExp(values.only).test(p.name));
  if (programs.length === 0) throw new Error(`--only '${values.only}' matches none of ${Object.keys(COMPAT_PROGRAMS).join(', ')}`);
  const started = Date.now();
  const log = (line: string) => process.stderr.write(`[${((Date.now() - started) / 1000).toFixed(0)} s] ${line}\n`);
  for (const program of programs) log(`image ${program.image}: ${await ensureImage(program.image)}`);
  await startLocalCluster(3, { nodeLeaseMs: NODE_LEASE_MS, writableLayer: layer });
  const results: ProgramResult[] = [];
  try {
    for (const [index, program] of programs.entries()) {
      await ensureClusterHealthy(log);
      results.push(await runProgram(program, { index, writeMs, log }));
      await writeTable(results, writeMs); // after each program: a run stopped half-way keeps its rows
    }
  } finally {
    if (process.env.CHIPMUNK_KEEP_CLUSTER === '1') log('CHIPMUNK_KEEP_CLUSTER=1: leaving the local cluster up');
    else await stopLocalCluster().catch((err: Error) => log(`cluster down failed: ${err.message}`));
  }
  console.log(await writeTable(results, writeMs));
}

function writableLayer(value: string | undefined): 'directory' | 'image' {
  if (value === 'directory' || value === 'image') return value;
  throw new Error(`--writable-layer '${value}': use directory or image`);
}

/** Replaces what stands between the markers in docs/compatibility.md; returns the new text. */
async function writeTable(results: ProgramResult[], writeMs: number): Promise<string> {
  const text = [
    `Measured ${new Date().toISOString()} by \`npm run bench:compat\`${values.only ? ` --only ${values.only}` : ''}${layer === 'directory' ? '' : ` --writable-layer ${layer}`}: 3-node local cluster on one 2-core machine, node lease ${NODE_LEASE_MS} ms, ${layer} writable layers,`,
    `checkpoint every 2 s, one client writing nonstop (${writeMs / 1000} s before and after each operation) through the gateway.`,
    '',
    resultsTable(results),
  ].join('\n');
  const doc = await readFile(DOC, 'utf8');
  const from = doc.indexOf(BEGIN);
  const to = doc.indexOf(END);
  if (from < 0 || to < from) throw new Error(`${DOC} lacks the markers ${BEGIN} ... ${END}: put them where the table goes`);
  await writeFile(DOC, `${doc.slice(0, from + BEGIN.length)}\n${text}\n${doc.slice(to)}`);
  return text;
}

await main();
