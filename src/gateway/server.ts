/**
 * The gateway's HTTP API (docs/gateway.md, "API"): the controller pushes routes, holds and
 * releases here. Same conventions as the other chipmunk APIs (cluster token, errors as
 * `{code, message, details}`); /healthz and /metrics need no token.
 */
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Type } from '@sinclair/typebox';
import { installApiConventions } from '../shared/http.js';
import { installTermFence, type TermFence } from '../shared/term-fence.js';
import { ContainerName } from '../shared/protocol.js';
import type { Gateway } from './gateway.js';
import type { GatewayMetrics } from './metrics.js';
import { HoldRequest, HoldResponse, ReleaseRequest, ReplayRequest, ReplayResult, RouteOwner, RouteSpec, RouteView, SyncRoutesRequest, TrimLogRequest } from './protocol.js';

export interface GatewayServerOptions {
  token: string;
  logger: FastifyBaseLogger;
  gateway: Gateway;
  metrics: GatewayMetrics;
  /** Refuses calls from a deposed controller leader. */
  termFence: TermFence;
}

const RouteParams = Type.Object({ name: ContainerName });
/** A route with an owner is removed only by a request naming it. */
const RemoveQuery = Type.Object({ owner: Type.Optional(RouteOwner) });
const PUBLIC_PATHS = ['/healthz', '/metrics'];

export function buildGatewayServer(opts: GatewayServerOptions): FastifyInstance {
  const { gateway, metrics } = opts;
  const base = Fastify({
    loggerInstance: opts.logger,
    // Scraped every few seconds: logging those would bury the route changes.
    logController: new LogController({ disableRequestLogging: (req) => PUBLIC_PATHS.includes(req.url) }),
  });
  installApiConventions(base, opts.token, PUBLIC_PATHS);
  installTermFence(base, opts.termFence);
  const app = base.withTypeProvider<TypeBoxTypeProvider>();

  app.get('/healthz', async () => ({ ok: true }));

  app.get('/metrics', async (_req, reply) => reply.type(metrics.registry.contentType).send(await metrics.registry.metrics()));

  app.get('/v1/routes', { schema: { response: { 200: Type.Array(RouteView) } } }, async () => gateway.list());

  app.put('/v1/routes', { schema: { body: SyncRoutesRequest, response: { 200: Type.Array(RouteView) } } }, async (req) => gateway.sync(req.body.owner, req.body.routes, req.body.revision));

  app.get('/v1/routes/:name', { schema: { params: RouteParams, response: { 200: RouteView } } }, async (req) => gateway.get(req.params.name));

  app.put('/v1/routes/:name', { schema: { params: RouteParams, body: RouteSpec, response: { 200: RouteView } } }, async (req) =>
    gateway.put(req.params.name, req.body),
  );

  app.delete('/v1/routes/:name', { schema: { params: RouteParams, querystring: RemoveQuery } }, async (req, reply) => {
    await gateway.remove(req.params.name, req.query.owner);
    return reply.code(204).send();
  });

  app.post('/v1/routes/:name/hold', { schema: { params: RouteParams, body: HoldRequest, response: { 200: HoldResponse } } }, async (req) =>
    gateway.hold(req.params.name, req.body),
  );

  app.post('/v1/routes/:name/replay', { schema: { params: RouteParams, body: ReplayRequest, response: { 200: ReplayResult } } }, async (req) =>
    gateway.replay(req.params.name, req.body),
  );

  app.post('/v1/routes/:name/log/trim', { schema: { params: RouteParams, body: TrimLogRequest, response: { 200: RouteView } } }, async (req) =>
    gateway.trimLog(req.params.name, req.body.upTo),
  );

  app.post('/v1/routes/:name/release', { schema: { params: RouteParams, body: ReleaseRequest, response: { 200: RouteView } } }, async (req) =>
    gateway.release(req.params.name, req.body),
  );

  return base;
}
