/**
 * What must hold after any fault, checked from the outside (runc on every node, the gateway,
 * the kernel's mount and namespace tables), not from the controller's records:
 * - exactly one running copy, and the controller's record names its node, running;
 * - no lock left: protection goes on (a scheduled checkpoint completes);
 * - the route is not held, and the app answers through the gateway;
 * - counter == acknowledged writes == lines in the app's file;
 * - nothing left of dead incarnations or ended migrations: runc containers, network
 *   namespaces, mounts, CRIU page servers and lazy-pages daemons, migration images.
 */
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { request } from 'undici';
import { DEFAULT_RUN_DIR } from '../../src/cluster/state.js';
import { cli, clusterStateDir, controllerContainers, http, localCluster, migrationLeftovers, runcList, runningCopies } from './local-cluster.js';

const execFileP = promisify(execFile);
export const GATEWAY_HOST = '127.0.0.1';
const HOLD_RECHECK_MS = 2_000;

export interface Copy {
  node: string;
  id: string;
}

/** GET through the gateway: the body (parsed when JSON); undefined when nothing answers 200 within TIMEOUTMS. */
export async function viaGateway<T>(port: number, path: string, timeoutMs = 3_000): Promise<T | undefined> {
  try {
    const res = await request(`http://${GATEWAY_HOST}:${port}${path}`, { headersTimeout: timeoutMs, bodyTimeout: timeoutMs });
    const text = await res.body.text();
    if (res.statusCode !== 200) return undefined;
    try {
      return JSON.parse(text) as T;
    } catch {
      return text as T;
    }
  } catch {
    return undefined;
  }
}

interface GatewayRoute {
  state: 'open' | 'holding';
  held: number;
  migration?: { id: string };
}

async function gatewayRoute(name: string): Promise<GatewayRoute | undefined> {
  const url = new URL(localCluster().state.gatewayUrl!);
  const res = await http<GatewayRoute>(url.hostname, Number(url.port), `/v1/routes/${name}`, 'GET', { token: localCluster().token });
  return res.status === 200 ? res.body : undefined;
}

/**
 * The structural invariants (copies, record, route, answer). Returns what fails (empty: all
 * hold) and the one running copy, if there is exactly one.
 */
export async function structuralFailures(name: string, port: number): Promise<{ failures: string[]; copy?: Copy }> {
  const failures: string[] = [];
  const copies = await runningCopies(name).catch((err: Error) => {
    failures.push(`runc list failed: ${err.message}`);
    return [] as Copy[];
  });
  const copy = copies.length === 1 ? copies[0] : undefined;
  if (copies.length !== 1) failures.push(`${copies.length} running copies${copies.length ? ` (${copies.map((c) => c.id).join(', ')})` : ''}`);
  const record = await controllerContainers()
    .then((all) => all.find((c) => c.name === name) ?? 'none')
    .catch((err: Error) => `controller does not answer (${err.message})`);
  if (record === 'none') failures.push('the controller has no record of it');
  else if (typeof record === 'string') failures.push(record);
  else {
    if (copy && record.node !== copy.node) failures.push(`record says ${record.node}, runc says ${copy.node}`);
    if (record.status !== 'running') failures.push(`record says ${record.status}`);
  }
  let route = await gatewayRoute(name).catch(() => undefined);
  // A scheduled checkpoint holds the route for its cut, a few hundred ms every 2 s: only a hold
  // by the same owner a while later counts.
  if (route?.state === 'holding' && route.migration?.id.startsWith('checkpoint-')) {
    const first = route.migration.id;
    await new Promise((resolve) => setTimeout(resolve, HOLD_RECHECK_MS));
    route = await gatewayRoute(name).catch(() => undefined);
    if (route?.state === 'holding' && route.migration?.id !== first) route = { ...route, state: 'open' };
  }
  if (!route) failures.push('the gateway has no route for it (or does not answer)');
  else if (route.state === 'holding') failures.push(`route held (by ${route.migration?.id ?? '?'}, ${route.held} waiting)`);
  if (!(await viaGateway(port, '/health'))) failures.push('no answer through the gateway');
  return { failures, ...(copy ? { copy } : {}) };
}

/**
 * No lock left: with checkpoints every few seconds, one newer than SINCE completes within
 * WAITMS. If none does, an explicit `chipmunk checkpoint` says why (the lock that is left).
 */
export async function lockFailures(name: string, since: number, waitMs: number): Promise<string[]> {
  const deadline = Date.now() + waitMs;
  while (Date.now() < deadline) {
    const list = await cli<Array<{ time: number }>>(['checkpoints', name], { timeoutMs: 10_000 });
    if (list.json?.some?.((c) => c.time > since)) return [];
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  const explicit = await cli(['checkpoint', name], { timeoutMs: 10_000 });
  if (explicit.code === 0) return [`no scheduled checkpoint within ${waitMs / 1000} s (an explicit one worked)`];
  const says = explicit.code === null ? 'waits for a lock (no answer in 10 s)' : (explicit.error?.message ?? explicit.stderr.trim().slice(-200));
  return [`protection stopped: no checkpoint within ${waitMs / 1000} s; \`checkpoint\` ${says}`];
}

/**
 * Counter, lines of the app's file, acknowledged writes: all equal. FAILED requests (no answer, or
 * not 200) may or may not have been applied: with FAILED given, the counter may exceed ACKED by
 * at most that many; never fall below it (an acknowledged write lost).
 */
export async function counterFailures(port: number, acked: number, failed = 0): Promise<{ failures: string[]; counter?: number; lines?: number }> {
  const state = await viaGateway<{ counter: number }>(port, '/', 10_000);
  const file = await viaGateway<{ lines: number }>(port, '/file', 10_000);
  if (!state || !file) return { failures: ['cannot read the counter through the gateway'] };
  const failures: string[] = [];
  if (state.counter < acked || state.counter > acked + failed) {
    failures.push(failed === 0 ? `counter ${state.counter} != acknowledged ${acked}` : `counter ${state.counter} outside acknowledged ${acked} .. acknowledged + failed ${acked + failed}`);
  }
  if (file.lines !== state.counter) failures.push(`file lines ${file.lines} != counter ${state.counter}`);
  return { failures, counter: state.counter, lines: file.lines };
}

/** Leftovers of dead incarnations of NAME (everything but COPY): runc containers, network namespaces, root file system mounts. */
export async function incarnationLeftovers(name: string, copy: Copy | undefined): Promise<string[]> {
  const left: string[] = [];
  const escaped = name.replace(/[.]/g, '\\.');
  for (const node of localCluster().nodes) {
    const incarnation = new RegExp(`^chmk-${node}-${escaped}-\\d+$`);
    for (const c of await runcList(node).catch(() => [])) {
      if (incarnation.test(c.id) && !(copy && c.id === copy.id)) left.push(`runc ${c.id} (${c.status})`);
    }
  }
  const netns = (await execFileP('ip', ['netns', 'list'])).stdout.split('\n').map((l) => l.split(' ')[0]!);
  // The live copy's namespace is named after the incarnation that made it (a copy-mode rollback
  // keeps it); in a user namespace its process runs in a namespace of its own, and the named one
  // its agent records is where its interface is staged: both belong to it.
  const live = copy ? [await netnsOf(copy), await recordedNetns(name, copy)] : [];
  for (const ns of netns) if (new RegExp(`^chmk-node\\d+-${escaped}-\\d+$`).test(ns) && ns !== copy?.id && !live.includes(ns)) left.push(`netns ${ns}`);
  for (const target of await mountTargets()) {
    const m = /\/nodes\/(node\d+)\/containers\/([^/]+)\//.exec(`${target}/`);
    if (m && m[2] === name && m[1] !== copy?.node) left.push(`mount ${target}`);
  }
  return left;
}

/** Leftovers of ended migrations on any node: images and staged files, their mounts, CRIU page servers and lazy-pages daemons. */
export async function migrationDebris(): Promise<string[]> {
  const left: string[] = [];
  for (const node of localCluster().nodes) left.push(...(await migrationLeftovers(node)));
  for (const target of await mountTargets()) if (/\/migrations\/|criu-root/.test(target) && target.includes('/chipmunk/')) left.push(`mount ${target}`);
  const procs = (await execFileP('ps', ['-eo', 'pid=,args='])).stdout.split('\n');
  // Only the local cluster's: a runc pair of another test on this machine has its own under /tmp.
  const ours = (line: string) => line.includes(clusterStateDir()) || line.includes(DEFAULT_RUN_DIR);
  for (const line of procs) if (/criu.*(lazy-pages|page-server)|runc .*--lazy-pages/.test(line) && ours(line)) left.push(`process ${line.trim().slice(0, 120)}`);
  return left;
}

async function mountTargets(): Promise<string[]> {
  return (await execFileP('findmnt', ['-rn', '-o', 'TARGET'])).stdout.split('\n').filter(Boolean);
}

/** The network namespace (name) the copy's process runs in. */
/** The network namespace the copy's agent records for it (containers/NAME/state.json). */
async function recordedNetns(name: string, copy: Copy): Promise<string | undefined> {
  const file = join(clusterStateDir(), 'nodes', copy.node, 'containers', name, 'state.json');
  const record = await readFile(file, 'utf8').then((text) => JSON.parse(text) as { netns?: string }).catch(() => undefined);
  return record?.netns;
}

async function netnsOf(copy: Copy): Promise<string | undefined> {
  const pid = (await runcList(copy.node).catch(() => [])).find((c) => c.id === copy.id)?.pid;
  if (!pid) return undefined;
  const res = await execFileP('ip', ['netns', 'identify', String(pid)]).catch(() => undefined);
  return res?.stdout.trim() || undefined;
}
