import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { test } from 'node:test';
import { renderApiDocs } from '../../src/devtools/api-docs.js';

test('docs/api.md matches the protocol schemas (run npm run docs after changing them)', async () => {
  const onDisk = await readFile(new URL('../../docs/api.md', import.meta.url), 'utf8');
  assert.equal(onDisk, renderApiDocs());
});

test('the reference documents every field of a message', () => {
  const doc = renderApiDocs();
  assert.match(doc, /## ContainerSpec[\s\S]*\| `memoryBytes` \| integer \| no \|/);
  assert.match(doc, /## MigrationSummary[\s\S]*\| `downtimeMs` \| number \| yes \|/);
});
