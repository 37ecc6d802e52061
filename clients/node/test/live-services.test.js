'use strict';
// The client and CLI against the real Python services, with the tiny random CLIP in ONNX Runtime.

const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { after, before, describe, test } = require('node:test');

const { ClientError, IndexClient } = require('../src/client');
const { jsonLines, runCli } = require('./support/cli');
const { writeImages } = require('./support/images');
const { startServices } = require('./support/services');

const TOKEN = 'node-client-test-token';
const TINY_MODEL_ID = 'tiny-clip-random-v1';
const TINY_DIM = 512;

describe('client against live services', { timeout: 120_000 }, () => {
  let workDir;
  let services;
  let client;
  let cliEnv;

  before(async () => {
    workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'imgsearch-node-'));
    services = await startServices({ dataDir: path.join(workDir, 'index'), logDir: workDir, token: TOKEN });
    client = new IndexClient({ address: services.indexAddress, token: TOKEN });
    cliEnv = { IMGSEARCH_TOKEN: TOKEN };
  });

  after(async () => {
    client?.close();
    if (services === undefined) {
      return; // the services did not start; their logs stay in workDir
    }
    const exitCodes = await services.stop();
    assert.deepEqual(exitCodes, [0, 0], `both services stop cleanly on SIGTERM; see the logs in ${workDir}`);
    fs.rmSync(workDir, { recursive: true, force: true });
  });

  test('ingest then ingest again reports already present', async () => {
    const folder = path.join(workDir, 'first');
    const files = writeImages(folder, 0, 4);

    const first = await runCli(['ingest', folder, '--addr', services.indexAddress], cliEnv);
    assert.equal(first.status, 0, first.stderr);
    const added = jsonLines(first.stdout);
    assert.deepEqual(added.slice(0, 4).map((outcome) => outcome.uri), files);
    assert.deepEqual(added.slice(0, 4).map((outcome) => outcome.status), Array(4).fill('added'));
    assert.deepEqual(added[4], { summary: true, total: 4, added: 4, already_present: 0, failed: 0 });

    const again = await runCli(['ingest', folder, '--addr', services.indexAddress], cliEnv);
    assert.equal(again.status, 0, again.stderr);
    const present = jsonLines(again.stdout);
    assert.deepEqual(present.slice(0, 4).map((outcome) => outcome.status), Array(4).fill('already_present'));
    assert.deepEqual(present.slice(0, 4).map((outcome) => outcome.item_id), added.slice(0, 4).map((o) => o.item_id));
    assert.deepEqual(present[4], { summary: true, total: 4, added: 0, already_present: 4, failed: 0 });
  });

  test('search with an ingested image finds it first', async () => {
    const files = writeImages(path.join(workDir, 'search'), 4, 3);
    const outcomes = await collect(client.ingest(files));
    assert.deepEqual(outcomes.map((outcome) => outcome.status), ['added', 'added', 'added']);

    const result = await runCli(['search', files[1], '-k', '3', '--addr', services.indexAddress], cliEnv);
    assert.equal(result.status, 0, result.stderr);
    const { neighbours } = JSON.parse(result.stdout);
    assert.equal(neighbours.length, 3);
    assert.equal(neighbours[0].item_id, outcomes[1].item_id);
    assert.equal(neighbours[0].uri, files[1]);
    assert.ok(Math.abs(neighbours[0].score - 1) < 1e-3, `score of the query itself: ${neighbours[0].score}`);
    assert.equal(neighbours[0].match, 'exact');
    assert.ok(neighbours[1].score < neighbours[0].score);
  });

  test('search by item_id finds that item first', async () => {
    const files = writeImages(path.join(workDir, 'by-id'), 7, 2);
    const outcomes = await collect(client.ingest(files));

    const neighbours = await client.search({ itemId: outcomes[0].item_id }, { k: 2 });
    assert.equal(neighbours[0].item_id, outcomes[0].item_id);
    assert.ok(Math.abs(neighbours[0].score - 1) < 1e-3, `score of the query itself: ${neighbours[0].score}`);
    assert.ok(neighbours.length <= 2);
  });

  test('bad image fails alone', async () => {
    const folder = path.join(workDir, 'with-bad');
    const files = writeImages(folder, 9, 2);
    const broken = path.join(folder, 'broken.jpg');
    fs.writeFileSync(broken, 'plain text, not an image\n');

    const result = await runCli(['ingest', folder, '--addr', services.indexAddress], cliEnv);
    assert.equal(result.status, 1, 'exit status 1 when an item failed');
    const lines = jsonLines(result.stdout);
    const byUri = Object.fromEntries(lines.slice(0, 3).map((outcome) => [outcome.uri, outcome]));
    assert.equal(byUri[broken].status, 'failed');
    assert.equal(byUri[broken].item_id, '');
    assert.equal(byUri[broken].error.code, 3);
    assert.equal(byUri[broken].error.code_name, 'INVALID_ARGUMENT');
    assert.match(byUri[broken].error.message, /not recognised/);
    for (const file of files) {
      assert.equal(byUri[file].status, 'added', file);
      assert.equal(byUri[file].error, undefined);
    }
    assert.deepEqual(lines[3], { summary: true, total: 3, added: 2, already_present: 0, failed: 1 });
  });

  test('ingestItems keeps order around local and server failures', async () => {
    const [good] = writeImages(path.join(workDir, 'items'), 11, 1);
    const goodImage = fs.readFileSync(good);
    // Room for the good image and its request fields, but not for an image one byte over the limit.
    const limit = goodImage.length + 4096;
    const small = new IndexClient({ address: services.indexAddress, token: TOKEN, maxMessageBytes: limit });
    const items = [
      { image: Buffer.from('not an image'), uri: 'mem://bad' },
      { image: Buffer.alloc(limit + 1, 7), uri: 'mem://too-large' },
      { image: goodImage, uri: 'mem://good', metadata: { source: 'node-test' } },
    ];
    let outcomes;
    try {
      outcomes = await collect(small.ingestItems(items));
    } finally {
      small.close();
    }

    assert.deepEqual(outcomes.map((outcome) => outcome.uri), ['mem://bad', 'mem://too-large', 'mem://good']);
    assert.equal(outcomes[0].error.code_name, 'INVALID_ARGUMENT');
    assert.equal(outcomes[1].error.code_name, 'RESOURCE_EXHAUSTED');
    assert.match(outcomes[1].error.message, new RegExp(`above the client's message limit of ${limit} bytes`));
    assert.equal(outcomes[2].status, 'added');
    const [found] = await client.search({ itemId: outcomes[2].item_id }, { k: 1 });
    assert.deepEqual(found.metadata, { source: 'node-test' });
  });

  test('failing items yield sent outcomes then throw', async () => {
    const files = writeImages(path.join(workDir, 'interrupted'), 12, 2);
    async function* items() {
      yield { image: fs.readFileSync(files[0]), uri: files[0] };
      yield { image: fs.readFileSync(files[1]), uri: files[1] };
      throw new Error('the items ran dry');
    }
    const outcomes = [];

    await assert.rejects(async () => {
      for await (const outcome of client.ingestItems(items())) {
        outcomes.push(outcome);
      }
    }, /the items ran dry/);
    assert.deepEqual(outcomes.map((outcome) => outcome.status), ['added', 'added']);
  });

  test('stats reports model and counts', async () => {
    const before = await client.stats();
    await collect(client.ingest(writeImages(path.join(workDir, 'stats'), 14, 2)));

    const result = await runCli(['stats', '--addr', services.indexAddress], cliEnv);
    assert.equal(result.status, 0, result.stderr);
    const stats = JSON.parse(result.stdout);
    assert.equal(stats.item_count, before.item_count + 2);
    assert.equal(stats.model_id, TINY_MODEL_ID);
    assert.equal(stats.dim, TINY_DIM);
    assert.equal(stats.index_kind, 'flat');
  });

  test('unknown item_id is NOT_FOUND', async () => {
    await assert.rejects(client.search({ itemId: 'no-such-item' }), isClientError('NOT_FOUND'));

    const result = await runCli(['search', '--item-id', 'no-such-item', '--addr', services.indexAddress], cliEnv);
    assert.equal(result.status, 4);
    assert.match(result.stderr, /search failed: NOT_FOUND: .*no-such-item/);
  });

  test('k above the server limit is INVALID_ARGUMENT', async () => {
    const result = await runCli(['search', '--item-id', 'x', '-k', '100000', '--addr', services.indexAddress], cliEnv);
    assert.equal(result.status, 4);
    assert.match(result.stderr, /INVALID_ARGUMENT/);
  });

  test('call without token is UNAUTHENTICATED', async () => {
    const anonymous = new IndexClient({ address: services.indexAddress });
    try {
      await assert.rejects(anonymous.stats(), isClientError('UNAUTHENTICATED'));
    } finally {
      anonymous.close();
    }

    const result = await runCli(['stats', '--addr', services.indexAddress]);
    assert.equal(result.status, 4);
    assert.match(result.stderr, /stats failed: UNAUTHENTICATED: missing bearer token/);
    assert.match(result.stderr, /Set IMGSEARCH_TOKEN/);
  });

  test('wrong token is UNAUTHENTICATED', async () => {
    const result = await runCli(['stats', '--addr', services.indexAddress], { IMGSEARCH_TOKEN: 'wrong-token' });
    assert.equal(result.status, 4);
    assert.match(result.stderr, /UNAUTHENTICATED: invalid bearer token/);
  });
});

async function collect(iterable) {
  const values = [];
  for await (const value of iterable) {
    values.push(value);
  }
  return values;
}

function isClientError(codeName) {
  return (error) => {
    assert.ok(error instanceof ClientError, `expected a ClientError, got ${error}`);
    assert.equal(error.codeName, codeName);
    return true;
  };
}
