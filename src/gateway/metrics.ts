/**
 * The gateway's Prometheus metrics (GET /metrics). One registry per gateway, so several gateways
 * in one process (tests) keep separate counts. The proxies count through RouteMetrics, which
 * keeps the labelled children (or, for requests, plain counts) so the per-request cost is a map lookup.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';

export class GatewayMetrics {
  readonly registry = new Registry();
  /**
   * Requests answered since the last scrape, by route and status: counted here and added to the
   * counter when it is read. prom-client's inc() makes a label hash per call, which showed in the
   * proxy's allocation per request.
   */
  private readonly unscraped = new Map<string, Map<number, number>>();
  private readonly requests: Counter<'route' | 'status'> = new Counter({
    name: 'chipmunk_gateway_requests_total',
    help: 'HTTP requests answered, by route and status (the gateway’s own 502/503 included)',
    labelNames: ['route', 'status'] as const,
    registers: [this.registry],
    collect: () => {
      for (const [route, byStatus] of this.unscraped) {
        for (const [status, count] of byStatus) {
          if (count === 0) continue;
          this.requests.labels(route, String(status)).inc(count);
          byStatus.set(status, 0);
        }
      }
    },
  });
  private readonly connections = new Counter({
    name: 'chipmunk_gateway_connections_total',
    help: 'TCP connections accepted, by route and outcome (proxied, or why they were closed)',
    labelNames: ['route', 'outcome'] as const,
    registers: [this.registry],
  });
  private readonly held = new Gauge({
    name: 'chipmunk_gateway_held',
    help: 'requests (http routes) or connections (tcp routes) waiting for a hold to end',
    labelNames: ['route'] as const,
    registers: [this.registry],
  });
  private readonly retries = new Counter({
    name: 'chipmunk_gateway_retries_total',
    help: 'attempts sent again after the upstream failed during or right after a move',
    labelNames: ['route'] as const,
    registers: [this.registry],
  });
  private readonly holdDuration = new Histogram({
    name: 'chipmunk_gateway_hold_duration_seconds',
    help: 'how long holds lasted, by route and outcome (released)',
    labelNames: ['route', 'outcome'] as const,
    buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    registers: [this.registry],
  });

  private readonly logAppends = new Counter({
    name: 'chipmunk_gateway_log_appends_total',
    help: 'requests written to a logged route’s request log',
    labelNames: ['route'] as const,
    registers: [this.registry],
  });
  private readonly logBatchRecords = new Histogram({
    name: 'chipmunk_gateway_log_batch_records',
    help: 'requests per group commit (one write + fdatasync) of a request log',
    labelNames: ['route'] as const,
    buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
    registers: [this.registry],
  });
  private readonly logSyncSeconds = new Histogram({
    name: 'chipmunk_gateway_log_sync_seconds',
    help: 'time to write and fdatasync one batch of a request log',
    labelNames: ['route'] as const,
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
    registers: [this.registry],
  });
  private readonly replays = new Counter({
    name: 'chipmunk_gateway_replayed_total',
    help: 'logged requests replayed to a restored container, by outcome (delivered to a waiting client, or dropped: answered before)',
    labelNames: ['route', 'outcome'] as const,
    registers: [this.registry],
  });
  private readonly parkedRequests = new Gauge({
    name: 'chipmunk_gateway_parked',
    help: 'logged requests whose upstream was lost, waiting for a replay to answer them',
    labelNames: ['route'] as const,
    registers: [this.registry],
  });

  forRoute(name: string): RouteMetrics {
    let requests = this.unscraped.get(name);
    if (!requests) this.unscraped.set(name, (requests = new Map()));
    const byStatus = requests;
    const connections = new Map<string, Counter.Internal>();
    const held = this.held.labels(name);
    const retries = this.retries.labels(name);
    const parked = this.parkedRequests.labels(name);
    return {
      request: (status) => {
        byStatus.set(status, (byStatus.get(status) ?? 0) + 1);
      },
      connection: (outcome) => {
        let child = connections.get(outcome);
        if (!child) connections.set(outcome, (child = this.connections.labels(name, outcome)));
        child.inc();
      },
      held: (count) => held.set(count),
      retry: () => retries.inc(),
      parked: (count) => parked.set(count),
      replayed: (outcome) => this.replays.labels(name, outcome).inc(),
    };
  }

  /** A request log's group commit: `records` appended with one write + fdatasync that took `seconds`. */
  logBatch(route: string, records: number, seconds: number): void {
    this.logAppends.labels(route).inc(records);
    this.logBatchRecords.labels(route).observe(records);
    this.logSyncSeconds.labels(route).observe(seconds);
  }

  holdEnded(route: string, outcome: 'released', seconds: number): void {
    this.holdDuration.labels(route, outcome).observe(seconds);
  }
}

export interface RouteMetrics {
  /** An HTTP request answered with `status` (0: the client went away before any answer). */
  request(status: number): void;
  connection(outcome: string): void;
  held(count: number): void;
  retry(): void;
  /** Logged requests now parked, waiting for a replay. */
  parked(count: number): void;
  replayed(outcome: 'delivered' | 'dropped'): void;
}
