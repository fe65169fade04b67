/**
 * The checkpoint store: where periodic checkpoints of a container (CRIU images + its files) are
 * kept on another host, deduplicated in 4 KiB chunks. docs/design.md, "Checkpoint store".
 *
 * - CheckpointStore: the store itself (open it on the host that keeps checkpoints).
 * - checkpointStoreRoutes: its HTTP API as a fastify plugin, for that host's server.
 * - CheckpointStoreClient: typed calls to the API; uploadCheckpoint: the agent's upload (to every
 *   replica); copyCheckpoint: a store-to-store copy (re-replication).
 */
export { CheckpointStore, DEFAULT_KEEP, DEFAULT_UPLOAD_TIMEOUT_MS, type CheckpointFile, type CheckpointStoreOptions, type GcResult, type NewUpload } from './store.js';
export { checkpointStoreRoutes } from './routes.js';
export { CheckpointStoreClient, checkpointPartUrl, type CheckpointFileContent } from './client.js';
export { copyCheckpoint, type CopiedCheckpoint, type CopyCheckpointOptions } from './replicate.js';
export { uploadCheckpoint, type UploadCheckpointOptions, type UploadedCheckpoint } from './upload.js';
export * from './protocol.js';
