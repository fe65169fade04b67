/**
 * How the CLI finds the controller: --controller/--token-file, else CHIPMUNK_CONTROLLER and
 * CHIPMUNK_TOKEN, else the local cluster's state file (written by `chipmunk cluster up`).
 */
import { readFile } from 'node:fs/promises';
import type { Command } from 'commander';

import { DEFAULT_STATE_DIR, readClusterState } from '../cluster/index.js';
import { ControllerClient } from '../shared/controller-client.js';
import { UsageError } from './output.js';
import { parseUrlList } from './options.js';

export interface ConnectionOptions {
  controller?: string[];
  tokenFile?: string;
}

/** Where the local cluster keeps its state; CHIPMUNK_CLUSTER_DIR moves it (tests use their own). */
export function localClusterStateDir(): string {
  return process.env.CHIPMUNK_CLUSTER_DIR || DEFAULT_STATE_DIR;
}

export async function readTokenFile(file: string): Promise<string> {
  let token: string;
  try {
    token = (await readFile(file, 'utf8')).trim();
  } catch (err) {
    throw new UsageError(`cannot read token file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, { file });
  }
  if (!token) throw new UsageError(`token file ${file} is empty`, { file });
  return token;
}

/** The token a daemon (controller, agent) authenticates with: --token-file, else CHIPMUNK_TOKEN. */
export async function daemonToken(tokenFile: string | undefined): Promise<string> {
  if (tokenFile) return readTokenFile(tokenFile);
  const token = process.env.CHIPMUNK_TOKEN;
  if (!token) throw new UsageError('no cluster token: pass --token-file FILE or set CHIPMUNK_TOKEN');
  return token;
}

/**
 * A client for the controllers CMD should talk to (one URL or several, comma-separated); its own
 * options win over the program's.
 */
export async function controllerClient(cmd: Command): Promise<ControllerClient> {
  const opts = cmd.optsWithGlobals<ConnectionOptions>();
  const explicitUrls = opts.controller ?? (process.env.CHIPMUNK_CONTROLLER ? parseUrlList(process.env.CHIPMUNK_CONTROLLER) : undefined);
  const cluster = await readClusterState(localClusterStateDir());
  const clusterUrls = cluster ? (cluster.controllerUrls ?? [cluster.controllerUrl]) : [];
  const urls = explicitUrls ?? (cluster ? clusterUrls : undefined);
  if (!urls) throw new UsageError("no controller: run 'chipmunk cluster up' or pass --controller URL[,URL...]");

  let token: string | undefined;
  if (opts.tokenFile) token = await readTokenFile(opts.tokenFile);
  else if (process.env.CHIPMUNK_TOKEN) token = process.env.CHIPMUNK_TOKEN;
  // The local cluster's token only for the local cluster's controller.
  else if (cluster && urls.some((url) => clusterUrls.includes(url))) token = await readTokenFile(cluster.tokenFile);
  if (!token) throw new UsageError(`no token for controller ${urls.join(',')}: pass --token-file FILE or set CHIPMUNK_TOKEN`, { urls });

  return new ControllerClient({ urls, token });
}
