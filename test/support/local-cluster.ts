/**
 * A real local cluster for integration tests, driven through the real `chipmunk` CLI.
 *
 * `useLocalCluster()` (call it once, at the top of a test file) takes down whatever local
 * cluster a crashed earlier run left, builds or reuses the test images, and brings a fresh
 * cluster up with fault injection enabled (`cluster up --nodes N`, CHIPMUNK_ENABLE_FAULTS=1)
 * before the file's first test; it takes the cluster down after the last one. Set
 * CHIPMUNK_KEEP_CLUSTER=1 to leave it up for a post-mortem.
 *
 * Traffic: only the local cluster's own addresses (198.18.0.0/24) are ever contacted; `http()`
 * refuses anything else.
 *
 * Needs root, runc, CRIU and podman (scripts/setup.sh).
 */
import { execFile, spawn } from 'node:child_process';
import { request } from 'node:http';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before } from 'node:test';

import { DEFAULT_RUN_DIR, DEFAULT_STATE_DIR, clusterRevive, readClusterState, type LocalClusterState } from '../../src/cluster/index.js';
import { ensureTestImages } from '../../src/devtools/images.js';
import { ControllerClient } from '../../src/shared/controller-client.js';
import type { ErrorJSON } from '../../src/shared/errors.js';
import type { AgentContainer, ContainerView, ControllerView } from '../../src/shared/protocol.js';
import { waitFor } from './wait.js';

const BIN = fileURLToPath(new URL('../../bin/chipmunk.mjs', import.meta.url));
const AGENT_PORT = 7401;
/** The only addresses these helpers talk to: the local cluster's bridge network. */
const LOCAL_CLUSTER_ADDRESS = /^198\.18\.0\.\d{1,3}$/;

const DEFAULT_CLI_TIMEOUT_MS = 120_000;
const CLUSTER_UP_TIMEOUT_MS = 180_000;
const DEFAULT_HTTP_TIMEOUT_MS = 3_000;

/** Where the CLI (and so this fixture) finds the local cluster's state. */
export function clusterStateDir(): string {
  return process.env.CHIPMUNK_CLUSTER_DIR || DEFAULT_STATE_DIR;
}

// ---------------------------------------------------------------- the CLI

export interface CliResult<T = unknown> {
  args: string[];
  /** Exit code; null when killed (timeout). */
  code: number | null;
  stdout: string;
  stderr: string;
  /** stdout parsed as JSON (every command was run with --json), when it parses. */
  json?: T;
  /** The `{"error": ...}` the CLI printed on failure. */
  error?: ErrorJSON;
  ms: number;
}

/** Commands whose first word names a group (`cluster up`, `node ls`): --json goes after the second. */
const COMMAND_GROUPS = new Set(['cluster', 'node']);

/**
 * Where --json goes: right after the (sub)command, because for `run` every word after IMAGE
 * belongs to the container's command.
 */
function withJson(args: string[]): string[] {
  const at = COMMAND_GROUPS.has(args[0] ?? '') ? 2 : 1;
  return [...args.slice(0, at), '--json', ...args.slice(at)];
}

export interface CliOptions {
  timeoutMs?: number;
  env?: Record<string, string>;
}

/**
 * Runs `chipmunk ARGS --json` as a subprocess (the way scripts use it) against the local
 * cluster. Never rejects for a failing command: look at `code` and `error`.
 */
export function cli<T = unknown>(args: string[], opts: CliOptions = {}): Promise<CliResult<T>> {
  const fullArgs = withJson(args);
  // The local cluster, not whatever controller the environment names.
  const { CHIPMUNK_CONTROLLER: _controller, CHIPMUNK_TOKEN: _token, ...inherited } = process.env;
  const started = Date.now();
  const child = spawn(process.execPath, [BIN, ...fullArgs], { env: { ...inherited, ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const timeoutMs = opts.timeoutMs ?? DEFAULT_CLI_TIMEOUT_MS;
  const timer = setTimeout(() => {
    stderr += `\n[test] chipmunk ${fullArgs.join(' ')} killed after ${timeoutMs} ms`;
    child.kill('SIGKILL');
  }, timeoutMs);
  return new Promise((resolve, reject) => {
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      let json: unknown;
      try {
        json = stdout.trim() ? JSON.parse(stdout) : undefined;
      } catch {
        json = undefined;
      }
      const error = json && typeof json === 'object' && 'error' in json ? (json as { error: ErrorJSON }).error : undefined;
      resolve({ args: fullArgs, code, stdout, stderr, json: json as T | undefined, error, ms: Date.now() - started });
    });
  });
}

function describeRun(res: CliResult): string {
  return `chipmunk ${res.args.join(' ')} exited ${res.code} after ${res.ms} ms\nstdout: ${res.stdout.trim()}\nstderr: ${res.stderr.trim()}`;
}

/** `cli()` that must succeed (exit 0): returns the parsed JSON output. */
export async function cliOk<T = unknown>(args: string[], opts: CliOptions = {}): Promise<T> {
  const res = await cli<T>(args, opts);
  if (res.code !== 0 || res.json === undefined) throw new Error(`expected success: ${describeRun(res)}`);
  return res.json;
}

/** `cli()` that must fail: returns the result, whose `error` is then set. */
export async function cliFails(args: string[], opts: CliOptions = {}): Promise<CliResult & { error: ErrorJSON }> {
  const res = await cli(args, opts);
  if (res.code === 0 || res.error === undefined) throw new Error(`expected a failure with a JSON error: ${describeRun(res)}`);
  return res as CliResult & { error: ErrorJSON };
}

/** `chipmunk ps --json`. */
export function ps(): Promise<Pick<ContainerView, 'name' | 'node' | 'status' | 'image' | 'ports' | 'endpoints'>[]> {
  return cliOk(['ps']);
}

// ---------------------------------------------------------------- the cluster

export interface LocalCluster {
  state: LocalClusterState;
  token: string;
  /** node1, node2, ... */
  nodes: string[];
  /** The node's address (198.18.0.x). */
  address(node: string): string;
}

let current: LocalCluster | undefined;
/** How the current cluster was brought up: ensureClusterHealthy brings it up so again. */
let startedWith: { nodes: number; nodeLeaseMs?: number; ha?: boolean; writableLayer?: 'directory' | 'image' } | undefined;

/** The cluster `useLocalCluster()` brought up; throws when called before it is up. */
export function localCluster(): LocalCluster {
  if (!current) throw new Error('the local cluster is not up: call useLocalCluster() at the top of the test file');
  return current;
}

/**
 * Brings a local cluster of NODES nodes up before the file's first test and down after its
 * last (see the file comment). Returns a getter for the running cluster.
 */
export function useLocalCluster(opts: { nodes?: number; nodeLeaseMs?: number; ha?: boolean } = {}): () => LocalCluster {
  const nodes = opts.nodes ?? 3;
  before(async () => {
    await startLocalCluster(nodes, { ...(opts.nodeLeaseMs !== undefined ? { nodeLeaseMs: opts.nodeLeaseMs } : {}), ...(opts.ha ? { ha: true } : {}) });
  }, { timeout: CLUSTER_UP_TIMEOUT_MS + 120_000 });
  after(async () => {
    if (process.env.CHIPMUNK_KEEP_CLUSTER === '1') {
      process.stderr.write(`CHIPMUNK_KEEP_CLUSTER=1: leaving the local cluster up (state in ${clusterStateDir()})\n`);
      return;
    }
    await stopLocalCluster();
  }, { timeout: 120_000 });
  return localCluster;
}

export async function startLocalCluster(nodes: number, opts: { nodeLeaseMs?: number; ha?: boolean; writableLayer?: 'directory' | 'image' } = {}): Promise<LocalCluster> {
  // A cluster left by a crashed or interrupted run (or by hand) would be reused as it is, with
  // its containers and possibly without fault injection: always start from nothing.
  await stopLocalCluster();
  await ensureTestImages();
  const lease = opts.nodeLeaseMs !== undefined ? ['--node-lease', `${opts.nodeLeaseMs}ms`] : [];
  const layer = opts.writableLayer ? ['--writable-layer', opts.writableLayer] : [];
  const up = await cli<LocalClusterState>(['cluster', 'up', '--nodes', String(nodes), ...lease, ...(opts.ha ? ['--ha'] : []), ...layer], {
    env: { CHIPMUNK_ENABLE_FAULTS: '1' },
    timeoutMs: CLUSTER_UP_TIMEOUT_MS,
  });
  if (up.code !== 0) {
    const logs = await readFile(join(clusterStateDir(), 'logs', 'controller.log'), 'utf8').catch(() => '');
    throw new Error(`cannot bring the local cluster up: ${describeRun(up)}\ncontroller log (end): ${logs.slice(-2000)}`);
  }
  startedWith = { nodes, ...opts };
  const state = await readClusterState(clusterStateDir());
  if (!state || state.status !== 'ready') throw new Error(`cluster up succeeded but ${clusterStateDir()}/cluster.json says ${JSON.stringify(state)}`);
  const token = (await readFile(state.tokenFile, 'utf8')).trim();
  const addresses = new Map(state.nodes.map((n) => [n.name, n.address]));
  current = {
    state,
    token,
    nodes: state.nodes.map((n) => n.name),
    address(node: string): string {
      const address = addresses.get(node);
      if (!address) throw new Error(`no node ${node} in the local cluster (${[...addresses.keys()].join(', ')})`);
      return address;
    },
  };
  return current;
}

export async function stopLocalCluster(): Promise<void> {
  current = undefined;
  const down = await cli(['cluster', 'down'], { timeoutMs: 120_000 });
  if (down.code !== 0) throw new Error(`cannot take the local cluster down: ${describeRun(down)}`);
}

/**
 * After a fault: revives whatever of the cluster is down (controller, gateway, agents) and waits
 * until every node is ready again; brings the cluster up anew when that does not work.
 */
export async function ensureClusterHealthy(log: (line: string) => void = () => {}): Promise<void> {
  const cluster = localCluster();
  const { controllerUrl, gatewayUrl } = cluster.state;
  const targets: Array<[string, string]> = [
    ['controller', controllerUrl],
    ['gateway', gatewayUrl!],
    ...cluster.nodes.map((node): [string, string] => [node, `http://${cluster.address(node)}:${AGENT_PORT}`]),
  ];
  try {
    for (const [target, url] of targets) {
      const { hostname, port } = new URL(url);
      if (await answers(hostname, Number(port), '/healthz')) continue;
      log(`${target} is down: reviving it`);
      await clusterRevive(target, { stateDir: clusterStateDir() });
    }
    await waitFor(async () => {
      const nodes = await cliOk<Array<{ name: string; status: string }>>(['node', 'ls'], { timeoutMs: 10_000 });
      return cluster.nodes.every((name) => nodes.find((n) => n.name === name)?.status === 'ready');
    }, 30_000, 'every node ready');
  } catch (err) {
    log(`the cluster does not recover (${(err as Error).message}): bringing it up anew`);
    await startLocalCluster(startedWith!.nodes, startedWith!);
  }
}

// ---------------------------------------------------------------- HTTP to nodes

export interface HttpResult<T = unknown> {
  status: number;
  body: T;
}

function addressOf(nodeOrAddress: string): string {
  const address = LOCAL_CLUSTER_ADDRESS.test(nodeOrAddress) ? nodeOrAddress : localCluster().address(nodeOrAddress);
  if (!LOCAL_CLUSTER_ADDRESS.test(address)) throw new Error(`refusing to send traffic to ${address}: only the local cluster's 198.18.0.x`);
  return address;
}

/**
 * One HTTP request to a node's address (a published port, or the agent), on a fresh connection
 * that is closed after the answer: a kept-alive connection would be checkpointed with the
 * container. Rejects on connection errors and after `timeoutMs` (default 3 s).
 */
export function http<T = any>(
  node: string,
  port: number,
  path: string,
  method: 'GET' | 'POST' | 'PUT' | 'DELETE' = 'GET',
  opts: { timeoutMs?: number; body?: unknown; token?: string; headers?: Record<string, string> } = {},
): Promise<HttpResult<T>> {
  const host = addressOf(node);
  const payload = opts.body === undefined ? undefined : JSON.stringify(opts.body);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host,
        port,
        path,
        method,
        agent: false,
        headers: {
          connection: 'close',
          ...opts.headers,
          ...(payload !== undefined ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {}),
          ...(opts.token ? { authorization: `Bearer ${opts.token}` } : {}),
        },
        timeout: opts.timeoutMs ?? DEFAULT_HTTP_TIMEOUT_MS,
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (text += chunk));
        res.on('end', () => {
          let body: unknown = text;
          try {
            body = JSON.parse(text);
          } catch {
            // not JSON: the text as it is
          }
          resolve({ status: res.statusCode ?? 0, body: body as T });
        });
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} http://${host}:${port}${path}: no answer within ${opts.timeoutMs ?? DEFAULT_HTTP_TIMEOUT_MS} ms`)));
    req.on('error', reject);
    req.end(payload);
  });
}

/** Whether anything answers HTTP at the node's address and port. */
export async function answers(node: string, port: number, path = '/'): Promise<boolean> {
  try {
    await http(node, port, path, 'GET', { timeoutMs: 2_000 });
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------- agents and runc

/** Arms a fault on NODE's agent (src/agent/faults.ts): it fires once. */
export async function armFault(
  node: string,
  plan: { dieBeforeRestore?: boolean; cutTransferAfterBytes?: number; corruptImagesBeforeRestore?: boolean; dieBeforeCheckpointCommit?: boolean },
): Promise<void> {
  const res = await http(node, AGENT_PORT, '/v1/debug/faults', 'POST', { body: plan, token: localCluster().token });
  if (res.status !== 200) throw new Error(`arming ${JSON.stringify(plan)} on ${node} failed: HTTP ${res.status} ${JSON.stringify(res.body)}`);
}

/** Arms a fault in the controller (src/controller/faults.ts), e.g. damaging a stored chunk. */
export async function armControllerFault(plan: { corruptChunkOf?: { container: string; checkpoint: string } }): Promise<void> {
  const url = new URL(localCluster().state.controllerUrl);
  const res = await http(url.hostname, Number(url.port), '/v1/debug/faults', 'POST', { body: plan, token: localCluster().token });
  if (res.status !== 200) throw new Error(`arming ${JSON.stringify(plan)} in the controller failed: HTTP ${res.status} ${JSON.stringify(res.body)}`);
}

/** The containers NODE's agent reports (GET /v1/containers). */
export async function agentContainers(node: string): Promise<AgentContainer[]> {
  const res = await http<AgentContainer[]>(node, AGENT_PORT, '/v1/containers', 'GET', { token: localCluster().token, timeoutMs: 10_000 });
  if (res.status !== 200) throw new Error(`GET /v1/containers on ${node}: HTTP ${res.status} ${JSON.stringify(res.body)}`);
  return res.body;
}

/** Every controller's URL: the one controller's, or (HA) one on each node. */
export function controllerUrls(): string[] {
  const { state } = localCluster();
  return state.controllerUrls ?? [state.controllerUrl];
}

/** A client of the cluster's controllers (URLS: all of them by default), calls bounded by TIMEOUTMS. */
export function controllerClient(urls = controllerUrls(), timeoutMs = 10_000): ControllerClient {
  return new ControllerClient({ urls, token: localCluster().token, timeoutMs });
}

/** What the controller records for each container (GET /v1/containers), polled quickly. */
export async function controllerContainers(): Promise<ContainerView[]> {
  return controllerClient().containers();
}

/** HA: the leading controller as the store names it (asked of the controllers at URLS), if one leads. */
export async function leadingController(urls = controllerUrls()): Promise<(ControllerView & { node: string; term: number }) | undefined> {
  const leader = (await controllerClient(urls).controllers()).find((c) => c.leader);
  if (!leader?.node || leader.term === undefined) return undefined;
  return { ...leader, node: leader.node, term: leader.term };
}

export interface RuncContainer {
  id: string;
  status: string;
  pid: number;
}

/**
 * `runc list` of NODE's runc root, read directly: it works when the node's agent is down, and
 * shows what really runs rather than what anyone recorded.
 */
export function runcList(node: string): Promise<RuncContainer[]> {
  const root = join(DEFAULT_RUN_DIR, node, 'runc');
  return new Promise((resolve, reject) => {
    execFile('runc', ['--root', root, 'list', '--format', 'json'], { timeout: 10_000 }, (err, stdout, stderr) => {
      if (err) {
        reject(new Error(`runc --root ${root} list: ${stderr || err.message}`));
        return;
      }
      resolve(((JSON.parse(stdout.trim() || 'null') as RuncContainer[] | null) ?? []).map(({ id, status, pid }) => ({ id, status, pid })));
    });
  });
}

/** Every running (or, mid-checkpoint, paused) runc incarnation of NAME across the nodes. */
export async function runningCopies(name: string): Promise<Array<{ node: string; id: string }>> {
  const copies: Array<{ node: string; id: string }> = [];
  for (const node of localCluster().nodes) {
    // Agents name incarnations chmk-NODE-NAME-GENERATION.
    const incarnation = new RegExp(`^chmk-${node}-${name.replace(/[.]/g, '\\.')}-\\d+$`);
    // Paused is running too: a checkpoint pauses the container for a moment.
    for (const c of await runcList(node)) if (incarnation.test(c.id) && (c.status === 'running' || c.status === 'paused')) copies.push({ node, id: c.id });
  }
  return copies;
}

/**
 * What migrations left in NODE's agent data dir (migrations/ID/ENTRY), CRIU's logs (criu-work)
 * aside: CRIU images and staged files, which must not outlive their migration.
 */
export async function migrationLeftovers(node: string): Promise<string[]> {
  const dir = join(clusterStateDir(), 'nodes', node, 'migrations');
  const left: string[] = [];
  for (const id of await readdir(dir).catch(() => [] as string[])) {
    for (const entry of await readdir(join(dir, id)).catch(() => [] as string[])) if (entry !== 'criu-work') left.push(`${node}:migrations/${id}/${entry}`);
  }
  return left;
}

// ---------------------------------------------------------------- waiting

export { waitFor };
