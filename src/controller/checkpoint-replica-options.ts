/**
 * The controller's checkpoint replica options (`--checkpoint-replicas N`,
 * `--checkpoint-store-peers URL,...`), checked before anything starts: a count that cannot be met
 * or a peer that is not a URL stops the start with what to do.
 */
import type { Logger } from 'pino';
import { InvalidInputError } from '../shared/errors.js';

/** N, from the option and the replicas known; an N that cannot be met is refused at start. */
export function checkpointReplicaCount(requested: number | undefined, peers: string[], logger: Logger): number {
  const known = 1 + peers.length;
  if (requested === undefined) {
    if (known >= 2) return 2;
    logger.warn('checkpoints live on one host: this controller knows no other checkpoint store replica (--checkpoint-store-peers), so each checkpoint is kept on 1 replica and is lost with this host');
    return 1;
  }
  if (!Number.isInteger(requested) || requested < 1) throw new InvalidInputError(`--checkpoint-replicas must be a whole number of at least 1, not ${requested}`, { checkpointReplicas: requested });
  if (requested > known) {
    throw new InvalidInputError(
      `--checkpoint-replicas ${requested} needs ${requested} checkpoint store replicas, but this controller knows ${known} (its own store${peers.length ? ` and ${peers.join(', ')}` : ''}): name more with --checkpoint-store-peers, or lower --checkpoint-replicas`,
      { checkpointReplicas: requested, known },
    );
  }
  return requested;
}

/** The peers as base URLs, without this controller's own (every node of a cluster may be given the same list). */
export function checkpointStorePeers(urls: string[] | undefined, ownUrl: string | undefined): string[] {
  const own = ownUrl?.replace(/\/$/, '');
  return [...new Set((urls ?? []).map(peerUrl))].filter((url) => url !== own);
}

/** A peer's base URL, checked: a typo here would otherwise only show as a replica that never answers. */
function peerUrl(url: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new InvalidInputError(`--checkpoint-store-peers: '${url}' is not a URL; give each peer controller's base URL, e.g. http://10.0.0.2:7000`, { peer: url });
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw new InvalidInputError(`--checkpoint-store-peers: '${url}' is not an http(s) URL`, { peer: url });
  return url.replace(/\/$/, '');
}
