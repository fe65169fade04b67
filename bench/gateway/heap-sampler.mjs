/**
 * Loaded into the gateway with `node --import` by bench/gateway/cost.ts (--sites): V8's sampling
 * heap profiler, counting objects a scavenge or a full GC freed as well (the default counts only
 * survivors, which hides what a request allocates and drops). SIGUSR2 starts it; the next
 * SIGUSR2 stops it and writes the profile to $CHIPMUNK_BENCH_HEAP_PROFILE.
 */
import { Session } from 'node:inspector/promises';
import { renameSync, writeFileSync } from 'node:fs';

const session = new Session();
session.connect();
let sampling = false;
process.on('SIGUSR2', async () => {
  if (!sampling) {
    sampling = true;
    await session.post('HeapProfiler.startSampling', { samplingInterval: 1024, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true });
    return;
  }
  sampling = false;
  const { profile } = await session.post('HeapProfiler.stopSampling');
  const path = process.env.CHIPMUNK_BENCH_HEAP_PROFILE;
  // Only the call tree: the list of samples is large, and whoever reads the file waits for it whole (the rename).
  writeFileSync(`${path}.part`, JSON.stringify({ head: profile.head }));
  renameSync(`${path}.part`, path);
});
