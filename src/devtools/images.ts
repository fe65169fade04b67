/**
 * Local test and demo images, built from this host's own binaries: no registry is reachable
 * from the machines chipmunk is developed on. Each image carries a label with a hash of
 * everything it is made of (host binaries, the app source, the recipe), so `ensureImage`
 * rebuilds exactly when one of those changed and otherwise reuses what the store has.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, readFile, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CapabilityMissingError, RuntimeFailedError } from '../shared/errors.js';
import { removeTree } from '../shared/remove-tree.js';
import { compatRecipe, type CompatImageName } from './compat-images.js';

/** The compat images (compat-images.ts) are built on demand, not with the test images. */
export type TestImageName = 'chipmunk/statefulapp' | 'chipmunk/busybox' | 'chipmunk/python' | CompatImageName;
export type EnsureImageStatus = 'built' | 'reused';

export const TEST_IMAGE_NAMES: readonly TestImageName[] = ['chipmunk/busybox', 'chipmunk/statefulapp', 'chipmunk/python'];

export const STATEFULAPP_SOURCE = fileURLToPath(new URL('./statefulapp/server.js', import.meta.url));
/** The python image's SQLite writer (`/app/sqlite-writer.py MODE`). */
export const SQLITE_WRITER_SOURCE = fileURLToPath(new URL('./python/sqlite-writer.py', import.meta.url));

const CONTENT_HASH_LABEL = 'chipmunk.content-hash';
const HOST_BUSYBOX = '/bin/busybox';
const HOST_NODE = '/usr/bin/node';
/** Debian's python3 and sqlite3 (scripts/setup.sh installs them). */
const HOST_PYTHON = '/usr/bin/python3.11';
const HOST_PYTHON_LIB = '/usr/lib/python3.11';
const HOST_SQLITE3 = '/usr/bin/sqlite3';
/** What a Debian image has: names resolve from /etc/hosts first, then DNS. */
export const NSSWITCH = 'passwd: files\ngroup: files\nhosts: files dns\n';
export const BUSYBOX_APPLETS = [
  'sh', 'ls', 'cat', 'echo', 'sleep', 'nc', 'wget', 'httpd', 'ps', 'kill', 'mkdir', 'rm', 'cp', 'mv',
  'ln', 'touch', 'chmod', 'grep', 'sed', 'awk', 'head', 'tail', 'wc', 'sort', 'tee', 'env', 'date',
  'hostname', 'id', 'uname', 'printf', 'test', 'true', 'false', 'seq', 'dd', 'find', 'xargs', 'df',
  'du', 'pwd', 'ip', 'ifconfig', 'ping', 'netstat', 'nslookup', 'top', 'vi',
];

const PASSWD = 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n';
const GROUP = 'root:x:0:\nnogroup:x:65534:\n';

/** What goes into an image; its hash (with the files' contents) names the build. */
export interface ImageRecipe {
  /** Host file → path in the image; copied with symlinks resolved. */
  copies: Array<{ from: string; to: string }>;
  /** Host directory → path in the image; copied as is (`cp -a`), hashed by names, sizes and times. */
  trees: Array<{ from: string; to: string }>;
  /** Path in the image → link target. */
  symlinks: Array<{ path: string; target: string }>;
  /** Path in the image → file contents. */
  files: Array<{ path: string; content: string }>;
  /** Directories that must exist even when empty, with their modes. */
  dirs: Array<{ path: string; mode: number }>;
  cmd: string[];
  env: Record<string, string>;
}

/** Makes sure the image is in the default Podman store and matches the current sources. */
export async function ensureImage(name: TestImageName): Promise<EnsureImageStatus> {
  const recipe = await recipeFor(name);
  const contentHash = await hashRecipe(recipe);
  const existingId = await imageId(name);
  if (existingId !== undefined && (await imageContentHash(name)) === contentHash) return 'reused';
  await buildImage(name, recipe, contentHash);
  if (existingId !== undefined && existingId !== (await imageId(name))) await removeReplacedImage(existingId);
  return 'built';
}

export async function ensureTestImages(): Promise<Array<{ name: TestImageName; status: EnsureImageStatus }>> {
  const results = [];
  for (const name of TEST_IMAGE_NAMES) results.push({ name, status: await ensureImage(name) });
  return results;
}

async function recipeFor(name: TestImageName): Promise<ImageRecipe> {
  const base = {
    files: [
      { path: '/etc/passwd', content: PASSWD },
      { path: '/etc/group', content: GROUP },
    ],
    dirs: [
      { path: '/tmp', mode: 0o1777 },
      { path: '/root', mode: 0o700 },
    ],
  };
  switch (name) {
    case 'chipmunk/busybox':
      await checkBusybox();
      return {
        copies: [{ from: HOST_BUSYBOX, to: '/bin/busybox' }],
        trees: [],
        symlinks: BUSYBOX_APPLETS.map((applet) => ({ path: `/bin/${applet}`, target: 'busybox' })),
        files: base.files,
        dirs: base.dirs,
        cmd: ['/bin/sh'],
        env: { PATH: '/bin' },
      };
    case 'chipmunk/statefulapp':
      return {
        copies: [
          { from: HOST_NODE, to: '/usr/bin/node' },
          ...(await sharedLibraries(HOST_NODE)).map((path) => ({ from: path, to: path })),
          { from: STATEFULAPP_SOURCE, to: '/app/server.js' },
        ],
        trees: [],
        symlinks: [],
        files: [
          ...base.files,
          // server.js is an ES module; without this node would read it as CommonJS.
          { path: '/app/package.json', content: '{"type":"module"}\n' },
        ],
        dirs: [...base.dirs, { path: '/data', mode: 0o755 }],
        cmd: ['/usr/bin/node', '/app/server.js'],
        env: { PATH: '/usr/bin:/bin', PORT: '8080', MEMORY_MB: '0', DATA_DIR: '/data' },
      };
    case 'chipmunk/python':
      return pythonRecipe(base);
    default:
      return compatRecipe(name, base);
  }
}

/**
 * Debian's python3 (with its standard library) and sqlite3, a busybox shell, and the SQLite
 * writer: real programs of the kind users bring (http.server, an SQLite database).
 */
async function pythonRecipe(base: Pick<ImageRecipe, 'files' | 'dirs'>): Promise<ImageRecipe> {
  await checkBusybox();
  for (const path of [HOST_PYTHON, HOST_PYTHON_LIB, HOST_SQLITE3]) {
    if (!existsSync(path)) throw new CapabilityMissingError(`${path} is missing: install Debian's python3 and sqlite3 (scripts/setup.sh does)`, { path });
  }
  const sqliteModule = join(HOST_PYTHON_LIB, 'lib-dynload', '_sqlite3.cpython-311-x86_64-linux-gnu.so');
  const libraries = new Set<string>();
  for (const binary of [HOST_PYTHON, HOST_SQLITE3, sqliteModule]) for (const lib of await sharedLibraries(binary)) libraries.add(lib);
  return {
    copies: [
      { from: HOST_BUSYBOX, to: '/bin/busybox' },
      { from: HOST_PYTHON, to: '/usr/bin/python3' },
      { from: HOST_SQLITE3, to: '/usr/bin/sqlite3' },
      ...[...libraries].map((path) => ({ from: path, to: path })),
      { from: SQLITE_WRITER_SOURCE, to: '/app/sqlite-writer.py' },
    ],
    trees: [{ from: HOST_PYTHON_LIB, to: HOST_PYTHON_LIB }],
    symlinks: BUSYBOX_APPLETS.map((applet) => ({ path: `/bin/${applet}`, target: 'busybox' })),
    files: [...base.files, { path: '/etc/nsswitch.conf', content: NSSWITCH }],
    dirs: [...base.dirs, { path: '/data', mode: 0o755 }],
    cmd: ['/usr/bin/python3', '-m', 'http.server', '8080'],
    env: { PATH: '/usr/bin:/bin', PYTHONDONTWRITEBYTECODE: '1' },
  };
}

/** The image runs nothing but this one binary, so it must not need any library. */
export async function checkBusybox(applets: readonly string[] = BUSYBOX_APPLETS): Promise<void> {
  const ldd = await run('ldd', [HOST_BUSYBOX]);
  if (ldd.code === 0) {
    throw new CapabilityMissingError(`${HOST_BUSYBOX} is not statically linked: install Debian's busybox-static (scripts/setup.sh does)`, {
      ldd: ldd.stdout,
    });
  }
  const listed = new Set((await mustRun('busybox --list', HOST_BUSYBOX, ['--list'])).split('\n'));
  const missing = applets.filter((applet) => !listed.has(applet));
  if (missing.length > 0) {
    throw new CapabilityMissingError(`${HOST_BUSYBOX} lacks applets the busybox image links: ${missing.join(', ')}`, { missing });
  }
}

/** Every library `ldd` resolves for the binary, the dynamic loader included, as absolute paths. */
export async function sharedLibraries(binary: string): Promise<string[]> {
  const output = await mustRun('ldd', 'ldd', [binary]);
  const notFound = output.split('\n').filter((line) => line.includes('not found'));
  if (notFound.length > 0) {
    throw new CapabilityMissingError(`${binary} needs libraries this host lacks`, { missing: notFound.map((l) => l.trim()) });
  }
  // Lines look like "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or, for the
  // loader, "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no path and is skipped.
  return [...output.matchAll(/(\/\S+) \(0x[0-9a-f]+\)/g)].map((match) => match[1]!);
}

async function hashRecipe(recipe: ImageRecipe): Promise<string> {
  const hash = createHash('sha256');
  hash.update(JSON.stringify({ ...recipe, copies: undefined }));
  for (const { from, to } of recipe.copies) {
    hash.update(`\0${to}\0`);
    hash.update(await readFile(from));
  }
  for (const { from } of recipe.trees) {
    // Reading every file of a standard library at each check is slow; a package upgrade
    // changes sizes or times, which is what a rebuild has to follow.
    hash.update(await mustRun('find tree', 'find', [from, '-printf', '%P %s %T@ %l\\n']));
  }
  return hash.digest('hex');
}

async function buildImage(name: TestImageName, recipe: ImageRecipe, contentHash: string): Promise<void> {
  const workDir = await mkdtemp(join(tmpdir(), 'chipmunk-image-'));
  try {
    const rootfs = join(workDir, 'rootfs');
    await writeRootfs(rootfs, recipe);
    const tarball = join(workDir, 'rootfs.tar');
    await mustRun('tar rootfs', 'tar', ['--numeric-owner', '-C', rootfs, '-cf', tarball, '.']);
    const changes = [
      `CMD ${JSON.stringify(recipe.cmd)}`,
      ...Object.entries(recipe.env).map(([key, value]) => `ENV ${key}=${value}`),
      `LABEL ${CONTENT_HASH_LABEL}=${contentHash}`,
    ];
    await mustRun('podman import', 'podman', ['import', ...changes.flatMap((change) => ['--change', change]), tarball, name]);
  } finally {
    await removeTree(workDir);
  }
}

async function writeRootfs(rootfs: string, recipe: ImageRecipe): Promise<void> {
  const inRootfs = (path: string) => join(rootfs, path);
  for (const { path, mode } of recipe.dirs) {
    await mkdir(inRootfs(path), { recursive: true });
    // chmod, not mkdir's mode: the umask would clear the sticky and group/other bits.
    await chmod(inRootfs(path), mode);
  }
  for (const { from, to } of recipe.copies) {
    await mkdir(dirname(inRootfs(to)), { recursive: true });
    await copyFile(from, inRootfs(to));
  }
  for (const { from, to } of recipe.trees) {
    await mkdir(dirname(inRootfs(to)), { recursive: true });
    await mustRun('copy tree', 'cp', ['-a', '--', from, inRootfs(to)]);
  }
  for (const { path, target } of recipe.symlinks) {
    await mkdir(dirname(inRootfs(path)), { recursive: true });
    await symlink(target, inRootfs(path));
  }
  for (const { path, content } of recipe.files) {
    await mkdir(dirname(inRootfs(path)), { recursive: true });
    await writeFile(inRootfs(path), content);
  }
}

async function imageId(name: string): Promise<string | undefined> {
  const exists = await run('podman', ['image', 'exists', name]);
  if (exists.code === 1) return undefined;
  if (exists.code !== 0) throw new RuntimeFailedError(`podman image exists ${name} failed`, { op: 'podman image exists', stderr: exists.stderr });
  return (await mustRun('podman image inspect', 'podman', ['image', 'inspect', '--format', '{{.Id}}', name])).trim();
}

async function imageContentHash(name: string): Promise<string> {
  const format = `{{index .Labels "${CONTENT_HASH_LABEL}"}}`;
  return (await mustRun('podman image inspect', 'podman', ['image', 'inspect', '--format', format, name])).trim();
}

/**
 * The rebuilt image took the name; the old one would linger untagged. Podman refuses to
 * remove it while a container still uses it, and then it stays until that container goes.
 */
async function removeReplacedImage(id: string): Promise<void> {
  await run('podman', ['image', 'rm', id]);
}

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(command: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Runs a command that must succeed; returns its stdout. */
async function mustRun(op: string, command: string, args: string[]): Promise<string> {
  const result = await run(command, args).catch((err: unknown) => {
    throw new RuntimeFailedError(`${op}: cannot run ${command}`, { op }, err);
  });
  if (result.code !== 0) {
    throw new RuntimeFailedError(`${op} failed (exit ${result.code}): ${result.stderr.trim()}`, { op, stderr: result.stderr, args });
  }
  return result.stdout;
}
