#!/usr/bin/env node
// Decode speed of the JavaScript runtime in Node: node bench.mjs EXPORT_DIR [--tokens N] [--threads T]
// [--backend node|web] [--repeats R]. Greedy decoding of N tokens after a short prompt, R times in one
// process; prints one JSON line per run: { backend, tokens, decodeTokensPerSecond, firstTokenMs }. decode =
// (N - 1) tokens after the first, over the time from the first token to the last (the definition bench/js_speed.py
// uses for Python and the browser demo too). On onnxruntime-web the first run is slow ("cold"): V8 starts
// WebAssembly on its baseline compiler and optimizes hot functions while they run.
import { parseArgs } from 'node:util';
import { load } from './ressformer.mjs';

const { values, positionals } = parseArgs({
  options: { tokens: { type: 'string', default: '200' }, threads: { type: 'string', default: '1' },
    backend: { type: 'string', default: 'node' }, repeats: { type: 'string', default: '2' },
    prompt: { type: 'string', default: 'Once upon a time' } },
  allowPositionals: true,
});
if (positionals.length !== 1 || !['node', 'web'].includes(values.backend)) {
  process.stderr.write('usage: node bench.mjs EXPORT_DIR [--tokens N] [--threads T] [--backend node|web] [--repeats R]\n');
  process.exit(2);
}
const ort = values.backend === 'node' ? await import('onnxruntime-node') : await import('onnxruntime-web');
if (values.backend === 'web') ort.env.wasm.numThreads = Number(values.threads);
const model = await load(positionals[0], { ort, threads: values.backend === 'node' ? Number(values.threads) : undefined });
const n = Number(values.tokens);
for (let r = 0; r < Number(values.repeats); r++) {
  const t0 = performance.now();
  let first = 0, count = 0, last = 0;
  for await (const _ of model.generate(values.prompt, { maxNewTokens: n, temperature: 0 })) {
    last = performance.now();
    if (count++ === 0) first = last;
  }
  console.log(JSON.stringify({ backend: `onnxruntime-${values.backend}`, threads: Number(values.threads), tokens: count,
    decodeTokensPerSecond: (count - 1) / ((last - first) / 1000), firstTokenMs: first - t0 }));
}
await model.release();
