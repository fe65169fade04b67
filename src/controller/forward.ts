/**
 * A controller that does not lead passes on to the leader every request only a leader may answer:
 * every mutation. Reads of the state store are answered here, and so are heartbeats (a node's
 * liveness is an etcd lease any controller can keep alive) and this controller's own checkpoint
 * store replica (`/v1/checkpoints/...`: agents upload to and restore from each replica by its own
 * URL). The request and the answer stream through (a migration's NDJSON progress included), so a
 * client may talk to any controller.
 *
 * When the request surely reached no leader (none is known, or its connection was refused) the
 * answer is `CHIPMUNK_NOT_LEADER`, which a client may send again (src/shared/controller-client.ts);
 * when the leader may have received it, `CHIPMUNK_UNAVAILABLE`.
 */
import { pipeline } from 'node:stream/promises';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { request } from 'undici';
import { NotLeaderError, UnavailableError } from '../shared/errors.js';
import { neverConnected } from '../shared/http.js';
import type { Leader } from './election.js';

export interface LeaderView {
  leading(): boolean;
  leader(): Leader | undefined;
}

/** Set on a forwarded request: a controller that does not lead either answers it with an error instead of passing it on again. */
export const FORWARDED_BY_HEADER = 'x-chipmunk-forwarded-by';

/** Set on an answer a follower passed on: the leader that gave it. */
export const ANSWERED_BY_HEADER = 'x-chipmunk-answered-by';


/** Headers of one hop that must not be passed on (RFC 9110 7.6.1), and the host, which names this controller. */
const HOP_HEADERS = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te', 'trailer', 'upgrade', 'host']);

/** Installs the hook; SELF names this controller in errors and loops. Call after the API's auth hook, so only authenticated requests go on. */
export function forwardToLeader(app: FastifyInstance, leadership: LeaderView, self: string): void {
  app.addHook('onRequest', async (req: FastifyRequest, reply: FastifyReply) => {
    if (leadership.leading() || !leaderOnly(req.method, req.url)) return;
    if (req.headers[FORWARDED_BY_HEADER]) {
      throw new NotLeaderError(
        `controller ${self} does not lead, though controller ${String(req.headers[FORWARDED_BY_HEADER])} took it for the leader: an election is under way; try again in a few seconds`,
      );
    }
    const leader = leadership.leader();
    if (!leader) throw new NotLeaderError('no controller leads right now (an election is under way): try again in a few seconds');
    const hasBody = req.method !== 'GET' && req.method !== 'HEAD';
    let upstream;
    try {
      upstream = await request(new URL(req.url, leader.url), {
        method: req.method as 'POST',
        headers: { ...passable(req.headers), [FORWARDED_BY_HEADER]: self },
        body: hasBody ? req.raw : undefined,
      });
    } catch (err) {
      const code = (err as { code?: string }).code ?? '';
      if (neverConnected(code)) {
        throw new NotLeaderError(`the leader ${leader.id} at ${leader.url} cannot be reached (${code}): it may have just died; try again in a few seconds`, { leader: leader.url });
      }
      throw new UnavailableError(`lost the leader ${leader.id} at ${leader.url} while passing the request on (${code || (err as Error).message}): it may or may not have acted; check before trying again`, { leader: leader.url }, err);
    }
    // Streamed as it comes: a migration's progress lines reach the client as the leader writes them.
    reply.hijack();
    reply.raw.writeHead(upstream.statusCode, { ...passable(upstream.headers), [ANSWERED_BY_HEADER]: leader.id });
    await pipeline(upstream.body, reply.raw).catch(() => reply.raw.destroy());
    return reply;
  });
}

/** Mutations, except heartbeats, this process's debug routes and its checkpoint store replica. */
export function leaderOnly(method: string, url: string): boolean {
  const path = url.split('?')[0];
  if (path.startsWith('/v1/debug/') || path.startsWith('/v1/checkpoints/')) return false;
  if (method === 'GET' || method === 'HEAD' || method === 'OPTIONS') return false;
  return !(method === 'PUT' && path.startsWith('/v1/nodes/'));
}

function passable(headers: Record<string, string | string[] | undefined>): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(headers)) if (value !== undefined && !HOP_HEADERS.has(name.toLowerCase())) out[name] = value;
  return out;
}
