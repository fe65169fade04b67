/**
 * The checkpoint store's HTTP messages, one TypeBox schema each (validation, types, docs), as in
 * src/shared/protocol.ts. Routes: src/checkpoint-store/routes.ts; docs/design.md has the table.
 */
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import { ContainerName, LogPosition } from '../shared/protocol.js';

export { ContainerName, LogPosition };

export const PartName = Type.String({ pattern: '^[a-z][a-z0-9-]{0,31}$', description: 'part name, e.g. criu or files' });
export const CheckpointId = Type.String({ pattern: '^[0-9a-f]{16}$', description: 'checkpoint id (16 hex digits)' });
export const UploadId = Type.String({ pattern: '^[0-9a-f]{32}$', description: 'upload id (32 hex digits)' });

/** Where an upload's checkpoint was cut in the container's request log; null when the caller keeps none. */
const UploadLogPosition = Type.Union([LogPosition, Type.Object({ logId: Type.Null(), seq: Type.Integer({ minimum: 0 }) }), Type.Null()], {
  description: "position in the container's request log the checkpoint corresponds to, when the caller keeps one (logId null only on a copy of a checkpoint stored before logs had ids)",
});

/**
 * A stored checkpoint's position. `logId` is null on checkpoints stored before positions named
 * their log: such a position cannot be matched to any log, so it is never replayed from.
 */
export const StoredLogPosition = Type.Union(
  [Type.Object({ logId: Type.Union([Type.String(), Type.Null()]), seq: Type.Integer({ minimum: 0 }) }), Type.Null()],
  { description: "position in the container's request log the checkpoint corresponds to (logId null: stored before logs had ids)" },
);
export type StoredLogPosition = Static<typeof StoredLogPosition>;

export const UploadPart = Type.Object({
  name: PartName,
  manifest: Type.String({ contentEncoding: 'base64', description: 'base64 of the binary part manifest (src/checkpoint-store/manifest.ts): tar headers + 32-byte chunk hashes' }),
});
export type UploadPart = Static<typeof UploadPart>;

export const CreateUploadRequest = Type.Object({
  parts: Type.Array(UploadPart, { minItems: 1 }),
  time: Type.Integer({ minimum: 0, description: 'when the checkpoint was taken, ms since the epoch' }),
  logPosition: Type.Optional(UploadLogPosition),
  id: Type.Optional({ ...CheckpointId, description: 'commit under this id (the same checkpoint on several replicas); the store picks one by default' }),
  metadata: Type.Record(Type.String(), Type.Unknown(), {
    description: "opaque to the store (the controller keeps the container spec here), except volumes: [{name, path}], which places the files part's volumes/NAME/ at path",
  }),
});
export type CreateUploadRequest = Static<typeof CreateUploadRequest>;

export const CreateUploadResponse = Type.Object({
  uploadId: UploadId,
  missing: Type.String({
    contentEncoding: 'base64',
    description:
      'base64 bitmap over every chunk position of the manifests in request order (parts, entries, chunks), most significant bit first: a set bit asks for that chunk; only the first position of a missing hash is set',
  }),
  missingChunks: Type.Integer({ minimum: 0 }),
  missingBytes: Type.Integer({ minimum: 0 }),
});
export type CreateUploadResponse = Static<typeof CreateUploadResponse>;

export const UploadChunksResponse = Type.Object({
  chunks: Type.Integer({ minimum: 0, description: 'chunks stored by this request (a chunk sent twice counts once)' }),
  bytes: Type.Integer({ minimum: 0 }),
});
export type UploadChunksResponse = Static<typeof UploadChunksResponse>;

export const ChunkFramesRequest = Type.Object({
  missing: Type.String({ contentEncoding: 'base64', description: "the receiving replica's missing bitmap (CreateUploadResponse.missing) for this checkpoint's upload request" }),
});
export type ChunkFramesRequest = Static<typeof ChunkFramesRequest>;

export const ReplicaState = Type.Union([Type.Literal('intact'), Type.Literal('corrupt'), Type.Literal('missing'), Type.Literal('unreachable')], {
  description: 'intact: stored and not found damaged; corrupt: a read found a damaged chunk there; missing: that store lacks it; unreachable: that store did not answer',
});
export type ReplicaState = Static<typeof ReplicaState>;

export const CheckpointReplica = Type.Object({ url: Type.String(), state: ReplicaState });
export type CheckpointReplica = Static<typeof CheckpointReplica>;

export const CheckpointSummary = Type.Object({
  id: CheckpointId,
  time: Type.Integer(),
  logicalBytes: Type.Integer({ minimum: 0, description: 'content bytes of every part, as if nothing were shared with other checkpoints' }),
  newBytes: Type.Integer({ minimum: 0, description: 'chunk bytes this checkpoint added to the store' }),
  logPosition: StoredLogPosition,
  corrupt: Type.Optional(Type.Boolean({ description: 'a read found a damaged chunk: restore from an older checkpoint' })),
  legacy: Type.Optional(Type.Boolean({ description: "a store's own listing: stored by a version that kept no commit records; it counts on the replicas holding it" })),
  replicas: Type.Optional(Type.Array(CheckpointReplica, { description: "where the checkpoint is (the controller's listings; a store's own listing has none)" })),
});
export type CheckpointSummary = Static<typeof CheckpointSummary>;

export const CheckpointPart = Type.Object({
  name: PartName,
  logicalBytes: Type.Integer({ minimum: 0 }),
  entries: Type.Integer({ minimum: 0 }),
});

export const CheckpointInfo = Type.Composite([CheckpointSummary, Type.Object({ container: ContainerName, parts: Type.Array(CheckpointPart) })]);
export type CheckpointInfo = Static<typeof CheckpointInfo>;

export const CheckpointDetail = Type.Composite([CheckpointInfo, Type.Object({ metadata: Type.Record(Type.String(), Type.Unknown()) })]);
export type CheckpointDetail = Static<typeof CheckpointDetail>;

export const FileType = Type.Union(['file', 'dir', 'symlink', 'char', 'block', 'fifo'].map((t) => Type.Literal(t)));

export const FileEntry = Type.Object({
  name: Type.String(),
  type: FileType,
  size: Type.Integer({ minimum: 0 }),
  mode: Type.Integer({ minimum: 0 }),
  mtime: Type.Number({ description: 'seconds since the epoch' }),
  linkTarget: Type.Optional(Type.String()),
});
export type FileEntry = Static<typeof FileEntry>;

export const DirectoryListing = Type.Object(
  {
    type: Type.Literal('dir'),
    path: Type.String(),
    entries: Type.Array(FileEntry),
  },
  { description: 'answer of the files route for a directory; a file is answered with its bytes (application/octet-stream)' },
);
export type DirectoryListing = Static<typeof DirectoryListing>;

export const FilesQuery = Type.Object({
  path: Type.String({ default: '/', description: 'a path in the container, / being its root; symlinks resolve inside the container' }),
});

export const DiffQuery = Type.Object({ from: CheckpointId, to: CheckpointId });

export const CheckpointDiff = Type.Object({
  added: Type.Array(Type.String()),
  changed: Type.Array(Type.String()),
  removed: Type.Array(Type.String()),
});
export type CheckpointDiff = Static<typeof CheckpointDiff>;

export const StoreUsage = Type.Object(
  {
    checkpoints: Type.Integer({ minimum: 0, description: 'checkpoints this store holds, of every container' }),
    containers: Type.Integer({ minimum: 0, description: 'containers it holds checkpoints of' }),
    bytes: Type.Integer({ minimum: 0, description: 'bytes of its pack files: what its checkpoints take on disk, deduplicated' }),
  },
  { description: "answer of GET /v1/checkpoint-store: what one store replica holds (the controller's replica listing shows it)" },
);
export type StoreUsage = Static<typeof StoreUsage>;

export const checkpointStoreSchemas: Record<string, TSchema> = {
  StoreUsage,
  UploadPart,
  CreateUploadRequest,
  CreateUploadResponse,
  UploadChunksResponse,
  ChunkFramesRequest,
  CheckpointReplica,
  CheckpointSummary,
  CheckpointInfo,
  CheckpointDetail,
  FileEntry,
  DirectoryListing,
  CheckpointDiff,
};
