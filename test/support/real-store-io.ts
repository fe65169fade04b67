/**
 * A fake agent (test/fakes/agents.ts) whose checkpoint upload and restore from the store do the
 * real thing: the agent's uploadCheckpoint of real part directories to the replicas the
 * controller names, and fetchTreeFromAny over the replicas it hands a restore. The rest of the
 * agent stays fake, so controller tests check real checkpoint stores without CRIU.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fetchTreeFromAny } from '../../src/agent/transfer.js';
import { checkpointPartUrl, uploadCheckpoint } from '../../src/checkpoint-store/index.js';
import type { AgentApi } from '../../src/controller/agent-client.js';
import { NotFoundError, UnavailableError } from '../../src/shared/errors.js';
import type { RestoreRequest, UploadCheckpointRequest } from '../../src/shared/protocol.js';
import { removeTree } from '../../src/shared/remove-tree.js';
import type { FakeAgent, FakeCluster } from '../fakes/agents.js';

export interface CheckpointParts {
  /** Where the parts and restored copies live. */
  work: string;
  parts: { name: string; dir: string }[];
  remove(): Promise<void>;
}

/** A "criu" part with 512 KiB of pages and a "files" part with FILES (path -> content) in its upper layer. */
export async function makeCheckpointParts(files: Record<string, string> = {}): Promise<CheckpointParts> {
  const work = await mkdtemp(join(tmpdir(), 'chipmunk-store-io-'));
  const criu = join(work, 'criu');
  await mkdir(criu, { recursive: true });
  await writeFile(join(criu, 'pages-1.img'), randomBytes(512 * 1024));
  await mkdir(join(work, 'files/upper'), { recursive: true });
  for (const [path, content] of Object.entries(files)) await writeFile(join(work, 'files/upper', path), content);
  return {
    work,
    parts: [
      { name: 'criu', dir: criu },
      { name: 'files', dir: join(work, 'files') },
    ],
    remove: () => removeTree(work),
  };
}

export interface RealStoreIoOptions {
  token: string;
  parts: CheckpointParts;
  /** Each restore appends the store it read the checkpoint from. */
  readFrom?: string[];
  /** Each restore appends the stores the controller handed it, in order. */
  offered?: string[][];
}

export function withRealStoreIo(cluster: FakeCluster, agent: FakeAgent, opts: RealStoreIoOptions): AgentApi {
  const { work, parts } = opts.parts;
  return new Proxy(agent, {
    get(target, prop) {
      if (prop === 'uploadCheckpoint') {
        return async (id: string, req: UploadCheckpointRequest) => {
          if (target.down) throw new UnavailableError(`agent ${target.node} is unreachable`);
          if (!target.checkpoints.has(id)) throw new NotFoundError(`no checkpoint ${id}`);
          // The program ran on since the last checkpoint: one page of its memory changed.
          await writeFile(join(work, 'criu/pages-2.img'), randomBytes(4096));
          const info = await uploadCheckpoint({ ...req, token: opts.token, parts });
          // The fake restore looks checkpoints up in the fake catalog.
          cluster.catalog.checkpoints.set(req.container, [info, ...(cluster.catalog.checkpoints.get(req.container) ?? [])]);
          return info;
        };
      }
      if (prop === 'restore') {
        return async (opId: string, req: RestoreRequest) => {
          let store: string | undefined;
          if (req.checkpoint && !target.down) {
            const stores = [req.checkpoint.storeUrl, ...(req.checkpoint.replicaUrls ?? [])];
            opts.offered?.push(stores);
            const got = await fetchTreeFromAny(
              stores.map((store) => checkpointPartUrl(store, req.spec.name, req.checkpoint!.id, 'criu')),
              { token: opts.token, dest: join(work, `restore-${randomBytes(4).toString('hex')}`) },
            );
            store = stores.find((s) => got.url.startsWith(s))!;
            opts.readFrom?.push(store);
          }
          const restored = await target.restore(opId, req);
          // As the real agent reports it.
          return store ? { ...restored, readFrom: [store] } : restored;
        };
      }
      const value = Reflect.get(target, prop) as unknown;
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
    },
  });
}
