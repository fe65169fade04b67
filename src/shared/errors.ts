/**
 * chipmunk's error classes. Every failure that crosses a component boundary (CRIU, runc,
 * CNI, the store, HTTP between processes) is translated into one of these, each with a
 * stable `code` that scripts and the CLI can rely on. `toJSON()` is the wire form; the
 * HTTP client turns it back into the same class with `errorFromJSON()`.
 */

export type ErrorCode =
  | 'CHIPMUNK_INVALID_INPUT'
  | 'CHIPMUNK_NOT_FOUND'
  | 'CHIPMUNK_CONFLICT'
  | 'CHIPMUNK_UNAUTHORIZED'
  | 'CHIPMUNK_UNAVAILABLE'
  | 'CHIPMUNK_CAPABILITY_MISSING'
  | 'CHIPMUNK_RUNTIME_FAILED'
  | 'CHIPMUNK_MIGRATION_FAILED'
  | 'CHIPMUNK_MIGRATION_IN_PROGRESS'
  | 'CHIPMUNK_FAILOVER_FAILED'
  | 'CHIPMUNK_TRANSFER_FAILED'
  | 'CHIPMUNK_STORE_CONFLICT'
  | 'CHIPMUNK_STORE_FAILED'
  | 'CHIPMUNK_PATH_ESCAPES'
  | 'CHIPMUNK_CHUNK_CORRUPT'
  | 'CHIPMUNK_LOCK_LOST'
  | 'CHIPMUNK_STATE_CORRUPT'
  | 'CHIPMUNK_LOG_MISMATCH'
  | 'CHIPMUNK_NOT_LEADER'
  | 'CHIPMUNK_STALE_TERM'
  | 'CHIPMUNK_INTERNAL';

export interface ErrorJSON {
  code: ErrorCode;
  message: string;
  details?: Record<string, unknown>;
}

export class ChipmunkError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown>;
  /** HTTP status the API answers with for this error. */
  readonly status: number;

  constructor(code: ErrorCode, message: string, opts: { status?: number; details?: Record<string, unknown>; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = new.target.name;
    this.code = code;
    this.status = opts.status ?? 500;
    this.details = opts.details ?? {};
  }

  toJSON(): ErrorJSON {
    const details = { ...this.details };
    if (this.cause !== undefined) details.cause = describeCause(this.cause);
    return { code: this.code, message: this.message, ...(Object.keys(details).length ? { details } : {}) };
  }
}

/** Bad input from a user or a client: names what was wrong and what to do. */
export class InvalidInputError extends ChipmunkError {
  constructor(message: string, details?: Record<string, unknown>, code: ErrorCode = 'CHIPMUNK_INVALID_INPUT') {
    super(code, message, { status: 400, details });
  }
}

/**
 * A path given for a container's files would leave the container's tree: `..` above `/`, or a
 * symlink chain that points outside or loops. Refused, never clamped, so a caller never reads
 * a different file than the one it named.
 */
export class PathEscapesError extends InvalidInputError {
  constructor(message: string, details?: Record<string, unknown>) {
    super(message, details, 'CHIPMUNK_PATH_ESCAPES');
  }
}

export class NotFoundError extends ChipmunkError {
  constructor(message: string, details?: Record<string, unknown>) {
    super('CHIPMUNK_NOT_FOUND', message, { status: 404, details });
  }
}

export class ConflictError extends ChipmunkError {
  constructor(message: string, details?: Record<string, unknown>) {
    super('CHIPMUNK_CONFLICT', message, { status: 409, details });
  }
}

export class UnauthorizedError extends ChipmunkError {
  constructor(message = 'missing or wrong cluster token: pass the token from the cluster config (Authorization: Bearer TOKEN)') {
    super('CHIPMUNK_UNAUTHORIZED', message, { status: 401 });
  }
}

/** A call from a controller leader that a newer leader has replaced (src/shared/term-fence.ts). */
export class StaleTermError extends ChipmunkError {
  constructor(message: string, details?: Record<string, unknown>) {
    super('CHIPMUNK_STALE_TERM', message, { status: 409, details });
  }
}

export class UnavailableError extends ChipmunkError {
  constructor(message: string, details?: Record<string, unknown>, cause?: unknown) {
    super('CHIPMUNK_UNAVAILABLE', message, { status: 503, details, cause });
  }
}

/** A kernel or tool capability that an operation needs is absent on this host. */
export class CapabilityMissingError extends ChipmunkError {
  constructor(message: string, details?: Record<string, unknown>) {
    super('CHIPMUNK_CAPABILITY_MISSING', message, { status: 422, details });
  }
}

/** runc, CRIU, CNI or podman failed; `logPath` points at the tool's own log when there is one. */
export class RuntimeFailedError extends ChipmunkError {
  constructor(message: string, details: { op: string; logPath?: string; stderr?: string; [k: string]: unknown }, cause?: unknown) {
    super('CHIPMUNK_RUNTIME_FAILED', message, { status: 500, details, cause });
  }
}

export type MigrationPhase = 'prepare' | 'dump' | 'transfer' | 'restore' | 'verify' | 'cleanup' | 'rollback';

export class MigrationFailedError extends ChipmunkError {
  constructor(message: string, details: { phase: MigrationPhase; node: string; logPath?: string; rolledBack?: boolean; [k: string]: unknown }, cause?: unknown) {
    super('CHIPMUNK_MIGRATION_FAILED', message, { status: 500, details, cause });
  }
}

/** A protected container could not be restored elsewhere after its node died. */
export class FailoverFailedError extends ChipmunkError {
  constructor(message: string, details: { name: string; from: string; [k: string]: unknown }, cause?: unknown) {
    super('CHIPMUNK_FAILOVER_FAILED', message, { status: 500, details, cause });
  }
}

export class MigrationInProgressError extends ChipmunkError {
  constructor(name: string, migrationId: string) {
    super('CHIPMUNK_MIGRATION_IN_PROGRESS', `container ${name} is already being migrated (migration ${migrationId}); wait for it to finish`, {
      status: 409,
      details: { name, migrationId },
    });
  }
}

/**
 * An operation on a container lost the container's lock to another (a failover took it over, or
 * a restarted controller recovered it): it must stop acting on the container at once.
 */
export class LockLostError extends ChipmunkError {
  constructor(message: string, details?: Record<string, unknown>) {
    super('CHIPMUNK_LOCK_LOST', message, { status: 409, details });
  }
}

export class TransferFailedError extends ChipmunkError {
  constructor(message: string, details?: Record<string, unknown>, cause?: unknown) {
    super('CHIPMUNK_TRANSFER_FAILED', message, { status: 502, details, cause });
  }
}

/** Compare-and-swap lost: the key's revision was not the expected one. */
export class StoreConflictError extends ChipmunkError {
  constructor(key: string, expected: number, actual: number) {
    super('CHIPMUNK_STORE_CONFLICT', `store key ${key} changed concurrently (expected revision ${expected}, found ${actual})`, {
      status: 409,
      details: { key, expected, actual },
    });
  }
}

export class StoreFailedError extends ChipmunkError {
  constructor(message: string, cause?: unknown) {
    super('CHIPMUNK_STORE_FAILED', message, { status: 500, cause });
  }
}

export class CheckpointNotFoundError extends NotFoundError {
  constructor(container: string, id?: string) {
    super(
      id === undefined
        ? `no checkpoints of container ${container} in the checkpoint store`
        : `no checkpoint ${id} of container ${container} in the checkpoint store: list them with GET /v1/checkpoints/${container}`,
      { container, ...(id === undefined ? {} : { checkpoint: id }) },
    );
  }
}

/**
 * A chunk's bytes do not hash to its name: damaged on disk (a read: status 500, the checkpoint
 * is marked corrupt, use an older one) or in flight (an upload: status 400, send it again).
 */
export class ChunkCorruptError extends ChipmunkError {
  constructor(message: string, details: { chunk: string; container?: string; checkpoint?: string; pack?: string; [k: string]: unknown }, status = 500) {
    super('CHIPMUNK_CHUNK_CORRUPT', message, { status, details });
  }
}

/**
 * A state file a component keeps for itself (an agent's per-container record) cannot be read or
 * makes no sense. Not "absent": the thing it describes may well exist and run.
 */
export class StateCorruptError extends ChipmunkError {
  constructor(message: string, details: { path: string; [k: string]: unknown }) {
    super('CHIPMUNK_STATE_CORRUPT', message, { status: 500, details });
  }
}

/**
 * A request-log position names another log than the route's current one (the route was unlogged
 * and logged again, or removed and exposed again): replaying or trimming with it would act on
 * requests it never described.
 */
export class LogMismatchError extends ChipmunkError {
  constructor(message: string, details: Record<string, unknown>) {
    super('CHIPMUNK_LOG_MISMATCH', message, { status: 409, details });
  }
}

/**
 * A write of a controller that no longer leads (or never did): its term no longer holds in the
 * store, so the write was refused. Another controller leads, or will once elected.
 */
export class NotLeaderError extends ChipmunkError {
  constructor(message: string, details?: Record<string, unknown>) {
    super('CHIPMUNK_NOT_LEADER', message, { status: 503, details });
  }
}

const byCode: Partial<Record<ErrorCode, (m: string, d: Record<string, unknown>) => ChipmunkError>> = {
  CHIPMUNK_INVALID_INPUT: (m, d) => new InvalidInputError(m, d),
  CHIPMUNK_NOT_FOUND: (m, d) => new NotFoundError(m, d),
  CHIPMUNK_CONFLICT: (m, d) => new ConflictError(m, d),
  CHIPMUNK_UNAUTHORIZED: (m) => new UnauthorizedError(m),
  CHIPMUNK_UNAVAILABLE: (m, d) => new UnavailableError(m, d),
  CHIPMUNK_CAPABILITY_MISSING: (m, d) => new CapabilityMissingError(m, d),
  CHIPMUNK_RUNTIME_FAILED: (m, d) => new RuntimeFailedError(m, { op: String(d.op ?? 'unknown'), ...d }),
  CHIPMUNK_MIGRATION_FAILED: (m, d) => new MigrationFailedError(m, { phase: (d.phase as MigrationPhase) ?? 'prepare', node: String(d.node ?? ''), ...d }),
  CHIPMUNK_TRANSFER_FAILED: (m, d) => new TransferFailedError(m, d),
  CHIPMUNK_FAILOVER_FAILED: (m, d) => new FailoverFailedError(m, { name: String(d.name ?? ''), from: String(d.from ?? ''), ...d }),
  CHIPMUNK_PATH_ESCAPES: (m, d) => new PathEscapesError(m, d),
  CHIPMUNK_LOCK_LOST: (m, d) => new LockLostError(m, d),
  CHIPMUNK_STATE_CORRUPT: (m, d) => new StateCorruptError(m, { ...d, path: String(d.path ?? '') }),
  CHIPMUNK_LOG_MISMATCH: (m, d) => new LogMismatchError(m, d),
  CHIPMUNK_NOT_LEADER: (m, d) => new NotLeaderError(m, d),
  CHIPMUNK_STALE_TERM: (m, d) => new StaleTermError(m, d),
};

/** Rebuilds our error class from its wire form (HTTP client side). */
export function errorFromJSON(body: ErrorJSON, status?: number): ChipmunkError {
  const make = byCode[body.code];
  if (make) return make(body.message, body.details ?? {});
  if (body.code === 'CHIPMUNK_CHUNK_CORRUPT') {
    const details = body.details ?? {};
    return new ChunkCorruptError(body.message, { ...details, chunk: String(details.chunk ?? '') }, status);
  }
  if (body.code === 'CHIPMUNK_MIGRATION_IN_PROGRESS') {
    return new ChipmunkError(body.code, body.message, { status: 409, details: body.details });
  }
  return new ChipmunkError(body.code ?? 'CHIPMUNK_INTERNAL', body.message ?? 'unknown error', { status, details: body.details });
}

/** Any thrown value as our error; unknown errors become CHIPMUNK_INTERNAL with their message. */
export function toChipmunkError(err: unknown): ChipmunkError {
  if (err instanceof ChipmunkError) return err;
  return new ChipmunkError('CHIPMUNK_INTERNAL', err instanceof Error ? err.message : String(err), { cause: err });
}

function describeCause(cause: unknown): unknown {
  if (cause instanceof ChipmunkError) return cause.toJSON();
  if (cause instanceof Error) return cause.message;
  return cause;
}
