/** The `--store etcd://...` spec: which etcd members, and the namespace of chipmunk's keys in them. */
import { InvalidInputError } from '../../shared/errors.js';

export interface EtcdSpec {
  /** host:port of each member. */
  endpoints: string[];
  namespace: string;
}

const SPEC_FORM = '"etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]", e.g. etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379';

/** Parses `etcd://h1:2379,h2:2379[/namespace]`, naming what is wrong with a bad one. */
export function parseEtcdSpec(spec: string): EtcdSpec {
  const bad = (why: string) => new InvalidInputError(`bad etcd store "${spec}": ${why}; use ${SPEC_FORM}`, { spec });
  if (!spec.startsWith('etcd://')) throw bad('it must start with etcd://');
  const rest = spec.slice('etcd://'.length);
  const slash = rest.indexOf('/');
  const hosts = slash === -1 ? rest : rest.slice(0, slash);
  const namespace = slash === -1 ? '' : rest.slice(slash).replace(/\/+$/, '');
  if (hosts === '') throw bad('it names no etcd member');
  if (/[\s?#@]/.test(namespace)) throw bad(`namespace "${namespace}" has a space, ?, # or @`);
  const endpoints = hosts.split(',').map((endpoint) => {
    const match = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(endpoint);
    if (!match) throw bad(`member "${endpoint}" is not HOST:PORT`);
    const port = Number(match[2]);
    if (port < 1 || port > 65535) throw bad(`member "${endpoint}" has port ${port}, outside 1-65535`);
    return endpoint;
  });
  return { endpoints, namespace };
}
