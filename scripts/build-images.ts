// Builds (or reuses, when nothing changed) the local test and demo images in the default
// Podman store: npx tsx scripts/build-images.ts
import { ensureTestImages } from '../src/devtools/images.js';

for (const { name, status } of await ensureTestImages()) {
  console.log(`${name}: ${status}`);
}
