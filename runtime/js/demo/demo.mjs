// The browser demo: loads an export folder over HTTP with onnxruntime-web (single-threaded WebAssembly, so
// no cross-origin isolation is needed) and streams generated text into the page with tokens/s.
// URL parameters fill the form (export, prompt, tokens, temperature, seed, top_k, top_p); auto=1 starts at
// once. When a run ends, #result holds its JSON (text, token ids, timings) and <body data-done> is set:
// the test (tests/test_js.py) reads them.
import * as ort from '../node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';
import { load } from '../ressformer.mjs';

ort.env.wasm.wasmPaths = new URL('../node_modules/onnxruntime-web/dist/', import.meta.url).href;
ort.env.wasm.numThreads = 1;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
for (const [k, v] of params) if ($(k)?.tagName === 'INPUT') $(k).value = v;

let model = null, loadedFrom = null;

// A macrotask boundary without setTimeout's 4 ms clamp for nested timers.
const channel = new MessageChannel();
const waiting = [];
channel.port1.onmessage = () => waiting.shift()?.();
const nextTask = () => new Promise((resolve) => { waiting.push(resolve); channel.port2.postMessage(0); });

async function run() {
  const status = $('status'), out = $('out');
  delete document.body.dataset.done;
  out.textContent = '';
  const result = { ok: false };
  try {
    const source = new URL($('export').value, location.href).href;
    if (loadedFrom !== source) {
      status.textContent = `loading ${source} ...`;
      const t = performance.now();
      model = await load(source, { ort });
      loadedFrom = source;
      result.loadMs = performance.now() - t;
    }
    const prompt = $('prompt').value;
    const options = { maxNewTokens: Number($('tokens').value), temperature: Number($('temperature').value),
      topK: Number($('top_k').value), topP: Number($('top_p').value), seed: Number($('seed').value) };
    const shown = document.createElement('span');
    shown.className = 'prompt';
    shown.textContent = prompt;
    const generated = document.createTextNode('');
    out.append(shown, generated);
    const dec = new TextDecoder('utf-8');
    const ids = [];
    let text = '';
    const t0 = performance.now();
    let first = 0;
    for await (const id of model.generate(prompt, options)) {
      const now = performance.now();
      if (!ids.length) first = now;
      ids.push(id);
      text += dec.decode(Uint8Array.of(id), { stream: true });
      generated.data = text;
      const rate = ids.length > 1 ? (ids.length - 1) / ((now - first) / 1000) : 0;
      status.textContent = `${ids.length} tokens · ${rate.toFixed(1)} tokens/s · first token ${(first - t0).toFixed(0)} ms`;
      await nextTask(); // let the page paint the new text
    }
    const end = performance.now();
    const rate = ids.length > 1 ? (ids.length - 1) / ((end - first) / 1000) : 0;
    status.textContent = `done: ${ids.length} tokens · ${rate.toFixed(1)} tokens/s (decode) · first token ` +
      `${(first - t0).toFixed(0)} ms · onnxruntime-web ${ort.env.versions?.web ?? ''} (wasm, 1 thread)`;
    Object.assign(result, { ok: true, ids, text, pageText: generated.data, tokensPerSecond: rate,
      firstTokenMs: first - t0 });
  } catch (e) {
    status.textContent = `error: ${e.message ?? e}`;
    result.error = String(e.message ?? e);
  }
  $('result').textContent = JSON.stringify(result);
  document.body.dataset.done = result.ok ? 'ok' : 'error';
}

$('form').addEventListener('submit', (e) => { e.preventDefault(); run(); });
if (params.get('auto') === '1') run();
