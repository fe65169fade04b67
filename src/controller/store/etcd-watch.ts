import type { Etcd3, IDuplexStream, IEvent, IKeyValue, IWatchRequest, IWatchResponse } from 'etcd3';
import { StoreFailedError } from '../../shared/errors.js';
import type { KeyValue, Watch, WatchEvent } from './types.js';
import { compactedHistoryMessage } from './values.js';

/**
 * One watch on an etcd key range, on a gRPC stream of its own. It keeps the revision of the
 * next event it owes, and when the stream breaks (a member died, the network blinked) it watches
 * again from exactly there, dropping what it had already delivered: the caller sees every change
 * once, in order, across reconnects. (The etcd3 client's own watcher resumes from the revision in
 * the last response's header, which can skip events still owed from a replay.) If etcd compacted
 * the history it would resume from, the watch ends and says so through onFailed.
 */

export interface EtcdWatchOptions {
  client: Etcd3;
  /** Names the watch in errors. */
  describe: string;
  key: Buffer;
  rangeEnd: Buffer;
  fromRevision?: number;
  toKeyValue: (kv: IKeyValue) => KeyValue;
  onEvent: (ev: WatchEvent) => void;
  onFailed?: (err: StoreFailedError) => void;
  /** Called once when the watch ends: cancelled or failed. */
  onEnd: () => void;
}

const FIRST_RETRY_MS = 100;
const MAX_RETRY_MS = 2000;
const CREATE_TIMEOUT_MS = 5000;

type WatchStream = IDuplexStream<IWatchRequest, IWatchResponse>;

export class EtcdWatch implements Watch {
  /** The first revision not yet delivered. */
  private nextRevision = 0;
  private stream: WatchStream | undefined;
  private ended = false;
  private retryMs = FIRST_RETRY_MS;
  private retryTimer: NodeJS.Timeout | undefined;

  private constructor(private readonly opts: EtcdWatchOptions) {}

  /** Resolves once etcd has created the watch, so no change made after that is missed. */
  static async start(opts: EtcdWatchOptions): Promise<EtcdWatch> {
    const watch = new EtcdWatch(opts);
    try {
      await watch.connect(opts.fromRevision);
    } catch (err) {
      watch.end();
      throw err instanceof StoreFailedError ? err : new StoreFailedError(`etcd: starting the ${opts.describe} failed: ${(err as Error).message}`, err);
    }
    return watch;
  }

  cancel(): void {
    this.end();
  }

  private end(): void {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.retryTimer);
    const stream = this.stream;
    this.stream = undefined;
    stream?.cancel();
    this.opts.onEnd();
  }

  private async connect(from: number | undefined): Promise<void> {
    const stream = await this.opts.client.watchClient.watch();
    if (this.ended) return stream.cancel();
    this.stream = stream;
    await new Promise<void>((resolve, reject) => {
      let created = false;
      const timer = setTimeout(() => lost(new Error(`etcd did not create the watch within ${CREATE_TIMEOUT_MS} ms`)), CREATE_TIMEOUT_MS);
      const lost = (err: Error) => {
        clearTimeout(timer);
        if (this.stream !== stream) return;
        this.stream = undefined;
        stream.cancel();
        if (!created) reject(err);
        else this.reconnectLater();
      };
      stream.on('data', (res) => {
        if (this.stream !== stream) return;
        if (res.canceled) {
          clearTimeout(timer);
          const compactedAt = Number(res.compact_revision);
          // Compacted: the changes this watch owes are gone, so it can only end. Any other reason: watch again.
          if (compactedAt > 0) {
            const err = new StoreFailedError(compactedHistoryMessage(this.opts.describe, this.nextRevision || (from ?? 0), compactedAt - 1));
            if (!created) return reject(err);
            this.end();
            return this.opts.onFailed?.(err);
          }
          return lost(new Error(`etcd cancelled the watch: ${res.cancel_reason || 'no reason given'}`));
        }
        if (res.created) {
          clearTimeout(timer);
          created = true;
          // Without a start revision etcd sends the changes after its current one.
          if (this.nextRevision === 0) this.nextRevision = from ?? Number(res.header.revision) + 1;
          this.retryMs = FIRST_RETRY_MS;
          resolve();
        }
        this.deliver(res.events);
      });
      stream.on('error', (err) => lost(err));
      stream.on('end', () => lost(new Error('etcd ended the watch stream')));
      stream.write({ create_request: { key: this.opts.key, range_end: this.opts.rangeEnd, prev_kv: true, ...(from !== undefined ? { start_revision: from } : {}) } });
    });
  }

  private reconnectLater(): void {
    if (this.ended) return;
    this.retryTimer = setTimeout(() => {
      this.connect(this.nextRevision).catch((err: unknown) => {
        if (this.ended) return;
        if (err instanceof StoreFailedError) {
          this.end();
          return this.opts.onFailed?.(err);
        }
        this.retryMs = Math.min(this.retryMs * 2, MAX_RETRY_MS);
        this.reconnectLater();
      });
    }, this.retryMs);
  }

  /** Delivers the events not delivered yet. etcd never splits a revision across responses, so a response's last revision is done. */
  private deliver(events: IEvent[]): void {
    if (events.length === 0) return;
    const last = Number(events[events.length - 1].kv.mod_revision);
    for (const ev of events) {
      if (this.ended) return;
      const revision = Number(ev.kv.mod_revision);
      if (revision < this.nextRevision) continue;
      try {
        this.opts.onEvent(this.toWatchEvent(ev, revision));
      } catch (err) {
        // The contract says onEvent must not throw; if it does, it surfaces like an event listener's error, outside the stream.
        setImmediate(() => {
          throw err;
        });
      }
    }
    this.nextRevision = Math.max(this.nextRevision, last + 1);
  }

  private toWatchEvent(ev: IEvent, revision: number): WatchEvent {
    const prevKv = ev.prev_kv ? this.opts.toKeyValue(ev.prev_kv) : undefined;
    if (String(ev.type).toLowerCase() === 'put') return { type: 'put', kv: this.opts.toKeyValue(ev.kv), ...(prevKv ? { prevKv } : {}), revision };
    // etcd reads the previous value at the revision before the delete; only a compaction in between can leave it without one.
    const tombstone = this.opts.toKeyValue({ ...ev.kv, value: Buffer.from('null') });
    return { type: 'delete', kv: prevKv ?? { ...tombstone, createRevision: 0, version: 0 }, revision };
  }
}
