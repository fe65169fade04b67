/**
 * The controller's HTTP API (docs/design.md, "Controller HTTP API"): fastify with the TypeBox
 * schemas of src/shared/protocol.ts validating every request, and the shared conventions (cluster
 * token, errors as `{code, message, details}`).
 */
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Type } from '@sinclair/typebox';
import { InvalidInputError, toChipmunkError } from '../shared/errors.js';
import { installApiConventions } from '../shared/http.js';
import {
  ContainerName,
  ContainerStats,
  ContainerView,
  ControllerView,
  ExposeRequest,
  ExposedRoute,
  HeartbeatResponse,
  MigrateRequest,
  MigrationRecord,
  NodeName,
  NodeView,
  ProtectionPolicy,
  RegisterNodeRequest,
  RestoreFromRequest,
  RunRequest,
} from '../shared/protocol.js';
import { CheckpointDiff, CheckpointId, CheckpointInfo, CheckpointSummary, DiffQuery, FilesQuery, checkpointStoreRoutes, type CheckpointStore } from '../checkpoint-store/index.js';
import { CheckpointReplicaView, RetireReplicaRequest, RetireReplicaResult } from '../shared/replica-protocol.js';
import type { CheckpointBrowser } from './checkpoint-browse.js';
import type { ReplicaAdmin } from './checkpoint-replica-admin.js';
import type { CheckpointService } from './checkpoints.js';
import type { ContainerService } from './containers.js';
import type { FailoverService } from './failover.js';
import type { Fences } from './fences.js';
import { registerControllerFaults } from './faults.js';
import { forwardToLeader, type LeaderView } from './forward.js';
import type { MigrationOrchestrator } from './migration.js';
import type { NodeRegistry } from './registry.js';
import type { RouteService } from './routes.js';

export interface ControllerServerOptions {
  token: string;
  logger: FastifyBaseLogger;
  nodes: NodeRegistry;
  containers: ContainerService;
  migrations: MigrationOrchestrator;
  routes: RouteService;
  checkpoints: CheckpointService;
  failovers: FailoverService;
  fences: Fences;
  /** This controller's checkpoint store replica, served on this API for agents (uploads, downloads) and the other controllers. */
  checkpointStore: CheckpointStore;
  /** The CLI's files and diff, read from the replicas that hold the checkpoint. */
  browser: CheckpointBrowser;
  /** The checkpoint replica set: listed, and a replica retired for good. */
  replicas: ReplicaAdmin;
  /** How often agents should heartbeat (a fraction of the node lease). */
  heartbeatMs: number;
  /** The debug route of src/controller/faults.ts answers (CHIPMUNK_ENABLE_FAULTS=1). */
  enableFaults?: boolean;
  /** With several controllers (an etcd store): who leads, so a follower passes requests on (forward.ts); SELF names this one. */
  leadership?: { view: LeaderView; self: string };
  /** The cluster's controllers and which one leads. */
  controllers: () => Promise<ControllerView[]>;
}

const CheckpointResultView = Type.Composite([CheckpointInfo, Type.Object({ frozenMs: Type.Number() })]);
const RestoreFromResult = Type.Object({ restoredFrom: Type.String(), safetyCheckpoint: Type.String(), checkpoint: Type.String() });

const NodeParams = Type.Object({ name: NodeName });
const ContainerParams = Type.Object({ name: ContainerName });
const ContainerCheckpointParams = Type.Object({ name: ContainerName, id: CheckpointId });
const LogsQuery = Type.Object({
  stream: Type.Optional(Type.Union([Type.Literal('stdout'), Type.Literal('stderr'), Type.Literal('all')])),
  tail: Type.Optional(Type.Integer({ minimum: 0 })),
});

export function buildControllerServer(opts: ControllerServerOptions): FastifyInstance {
  const { nodes, containers, migrations, checkpoints, failovers } = opts;
  const base = Fastify({
    loggerInstance: opts.logger,
    // Agents heartbeat every few seconds: logging those requests would bury everything else.
    logController: new LogController({ disableRequestLogging: (req) => isHeartbeat(req.method, req.url) || req.url === '/healthz' }),
  });
  installApiConventions(base, opts.token);
  if (opts.leadership) forwardToLeader(base, opts.leadership.view, opts.leadership.self);
  const app = base.withTypeProvider<TypeBoxTypeProvider>();

  app.get('/healthz', async () => ({ ok: true }));

  app.put('/v1/nodes/:name', { schema: { params: NodeParams, body: RegisterNodeRequest, response: { 200: HeartbeatResponse } } }, async (req) => {
    if (req.body.name !== req.params.name) {
      throw new InvalidInputError(`node name in the path (${req.params.name}) and in the body (${req.body.name}) differ`, {
        path: req.params.name,
        body: req.body.name,
      });
    }
    const view = await nodes.heartbeat(req.body);
    return { ...view, heartbeatMs: opts.heartbeatMs, fence: await opts.fences.forNode(req.params.name) };
  });

  app.get('/v1/controllers', { schema: { response: { 200: Type.Array(ControllerView) } } }, async () => opts.controllers());

  app.get('/v1/nodes', { schema: { response: { 200: Type.Array(NodeView) } } }, async () => nodes.list());

  app.post('/v1/containers', { schema: { body: RunRequest, response: { 201: ContainerView } } }, async (req, reply) => {
    const view = await containers.run(req.body);
    return reply.code(201).send(view);
  });

  app.get('/v1/containers', { schema: { response: { 200: Type.Array(ContainerView) } } }, async () => {
    const endpoints = await opts.routes.endpointsByContainer();
    return (await containers.list()).map((c) => ({ ...c, endpoints: endpoints.get(c.name) ?? [] }));
  });

  app.post('/v1/containers/:name/expose', { schema: { params: ContainerParams, body: ExposeRequest, response: { 200: ExposedRoute } } }, async (req) => {
    const route = await checkpoints.startingLog(req.params.name, 'expose', () => opts.routes.expose(req.params.name, req.body));
    checkpoints.expedite(req.params.name);
    return route;
  });

  app.delete('/v1/containers/:name/expose', { schema: { params: ContainerParams } }, async (req, reply) => {
    await opts.routes.unexpose(req.params.name);
    reply.code(204);
  });

  app.get('/v1/containers/:name/logs', { schema: { params: ContainerParams, querystring: LogsQuery } }, async (req, reply) => {
    const text = await containers.logs(req.params.name, req.query);
    return reply.type('text/plain; charset=utf-8').send(text);
  });

  app.get('/v1/containers/:name/stats', { schema: { params: ContainerParams, response: { 200: ContainerStats } } }, async (req) =>
    containers.stats(req.params.name),
  );

  app.post('/v1/containers/:name/stop', { schema: { params: ContainerParams, response: { 200: ContainerView } } }, async (req) =>
    containers.stop(req.params.name),
  );

  app.delete('/v1/containers/:name', { schema: { params: ContainerParams } }, async (req, reply) => {
    await containers.remove(req.params.name);
    // Its route, checkpoints and fences go with it: a later container of the same name must get none of them.
    if (await opts.routes.get(req.params.name)) await opts.routes.unexpose(req.params.name);
    await checkpoints.forget(req.params.name);
    await opts.fences.forget(req.params.name);
    return reply.code(204).send();
  });

  app.post('/v1/containers/:name/migrate', { schema: { params: ContainerParams, body: MigrateRequest } }, async (req, reply) => {
    const stream = new NdjsonReply(reply);
    try {
      const summary = await migrations.migrate(req.params.name, req.body, (event) => stream.write(event));
      stream.write({ summary });
    } catch (err) {
      // Refused before it started (nothing was streamed yet): an ordinary error answer with its status.
      if (!stream.started) throw err;
      stream.write({ error: toChipmunkError(err).toJSON() });
    }
    stream.end();
  });

  app.get('/v1/migrations', { schema: { response: { 200: Type.Array(MigrationRecord) } } }, async () => migrations.list());

  // ---------------------------------------------------------------- protection, checkpoints, failover

  app.post('/v1/containers/:name/checkpoint', { schema: { params: ContainerParams, response: { 200: CheckpointResultView } } }, async (req) =>
    checkpoints.checkpoint(req.params.name),
  );

  app.get('/v1/containers/:name/checkpoints', { schema: { params: ContainerParams, response: { 200: Type.Array(CheckpointSummary) } } }, async (req) => {
    await containers.require(req.params.name);
    return checkpoints.list(req.params.name);
  });

  // A directory answers DirectoryListing (JSON), a file its bytes (application/octet-stream), as the replica read gives them.
  app.get('/v1/containers/:name/checkpoints/:id/files', { schema: { params: ContainerCheckpointParams, querystring: FilesQuery } }, async (req, reply) => {
    await containers.require(req.params.name);
    const res = await opts.browser.files(req.params.name, req.params.id, req.query.path);
    reply.type(String(res.headers['content-type'] ?? 'application/octet-stream'));
    if (res.headers['content-length'] !== undefined) reply.header('content-length', res.headers['content-length']);
    return reply.send(res.body);
  });

  app.get('/v1/containers/:name/checkpoints/diff', { schema: { params: ContainerParams, querystring: DiffQuery, response: { 200: CheckpointDiff } } }, async (req) => {
    await containers.require(req.params.name);
    return opts.browser.diff(req.params.name, req.query.from, req.query.to);
  });

  app.put('/v1/containers/:name/protection', { schema: { params: ContainerParams, body: ProtectionPolicy, response: { 200: ProtectionPolicy } } }, async (req) =>
    checkpoints.protect(req.params.name, req.body),
  );

  app.delete('/v1/containers/:name/protection', { schema: { params: ContainerParams } }, async (req, reply) => {
    await checkpoints.unprotect(req.params.name);
    reply.code(204);
  });

  app.post('/v1/containers/:name/restore', { schema: { params: ContainerParams, body: RestoreFromRequest, response: { 200: RestoreFromResult } } }, async (req) =>
    checkpoints.restoreFrom(req.params.name, req.body.from),
  );

  app.get('/v1/failovers', async () => failovers.list());

  // Not under /v1/checkpoints/: that is this controller's own store replica, which followers answer themselves.
  app.get('/v1/checkpoint-replicas', { schema: { response: { 200: Type.Array(CheckpointReplicaView) } } }, async () => opts.replicas.list());

  app.post('/v1/checkpoint-replicas/retire', { schema: { body: RetireReplicaRequest, response: { 200: RetireReplicaResult } } }, async (req) => opts.replicas.retire(req.body.url));

  void base.register(checkpointStoreRoutes(opts.checkpointStore));
  registerControllerFaults(base, opts.checkpointStore, opts.enableFaults ?? false);

  return base;
}

function isHeartbeat(method: string, url: string): boolean {
  return method === 'PUT' && url.startsWith('/v1/nodes/');
}

/**
 * A migration's answer: one JSON object per line as the phases happen. The status line goes out
 * with the first line, so until then the route can still answer with an ordinary error.
 */
class NdjsonReply {
  started = false;

  constructor(private readonly reply: FastifyReply) {}

  write(line: unknown): void {
    const raw = this.reply.raw;
    if (!this.started) {
      this.started = true;
      this.reply.hijack();
      raw.writeHead(200, { 'content-type': 'application/x-ndjson; charset=utf-8', 'cache-control': 'no-store' });
    }
    // A client that went away stops reading, not the migration: it runs to its end either way.
    if (!raw.destroyed) raw.write(`${JSON.stringify(line)}\n`);
  }

  end(): void {
    if (!this.reply.raw.destroyed) this.reply.raw.end();
  }
}
