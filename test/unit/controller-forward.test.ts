// A follower passes mutations on to the leader (body, token, streamed answers), answers reads
// itself, and says clearly when no leader can take the request.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import Fastify, { type FastifyInstance } from 'fastify';
import { request } from 'undici';

import { FORWARDED_BY_HEADER as FORWARDED_HEADER, forwardToLeader, leaderOnly } from '../../src/controller/forward.js';
import { installApiConventions } from '../../src/shared/http.js';

const TOKEN = 'forward-test';
const auth = { authorization: `Bearer ${TOKEN}` };

describe('which requests a follower passes on to the leader', () => {
  it('passes on mutations; keeps reads, heartbeats, its debug routes and its own checkpoint replica', () => {
    const cases: [string, string, boolean][] = [
      ['POST', '/v1/containers', true],
      ['POST', '/v1/containers/web/migrate', true],
      ['DELETE', '/v1/containers/web', true],
      ['PUT', '/v1/containers/web/protection', true],
      ['PUT', '/v1/checkpoints/uploads/u1/chunks', false],
      ['GET', '/v1/checkpoints/web/c1/files?path=/', false],
      ['GET', '/v1/containers/web/checkpoints', false],
      ['PUT', '/v1/nodes/node1', false],
      ['GET', '/v1/containers', false],
      ['GET', '/v1/containers/web/logs?tail=5', false],
      ['GET', '/v1/nodes', false],
      ['GET', '/healthz', false],
      ['POST', '/v1/debug/faults', false],
      // Retiring a replica is the leader's (it copies and writes records); listing them any controller answers.
      ['POST', '/v1/checkpoint-replicas/retire', true],
      ['GET', '/v1/checkpoint-replicas', false],
      ['GET', '/v1/checkpoint-store', false],
    ];
    for (const [method, url, expected] of cases) assert.equal(leaderOnly(method, url), expected, `${method} ${url}`);
  });
});

describe('passing mutations on to the leader', () => {
  let leader: FastifyInstance;
  let follower: FastifyInstance;
  let leaderUrl: string | undefined;
  let followerUrl: string;
  let leading = false;

  before(async () => {
    leader = Fastify();
    installApiConventions(leader, TOKEN);
    leader.post('/v1/containers', async (req) => ({ got: req.body, by: req.headers[FORWARDED_HEADER] }));
    leader.post('/v1/containers/web/migrate', async (_req, reply) => {
      reply.hijack();
      reply.raw.writeHead(200, { 'content-type': 'application/x-ndjson' });
      for (const phase of ['prepare', 'dump', 'done']) {
        reply.raw.write(`${JSON.stringify({ phase })}\n`);
        await new Promise((r) => setTimeout(r, 30));
      }
      reply.raw.end();
    });
    leader.delete('/v1/containers/gone', async (_req, reply) => reply.code(404).send({ code: 'CHIPMUNK_NOT_FOUND', message: 'no container gone' }));
    leaderUrl = await leader.listen({ host: '127.0.0.1', port: 0 });

    follower = Fastify();
    installApiConventions(follower, TOKEN);
    forwardToLeader(follower, { leading: () => leading, leader: () => (leaderUrl ? { id: 'c1', url: leaderUrl, term: 7 } : undefined) }, 'c2');
    follower.get('/v1/containers', async () => [{ name: 'answered-by-follower' }]);
    follower.post('/v1/containers', async () => ({ handledLocally: true }));
    follower.put('/v1/checkpoints/uploads/u1/chunks', async () => ({ localReplica: true }));
    followerUrl = await follower.listen({ host: '127.0.0.1', port: 0 });
  });

  after(async () => {
    await follower.close();
    await leader.close();
  });

  it('passes a mutation with its body on, and the answer back', async () => {
    const res = await request(`${followerUrl}/v1/containers`, { method: 'POST', headers: { ...auth, 'content-type': 'application/json' }, body: JSON.stringify({ spec: { name: 'web' } }) });
    assert.equal(res.statusCode, 200);
    assert.deepEqual(await res.body.json(), { got: { spec: { name: 'web' } }, by: 'c2' });
  });

  it('streams a progress answer through line by line', async () => {
    const res = await request(`${followerUrl}/v1/containers/web/migrate`, { method: 'POST', headers: { ...auth, 'content-type': 'application/json' }, body: '{}' });
    assert.match(String(res.headers['content-type']), /ndjson/);
    const text = await res.body.text();
    assert.deepEqual(text.trim().split('\n').map((l) => JSON.parse(l).phase), ['prepare', 'dump', 'done']);
  });

  it("passes the leader's errors back as they are", async () => {
    const res = await request(`${followerUrl}/v1/containers/gone`, { method: 'DELETE', headers: auth });
    assert.equal(res.statusCode, 404);
    assert.equal(((await res.body.json()) as { code: string }).code, 'CHIPMUNK_NOT_FOUND');
  });

  it('answers reads and its own checkpoint replica itself; acts itself while it leads', async () => {
    assert.deepEqual(await (await request(`${followerUrl}/v1/containers`, { headers: auth })).body.json(), [{ name: 'answered-by-follower' }]);
    const upload = await request(`${followerUrl}/v1/checkpoints/uploads/u1/chunks`, { method: 'PUT', headers: auth });
    assert.deepEqual(await upload.body.json(), { localReplica: true });
    leading = true;
    try {
      const res = await request(`${followerUrl}/v1/containers`, { method: 'POST', headers: { ...auth, 'content-type': 'application/json' }, body: '{}' });
      assert.deepEqual(await res.body.json(), { handledLocally: true });
    } finally {
      leading = false;
    }
  });

  it('refuses a request without the token before passing anything on', async () => {
    const res = await request(`${followerUrl}/v1/containers`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' });
    assert.equal(res.statusCode, 401);
  });

  it('says CHIPMUNK_NOT_LEADER when no leader is known, the leader cannot be reached, or the request was passed on already', async () => {
    const post = (headers: Record<string, string> = {}) =>
      request(`${followerUrl}/v1/containers`, { method: 'POST', headers: { ...auth, 'content-type': 'application/json', ...headers }, body: '{}' });
    const saved = leaderUrl;
    try {
      leaderUrl = undefined;
      let res = await post();
      assert.equal(res.statusCode, 503);
      assert.match(((await res.body.json()) as { message: string }).message, /no controller leads right now/);
      leaderUrl = 'http://127.0.0.1:1';
      res = await post();
      assert.equal(res.statusCode, 503);
      const body = (await res.body.json()) as { code: string; message: string };
      assert.equal(body.code, 'CHIPMUNK_NOT_LEADER');
      assert.match(body.message, /cannot be reached \(ECONNREFUSED\)/);
      leaderUrl = saved;
      res = await post({ [FORWARDED_HEADER]: 'c3' });
      assert.equal(((await res.body.json()) as { code: string }).code, 'CHIPMUNK_NOT_LEADER');
    } finally {
      leaderUrl = saved;
    }
  });
});
