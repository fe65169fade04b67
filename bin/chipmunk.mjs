#!/usr/bin/env node
// The `chipmunk` command, straight from the checkout: tsx compiles the TypeScript sources as
// they are imported, so there is no build step.
import { register } from 'tsx/esm/api';

register();
await import('../src/cli/main.ts');
