/**
 * Fences: incarnations of a container that must not run on a node any more. The controller
 * keeps /fence/NODE/NAME = {name, generation}; every heartbeat answer of NODE carries its fences,
 * and its agent stops and removes any incarnation of NAME older than `generation`.
 *
 * A fence is how the controller passes over a node it cannot reach: a failover restores the
 * container elsewhere, or a migration rolls back while its target does not answer; when that
 * node returns, its stale copy goes before it could run next to the live one.
 */
import type { FencedContainer } from '../shared/protocol.js';
import type { StateStore } from './store/index.js';

const FENCE_PREFIX = '/fence/';

export function fenceKey(node: string, name: string): string {
  return `${FENCE_PREFIX}${node}/${name}`;
}

export class Fences {
  constructor(private readonly store: StateStore) {}

  /** Incarnations of `name` older than `generation` must not run on `node`. */
  async fence(node: string, name: string, generation: number): Promise<void> {
    await this.store.put(fenceKey(node, name), { name, generation } satisfies FencedContainer);
  }

  /** `node` runs the live incarnation now: nothing of it is fenced there. */
  async clear(node: string, name: string): Promise<void> {
    await this.store.delete(fenceKey(node, name));
  }

  /** Fence entries for a node's heartbeat answer. */
  async forNode(node: string): Promise<FencedContainer[]> {
    return (await this.store.list<FencedContainer>(`${FENCE_PREFIX}${node}/`)).map((kv) => kv.value);
  }

  /** The nodes that may still hold a stale copy of `name` (fenced there, not yet cleared). */
  async nodesFencing(name: string): Promise<string[]> {
    return (await this.entriesOf(name)).map((key) => key.slice(FENCE_PREFIX.length, -(name.length + 1)));
  }

  /**
   * A removed container's fences go with it: a later container of the same name, which starts
   * again at generation 0, must not be taken for the stale copy they were about.
   */
  async forget(name: string): Promise<void> {
    for (const key of await this.entriesOf(name)) await this.store.delete(key);
  }

  private async entriesOf(name: string): Promise<string[]> {
    return (await this.store.list(FENCE_PREFIX)).map((kv) => kv.key).filter((key) => key.endsWith(`/${name}`));
  }
}
