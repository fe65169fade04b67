/** Renders the protocol schemas as a Markdown reference (docs/api.md). */
import type { TSchema } from '@sinclair/typebox';
import { checkpointStoreSchemas } from '../checkpoint-store/index.js';
import { schemas } from '../shared/protocol.js';
import { replicaSchemas } from '../shared/replica-protocol.js';

export function renderApiDocs(): string {
  const parts = [
    '# chipmunk API messages',
    '',
    'Generated from `src/shared/protocol.ts`, `src/shared/replica-protocol.ts` and `src/checkpoint-store/protocol.ts` by `npm run docs`; do not edit by hand.',
    'The routes that carry them are listed in `docs/design.md`.',
    '',
  ];
  for (const [name, schema] of Object.entries({ ...schemas, ...replicaSchemas, ...checkpointStoreSchemas })) {
    parts.push(`## ${name}`, '');
    if (schema.description) parts.push(schema.description, '');
    if (schema.type === 'object' && schema.properties) {
      parts.push('| field | type | required | notes |', '|---|---|---|---|');
      const required = new Set<string>(schema.required ?? []);
      for (const [field, prop] of Object.entries(schema.properties as Record<string, TSchema>)) {
        parts.push(`| \`${field}\` | ${typeOf(prop)} | ${required.has(field) && prop.default === undefined ? 'yes' : 'no'} | ${notes(prop)} |`);
      }
    } else {
      parts.push(`Type: ${typeOf(schema)}`);
    }
    parts.push('');
  }
  return parts.join('\n');
}

function typeOf(s: TSchema): string {
  if (s.anyOf) return (s.anyOf as TSchema[]).map(typeOf).join(' \\| ');
  if (s.const !== undefined) return `\`${JSON.stringify(s.const)}\``;
  if (s.type === 'array') return `${typeOf(s.items as TSchema)}[]`;
  if (s.type === 'object' && s.patternProperties) return 'map of string';
  if (s.type === 'object') return 'object';
  return String(s.type ?? 'any');
}

function notes(s: TSchema): string {
  const n: string[] = [];
  if (s.description) n.push(String(s.description).replace(/\|/g, '\\|'));
  if (s.pattern) n.push(`pattern \`${String(s.pattern).replace(/\|/g, '\\|')}\``);
  if (s.minimum !== undefined) n.push(`min ${s.minimum}`);
  if (s.maximum !== undefined) n.push(`max ${s.maximum}`);
  if (s.default !== undefined) n.push(`default \`${JSON.stringify(s.default)}\``);
  if (s.type === 'object' && s.properties) n.push(`fields: ${Object.keys(s.properties).join(', ')}`);
  return n.join('; ');
}
