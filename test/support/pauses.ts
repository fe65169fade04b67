/**
 * Pause points of the local cluster's daemons (src/shared/pause-point.ts): arm a step on the
 * controller or a node's agent, wait until it got there, resume it. The fault harness kills
 * processes exactly there. Needs a cluster started with CHIPMUNK_ENABLE_FAULTS=1.
 */
import { HA_CONTROLLER_PORT } from '../../src/cluster/ha.js';
import { http, localCluster } from './local-cluster.js';
import { waitFor } from './wait.js';

const AGENT_PORT = 7401;
const HA_CONTROLLER_PREFIX = 'controller@';

/**
 * 'controller' (the one controller of a cluster without --ha), a node name (its agent), or
 * `controller@NODE` (HA: the controller on NODE; see haController()).
 */
export type PauseHolder = string;

/** HA: the holder naming the controller that runs on NODE (the leader's, to pause leader-only work). */
export function haController(node: string): PauseHolder {
  return `${HA_CONTROLLER_PREFIX}${node}`;
}

interface PauseStatus {
  step?: string;
  reached: boolean;
  resumed: boolean;
}

function endpoint(holder: PauseHolder): { host: string; port: number } {
  if (holder === 'controller') {
    const url = new URL(localCluster().state.controllerUrl);
    return { host: url.hostname, port: Number(url.port) };
  }
  if (holder.startsWith(HA_CONTROLLER_PREFIX)) return { host: localCluster().address(holder.slice(HA_CONTROLLER_PREFIX.length)), port: HA_CONTROLLER_PORT };
  return { host: localCluster().address(holder), port: AGENT_PORT };
}

async function call(holder: PauseHolder, method: 'GET' | 'POST', path: string, body?: unknown): Promise<PauseStatus> {
  const { host, port } = endpoint(holder);
  const res = await http<PauseStatus>(host, port, path, method, { token: localCluster().token, timeoutMs: 3_000, ...(body ? { body } : {}) });
  if (res.status !== 200) throw new Error(`${method} ${path} on ${holder}: HTTP ${res.status} ${JSON.stringify(res.body)}`);
  return res.body;
}

/** HOLDER pauses at STEP (once) until resumed, or after MAXMS by itself. */
export async function armPause(holder: PauseHolder, step: string, maxMs = 120_000): Promise<void> {
  await call(holder, 'POST', '/v1/debug/faults', { pauseAt: step, pauseMaxMs: maxMs });
}

export async function pauseStatus(holder: PauseHolder): Promise<PauseStatus> {
  return call(holder, 'GET', '/v1/debug/faults');
}

/** Lets HOLDER go on (or disarms a step not reached). A holder that is dead has nothing to resume. */
export async function resumePause(holder: PauseHolder): Promise<void> {
  await call(holder, 'POST', '/v1/debug/faults/resume').catch(() => undefined);
}

/** Waits until one of HOLDERS reached its armed step; returns which. */
export async function waitForPause(holders: PauseHolder[], timeoutMs: number, what: string): Promise<PauseHolder> {
  return waitFor(async () => {
    for (const holder of holders) if ((await pauseStatus(holder).catch(() => undefined))?.reached) return holder;
    return undefined;
  }, timeoutMs, what);
}
