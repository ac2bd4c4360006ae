#!/usr/bin/env node
// A minimal FlowFabric client in Node.js: submit an execution, claim it as a worker, complete it,
// then read the result and the execution back.
//
//   node client.js [ADDRESS] [IDEMPOTENCY_KEY]      (ADDRESS defaults to 127.0.0.1:50051)
//
// With FF_API_TOKEN set, every call carries `authorization: Bearer <token>`. On success prints one
// JSON line on stdout and exits 0; on failure prints one JSON line on stderr and exits 1.
'use strict';

const path = require('node:path');
const { randomUUID } = require('node:crypto');
const { promisify } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.join(__dirname, '..', '..', 'protos');
const CALL_TIMEOUT_MS = 10_000;

const definition = protoLoader.loadSync(
  ['flowfabric/v1/execution.proto', 'flowfabric/v1/worker.proto'],
  {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the contract (snake_case)
    longs: String, // int64/uint64 as decimal strings
    enums: String, // enum values by name, e.g. PUBLIC_STATE_COMPLETED
    bytes: Buffer,
    defaults: true,
    oneofs: true, // a oneof's case in a virtual field, e.g. response.outcome === 'task'
  },
);
const { v1 } = grpc.loadPackageDefinition(definition).flowfabric;

// google.rpc.Status and ErrorInfo, to decode the `grpc-status-details-bin` trailer.
const rpc = protobuf.parse(`
  syntax = "proto3";
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`, { keepCase: true }).root;
const Status = rpc.lookupType('Status');
const ErrorInfo = rpc.lookupType('ErrorInfo');

const address = process.argv[2] || '127.0.0.1:50051';
const idempotencyKey = process.argv[3] || `node-demo-${randomUUID()}`;

const metadata = new grpc.Metadata();
if (process.env.FF_API_TOKEN) {
  metadata.set('authorization', `Bearer ${process.env.FF_API_TOKEN}`);
}

/** `client.method(request)` as a promise, with the auth metadata and a deadline. */
function unary(client, method) {
  const call = promisify(client[method]).bind(client);
  return (request) => call(request, metadata, { deadline: Date.now() + CALL_TIMEOUT_MS });
}

async function main() {
  const credentials = grpc.credentials.createInsecure();
  const executions = new v1.ExecutionService(address, credentials);
  const workers = new v1.WorkerService(address, credentials);
  try {
    const created = await unary(executions, 'CreateExecution')({
      execution_kind: 'node-demo',
      lane_id: 'node',
      input_payload: Buffer.from(JSON.stringify({ greeting: 'hello from node' })),
      payload_encoding: 'json',
      idempotency_key: idempotencyKey,
    });
    const executionId = created[created.outcome].execution_id; // `created` or `duplicate`

    const claim = await unary(workers, 'ClaimNext')({
      worker_id: 'node-worker',
      worker_instance_id: `node-worker-${randomUUID()}`,
      lane_ids: ['node'],
      lease_ttl_ms: 30_000,
      wait_ms: 2_000,
    });
    const lease = claim.task?.lease;
    if (lease?.execution_id !== executionId) {
      throw new Error(`claimed ${lease?.execution_id ?? claim.outcome}, expected ${executionId}`);
    }

    const input = JSON.parse(claim.task.payload.toString('utf8'));
    await unary(workers, 'CompleteExecution')({
      lease,
      result_payload: Buffer.from(`${input.greeting}, done`),
      result_encoding: 'text',
    });

    const result = await unary(executions, 'GetExecutionResult')({ execution_id: executionId });
    const { execution } = await unary(executions, 'GetExecution')({ execution_id: executionId });
    console.log(JSON.stringify({
      execution_id: execution.execution_id,
      public_state: execution.public_state,
      result: result.result_payload.toString('utf8'),
    }));
  } finally {
    executions.close();
    workers.close();
  }
}

/** The error as one JSON object: gRPC code name, details, and the decoded google.rpc.Status. */
function describe(err) {
  if (err.code === undefined) return { error: String(err.message ?? err) };
  const out = { error: grpc.status[err.code] ?? err.code, code: err.code, details: err.details };
  const [raw] = err.metadata?.get('grpc-status-details-bin') ?? [];
  if (raw) {
    out.status_details = Status.decode(raw).details.map((any) => (
      any.type_url.endsWith('/google.rpc.ErrorInfo')
        ? { '@type': any.type_url, ...ErrorInfo.toObject(ErrorInfo.decode(any.value)) }
        : { '@type': any.type_url }
    ));
  }
  return out;
}

main().catch((err) => {
  console.error(JSON.stringify(describe(err)));
  process.exitCode = 1;
});
