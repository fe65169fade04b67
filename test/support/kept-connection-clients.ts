/**
 * Clients that keep ONE TCP connection open and send every 10 ms, recording each reply and
 * when it came: an echo client (numbered lines) and a Redis client (INCR). Tests move the
 * container under them and then check that the connection saw no reset, close or error, and
 * that every reply came back in order. Traffic goes to test addresses (198.18.0.0/15) or to a
 * gateway on loopback only.
 */
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

export interface Endpoint {
  host: string;
  port: number;
}

const SEND_EVERY_MS = 10;

async function openSocket(ep: Endpoint): Promise<Socket> {
  assert.match(ep.host, /^(198\.1[89]\.|127\.0\.0\.1$)/, `${ep.host} is neither a test address nor a gateway on loopback`);
  const socket = connect(ep);
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  return socket;
}

/** What both clients share: sending on a timer, replies with their times, errors, gaps. */
abstract class KeptConnectionClient<Reply extends { at: number }> {
  protected buffered = '';
  protected sent = 0;
  private timer?: NodeJS.Timeout;
  readonly replies: Reply[] = [];
  readonly errors: string[] = [];
  /** When the first of `errors` came (ms since the epoch), to tell which move it was. */
  firstErrorAt?: number;

  protected constructor(protected readonly socket: Socket) {
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => {
      this.buffered += d;
      this.parse();
    });
    socket.on('end', () => this.failed('end of stream'));
    socket.on('error', (err: NodeJS.ErrnoException) => this.failed(err.code ?? err.message));
    socket.on('close', () => this.failed('connection closed'));
  }

  protected failed(what: string): void {
    this.firstErrorAt ??= Date.now();
    this.errors.push(what);
  }

  protected abstract parse(): void;
  protected abstract request(n: number): string;

  protected startSending(): void {
    this.timer = setInterval(() => this.socket.write(this.request(++this.sent)), SEND_EVERY_MS);
  }

  /** Stops sending and waits (bounded) for the reply to everything sent; returns how many were sent. */
  async stop(): Promise<number> {
    clearInterval(this.timer);
    const deadline = Date.now() + 30_000;
    while (this.replies.length < this.sent && this.errors.length === 0 && Date.now() < deadline) await sleep(20);
    this.socket.destroy();
    return this.sent;
  }

  /**
   * Longest time between two consecutive replies whose interval overlaps `since`..`until`: a
   * silence that began before `since` or ended after `until` counts whole. A client that got no
   * reply after `since` at all has been silent since its last one: that counts until now.
   */
  maxGapMs(since: number, until = Infinity): number {
    const times = this.replies.map((r) => r.at);
    let gap = 0;
    for (let i = 1; i < times.length; i++) if (times[i]! >= since && times[i - 1]! <= until) gap = Math.max(gap, times[i]! - times[i - 1]!);
    const last = times.at(-1);
    if (last !== undefined && last < until) gap = Math.max(gap, Math.min(until, Date.now()) - Math.max(last, since));
    return gap;
  }
}

/** Numbered lines to an echo server (`nc -ll -e /bin/cat`); each echoed line is a reply. */
export class EchoClient extends KeptConnectionClient<{ n: number; at: number }> {
  static async open(ep: Endpoint): Promise<EchoClient> {
    const client = new EchoClient(await openSocket(ep));
    client.startSending();
    return client;
  }

  protected request(n: number): string {
    return `${n}\n`;
  }

  protected parse(): void {
    let nl: number;
    while ((nl = this.buffered.indexOf('\n')) >= 0) {
      this.replies.push({ n: Number(this.buffered.slice(0, nl)), at: Date.now() });
      this.buffered = this.buffered.slice(nl + 1);
    }
  }

  assertAllInOrder(sent: number): void {
    assert.deepEqual(this.errors, [], 'the connection must see no reset, close or error');
    assert.equal(this.replies.length, sent, `every line sent (${sent}) must come back, ${this.replies.length} did`);
    this.replies.forEach((r, i) => assert.equal(r.n, i + 1, `reply ${i + 1} out of order`));
  }
}

/** RESP `INCR key` to Redis; each integer reply is a reply (1, 2, 3...: none lost or repeated). */
export class IncrClient extends KeptConnectionClient<{ value: number; at: number }> {
  private constructor(
    socket: Socket,
    readonly key: string,
  ) {
    super(socket);
  }

  static async open(ep: Endpoint, key: string): Promise<IncrClient> {
    const client = new IncrClient(await openSocket(ep), key);
    client.startSending();
    return client;
  }

  protected request(): string {
    return `*2\r\n$4\r\nINCR\r\n$${Buffer.byteLength(this.key)}\r\n${this.key}\r\n`;
  }

  protected parse(): void {
    let end: number;
    while ((end = this.buffered.indexOf('\r\n')) >= 0) {
      const line = this.buffered.slice(0, end);
      this.buffered = this.buffered.slice(end + 2);
      if (line.startsWith(':')) this.replies.push({ value: Number(line.slice(1)), at: Date.now() });
      else this.failed(`unexpected reply ${line}`);
    }
  }

  assertEveryReplyInOrder(sent: number): void {
    assert.deepEqual(this.errors, [], `${this.key}: the connection must see no reset, close or error`);
    assert.equal(this.replies.length, sent, `${this.key}: every INCR sent (${sent}) must be answered, ${this.replies.length} were`);
    this.replies.forEach((r, i) => assert.equal(r.value, i + 1, `${this.key}: reply ${i + 1} is ${r.value}`));
  }
}
