'use strict';
// Runs the real embed and index services as child processes on 127.0.0.1 ports that they pick.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const readline = require('node:readline');

const REPO_ROOT = path.resolve(__dirname, '..', '..', '..', '..');
// The Python with the imgsearch package installed; IMGSEARCH_PYTHON overrides the project's venv.
const PYTHON = process.env.IMGSEARCH_PYTHON || path.join(REPO_ROOT, '.venv', 'bin', 'python');
const MODEL_DIR = path.join(REPO_ROOT, 'models', 'tiny-clip-random');
const STARTUP_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 15_000;

/**
 * Starts the embed service with the tiny random CLIP, then the index service in front of it.
 *
 * Both listen on 127.0.0.1 port 0 and report the port they bound in their JSON log lines, so no
 * port is guessed. The index service requires `token` as a bearer token. Logs go to
 * `logDir/{embed,index}.log`. Returns `{indexAddress, stop}`; stop() resolves to the exit codes.
 */
async function startServices({ dataDir, logDir, token }) {
  const embed = new ServiceProcess('embed', logDir, {
    IMGSEARCH_EMBED_LISTEN: '127.0.0.1:0',
    IMGSEARCH_EMBED_BACKEND: 'onnx',
    IMGSEARCH_EMBED_MODEL_DIR: MODEL_DIR,
    IMGSEARCH_EMBED_GRACE_S: '1',
  });
  const services = [embed];
  try {
    const embedEvents = await embed.waitFor(['embed_server_started', 'embed_service_ready']);
    const index = new ServiceProcess('index', logDir, {
      IMGSEARCH_INDEX_LISTEN: '127.0.0.1:0',
      IMGSEARCH_INDEX_EMBED_ADDR: `127.0.0.1:${embedEvents.embed_server_started.port}`,
      IMGSEARCH_INDEX_DATA_DIR: dataDir,
      IMGSEARCH_INDEX_AUTH_TOKEN: token,
      IMGSEARCH_INDEX_GRACE_S: '1',
    });
    services.push(index);
    const indexEvents = await index.waitFor(['server_started']);
    return {
      indexAddress: `127.0.0.1:${indexEvents.server_started.port}`,
      stop: () => stopAll(services),
    };
  } catch (error) {
    await stopAll(services);
    throw error;
  }
}

async function stopAll(services) {
  const codes = [];
  // The index service goes first, because it calls the embed service.
  for (const service of [...services].reverse()) {
    codes.push(await service.stop());
  }
  return codes;
}

/** One service process, whose stderr JSON log lines are copied to a file and watched for events. */
class ServiceProcess {
  constructor(service, logDir, settings) {
    this.service = service;
    this.logPath = path.join(logDir, `${service}.log`);
    this._log = fs.createWriteStream(this.logPath);
    this._events = new Map();
    this._listeners = new Set();
    this._child = spawn(PYTHON, ['-m', 'imgsearch_client.cli', 'serve', service], {
      cwd: REPO_ROOT,
      env: { ...environmentWithoutImgsearch(), ...settings },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this._exited = new Promise((resolve) => {
      this._child.on('exit', (code, signal) => resolve(code ?? signal));
      // A process that cannot start emits 'error' and never 'exit'.
      this._child.on('error', (error) => resolve(`could not start ${PYTHON}: ${error.message}`));
    });
    readline.createInterface({ input: this._child.stderr }).on('line', (line) => this._readLine(line));
  }

  /** Resolves to the log records of every event in `names`, by name, once the service has logged them all. */
  waitFor(names) {
    return new Promise((resolve, reject) => {
      let exitCode;
      const timer = setTimeout(() => finish(`did not log ${names.join(' and ')} within ${STARTUP_TIMEOUT_MS} ms`),
        STARTUP_TIMEOUT_MS);
      const check = () => {
        if (names.every((name) => this._events.has(name))) {
          finish(null);
        } else if (exitCode !== undefined) {
          finish(`ended (${exitCode}) before it logged ${names.join(' and ')}`);
        }
      };
      const finish = (problem) => {
        clearTimeout(timer);
        this._listeners.delete(check);
        if (problem === null) {
          resolve(Object.fromEntries(names.map((name) => [name, this._events.get(name)])));
        } else {
          reject(new Error(`the ${this.service} service ${problem}; see ${this.logPath}`));
        }
      };
      this._exited.then((code) => {
        exitCode = code;
        check();
      });
      this._listeners.add(check);
      check();
    });
  }

  /** Sends SIGTERM, waits for the exit (SIGKILL after STOP_TIMEOUT_MS) and resolves to the exit code. */
  async stop() {
    this._child.kill('SIGTERM');
    const timer = setTimeout(() => this._child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    const code = await this._exited;
    clearTimeout(timer);
    this._log.end();
    return code;
  }

  _readLine(line) {
    this._log.write(`${line}\n`);
    let record;
    try {
      record = JSON.parse(line);
    } catch {
      return;
    }
    if (typeof record.event === 'string' && !this._events.has(record.event)) {
      this._events.set(record.event, record);
      this._notify();
    }
  }

  _notify() {
    for (const listener of [...this._listeners]) {
      listener();
    }
  }
}

/** Copies this process's environment without IMGSEARCH_* settings, which would change the services. */
function environmentWithoutImgsearch() {
  return Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('IMGSEARCH_')));
}

module.exports = { REPO_ROOT, startServices };
