/**
 * A TCP proxy on loopback, for cutting a client off from a server and letting it back: cut()
 * drops every connection and refuses new ones (each is closed as it arrives) until restore();
 * stall() keeps connections open but lets nothing through, as a firewall that drops packets does:
 * the client hears nothing, not even a refusal, until its own deadline.
 */
import { connect, createServer, type Socket } from 'node:net';
import { once } from 'node:events';

export interface TcpProxy {
  /** host:port to connect to instead of the target. */
  endpoint: string;
  cut(): void;
  /** Silence: bytes either way are dropped, new connections accepted and left unanswered. */
  stall(): void;
  /** Lets new connections through again; connections a stall dropped bytes of are closed (their streams lost bytes). */
  restore(): void;
  close(): Promise<void>;
}

export async function startTcpProxy(target: string): Promise<TcpProxy> {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const sockets = new Set<Socket>();
  let mode: 'open' | 'cut' | 'stalled' = 'open';
  const track = (socket: Socket, peer?: Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {
      socket.destroy();
      peer?.destroy();
    });
  };
  const forward = (from: Socket, to: Socket) => from.on('data', (chunk: Buffer) => mode === 'open' && to.write(chunk));
  const server = createServer((client) => {
    if (mode === 'cut') return void client.destroy();
    if (mode === 'stalled') return void track(client);
    const upstream = connect(port, host);
    track(client, upstream);
    track(upstream, client);
    forward(client, upstream);
    forward(upstream, client);
    for (const [a, b] of [[client, upstream], [upstream, client]] as const) a.on('end', () => b.end());
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const proxy: TcpProxy = {
    endpoint: `127.0.0.1:${(server.address() as { port: number }).port}`,
    cut() {
      mode = 'cut';
      for (const socket of sockets) socket.destroy();
    },
    stall() {
      mode = 'stalled';
    },
    restore() {
      if (mode === 'stalled') for (const socket of sockets) socket.destroy();
      mode = 'open';
    },
    async close() {
      proxy.cut();
      await new Promise((resolve) => server.close(resolve));
    },
  };
  return proxy;
}
