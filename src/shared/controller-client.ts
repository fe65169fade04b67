/**
 * The controller's API as typed calls: the CLI, the demo, tests and benches talk to the
 * controller through this one client, never through hand-built URLs.
 *
 * A client may know several controller URLs (`--controller URL1,URL2`): it sticks to the one that
 * answered last and moves on to the next when that one cannot be reached. It moves on for any
 * call when no connection was made (nothing was sent, so nothing can have happened twice), and
 * for idempotent calls (reads, PUT, DELETE) whatever the connection did, and when a controller
 * answers that it cannot reach the state store (cut off from etcd: another one may not be).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Dispatcher } from 'undici';

import type { CheckpointDiff, CheckpointInfo, CheckpointSummary } from '../checkpoint-store/protocol.js';

import { ChipmunkError, NotLeaderError, UnavailableError, type ErrorJSON } from './errors.js';
import { ApiClient, neverConnected } from './http.js';
import type {
  ContainerSpec,
  ContainerStats,
  ContainerView,
  ControllerView,
  ExposeRequest,
  ExposedRoute,
  HeartbeatResponse,
  MigrateRequest,
  MigrationEvent,
  MigrationRecord,
  MigrationSummary,
  NodeView,
  PortMapping,
  ProtectionPolicy,
  RegisterNodeRequest,
  RunRequest,
} from './protocol.js';
import type { CheckpointReplicaView, RetireReplicaResult } from './replica-protocol.js';

export interface ControllerClientOptions {
  /** One URL per controller; at least one. */
  urls: string[];
  token: string;
  /** Per call (streams excepted: a migration takes as long as it takes). */
  timeoutMs?: number;
  /** How long a call waits for a leader to be elected (default 20 s). */
  leaderWaitMs?: number;
}

/**
 * What `run` sends: a RunRequest whose defaulted fields (command, env, ports and their protocol,
 * memory) may be left out; the controller's schema fills them in.
 */
export type RunInput = Omit<RunRequest, 'spec'> & {
  spec: Pick<ContainerSpec, 'name' | 'image'> &
    Partial<Omit<ContainerSpec, 'name' | 'image' | 'ports'>> & { ports?: Array<Omit<PortMapping, 'protocol'> & Partial<Pick<PortMapping, 'protocol'>>> };
};

/** One line of a migration's progress stream. */
export type MigrationStreamLine = MigrationEvent | { summary: MigrationSummary } | { error: ErrorJSON };

/** What `POST /v1/containers/:name/checkpoint` answers: the stored checkpoint and how long the container was frozen. */
export type CheckpointTaken = CheckpointInfo & { frozenMs: number };

export interface RestoreFromResult {
  restoredFrom: string;
  safetyCheckpoint: string;
  checkpoint: string;
}

/** A failover as `GET /v1/failovers` lists it (the fields every record has, and what it may add). */
export interface FailoverView {
  id: string;
  name: string;
  from: string;
  to?: string;
  outcome: 'running' | 'done' | 'failed';
  checkpoint?: string;
  /** The checkpoint store replicas the restore read the checkpoint from. */
  readFrom?: string[];
  replayed?: number;
  detectedAt: number;
  finishedAt?: number;
  [field: string]: unknown;
}

const DEFAULT_LEADER_WAIT_MS = 20_000;
/** A retirement copies every checkpoint the replica holds before it answers. */
const RETIRE_TIMEOUT_MS = 30 * 60_000;
const LEADER_RETRY_MS = 500;


const containerPath = (name: string) => `/v1/containers/${encodeURIComponent(name)}`;

export class ControllerClient {
  private readonly apis: ApiClient[];
  /** The controller that answered last: tried first. */
  private current = 0;
  private readonly leaderWaitMs: number;

  constructor(opts: ControllerClientOptions) {
    if (opts.urls.length === 0) throw new ChipmunkError('CHIPMUNK_INVALID_INPUT', 'a controller client needs at least one controller URL');
    this.leaderWaitMs = opts.leaderWaitMs ?? DEFAULT_LEADER_WAIT_MS;
    this.apis = opts.urls.map((url) => new ApiClient({ baseUrl: url, token: opts.token, timeoutMs: opts.timeoutMs, peer: 'controller' }));
  }

  /** The URL calls go to first. */
  get url(): string {
    return this.apis[this.current]!.baseUrl;
  }

  // ------------------------------------------------------------ nodes

  nodes(): Promise<NodeView[]> {
    return this.call(true, (api) => api.get<NodeView[]>('/v1/nodes'));
  }

  /** The cluster's controllers and which one leads (and its term, when they elect one). */
  controllers(): Promise<ControllerView[]> {
    return this.call(true, (api) => api.get<ControllerView[]>('/v1/controllers'));
  }

  /** An agent's registration and heartbeat in one: the answer sizes the next heartbeat and lists what to fence. */
  heartbeat(node: RegisterNodeRequest, opts: { timeoutMs?: number } = {}): Promise<HeartbeatResponse> {
    return this.call(true, (api) => api.put<HeartbeatResponse>(`/v1/nodes/${encodeURIComponent(node.name)}`, node, opts));
  }

  // ------------------------------------------------------------ containers

  run(request: RunInput): Promise<ContainerView> {
    return this.call(false, (api) => api.post<ContainerView>('/v1/containers', request));
  }

  containers(): Promise<ContainerView[]> {
    return this.call(true, (api) => api.get<ContainerView[]>('/v1/containers'));
  }

  stats(name: string): Promise<ContainerStats> {
    return this.call(true, (api) => api.get<ContainerStats>(`${containerPath(name)}/stats`));
  }

  /** The container's output, as the agent streams it (by default both streams, all of it). */
  logs(name: string, opts: { stream?: 'stdout' | 'stderr' | 'all'; tail?: number } = {}): Promise<Dispatcher.ResponseData> {
    const query = new URLSearchParams();
    if (opts.stream) query.set('stream', opts.stream);
    if (opts.tail !== undefined) query.set('tail', String(opts.tail));
    const search = query.size > 0 ? `?${query}` : '';
    return this.call(true, (api) => api.stream('GET', `${containerPath(name)}/logs${search}`));
  }

  stop(name: string): Promise<ContainerView> {
    return this.call(false, (api) => api.post<ContainerView>(`${containerPath(name)}/stop`));
  }

  remove(name: string): Promise<void> {
    return this.call(true, (api) => api.delete<void>(containerPath(name)));
  }

  expose(name: string, request: ExposeRequest): Promise<ExposedRoute> {
    return this.call(false, (api) => api.post<ExposedRoute>(`${containerPath(name)}/expose`, request));
  }

  unexpose(name: string): Promise<void> {
    return this.call(true, (api) => api.delete<void>(`${containerPath(name)}/expose`));
  }

  // ------------------------------------------------------------ migrations

  /** Starts a migration and yields its progress lines as they come, ending with a summary or an error line. */
  async migrate(name: string, request: MigrateRequest): Promise<AsyncGenerator<MigrationStreamLine>> {
    const res = await this.call(false, (api) => api.stream('POST', `${containerPath(name)}/migrate`, request));
    return ndjsonLines(res.body);
  }

  migrations(): Promise<MigrationRecord[]> {
    return this.call(true, (api) => api.get<MigrationRecord[]>('/v1/migrations'));
  }

  // ------------------------------------------------------------ protection and checkpoints

  protect(name: string, policy: ProtectionPolicy): Promise<ProtectionPolicy> {
    return this.call(true, (api) => api.put<ProtectionPolicy>(`${containerPath(name)}/protection`, policy));
  }

  unprotect(name: string): Promise<void> {
    return this.call(true, (api) => api.delete<void>(`${containerPath(name)}/protection`));
  }

  checkpoint(name: string): Promise<CheckpointTaken> {
    return this.call(false, (api) => api.post<CheckpointTaken>(`${containerPath(name)}/checkpoint`));
  }

  /** Newest first; a damaged one is listed with `corrupt`. */
  checkpoints(name: string): Promise<Array<CheckpointSummary & { corrupt?: string }>> {
    return this.call(true, (api) => api.get<Array<CheckpointSummary & { corrupt?: string }>>(`${containerPath(name)}/checkpoints`));
  }

  /** A directory listing (JSON) or a file's bytes, as the container's files were at checkpoint AT (read from a replica holding it). */
  files(name: string, at: string, path: string): Promise<Dispatcher.ResponseData> {
    return this.call(true, (api) => api.stream('GET', `${containerPath(name)}/checkpoints/${encodeURIComponent(at)}/files?path=${encodeURIComponent(path)}`));
  }

  diff(name: string, from: string, to: string): Promise<CheckpointDiff> {
    return this.call(true, (api) => api.get<CheckpointDiff>(`${containerPath(name)}/checkpoints/diff?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`));
  }

  restore(name: string, from: string): Promise<RestoreFromResult> {
    return this.call(false, (api) => api.post<RestoreFromResult>(`${containerPath(name)}/restore`, { from }));
  }

  failovers(): Promise<FailoverView[]> {
    return this.call(true, (api) => api.get<FailoverView[]>('/v1/failovers'));
  }

  // ------------------------------------------------------------ checkpoint replicas

  /** The checkpoint store replicas: active, retiring and retired, with what each holds. */
  checkpointReplicas(): Promise<CheckpointReplicaView[]> {
    return this.call(true, (api) => api.get<CheckpointReplicaView[]>('/v1/checkpoint-replicas'));
  }

  /** Retires a replica for good once its checkpoints are on N others (idempotent: sent again, it answers `alreadyRetired`). */
  retireCheckpointReplica(url: string): Promise<RetireReplicaResult> {
    return this.call(true, (api) => api.post<RetireReplicaResult>('/v1/checkpoint-replicas/retire', { url }, { timeoutMs: RETIRE_TIMEOUT_MS }));
  }

  // ------------------------------------------------------------ controller choice

  /**
   * Runs CALL against the controller tried first, then each other one in turn while none can be
   * reached. A call that is not IDEMPOTENT moves on only if its connection was never made. While
   * no controller leads (`CHIPMUNK_NOT_LEADER`: the call reached no leader, so it is safe to send
   * again) it tries again for up to `leaderWaitMs`: an election takes seconds.
   */
  private async call<T>(idempotent: boolean, call: (api: ApiClient) => Promise<T>): Promise<T> {
    const deadline = Date.now() + this.leaderWaitMs;
    for (;;) {
      try {
        return await this.callOnce(idempotent, call);
      } catch (err) {
        if (!(err instanceof NotLeaderError) || Date.now() >= deadline) throw err;
        await sleep(LEADER_RETRY_MS);
      }
    }
  }

  private async callOnce<T>(idempotent: boolean, call: (api: ApiClient) => Promise<T>): Promise<T> {
    const failures: string[] = [];
    for (let tried = 0; tried < this.apis.length; tried++) {
      const index = (this.current + tried) % this.apis.length;
      try {
        const result = await call(this.apis[index]!);
        this.current = index;
        return result;
      } catch (err) {
        if (err instanceof NotLeaderError && tried < this.apis.length - 1) {
          failures.push(err.message);
          continue;
        }
        // A controller cut off from the cluster's state answers, but cannot serve: for an idempotent call, another may.
        if (idempotent && isStoreFailure(err) && tried < this.apis.length - 1) {
          failures.push(err.message);
          continue;
        }
        if (!isUnreachable(err) || this.apis.length === 1) throw err;
        if (!idempotent && !neverConnected(socketCode(err))) {
          throw new UnavailableError(
            `${(err as Error).message}; the request may have reached it, so it was not sent to another controller: check with 'chipmunk ps' before trying again`,
            (err as ChipmunkError).details,
            err,
          );
        }
        failures.push((err as Error).message);
      }
    }
    throw new UnavailableError(`no controller answers: ${failures.join('; ')}`, { urls: this.apis.map((api) => api.baseUrl) });
  }
}

/** A controller that answered it could not reach its state store (etcd out of its reach). */
function isStoreFailure(err: unknown): err is ChipmunkError {
  return err instanceof ChipmunkError && err.code === 'CHIPMUNK_STORE_FAILED';
}

/** A controller that could not be reached (not one that answered with an error of its own). */
function isUnreachable(err: unknown): boolean {
  return err instanceof UnavailableError && socketCode(err) !== '';
}

function socketCode(err: unknown): string {
  const code = (err as ChipmunkError).details?.code;
  return typeof code === 'string' ? code : '';
}

/** NDJSON: one JSON value per line; a multi-byte character may be split across chunks. */
async function* ndjsonLines(body: AsyncIterable<Buffer>): AsyncGenerator<MigrationStreamLine> {
  const decoder = new TextDecoder();
  let buffered = '';
  for await (const chunk of body) {
    buffered += decoder.decode(chunk, { stream: true });
    let newline: number;
    while ((newline = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, newline).trim();
      buffered = buffered.slice(newline + 1);
      if (line) yield parseLine(line);
    }
  }
  buffered += decoder.decode();
  if (buffered.trim()) yield parseLine(buffered.trim());
}

function parseLine(line: string): MigrationStreamLine {
  try {
    return JSON.parse(line) as MigrationStreamLine;
  } catch {
    throw new ChipmunkError('CHIPMUNK_INTERNAL', `the controller sent a malformed progress line: ${line.slice(0, 200)}`);
  }
}
