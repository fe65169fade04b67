/**
 * Option and argument parsers for commander. Each turns the operator's text into the value the
 * API takes, or fails with a UsageError (exit 2) before anything is sent anywhere.
 */
import type { Command } from 'commander';

import { InvalidInputError } from '../shared/errors.js';
import { ContainerName, NodeName, VolumeMount, type PortMapping } from '../shared/protocol.js';
import { MIN_MEMORY_BYTES, formatBytes, parseDuration, parseEnvSpec, parsePortSpec, parseSize } from '../shared/units.js';
import { UsageError } from './output.js';

/** Re-throws the shared parsers' InvalidInputError as a UsageError, keeping message and details. */
function asUsage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (err) {
    if (err instanceof InvalidInputError) throw new UsageError(err.message, err.details);
    throw err;
  }
}

/**
 * Checks VALUE against a protocol name schema, the same pattern the controller validates with,
 * so a bad name fails here rather than after a round trip.
 */
function parseName(schema: { pattern?: string; description?: string }, what: string, value: string): string {
  if (new RegExp(schema.pattern!).test(value)) return value;
  // The schema describes itself as "container name: lowercase letters, ...": keep the rule only.
  const rule = (schema.description ?? '').replace(/^[^:]*:\s*/, '');
  throw new UsageError(`bad ${what} '${value}': ${rule}`, { value });
}

export function parseContainerName(value: string): string {
  return parseName(ContainerName, 'container name', value);
}

export function parseNodeName(value: string): string {
  return parseName(NodeName, 'node name', value);
}

/** Repeatable -p: collects every mapping given. */
export function collectPort(value: string, previous: PortMapping[] = []): PortMapping[] {
  return [...previous, asUsage(() => parsePortSpec(value))];
}

/** Repeatable -v NAME:/path: collects named volumes, checked against the protocol's rules. */
export function collectVolume(value: string, previous: VolumeMount[] = []): VolumeMount[] {
  const i = value.indexOf(':');
  const volume = { name: value.slice(0, i), path: value.slice(i + 1) };
  if (i <= 0 || !new RegExp(VolumeMount.properties.name.pattern!).test(volume.name) || !new RegExp(VolumeMount.properties.path.pattern!).test(volume.path)) {
    throw new UsageError(`bad volume '${value}': use NAME:/path (name: lowercase letters, digits, _ . -; path: absolute, not /, no . or .. parts)`, { value });
  }
  return [...previous, volume];
}

/** Repeatable -e: collects KEY=VALUE pairs; a later KEY wins. */
export function collectEnv(value: string, previous: Record<string, string> = {}): Record<string, string> {
  const [key, val] = asUsage(() => parseEnvSpec(value));
  return { ...previous, [key]: val };
}

export function parseMemory(value: string): number {
  const bytes = asUsage(() => parseSize(value, 'memory size'));
  if (bytes < MIN_MEMORY_BYTES) {
    throw new UsageError(`bad memory size '${value}': at least ${formatBytes(MIN_MEMORY_BYTES)}, or the container cannot start`, { value });
  }
  return bytes;
}

/** Checkpoint intervals: at least a second (a checkpoint freezes the container briefly). */
export function parseCheckpointInterval(value: string): number {
  const ms = asUsage(() => parseDuration(value, 'checkpoint interval'));
  if (ms < 1000) throw new UsageError(`bad checkpoint interval '${value}': at least 1s`, { value });
  return ms;
}

/** Node leases: short enough to fail over fast, long enough for a few heartbeats (a quarter of it each). */
export function parseNodeLease(value: string): number {
  const ms = asUsage(() => parseDuration(value, 'node lease'));
  if (ms < 400) throw new UsageError(`bad node lease '${value}': at least 400ms (agents heartbeat every quarter of it)`, { value });
  return ms;
}

/** etcd leases are whole seconds. */
export function parseLeaderLease(value: string): number {
  const ms = asUsage(() => parseDuration(value, 'leader lease'));
  if (ms < 1000 || ms % 1000 !== 0) throw new UsageError(`bad leader lease '${value}': whole seconds, at least 1s (etcd's leases are whole seconds)`, { value });
  return ms;
}

export interface ListenAddress {
  host: string;
  port: number;
}

/** "HOST:PORT" (the port after the last colon). */
export function parseListen(value: string): ListenAddress {
  const m = /^(.+):(\d{1,5})$/.exec(value);
  const port = m ? Number(m[2]) : 0;
  if (!m || port < 1 || port > 65535) throw new UsageError(`bad listen address '${value}': use HOST:PORT, e.g. 127.0.0.1:7400`, { value });
  return { host: m[1]!, port };
}

export function parseIPv4Cidr(value: string): string {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(value);
  if (!m || m.slice(1, 5).some((octet) => Number(octet) > 255) || Number(m[5]) > 32) {
    throw new UsageError(`bad subnet '${value}': use an IPv4 CIDR, e.g. 198.19.1.0/24`, { value });
  }
  return value;
}

export function parseUrl(value: string): string {
  try {
    const url = new URL(value);
    if (url.protocol === 'http:' || url.protocol === 'https:') return value;
  } catch {
    // described below
  }
  throw new UsageError(`bad URL '${value}': use http://HOST:PORT`, { value });
}

/** `URL1,URL2,...`: the controllers of one cluster, any of which may answer. */
export function parseUrlList(value: string): string[] {
  const urls = value.split(',').map((url) => url.trim());
  if (urls.some((url) => url === '')) throw new UsageError(`bad URL list '${value}': use http://HOST:PORT[,http://HOST:PORT...]`, { value });
  return urls.map(parseUrl);
}

export function parsePositiveInt(value: string): number {
  if (!/^\d+$/.test(value) || Number(value) < 1) throw new UsageError(`bad number '${value}': use a whole number of at least 1`, { value });
  return Number(value);
}

export function parsePort(value: string): number {
  if (!/^\d{1,5}$/.test(value) || Number(value) < 1 || Number(value) > 65535) throw new UsageError(`bad port '${value}': use a number from 1 to 65535`, { value });
  return Number(value);
}

export function parseRouteProtocol(value: string): 'http' | 'tcp' {
  if (value !== 'http' && value !== 'tcp') throw new UsageError(`bad protocol '${value}': use http or tcp`, { value });
  return value;
}

export function addJsonOption(cmd: Command): Command {
  return cmd.option('--json', 'machine-readable output on stdout (and nothing else there)');
}

/**
 * --controller and --token-file, accepted after the subcommand too: with positional options
 * (which `run IMAGE CMD...` needs), the program-level ones must come before it.
 */
export function addConnectionOptions(cmd: Command): Command {
  return cmd
    .option('--controller <urls>', 'controller URL, or several comma-separated (default: $CHIPMUNK_CONTROLLER, else the local cluster)', parseUrlList)
    .option('--token-file <file>', 'file holding the cluster token (default: $CHIPMUNK_TOKEN, else the local cluster)');
}

/** `chipmunk agent --writable-layer`: what new containers' writable layers are (src/agent/runtime/rootfs.ts). */
export function parseWritableLayer(value: string): 'directory' | 'image' {
  if (value === 'directory' || value === 'image') return value;
  throw new UsageError(
    `bad writable layer '${value}': use 'directory' (files copied one by one) or 'image' (an ext4 image that keeps inode numbers across moves, e.g. for SQLite)`,
    { value },
  );
}

/** `chipmunk agent --userns`: whether new containers get a user namespace of their own (src/agent/runtime/bundle.ts). */
export function parseUserns(value: string): 'on' | 'off' {
  if (value === 'on' || value === 'off') return value;
  throw new UsageError(
    `bad --userns '${value}': use 'on' (new containers get a user namespace of their own, the default) or 'off' (they share the host's; without CAP_SYS_RESOURCE their non-root processes cannot be checkpointed or migrated)`,
    { value },
  );
}
