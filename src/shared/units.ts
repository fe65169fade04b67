/** Parsing of the operator's shorthand: sizes (256m, 1g), durations (30s, 5m) and port specs (8080:80[/tcp]). */
import { InvalidInputError } from './errors.js';
import type { PortMapping } from './protocol.js';

const sizeUnits: Record<string, number> = { '': 1, b: 1, k: 1024, kb: 1024, m: 1024 ** 2, mb: 1024 ** 2, g: 1024 ** 3, gb: 1024 ** 3 };

/** "512m" -> bytes. Accepts b, k, m, g (binary units), optional "b"/"i" suffix, case-insensitive. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new InvalidInputError(`bad ${what} '${text}': use a number with an optional unit, e.g. 256m or 1g`, { value: text });
  const bytes = Math.round(Number(m[1]) * sizeUnits[m[2].toLowerCase()]);
  if (!Number.isFinite(bytes) || bytes <= 0) throw new InvalidInputError(`bad ${what} '${text}': must be greater than zero`, { value: text });
  return bytes;
}

const durationUnits: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** "30s" -> 30000 ms. Units ms, s, m, h; a bare number is seconds. */
export function parseDuration(text: string, what = 'duration'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/i.exec(text);
  if (!m) throw new InvalidInputError(`bad ${what} '${text}': use a number with a unit, e.g. 30s, 5m or 1h`, { value: text });
  const ms = Math.round(Number(m[1]) * durationUnits[(m[2] ?? 's').toLowerCase()]!);
  if (ms <= 0) throw new InvalidInputError(`bad ${what} '${text}': must be greater than zero`, { value: text });
  return ms;
}

export function formatDuration(ms: number): string {
  if (ms % 3_600_000 === 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}

/** Minimum memory limit: below this runc cannot even start the container's init. */
export const MIN_MEMORY_BYTES = 6 * 1024 * 1024;

/** "8080:80", "8080:80/udp" -> PortMapping. */
export function parsePortSpec(text: string): PortMapping {
  const m = /^(\d{1,5}):(\d{1,5})(?:\/(tcp|udp))?$/.exec(text.trim());
  if (!m) throw new InvalidInputError(`bad port spec '${text}': use HOSTPORT:CONTAINERPORT[/tcp|udp], e.g. 8080:80`, { value: text });
  const hostPort = Number(m[1]);
  const containerPort = Number(m[2]);
  for (const [p, which] of [[hostPort, 'host'], [containerPort, 'container']] as const) {
    if (p < 1 || p > 65535) throw new InvalidInputError(`bad port spec '${text}': ${which} port ${p} is outside 1-65535`, { value: text });
  }
  return { hostPort, containerPort, protocol: (m[3] as 'tcp' | 'udp' | undefined) ?? 'tcp' };
}

/** "K=V" -> [K, V]. */
export function parseEnvSpec(text: string): [string, string] {
  const i = text.indexOf('=');
  if (i <= 0) throw new InvalidInputError(`bad environment variable '${text}': use KEY=VALUE`, { value: text });
  const key = text.slice(0, i);
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new InvalidInputError(`bad environment variable name '${key}': letters, digits and _ only`, { value: text });
  return [key, text.slice(i + 1)];
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = -1;
  do {
    v /= 1024;
    u++;
  } while (v >= 1024 && u < units.length - 1);
  return `${v.toFixed(v >= 100 ? 0 : 1)} ${units[u]}`;
}
