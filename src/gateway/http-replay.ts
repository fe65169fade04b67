/**
 * The replay of a logged route's request log (docs/gateway.md, "Replay"): after a node died and
 * the container was restored from a checkpoint elsewhere, the records after the checkpoint's
 * position are sent to the restored container one at a time, in seq order. A client still
 * waiting for a record's answer gets it. Progress is kept per hold, so a replay sent again goes
 * on where the last one stopped instead of applying records twice.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { ChipmunkError, ConflictError } from '../shared/errors.js';
import { sendDiscardingAnswer, type ProxiedExchange } from './http-exchange.js';
import { requireSameLog } from './log-identity.js';
import type { RouteMetrics } from './metrics.js';
import type { LogPosition, ReplayResult, Route, Upstream } from './protocol.js';
import type { LogRecord, RequestLog } from './request-log.js';
import { sameUpstream } from './routes.js';
import { UpstreamPool } from './upstream-pool.js';

/** A replay stopped at a record the restored container did not answer. */
export class ReplayFailedError extends ChipmunkError {
  constructor(message: string, details: Record<string, unknown>) {
    super('CHIPMUNK_UNAVAILABLE', message, { status: 502, details });
  }
}

/** Tries per record of a replay while the restored container refuses connections (it may need a moment). */
const REPLAY_ATTEMPTS = 8;

/** What a replay needs of its route's proxy. */
export interface ReplaySource {
  /** The route as it is now. */
  route(): Route;
  requestLog(): RequestLog | undefined;
  /** Logged requests by seq whose clients still wait for an answer (in flight, retrying or parked). */
  readonly unanswered: ReadonlyMap<number, ProxiedExchange>;
  /** Gives the current upstream up: what is in progress there fails now, logged requests park. */
  abandonUpstream(): void;
  readonly metrics: RouteMetrics;
  readonly log: Logger;
  /** For the replay's own connection (see UpstreamPoolSettings.stallMs). */
  readonly stallMs: number;
}

export class LogReplayer {
  private runningNow = false;
  /**
   * How far the replays under the current hold got: a replay sent again (same hold, position and
   * upstream) goes on after the last record the restored container answered, instead of applying
   * records twice. `uncertainSeq`: a record that may or may not have been applied; no replay can
   * go on from there (the container must be restored again).
   */
  private progress?: { holdId: string; after: LogPosition; upstream: Upstream; through: number; uncertainSeq?: number };

  constructor(private readonly source: ReplaySource) {}

  get running(): boolean {
    return this.runningNow;
  }

  /**
   * Sends every logged record after position `after` (seq > after.seq), one at a time in seq
   * order, to `upstream` (the container restored from the checkpoint at that position). A client
   * still waiting for a record's answer gets it; other answers are dropped. The route must be
   * held, so no live request mixes in; the records covered are those on disk when the replay
   * starts. A position of another log than the route's current one is refused.
   */
  async replay(after: LogPosition, upstream: Upstream, resumable: boolean): Promise<ReplayResult> {
    const route = this.source.route();
    const name = route.name;
    const requestLog = this.source.requestLog();
    if (!requestLog) throw new ConflictError(`the route of container '${name}' is not logged: there is nothing to replay`, { name });
    requireSameLog(name, requestLog.id, after, 'replay');
    const holdId = route.migration?.id;
    if (route.state !== 'holding' || holdId === undefined) {
      throw new ConflictError(`hold the route of container '${name}' before replaying its log: live requests would mix with the replay`, { name });
    }
    if (this.runningNow) throw new ConflictError(`a replay of container '${name}''s log is already running`, { name });
    const again = this.progress?.holdId === holdId && this.progress.after.seq === after.seq && sameUpstream(this.progress.upstream, upstream) ? this.progress : undefined;
    if (again?.uncertainSeq !== undefined || (!again && !resumable)) {
      const why = again ? `request ${again.uncertainSeq} was sent and may or may not have been applied` : 'the gateway restarted during it, so what it applied is unknown';
      throw new ConflictError(`the replay of container '${name}''s log into ${upstream.address}:${upstream.port} cannot go on: ${why}; restore the container again from its checkpoint and replay into the new copy`, {
        name,
        // As for a record that failed after it was sent: the copy may have applied it.
        written: true,
        ...(again ? { seq: again.uncertainSeq } : {}),
      });
    }
    const progress = again ?? { holdId, after, upstream, through: after.seq };
    this.progress = progress;
    const afterSeq = progress.through;
    this.runningNow = true;
    const pool = new UpstreamPool(upstream, { maxConnections: 1, stallMs: this.source.stallMs });
    try {
      await requestLog.flushed();
      const { firstSeq, lastSeq: through } = requestLog.state();
      if (afterSeq > through) throw new ConflictError(`the log of container '${name}' ends at ${through}, before position ${afterSeq}: it is not the log that position belongs to`, { name, afterSeq, lastSeq: through });
      if (afterSeq < firstSeq - 1) throw new ConflictError(`the log of container '${name}' was trimmed up to ${firstSeq - 1}: the records after ${afterSeq} are gone`, { name, afterSeq, firstSeq });
      this.source.abandonUpstream();
      const result: ReplayResult = { replayed: 0, delivered: 0, dropped: 0, lastSeq: afterSeq };
      for await (const record of requestLog.read(afterSeq)) {
        if (record.seq > through) break;
        const waiting = this.source.unanswered.get(record.seq);
        const client = waiting && (await waiting.claimForReplay()) ? waiting : undefined;
        try {
          await this.replayRecord(pool, record, upstream, client);
        } catch (err) {
          client?.replayFinished(false);
          if (!(err instanceof ReplayFailedError) || err.details?.written !== false) progress.uncertainSeq = record.seq;
          throw err;
        }
        client?.replayFinished(true);
        progress.through = record.seq;
        const outcome = client && !client.clientGone ? 'delivered' : 'dropped';
        result.replayed++;
        result.lastSeq = record.seq;
        result[outcome]++;
        this.source.metrics.replayed(outcome);
      }
      this.source.log.info({ route: name, afterSeq, ...result, upstream }, 'request log replayed');
      return result;
    } finally {
      this.runningNow = false;
      await pool.destroy(new Error('the replay is over'));
    }
  }

  private async replayRecord(pool: UpstreamPool, record: LogRecord, upstream: Upstream, client: ProxiedExchange | undefined): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      const failure = client ? await client.send(pool, record.headers, record.body) : await sendDiscardingAnswer(pool, record);
      if (!failure) return;
      // Only a connection that failed is tried again: a request that was written may have been applied.
      if (failure.written || attempt === REPLAY_ATTEMPTS) {
        const where = `${upstream.address}:${upstream.port}`;
        const maybe = failure.written ? ' it may have been applied;' : '';
        throw new ReplayFailedError(
          `replaying request ${record.seq} (${record.method} ${record.url}) to container '${this.source.route().name}' at ${where} failed after ${attempt} attempts (${failure.error.message}):${maybe} the replay stopped there`,
          { route: this.source.route().name, seq: record.seq, upstream: where, written: failure.written },
        );
      }
      await sleep(Math.min(50 * 2 ** (attempt - 1), 1_000));
    }
  }
}
