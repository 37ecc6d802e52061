#!/usr/bin/env node
'use strict';
// The `imgsearch-node` command line: ingest folders, search with an image, and print stats, as JSON.

const { parseArgs } = require('node:util');

const {
  ClientError,
  DEFAULT_ADDRESS,
  DEFAULT_INGEST_TIMEOUT_MS,
  DEFAULT_TIMEOUT_MS,
  FileError,
  IndexClient,
  findImages,
} = require('../src/client');

const EXIT_OK = 0;
const EXIT_ITEM_FAILED = 1;
const EXIT_USAGE = 2;
const EXIT_FILE = 3;
const EXIT_CALL_FAILED = 4;
const EXIT_INTERNAL = 70;
const DEFAULT_K = 10;

const HELP = `Usage: imgsearch-node COMMAND [ARGUMENTS] [OPTIONS]

A client of the imgsearch index service. Results go to stdout as JSON, errors to stderr.

Commands:
  ingest PATH...           Stream the image files, and the images in folders (searched recursively),
                           to the index. Prints one JSON line per image in order, with its status
                           "added", "already_present" or "failed", then one summary line.
  search IMAGE [-k N]      Find the stored images closest to an image file. Prints
                           {"neighbours": [...]}, best first; score is the cosine similarity.
  search --item-id ID      The same, with a stored item's embedding as the query.
  stats                    Print the collection's item count, dim, model and index settings.

Options:
  --addr HOST:PORT         Address of the index service (default: ${DEFAULT_ADDRESS}).
  -k N                     Maximum number of neighbours; 0 means the server's default (default: ${DEFAULT_K}).
  --item-id ID             Search with the stored item ID instead of an image file.
  --timeout SECONDS        Deadline of the call (default: ${DEFAULT_TIMEOUT_MS / 1000} for search and stats,
                           ${DEFAULT_INGEST_TIMEOUT_MS / 1000} for the whole ingest stream).
  -h, --help               Print this help.

Environment:
  IMGSEARCH_TOKEN          Bearer token sent as "authorization: Bearer <token>" with every call.

Exit status:
  0   success
  1   at least one ingested image failed; the other images were ingested
  2   invalid command line, or an invalid IMGSEARCH_TOKEN
  3   a file or folder is missing or cannot be read
  4   the call failed: the service is unreachable (UNAVAILABLE), the deadline passed
      (DEADLINE_EXCEEDED), or the service rejected the request; the message names the status code
  70  an internal error of this client; the stack trace is printed
`;

const OPTIONS = {
  addr: { type: 'string', default: DEFAULT_ADDRESS },
  k: { type: 'string', short: 'k' },
  'item-id': { type: 'string' },
  timeout: { type: 'string' },
  help: { type: 'boolean', short: 'h', default: false },
};

/** An invalid command line. The message names the wrong argument. */
class UsageError extends Error {}

/** Runs one command and returns its exit status. */
async function main(argv, env, stdout, stderr) {
  let command;
  try {
    command = parseCommand(argv, env);
  } catch (error) {
    if (!(error instanceof UsageError || error.code?.startsWith('ERR_PARSE_ARGS'))) {
      throw error;
    }
    stderr.write(`imgsearch-node: error: ${error.message}\nRun imgsearch-node --help for the usage.\n`);
    return EXIT_USAGE;
  }
  if (command.name === 'help') {
    stdout.write(HELP);
    return EXIT_OK;
  }

  const client = new IndexClient({ address: command.address, token: command.token });
  try {
    return await runCommand(client, command, stdout);
  } catch (error) {
    return reportError(error, command, stderr);
  } finally {
    client.close();
  }
}

function parseCommand(argv, env) {
  const { values, positionals } = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  if (values.help) {
    return { name: 'help' };
  }
  const [name, ...operands] = positionals;
  const command = {
    name,
    operands,
    address: parseAddress(values.addr),
    token: parseToken(env.IMGSEARCH_TOKEN ?? ''),
    timeoutMs: values.timeout === undefined ? undefined : parseSeconds(values.timeout),
    k: values.k === undefined ? DEFAULT_K : parseK(values.k),
    itemId: values['item-id'],
  };
  checkOperands(command, values);
  return command;
}

function checkOperands(command, values) {
  const { name, operands } = command;
  if (name === undefined) {
    throw new UsageError('missing command: give ingest, search or stats');
  }
  if (!['ingest', 'search', 'stats'].includes(name)) {
    throw new UsageError(`unknown command ${JSON.stringify(name)}: expected ingest, search or stats`);
  }
  if (name !== 'search' && (values.k !== undefined || values['item-id'] !== undefined)) {
    throw new UsageError('-k and --item-id go with the search command only');
  }
  if (name === 'ingest' && operands.length === 0) {
    throw new UsageError('ingest needs at least one PATH, a folder or an image file');
  }
  if (name === 'search' && operands.length + (command.itemId === undefined ? 0 : 1) !== 1) {
    throw new UsageError('search needs either one IMAGE file or --item-id, not both or neither');
  }
  if (name === 'stats' && operands.length > 0) {
    throw new UsageError(`stats takes no arguments, got ${JSON.stringify(operands[0])}`);
  }
}

function parseAddress(value) {
  const match = /^(.+):(\d+)$/.exec(value);
  const port = match ? Number(match[2]) : 0;
  if (!match || port < 1 || port > 65535) {
    throw new UsageError(`--addr must be HOST:PORT with a port from 1 to 65535, got ${JSON.stringify(value)}`);
  }
  return value;
}

function parseToken(token) {
  if (token !== '' && !/^[!-~]+$/.test(token)) {
    throw new UsageError(
      'IMGSEARCH_TOKEN must be printable ASCII without spaces or control characters ' +
        '(the value itself is not shown, because it is a secret)',
    );
  }
  return token;
}

function parseSeconds(value) {
  const seconds = Number(value);
  if (value.trim() === '' || !Number.isFinite(seconds) || seconds <= 0) {
    throw new UsageError(`--timeout must be a positive number of seconds, got ${JSON.stringify(value)}`);
  }
  return seconds * 1000;
}

function parseK(value) {
  if (!/^\d+$/.test(value) || Number(value) > 2 ** 32 - 1) {
    throw new UsageError(`-k must be a whole number from 0 to ${2 ** 32 - 1}, got ${JSON.stringify(value)}`);
  }
  return Number(value);
}

async function runCommand(client, command, stdout) {
  if (command.name === 'ingest') {
    return ingest(client, command, stdout);
  }
  if (command.name === 'search') {
    const query = command.itemId === undefined ? { imagePath: command.operands[0] } : { itemId: command.itemId };
    const neighbours = await client.search(query, { k: command.k, timeoutMs: command.timeoutMs });
    stdout.write(`${JSON.stringify({ neighbours }, null, 2)}\n`);
    return EXIT_OK;
  }
  const stats = await client.stats({ timeoutMs: command.timeoutMs });
  stdout.write(`${JSON.stringify(stats, null, 2)}\n`);
  return EXIT_OK;
}

async function ingest(client, command, stdout) {
  const files = await findImages(command.operands);
  const counts = { added: 0, already_present: 0, failed: 0 };
  let done = 0;
  try {
    for await (const outcome of client.ingest(files, { timeoutMs: command.timeoutMs })) {
      counts[outcome.status] = (counts[outcome.status] ?? 0) + 1;
      done += 1;
      stdout.write(`${JSON.stringify(outcome)}\n`);
    }
  } catch (error) {
    if (error instanceof ClientError) {
      error.message = `ingest stopped after ${done} of ${files.length} images: ${error.message}`;
    }
    throw error;
  }
  stdout.write(`${JSON.stringify({ summary: true, total: files.length, ...counts })}\n`);
  return counts.failed > 0 ? EXIT_ITEM_FAILED : EXIT_OK;
}

function reportError(error, command, stderr) {
  if (error instanceof FileError) {
    stderr.write(`imgsearch-node: error: ${error.message}\n`);
    return EXIT_FILE;
  }
  if (error instanceof ClientError) {
    stderr.write(`imgsearch-node: error: ${command.name} failed: ${error.message}${hintFor(error, command)}\n`);
    return EXIT_CALL_FAILED;
  }
  stderr.write(`imgsearch-node: internal error: ${error.stack ?? error}\n`);
  return EXIT_INTERNAL;
}

function hintFor(error, command) {
  if (error.codeName === 'UNAVAILABLE') {
    return `\nCheck that the index service runs at ${command.address}, or pass its address with --addr.`;
  }
  if (error.codeName === 'DEADLINE_EXCEEDED') {
    return '\nThe service did not answer in time; pass a longer --timeout.';
  }
  if (error.codeName === 'UNAUTHENTICATED') {
    return "\nSet IMGSEARCH_TOKEN to the service's token.";
  }
  return '';
}

if (require.main === module) {
  // A reader that goes away, as `imgsearch-node stats | head -1` does, is not a failure of the command.
  process.stdout.on('error', (error) => {
    if (error.code !== 'EPIPE') {
      throw error;
    }
    process.exit(EXIT_OK);
  });
  main(process.argv.slice(2), process.env, process.stdout, process.stderr).then(
    (status) => {
      process.exitCode = status;
    },
    (error) => {
      process.stderr.write(`imgsearch-node: internal error: ${error.stack ?? error}\n`);
      process.exitCode = EXIT_INTERNAL;
    },
  );
}

module.exports = { main };
