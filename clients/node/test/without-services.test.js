'use strict';
// The client and CLI where no real service is needed: unreachable and fake servers, files, arguments.

const assert = require('node:assert/strict');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { after, before, describe, test } = require('node:test');

const { ClientError, FileError, IndexClient, findImages } = require('../src/client');
const { jsonLines, runCli } = require('./support/cli');
const { startFakeServer } = require('./support/fake-server');
const { noiseBmp } = require('./support/images');

let workDir;
let images;

before(() => {
  workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'imgsearch-node-offline-'));
  images = [path.join(workDir, 'a.bmp'), path.join(workDir, 'b.bmp')];
  images.forEach((image, seed) => fs.writeFileSync(image, noiseBmp(16, 16, seed)));
});

after(() => {
  fs.rmSync(workDir, { recursive: true, force: true });
});

describe('unreachable address', () => {
  let address;

  before(async () => {
    address = `127.0.0.1:${await closedPort()}`;
  });

  test('library calls fail with UNAVAILABLE', async () => {
    const client = new IndexClient({ address });
    try {
      await assert.rejects(client.stats(), isClientError('UNAVAILABLE'));
      await assert.rejects(client.search({ imagePath: images[0] }), isClientError('UNAVAILABLE'));
      await assert.rejects(collect(client.ingest(workDir)), isClientError('UNAVAILABLE'));
    } finally {
      client.close();
    }
  });

  for (const [name, args] of [
    ['stats', ['stats']],
    ['search', ['search', 'IMAGE']],
    ['ingest', ['ingest', 'FOLDER']],
  ]) {
    test(`${name} CLI exits 4 naming the address`, async () => {
      const resolved = args.map((arg) => ({ IMAGE: images[0], FOLDER: workDir })[arg] ?? arg);

      const result = await runCli([...resolved, '--addr', address]);

      assert.equal(result.status, 4);
      assert.equal(result.stdout, '');
      assert.match(result.stderr, new RegExp(`^imgsearch-node: error: ${name} failed: .*UNAVAILABLE: `));
      assert.match(result.stderr, new RegExp(`Check that the index service runs at ${address}`));
    });
  }

  test('ingest CLI reports images done', async () => {
    const result = await runCli(['ingest', workDir, '--addr', address]);

    assert.match(result.stderr, /ingest stopped after 0 of 2 images: UNAVAILABLE/);
  });
});

describe('missing files', () => {
  test('ingest of a missing folder exits 3', async () => {
    const missing = path.join(workDir, 'no-such-folder');

    const result = await runCli(['ingest', missing]);

    assert.equal(result.status, 3);
    assert.equal(result.stderr, `imgsearch-node: error: no such file or folder: ${missing}\n`);
  });

  test('search with a missing image exits 3', async () => {
    const missing = path.join(workDir, 'no-such-image.jpg');

    const result = await runCli(['search', missing]);

    assert.equal(result.status, 3);
    assert.equal(result.stderr, `imgsearch-node: error: no such file: ${missing}\n`);
  });

  test('library throws FileError before any call', async () => {
    const client = new IndexClient({ address: '127.0.0.1:1' });
    try {
      await assert.rejects(collect(client.ingest([images[0], path.join(workDir, 'gone')])), FileError);
      await assert.rejects(client.search({ imagePath: path.join(workDir, 'gone.png') }), FileError);
    } finally {
      client.close();
    }
  });
});

describe('command line', () => {
  const cases = [
    ['no command', [], /missing command: give ingest, search or stats/],
    ['unknown command', ['find'], /unknown command "find"/],
    ['unknown option', ['stats', '--colour'], /Unknown option '--colour'/],
    ['ingest without paths', ['ingest'], /ingest needs at least one PATH/],
    ['search with image and item_id', ['search', 'x.jpg', '--item-id', 'a'], /either one IMAGE file or --item-id/],
    ['search without query', ['search'], /either one IMAGE file or --item-id/],
    ['negative k', ['search', 'x.jpg', '-k=-1'], /-k must be a whole number/],
    ['k on stats', ['stats', '-k', '3'], /-k and --item-id go with the search command only/],
    ['address without port', ['stats', '--addr', 'localhost'], /--addr must be HOST:PORT/],
    ['port out of range', ['stats', '--addr', '127.0.0.1:70000'], /--addr must be HOST:PORT/],
    ['zero timeout', ['stats', '--timeout', '0'], /--timeout must be a positive number of seconds/],
    ['stats with argument', ['stats', 'extra'], /stats takes no arguments/],
  ];
  for (const [name, args, message] of cases) {
    test(`${name} exits 2`, async () => {
      const result = await runCli(args);

      assert.equal(result.status, 2);
      assert.match(result.stderr, message);
      assert.match(result.stderr, /Run imgsearch-node --help for the usage/);
    });
  }

  test('token with a space exits 2 without showing it', async () => {
    const result = await runCli(['stats'], { IMGSEARCH_TOKEN: 'hunter 2' });

    assert.equal(result.status, 2);
    assert.match(result.stderr, /IMGSEARCH_TOKEN must be printable ASCII without spaces/);
    assert.doesNotMatch(result.stderr, /hunter/);
  });

  test('help lists commands and exit statuses', async () => {
    const result = await runCli(['--help']);

    assert.equal(result.status, 0);
    for (const text of ['ingest PATH...', 'search IMAGE [-k N]', 'stats', 'IMGSEARCH_TOKEN', 'Exit status:']) {
      assert.ok(result.stdout.includes(text), `help mentions ${text}`);
    }
    for (const status of [0, 1, 2, 3, 4, 70]) {
      assert.match(result.stdout, new RegExp(`^  ${status} +\\S`, 'm'), `help explains exit status ${status}`);
    }
  });
});

describe('fake index service', () => {
  let fake;
  let seen;

  before(async () => {
    fake = await startFakeServer({
      GetStats: (call, callback) => {
        seen.authorization = call.metadata.get('authorization');
        callback(null, { item_count: 5, dim: 512, model_id: 'fake-model', index_kind: 'flat' });
      },
      Search: (call, callback) => {
        if (call.request.item_id === 'slow') {
          return; // sends no response, so the client's deadline ends the call
        }
        seen.search = call.request;
        callback(null, { neighbours: fakeNeighbours(), model_id: 'fake-model' });
      },
      IngestImages: (call) => {
        // 'end-early' makes the server end the stream without a response, and 'answer-then-end' after
        // one response. Items whose uri starts with 'echo' are added, and other items get no response.
        call.on('data', (request) => {
          if (request.uri === 'answer-then-end' || request.uri.startsWith('echo')) {
            call.write({ item_id: 'first', status: 'INGEST_STATUS_ADDED', uri: request.uri });
          }
          if (request.uri === 'end-early' || request.uri === 'answer-then-end') {
            call.end();
          }
        });
      },
    });
  });

  after(() => {
    fake.stop();
  });

  test('token is sent as bearer metadata', async () => {
    seen = {};
    const client = new IndexClient({ address: fake.address, token: 'abc.DEF-123' });
    try {
      const stats = await client.stats();
      assert.equal(stats.item_count, 5);
      assert.equal(stats.model_id, 'fake-model');
    } finally {
      client.close();
    }
    assert.deepEqual(seen.authorization, ['Bearer abc.DEF-123']);
  });

  test('no token sends no authorization', async () => {
    seen = {};
    const result = await runCli(['stats', '--addr', fake.address]);

    assert.equal(result.status, 0, result.stderr);
    assert.equal(JSON.parse(result.stdout).dim, 512);
    assert.deepEqual(seen.authorization, []);
  });

  test('search converts neighbours', async () => {
    seen = {};
    const result = await runCli(['search', images[0], '-k', '2', '--addr', fake.address]);

    assert.equal(result.status, 0, result.stderr);
    assert.equal(seen.search.k, 2);
    assert.deepEqual(seen.search.image, fs.readFileSync(images[0]));
    const { neighbours } = JSON.parse(result.stdout);
    assert.deepEqual(neighbours[0], {
      item_id: 'near-one', score: 0.75, uri: 'file:///near.jpg', metadata: { camera: 'x' }, width: 4, height: 3,
      sha256: 'ab', match: 'near', phash_distance: 6, local_difference: 0.25,
    });
    assert.equal(neighbours[1].match, 'unspecified');
    assert.equal(neighbours[1].phash_distance, null);
    assert.equal(neighbours[1].local_difference, null);
  });

  test('caller deadline ends a silent call', async () => {
    const client = new IndexClient({ address: fake.address, timeoutMs: 60_000 });
    const started = Date.now();
    try {
      await assert.rejects(client.search({ itemId: 'slow' }, { deadline: Date.now() + 300 }),
        isClientError('DEADLINE_EXCEEDED'));
    } finally {
      client.close();
    }
    assert.ok(Date.now() - started < 5_000, 'the caller deadline, not the 60 s timeout, ended the call');
  });

  test('CLI timeout ends a silent call', async () => {
    const result = await runCli(['search', '--item-id', 'slow', '--timeout', '0.3', '--addr', fake.address]);

    assert.equal(result.status, 4);
    assert.match(result.stderr, /search failed: DEADLINE_EXCEEDED/);
    assert.match(result.stderr, /pass a longer --timeout/);
  });

  test('CLI timeout ends a silent ingest', async () => {
    const result = await runCli(['ingest', images[0], '--timeout', '0.3', '--addr', fake.address]);

    assert.equal(result.status, 4);
    assert.match(result.stderr, /ingest stopped after 0 of 1 images: DEADLINE_EXCEEDED/);
  });

  test('stream ended before items sent is INTERNAL', async () => {
    const client = new IndexClient({ address: fake.address });
    async function* items() {
      yield { image: Buffer.from('x'), uri: 'answer-then-end' };
      // Ample time for the response and the end of the call to arrive before the next item.
      await new Promise((resolve) => setTimeout(resolve, 500));
      yield { image: Buffer.from('y'), uri: 'never-sent' };
    }
    const outcomes = [];
    try {
      await assert.rejects(async () => {
        for await (const outcome of client.ingestItems(items())) {
          outcomes.push(outcome);
        }
      }, (error) => {
        isClientError('INTERNAL')(error);
        assert.match(error.message, /ended the ingest stream before every item was sent/);
        return true;
      });
    } finally {
      client.close();
    }
    assert.deepEqual(outcomes, [{ uri: 'answer-then-end', item_id: 'first', status: 'added' }]);
  });

  test('leaving the loop closes the items', async () => {
    const client = new IndexClient({ address: fake.address });
    let closed = false;
    function* items() {
      try {
        for (let number = 0; ; number += 1) {
          yield { image: Buffer.from('x'), uri: `echo-${number}` };
        }
      } finally {
        closed = true;
      }
    }
    const outcomes = [];
    try {
      for await (const outcome of client.ingestItems(items(), { maxInFlight: 4 })) {
        outcomes.push(outcome);
        break;
      }
    } finally {
      client.close();
    }
    assert.deepEqual(outcomes, [{ uri: 'echo-0', item_id: 'first', status: 'added' }]);
    assert.equal(closed, true);
  });

  test('stream ended early is INTERNAL', async () => {
    const client = new IndexClient({ address: fake.address });
    const items = [{ image: Buffer.from('x'), uri: 'end-early' }];
    try {
      await assert.rejects(collect(client.ingestItems(items)), (error) => {
        isClientError('INTERNAL')(error);
        assert.match(error.message, /ended the ingest stream before it sent a response for every item/);
        return true;
      });
    } finally {
      client.close();
    }
  });
});

describe('argument checks', () => {
  const client = new IndexClient({ address: '127.0.0.1:1' });
  after(() => client.close());

  test('token with control characters is rejected', () => {
    assert.throws(() => new IndexClient({ token: 'a\nb' }), /printable ASCII/);
  });

  test('search needs exactly one query', async () => {
    await assert.rejects(client.search({}), /exactly one of imagePath, image or itemId/);
    await assert.rejects(client.search({ itemId: 'a', image: Buffer.from('x') }), /exactly one/);
  });

  test('k must be a uint32', async () => {
    await assert.rejects(client.search({ itemId: 'a' }, { k: -1 }), RangeError);
    await assert.rejects(client.search({ itemId: 'a' }, { k: 2 ** 32 }), RangeError);
  });

  test('ingest policy must be known', async () => {
    await assert.rejects(collect(client.ingestItems([], { onDuplicate: 'merge' })), /onDuplicate must be one of/);
  });

  test('items must be iterable', async () => {
    await assert.rejects(collect(client.ingestItems(42)), /items must be an iterable or async iterable/);
  });

  test('item without image is rejected', async () => {
    await assert.rejects(collect(client.ingestItems([{ uri: 'no-image' }])), /needs an image Buffer/);
  });
});

describe('findImages', () => {
  test('lists folders recursively, sorted, by suffix', async () => {
    const root = path.join(workDir, 'tree');
    fs.mkdirSync(path.join(root, 'b', 'deeper'), { recursive: true });
    for (const name of ['z.PNG', 'a.jpg', 'notes.txt', 'b/c.webp', 'b/deeper/d.jpeg']) {
      fs.writeFileSync(path.join(root, name), 'x');
    }
    const named = path.join(workDir, 'named-without-suffix');
    fs.writeFileSync(named, 'x');

    const files = await findImages([root, named]);

    assert.deepEqual(files.map((file) => path.relative(workDir, file)), [
      'tree/a.jpg', 'tree/b/c.webp', 'tree/b/deeper/d.jpeg', 'tree/z.PNG', 'named-without-suffix',
    ]);
  });

  test('missing path is a FileError', async () => {
    await assert.rejects(findImages([path.join(workDir, 'nothing')]), (error) => {
      assert.ok(error instanceof FileError);
      assert.match(error.message, /no such file or folder/);
      return true;
    });
  });
});

function fakeNeighbours() {
  return [
    {
      item_id: 'near-one', score: 0.75, uri: 'file:///near.jpg', metadata: { camera: 'x' }, width: 4, height: 3,
      sha256: 'ab', match: 'MATCH_KIND_NEAR', phash_distance: 6, local_difference: 0.25,
    },
    { item_id: 'vector-one', score: 0.5, match: 'MATCH_KIND_UNSPECIFIED' },
  ];
}

/** Resolves to a 127.0.0.1 port that had no listener when this returned. */
function closedPort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.on('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

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
