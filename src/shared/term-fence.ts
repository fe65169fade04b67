/**
 * Fencing by leadership term. Every call a controller leader makes to an agent or the gateway
 * carries its term (`x-chipmunk-term`: the create revision of its campaign key in etcd, which
 * only grows from one leader to the next). An agent or gateway remembers the newest term it has
 * seen and refuses any call from an older one (`CHIPMUNK_STALE_TERM`): a deposed leader that
 * has not noticed yet can no longer start, stop or move anything.
 *
 * The newest term is kept in a file, written durably before a call with a newer term is let
 * through, so a restarted agent refuses the old leader too. Calls without a term (a controller
 * that runs alone, without an election; agents fetching images from each other; the CLI's
 * debug calls) are let through: terms only order leaders among themselves.
 */
import { readFile } from 'node:fs/promises';
import type { FastifyInstance, FastifyRequest } from 'fastify';

import { InvalidInputError, StaleTermError } from './errors.js';
import { writeFileDurably } from './durable.js';

export const TERM_HEADER = 'x-chipmunk-term';

export class TermFence {
  private newest: number;
  /** Raises are written one after the other, so the file never goes back to a lower term. */
  private writes: Promise<void> = Promise.resolve();

  private constructor(
    private readonly file: string,
    newest: number,
  ) {
    this.newest = newest;
  }

  /** The fence kept in FILE (none yet: no term seen). */
  static async open(file: string): Promise<TermFence> {
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return new TermFence(file, 0);
      throw err;
    }
    const newest = Number(text.trim());
    if (!Number.isSafeInteger(newest) || newest < 0) {
      throw new InvalidInputError(`the term file ${file} holds '${text.trim().slice(0, 40)}', not a term: remove it only if no old controller leader can still be running`, { file });
    }
    return new TermFence(file, newest);
  }

  /** The newest term seen (0: none). */
  get newestTerm(): number {
    return this.newest;
  }

  /** Lets a call from TERM through, or refuses it when a newer leader has been seen. */
  async admit(term: number): Promise<void> {
    if (term < this.newest) {
      throw new StaleTermError(
        `refused: a newer controller leader (term ${this.newest}) has taken over from the one that sent this (term ${term})`,
        { term, newestTerm: this.newest },
      );
    }
    if (term > this.newest) {
      this.newest = term;
      // Whatever is newest when the write runs: a later raise may have come meanwhile.
      const write = this.writes.then(() => writeFileDurably(this.file, `${this.newest}\n`));
      this.writes = write.catch(() => undefined);
      await write;
      return;
    }
    // Not before the term that lets it through is on disk: a restart must not forget it.
    await this.writes;
  }
}

/** Parses a term header; a malformed one is the caller's mistake, not a reason to let it through. */
export function parseTerm(raw: string | string[] | undefined): number | undefined {
  if (raw === undefined) return undefined;
  const text = Array.isArray(raw) ? raw[0] : raw;
  if (text === undefined || !/^\d{1,15}$/.test(text) || Number(text) < 1) {
    throw new InvalidInputError(`bad ${TERM_HEADER} header '${String(text).slice(0, 40)}': a leader's term is a whole number of at least 1`);
  }
  return Number(text);
}

/** Requests that change nothing: answered whatever term they carry. */
const READS = new Set(['GET', 'HEAD']);

/**
 * Server side: every request carrying a term passes FENCE first, but a read with an older term is
 * answered all the same: the fence guards what changes something, and a deposed leader, now a
 * follower answering an operator's `ps`, would otherwise see every container of this node as
 * `unknown` until it leads again.
 */
export function installTermFence(app: FastifyInstance, fence: TermFence): void {
  app.addHook('onRequest', async (req: FastifyRequest) => {
    const term = parseTerm(req.headers[TERM_HEADER]);
    if (term === undefined) return;
    if (READS.has(req.method) && term < fence.newestTerm) return;
    await fence.admit(term);
  });
}
