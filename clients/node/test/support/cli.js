'use strict';
// Runs the imgsearch-node command line in a child process, as a user would.

const { execFile } = require('node:child_process');
const path = require('node:path');

const CLI = path.resolve(__dirname, '..', '..', 'bin', 'imgsearch-node.js');

/**
 * Runs the CLI with `args` and resolves to `{status, stdout, stderr}`, where status is the exit code.
 *
 * The child gets this process's environment without IMGSEARCH_TOKEN, plus `env`.
 */
function runCli(args, env = {}) {
  const { IMGSEARCH_TOKEN: _token, ...inherited } = process.env;
  return new Promise((resolve) => {
    const options = { env: { ...inherited, ...env }, timeout: 60_000 };
    execFile(process.execPath, [CLI, ...args], options, (error, stdout, stderr) => {
      const status = error ? (error.code ?? error.signal) : 0;
      resolve({ status, stdout, stderr });
    });
  });
}

/** Parses text that has one JSON value per line. */
function jsonLines(text) {
  return text.trim().split('\n').map((line) => JSON.parse(line));
}

module.exports = { CLI, jsonLines, runCli };
