/**
 * Images of the compatibility suite (docs/compatibility.md): Debian's own Redis, PostgreSQL,
 * nginx and memcached binaries with the libraries `ldd` lists and the data and configuration
 * they need, plus a static busybox for a shell and `ps` (tests look inside). scripts/setup.sh
 * installs the packages they are copied from.
 */
import { existsSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { CapabilityMissingError } from '../shared/errors.js';
import { BUSYBOX_APPLETS, NSSWITCH, checkBusybox, sharedLibraries, type ImageRecipe } from './images.js';

export type CompatImageName = 'chipmunk/redis' | 'chipmunk/postgres' | 'chipmunk/nginx' | 'chipmunk/memcached';
/** The container port each program listens on (its usual one). */
export const COMPAT_PORTS: Record<CompatImageName, number> = {
  'chipmunk/redis': 6379,
  'chipmunk/postgres': 5432,
  'chipmunk/nginx': 80,
  'chipmunk/memcached': 11211,
};

const PG_BIN = '/usr/lib/postgresql/15/bin';
const PG_LIB = '/usr/lib/postgresql/15/lib';
const PG_SHARE = '/usr/share/postgresql/15';
const PG_DATA = '/var/lib/postgresql/data';
/** Loadable modules initdb and a plain server use (PL/pgSQL, text search, encoding conversions). */
const PG_MODULES = /^(plpgsql|dict_snowball|libpqwalreceiver|pgoutput|.*_and_.*)\.so$/;
const NGINX_WORKERS = 2;
/** A file nginx serves; tests compare what they get with this. */
export const NGINX_FILE = { path: '/file.txt', content: Array.from({ length: 2000 }, (_, i) => `line ${i} of a file served by nginx\n`).join('') };

/**
 * First start: initdb into the container's writable layer (it moves with the container), then
 * the server as user postgres (PostgreSQL refuses to run as root). `exec`: the postmaster is the
 * container's first process.
 */
const PG_START = `#!/bin/sh
set -e
D=${PG_DATA}
as_postgres() { /usr/bin/setpriv --reuid=postgres --regid=postgres --clear-groups "$@"; }
if [ ! -s "$D/PG_VERSION" ]; then
  mkdir -p "$D"; chown postgres:postgres "$D"; chmod 700 "$D"
  as_postgres ${PG_BIN}/initdb -D "$D" -U postgres --auth=trust --locale=C --encoding=UTF8 --no-sync >/dev/null
  echo 'host all all 0.0.0.0/0 trust' >>"$D/pg_hba.conf"
fi
exec /usr/bin/setpriv --reuid=postgres --regid=postgres --clear-groups ${PG_BIN}/postgres -D "$D" \\
  -c listen_addresses='*' -c unix_socket_directories=/tmp -c max_connections=20 -c shared_buffers=16MB -c jit=off
`;

/**
 * nginx: a master and NGINX_WORKERS workers, serving /srv/www, with WebDAV PUT under /dav/ so
 * clients can write (files in the writable layer). The workers' user comes with the command
 * (`-g 'daemon off; user root;'`), so a test can run them as www-data too.
 */
const NGINX_CONF = `worker_processes ${NGINX_WORKERS};
error_log stderr;
pid /run/nginx.pid;
events { worker_connections 256; }
http {
  include /etc/nginx/mime.types;
  access_log off;
  server {
    listen 80;
    root /srv/www;
    location /dav/ {
      dav_methods PUT DELETE;
      create_full_put_path on;
      client_body_temp_path /var/lib/nginx/body;
    }
  }
}
`;

const COMPAT_PASSWD = 'postgres:x:101:101:PostgreSQL:/var/lib/postgresql:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/false\n';
const COMPAT_GROUP = 'postgres:x:101:\nwww-data:x:33:\n';
/** Applets the compat images need beyond the common ones (the PostgreSQL start script). */
const EXTRA_APPLETS = ['chown'];

export async function compatRecipe(name: CompatImageName, base: Pick<ImageRecipe, 'files' | 'dirs'>): Promise<ImageRecipe> {
  await checkBusybox([...BUSYBOX_APPLETS, ...EXTRA_APPLETS]);
  const program = programPart(name);
  for (const path of program.binaries) {
    if (!existsSync(path)) throw new CapabilityMissingError(`${path} is missing: install Debian's ${program.packageName} (scripts/setup.sh does)`, { path });
  }
  const modules = name === 'chipmunk/postgres' ? (await readdir(PG_LIB)).filter((f) => PG_MODULES.test(f)).map((f) => join(PG_LIB, f)) : [];
  const libraries = new Set<string>();
  for (const binary of [...program.binaries, ...modules]) for (const lib of await sharedLibraries(binary)) libraries.add(lib);
  const withUsers = base.files.map((f) =>
    f.path === '/etc/passwd' ? { ...f, content: f.content + COMPAT_PASSWD } : f.path === '/etc/group' ? { ...f, content: f.content + COMPAT_GROUP } : f,
  );
  return {
    copies: [
      { from: '/bin/busybox', to: '/bin/busybox' },
      ...program.binaries.map((path) => ({ from: path, to: path })),
      ...modules.map((path) => ({ from: path, to: path })),
      ...[...libraries].map((path) => ({ from: path, to: path })),
      ...(program.data ?? []),
    ],
    trees: program.trees ?? [],
    symlinks: [...BUSYBOX_APPLETS, ...EXTRA_APPLETS].map((applet) => ({ path: `/bin/${applet}`, target: 'busybox' })),
    files: [...withUsers, { path: '/etc/nsswitch.conf', content: NSSWITCH }, ...(program.files ?? [])],
    dirs: [...base.dirs, ...(program.dirs ?? [])],
    cmd: program.cmd,
    env: { PATH: '/usr/sbin:/usr/bin:/bin', ...program.env },
  };
}

interface ProgramPart {
  packageName: string;
  /** Host binaries (their libraries come along). */
  binaries: string[];
  data?: ImageRecipe['copies'];
  trees?: ImageRecipe['trees'];
  files?: ImageRecipe['files'];
  dirs?: ImageRecipe['dirs'];
  cmd: string[];
  env?: Record<string, string>;
}

function programPart(name: CompatImageName): ProgramPart {
  switch (name) {
    case 'chipmunk/redis':
      return {
        packageName: 'redis-server',
        // A symlink to redis-check-rdb on Debian: the copy is the binary, which picks its role by name.
        binaries: ['/usr/bin/redis-server'],
        dirs: [{ path: '/data', mode: 0o755 }],
        // The append-only file makes every write touch the writable layer too: memory and files must agree after a move.
        cmd: ['/usr/bin/redis-server', '--bind', '0.0.0.0', '--port', '6379', '--protected-mode', 'no', '--dir', '/data', '--appendonly', 'yes', '--save', ''],
      };
    case 'chipmunk/memcached':
      return {
        packageName: 'memcached',
        binaries: ['/usr/bin/memcached'],
        // memcached refuses to run as root unless told which user to be.
        cmd: ['/usr/bin/memcached', '-u', 'root', '-p', '11211', '-U', '0', '-m', '64', '-t', '2'],
      };
    case 'chipmunk/nginx':
      return {
        packageName: 'nginx',
        binaries: ['/usr/sbin/nginx'],
        data: [{ from: '/etc/nginx/mime.types', to: '/etc/nginx/mime.types' }],
        files: [
          { path: '/etc/nginx/nginx.conf', content: NGINX_CONF },
          { path: `/srv/www${NGINX_FILE.path}`, content: NGINX_FILE.content },
        ],
        dirs: [
          { path: '/var/lib/nginx/body', mode: 0o777 },
          { path: '/srv/www/dav', mode: 0o777 },
          { path: '/run', mode: 0o755 },
          { path: '/var/log/nginx', mode: 0o755 },
        ],
        cmd: ['/usr/sbin/nginx', '-g', 'daemon off; user root;'],
      };
    case 'chipmunk/postgres':
      return {
        packageName: 'postgresql',
        binaries: [`${PG_BIN}/postgres`, `${PG_BIN}/initdb`, '/usr/bin/setpriv'],
        data: [
          { from: '/usr/share/zoneinfo/Etc/UTC', to: '/usr/share/zoneinfo/Etc/UTC' },
          { from: '/usr/share/zoneinfo/Etc/UTC', to: '/usr/share/zoneinfo/UTC' },
        ],
        trees: [{ from: PG_SHARE, to: PG_SHARE }],
        files: [{ path: '/usr/local/bin/pg-start', content: PG_START }],
        dirs: [
          { path: '/var/lib/postgresql', mode: 0o755 },
          { path: '/run/postgresql', mode: 0o1777 },
        ],
        cmd: ['/bin/sh', '/usr/local/bin/pg-start'],
        env: { TZ: 'UTC', PGDATA: PG_DATA },
      };
  }
}
