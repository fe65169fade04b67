/**
 * HTTP between chipmunk's processes: a small JSON client over undici that sends the cluster
 * token and turns error bodies back into our error classes, and the fastify hooks that do the
 * same on the server side (token check, error translation).
 */
import { request, type Dispatcher } from 'undici';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { ChipmunkError, UnauthorizedError, UnavailableError, errorFromJSON, toChipmunkError, type ErrorJSON } from './errors.js';
import { TERM_HEADER } from './term-fence.js';

/**
 * Socket error codes that mean no connection was made, so the request never left: sending it
 * again (to the same or another server) cannot apply it twice.
 */
const NOT_CONNECTED = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'UND_ERR_CONNECT_TIMEOUT']);

export function neverConnected(code: string): boolean {
  return NOT_CONNECTED.has(code);
}

export interface ApiClientOptions {
  baseUrl: string;
  token: string;
  /** Per request, for the whole exchange including the body. */
  timeoutMs?: number;
  /** Name of the remote side, for error messages ("agent node2", "controller"). */
  peer?: string;
  /** The sender's leadership term, sent with every request (src/shared/term-fence.ts); none: not sent. */
  term?: () => number | undefined;
}

export class ApiClient {
  readonly baseUrl: string;
  private readonly token: string;
  private readonly timeoutMs: number;
  private readonly peer: string;
  private readonly term: () => number | undefined;

  constructor(opts: ApiClientOptions) {
    this.baseUrl = opts.baseUrl.replace(/\/$/, '');
    this.token = opts.token;
    this.timeoutMs = opts.timeoutMs ?? 60_000;
    this.peer = opts.peer ?? this.baseUrl;
    this.term = opts.term ?? (() => undefined);
  }

  get<T>(path: string, opts: { timeoutMs?: number } = {}): Promise<T> {
    return this.json<T>('GET', path, undefined, opts);
  }

  post<T>(path: string, body?: unknown, opts: { timeoutMs?: number } = {}): Promise<T> {
    return this.json<T>('POST', path, body ?? {}, opts);
  }

  put<T>(path: string, body?: unknown, opts: { timeoutMs?: number } = {}): Promise<T> {
    return this.json<T>('PUT', path, body ?? {}, opts);
  }

  delete<T>(path: string, opts: { timeoutMs?: number } = {}): Promise<T> {
    return this.json<T>('DELETE', path, undefined, opts);
  }

  /** A request whose response body the caller consumes as a stream (tar archives, NDJSON). */
  async stream(method: 'GET' | 'POST', path: string, body?: unknown, opts: { timeoutMs?: number } = {}): Promise<Dispatcher.ResponseData> {
    const res = await this.send(method, path, body, opts.timeoutMs ?? 0);
    if (res.statusCode >= 400) throw await this.errorOf(res);
    return res;
  }

  private async json<T>(method: Dispatcher.HttpMethod, path: string, body: unknown, opts: { timeoutMs?: number }): Promise<T> {
    const res = await this.send(method, path, body, opts.timeoutMs ?? this.timeoutMs);
    if (res.statusCode >= 400) throw await this.errorOf(res);
    if (res.statusCode === 204) {
      await res.body.dump();
      return undefined as T;
    }
    const text = await res.body.text();
    return (text ? JSON.parse(text) : undefined) as T;
  }

  private async send(method: Dispatcher.HttpMethod, path: string, body: unknown, timeoutMs: number): Promise<Dispatcher.ResponseData> {
    const term = this.term();
    try {
      return await request(this.baseUrl + path, {
        method,
        headers: {
          authorization: `Bearer ${this.token}`,
          ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
          ...(term !== undefined ? { [TERM_HEADER]: String(term) } : {}),
        },
        body: body !== undefined ? JSON.stringify(body) : undefined,
        headersTimeout: timeoutMs,
        bodyTimeout: timeoutMs,
      });
    } catch (err) {
      const code = (err as { code?: string }).code ?? '';
      throw new UnavailableError(`${this.peer} is unreachable at ${this.baseUrl} (${code || (err as Error).message})`, { url: this.baseUrl + path, code }, err);
    }
  }

  private async errorOf(res: Dispatcher.ResponseData): Promise<ChipmunkError> {
    const text = await res.body.text().catch(() => '');
    try {
      const parsed = JSON.parse(text) as ErrorJSON;
      if (parsed && typeof parsed.code === 'string') return errorFromJSON(parsed, res.statusCode);
    } catch {
      // not one of our error bodies: described below
    }
    return new ChipmunkError('CHIPMUNK_INTERNAL', `${this.peer} answered HTTP ${res.statusCode}: ${text.slice(0, 300)}`, { status: res.statusCode });
  }
}

/**
 * Server side: every route but the health check needs the cluster token; every error leaves
 * as our JSON error body with its stable code.
 */
export function installApiConventions(app: FastifyInstance, token: string, publicPaths: string[] = ['/healthz']): void {
  app.addHook('onRequest', async (req: FastifyRequest) => {
    const path = req.url.split('?')[0];
    if (publicPaths.includes(path)) return;
    const header = req.headers.authorization ?? '';
    if (!timingSafeEqualStr(header, `Bearer ${token}`)) throw new UnauthorizedError();
  });
  app.setErrorHandler((err: unknown, req: FastifyRequest, reply: FastifyReply) => {
    const validation = (err as { validation?: unknown; statusCode?: number; message?: string }).validation;
    if (validation) {
      reply.code(400).send({ code: 'CHIPMUNK_INVALID_INPUT', message: `invalid request: ${(err as Error).message}` });
      return;
    }
    const e = toChipmunkError(err);
    if (e.status >= 500) req.log.error({ err: e.toJSON() }, e.message);
    reply.code(e.status).send(e.toJSON());
  });
}

function timingSafeEqualStr(a: string, b: string): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}
