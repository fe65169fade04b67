/**
 * A checkpoint store served as a controller serves it (cluster token, /healthz, the store's
 * routes) on loopback, without the rest of a controller: a replica for catalog tests, which can
 * be killed (its host dies) and started again on the same port and data.
 */
import Fastify, { type FastifyInstance } from 'fastify';
import { CheckpointStore, CheckpointStoreClient, checkpointStoreRoutes } from '../../src/checkpoint-store/index.js';
import { installApiConventions } from '../../src/shared/http.js';

export class Replica {
  store!: CheckpointStore;
  app!: FastifyInstance;
  url = '';

  constructor(
    readonly root: string,
    private readonly token: string,
  ) {}

  async start(): Promise<this> {
    this.store = await CheckpointStore.open({ root: this.root });
    this.app = Fastify();
    installApiConventions(this.app, this.token);
    this.app.get('/healthz', async () => ({ ok: true }));
    await this.app.register(checkpointStoreRoutes(this.store));
    // The same port again after a restart: replicas are known by URL.
    const port = this.url ? Number(new URL(this.url).port) : 0;
    this.url = (await this.app.listen({ host: '127.0.0.1', port })).replace(/\/$/, '');
    return this;
  }

  /** Its host dies: connections cut, nothing answers any more. */
  async kill(): Promise<void> {
    this.app.server.closeAllConnections();
    await this.app.close();
    await this.store.close();
  }

  client(): CheckpointStoreClient {
    return new CheckpointStoreClient({ baseUrl: this.url, token: this.token });
  }
}
