/**
 * Measures what a client sees while a container moves: it polls the container's published
 * port on the source and on the target node, each about every millisecond, and records the
 * last answer from the source and the first answer from the target after it. Downtime is the
 * gap between the two. Bounded: it stops by itself after `maxMs` whatever happens.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { connect, type Socket } from 'node:net';
import { Agent, buildConnector, request } from 'undici';

/**
 * Fresh connection per request, and a short connect timeout: a SYN that is dropped (a frozen
 * or locked network) must not park the client in the kernel's one-second retransmission.
 */
const client = new Agent({ connect: { timeout: 100 }, pipelining: 0 });

export interface DowntimeResult {
  lastSourceAnswerAt?: number;
  firstTargetAnswerAt?: number;
  /** firstTargetAnswerAt - lastSourceAnswerAt, when both were seen. */
  downtimeMs?: number;
  requests: number;
  /** Answers the target gave before the source's last one: would mean two copies answering. */
  overlappingAnswers: number;
}

const REQUEST_TIMEOUT_MS = 200;
const POLL_INTERVAL_MS = 1;

export class DowntimeProbe {
  private stopped = false;
  private lastSource?: number;
  private firstTarget?: number;
  private targetAnswers: number[] = [];
  private requests = 0;
  private loops: Promise<void>[] = [];
  private deadline: NodeJS.Timeout | undefined;

  constructor(
    private readonly source: string,
    private readonly target: string,
    private readonly maxMs = 120_000,
  ) {}

  start(): void {
    this.loops = [this.poll(this.source, (t) => (this.lastSource = t)), this.poll(this.target, (t) => this.onTarget(t))];
    this.deadline = setTimeout(() => (this.stopped = true), this.maxMs);
  }

  /** Stops once the target has answered (or at once with `now`), and reports. */
  async stop(opts: { waitForTargetMs?: number } = {}): Promise<DowntimeResult> {
    const until = Date.now() + (opts.waitForTargetMs ?? 10_000);
    while (this.firstTarget === undefined && Date.now() < until && !this.stopped) await sleep(5);
    this.stopped = true;
    clearTimeout(this.deadline);
    await Promise.all(this.loops);
    const overlapping = this.lastSource === undefined ? 0 : this.targetAnswers.filter((t) => t < this.lastSource!).length;
    return {
      lastSourceAnswerAt: this.lastSource,
      firstTargetAnswerAt: this.firstTarget,
      ...(this.lastSource !== undefined && this.firstTarget !== undefined ? { downtimeMs: this.firstTarget - this.lastSource } : {}),
      requests: this.requests,
      overlappingAnswers: overlapping,
    };
  }

  private onTarget(t: number): void {
    this.targetAnswers.push(t);
    if (this.firstTarget === undefined) this.firstTarget = t;
  }

  private async poll(url: string, onAnswer: (at: number) => void): Promise<void> {
    while (!this.stopped) {
      this.requests++;
      try {
        const res = await request(url, { dispatcher: client, headersTimeout: REQUEST_TIMEOUT_MS, bodyTimeout: REQUEST_TIMEOUT_MS, reset: true });
        await res.body.dump();
        if (res.statusCode < 500) onAnswer(Date.now());
      } catch {
        // refused, reset or timed out: no answer at this moment
      }
      await sleep(POLL_INTERVAL_MS);
    }
  }
}

/**
 * Watches one endpoint (the source, when the target's address is known only afterwards, as
 * with Podman's restore): polls it about every millisecond and keeps the times it answered.
 */
export class AnswerWatch {
  private stopped = false;
  private answers: number[] = [];
  private requests = 0;
  private loop: Promise<void> = Promise.resolve();
  private deadline: NodeJS.Timeout | undefined;

  constructor(
    private readonly url: string,
    private readonly maxMs = 300_000,
  ) {}

  start(): void {
    this.loop = (async () => {
      while (!this.stopped) {
        this.requests++;
        try {
          const res = await request(this.url, { dispatcher: client, headersTimeout: REQUEST_TIMEOUT_MS, bodyTimeout: REQUEST_TIMEOUT_MS, reset: true });
          await res.body.dump();
          if (res.statusCode < 500) this.answers.push(Date.now());
        } catch {
          // no answer at this moment
        }
        await sleep(POLL_INTERVAL_MS);
      }
    })();
    this.deadline = setTimeout(() => (this.stopped = true), this.maxMs);
  }

  async stop(): Promise<{ requests: number }> {
    this.stopped = true;
    clearTimeout(this.deadline);
    await this.loop;
    return { requests: this.requests };
  }

  /** The last answer at or before `t`, if any. */
  lastAnswerBefore(t: number): number | undefined {
    return this.answers.filter((a) => a <= t).at(-1);
  }

}

/** Polls `url` about every millisecond until it answers; the time of that first answer. */
export async function firstAnswer(url: string, timeoutMs = 60_000): Promise<number> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    try {
      const res = await request(url, { dispatcher: client, headersTimeout: REQUEST_TIMEOUT_MS, bodyTimeout: REQUEST_TIMEOUT_MS, reset: true });
      await res.body.dump();
      if (res.statusCode < 500) return Date.now();
    } catch {
      // not yet
    }
    if (Date.now() > until) throw new Error(`${url} did not answer within ${timeoutMs} ms`);
    await sleep(POLL_INTERVAL_MS);
  }
}

/** A client's view of one address while a container that keeps it moves: when it answered. */
export interface AnswerTimes {
  /** When each answer arrived, in order. */
  answers: number[];
  requests: number;
  /** Errors a kept connection saw (a reset, a close): it should see none. */
  errors: string[];
  /** Connections a kept-connection client opened: 1 when its connection was kept. */
  connections?: number;
}

/** The longest silence between two answers from `since` on: the previous answer, the next, and the gap. */
export function longestGap(answers: number[], since: number): { lastBefore: number; firstAfter: number; gapMs: number } | undefined {
  let best: { lastBefore: number; firstAfter: number; gapMs: number } | undefined;
  for (let i = 1; i < answers.length; i++) {
    const [a, b] = [answers[i - 1]!, answers[i]!];
    if (b < since) continue;
    if (!best || b - a > best.gapMs) best = { lastBefore: a, firstAfter: b, gapMs: b - a };
  }
  return best;
}

const OVERLAPPING_ATTEMPTS = 8;
const REDIS_PORT = 6379;
const STOP_GRACE_MS = 5_000;
/** Long enough for an answer on a loaded 2-core machine; a dropped SYN is retried by the next attempt meanwhile. */
const ATTEMPT_TIMEOUT_MS = 250;

/**
 * New clients at one address (a container's cluster address, the same before and after its
 * move): a request on a fresh connection starts about every millisecond, up to a few at once, so
 * a SYN dropped while the container is frozen (or its network locked) does not blind the probe
 * for a whole connect time-out: the first answer after the move is seen within a millisecond or
 * two. Plain sockets, each attempt on its own (an HTTP client's pool could queue one attempt
 * behind another's connect). Bounded by `maxMs`.
 */
export class FreshConnectionProbe {
  private stopped = false;
  private readonly times: AnswerTimes = { answers: [], requests: 0, errors: [] };
  private inFlight = 0;
  private loop: Promise<void> = Promise.resolve();
  private deadline: NodeJS.Timeout | undefined;
  private readonly target: URL;

  constructor(
    url: string,
    private readonly maxMs = 120_000,
  ) {
    this.target = new URL(url);
  }

  start(): void {
    this.loop = (async () => {
      const pending = new Set<Promise<void>>();
      while (!this.stopped) {
        if (this.inFlight < OVERLAPPING_ATTEMPTS) {
          const attempt = this.attempt().finally(() => pending.delete(attempt));
          pending.add(attempt);
        }
        await sleep(POLL_INTERVAL_MS);
      }
      await Promise.all(pending);
    })();
    this.deadline = setTimeout(() => (this.stopped = true), this.maxMs);
  }

  async stop(): Promise<AnswerTimes> {
    this.stopped = true;
    clearTimeout(this.deadline);
    await this.loop;
    this.times.answers.sort((a, b) => a - b);
    return this.times;
  }

  /** One GET on a new connection: answered when the status line says 2xx-4xx (redis://: PING answered +PONG). */
  private attempt(): Promise<void> {
    const redis = this.target.protocol === 'redis:';
    this.inFlight++;
    this.times.requests++;
    return new Promise<void>((resolve) => {
      const socket = connect({ host: this.target.hostname, port: Number(this.target.port || (redis ? REDIS_PORT : 80)) });
      let head = '';
      let finished = false;
      const done = (answered: boolean) => {
        if (finished) return;
        finished = true;
        if (answered) this.times.answers.push(Date.now());
        clearTimeout(timer);
        socket.destroy();
        this.inFlight--;
        resolve();
      };
      const timer = setTimeout(() => done(false), ATTEMPT_TIMEOUT_MS);
      socket.setNoDelay(true);
      socket.once('connect', () => socket.write(redis ? 'PING\r\n' : `GET ${this.target.pathname} HTTP/1.1\r\nHost: ${this.target.host}\r\nConnection: close\r\n\r\n`));
      socket.on('data', (d: Buffer) => {
        head += d.toString('latin1');
        if (redis) {
          if (head.includes('\r\n')) done(head.startsWith('+PONG'));
          return;
        }
        const status = /^HTTP\/1\.[01] (\d{3})/.exec(head);
        if (status) done(Number(status[1]) < 500);
      });
      socket.once('error', () => done(false));
      socket.once('close', () => done(false));
    });
  }
}

/**
 * One client that keeps its connection: requests one after the other on a single kept-alive
 * connection, `intervalMs` apart (about every millisecond by default), never timed out (a
 * time-out would close it). Across a move that keeps connections it must see no error and open
 * no second connection (a reset while idle is no request's error: the client would quietly
 * connect again); its gap includes TCP's retransmission wait.
 */
export class KeptConnectionProbe {
  private stopped = false;
  private readonly times: AnswerTimes = { answers: [], requests: 0, errors: [] };
  private loop: Promise<void> = Promise.resolve();
  private readonly client: Agent;
  private deadline: NodeJS.Timeout | undefined;

  constructor(
    private readonly url: string,
    private readonly maxMs = 120_000,
    private readonly intervalMs = POLL_INTERVAL_MS,
  ) {
    const connect = buildConnector({});
    this.client = new Agent({
      connections: 1,
      pipelining: 1,
      keepAliveTimeout: maxMs,
      keepAliveMaxTimeout: maxMs,
      headersTimeout: 0,
      bodyTimeout: 0,
      connect: (opts, callback) => {
        this.times.connections = (this.times.connections ?? 0) + 1;
        return connect(opts, callback);
      },
    });
  }

  start(): void {
    this.loop = (async () => {
      while (!this.stopped) {
        this.times.requests++;
        try {
          const res = await request(this.url, { dispatcher: this.client });
          await res.body.dump();
          if (res.statusCode < 500) this.times.answers.push(Date.now());
        } catch (err) {
          this.times.errors.push((err as Error).message);
          if (this.times.errors.length > 10) break;
        }
        await sleep(this.intervalMs);
      }
    })();
    this.deadline = setTimeout(() => (this.stopped = true), this.maxMs);
  }

  async stop(): Promise<AnswerTimes> {
    this.stopped = true;
    clearTimeout(this.deadline);
    await this.loop;
    await this.client.close();
    return this.times;
  }
}

/**
 * KeptConnectionProbe's twin for Redis (redis://ADDRESS:PORT): one connection, a PING and its
 * +PONG, `intervalMs` apart. It never reconnects: an error or a close ends it, and is recorded.
 */
export class KeptRedisProbe {
  private readonly times: AnswerTimes = { answers: [], requests: 0, errors: [], connections: 1 };
  private stopped = false;
  private loop: Promise<void> = Promise.resolve();
  private deadline: NodeJS.Timeout | undefined;
  private readonly target: URL;
  private socket: Socket | undefined;

  constructor(
    url: string,
    private readonly maxMs = 120_000,
    private readonly intervalMs = POLL_INTERVAL_MS,
  ) {
    this.target = new URL(url);
  }

  start(): void {
    const socket = (this.socket = connect({ host: this.target.hostname, port: Number(this.target.port || REDIS_PORT) }));
    socket.setNoDelay(true);
    let buffered = '';
    let answered: (() => void) | undefined;
    let failed: ((why: string) => void) | undefined;
    socket.on('data', (d: Buffer) => {
      buffered += d.toString('latin1');
      while (buffered.includes('\r\n')) {
        const line = buffered.slice(0, buffered.indexOf('\r\n'));
        buffered = buffered.slice(line.length + 2);
        if (line === '+PONG') answered?.();
        else failed?.(`unexpected reply: ${line}`);
      }
    });
    socket.once('error', (err) => failed?.(err.message));
    socket.once('close', () => failed?.('connection closed'));
    this.loop = (async () => {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
      }).catch((err: Error) => this.times.errors.push(err.message));
      while (!this.stopped && this.times.errors.length === 0) {
        this.times.requests++;
        const ok = await new Promise<boolean>((resolve) => {
          answered = () => resolve(true);
          failed = (why) => {
            this.times.errors.push(why);
            resolve(false);
          };
          socket.write('PING\r\n');
        });
        answered = failed = undefined;
        if (!ok) break;
        this.times.answers.push(Date.now());
        await sleep(this.intervalMs);
      }
      socket.destroy();
    })();
    this.deadline = setTimeout(() => (this.stopped = true), this.maxMs);
  }

  /** A PING still unanswered STOP_GRACE_MS after the stop is an error: its connection went silent. */
  async stop(): Promise<AnswerTimes> {
    this.stopped = true;
    clearTimeout(this.deadline);
    const silent = setTimeout(() => this.socket?.destroy(new Error(`no answer within ${STOP_GRACE_MS} ms of the probe's stop`)), STOP_GRACE_MS);
    await this.loop;
    clearTimeout(silent);
    return this.times;
  }
}
