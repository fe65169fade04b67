/**
 * The controller's view of one agent: the agent HTTP API of docs/design.md as typed methods.
 * The orchestrator and the container service depend on the AgentApi interface only, so tests
 * drive them with in-memory agents and the HTTP details stay here.
 */
import { ApiClient } from '../shared/http.js';
import type {
  AgentContainer,
  AgentInfo,
  ContainerSpec,
  ContainerStats,
  DumpRequest,
  DumpState,
  DumpResult,
  PrepareRequest,
  RestoreRequest,
  RestoreResult,
  RollbackRequest,
  SettleResult,
  TakeCheckpointRequest,
  TakeCheckpointResult,
  TransferProgress,
  UploadCheckpointRequest,
} from '../shared/protocol.js';
import type { CheckpointInfo } from '../checkpoint-store/index.js';

export type LogStream = 'stdout' | 'stderr' | 'all';

export interface LogsOptions {
  stream?: LogStream;
  /** Last N lines only. */
  tail?: number;
}

export interface AgentApi {
  info(): Promise<AgentInfo>;
  listContainers(): Promise<AgentContainer[]>;
  run(spec: ContainerSpec): Promise<AgentContainer>;
  get(name: string): Promise<AgentContainer>;
  stop(name: string): Promise<AgentContainer>;
  remove(name: string): Promise<void>;
  logs(name: string, opts?: LogsOptions): Promise<string>;
  stats(name: string): Promise<ContainerStats>;
  /** Source side: freeze and dump the container. */
  dump(name: string, req: DumpRequest): Promise<DumpResult>;
  /** Target side: fetch the dump from the source agent (or a checkpoint from the store) and restore it. */
  restore(migrationId: string, req: RestoreRequest): Promise<RestoreResult>;
  /** Source side: the migration failed after the dump; run the container here again. */
  rollback(migrationId: string): Promise<AgentContainer>;
  /** Source side: whether it can still run the container again from its dump (after a failure). */
  dumpState(migrationId: string): Promise<DumpState>;
  /** Source side: the target runs the container; serve the remaining pages, then clean up. */
  finish(migrationId: string): Promise<void>;
  /** Target side, before the dump: image and network ready, nothing frozen yet. */
  prepare(migrationId: string, req: PrepareRequest): Promise<void>;
  /** Target side: bytes received so far by a restore in progress. */
  progress(migrationId: string): Promise<TransferProgress>;
  /** Target side, after finish: wait for the last lazy page, drop the images, report bytes. */
  settle(migrationId: string): Promise<SettleResult>;
  /** Target side: remove whatever a failed restore left behind. */
  abort(migrationId: string): Promise<void>;
  /** Checkpoint the container and let it run on; the trees wait on the agent for upload. */
  checkpoint(name: string, req: TakeCheckpointRequest): Promise<TakeCheckpointResult>;
  /** Send a checkpoint taken on the agent to the checkpoint store, only the chunks it lacks. */
  uploadCheckpoint(checkpointId: string, req: UploadCheckpointRequest): Promise<CheckpointInfo>;
  /** Drop a checkpoint's trees on the agent (uploaded or not). */
  discardCheckpoint(checkpointId: string): Promise<void>;
}

export interface HttpAgentApiOptions {
  node: string;
  url: string;
  token: string;
  /** For ordinary requests. */
  timeoutMs?: number;
  /** For the migration steps, which copy images and wait for CRIU: minutes, not seconds. */
  migrationStepTimeoutMs?: number;
  /** The controller leader's term, sent with every call (src/shared/term-fence.ts). */
  term?: () => number | undefined;
}

const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_MIGRATION_STEP_TIMEOUT_MS = 15 * 60_000;

export class HttpAgentApi implements AgentApi {
  private readonly client: ApiClient;
  private readonly requestTimeout: { timeoutMs: number };
  private readonly stepTimeout: { timeoutMs: number };

  constructor(opts: HttpAgentApiOptions) {
    this.requestTimeout = { timeoutMs: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS };
    this.client = new ApiClient({ baseUrl: opts.url, token: opts.token, timeoutMs: this.requestTimeout.timeoutMs, peer: `agent ${opts.node}`, term: opts.term });
    this.stepTimeout = { timeoutMs: opts.migrationStepTimeoutMs ?? DEFAULT_MIGRATION_STEP_TIMEOUT_MS };
  }

  info(): Promise<AgentInfo> {
    return this.client.get('/v1/info');
  }

  listContainers(): Promise<AgentContainer[]> {
    return this.client.get('/v1/containers');
  }

  run(spec: ContainerSpec): Promise<AgentContainer> {
    return this.client.post('/v1/containers', spec);
  }

  get(name: string): Promise<AgentContainer> {
    return this.client.get(containerPath(name));
  }

  stop(name: string): Promise<AgentContainer> {
    return this.client.post(`${containerPath(name)}/stop`);
  }

  remove(name: string): Promise<void> {
    return this.client.delete(containerPath(name));
  }

  async logs(name: string, opts: LogsOptions = {}): Promise<string> {
    const query = new URLSearchParams();
    if (opts.stream !== undefined) query.set('stream', opts.stream);
    if (opts.tail !== undefined) query.set('tail', String(opts.tail));
    const queryText = query.toString();
    // Logs are text/plain, not JSON: read the body as it is.
    const res = await this.client.stream('GET', `${containerPath(name)}/logs${queryText ? `?${queryText}` : ''}`, undefined, this.requestTimeout);
    return res.body.text();
  }

  stats(name: string): Promise<ContainerStats> {
    return this.client.get(`${containerPath(name)}/stats`);
  }

  dump(name: string, req: DumpRequest): Promise<DumpResult> {
    return this.client.post(`${containerPath(name)}/dump`, req, this.stepTimeout);
  }

  restore(migrationId: string, req: RestoreRequest): Promise<RestoreResult> {
    return this.client.post(`${migrationPath(migrationId)}/restore`, req, this.stepTimeout);
  }

  rollback(migrationId: string): Promise<AgentContainer> {
    const body: RollbackRequest = { migrationId };
    return this.client.post(`${migrationPath(migrationId)}/rollback`, body, this.stepTimeout);
  }

  prepare(migrationId: string, req: PrepareRequest): Promise<void> {
    return this.client.post(`${migrationPath(migrationId)}/prepare`, req, this.stepTimeout);
  }

  progress(migrationId: string): Promise<TransferProgress> {
    return this.client.get(`${migrationPath(migrationId)}/progress`, { timeoutMs: 2_000 });
  }

  settle(migrationId: string): Promise<SettleResult> {
    return this.client.post(`${migrationPath(migrationId)}/settle`, undefined, this.stepTimeout);
  }

  dumpState(migrationId: string): Promise<DumpState> {
    return this.client.get(`${migrationPath(migrationId)}/dump`, this.requestTimeout);
  }

  finish(migrationId: string): Promise<void> {
    return this.client.post(`${migrationPath(migrationId)}/finish`, undefined, this.stepTimeout);
  }

  abort(migrationId: string): Promise<void> {
    return this.client.post(`${migrationPath(migrationId)}/abort`, undefined, this.stepTimeout);
  }

  checkpoint(name: string, req: TakeCheckpointRequest): Promise<TakeCheckpointResult> {
    return this.client.post(`${containerPath(name)}/checkpoints`, req, this.stepTimeout);
  }

  uploadCheckpoint(checkpointId: string, req: UploadCheckpointRequest): Promise<CheckpointInfo> {
    return this.client.post(`/v1/checkpoints/${encodeURIComponent(checkpointId)}/upload`, req, this.stepTimeout);
  }

  discardCheckpoint(checkpointId: string): Promise<void> {
    return this.client.delete(`/v1/checkpoints/${encodeURIComponent(checkpointId)}`);
  }
}

function containerPath(name: string): string {
  return `/v1/containers/${encodeURIComponent(name)}`;
}

function migrationPath(migrationId: string): string {
  return `/v1/migrations/${encodeURIComponent(migrationId)}`;
}
