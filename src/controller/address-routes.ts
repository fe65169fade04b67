/**
 * Tells the network where each container's cluster address (ContainerSpec.address) is: whenever
 * a container starts on a node, or moves to another (migration, failover, restore), the
 * operator's command runs as `COMMAND ADDRESS NODE_ADDRESS`, and as `COMMAND ADDRESS` when the
 * container is removed. What it does is the operator's: routes on each host, an announcement
 * to their router (README: container addresses). The local cluster's is a script
 * (src/cluster/routes.ts) routing the address on this machine and in every test host. The node the
 * container runs on routes it on to the container by itself (its agent, network.ts).
 *
 * It follows the container records in the store, so every path that moves a container is
 * covered, and a restarted controller announces every address again (the command must be
 * idempotent). One address's announcements run in order.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { runUnchecked } from '../shared/exec.js';
import type { ContainerRecord } from './container-lock.js';
import type { NodeRegistry } from './registry.js';
import type { StateStore, Watch } from './store/index.js';

const CONTAINERS_PREFIX = '/containers/';
const COMMAND_TIMEOUT_MS = 30_000;
/** How long the gateway's upstream waits for a container's address to be routed to its new node. */
const ROUTED_WAIT_MS = 10_000;
const ROUTED_POLL_MS = 20;
const WATCH_GRACE_MS = 500;
/** After a store call failed: follow the records again this much later. */
const RETRY_MS = 1_000;

export class AddressRoutes {
  private watch?: Watch;
  private stopped = true;
  private retryTimer: NodeJS.Timeout | undefined;
  private readonly queues = new Map<string, Promise<void>>();
  /** The node each address was last routed to, by a command that succeeded. */
  private readonly routedTo = new Map<string, string>();

  constructor(
    private readonly store: StateStore,
    private readonly nodes: NodeRegistry,
    /** A command line: words split on spaces (no quoting). */
    private readonly commandLine: string,
    private readonly log: Logger,
  ) {}

  /**
   * Announces every address, then follows the records. A store call that fails (a new leader's
   * etcd client still on a dead member: the watch is refused) does not fail the start, and with it
   * the leader's work: all is tried again a second later, and again when a watch fails for good.
   */
  async start(): Promise<void> {
    this.stopped = false;
    await this.followRecords();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.watch?.cancel();
    this.watch = undefined;
  }

  private async followRecords(): Promise<void> {
    if (this.stopped) return;
    try {
      const revision = await this.store.currentRevision();
      for (const { value } of await this.store.list<ContainerRecord>(CONTAINERS_PREFIX)) {
        if (value.spec.address) this.announce(value.spec.address, value.node, { again: true });
      }
      const watch = await this.store.watch<ContainerRecord>(CONTAINERS_PREFIX, { fromRevision: revision + 1, onFailed: () => this.followLater() }, (ev) => {
        const address = ev.kv.value?.spec?.address;
        if (!address) return;
        if (ev.type === 'delete') this.withdraw(address);
        else if (ev.prevKv?.value.node !== ev.kv.value.node) this.announce(address, ev.kv.value.node);
      });
      if (this.stopped) watch.cancel();
      else this.watch = watch;
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, `following the containers for their address routes failed; trying again in ${RETRY_MS} ms`);
      this.followLater();
    }
  }

  /** Every address announced again (the command is idempotent), then followed from there. */
  private followLater(): void {
    this.watch = undefined;
    clearTimeout(this.retryTimer);
    if (this.stopped) return;
    this.retryTimer = setTimeout(() => void this.followRecords(), RETRY_MS);
    this.retryTimer.unref();
  }

  /**
   * Whether `address` is routed to `node`, waiting up to `timeoutMs` for a queued command (a
   * container just placed there): the gateway sends to the address only then. The record's node
   * is written before its watch event arrives: a caller that read it may ask before the command is
   * queued, so a short grace period covers that.
   */
  async isRoutedTo(address: string, node: string, timeoutMs = ROUTED_WAIT_MS): Promise<boolean> {
    const start = Date.now();
    // Waits while a command for it is queued or running (a failed one is not waited for again),
    // or for the grace period in which the record's watch event may still be on its way.
    while (this.routedTo.get(address) !== node) {
      const waited = Date.now() - start;
      if (waited >= timeoutMs || (!this.queues.has(address) && waited >= WATCH_GRACE_MS)) return false;
      await sleep(ROUTED_POLL_MS);
    }
    return true;
  }

  /**
   * A migration's target runs the container (its restore answered): its address goes there now,
   * not after the verify and commit writes, which clients would wait for. The commit's record
   * event then finds it routed there. A migration that does not commit calls `follow`.
   */
  routeAhead(address: string, node: string): void {
    this.announce(address, node);
  }

  /**
   * Routes the container's address to the node its record names now: after a migration that
   * routed it ahead failed (rolled back: the record still names the source; rolled forward or
   * restored elsewhere: its node changed, and this runs after the event's own announcement).
   */
  follow(name: string): void {
    void this.store.get<ContainerRecord>(CONTAINERS_PREFIX + name).then((kv) => {
      if (kv?.value.spec.address) this.announce(kv.value.spec.address, kv.value.node, { again: true });
    }).catch((err: unknown) => this.log.error({ name, err: (err as Error).message }, `cannot read ${name}'s record to route its address`));
  }

  /** Resolves once every announcement queued so far has run (tests). */
  async settled(): Promise<void> {
    await Promise.all(this.queues.values());
  }

  /**
   * Runs the command for `address` at `node`, in order after those queued before; one that this
   * process already ran successfully for the same node (a migration routed it ahead) is not run
   * again, unless `again` (a start, a `follow`: the network may have changed since).
   */
  private announce(address: string, node: string, opts: { again?: boolean } = {}): void {
    this.enqueue(address, async () => {
      if (!opts.again && this.routedTo.get(address) === node) return;
      const nodeAddress = (await this.nodes.get(node).catch(() => undefined))?.address;
      if (!nodeAddress) {
        this.log.warn({ address, node }, `cannot route ${address}: node ${node} is not registered`);
        return;
      }
      this.routedTo.delete(address);
      if (await this.runCommand([address, nodeAddress])) this.routedTo.set(address, node);
    });
  }

  private withdraw(address: string): void {
    this.routedTo.delete(address);
    this.enqueue(address, async () => void (await this.runCommand([address])));
  }

  private enqueue(address: string, step: () => Promise<void>): void {
    const next = (this.queues.get(address) ?? Promise.resolve()).then(step).catch((err: unknown) => {
      this.log.error({ address, err: (err as Error).message }, `the address routes command failed for ${address}`);
    });
    this.queues.set(address, next);
    void next.then(() => {
      if (this.queues.get(address) === next) this.queues.delete(address);
    });
  }

  private async runCommand(args: string[]): Promise<boolean> {
    const [cmd, ...fixed] = this.commandLine.trim().split(/\s+/);
    const res = await runUnchecked(cmd!, [...fixed, ...args], { timeoutMs: COMMAND_TIMEOUT_MS });
    if (res.code !== 0) {
      this.log.error({ command: this.commandLine, args, code: res.code, stderr: res.stderr.slice(-2000) }, `${this.commandLine} ${args.join(' ')} failed (exit ${res.code})`);
      return false;
    }
    this.log.info({ command: this.commandLine, args }, `routed ${args[0]}${args[1] ? ` via ${args[1]}` : ' (withdrawn)'}`);
    return true;
  }
}
