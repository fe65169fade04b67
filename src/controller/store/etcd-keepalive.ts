/** Keeping an etcd lease alive, one keep-alive at a time, past a dead or hung member. */
import type { Etcd3 } from 'etcd3';

/** A healthy member answers a keep-alive in milliseconds; one that takes this long is tried no more. */
const KEEPALIVE_TRY_MS = 400;

/**
 * One keep-alive: the lease's remaining TTL in seconds, 0 when etcd no longer has it. A keep-alive
 * is a stream, which the client neither retries nor steers away from a dead member (the stream
 * opens and then hangs or fails), so each try is bounded by KEEPALIVE_TRY_MS and the next try
 * goes to a member picked afresh: a leader with a 1 s lease must not lose it to one dead member.
 */
export async function keepAliveOnce(client: Etcd3, memberCount: number, id: string): Promise<number> {
  let lastError: unknown;
  for (let attempt = 0; attempt < Math.max(2, memberCount); attempt++) {
    try {
      return await keepAliveTry(client, id);
    } catch (err) {
      lastError = err;
    }
  }
  throw lastError;
}

async function keepAliveTry(client: Etcd3, id: string): Promise<number> {
  const stream = await client.leaseClient.leaseKeepAlive();
  let answered = false;
  try {
    return await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no answer to the keep-alive within ${KEEPALIVE_TRY_MS} ms`)), KEEPALIVE_TRY_MS);
      stream.on('data', (res) => {
        clearTimeout(timer);
        answered = true;
        resolve(Number(res.TTL));
      });
      stream.on('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      stream.write({ ID: id });
    });
  } finally {
    // The client takes an error on a stream still writable for a failure of its member (counted
    // towards opening the member's circuit breaker; its connection is dropped), and cancelling
    // raises one. An answered keep-alive is ended first, so its cancel counts nothing (five at
    // once opened the breaker and failed the next calls); one that got no answer in time is
    // cancelled as is: counted, a hung member is soon passed over.
    if (answered) stream.end();
    stream.cancel();
  }
}
