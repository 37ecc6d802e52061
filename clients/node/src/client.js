'use strict';
// A client of the imgsearch index service: ingest streams, search and stats, with plain objects.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const { FileError, findImages, readFile } = require('./files');

const DEFAULT_ADDRESS = '127.0.0.1:50052';
const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_INGEST_TIMEOUT_MS = 600_000;
// The services' default message limit (IMGSEARCH_*_MAX_MESSAGE_BYTES), 32 MiB.
const DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024;
const DEFAULT_MAX_IN_FLIGHT = 64;
const DEFAULT_PROTOS_DIR = path.resolve(__dirname, '..', '..', '..', 'protos');
const INDEX_PROTO = 'imgsearch/index/v1/index_service.proto';
const UINT32_MAX = 2 ** 32 - 1;

const ON_DUPLICATE_CHOICES = ['add', 'skip', 'reject'];
const DUPLICATE_MATCH_CHOICES = ['exact', 'near'];
const STATUS_NAMES = {
  INGEST_STATUS_ADDED: 'added',
  INGEST_STATUS_ALREADY_PRESENT: 'already_present',
  INGEST_STATUS_FAILED: 'failed',
};
// Marks a slot of the ingest stream whose request was sent, so its outcome comes from the server.
const SENT = Symbol('sent');

/** A gRPC call failed: `code` is the status number, `codeName` its name, such as "UNAVAILABLE". */
class ClientError extends Error {
  constructor(code, details) {
    const codeName = grpc.status[code] ?? `status ${code}`;
    super(`${codeName}: ${details}`);
    this.name = 'ClientError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
  }
}

/**
 * Client of one index service. Call close() when done.
 *
 * Results are plain objects whose fields have the proto's snake_case names. Every call has a
 * deadline: the call's own timeout, or the caller's `deadline` option when that comes sooner.
 */
class IndexClient {
  /**
   * Opens a channel to `address` (host:port), plaintext unless other `credentials` (from grpc.credentials)
   * are given. A non-empty `token` goes with every call as the metadata `authorization: Bearer <token>`.
   * `timeoutMs` bounds each search and stats call, `ingestTimeoutMs` each whole ingest stream.
   */
  constructor({
    address = DEFAULT_ADDRESS,
    token = '',
    credentials = grpc.credentials.createInsecure(),
    timeoutMs = DEFAULT_TIMEOUT_MS,
    ingestTimeoutMs = DEFAULT_INGEST_TIMEOUT_MS,
    maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
    protosDir = DEFAULT_PROTOS_DIR,
  } = {}) {
    checkToken(token);
    checkPositive('timeoutMs', timeoutMs);
    checkPositive('ingestTimeoutMs', ingestTimeoutMs);
    checkPositive('maxMessageBytes', maxMessageBytes);
    this._token = token;
    this._timeoutMs = timeoutMs;
    this._ingestTimeoutMs = ingestTimeoutMs;
    this._maxMessageBytes = maxMessageBytes;

    const { IndexService, methods } = loadIndexService(protosDir);
    this._methods = methods;
    this._stub = new IndexService(address, credentials, {
      'grpc.max_send_message_length': maxMessageBytes,
      'grpc.max_receive_message_length': maxMessageBytes,
    });
  }

  close() {
    this._stub.close();
  }

  /**
   * Ingests the images in folders (searched recursively) and files, yielding one outcome per image in order.
   *
   * `paths` is one path or an array of them. Throws FileError, before any call, for a path that does
   * not exist. Options are those of ingestItems.
   */
  async *ingest(paths, options = {}) {
    const files = await findImages(typeof paths === 'string' ? [paths] : paths);
    yield* this.ingestItems(readImages(files), options);
  }

  /**
   * Streams `items` to IngestImages and yields one outcome per item, in item order.
   *
   * An item is `{image: Buffer, uri?, item_id?, metadata?}`, and `items` any iterable or async
   * iterable of them. An outcome is `{uri, item_id, status}`, where status is "added",
   * "already_present" or "failed"; a failed one carries `error: {code, code_name, message}`, and a
   * duplicate `duplicate_of: {item_id, match}`. Options: onDuplicate ("add", "skip" or "reject"),
   * duplicateMatch ("exact" or "near"), maxInFlight (items sent ahead of their outcomes), timeoutMs and
   * deadline (a Date or epoch milliseconds) for the whole stream.
   *
   * An item larger than the message limit is not sent, because gRPC would fail the whole stream: its
   * outcome fails with RESOURCE_EXHAUSTED and the stream goes on. When iterating `items` throws,
   * nothing more is sent, the outcomes of the items sent are yielded, and then that error is thrown.
   * Throws ClientError when the call fails. Leaving the loop early cancels the call.
   */
  async *ingestItems(items, options = {}) {
    const policy = ingestPolicy(options);
    const maxInFlight = options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
    checkPositive('maxInFlight', maxInFlight);
    const iterator = iteratorOf(items);
    const deadline = deadlineFor(options.timeoutMs ?? this._ingestTimeoutMs, options.deadline);

    const call = this._stub.IngestImages(this._metadata(), { deadline });
    const stream = new IngestStream(call, iterator, {
      policy,
      maxInFlight,
      maxMessageBytes: this._maxMessageBytes,
      serialize: this._methods.IngestImages.requestSerialize,
    });
    yield* stream.outcomes();
  }

  /**
   * Returns the neighbours of one query, best first.
   *
   * `query` is `{imagePath}` (an image file), `{image}` (a Buffer of an encoded image) or `{itemId}`
   * (a stored item). Options: k (0 means the server's default, 10), minScore, timeoutMs, deadline.
   * A neighbour is `{item_id, score, uri, metadata, width, height, sha256, match, phash_distance,
   * local_difference}`, where match is "exact", "near", "similar" or "unspecified", and the last two
   * are null when the server did not measure them. Throws FileError for an unreadable imagePath and
   * ClientError when the call fails.
   */
  async search(query, options = {}) {
    const request = await searchRequest(query, options);
    const response = await this._unary('Search', request, options);
    return response.neighbours.map(neighbourFromProto);
  }

  /** Returns the collection's counts and settings, with the fields of GetStatsResponse. */
  async stats(options = {}) {
    return this._unary('GetStats', {}, options);
  }

  _unary(method, request, options) {
    const deadline = deadlineFor(options.timeoutMs ?? this._timeoutMs, options.deadline);
    return new Promise((resolve, reject) => {
      this._stub[method](request, this._metadata(), { deadline }, (error, response) => {
        if (error) {
          reject(toClientError(error));
        } else {
          resolve(response);
        }
      });
    });
  }

  _metadata() {
    const metadata = new grpc.Metadata();
    if (this._token) {
      metadata.set('authorization', `Bearer ${this._token}`);
    }
    return metadata;
  }
}

/** One IngestImages call: sends items within a window of maxInFlight and pairs outcomes with them. */
class IngestStream {
  constructor(call, items, { policy, maxInFlight, maxMessageBytes, serialize }) {
    this._slots = [];
    this._itemsError = null;
    this._call = call;
    this._items = items;
    this._policy = policy;
    this._maxInFlight = maxInFlight;
    this._maxMessageBytes = maxMessageBytes;
    this._serialize = serialize;
    this._inFlight = 0;
    this._itemsDone = false;
    // Responses received and not yet read. Every response has been received once the stream has
    // ended and the status has come, in either order.
    this._responses = [];
    this._ended = false;
    this._status = null;
    this._wake = null;
    call.on('data', (response) => this._receive(() => this._responses.push(response)));
    call.on('end', () => this._receive(() => { this._ended = true; }));
    call.on('status', (status) => this._receive(() => { this._status = status; }));
    // The status reports a failed call. Without a listener, the 'error' event would end the process.
    call.on('error', () => {});
  }

  /** Yields the outcome of each item in order, then ends the call, and throws the items' error if there was one. */
  async *outcomes() {
    try {
      for (;;) {
        await this._fill();
        const slot = this._slots.shift();
        if (slot === undefined) {
          break;
        }
        yield slot === SENT ? await this._nextOutcome() : slot.outcome;
      }
      // Every item sent has its outcome. Reading the stream to its end lets the server's handler finish
      // with OK; cancelling it now would log the call as CANCELLED.
      if (this._itemsError !== null) {
        // The items' own error explains the stop better than anything the call reports afterwards.
        await this._readToEnd().catch(() => {});
        throw this._itemsError;
      }
      await this._readToEnd();
      if (!this._itemsDone) {
        throw new ClientError(grpc.status.INTERNAL, 'the server ended the ingest stream before every item was sent');
      }
    } finally {
      await this._close();
    }
  }

  /** Sends items until maxInFlight are waiting for their outcomes, or the items run out. */
  async _fill() {
    while (!this._itemsDone && this._status === null && this._inFlight < this._maxInFlight) {
      let request;
      try {
        const next = await this._items.next();
        request = next.done ? null : ingestRequest(next.value, this._policy);
      } catch (error) {
        this._itemsError = error;
        request = null;
      }
      if (request === null) {
        this._itemsDone = true;
        this._call.end();
        return;
      }
      if (this._status !== null) {
        // The call ended while the item was read, so it is not sent and the items are not done.
        return;
      }
      await this._send(request);
    }
  }

  async _nextOutcome() {
    const result = await this._nextResponse();
    if (result.done) {
      throw new ClientError(
        grpc.status.INTERNAL,
        'the server ended the ingest stream before it sent a response for every item',
      );
    }
    this._inFlight -= 1;
    return outcomeFromProto(result.value);
  }

  async _readToEnd() {
    while (!(await this._nextResponse()).done) {
      // A response beyond one per item breaks the contract; it has no item to report against.
    }
  }

  async _close() {
    this._call.cancel();
    await this._items.return?.();
  }

  async _nextResponse() {
    for (;;) {
      if (this._responses.length > 0) {
        return { done: false, value: this._responses.shift() };
      }
      if (this._ended && this._status !== null) {
        if (this._status.code !== grpc.status.OK) {
          throw toClientError(this._status);
        }
        return { done: true };
      }
      await new Promise((resolve) => {
        this._wake = resolve;
      });
    }
  }

  _receive(change) {
    change();
    const wake = this._wake;
    this._wake = null;
    wake?.();
  }

  async _send(request) {
    const size = this._serialize(request).length;
    if (size > this._maxMessageBytes) {
      this._slots.push({ outcome: tooLargeOutcome(request.uri, size, this._maxMessageBytes) });
      return;
    }
    this._slots.push(SENT);
    this._inFlight += 1;
    if (!this._call.write(request)) {
      await this._waitForDrain();
    }
  }

  _waitForDrain() {
    if (this._status !== null) {
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const done = () => {
        this._call.off('drain', done);
        this._call.off('status', done);
        resolve();
      };
      this._call.on('drain', done);
      this._call.on('status', done);
    });
  }
}

function loadIndexService(protosDir) {
  const definition = protoLoader.loadSync(INDEX_PROTO, {
    includeDirs: [protosDir],
    keepCase: true,
    // NOTE: uint64 counts become JavaScript numbers, exact up to 2^53.
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const IndexService = grpc.loadPackageDefinition(definition).imgsearch.index.v1.IndexService;
  return { IndexService, methods: definition['imgsearch.index.v1.IndexService'] };
}

function iteratorOf(items) {
  const iterator = items?.[Symbol.asyncIterator]?.() ?? items?.[Symbol.iterator]?.();
  if (iterator === undefined) {
    throw new TypeError('items must be an iterable or async iterable of {image, uri?, item_id?, metadata?}');
  }
  return iterator;
}

async function* readImages(files) {
  for (const file of files) {
    yield { image: await readFile(file), uri: path.resolve(file) };
  }
}

function ingestPolicy({ onDuplicate = '', duplicateMatch = '' }) {
  checkChoice('onDuplicate', onDuplicate, ON_DUPLICATE_CHOICES);
  checkChoice('duplicateMatch', duplicateMatch, DUPLICATE_MATCH_CHOICES);
  return {
    on_duplicate: onDuplicate ? `ON_DUPLICATE_${onDuplicate.toUpperCase()}` : 'ON_DUPLICATE_UNSPECIFIED',
    duplicate_match: duplicateMatch ? `MATCH_KIND_${duplicateMatch.toUpperCase()}` : 'MATCH_KIND_UNSPECIFIED',
  };
}

function ingestRequest(item, policy) {
  if (!Buffer.isBuffer(item?.image)) {
    throw new TypeError('each ingest item needs an image Buffer');
  }
  return {
    image: item.image,
    item_id: item.item_id ?? '',
    uri: item.uri ?? '',
    metadata: item.metadata ?? {},
    ...policy,
  };
}

function tooLargeOutcome(uri, size, maxMessageBytes) {
  return {
    uri,
    item_id: '',
    status: 'failed',
    error: {
      code: grpc.status.RESOURCE_EXHAUSTED,
      code_name: 'RESOURCE_EXHAUSTED',
      message:
        `the request for this item is ${size} bytes, above the client's message limit of ` +
        `${maxMessageBytes} bytes, so it was not sent; send a smaller image, or raise maxMessageBytes ` +
        'on the client and the server',
    },
  };
}

function outcomeFromProto(response) {
  const outcome = {
    uri: response.uri,
    item_id: response.item_id,
    status: STATUS_NAMES[response.status] ?? `unknown (${response.status})`,
  };
  if (response.duplicate_of_item_id) {
    outcome.duplicate_of = { item_id: response.duplicate_of_item_id, match: matchName(response.duplicate_match) };
  }
  if (response.status === 'INGEST_STATUS_FAILED') {
    const { code, code_name: codeName, message } = response.error ?? {};
    outcome.error = { code, code_name: codeName, message };
  }
  return outcome;
}

async function searchRequest(query, { k = 10, minScore }) {
  const queryKeys = ['imagePath', 'image', 'itemId'].filter((key) => query?.[key] !== undefined);
  if (queryKeys.length !== 1) {
    throw new TypeError('search needs exactly one of imagePath, image or itemId');
  }
  if (!Number.isInteger(k) || k < 0 || k > UINT32_MAX) {
    throw new RangeError(`k must be an integer from 0 to ${UINT32_MAX}, got ${k}`);
  }
  const request = { k };
  if (query.imagePath !== undefined) {
    request.image = await readFile(query.imagePath);
  } else if (query.image !== undefined) {
    request.image = query.image;
  } else {
    request.item_id = query.itemId;
  }
  if (minScore !== undefined) {
    request.min_score = minScore;
  }
  return request;
}

function neighbourFromProto(neighbour) {
  return {
    item_id: neighbour.item_id,
    score: neighbour.score,
    uri: neighbour.uri,
    metadata: neighbour.metadata,
    width: neighbour.width,
    height: neighbour.height,
    sha256: neighbour.sha256,
    match: matchName(neighbour.match),
    phash_distance: neighbour.phash_distance ?? null,
    local_difference: neighbour.local_difference ?? null,
  };
}

/** Turns a MatchKind such as "MATCH_KIND_EXACT" into "exact"; a number from a newer server stays visible. */
function matchName(matchKind) {
  if (typeof matchKind !== 'string') {
    return `unknown (${matchKind})`;
  }
  return matchKind.replace(/^MATCH_KIND_/, '').toLowerCase();
}

function deadlineFor(timeoutMs, callerDeadline) {
  checkPositive('timeoutMs', timeoutMs);
  let deadline = Date.now() + timeoutMs;
  if (callerDeadline !== undefined) {
    deadline = Math.min(deadline, Number(callerDeadline));
  }
  return deadline;
}

function toClientError(error) {
  // A gRPC status carries a numeric code; anything else is a local failure that is passed on as it is.
  if (typeof error?.code !== 'number') {
    return error;
  }
  // grpc-js 1.14 ends the details of a failed connection with "Resolution note: " even when the note is empty.
  const details = (error.details ?? error.message).replace(/\s*Resolution note:\s*$/, '');
  return new ClientError(error.code, details);
}

/** Throws unless token is empty or printable ASCII without spaces, which a metadata value can carry. */
function checkToken(token) {
  if (typeof token !== 'string' || (token !== '' && !/^[!-~]+$/.test(token))) {
    throw new TypeError('the token must be printable ASCII without spaces or control characters');
  }
}

function checkPositive(name, value) {
  if (typeof value !== 'number' || !(value > 0)) {
    throw new RangeError(`${name} must be a positive number, got ${value}`);
  }
}

function checkChoice(name, value, choices) {
  if (value && !choices.includes(value)) {
    throw new RangeError(`${name} must be one of ${choices.join(', ')} or empty, got ${JSON.stringify(value)}`);
  }
}

module.exports = {
  ClientError,
  DEFAULT_ADDRESS,
  DEFAULT_INGEST_TIMEOUT_MS,
  DEFAULT_TIMEOUT_MS,
  FileError,
  IndexClient,
  findImages,
};
