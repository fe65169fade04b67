/**
 * Errors as contract suites compare them: by class and stable code (what crosses HTTP and what
 * the controller branches on), never by message.
 */
import assert from 'node:assert/strict';
import {
  ConflictError,
  InvalidInputError,
  NotFoundError,
  RuntimeFailedError,
  TransferFailedError,
  UnavailableError,
  toChipmunkError,
  type ChipmunkError,
  type ErrorCode,
} from '../../src/shared/errors.js';

const CODES = new Map<Function, ErrorCode>([
  [NotFoundError, 'CHIPMUNK_NOT_FOUND'],
  [ConflictError, 'CHIPMUNK_CONFLICT'],
  [InvalidInputError, 'CHIPMUNK_INVALID_INPUT'],
  [RuntimeFailedError, 'CHIPMUNK_RUNTIME_FAILED'],
  [TransferFailedError, 'CHIPMUNK_TRANSFER_FAILED'],
  [UnavailableError, 'CHIPMUNK_UNAVAILABLE'],
]);

/** `p` rejects with an instance of `cls` carrying that class's code. */
export async function assertRejects(p: Promise<unknown>, cls: new (...args: any[]) => ChipmunkError, what: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    const got = toChipmunkError(err);
    assert.equal(got.code, CODES.get(cls), `${what}: expected ${cls.name} (${CODES.get(cls)}), got ${got.constructor.name} (${got.code}): ${got.message}`);
    assert.ok(err instanceof cls, `${what}: expected an instance of ${cls.name}, got ${got.constructor.name}`);
    return true;
  });
}
