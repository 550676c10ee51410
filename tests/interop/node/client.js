// A cms client in Node.js, written from protos/ and endpoints.json alone.
//
// usage: node client.js ENDPOINTS_JSON IDENTITY TOKEN KEY_LABEL DATA_HEX
// Checks the proxy's health over mutual TLS, asks it to sign DATA with
// ECDSA_SHA256 under KEY_LABEL, and prints one JSON object with the results.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function fail(message) {
  process.stderr.write(message + '\n');
  process.exit(1);
}

const [endpointsPath, identity, token, label, dataHex] = process.argv.slice(2);
if (!dataHex) fail('usage: node client.js ENDPOINTS_JSON IDENTITY TOKEN KEY_LABEL DATA_HEX');

const endpoints = JSON.parse(fs.readFileSync(endpointsPath, 'utf8'));
const ids = endpoints.tls.identities;
if (!ids[identity]) fail(`no identity ${identity} in ${endpointsPath}`);
const credentials = grpc.credentials.createSsl(
  fs.readFileSync(endpoints.tls.ca),
  fs.readFileSync(ids[identity].key),
  fs.readFileSync(ids[identity].cert),
);

const protosDir = path.resolve(__dirname, '..', '..', '..', 'protos');
const definition = protoLoader.loadSync(
  ['cms/v1/hsm.proto', 'grpc/health/v1/health.proto'],
  { includeDirs: [protosDir], keepCase: true, enums: String, longs: String, defaults: true, oneofs: true },
);
const loaded = grpc.loadPackageDefinition(definition);
const address = endpoints.services.hsm_proxy.grpc;
const health = new loaded.grpc.health.v1.Health(address, credentials);
const hsm = new loaded.cms.v1.Hsm(address, credentials);
const deadline = () => new Date(Date.now() + 10000);

health.Check({ service: 'cms.v1.Hsm' }, { deadline: deadline() }, (err, reply) => {
  if (err) fail(`health check failed: ${err.code} ${err.details}`);
  const request = {
    key: { token: token, label: label },
    mechanism: 'ECDSA_SHA256',
    data: Buffer.from(dataHex, 'hex'),
  };
  hsm.Sign(request, { deadline: deadline() }, (err2, signed) => {
    if (err2) fail(`sign failed: ${err2.code} ${err2.details}`);
    process.stdout.write(JSON.stringify({
      health: reply.status,
      signature: Buffer.from(signed.signature).toString('hex'),
    }) + '\n');
    process.exit(0);
  });
});
