/**
 * The checkpoint store's HTTP API as a fastify plugin. The host server (the controller) installs
 * the shared conventions (installApiConventions: cluster token, errors as `{code, message,
 * details}`) on its root instance; this plugin inherits them.
 *
 * Part archives go out with the wire protocol of src/agent/transfer.ts's serveTree (chunked,
 * then sha256 and byte-count trailers; destroyed instead of ended on failure), so the agent's
 * fetchTree downloads and extracts them unchanged.
 */
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { Readable } from 'node:stream';
import type { FastifyPluginAsync, FastifyReply } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Type } from '@sinclair/typebox';
import { BYTES_TRAILER, SHA256_TRAILER } from '../shared/tree-archive.js';
import { toChipmunkError } from '../shared/errors.js';
import {
  CheckpointDetail,
  CheckpointDiff,
  CheckpointId,
  CheckpointInfo,
  CheckpointSummary,
  ChunkFramesRequest,
  ContainerName,
  CreateUploadRequest,
  CreateUploadResponse,
  DiffQuery,
  FilesQuery,
  PartName,
  StoreUsage,
  UploadChunksResponse,
  UploadId,
} from './protocol.js';
import type { CheckpointStore } from './store.js';

/** Manifests travel base64 in JSON: 1 GB of content is about 11 MB of request. */
const UPLOAD_BODY_LIMIT_BYTES = 256 * 1024 * 1024;

const ContainerParams = Type.Object({ container: ContainerName });
const CheckpointParams = Type.Object({ container: ContainerName, id: CheckpointId });
const PartParams = Type.Object({ container: ContainerName, id: CheckpointId, part: PartName });
const UploadParams = Type.Object({ uploadId: UploadId });

export function checkpointStoreRoutes(store: CheckpointStore): FastifyPluginAsync {
  return async (base) => {
    const app = base.withTypeProvider<TypeBoxTypeProvider>();
    // Chunk frames are read as a stream by the store, never buffered whole.
    app.addContentTypeParser('application/octet-stream', (_req, payload, done) => done(null, payload));

    app.post(
      '/v1/checkpoints/:container/uploads',
      { bodyLimit: UPLOAD_BODY_LIMIT_BYTES, schema: { params: ContainerParams, body: CreateUploadRequest, response: { 201: CreateUploadResponse } } },
      async (req, reply) => {
        const started = store.createUpload({
          container: req.params.container,
          parts: req.body.parts.map((part) => ({ name: part.name, manifest: Buffer.from(part.manifest, 'base64') })),
          time: req.body.time,
          logPosition: req.body.logPosition,
          metadata: req.body.metadata,
          ...(req.body.id !== undefined ? { id: req.body.id } : {}),
        });
        return reply.code(201).send(started);
      },
    );

    app.put('/v1/checkpoints/uploads/:uploadId/chunks', { schema: { params: UploadParams, response: { 200: UploadChunksResponse } } }, async (req) =>
      store.receiveChunks(req.params.uploadId, req.body as Readable),
    );

    app.post('/v1/checkpoints/uploads/:uploadId/commit', { schema: { params: UploadParams, response: { 200: CheckpointInfo } } }, async (req) =>
      store.commit(req.params.uploadId),
    );

    app.delete('/v1/checkpoints/uploads/:uploadId', { schema: { params: UploadParams } }, async (req, reply) => {
      await store.abort(req.params.uploadId);
      return reply.code(204).send();
    });

    // Not under /v1/checkpoints/: a container may be called anything there.
    app.get('/v1/checkpoint-store', { schema: { response: { 200: StoreUsage } } }, async () => store.usage());

    app.get('/v1/checkpoints/:container', { schema: { params: ContainerParams, response: { 200: Type.Array(CheckpointSummary) } } }, async (req) =>
      store.list(req.params.container),
    );

    app.delete('/v1/checkpoints/:container', { schema: { params: ContainerParams } }, async (req, reply) => {
      await store.forget(req.params.container);
      return reply.code(204).send();
    });

    app.get('/v1/checkpoints/:container/diff', { schema: { params: ContainerParams, querystring: DiffQuery, response: { 200: CheckpointDiff } } }, async (req) =>
      store.diff(req.params.container, req.query.from, req.query.to),
    );

    app.get('/v1/checkpoints/:container/:id', { schema: { params: CheckpointParams, response: { 200: CheckpointDetail } } }, async (req) =>
      store.get(req.params.container, req.params.id),
    );

    app.delete('/v1/checkpoints/:container/:id', { schema: { params: CheckpointParams } }, async (req, reply) => {
      await store.remove(req.params.container, req.params.id);
      return reply.code(204).send();
    });

    // A copy to another replica: the upload request that stores this checkpoint again, then the chunks that replica lacks.
    app.get('/v1/checkpoints/:container/:id/upload-request', { schema: { params: CheckpointParams, response: { 200: CreateUploadRequest } } }, async (req) =>
      store.uploadRequest(req.params.container, req.params.id),
    );

    app.post('/v1/checkpoints/:container/:id/chunk-frames', { schema: { params: CheckpointParams, body: ChunkFramesRequest } }, async (req, reply) => {
      const frames = store.chunkFrames(req.params.container, req.params.id, Buffer.from(req.body.missing, 'base64'));
      // A damaged chunk destroys the response: the receiving replica sees its chunks cut short.
      return reply.type('application/octet-stream').send(Readable.from(frames));
    });

    app.get('/v1/checkpoints/:container/:id/parts/:part.tar', { schema: { params: PartParams } }, async (req, reply) => {
      const archive = store.partArchive(req.params.container, req.params.id, req.params.part);
      await sendArchive(reply, archive);
    });

    // A directory answers DirectoryListing (JSON), a file its bytes (application/octet-stream).
    app.get('/v1/checkpoints/:container/:id/files', { schema: { params: CheckpointParams, querystring: FilesQuery } }, async (req, reply) => {
      const found = store.readPath(req.params.container, req.params.id, req.query.path);
      if (found.type === 'dir') return found;
      // A damaged chunk mid-file destroys the response: the client sees a body shorter than content-length.
      return reply.type('application/octet-stream').header('content-length', found.size).send(Readable.from(found.content));
    });
  };
}

/** serveTree's wire protocol for an archive the store re-creates. */
async function sendArchive(reply: FastifyReply, archive: AsyncIterable<Buffer>): Promise<void> {
  reply.hijack();
  const res = reply.raw;
  const hash = createHash('sha256');
  let bytes = 0;
  res.writeHead(200, { 'content-type': 'application/x-tar', trailer: `${SHA256_TRAILER}, ${BYTES_TRAILER}` });
  try {
    for await (const piece of archive) {
      if (res.destroyed) throw new Error('the client went away');
      hash.update(piece);
      bytes += piece.length;
      if (!res.write(piece)) await Promise.race([once(res, 'drain'), once(res, 'close')]);
    }
    res.addTrailers({ [SHA256_TRAILER]: hash.digest('hex'), [BYTES_TRAILER]: String(bytes) });
    res.end();
  } catch (err) {
    const error = toChipmunkError(err);
    reply.log.error({ err: error.toJSON(), bytes }, `checkpoint archive broke off after ${bytes} bytes: ${error.message}`);
    // Never end it: a response without its trailers is what tells fetchTree the archive is incomplete.
    res.destroy(error);
  }
}
