// A Sluice egress client in Node.js with grpc-js defaults: list, verify, pull with a resume.
//
//   node pull.js --target 127.0.0.1:PORT --model NAME --public-key release-signing.pub \
//       --protos ../../../protos --out model.onnx [--file model.onnx] [--deadline-s 60]
//
// Prints a JSON summary on stdout and exits 0, or names what failed on stderr and exits 1.
// The channel takes no options on purpose: the gateway must work with every default,
// the 4 MiB receive limit included (a larger message ends the call in RESOURCE_EXHAUSTED).

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import canonicalize from 'canonicalize';

const MANIFEST_FORMAT = 'sluice.release/2';
const DEFAULT_MAX_RECEIVE_BYTES = 4 * 1024 * 1024; // grpc-js's, and every other stack's

class CheckFailed extends Error {}

function check(ok, message) {
  if (!ok) throw new CheckFailed(message);
}

function loadEgressService(protosDir) {
  // Protos resolve their imports from the include root, as protoc does.
  const definition = protoLoader.loadSync('sluice/v1/egress.proto', {
    includeDirs: [protosDir],
    keepCase: true,
    longs: String, // uint64 as decimal strings: no silent rounding past 2**53
    defaults: true,
    oneofs: true,
    bytes: Buffer,
  });
  return grpc.loadPackageDefinition(definition).sluice.v1.EgressService;
}

function deadline(seconds) {
  return { deadline: Date.now() + seconds * 1000 };
}

function unary(client, method, request, seconds) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(seconds), (err, response) => {
      if (err) reject(new CheckFailed(`${method} failed: ${grpcError(err)}`));
      else resolve(response);
    });
  });
}

function grpcError(err) {
  const name = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) ?? err.code;
  return `${name}: ${err.details || err.message}`;
}

// One PullRelease call: its header and chunks; with stopAfterChunks, the client cancels the
// call once it has that many chunks, as a client that drops mid-download would.
function pullRelease(client, request, seconds, stopAfterChunks = Infinity) {
  const serialize = client.PullRelease.responseSerialize;
  return new Promise((resolve, reject) => {
    const got = { header: null, chunks: [], maxMessageBytes: 0, stopped: false };
    let settled = false;
    const settle = (fn, value) => {
      if (!settled) {
        settled = true;
        fn(value);
      }
    };
    const call = client.PullRelease(request, deadline(seconds));
    call.on('data', (msg) => {
      if (got.stopped) return;
      // The message as it travelled: it arrived, so it fit the default receive limit.
      got.maxMessageBytes = Math.max(got.maxMessageBytes, serialize(msg).length);
      if (msg.kind === 'header') {
        if (got.header !== null || got.chunks.length > 0) {
          settle(reject, new CheckFailed('PullRelease: a header that is not the first message'));
          call.cancel();
          return;
        }
        got.header = msg.header;
      } else if (msg.kind === 'chunk') {
        if (got.header === null) {
          settle(reject, new CheckFailed('PullRelease: a chunk before the header'));
          call.cancel();
          return;
        }
        got.chunks.push({ offset: Number(msg.chunk.offset), data: msg.chunk.data });
        if (got.chunks.length >= stopAfterChunks) {
          got.stopped = true;
          call.cancel();
        }
      } else {
        settle(reject, new CheckFailed(`PullRelease: a message with no header or chunk`));
        call.cancel();
      }
    });
    call.on('error', (err) => {
      if (got.stopped && err.code === grpc.status.CANCELLED) settle(resolve, got);
      else settle(reject, new CheckFailed(`PullRelease ${JSON.stringify(request)}: ${grpcError(err)}`));
    });
    call.on('end', () => settle(resolve, got));
  });
}

function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      target: { type: 'string' },
      model: { type: 'string' },
      'public-key': { type: 'string' },
      protos: { type: 'string' },
      out: { type: 'string' },
      file: { type: 'string', default: 'model.onnx' },
      'deadline-s': { type: 'string', default: '60' },
    },
  });
  for (const name of ['target', 'model', 'public-key', 'protos', 'out']) {
    check(values[name], `missing --${name}`);
  }
  return values;
}

async function main(argv) {
  const opts = parseOptions(argv);
  const seconds = Number(opts['deadline-s']);
  const EgressService = loadEgressService(path.resolve(opts.protos));
  const client = new EgressService(opts.target, grpc.credentials.createInsecure()); // defaults
  try {
    return await pullAndVerify(client, opts, seconds);
  } finally {
    client.close();
  }
}

async function pullAndVerify(client, opts, seconds) {
  const { model, file } = opts;

  // 1. The release, newest first.
  const listed = await unary(client, 'ListReleases', { model }, seconds);
  const release = listed.releases.find((r) => r.model === model);
  check(release, `ListReleases: no release of ${model} among ${listed.releases.length}`);
  check(!release.withheld, `ListReleases: ${model} v${release.version} is withheld by the gateway`);
  const version = release.version;
  const listedFile = release.files.find((f) => f.name === file);
  check(listedFile, `ListReleases: ${model} v${version} lists no file ${file}`);

  // 2. The manifest: signed by the gateway's key, and RFC 8785 canonical byte for byte.
  const m = await unary(client, 'GetManifest', { model, version }, seconds);
  const manifestBytes = m.manifest_json;
  const publicKeyPem = fs.readFileSync(opts['public-key']);
  check(m.signature.length > 0, 'GetManifest: the manifest is not signed');
  const signatureValid = crypto.verify(null, manifestBytes, publicKeyPem, m.signature);
  check(signatureValid, `GetManifest: the signature does not verify with ${opts['public-key']}`);
  let doc;
  try {
    doc = JSON.parse(manifestBytes.toString('utf8'));
  } catch (err) {
    throw new CheckFailed(`GetManifest: manifest_json is not JSON: ${err.message}`);
  }
  const recanonical = Buffer.from(canonicalize(doc), 'utf8');
  const canonical = recanonical.equals(manifestBytes);
  check(canonical, `GetManifest: manifest_json is not RFC 8785 canonical: first difference at ` +
    `byte ${firstDifference(recanonical, manifestBytes)}`);
  check(doc.format === MANIFEST_FORMAT, `manifest format ${doc.format}, expected ${MANIFEST_FORMAT}`);
  check(doc.model === model && String(doc.version) === version,
    `asked for ${model} v${version}, the signed manifest is ${doc.model} v${doc.version}`);
  const signedFile = (doc.files ?? []).find((f) => f.name === file);
  check(signedFile, `the signed manifest lists no file ${file}`);

  // 3. The file: the first chunk, a dropped call, then the rest resumed from that offset.
  const request = { model, version, file, offset: '0' };
  const first = await pullRelease(client, request, seconds, 1);
  check(first.header, 'PullRelease: no header');
  check(first.chunks.length === 1 && first.chunks[0].offset === 0,
    `PullRelease: expected one chunk at offset 0, got ${first.chunks.map((c) => c.offset)}`);
  const total = Number(first.header.total_bytes);
  const resumeAt = first.chunks[0].data.length;
  check(resumeAt > 0 && resumeAt < total,
    `the first chunk holds ${resumeAt} of ${total} bytes: nothing left to resume`);
  const rest = await pullRelease(client, { ...request, offset: String(resumeAt) }, seconds);
  check(rest.header, 'resumed PullRelease: no header');
  check(rest.header.total_bytes === first.header.total_bytes &&
    rest.header.sha256 === first.header.sha256 && rest.header.version === version,
    'resumed PullRelease: its header differs from the first pull\'s');

  const digest = crypto.createHash('sha256');
  const parts = [];
  let received = 0;
  for (const chunk of [...first.chunks, ...rest.chunks]) {
    check(chunk.offset === received, `chunk at offset ${chunk.offset}, expected ${received}`);
    digest.update(chunk.data);
    parts.push(chunk.data);
    received += chunk.data.length;
  }
  const sha256 = digest.digest('hex');
  check(received === total, `received ${received} bytes, the header announced ${total}`);
  check(received === Number(signedFile.size),
    `received ${received} bytes, the signed manifest says ${signedFile.size}`);
  check(sha256 === first.header.sha256,
    `sha256 ${sha256} of the pulled bytes, the header announced ${first.header.sha256}`);
  check(sha256 === signedFile.sha256,
    `sha256 ${sha256} of the pulled bytes, the signed manifest says ${signedFile.sha256}`);
  const maxMessageBytes = Math.max(first.maxMessageBytes, rest.maxMessageBytes);
  check(maxMessageBytes <= DEFAULT_MAX_RECEIVE_BYTES,
    `a PullRelease message of ${maxMessageBytes} bytes exceeds the default receive limit`);
  fs.writeFileSync(opts.out, Buffer.concat(parts));

  return {
    client: `@grpc/grpc-js ${grpcVersion()}, default channel options`,
    model,
    version: Number(version),
    file,
    release_found: true,
    manifest_format: doc.format,
    signature_valid: signatureValid,
    canonical,
    size: received,
    sha256,
    header_sha256: first.header.sha256,
    manifest_sha256: signedFile.sha256,
    sha256_match: sha256 === first.header.sha256 && sha256 === signedFile.sha256,
    resumed_at: resumeAt,
    chunks: first.chunks.length + rest.chunks.length,
    max_chunk_bytes: Math.max(...[...first.chunks, ...rest.chunks].map((c) => c.data.length)),
    max_message_bytes: maxMessageBytes,
    max_receive_bytes: DEFAULT_MAX_RECEIVE_BYTES,
    out: opts.out,
  };
}

function firstDifference(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

function grpcVersion() {
  const url = new URL('node_modules/@grpc/grpc-js/package.json', import.meta.url);
  return JSON.parse(fs.readFileSync(url, 'utf8')).version;
}

try {
  const summary = await main(process.argv.slice(2));
  process.stdout.write(JSON.stringify(summary) + '\n');
} catch (err) {
  const why = err instanceof CheckFailed ? err.message : (err.stack ?? String(err));
  process.stderr.write(`pull.js: FAILED: ${why}\n`);
  process.exitCode = 1;
}
