/**
 * The gateway's Prometheus metrics (GET /metrics). One registry per gateway, so several gateways
 * in one process (tests) keep separate counts. The proxies count through RouteMetrics, which
 * keeps the labelled children so the per-request cost is a map lookup.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';

export class GatewayMetrics {
  readonly registry = new Registry();
  private readonly requests = new Counter({
    name: 'chipmunk_gateway_requests_total',
    help: 'HTTP requests answered, by route and status (the gateway’s own 502/503 included)',
    labelNames: ['route', 'status'] as const,
    registers: [this.registry],
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
    help: 'how long holds lasted, by route and outcome (released, expired)',
    labelNames: ['route', 'outcome'] as const,
    buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    registers: [this.registry],
  });

  forRoute(name: string): RouteMetrics {
    const requests = new Map<number, Counter.Internal>();
    const connections = new Map<string, Counter.Internal>();
    const held = this.held.labels(name);
    const retries = this.retries.labels(name);
    return {
      request: (status) => {
        let child = requests.get(status);
        if (!child) requests.set(status, (child = this.requests.labels(name, String(status))));
        child.inc();
      },
      connection: (outcome) => {
        let child = connections.get(outcome);
        if (!child) connections.set(outcome, (child = this.connections.labels(name, outcome)));
        child.inc();
      },
      held: (count) => held.set(count),
      retry: () => retries.inc(),
    };
  }

  holdEnded(route: string, outcome: 'released' | 'expired', seconds: number): void {
    this.holdDuration.labels(route, outcome).observe(seconds);
  }
}

export interface RouteMetrics {
  /** An HTTP request answered with `status` (0: the client went away before any answer). */
  request(status: number): void;
  connection(outcome: string): void;
  held(count: number): void;
  retry(): void;
}
