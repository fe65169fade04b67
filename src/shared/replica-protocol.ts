/**
 * The controller API's messages about the checkpoint replica set (`GET /v1/checkpoint-replicas`,
 * `POST /v1/checkpoint-replicas/retire`), TypeBox schemas as in protocol.ts: validation, types
 * and the generated reference (docs/api.md).
 */
import { Type, type Static, type TSchema } from '@sinclair/typebox';

export const ReplicaUrl = Type.String({ pattern: '^https?://[^\\s/]+(/.*)?$', description: "a replica's base URL: its controller's advertised URL, e.g. http://10.0.0.2:7400" });

export const ReplicaStatus = Type.Union([Type.Literal('active'), Type.Literal('retiring'), Type.Literal('retired')], {
  description:
    'active: takes new checkpoints and copies; retiring: its checkpoints are being copied to the others, it takes nothing new; retired: never used again, even if it answers',
});
export type ReplicaStatus = Static<typeof ReplicaStatus>;

export const CheckpointReplicaView = Type.Object(
  {
    url: ReplicaUrl,
    status: ReplicaStatus,
    /** The controller serving it, when one that runs published it (etcd) or it is the answering controller's own. */
    controller: Type.Optional(Type.String({ description: 'id of the controller serving it, when it is known to run' })),
    node: Type.Optional(Type.String({ description: "the node that controller runs on (`controller --node`)" })),
    reachable: Type.Boolean({ description: 'it answered just now' }),
    checkpoints: Type.Integer({ minimum: 0, description: 'checkpoints committed on it by the records of the state store (what it should hold)' }),
    stored: Type.Optional(Type.Integer({ minimum: 0, description: 'checkpoints its own index holds (reachable replicas only)' })),
    bytes: Type.Optional(Type.Integer({ minimum: 0, description: 'bytes its checkpoints take on its disk, deduplicated (reachable replicas only)' })),
    since: Type.Optional(Type.Integer({ description: 'when it began retiring, or was retired (ms since the epoch)' })),
  },
  { description: 'one checkpoint store replica: a running controller\'s, a peer named by hand, one the commit records still name, or a retired one' },
);
export type CheckpointReplicaView = Static<typeof CheckpointReplicaView>;

export const RetireReplicaRequest = Type.Object({ url: ReplicaUrl });
export type RetireReplicaRequest = Static<typeof RetireReplicaRequest>;

export const RetireReplicaResult = Type.Object(
  {
    url: ReplicaUrl,
    status: Type.Literal('retired'),
    alreadyRetired: Type.Boolean({ description: 'it was retired before this call: nothing was done' }),
    checkpoints: Type.Integer({ minimum: 0, description: 'checkpoints that were on it, now held by N of the remaining replicas' }),
    copies: Type.Integer({ minimum: 0, description: 'copies made to other replicas for it' }),
  },
  { description: 'answer of POST /v1/checkpoint-replicas/retire' },
);
export type RetireReplicaResult = Static<typeof RetireReplicaResult>;

export const replicaSchemas: Record<string, TSchema> = { CheckpointReplicaView, RetireReplicaRequest, RetireReplicaResult };
