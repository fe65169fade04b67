/**
 * Cluster-wide container addresses: each container gets one address of the cluster's container
 * range when it is run, which stays with it (in its spec, ContainerSpec.address) across
 * migrations, failovers and restores, and is released when it is removed. The reservation is a
 * key of its own (/addresses/<ip>), written only if absent, so two runs at once never share one.
 */
import { InvalidInputError, StoreConflictError, UnavailableError } from '../shared/errors.js';
import type { StateStore, TxnOp } from './store/index.js';

/**
 * 198.19.128.0/18: in the benchmarking range (every test address is), clear of the node subnets
 * the local cluster (198.19.I.0/24 for node I) and the runc pair tests (198.19.200-254.0/24) use.
 */
export const DEFAULT_CONTAINER_RANGE = '198.19.128.0/18';
const ADDRESSES_PREFIX = '/addresses/';

export interface AddressRange {
  cidr: string;
  /** First and last address handed out, as 32-bit numbers (the range's own first and last are not). */
  first: number;
  last: number;
}

/** Parses an IPv4 CIDR of /8 to /30; `what` names the flag or option in the error. */
export function parseContainerRange(cidr: string, what = '--container-range'): AddressRange {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(cidr.trim());
  const octets = m ? m.slice(1, 5).map(Number) : [];
  const bits = m ? Number(m[5]) : NaN;
  if (!m || octets.some((o) => o > 255) || bits < 8 || bits > 30) {
    throw new InvalidInputError(`${what} '${cidr}' is not an IPv4 range of /8 to /30 such as ${DEFAULT_CONTAINER_RANGE}: give one, or 'off' for no cluster addresses`, { range: cidr });
  }
  const base = octets.reduce((acc, o) => acc * 256 + o, 0);
  const size = 2 ** (32 - bits);
  const network = base - (base % size);
  return { cidr, first: network + 1, last: network + size - 2 };
}

function formatAddress(n: number): string {
  return [24, 16, 8, 0].map((shift) => Math.floor(n / 2 ** shift) % 256).join('.');
}

function addressKey(address: string): string {
  return `${ADDRESSES_PREFIX}${address}`;
}

export class ContainerAddresses {
  constructor(
    private readonly store: StateStore,
    /** None: containers get no cluster address (the operator turned them off). */
    private readonly range: AddressRange | undefined,
  ) {}

  /** Reserves a free address of the range for `container`; undefined when cluster addresses are off. */
  async allocate(container: string): Promise<string | undefined> {
    if (!this.range) return undefined;
    const taken = new Set((await this.store.list<{ container: string }>(ADDRESSES_PREFIX)).map((kv) => kv.key.slice(ADDRESSES_PREFIX.length)));
    for (let n = this.range.first; n <= this.range.last; n++) {
      const address = formatAddress(n);
      if (taken.has(address)) continue;
      try {
        await this.store.put(addressKey(address), { container }, { expectModRevision: 0 });
        return address;
      } catch (err) {
        // Another run took it meanwhile: the next one.
        if (!(err instanceof StoreConflictError)) throw err;
      }
    }
    throw new UnavailableError(`no free address is left in the container range ${this.range.cidr}: remove containers, or start the controller with a larger --container-range`, {
      range: this.range.cidr,
    });
  }

  /** The store operation that releases `address`, for the transaction that removes its container. */
  releaseOp(address: string): TxnOp {
    return { type: 'delete', key: addressKey(address) };
  }

  /**
   * Releases `address` if `container` still holds it: a run that failed after its container was
   * removed (which released the address already) must not free it under the next container.
   */
  async release(address: string, container: string): Promise<void> {
    const held = await this.store.get<{ container: string }>(addressKey(address));
    if (held?.value.container !== container) return;
    await this.store.delete(addressKey(address), { expectModRevision: held.modRevision });
  }
}
