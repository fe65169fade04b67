/**
 * Writes docs/api.md from the protocol schemas: the same TypeBox objects that validate
 * requests and type the code document the messages. `npm run docs` regenerates it; a unit
 * test fails when it is stale.
 */
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { renderApiDocs } from '../src/devtools/api-docs.js';

const out = fileURLToPath(new URL('../docs/api.md', import.meta.url));
await writeFile(out, renderApiDocs());
console.log(`wrote ${out}`);
