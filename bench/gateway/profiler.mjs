/**
 * Loaded into the gateway with `node --import` by bench/gateway/cost.ts (--sites, --cpu-sites):
 * V8's sampling heap profiler (counting objects a scavenge or a full GC freed as well: the
 * default counts only survivors, which hides what a request allocates and drops), or its CPU
 * profiler, as $CHIPMUNK_BENCH_PROFILE_KIND says (heap, cpu). SIGUSR2 starts it; the next
 * SIGUSR2 stops it and writes the profile's call tree to $CHIPMUNK_BENCH_PROFILE.
 */
import { Session } from 'node:inspector/promises';
import { renameSync, writeFileSync } from 'node:fs';

const session = new Session();
session.connect();
const cpu = process.env.CHIPMUNK_BENCH_PROFILE_KIND === 'cpu';
let profiling = false;
process.on('SIGUSR2', async () => {
  if (!profiling) {
    profiling = true;
    if (cpu) {
      await session.post('Profiler.enable');
      await session.post('Profiler.setSamplingInterval', { interval: 100 });
      await session.post('Profiler.start');
    } else {
      await session.post('HeapProfiler.startSampling', { samplingInterval: 1024, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true });
    }
    return;
  }
  profiling = false;
  const path = process.env.CHIPMUNK_BENCH_PROFILE;
  // Whoever reads the file waits for it whole (the rename).
  if (cpu) {
    const { profile } = await session.post('Profiler.stop');
    writeFileSync(`${path}.part`, JSON.stringify({ nodes: profile.nodes, samples: profile.samples, timeDeltas: profile.timeDeltas }));
  } else {
    const { profile } = await session.post('HeapProfiler.stopSampling');
    // Only the call tree: the list of samples is large.
    writeFileSync(`${path}.part`, JSON.stringify({ head: profile.head }));
  }
  renameSync(`${path}.part`, path);
});
