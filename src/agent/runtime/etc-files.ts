/**
 * The name-resolution files every container gets, as Podman gives them: /etc/hosts (localhost
 * and the container's own name at its address), /etc/resolv.conf (the host's, minus loopback
 * name servers) and /etc/hostname.
 *
 * They are written per incarnation into the container's directory (containers/NAME/etc/, not
 * files/: they do not travel) and bind-mounted read-only over the image's. A bind mount, not a
 * file in the upper layer, because runc declares bind mounts to CRIU as external mounts and
 * maps them to the restore-time config's sources: a container restored on another node reads
 * the files that node wrote, with its new address, and nothing the container did can leave a
 * stale address in its own layer. Without them, getaddrinfo() of the container's own name (what
 * Python's http.server does before it listens) waits on DNS time-outs.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { join } from 'node:path';

export const HOST_RESOLV_CONF = '/etc/resolv.conf';

/** Container path → host file, for the bundle's read-only bind mounts. */
export type EtcMounts = Array<{ destination: string; source: string }>;

export function hostsFile(hostname: string, ip: string): string {
  return [
    '# written by chipmunk for this container; rewritten when it moves',
    '127.0.0.1\tlocalhost',
    '::1\tlocalhost ip6-localhost ip6-loopback',
    ...(ip ? [`${ip}\t${hostname}`] : []),
    '',
  ].join('\n');
}

/**
 * The host's resolv.conf without its loopback name servers: a resolver listening on the
 * host's loopback (systemd-resolved's 127.0.0.53, a local dnsmasq) cannot be reached from the
 * container's own network namespace. With none left the file says so in a comment and names no
 * server, rather than sending the container's queries to a public resolver it was never given.
 */
export function containerResolvConf(hostResolvConf: string): string {
  const kept: string[] = [];
  let servers = 0;
  let dropped = 0;
  for (const line of hostResolvConf.split('\n')) {
    const m = /^\s*nameserver\s+(\S+)/.exec(line);
    if (m) {
      if (isLoopback(m[1]!)) {
        dropped++;
        continue;
      }
      servers++;
    }
    if (line.trim()) kept.push(line);
  }
  const header = '# written by chipmunk from the host\'s resolv.conf, loopback name servers left out';
  if (servers === 0) {
    const why = dropped > 0 ? `the host names only loopback name servers (${dropped}), unreachable from a container` : 'the host names no name server';
    return `${header}\n# no name server: ${why}\n`;
  }
  return `${header}\n${kept.join('\n')}\n`;
}

function isLoopback(address: string): boolean {
  const bare = address.replace(/%.*$/, '');
  if (isIP(bare) === 4) return bare.startsWith('127.');
  if (isIP(bare) === 6) return bare === '::1' || bare === '0:0:0:0:0:0:0:1';
  return false;
}

/**
 * Writes the three files for an incarnation into `dir` and returns their mounts. A host
 * without a resolv.conf gives the container a comment-only one.
 */
export async function writeEtcFiles(dir: string, opts: { hostname: string; ip: string; resolvConfPath?: string }): Promise<EtcMounts> {
  await mkdir(dir, { recursive: true });
  const hostResolv = await readFile(opts.resolvConfPath ?? HOST_RESOLV_CONF, 'utf8').catch(() => '');
  const files: Array<[string, string]> = [
    ['hosts', hostsFile(opts.hostname, opts.ip)],
    ['resolv.conf', containerResolvConf(hostResolv)],
    ['hostname', `${opts.hostname}\n`],
  ];
  for (const [name, content] of files) await writeFile(join(dir, name), content);
  return files.map(([name]) => ({ destination: `/etc/${name}`, source: join(dir, name) }));
}
