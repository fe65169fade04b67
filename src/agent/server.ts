/**
 * The agent's HTTP API (docs/design.md lists it). Thin: validation comes from the protocol
 * schemas, the work from the ContainerRuntime, the streaming of trees from transfer.ts.
 */
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Type } from '@sinclair/typebox';
import { CheckpointInfo, checkpointPartUrl, uploadCheckpoint } from '../checkpoint-store/index.js';
import { NotFoundError, TransferFailedError } from '../shared/errors.js';
import { installApiConventions } from '../shared/http.js';
import { removeTree } from '../shared/remove-tree.js';
import { StepClock } from '../shared/steps.js';
import { installTermFence, type TermFence } from '../shared/term-fence.js';
import {
  AgentContainer,
  AgentInfo,
  ContainerName,
  ContainerSpec,
  ContainerStats,
  DumpRequest,
  DumpResult,
  DumpState,
  PrepareRequest,
  RestoreRequest,
  RestoreResult,
  SettleResult,
  TakeCheckpointRequest,
  TakeCheckpointResult,
  UploadCheckpointRequest,
  type StoredCheckpointRef,
  assertDistinctVolumes,
  type TransferProgress,
} from '../shared/protocol.js';
import type { FaultInjector } from './faults.js';
import { freePageServerPort } from './host/page-server-port.js';
import type { ImageStore } from './runtime/images.js';
import type { ContainerRuntime, MigrationPaths } from './runtime/types.js';
import { fetchTree, fetchTreeFromAny, serveTree } from './transfer.js';

export interface AgentServerDeps {
  info: AgentInfo;
  token: string;
  runtime: ContainerRuntime;
  images: ImageStore;
  /** Scratch space for image archives on their way to another node. */
  scratchDir: string;
  faults: FaultInjector;
  /** Refuses calls from a deposed controller leader. */
  termFence: TermFence;
  logger?: FastifyBaseLogger;
}

const NameParams = Type.Object({ name: ContainerName });
/** A migration's id, or a checkpoint's while it waits on this node. */
const IdParams = Type.Object({ id: Type.String({ pattern: '^[A-Za-z0-9_-]{1,64}$' }) });

export function buildAgentServer(deps: AgentServerDeps): FastifyInstance {
  const { runtime, images, token, faults } = deps;
  const app = Fastify({
    ...(deps.logger ? { loggerInstance: deps.logger } : {}),
    // Per-request lines would drown the log (the controller polls progress); fastify 5 takes this
    // through a LogController (the top-level disableRequestLogging is deprecated: FSTDEP023).
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: 1024 * 1024,
  }).withTypeProvider<TypeBoxTypeProvider>();
  installApiConventions(app, token);
  installTermFence(app, deps.termFence);
  /** Transfer progress of restores running on this node, for the controller to poll. */
  const progress = new Map<string, TransferProgress>();

  app.get('/healthz', async () => ({ ok: true }));
  app.get('/v1/info', { schema: { response: { 200: AgentInfo } } }, async () => deps.info);

  app.get('/v1/containers', { schema: { response: { 200: Type.Array(AgentContainer) } } }, async () => runtime.list());

  app.post('/v1/containers', { schema: { body: ContainerSpec, response: { 201: AgentContainer } } }, async (req, reply) => {
    assertDistinctVolumes(req.body.volumes);
    reply.code(201);
    return runtime.run(req.body);
  });

  app.get('/v1/containers/:name', { schema: { params: NameParams, response: { 200: AgentContainer } } }, async (req) => runtime.get(req.params.name));

  app.post('/v1/containers/:name/stop', { schema: { params: NameParams, response: { 200: AgentContainer } } }, async (req) =>
    runtime.stop(req.params.name),
  );

  app.delete(
    '/v1/containers/:name',
    { schema: { params: NameParams, querystring: Type.Object({ force: Type.Optional(Type.Boolean()) }) } },
    async (req, reply) => {
      await runtime.remove(req.params.name, { force: req.query.force ?? true });
      reply.code(204);
    },
  );

  app.get(
    '/v1/containers/:name/logs',
    {
      schema: {
        params: NameParams,
        querystring: Type.Object({
          stream: Type.Optional(Type.Union([Type.Literal('stdout'), Type.Literal('stderr'), Type.Literal('all')])),
          tail: Type.Optional(Type.Integer({ minimum: 0 })),
        }),
      },
    },
    async (req, reply) => {
      reply.type('text/plain; charset=utf-8');
      return runtime.logs(req.params.name, { stream: req.query.stream, tailLines: req.query.tail });
    },
  );

  app.get('/v1/containers/:name/stats', { schema: { params: NameParams, response: { 200: ContainerStats } } }, async (req) =>
    runtime.stats(req.params.name),
  );

  // ---------------------------------------------------------------- migration, source side

  app.post(
    '/v1/containers/:name/dump',
    { schema: { params: NameParams, body: DumpRequest, response: { 200: DumpResult } } },
    async (req) => {
      const { migrationId, mode, pageServerPort } = req.body;
      const address = deps.info.address;
      const pageServer = mode === 'lazy' && pageServerPort ? { address, port: await freePageServerPort(address, pageServerPort) } : undefined;
      const steps = new StepClock();
      const outcome = await runtime.dump(req.params.name, { migrationId, mode, pageServer, steps });
      await faults.pauseAt('migration:dump');
      return { migrationId, ...outcome, ...(pageServer ? { pageServer } : {}), steps: steps.steps };
    },
  );

  app.get('/v1/migrations/:id/images.tar', { schema: { params: IdParams } }, async (req, reply) => {
    await serveTree(reply, runtime.migrationPaths(req.params.id).images, { cutAfterBytes: faults.cutTransferAfterBytes() });
  });

  app.get('/v1/migrations/:id/files.tar', { schema: { params: IdParams } }, async (req, reply) => {
    await serveTree(reply, runtime.migrationPaths(req.params.id).files, { cutAfterBytes: faults.cutTransferAfterBytes() });
  });

  app.post('/v1/migrations/:id/rollback', { schema: { params: IdParams, response: { 200: AgentContainer } } }, async (req) =>
    runtime.rollback(req.params.id),
  );

  app.get('/v1/migrations/:id/dump', { schema: { params: IdParams, response: { 200: DumpState } } }, async (req) => runtime.dumpState(req.params.id));

  app.post('/v1/migrations/:id/finish', { schema: { params: IdParams } }, async (req, reply) => {
    await runtime.finishMigration(req.params.id);
    reply.code(204);
  });

  // ---------------------------------------------------------------- checkpoints (the container runs on)

  /** Checkpoints taken and not yet discarded, by id: their trees wait here for the upload. */
  const checkpoints = new Map<string, MigrationPaths>();

  app.post(
    '/v1/containers/:name/checkpoints',
    { schema: { params: NameParams, body: TakeCheckpointRequest, response: { 200: TakeCheckpointResult } } },
    async (req) => {
      const { checkpointId } = req.body;
      const out = await runtime.checkpoint(req.params.name, checkpointId);
      checkpoints.set(checkpointId, out.paths);
      await faults.pauseAt('checkpoint:dump');
      return { checkpointId, frozenMs: out.frozenMs, imageBytes: out.imageBytes, filesBytes: out.filesBytes };
    },
  );

  app.post(
    '/v1/checkpoints/:id/upload',
    { schema: { params: IdParams, body: UploadCheckpointRequest, response: { 200: CheckpointInfo } } },
    async (req) => {
      const paths = checkpoints.get(req.params.id);
      if (!paths) throw new NotFoundError(`no checkpoint ${req.params.id} on node ${deps.info.node} (it was discarded, or the agent restarted): take a new checkpoint`, { checkpointId: req.params.id });
      const { container, storeUrl, replicaUrls, logPosition, metadata } = req.body;
      await faults.pauseAt('checkpoint:upload');
      return uploadCheckpoint({
        storeUrl,
        replicaUrls,
        token,
        container,
        parts: [
          { name: 'criu', dir: paths.images },
          { name: 'files', dir: paths.files },
        ],
        logPosition,
        metadata,
        beforeCommit: () => faults.beforeCheckpointCommit(),
      });
    },
  );

  app.delete('/v1/checkpoints/:id', { schema: { params: IdParams } }, async (req, reply) => {
    checkpoints.delete(req.params.id);
    await runtime.discardCheckpoint(req.params.id);
    reply.code(204);
  });

  // ---------------------------------------------------------------- migration, target side

  /** Image (from the source if missing), network namespace, address, ports: idempotent. */
  async function prepare(r: PrepareRequest, migrationId: string): Promise<void> {
    if (!(await images.exists(r.spec.image))) await fetchImage(r.spec.image, r.source, migrationId);
    await runtime.prepareRestore(r.spec, { migrationId, mode: r.mode, generation: r.generation });
  }

  app.post('/v1/migrations/:id/prepare', { schema: { params: IdParams, body: PrepareRequest } }, async (req, reply) => {
    await prepare(req.body, req.params.id);
    reply.code(204);
  });

  app.post(
    '/v1/migrations/:id/restore',
    { schema: { params: IdParams, body: RestoreRequest, response: { 200: RestoreResult } } },
    async (req) => {
      const r = req.body;
      const migrationId = req.params.id;
      const paths = runtime.migrationPaths(migrationId);
      await faults.beforeTransfer();
      let bytes = 0;
      const steps = new StepClock();
      /** The replicas the checkpoint's trees came from (a replica that failed is passed over). */
      const readFrom = new Set<string>();
      const fetchOne = async (what: 'images' | 'files', dest: string) => {
        const base = bytes;
        try {
          const res = await steps.time(`fetch-${what}`, () => fetchTreeFromAny(
            treeUrls(what),
            { token, dest, onProgress: (b) => progress.set(migrationId, { migrationId, what, bytes: base + b }) },
            (url, err) => app.log.warn({ err: err.toJSON() }, `reading ${what} of checkpoint ${r.checkpoint?.id} from ${url} failed; reading it from the next replica`),
          ));
          bytes += res.bytes;
          if (r.checkpoint) readFrom.add(checkpointStores(r.checkpoint)[treeUrls(what).indexOf(res.url)]!);
        } catch (err) {
          const from = r.checkpoint ? `checkpoint ${r.checkpoint.id} in the store` : `node ${r.source.node}`;
          throw err instanceof TransferFailedError ? err : new TransferFailedError(`fetching ${what} from ${from} failed: ${(err as Error).message}`, { what }, err);
        }
      };
      // From the source agent (a migration) or from the checkpoint store (a failover, a restore
      // --from): a checkpoint from each of its replicas in turn, until one reads intact.
      const treeUrls = (what: 'images' | 'files') =>
        r.checkpoint
          ? checkpointStores(r.checkpoint).map((store) => checkpointPartUrl(store, r.spec.name, r.checkpoint!.id, what === 'images' ? 'criu' : 'files'))
          : [`${r.source.url}/v1/migrations/${migrationId}/${what}.tar`];
      try {
        const fetchStart = Date.now();
        // From the store nothing was prepared beforehand (a failover has no time to spare): the
        // network and image are set up while the trees arrive.
        const prepared = r.checkpoint ? prepare(r, migrationId) : Promise.resolve();
        const fetched = (async () => {
          await fetchOne('images', paths.images);
          await faults.pauseAt('migration:transfer');
          await fetchOne('files', paths.files);
        })();
        const [preparing, fetching] = await Promise.allSettled([prepared, fetched]);
        for (const outcome of [preparing, fetching]) if (outcome.status === 'rejected') throw outcome.reason;
        const fetchMs = Date.now() - fetchStart;
        await faults.beforeRestore(paths.images);
        const criuStart = Date.now();
        const container = await runtime.restore(r.spec, { migrationId, mode: r.mode, generation: r.generation, pageServer: r.pageServer, steps });
        await faults.afterRestore(r.mode, paths.images);
        return { container, bytesTransferred: bytes, restoredAt: Date.now(), fetchMs, criuMs: Date.now() - criuStart, steps: steps.steps, ...(readFrom.size > 0 ? { readFrom: [...readFrom] } : {}) };
      } finally {
        progress.delete(migrationId);
      }
    },
  );

  /** A target whose store lacks the image gets it from the source, checksummed like the rest. */
  async function fetchImage(ref: string, source: { node: string; url: string }, migrationId: string): Promise<void> {
    const dir = join(deps.scratchDir, `image-${migrationId}`);
    await removeTree(dir);
    try {
      const res = await fetchTree({
        url: `${source.url}/v1/images/archive?ref=${encodeURIComponent(ref)}`,
        token,
        dest: dir,
        onProgress: (b) => progress.set(migrationId, { migrationId, what: 'image', bytes: b }),
      });
      progress.set(migrationId, { migrationId, what: 'image', bytes: res.bytes });
      await images.importFrom(dir, ref);
    } finally {
      await removeTree(dir);
    }
  }

  app.get('/v1/images/archive', { schema: { querystring: Type.Object({ ref: Type.String({ minLength: 1 }) }) } }, async (req, reply) => {
    const dir = join(deps.scratchDir, `export-${randomUUID()}`);
    try {
      await images.exportTo(req.query.ref, dir);
      await serveTree(reply, dir);
    } finally {
      await removeTree(dir);
    }
  });

  app.get('/v1/migrations/:id/progress', { schema: { params: IdParams } }, async (req) => progress.get(req.params.id) ?? { migrationId: req.params.id, what: 'images', bytes: 0 });

  app.post('/v1/migrations/:id/settle', { schema: { params: IdParams, response: { 200: SettleResult } } }, async (req) =>
    runtime.settleRestore(req.params.id),
  );

  app.post('/v1/migrations/:id/abort', { schema: { params: IdParams } }, async (req, reply) => {
    await runtime.abortRestore(req.params.id);
    reply.code(204);
  });

  faults.registerRoutes(app);
  return app;
}

/** A stored checkpoint's replicas in the order to read them: the one named first, then the others. */
function checkpointStores(ref: StoredCheckpointRef): string[] {
  return [ref.storeUrl, ...(ref.replicaUrls ?? [])];
}
