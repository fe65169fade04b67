// Bad command lines: each must fail with a clear message and the usage exit code (2), before
// anything reaches the controller, and never with a stack trace.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

import { runCli, type CliResult } from './run-cli.js';

describe('chipmunk command-line errors', () => {
  let server: Server;
  let requests = 0;
  let env: Record<string, string>;

  before(async () => {
    // A controller that counts what reaches it: usage errors must send nothing.
    server = createServer((_req, res) => {
      requests++;
      res.writeHead(500).end();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    env = { CHIPMUNK_CONTROLLER: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, CHIPMUNK_TOKEN: 'test-token' };
  });

  after(() => {
    server.close();
  });

  function assertUsageError(result: CliResult, message: RegExp): void {
    assert.equal(result.code, 2, `exit code (stderr: ${result.stderr})`);
    assert.match(result.stderr, /^error: /);
    assert.match(result.stderr, message);
    assert.doesNotMatch(result.stderr, /\n\s+at /, 'no stack trace');
    assert.equal(result.stdout, '', 'nothing on stdout without --json');
  }

  it('rejects a bad port spec', async () => {
    assertUsageError(await runCli(['run', '--name', 'web', '-p', '80', 'img'], env), /bad port spec '80': use HOSTPORT:CONTAINERPORT/);
    assertUsageError(await runCli(['run', '--name', 'web', '-p', '8080:70000', 'img'], env), /container port 70000 is outside 1-65535/);
    assert.equal(requests, 0);
  });

  it('rejects a bad volume, checkpoint interval or node lease', async () => {
    assertUsageError(await runCli(['run', '--name', 'web', '-v', 'data', 'img'], env), /bad volume 'data': use NAME:\/path/);
    assertUsageError(await runCli(['run', '--name', 'web', '-v', 'data:/a/../etc', 'img'], env), /bad volume/);
    assertUsageError(await runCli(['run', '--name', 'web', '-v', 'data:/', 'img'], env), /bad volume/);
    assertUsageError(await runCli(['run', '--name', 'web', '--checkpoint-every', '500ms', 'img'], env), /bad checkpoint interval '500ms': at least 1s/);
    assertUsageError(await runCli(['protect', 'web', '--every', 'soon'], env), /bad checkpoint interval 'soon'/);
    assertUsageError(await runCli(['cluster', 'up', '--node-lease', '100ms'], env), /bad node lease '100ms'/);
    assertUsageError(await runCli(['controller', '--leader-lease', '500ms'], env), /bad leader lease '500ms': whole seconds, at least 1s/);
    assertUsageError(await runCli(['controller', '--leader-lease', '1500ms'], env), /bad leader lease '1500ms'/);
  });

  it('rejects a bad memory size', async () => {
    assertUsageError(await runCli(['run', '--name', 'web', '--memory', 'lots', 'img'], env), /bad memory size 'lots'.*e\.g\. 256m or 1g/);
    assertUsageError(await runCli(['run', '--name', 'web', '--memory', '1k', 'img'], env), /bad memory size '1k': at least/);
    assert.equal(requests, 0);
  });

  it('rejects a bad container name or environment variable', async () => {
    assertUsageError(await runCli(['run', '--name', 'Web!', 'img'], env), /bad container name 'Web!': lowercase letters/);
    assertUsageError(await runCli(['run', '--name', 'web', '-e', 'NOVALUE', 'img'], env), /bad environment variable 'NOVALUE': use KEY=VALUE/);
    assert.equal(requests, 0);
  });

  it('rejects an unknown writable layer kind for the agent', async () => {
    assertUsageError(
      await runCli(['agent', '--node', 'n1', '--controller', 'http://127.0.0.1:1', '--listen', '127.0.0.1:1', '--writable-layer', 'zfs'], env),
      /bad writable layer 'zfs': use 'directory' .* or 'image'/,
    );
    assert.equal(requests, 0);
  });

  it('rejects a --userns other than on or off for the agent', async () => {
    assertUsageError(
      await runCli(['agent', '--node', 'n1', '--controller', 'http://127.0.0.1:1', '--listen', '127.0.0.1:1', '--userns', 'auto'], env),
      /bad --userns 'auto': use 'on' .* or 'off'/,
    );
    assert.equal(requests, 0);
  });

  it('rejects a bad controller list for the agent', async () => {
    assertUsageError(
      await runCli(['agent', '--node', 'n1', '--controller', 'http://127.0.0.1:1,,http://127.0.0.1:2', '--listen', '127.0.0.1:1'], env),
      /bad URL list/,
    );
    assert.equal(requests, 0);
  });

  it('requires --to on migrate', async () => {
    assertUsageError(await runCli(['migrate', 'web'], env), /required option '--to <node>' not specified/);
    assert.equal(requests, 0);
  });

  it('rejects an unknown migration mode', async () => {
    assertUsageError(await runCli(['migrate', 'web', '--to', 'node2', '--mode', 'fast'], env), /'fast' is invalid\. Allowed choices are lazy, copy/);
    assert.equal(requests, 0);
  });

  it('rejects unknown commands and options', async () => {
    assertUsageError(await runCli(['frobnicate'], env), /unknown command 'frobnicate'/);
    assertUsageError(await runCli(['ps', '--all'], env), /unknown option '--all'/);
    assert.equal(requests, 0);
  });

  it('with --json, also prints the error as JSON on stdout', async () => {
    const result = await runCli(['run', '--name', 'web', '--memory', 'lots', '--json', 'img'], env);
    assert.equal(result.code, 2);
    assert.match(result.stderr, /^error: bad memory size/);
    const { error } = JSON.parse(result.stdout) as { error: { code: string; message: string; details: Record<string, unknown> } };
    assert.equal(error.code, 'CHIPMUNK_INVALID_INPUT');
    assert.match(error.message, /^bad memory size 'lots'/);
    assert.deepEqual(error.details, { value: 'lots' });
    assert.equal(requests, 0);
  });

  it('says how to get a controller when none is configured', async () => {
    for (const args of [['ps'], ['node', 'ls'], ['migrate', 'web', '--to', 'node2']]) {
      assertUsageError(await runCli(args), /no controller: run 'chipmunk cluster up' or pass --controller URL/);
    }
  });

  it('asks for a token when the controller is given without one', async () => {
    assertUsageError(await runCli(['ps', '--controller', env.CHIPMUNK_CONTROLLER!]), /no token for controller .*--token-file FILE or set CHIPMUNK_TOKEN/);
    assertUsageError(await runCli(['--token-file', '/nonexistent/token', 'ps'], env), /cannot read token file \/nonexistent\/token: ENOENT/);
    assert.equal(requests, 0);
  });
});
