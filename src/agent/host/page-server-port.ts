/**
 * The port a lazy migration's CRIU page server listens on. The controller hands one out from
 * PAGE_SERVER_PORTS, but it cannot know every port taken on this host: a page server an earlier
 * leader's migration left running, or any other program. A port that cannot be bound here is
 * replaced by the next free one of the range; the dump's answer names the port used, and the
 * target's lazy-pages daemon connects to that one.
 */
import { createServer } from 'node:net';
import { UnavailableError } from '../../shared/errors.js';
import { PAGE_SERVER_PORTS } from '../../shared/protocol.js';

/** Whether `address:port` can be bound now (the probe closes it at once). */
function bindable(address: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = createServer();
    probe.once('error', () => resolve(false));
    probe.listen({ host: address, port, exclusive: true }, () => probe.close(() => resolve(true)));
  });
}

/** `preferred` if it is free on `address`, else the next free port of the range after it (wrapping around). */
export async function freePageServerPort(address: string, preferred: number, range: { first: number; last: number } = PAGE_SERVER_PORTS): Promise<number> {
  if (await bindable(address, preferred)) return preferred;
  const size = range.last - range.first + 1;
  const offset = preferred >= range.first && preferred <= range.last ? preferred - range.first + 1 : 0;
  for (let i = 0; i < size; i++) {
    const port = range.first + ((offset + i) % size);
    if (port !== preferred && (await bindable(address, port))) return port;
  }
  throw new UnavailableError(`no page server port of ${range.first}-${range.last} is free on ${address}: a lazy migration from this node cannot start (see which programs hold them with \`ss -ltnp\`)`, { address });
}
