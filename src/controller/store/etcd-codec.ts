/** How the store's keys, values and lease ids map onto etcd's: keys under the namespace, as bytes. */
import { CompareResult, CompareTarget, type IKeyValue } from 'etcd3';
import { InvalidInputError } from '../../shared/errors.js';
import type { KeyValue } from './types.js';

export class EtcdKeyspace {
  /** @param namespace prefix of every key this store writes ("" for none). */
  constructor(private readonly namespace: string) {}

  /** A transaction's guard: the key's mod revision is still `modRevision`. */
  modCompare(key: string, modRevision: number) {
    return { key: this.encode(key), target: CompareTarget.Mod, result: CompareResult.Equal, mod_revision: modRevision };
  }

  encode(key: string): Buffer {
    return Buffer.from(this.namespace + key);
  }

  /** etcd's range for every key starting with the prefix: up to the prefix with its last byte raised. */
  prefixRange(prefix: string): { key: Buffer; range_end: Buffer } {
    const key = this.encode(prefix);
    const end = Buffer.from(key);
    for (let i = end.length - 1; i >= 0; i--) {
      if (end[i] < 0xff) {
        end[i]++;
        return { key, range_end: end.subarray(0, i + 1) };
      }
    }
    // An empty prefix (or all 0xff bytes): from the key to the end of the keyspace, in etcd's spelling.
    return { key: key.length > 0 ? key : Buffer.from([0]), range_end: Buffer.from([0]) };
  }

  toKeyValue<T>(kv: IKeyValue): KeyValue<T> {
    const key = kv.key.toString().slice(this.namespace.length);
    return {
      key,
      value: JSON.parse(kv.value.toString()) as T,
      createRevision: Number(kv.create_revision),
      modRevision: Number(kv.mod_revision),
      version: Number(kv.version),
      ...(kv.lease !== '0' ? { lease: kv.lease } : {}),
    };
  }
}

export /** etcd names leases by 64-bit numbers, which the store hands out as decimal strings; 0 is "no lease". */
function leaseNumber(lease: string | undefined): string {
  if (lease === undefined) return '0';
  if (!/^[1-9]\d{0,19}$/.test(lease)) throw new InvalidInputError(`lease "${lease}" is not an etcd lease id (a decimal number this store granted)`);
  return lease;
}
