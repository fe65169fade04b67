#!/usr/bin/env -S node --max-semi-space-size=64
// A larger young generation (V8's default is 16 MB) makes scavenges rarer: the gateway allocates
// short-lived objects per request, and with the default it spent about a sixth of its CPU in
// garbage collection and its p99 suffered (bench/gateway). Whoever runs this file with node
// directly passes the flag too (the local cluster, bench/gateway).
// The `chipmunk` command, straight from the checkout: tsx compiles the TypeScript sources as
// they are imported, so there is no build step.
import { register } from 'tsx/esm/api';

register();
await import('../src/cli/main.ts');
