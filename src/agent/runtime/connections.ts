/**
 * A move that keeps connections (CRIU tcp-established) restores each TCP socket bound to the
 * address it had. The target gives the container its cluster address (and loopback), not the
 * CNI address of the node it leaves, so a connection bound to that one cannot be restored, and
 * CRIU would fail the whole restore (the move rolls back). Such are the connections the
 * container opened itself (their source is its CNI address) and, for a container whose
 * published ports lead to its CNI address (network.ts), the connections through them.
 *
 * Just before the dump they are aborted (`ss -K`, the kernel's sock_destroy): the kernel sends
 * the peer a reset, so a client learns at once and reconnects, and the program in the container
 * sees its connection fail (ECONNABORTED) when it is restored. Done before CRIU locks the
 * container's network, which would drop the reset and leave the peer waiting in silence.
 */
import { run } from '../../shared/exec.js';

export interface TcpConnection {
  local: string;
  localPort: number;
  peer: string;
  peerPort: number;
}

/** `addr:port` or `[v6addr]:port` as ss prints them; a v4-mapped v6 address as its v4 form. */
function endpoint(text: string): { address: string; port: number } | undefined {
  const colon = text.lastIndexOf(':');
  if (colon <= 0) return undefined;
  const port = Number(text.slice(colon + 1));
  let address = text.slice(0, colon);
  if (address.startsWith('[') && address.endsWith(']')) address = address.slice(1, -1);
  address = address.replace(/^::ffff:(\d+\.\d+\.\d+\.\d+)$/i, '$1').replace(/%.*$/, '');
  return Number.isInteger(port) && address ? { address, port } : undefined;
}

/** The connections in `ss -tnH` output (its last two columns are the local and the peer address). */
export function parseConnections(ssOutput: string): TcpConnection[] {
  const connections: TcpConnection[] = [];
  for (const line of ssOutput.split('\n')) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 4) continue;
    const local = endpoint(fields[fields.length - 2]!);
    const peer = endpoint(fields[fields.length - 1]!);
    if (local && peer) connections.push({ local: local.address, localPort: local.port, peer: peer.address, peerPort: peer.port });
  }
  return connections;
}

function isLoopback(address: string): boolean {
  return address === '::1' || /^127\./.test(address);
}

/** The connections a restore on another node cannot bind: on neither the cluster address nor loopback. */
export function unrestorable(connections: TcpConnection[], clusterAddress: string): TcpConnection[] {
  return connections.filter((c) => c.local !== clusterAddress && !isLoopback(c.local));
}

function ssAddress(address: string): string {
  return address.includes(':') ? `[${address}]` : address;
}

/** An ss filter matching exactly these connections. */
export function ssFilter(connections: TcpConnection[]): string[] {
  return connections.flatMap((c, i) => [
    ...(i > 0 ? ['or'] : []),
    '(', 'src', `${ssAddress(c.local)}:${c.localPort}`, 'and', 'dst', `${ssAddress(c.peer)}:${c.peerPort}`, ')',
  ]);
}

/**
 * ss in network namespace `netns` (a path) over its TCP sockets but listening, closed and
 * time-wait ones (no process holds those), matching `filter`; `kill`: aborts them.
 */
function ss(netns: string, kill: boolean, filter: string[] = []): Promise<{ stdout: string }> {
  return run('nsenter', [`--net=${netns}`, '--', 'ss', ...(kill ? ['-K'] : []), '-tnH', 'state', 'connected', 'exclude', 'time-wait', ...filter], {
    op: `${kill ? 'reset' : 'list'} TCP connections in ${netns}`,
    timeoutMs: 10_000,
  });
}

/**
 * Aborts (the peer gets a reset) every connection in network namespace `netns` that a restore on
 * another node could not bind (top of this file); returns them.
 */
export async function resetUnrestorableConnections(netns: string, clusterAddress: string): Promise<TcpConnection[]> {
  const doomed = unrestorable(parseConnections((await ss(netns, false)).stdout), clusterAddress);
  if (doomed.length > 0) await ss(netns, true, ssFilter(doomed));
  return doomed;
}
