/**
 * The --cluster part of bench/gateway (needs the local cluster): with two clients sending POST
 * /increment through the cluster's gateway, a container migrates (lazy) and back (copy); request
 * latency p99 and max during that, and failures.
 */
import { Agent, request } from 'undici';
import { ensureTestImages } from '../../src/devtools/images.js';
import { runChipmunk } from '../../src/devtools/run-chipmunk.js';

const GATEWAY_PORT = 28080;

export async function latencyDuringMigrations(): Promise<string> {
  await ensureTestImages();
  await runChipmunk(['cluster', 'down']).catch(() => undefined);
  await runChipmunk(['cluster', 'up', '--nodes', '2']);
  try {
    await runChipmunk(['run', '--name', 'bench', '--node', 'node1', '-p', '8080:8080', '-e', 'MEMORY_MB=32', 'chipmunk/statefulapp']);
    await runChipmunk(['expose', 'bench', '--port', '8080', '--listen', String(GATEWAY_PORT)]);
    await new Promise((r) => setTimeout(r, 1_000));
    process.stderr.write('latency during two migrations... ');
    const agent = new Agent({ keepAliveTimeout: 10_000 });
    const latencies: number[] = [];
    let failed = 0;
    let stop = false;
    const loops = [0, 1].map(async () => {
      while (!stop) {
        const t = performance.now();
        try {
          const res = await request(`http://127.0.0.1:${GATEWAY_PORT}/increment`, { method: 'POST', dispatcher: agent, headersTimeout: 60_000 });
          await res.body.dump();
          if (res.statusCode !== 200) failed++;
        } catch {
          failed++;
        }
        latencies.push(performance.now() - t);
      }
    });
    await new Promise((r) => setTimeout(r, 500));
    await runChipmunk(['migrate', 'bench', '--to', 'node2', '--mode', 'lazy']);
    await new Promise((r) => setTimeout(r, 500));
    await runChipmunk(['migrate', 'bench', '--to', 'node1', '--mode', 'copy']);
    await new Promise((r) => setTimeout(r, 500));
    stop = true;
    await Promise.all(loops);
    await agent.close();
    process.stderr.write('done\n');
    latencies.sort((a, b) => a - b);
    const p99 = latencies[Math.floor(latencies.length * 0.99)] ?? 0;
    const max = latencies.at(-1) ?? 0;
    return `Through the cluster's gateway during a lazy migration and a copy migration back (2 clients, POST /increment): ${latencies.length} requests, ${failed} failed, p99 ${p99.toFixed(1)} ms, max ${max.toFixed(0)} ms.`;
  } finally {
    await runChipmunk(['cluster', 'down']).catch(() => undefined);
  }
}
