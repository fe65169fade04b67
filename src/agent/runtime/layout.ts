/**
 * Where the real runtime keeps things, and the names it gives them. On-disk layout under the
 * agent's data dir (what a newcomer debugging a node looks at):
 *   containers/NAME/state.json        what this node knows of the container (records.ts);
 *                                     state.json.prev: the copy before the last write
 *   containers/NAME/files/upper/      writable layer (overlay upper): every file the container
 *                                     changed; or, with image layers (rootfs.ts),
 *   containers/NAME/files/layer.img   an ext4 image (sparse) holding them, mounted at layer/
 *   containers/NAME/files/logs/       stdout.log, stderr.log
 *   containers/NAME/files/volumes/V/  named volume V (bind-mounted at its path)
 *   containers/NAME/layer/            the mounted layer image: overlay upper/ and work/
 *   containers/NAME/rootfs/, work/    overlay mount point; work dir of a directory layer
 *   containers/NAME/etc/              hosts, resolv.conf, hostname of this incarnation (etc-files.ts)
 *   containers/NAME/config.json       OCI config of the current incarnation (runc bundle)
 *   containers/NAME/criu.conf         CRIU options runc passes on (criu.ts)
 *   migrations/ID/images/             CRIU images of one migration
 *   migrations/ID/criu-work/          CRIU logs (dump.log, restore.log, lazy-pages.log)
 *   checkpoints/ID/{images,files}/    a checkpoint (the container ran on), until uploaded or discarded
 *   failed-logs/OP-ID/                CRIU logs of a failed dump, checkpoint or restore (failed-logs.ts)
 * runc's own state lives under RUN_DIR/runc.
 */
import { join } from 'node:path';

export class NodeLayout {
  constructor(
    private readonly node: string,
    readonly dataDir: string,
    private readonly runDir: string,
  ) {}

  containersDir(): string {
    return join(this.dataDir, 'containers');
  }

  containerDir(name: string): string {
    return join(this.containersDir(), name);
  }

  logDir(name: string): string {
    return join(this.containerDir(name), 'files', 'logs');
  }

  /** Under files/, so volumes travel with every migration and are in every checkpoint. */
  volumeDir(name: string, volume: string): string {
    return join(this.containerDir(name), 'files', 'volumes', volume);
  }

  runcRoot(): string {
    return join(this.runDir, 'runc');
  }

  runcId(name: string, generation: number): string {
    return `chmk-${this.node}-${name}-${generation}`;
  }

  /**
   * The network namespace of an incarnation. Its name is also the CNI container ID of the
   * attachment (portmap's DNAT rules and the IPAM reservation are keyed by it): a rollback
   * restores a new incarnation (generation + 1) into the same namespace, so the runc ID of the
   * current generation would not name the attachment any more.
   */
  netnsName(name: string, generation: number): string {
    return `chmk-${this.node}-${name}-${generation}`;
  }

  cgroupsPath(name: string, generation: number): string {
    return `/chipmunk/${this.node}/${name}-${generation}`;
  }

  migrationDir(migrationId: string): string {
    return join(this.dataDir, 'migrations', migrationId);
  }

  migrationImages(migrationId: string): string {
    return join(this.migrationDir(migrationId), 'images');
  }

  criuWorkDir(migrationId: string): string {
    return join(this.migrationDir(migrationId), 'criu-work');
  }

  checkpointsDir(): string {
    return join(this.dataDir, 'checkpoints');
  }

  checkpointDir(checkpointId: string): string {
    return join(this.checkpointsDir(), checkpointId);
  }

  failedLogsDir(): string {
    return join(this.dataDir, 'failed-logs');
  }
}
