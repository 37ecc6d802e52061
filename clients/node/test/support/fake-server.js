'use strict';
// A grpc-js IndexService on 127.0.0.1 with handlers from each test, for silences and early ends that
// real services rarely show.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const { REPO_ROOT } = require('./services');

/**
 * Starts a server with the given IndexService handlers (grpc-js style, keyed by RPC name) and
 * resolves to `{address, stop}`. RPCs without a handler return UNIMPLEMENTED.
 */
async function startFakeServer(handlers) {
  const definition = protoLoader.loadSync('imgsearch/index/v1/index_service.proto', {
    includeDirs: [path.join(REPO_ROOT, 'protos')],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const { IndexService } = grpc.loadPackageDefinition(definition).imgsearch.index.v1;
  const server = new grpc.Server();
  server.addService(IndexService.service, handlers);
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (error, boundPort) => {
      if (error) {
        reject(error);
      } else {
        resolve(boundPort);
      }
    });
  });
  return { address: `127.0.0.1:${port}`, stop: () => server.forceShutdown() };
}

module.exports = { startFakeServer };
