// ReSSFormer runtime for JavaScript: the loop of docs/runtime-contract.md on the onnxruntime-common API.
//
// One dependency-free ES module. The caller passes the ONNX Runtime binding it uses (`onnxruntime-node`
// in Node, `onnxruntime-web` in a browser): the module only calls `ort.InferenceSession.create`,
// `session.run` and `new ort.Tensor`, so the same code runs on both. It mirrors the Python runtime
// (runtime/session.py, runtime/sampling.py): same checks, same errors, same sampling. Two paths, as in
// Python: unrolled (one `piece_kK` run per piece, one `segment_end_kK` run per segment end; the default
// where the export unrolled K) and steps (embed, K x step, head; K x memory at a segment's end: any K).
//
//   import * as ort from 'onnxruntime-node';
//   import { load } from './ressformer.mjs';
//   const model = await load('path/to/export', { ort });
//   for await (const text of model.generateText('Once upon', { maxNewTokens: 64, temperature: 0 })) ...

export const SIDECAR = 'ressformer.json';
export const FORMAT = 'ressformer-export';
export const KNOWN_FORMAT_VERSIONS = [3]; // 3: per-step state buffers (docs/runtime-contract.md)
// The per-step buffers of a segment's keys/values start with this many rows and grow by an eighth (at least
// MIN_CAPACITY rows, at most segment_len) when a piece does not fit: the attention scores the whole buffer,
// so the slack stays small (as the Python runtime, runtime/session.py grown_capacity).
export const MIN_CAPACITY = 64;
export const GROWTH = 8;
export const grownCapacity = (capacity, need, segmentLen) =>
  Math.min(segmentLen, Math.max(need, capacity + Math.max(MIN_CAPACITY, Math.floor(capacity / GROWTH))));
export const KNOWN_RESSFORMER_OPSETS = [1];
export const STEP_GRAPHS = ['embed', 'step', 'head', 'memory']; // the steps path (any K); optional (--step-graphs)
export const GENERATION_FALLBACK = {
  temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 64, repetition_penalty: 1.0, stop: [],
};
const OPTIONS = ['maxNewTokens', 'temperature', 'topK', 'topP', 'seed', 'stop', 'repetitionPenalty'];
const IS_NODE = typeof process !== 'undefined' && !!process.versions?.node;

/** The export folder is missing, corrupted, or of a version this runtime does not know. */
export class ModelError extends Error {
  constructor(message) { super(message); this.name = 'ModelError'; }
}

// ---- loading ------------------------------------------------------------------------------------

/**
 * Load an export folder: a path (Node) or a URL (browser, or http(s) in Node). options: `ort` (the
 * ONNX Runtime module, required), `steps` (K; default: the trained K), `path` ('unrolled' | 'steps';
 * default: unrolled where the export unrolled K, else steps), `threads` (intra-op threads, Node),
 * `verifyHashes` (default true), `sessionOptions` (merged into ONNX Runtime's), `executionProviders`.
 */
export async function load(source, options = {}) {
  const { ort, steps, path, threads, verifyHashes = true, sessionOptions = {}, executionProviders } = options;
  if (!ort || typeof ort.InferenceSession?.create !== 'function' || typeof ort.Tensor !== 'function') {
    throw new TypeError('load(source, { ort }): pass the ONNX Runtime module (onnxruntime-node or onnxruntime-web)');
  }
  for (const k of Object.keys(options)) {
    if (!['ort', 'steps', 'path', 'threads', 'verifyHashes', 'sessionOptions', 'executionProviders'].includes(k)) {
      throw new TypeError(`unknown load option '${k}'`);
    }
  }
  if (threads !== undefined && !(Number.isInteger(threads) && threads >= 1)) {
    throw new RangeError(`threads must be a positive integer, got ${threads}`);
  }
  const files = await folder(source);
  const text = await files.text(SIDECAR);
  const meta = await checkSidecar(text, files.where(SIDECAR));
  const trained = Number(meta.steps);
  const K = steps === undefined ? trained : steps;
  if (!Number.isInteger(K) || K < 1) throw new RangeError(`steps must be a positive integer (K, the recurrent depth), got ${K}`);
  if (path !== undefined && !['unrolled', 'steps'].includes(path)) {
    throw new RangeError(`unknown path '${path}'; use one of unrolled, steps`);
  }
  const names = meta.unrolled[String(K)];
  if (path === 'unrolled' && !names) {
    throw new RangeError(`this export has unrolled graphs for K in [${Object.keys(meta.unrolled)}], not ${K}; ` +
      "use path 'steps' or re-export with --steps");
  }
  const chosen = path ?? (names ? 'unrolled' : 'steps');
  if (chosen === 'steps' && !STEP_GRAPHS.every((n) => n in meta.graphs)) {
    throw new RangeError(`this export has no step graphs, so it runs K in [${Object.keys(meta.unrolled)}] only, ` +
      `not K=${K} on the steps path; re-export with --step-graphs (any K) or --steps ${K}`);
  }
  const roles = chosen === 'unrolled' ? [['init', 'init'], ['piece', names.piece], ['end', names.segment_end]]
    : [['init', 'init'], ['embed', 'embed'], ['step', 'step'], ['head', 'head'], ['memory', 'memory']];
  // no CPU memory arena: it keeps a prefill's peak allocations (rounded up) for the session's life
  // (Python runtime: peak RSS 351 -> 296 MB after 2,048 tokens at `base` int4, speed unchanged)
  const base = { graphOptimizationLevel: 'all', logSeverityLevel: 3, enableCpuMemArena: false, ...sessionOptions };
  if (executionProviders) base.executionProviders = executionProviders;
  if (threads) Object.assign(base, { intraOpNumThreads: threads, interOpNumThreads: 1 });
  const graphs = {};
  for (const [role, name] of roles) {
    const g = meta.graphs[name];
    if (!g) throw new ModelError(`${files.where(SIDECAR)} names no graph for ['${name}']`);
    const bytes = await files.bytes(g.file, `graph file ${g.file} (${name}) is missing from ${files.where('')}`);
    const extra = bytes.length < g.bytes ? await files.bytes(`${g.file}.data`,
      `graph file ${g.file} (${name}) is truncated (${bytes.length} of ${g.bytes} bytes, no ${g.file}.data); ` +
      're-export the checkpoint') : null;
    if (verifyHashes && g.sha256 && await sha256Hex(extra ? [bytes, extra] : [bytes]) !== g.sha256) {
      throw new ModelError(`graph file ${g.file} (${name}) is corrupted: sha256 differs from ${SIDECAR}`);
    }
    if (!g.file.endsWith('.ort')) {
      for (const v of ressformerOpsetVersions(bytes)) {
        if (!KNOWN_RESSFORMER_OPSETS.includes(v)) {
          throw new ModelError(`${g.file} uses ressformer op-set version ${v}; this runtime knows versions ` +
            `[${KNOWN_RESSFORMER_OPSETS}]`);
        }
      }
    }
    // The hot graph's idle workers may spin; the others' may not (runtime/session.py explains why).
    const hot = role === 'piece' || role === 'step';
    const opts = hot ? base : { ...base, extra: { session: { intra_op: { allow_spinning: '0' } } } };
    try {
      // External data (weights over 1.8 GB) needs the path: Node only.
      graphs[role] = await ort.InferenceSession.create(extra ? files.path(g.file) : bytes, opts);
    } catch (e) {
      throw new ModelError(`ONNX Runtime cannot load ${g.file}: ${e.message ?? e}`);
    }
  }
  return new ReSSFormer(meta, graphs, ort, K, chosen);
}

/** Read access to an export folder: a filesystem path in Node, else a URL read with fetch. */
async function folder(source) {
  if (source instanceof URL) source = source.href;
  if (typeof source !== 'string' || !source) throw new TypeError('source must be a folder path or URL');
  if (IS_NODE && !/^(https?|blob|data):/i.test(source)) {
    const fs = await import('node:fs/promises');
    const path = await import('node:path');
    const url = await import('node:url');
    const dir = source.startsWith('file:') ? url.fileURLToPath(source) : source;
    await recoverFolder(dir);
    const st = await fs.stat(dir).catch(() => null);
    if (!st?.isDirectory()) throw new ModelError(`export folder ${dir} does not exist or is not a folder`);
    const read = async (name, missing) => {
      try { return new Uint8Array(await fs.readFile(path.join(dir, name))); } catch (e) {
        if (e.code === 'ENOENT') throw new ModelError(missing);
        throw e;
      }
    };
    return {
      where: (name) => path.join(dir, name),
      path: (name) => path.join(dir, name),
      bytes: read,
      text: async (name) => new TextDecoder().decode(
        await read(name, `${dir} has no ${name}: not a ressformer export folder (make one with \`ressformer export CHECKPOINT --out FOLDER\`)`)),
    };
  }
  const baseUrl = new URL(source.endsWith('/') ? source : `${source}/`, globalThis.location?.href);
  const get = async (name, missing) => {
    const url = new URL(name, baseUrl);
    let r;
    try { r = await fetch(url); } catch (e) { throw new ModelError(`cannot fetch ${url}: ${e.message ?? e}`); }
    if (r.status === 404) throw new ModelError(missing);
    if (!r.ok) throw new ModelError(`cannot fetch ${url}: HTTP ${r.status}`);
    return r;
  };
  return {
    where: (name) => new URL(name, baseUrl).href,
    path: (name) => { throw new ModelError(`${name} keeps its weights in external data, loaded in Node only`); },
    bytes: async (name, missing) => new Uint8Array(await (await get(name, missing)).arrayBuffer()),
    text: async (name) => (await get(name, `${baseUrl.href} has no ${name}: not a ressformer export folder (make one with \`ressformer export CHECKPOINT --out FOLDER\`)`)).text(),
  };
}

/**
 * Put back the backup an interrupted replacement of `dir` left (Node). Writers (ressformer/fsutil.py,
 * `replace_dir`) rename NAME to `.NAME.old-PID`, then the new folder to NAME; one killed in between leaves
 * only the backup. Same rule as fsutil.recover and runtime/sidecar.py recover_folder: only when NAME is
 * missing, only a backup whose writer is no longer running.
 */
export async function recoverFolder(dir) {
  const fs = await import('node:fs/promises');
  const path = await import('node:path');
  const final = path.resolve(dir);
  if (await fs.lstat(final).then(() => true, () => false)) return;
  const names = await fs.readdir(path.dirname(final)).catch(() => []);
  for (const name of names) {
    const m = /^\.(.+)\.old-(\d+)$/.exec(name);
    if (!m || m[1] !== path.basename(final)) continue;
    let alive = Number(m[2]) === process.pid;
    try { if (!alive) { process.kill(Number(m[2]), 0); alive = true; } } catch (e) { alive = e.code === 'EPERM'; }
    if (alive) continue;
    await fs.rename(path.join(path.dirname(final), name), final).catch(() => {}); // another reader may win
    return;
  }
}

/** Parse and check the sidecar: format, op-set version, required fields, model_sha256. */
export async function checkSidecar(text, where = SIDECAR) {
  let meta;
  try { meta = JSON.parse(text); } catch (e) {
    throw new ModelError(`${where} is corrupted: ${e.message}; re-export the checkpoint`);
  }
  if (meta === null || typeof meta !== 'object' || Array.isArray(meta)) {
    throw new ModelError(`${where} is not a ressformer sidecar (a JSON object is expected); re-export the checkpoint`);
  }
  const oldest = Math.min(...KNOWN_FORMAT_VERSIONS);
  if (meta.format === FORMAT && Number.isInteger(meta.format_version) && meta.format_version < oldest) {
    throw new ModelError(`${where}: export format version ${meta.format_version} is older than this runtime's ` +
      `${Math.max(...KNOWN_FORMAT_VERSIONS)} (its graphs use another state layout); re-export the checkpoint: ` +
      'ressformer export CHECKPOINT --out FOLDER');
  }
  if (meta.format !== FORMAT || !KNOWN_FORMAT_VERSIONS.includes(meta.format_version)) {
    throw new ModelError(`${where}: unknown export format ${JSON.stringify(meta.format)} version ` +
      `${JSON.stringify(meta.format_version)}; this runtime reads ${FORMAT} [${KNOWN_FORMAT_VERSIONS}] ` +
      '(re-export the checkpoint with this version)');
  }
  const ops = meta.ressformer_opset;
  if (!ops || typeof ops !== 'object' || !KNOWN_RESSFORMER_OPSETS.includes(ops.version)) {
    throw new ModelError(`${where}: unknown ressformer op-set version ${JSON.stringify(ops?.version ?? ops)}; ` +
      `this runtime knows versions [${KNOWN_RESSFORMER_OPSETS}]`);
  }
  for (const key of ['config', 'graphs', 'steps', 'tokenizer', 'checkpoint_sha256', 'unrolled', 'model_sha256']) {
    if (!(key in meta)) throw new ModelError(`${where} has no '${key}' entry; re-export the checkpoint`);
  }
  if (await sha256Hex([new TextEncoder().encode(canonicalModelJson(text))]) !== meta.model_sha256) {
    throw new ModelError(`${where} was edited: its model fields no longer match model_sha256 (only the ` +
      "'generation' defaults may be edited); re-export the checkpoint");
  }
  for (const key of ['config', 'graphs', 'unrolled', 'tokenizer']) {
    if (meta[key] === null || typeof meta[key] !== 'object' || Array.isArray(meta[key])) {
      throw new ModelError(`${where}: ${key} must be a JSON object; re-export the checkpoint`);
    }
  }
  // the same graphs as runtime/sidecar.py requires (only those of the path in use are loaded); the step
  // graphs are optional (export --step-graphs), all four or none
  const stepGraphs = STEP_GRAPHS.some((n) => n in meta.graphs) ? STEP_GRAPHS : [];
  const missing = ['init', ...stepGraphs, ...Object.values(meta.unrolled).flatMap((n) => Object.values(n))]
    .filter((n) => !(n in meta.graphs));
  if (missing.length) throw new ModelError(`${where} names no graph for [${missing}]; re-export the checkpoint`);
  if (meta.tokenizer.type !== 'bytes') {
    throw new ModelError(`${where}: tokenizer.type ${JSON.stringify(meta.tokenizer.type)} is unknown; this runtime knows ['bytes']`);
  }
  meta.generation = checkGeneration('generation' in meta ? meta.generation : {}, where); // null is an error
  return meta;
}

/** The sidecar's `generation` defaults checked against SAMPLING_RULES (runtime/sidecar.py check_generation),
 * over GENERATION_FALLBACK. */
export function checkGeneration(gen, where = SIDECAR) {
  const fix = 'fix it or delete the field to use the built-in defaults';
  const known = Object.keys(GENERATION_FALLBACK);
  if (gen === null || typeof gen !== 'object' || Array.isArray(gen)) {
    throw new ModelError(`${where}: generation must be a JSON object of defaults (${known.join(', ')}), got ` +
      `${JSON.stringify(gen)}; ${fix}`);
  }
  const unknown = Object.keys(gen).filter((k) => !known.includes(k)).sort();
  if (unknown.length) {
    throw new ModelError(`${where}: generation.${unknown[0]} is not a generation option; known: ${known.join(', ')}`);
  }
  for (const [name, value] of Object.entries(gen)) {
    const label = `${where}: generation.${name}`;
    if (name === 'stop') {
      if (!Array.isArray(value) || !value.every((x) => typeof x === 'string')) {
        throw new ModelError(`${label} must be a list of strings, got ${JSON.stringify(value)}; ${fix}`);
      }
    } else {
      const msg = ruleError(name, value, label);
      if (msg) throw new ModelError(`${msg}; ${fix}`);
    }
  }
  return { ...GENERATION_FALLBACK, ...gen };
}

// ---- canonical JSON (Python's json.dumps(sort_keys=True, separators=(",", ":")), ensure_ascii) --------

/**
 * The sidecar's model fields (all but model_sha256 and generation) as the exporter hashes them. JSON.parse
 * forgets whether 10000.0 was a float, so this re-reads the text: integers stay exact (BigInt), floats are
 * written as Python's repr, strings with non-ASCII escaped as \uXXXX.
 */
export function canonicalModelJson(text) {
  let i = 0;
  const ws = () => { while (' \t\n\r'.includes(text[i]) && i < text.length) i++; };
  const fail = () => { throw new ModelError(`${SIDECAR} is corrupted: bad JSON at character ${i}`); };
  const string = () => {
    const start = i++;
    while (text[i] !== '"') { if (i >= text.length) fail(); i += text[i] === '\\' ? 2 : 1; }
    return JSON.parse(text.slice(start, ++i));
  };
  const value = (top) => {
    ws();
    const c = text[i];
    if (c === '{') {
      i++; const fields = new Map();
      ws(); if (text[i] === '}') { i++; return '{}'; }
      for (;;) {
        ws(); if (text[i] !== '"') fail();
        const k = string(); ws(); if (text[i++] !== ':') fail();
        fields.set(k, value(false)); ws();
        if (text[i] === ',') { i++; continue; }
        if (text[i++] === '}') break;
        fail();
      }
      if (top) { fields.delete('model_sha256'); fields.delete('generation'); }
      const keys = [...fields.keys()].sort();
      return `{${keys.map((k) => `${pyString(k)}:${fields.get(k)}`).join(',')}}`;
    }
    if (c === '[') {
      i++; const items = [];
      ws(); if (text[i] === ']') { i++; return '[]'; }
      for (;;) {
        items.push(value(false)); ws();
        if (text[i] === ',') { i++; continue; }
        if (text[i++] === ']') break;
        fail();
      }
      return `[${items.join(',')}]`;
    }
    if (c === '"') return pyString(string());
    for (const w of ['true', 'false', 'null', 'NaN', 'Infinity', '-Infinity']) {
      if (text.startsWith(w, i)) { i += w.length; return w; }
    }
    const m = /^-?\d+(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 64));
    if (!m) fail();
    i += m[0].length;
    return m[1] || m[2] ? pyFloat(Number(m[0])) : BigInt(m[0]).toString();
  };
  const out = value(true);
  ws();
  if (i !== text.length) fail();
  return out;
}

const pyString = (s) => JSON.stringify(s).replace(/[\u007f-\uffff]/g,
  (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);

/** Python's repr of a float: shortest round-trip digits, fixed notation for exponents -4..15. */
export function pyFloat(x) {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? 'NaN' : x > 0 ? 'Infinity' : '-Infinity';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const [mant, exp] = Math.abs(x).toExponential().split('e');
  const digits = mant.replace('.', '');
  const e = Number(exp);
  const sign = x < 0 ? '-' : '';
  if (e < -4 || e >= 16) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    return `${sign}${m}e${e < 0 ? '-' : '+'}${String(Math.abs(e)).padStart(2, '0')}`;
  }
  if (e < 0) return `${sign}0.${'0'.repeat(-e - 1)}${digits}`;
  const int = digits.slice(0, e + 1).padEnd(e + 1, '0');
  return `${sign}${int}.${digits.slice(e + 1) || '0'}`;
}

// ---- hashing ------------------------------------------------------------------------------------

/** sha256 (hex) of the concatenated chunks: node:crypto in Node, crypto.subtle in a browser's secure
 * context, else a small built-in implementation. */
export async function sha256Hex(chunks) {
  if (IS_NODE) {
    const { createHash } = await import('node:crypto');
    const h = createHash('sha256');
    for (const c of chunks) h.update(c);
    return h.digest('hex');
  }
  const all = concatBytes(chunks);
  if (globalThis.crypto?.subtle) return hex(new Uint8Array(await globalThis.crypto.subtle.digest('SHA-256', all)));
  return sha256Fallback(all);
}

function concatBytes(chunks) {
  if (chunks.length === 1) return chunks[0];
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let o = 0;
  for (const c of chunks) { out.set(c, o); o += c.length; }
  return out;
}

const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');

/** SHA-256 (FIPS 180-4) in plain JavaScript, for platforms without a crypto API. */
export function sha256Fallback(data) {
  const K = new Uint32Array(64);
  const H = new Uint32Array(8);
  const frac = (x) => ((x - Math.floor(x)) * 2 ** 32) >>> 0;
  for (let n = 2, found = 0; found < 64; n++) {
    let prime = true;
    for (let d = 2; d * d <= n; d++) if (n % d === 0) { prime = false; break; }
    if (!prime) continue;
    if (found < 8) H[found] = frac(Math.sqrt(n));
    K[found++] = frac(Math.cbrt(n));
  }
  const len = data.length;
  const padded = new Uint8Array(Math.ceil((len + 9) / 64) * 64);
  padded.set(data);
  padded[len] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(len / 2 ** 29));
  view.setUint32(padded.length - 4, (len * 8) >>> 0);
  const w = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let off = 0; off < padded.length; off += 64) {
    for (let t = 0; t < 16; t++) w[t] = view.getUint32(off + 4 * t);
    for (let t = 16; t < 64; t++) {
      const s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >>> 3);
      const s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >>> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    let [a, b, c, d, e, f, g, h] = H;
    for (let t = 0; t < 64; t++) {
      const t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[t] + w[t];
      const t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      [h, g, f, e, d, c, b, a] = [g, f, e, (d + t1) >>> 0, c, b, a, (t1 + t2) >>> 0];
    }
    [a, b, c, d, e, f, g, h].forEach((v, j) => { H[j] += v; });
  }
  return Array.from(H, (v) => v.toString(16).padStart(8, '0')).join('');
}

/** The `ressformer` op-set versions a serialized ModelProto imports (protobuf wire format: field 8). */
export function ressformerOpsetVersions(buf) {
  const out = [];
  for (const [field, v] of protoFields(buf)) {
    if (field !== 8 || !(v instanceof Uint8Array)) continue;
    let domain = '', version = 0;
    for (const [f2, v2] of protoFields(v)) {
      if (f2 === 1 && v2 instanceof Uint8Array) domain = new TextDecoder().decode(v2);
      else if (f2 === 2 && typeof v2 === 'number') version = v2;
    }
    if (domain === 'ressformer') out.push(version);
  }
  return out;
}

function* protoFields(buf) {
  let i = 0;
  const varint = () => {
    let result = 0, mul = 1;
    for (;;) {
      if (i >= buf.length) throw new ModelError('graph file is not a valid ONNX model (truncated)');
      const b = buf[i++];
      result += (b & 0x7f) * mul;
      mul *= 128;
      if (!(b & 0x80)) return result;
    }
  };
  while (i < buf.length) {
    const key = varint();
    const field = Math.floor(key / 8), wire = key % 8;
    if (wire === 0) yield [field, varint()];
    else if (wire === 2) {
      const n = varint();
      if (i + n > buf.length) throw new ModelError('graph file is not a valid ONNX model (truncated)');
      yield [field, buf.subarray(i, i + n)];
      i += n;
    } else if (wire === 1) i += 8;
    else if (wire === 5) i += 4;
    else throw new ModelError(`graph file is not a valid ONNX model (wire type ${wire})`);
  }
}

// ---- the model --------------------------------------------------------------------------------------

export class ReSSFormer {
  constructor(meta, graphs, ort, steps, path) {
    const cfg = meta.config;
    this.meta = meta;
    this.config = cfg;
    this.vocabSize = Number(cfg.vocab_size);
    this.segmentLen = Number(cfg.segment_len);
    this.cacheLen = Number(cfg.cache_len);
    this.dModel = Number(cfg.d_model);
    this.nHeads = Number(cfg.n_heads);
    this.headDim = this.dModel / this.nHeads;
    this.convWidth = Math.max(Number(cfg.conv_kernel) - 1, 0);
    this.steps = steps;
    this.path = path;
    this.generation = checkGeneration('generation' in meta ? meta.generation : {}); // as checkSidecar did
    this.fingerprint = String(meta.checkpoint_sha256).slice(0, 16);
    this.graphs = graphs;
    this.ort = ort;
  }

  /** Release the ONNX Runtime sessions. */
  async release() {
    for (const g of Object.values(this.graphs)) await g.release?.();
  }

  #emptyCacheOk() { // the piece graph's cache axis is dynamic (exports before it: cache_len rows)
    const names = this.meta.unrolled[String(this.steps)];
    const g = names && this.meta.graphs[names.piece];
    const io = g && g.inputs.find((i) => i.name === 'cache_k_0');
    return Boolean(io) && typeof io.shape[2] === 'string';
  }

  #zeros(dims) { return new this.ort.Tensor('float32', new Float32Array(dims.reduce((a, b) => a * b, 1)), dims); }
  #int64(value) { return new this.ort.Tensor('int64', BigInt64Array.of(BigInt(value)), []); }

  /** x (S, ...) -> its t-th slice (...), sharing x's data. */
  #slice(x, t) {
    const n = x.data.length / x.dims[0];
    return new this.ort.Tensor('float32', x.data.subarray(t * n, (t + 1) * n), x.dims.slice(1));
  }

  /** S tensors of equal shape (...) -> one (S, ...). */
  #stack(xs) {
    const n = xs[0].data.length, out = new Float32Array(xs.length * n);
    xs.forEach((x, t) => out.set(x.data, t * n));
    return new this.ort.Tensor('float32', out, [xs.length, ...xs[0].dims]);
  }

  /** The initial recurrent state for a batch (docs/runtime-contract.md, "The state"). */
  async initState(batch = 1) {
    if (!Number.isInteger(batch) || batch < 1) throw new RangeError(`batch must be a positive integer, got ${batch}`);
    const { nHeads: H, headDim: D, cacheLen: C, steps: S } = this;
    const r = await this.graphs.init.run({ tokens: new this.ort.Tensor('int64', new BigInt64Array(batch), [batch, 1]) });
    const unrolled = this.path === 'unrolled'; // the step graphs compute the memory's keys/values themselves
    return {
      pos: 0, conv: this.#zeros([batch, this.convWidth, this.dModel]), memory: r.memory,
      memK: unrolled ? r.mem_k : null, memV: unrolled ? r.mem_v : null,
      cacheK: this.#zeros([S, batch, H, C, D]), cacheV: this.#zeros([S, batch, H, C, D]), cacheValid: 0,
      pastK: this.#zeros([S, batch, H, 0, D]), pastV: this.#zeros([S, batch, H, 0, D]),
      owner: this.fingerprint, batch, steps: S, path: this.path,
    };
  }

  /** tokens: rows of token ids (B, T) as arrays or typed arrays, or one row. Checked: integers in
   * [0, vocab_size), equal lengths. Returns { data: BigInt64Array, batch, length }. */
  checkTokens(tokens) {
    if (tokens === null || typeof tokens !== 'object' || typeof tokens.length !== 'number') {
      throw new TypeError('tokens must be an array of token ids or of rows of token ids');
    }
    const rows = tokens.length && typeof tokens[0] === 'object' && tokens[0] !== null ? Array.from(tokens) : [tokens];
    const B = rows.length, T = rows[0]?.length ?? 0;
    if (!B || !T) throw new RangeError('tokens is empty');
    const data = new BigInt64Array(B * T);
    rows.forEach((row, b) => {
      if (row?.length !== T) throw new RangeError(`tokens rows differ in length (${row?.length} vs ${T})`);
      for (let t = 0; t < T; t++) {
        const v = row[t];
        if (!(Number.isInteger(v) || typeof v === 'bigint')) throw new TypeError(`tokens must be integer token ids, got ${v}`);
        if (v < 0 || v >= this.vocabSize) throw new RangeError(`token id ${v} out of range [0, ${this.vocabSize})`);
        data[b * T + t] = BigInt(v);
      }
    });
    return { data, batch: B, length: T };
  }

  #checkState(state, batch) {
    if (state === null || typeof state !== 'object' || !('pastK' in state)) {
      throw new TypeError('state must be a state from initState or forward');
    }
    if (state.owner !== this.fingerprint) throw new Error('state belongs to another model (checkpoint hash differs)');
    if (state.batch !== batch) throw new RangeError(`state has batch ${state.batch} but tokens have batch ${batch}`);
    if (state.steps !== this.steps) throw new RangeError(`state was built for ${state.steps} steps, this model runs ${this.steps}`);
    if (state.path !== this.path) throw new RangeError(`state was built for the ${state.path} path, this model runs ${this.path}`);
    const P = state.pos % this.segmentLen, cap = state.pastK?.dims?.[3];
    if (!(cap >= P && cap <= this.segmentLen)) {
      throw new RangeError(`state.pastK must hold between ${P} and ${this.segmentLen} rows at pos ${state.pos}, got ${cap}`);
    }
  }

  /**
   * tokens (B, T) -> { logits: Float32Array (B * T * vocab, row-major), dims: [B, T, vocab], state }. Any T:
   * pieces are cut at segment boundaries and the memory is updated at each segment's end. A state passed
   * in keeps its values (rows of its buffers past pos mod segment_len may be written: they are ignored).
   * options.logits: 'all' (default) or 'last': only the last position's, dims [B, 1, V] (a prefill's
   * memory is then bounded by one segment whatever T).
   */
  async forward(tokens, state = null, { logits: which = 'all' } = {}) {
    if (!['all', 'last'].includes(which)) throw new RangeError(`logits must be 'all' or 'last', got ${which}`);
    const { data, batch: B, length: T } = this.checkTokens(tokens);
    let s = state ?? await this.initState(B);
    this.#checkState(s, B);
    const V = this.vocabSize, L = this.segmentLen;
    const last = which === 'last';
    const logits = new Float32Array(B * (last ? 1 : T) * V);
    for (let i = 0; i < T;) {
      const n = Math.min(T - i, L - (s.pos % L));
      const piece = new BigInt64Array(B * n);
      for (let b = 0; b < B; b++) piece.set(data.subarray(b * T + i, b * T + i + n), b * n);
      const run = this.path === 'unrolled' ? this.#pieceUnrolled : this.#pieceSteps;
      let lg;
      ({ logits: lg, state: s } = await run.call(this, new this.ort.Tensor('int64', piece, [B, n]), s));
      for (let b = 0; b < B; b++) {
        if (last) logits.set(lg.subarray(((b + 1) * n - 1) * V, (b + 1) * n * V), b * V);
        else logits.set(lg.subarray(b * n * V, (b + 1) * n * V), (b * T + i) * V);
      }
      i += n;
    }
    return { logits, dims: [B, last ? 1 : T, V], state: s };
  }

  /** One piece through piece_kK (per step: the cache and the segment's buffer, fed as views, no copy);
   * the piece's new keys/values are appended to the buffers; at a segment's end, segment_end_kK. */
  async #pieceUnrolled(tokens, s) {
    const T = tokens.dims[1], fed = this.#feed(s, T);
    const feeds = {
      tokens, pos: this.#int64(s.pos), conv: s.conv, mem_k: s.memK, mem_v: s.memV, cache_valid: this.#int64(s.cacheValid),
    };
    // a first segment (cacheValid 0) feeds caches of 0 rows where the graph takes them (axis `cache`):
    // nothing to score in an all-masked cache
    const noCache = s.cacheValid === 0 && this.#emptyCacheOk();
    const none = noCache ? this.#zeros([tokens.dims[0], this.nHeads, 0, this.headDim]) : null;
    for (let t = 0; t < this.steps; t++) {
      feeds[`cache_k_${t}`] = noCache ? none : this.#slice(s.cacheK, t);
      feeds[`cache_v_${t}`] = noCache ? none : this.#slice(s.cacheV, t);
      feeds[`past_k_${t}`] = this.#slice(fed.K, t);
      feeds[`past_v_${t}`] = this.#slice(fed.V, t);
    }
    const r = await this.graphs.piece.run(feeds, ['logits', 'conv_out', 'new_k', 'new_v']);
    s = { ...this.#appended(s, fed, r.new_k.data, r.new_v.data, T), conv: r.conv_out };
    if (s.pos % this.segmentLen === 0) { // the segment is complete: the buffers hold it, (S, B, H, L, D)
      const e = await this.graphs.end.run({ memory: s.memory, seg_k: s.pastK, seg_v: s.pastV });
      s = { ...s, memory: e.memory_out, memK: e.mem_k_out, memV: e.mem_v_out, cacheK: e.cache_k_out,
        cacheV: e.cache_v_out, ...this.#emptySegment(s) };
    }
    return { logits: r.logits.data, state: s };
  }

  /** One piece through embed, K x step, head; at a segment's end, K x memory (the steps in order). */
  async #pieceSteps(tokens, s) {
    const g = this.graphs, T = tokens.dims[1], P = s.pos % this.segmentLen;
    const e = await g.embed.run({ tokens, conv: s.conv });
    const pos = this.#int64(s.pos), valid = this.#int64(s.cacheValid);
    let h = e.h;
    const nk = [], nv = [];
    for (let t = 0; t < this.steps; t++) {
      const r = await g.step.run({
        h, step: this.#int64(t), pos, memory: s.memory, cache_k: this.#slice(s.cacheK, t),
        cache_v: this.#slice(s.cacheV, t), cache_valid: valid, past_k: this.#rows(this.#slice(s.pastK, t), 0, P),
        past_v: this.#rows(this.#slice(s.pastV, t), 0, P),
      }, ['h_out', 'present_k', 'present_v']);
      h = r.h_out;
      nk.push(this.#rows(r.present_k, P, P + T));
      nv.push(this.#rows(r.present_v, P, P + T));
    }
    const logits = (await g.head.run({ h })).logits.data;
    s = { ...this.#appended(s, this.#feed(s, T), this.#stack(nk).data, this.#stack(nv).data, T), conv: e.conv_out };
    if (s.pos % this.segmentLen === 0) {
      let memory = s.memory;
      const ck = [], cv = [];
      for (let t = 0; t < this.steps; t++) {
        const r = await g.memory.run({ memory, seg_k: this.#slice(s.pastK, t), seg_v: this.#slice(s.pastV, t) },
          ['memory_out', 'cache_k_out', 'cache_v_out']);
        memory = r.memory_out;
        ck.push(r.cache_k_out);
        cv.push(r.cache_v_out);
      }
      s = { ...s, memory, cacheK: this.#stack(ck), cacheV: this.#stack(cv), ...this.#emptySegment(s) };
    }
    return { logits, state: s };
  }

  /** x (..., R, D) -> a copy of its rows [from, to): (..., to - from, D). */
  #rows(x, from, to) {
    const R = x.dims.at(-2), D = x.dims.at(-1), n = x.data.length / (R * D), w = (to - from) * D;
    const out = new Float32Array(n * w);
    for (let i = 0; i < n; i++) out.set(x.data.subarray(i * R * D + from * D, i * R * D + to * D), i * w);
    return new this.ort.Tensor('float32', out, [...x.dims.slice(0, -2), to - from, D]);
  }

  /** The buffers (S, B, H, capacity, D) a piece of T tokens reads (rows P = pos mod segment_len on are
   * ignored): the state's, claimed for appending in place if the state is the latest one written to
   * them and they have room; at a segment's start, new ones. Returns { K, V, tip (or null) }. */
  #feed(s, T) {
    const [S, B, H, cap, D] = s.pastK.dims, tip = s.tip, P = s.pos % this.segmentLen;
    if (cap === 0) {
      const c = Math.min(this.segmentLen, Math.max(T, MIN_CAPACITY)), dims = [S, B, H, c, D];
      const fresh = { K: this.#zeros(dims), V: this.#zeros(dims), n: -1 };
      return { K: fresh.K, V: fresh.V, tip: fresh };
    }
    if (tip && tip.K === s.pastK && tip.V === s.pastV && tip.n === P && cap >= P + T) {
      tip.n = -1; // claimed until the piece's rows are written: a state forked at P appends into a copy
      return { K: s.pastK, V: s.pastV, tip };
    }
    return { K: s.pastK, V: s.pastV, tip: null };
  }

  /** The state advanced by a piece of T tokens whose keys/values (S, B, H, T, D) go to rows P.. of the
   * claimed buffers, else of new ones (grownCapacity: an eighth more, at most segment_len) holding a copy of the P
   * valid rows. So a state keeps its values: advancing an older state again appends into a copy. */
  #appended(s, fed, newK, newV, T) {
    const L = this.segmentLen, P = s.pos % L;
    let tip = fed.tip;
    if (!tip) {
      const [S, B, H, cap0, D] = fed.K.dims, cap = grownCapacity(cap0, P + T, L);
      const copy = (src) => {
        const dst = new Float32Array(S * B * H * cap * D);
        for (let r = 0; r < S * B * H; r++) dst.set(src.subarray(r * cap0 * D, (r * cap0 + P) * D), r * cap * D);
        return new this.ort.Tensor('float32', dst, [S, B, H, cap, D]);
      };
      tip = { K: copy(fed.K.data), V: copy(fed.V.data), n: -1 };
    }
    const [S, B, H, cap, D] = tip.K.dims;
    for (let r = 0; r < S * B * H; r++) {
      tip.K.data.set(newK.subarray(r * T * D, (r + 1) * T * D), (r * cap + P) * D);
      tip.V.data.set(newV.subarray(r * T * D, (r + 1) * T * D), (r * cap + P) * D);
    }
    tip.n = P + T;
    return { ...s, pos: s.pos + T, pastK: tip.K, pastV: tip.V, tip };
  }

  #emptySegment(s) {
    const empty = [this.steps, s.batch, this.nHeads, 0, this.headDim];
    return { cacheValid: this.cacheLen, pastK: this.#zeros(empty), pastV: this.#zeros(empty), tip: null };
  }

  /** The export's generation defaults (sidecar `generation`) overridden by options, checked. */
  generationOptions(options = {}) {
    for (const k of Object.keys(options)) {
      if (!OPTIONS.includes(k)) throw new TypeError(`unknown generation option '${k}'; use one of ${OPTIONS.join(', ')}`);
    }
    const g = this.generation;
    const pick = (k, py) => (options[k] === undefined || options[k] === null ? g[py] : options[k]);
    const o = {
      maxNewTokens: pick('maxNewTokens', 'max_new_tokens'), temperature: pick('temperature', 'temperature'),
      topK: pick('topK', 'top_k'), topP: pick('topP', 'top_p'), stop: pick('stop', 'stop'),
      repetitionPenalty: pick('repetitionPenalty', 'repetition_penalty'), seed: options.seed ?? null,
    };
    for (const name of ['temperature', 'top_k', 'top_p', 'max_new_tokens', 'repetition_penalty', 'seed']) {
      const msg = ruleError(name, o[SAMPLING_RULES[name].js]);
      if (msg) throw new RangeError(msg);
    }
    if (!Array.isArray(o.stop) || !o.stop.every((s) => typeof s === 'string' || s instanceof Uint8Array)) {
      throw new TypeError(`stop must be an array of strings or Uint8Arrays, got ${JSON.stringify(o.stop)}`);
    }
    o.stop = o.stop.map((s) => (typeof s === 'string' ? new TextEncoder().encode(s) : s)).filter((s) => s.length);
    return o;
  }

  /**
   * Yield new token ids one at a time (batch 1). prompt: a string (UTF-8 bytes) or token ids. options:
   * maxNewTokens, temperature (0 = greedy), topK, topP, seed, stop (strings or byte arrays; the stop
   * sequence is part of the output), repetitionPenalty; left out, the export's defaults.
   */
  async* generate(prompt, options = {}) {
    const o = this.generationOptions(options);
    const ids = typeof prompt === 'string' ? Array.from(new TextEncoder().encode(prompt)) : Array.from(prompt ?? []);
    if (!ids.length) throw new RangeError('prompt is empty: generation needs at least one token');
    const rng = makeRng(o.seed);
    let { logits, state } = await this.forward([ids], null, { logits: 'last' });
    let last = logits;
    const seen = new Set(ids.map(Number));
    const longest = Math.max(0, ...o.stop.map((s) => s.length));
    const tail = [];
    for (let n = 0; n < o.maxNewTokens; n++) {
      const z = o.repetitionPenalty !== 1 ? penalize(last, seen, o.repetitionPenalty) : last;
      const t = sampleToken(z, o.temperature === 0 ? 0 : rng(), o);
      yield t;
      seen.add(t);
      if (longest) {
        tail.push(t);
        if (tail.length > longest) tail.shift();
        if (o.stop.some((s) => s.length <= tail.length && s.every((x, j) => tail[tail.length - s.length + j] === x))) {
          return;
        }
      }
      if (n + 1 === o.maxNewTokens) return;
      ({ logits, state } = await this.forward([[t]], state));
      last = logits;
    }
  }

  /** Like generate, yielding decoded text as soon as characters complete (invalid UTF-8 becomes U+FFFD;
   * as in Python, an incomplete character at the very end is not yielded). */
  async* generateText(prompt, options = {}) {
    const dec = new TextDecoder('utf-8');
    for await (const t of this.generate(prompt, options)) {
      const s = dec.decode(Uint8Array.of(t), { stream: true });
      if (s) yield s;
    }
  }

  /** Bits per byte of a text (a string: its UTF-8 bytes) or of bytes (runtime/session.py score_stream):
   * { bytes, predicted, nllNats, bitsPerByte, perplexity }. One segment's logits at a time. */
  async score(input) {
    const data = typeof input === 'string' ? new TextEncoder().encode(input) : input;
    if (!(data instanceof Uint8Array)) throw new TypeError('score takes a string or a Uint8Array');
    if (data.length < 2) throw new RangeError('need at least 2 bytes to score');
    const V = this.vocabSize;
    let state = null, prev = null, nll = 0, count = 0;
    for (let i = 0; i < data.length; i += this.segmentLen) {
      const ids = data.subarray(i, i + this.segmentLen);
      const r = await this.forward([ids], state);
      state = r.state;
      if (prev) { nll -= prev[ids[0]]; count++; } // the previous piece's last position predicts this byte
      for (let t = 0; t + 1 < ids.length; t++) {
        nll -= logSoftmax(r.logits.subarray(t * V, (t + 1) * V))[ids[t + 1]];
        count++;
      }
      prev = logSoftmax(r.logits.subarray((ids.length - 1) * V));
    }
    const bpb = nll / count / Math.LN2;
    return { bytes: count + 1, predicted: count, nllNats: nll, bitsPerByte: bpb, perplexity: Math.exp(nll / count) };
  }
}

// ---- sampling (runtime/sampling.py) ---------------------------------------------------------------

/** The generation options' rules: the same table as RULES in runtime/sampling.py (the tests compare them).
 * type: 'number' (finite) | 'integer'; min/max (null: unbounded); min_open: min excluded; js: the option's
 * name here; must: the message's words; limits: what the extremes mean. */
export const SAMPLING_RULES = {
  temperature: { type: 'number', min: 0, min_open: false, max: null, js: 'temperature',
    must: 'a finite number >= 0 (0 = greedy)',
    limits: '0: greedy (argmax, lowest id on ties); a tiny value samples among the tied maxima; a huge one tends to uniform' },
  top_k: { type: 'integer', min: 0, min_open: false, max: null, js: 'topK',
    must: 'an integer >= 0 (0 = no top-k filter)',
    limits: '0 or >= the vocabulary: no filter; ties with the k-th logit are kept' },
  top_p: { type: 'number', min: 0, min_open: true, max: 1, js: 'topP',
    must: 'in (0, 1] (1 = no nucleus filter)',
    limits: '1: no filter; a tiny value keeps the most probable token (lowest id on ties)' },
  repetition_penalty: { type: 'number', min: 0, min_open: true, max: null, js: 'repetitionPenalty',
    must: 'a finite number > 0 (1 = no penalty)',
    limits: '1: none; the penalized logits are clamped to the float32 range' },
  max_new_tokens: { type: 'integer', min: 0, min_open: false, max: null, js: 'maxNewTokens',
    must: 'an integer >= 0', limits: '0: nothing is generated' },
  seed: { type: 'integer', min: 0, min_open: false, max: null, js: 'seed',
    must: 'an integer >= 0', limits: 'None (left out): a random seed' },
};
const F32_MAX = 3.4028234663852886e38;

/** The message for a value that breaks SAMPLING_RULES[name] (null if valid); label names it to the user, shown is
 * the value as typed (runtime/sampling.py rule_error). */
export function ruleError(name, value, label = SAMPLING_RULES[name].js, shown = undefined) {
  const r = SAMPLING_RULES[name];
  if (name === 'seed' && value === null) return null;
  let ok = r.type === 'integer' ? Number.isSafeInteger(value) || typeof value === 'bigint'
    : typeof value === 'number' && Number.isFinite(value);
  if (ok) {
    ok = (r.min === null || (r.min_open ? value > r.min : value >= r.min)) && (r.max === null || value <= r.max);
  }
  if (ok) return null;
  return `${label} must be ${r.must}, got ${shown ?? (typeof value === 'string' ? `'${value}'` : String(value))}`;
}

/** Throw naming the first bad sampling option. */
export function checkSampling({ temperature, topK, topP }) {
  for (const [name, value] of [['temperature', temperature], ['top_k', topK], ['top_p', topP]]) {
    const msg = ruleError(name, value);
    if (msg) throw new RangeError(msg);
  }
}

/**
 * One token from logits (V): temperature 0 = argmax (lowest id on ties); otherwise (logits - max) / temperature
 * (<= 0: a tiny temperature gives -Infinity, never Infinity - Infinity), keep the topK largest (0 = all),
 * softmax, keep the smallest most probable set with mass >= topP, renormalize; u (uniform in [0, 1)) picks
 * the number of ids whose cumulative probability is <= u (at most the last id with a nonzero probability).
 */
export function sampleToken(logits, u, { temperature = 1, topK = 0, topP = 1 } = {}) {
  checkSampling({ temperature, topK, topP });
  const V = logits.length;
  if (temperature === 0) {
    let best = 0;
    for (let i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
    return best;
  }
  let max = -Infinity;
  for (const x of logits) if (x > max) max = x;
  const z = Float64Array.from(logits, (x) => (x - max) / temperature);
  if (topK && topK < V) {
    const kth = Float64Array.from(z).sort()[V - topK];
    for (let i = 0; i < V; i++) if (z[i] < kth) z[i] = -Infinity;
  }
  const p = z.map((x) => Math.exp(x)); // the maxima are exp(0) = 1: the sum is >= 1
  normalize(p);
  if (topP < 1) {
    const order = Array.from(p.keys()).sort((a, b) => p[b] - p[a] || a - b);
    let cum = 0;
    const keep = new Uint8Array(V);
    for (const i of order) { cum += p[i]; keep[i] = cum - p[i] < topP; }
    for (let i = 0; i < V; i++) if (!keep[i]) p[i] = 0;
    normalize(p);
  }
  // the number of ids whose cumulative probability is <= u, at most the last id with p > 0 (runtime/sampling.py)
  let below = 0, cum = 0, last = 0;
  for (let i = 0; i < V; i++) { cum += p[i]; if (cum <= u) below++; if (p[i] > 0) last = i; }
  return Math.min(below, last);
}

function normalize(p) {
  let s = 0;
  for (const x of p) s += x;
  for (let i = 0; i < p.length; i++) p[i] /= s;
}

/** CTRL-style repetition penalty: seen tokens' positive logits / penalty, negative ones * penalty, clamped to
 * the float32 range (an extreme penalty stays finite). */
export function penalize(logits, seen, penalty) {
  const out = Float64Array.from(logits);
  for (const t of seen) {
    out[t] = Math.min(Math.max(out[t] > 0 ? out[t] / penalty : out[t] * penalty, -F32_MAX), F32_MAX);
  }
  return out;
}

function logSoftmax(row) {
  let max = -Infinity, s = 0;
  for (const x of row) if (x > max) max = x;
  for (const x of row) s += Math.exp(x - max);
  const lse = Math.log(s);
  return Float64Array.from(row, (x) => x - max - lse);
}

/**
 * A seeded uniform generator in [0, 1) (SplitMix64, 53-bit floats). The JavaScript runtime's own: a seed
 * gives the same tokens in Node and in a browser, not the same as Python's numpy generator. seed null:
 * seeded from the platform's randomness.
 */
export function makeRng(seed = null) {
  const M = (1n << 64n) - 1n;
  let s = seed === null ? BigInt(Math.floor(Math.random() * 2 ** 53)) : BigInt(seed) & M;
  return () => {
    s = (s + 0x9e3779b97f4a7c15n) & M;
    let z = s;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & M;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & M;
    z ^= z >> 31n;
    return Number(z >> 11n) / 2 ** 53;
  };
}
