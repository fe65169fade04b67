/**
 * The agent's heartbeat: its registration, repeated, to any of the controllers. Each answer sizes
 * the next interval (a quarter of the controller's node lease) and lists the containers to fence.
 *
 * Each try is bounded by half the lease (two intervals): a controller that takes the request and
 * then hangs (cut off from etcd, its store calls waiting out their 5 s deadline) must not cost the
 * node its lease, so the agent gives up on it in time to try the next one. A heartbeat is a PUT,
 * idempotent, so the client may send it to the next controller whatever the first one did.
 */
import type { Logger } from 'pino';
import { ControllerClient } from '../shared/controller-client.js';
import type { HeartbeatResponse, RegisterNodeRequest } from '../shared/protocol.js';

/** Until the first answer says otherwise. */
const DEFAULT_HEARTBEAT_MS = 2_000;
/** A try may use this many intervals: with intervals of a quarter lease, half of it. */
const TRY_INTERVALS = 2;

export interface HeartbeatOptions {
  controllerUrls: string[];
  token: string;
  registration: RegisterNodeRequest;
  /** A fixed interval; by default the one each answer gives. */
  intervalMs?: number;
  /**
   * Acts on an answer (fencing), beside the heartbeats: one pass at a time, and an answer that
   * comes while one runs is not acted on (the next one lists what is still to do).
   */
  onAnswer: (answer: HeartbeatResponse) => Promise<void>;
  log: Logger;
}

export interface Heartbeats {
  stop(): void;
}

/** Sends the first heartbeat (resolves once it was answered or failed), then one every interval until stopped. */
export async function startHeartbeats(opts: HeartbeatOptions): Promise<Heartbeats> {
  const controller = new ControllerClient({ urls: opts.controllerUrls, token: opts.token });
  let intervalMs = opts.intervalMs ?? DEFAULT_HEARTBEAT_MS;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  let warned = false;
  let acting: Promise<void> | undefined;
  const beat = async () => {
    try {
      const answer = await controller.heartbeat(opts.registration, { timeoutMs: TRY_INTERVALS * intervalMs });
      warned = false;
      if (opts.intervalMs === undefined) intervalMs = answer.heartbeatMs;
      // Not awaited: removing a fenced copy (runc, mounts, network) can take seconds on a loaded
      // host, and heartbeats held back that long let the node's lease run out: it was judged dead
      // again and its containers failed over once more (seen in cluster-ha-faults).
      acting ??= opts
        .onAnswer(answer)
        .catch((err: unknown) => opts.log.error({ err: (err as Error).message }, 'acting on the heartbeat answer failed; the next answer says what is still to do'))
        .finally(() => (acting = undefined));
    } catch (err) {
      if (!warned) opts.log.warn({ err: (err as Error).message }, 'cannot reach the controller; will keep trying');
      warned = true;
    }
  };
  const loop = async () => {
    await beat();
    if (!stopped) timer = setTimeout(() => void loop(), intervalMs);
  };
  await loop();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}
