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

/**
 * Whether `address:port` is taken now (the probe closes it at once). `undefined`: this process
 * cannot tell, as the address is not one of its network namespace's (an agent whose page server
 * runs in a test host's namespace while the agent itself does not).
 */
function taken(address: string, port: number): Promise<boolean | undefined> {
  return new Promise((resolve) => {
    const probe = createServer();
    probe.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'EADDRINUSE' ? true : undefined));
    probe.listen({ host: address, port, exclusive: true }, () => probe.close(() => resolve(false)));
  });
}

/** `preferred` unless it is taken on `address`, else the next free port of the range after it (wrapping around). */
export async function freePageServerPort(address: string, preferred: number, range: { first: number; last: number } = PAGE_SERVER_PORTS): Promise<number> {
  if ((await taken(address, preferred)) !== true) return preferred;
  const size = range.last - range.first + 1;
  const offset = preferred >= range.first && preferred <= range.last ? preferred - range.first + 1 : 0;
  for (let i = 0; i < size; i++) {
    const port = range.first + ((offset + i) % size);
    if (port !== preferred && (await taken(address, port)) === false) return port;
  }
  throw new UnavailableError(`no page server port of ${range.first}-${range.last} is free on ${address}: a lazy migration from this node cannot start (see which programs hold them with \`ss -ltnp\`)`, { address });
}
