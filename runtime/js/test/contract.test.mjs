// The contract's checks and errors (docs/runtime-contract.md), the generation options, the CLI, and the
// canonical JSON the sidecar hash is computed over.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import * as ort from 'onnxruntime-node';
import {
  ModelError, canonicalModelJson, load, makeRng, pyFloat, sampleToken, sha256Fallback,
} from '../ressformer.mjs';
import { exportDir, reference as ref, references } from './reference.mjs';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', 'cli.mjs');
const model = await load(exportDir, { ort, threads: 1 });

/** A copy of the export with the sidecar (or a file) changed by `edit`. */
function editedCopy(edit) {
  const dir = mkdtempSync(join(tmpdir(), 'ressformer-js-'));
  cpSync(exportDir, dir, { recursive: true });
  edit(dir);
  return dir;
}
// Edited as text, as a person would (re-serializing with JSON.stringify would also turn 10000.0 into
// 10000: a change of the model fields that Python refuses too).
const editSidecar = (pattern, replacement) => editedCopy((dir) => {
  const p = join(dir, 'ressformer.json');
  const text = readFileSync(p, 'utf8');
  assert.match(text, pattern);
  writeFileSync(p, text.replace(pattern, replacement));
});
async function refused(dir, pattern) {
  try {
    await assert.rejects(load(dir, { ort }), (e) => e instanceof ModelError && pattern.test(e.message));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test('loading refuses a missing folder, a missing sidecar or graph, a wrong format or op-set version', async () => {
  await assert.rejects(load(join(tmpdir(), 'no-such-export-folder'), { ort }), /does not exist or is not a folder/);
  await refused(editedCopy((d) => rmSync(join(d, 'ressformer.json'))), /has no ressformer\.json/);
  await refused(editedCopy((d) => rmSync(join(d, 'segment_end_k2.onnx'))), /segment_end_k2\.onnx .* is missing/);
  await refused(editSidecar(/"format_version": 3/, '"format_version": 4'), /unknown export format .* version 4/);
  await refused(editSidecar(/"format_version": 3/, '"format_version": 2'),
    /^[^\n]*format version 2 is older than this runtime's 3 [^\n]*; re-export the checkpoint[^\n]*$/);
  await refused(editSidecar(/"version": 1/, '"version": 2'), /unknown ressformer op-set version 2/);
  await refused(editSidecar(/"unrolled"/, '"unrolled_"'), /has no 'unrolled' entry/);
  await refused(editedCopy((d) => writeFileSync(join(d, 'ressformer.json'), '{"format": ')), /is corrupted/);
  await assert.rejects(load(exportDir, {}), /pass the ONNX Runtime module/);
  await assert.rejects(load(exportDir, { ort, steps: 3, path: 'unrolled' }), /unrolled graphs for K in \[2\], not 3/);
  await assert.rejects(load(exportDir, { ort, path: 'fast' }), /unknown path 'fast'/);
  assert.equal((await load(exportDir, { ort, steps: 3 })).path, 'steps', 'a K not unrolled runs the step graphs');
  await assert.rejects(load(exportDir, { ort, threads: 0 }), /threads must be a positive integer/);
});

test('an edited sidecar is refused (model fields), an edited generation default is accepted', async () => {
  await refused(editSidecar(/"top_k": 8/, '"top_k": 4'), /was edited: .* model_sha256/);
  await refused(editSidecar(/"rope_base": 10000.0/, '"rope_base": 10000'), /was edited/);
  const dir = editSidecar(/"generation": \{[^}]*\}/, '"generation": {"temperature": 0, "max_new_tokens": 7}');
  try {
    const m = await load(dir, { ort });
    const toks = [];
    for await (const t of m.generate(ref.prompt)) toks.push(t);
    assert.deepEqual(toks, ref.greedy.slice(0, 7), 'the edited defaults (greedy, 7 tokens) are used');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a corrupted graph file is refused by its sha256, unless hashes are not verified', async () => {
  const dir = editedCopy((d) => {
    const p = join(d, 'piece_k2.onnx');
    const b = readFileSync(p);
    b[b.length >> 1] ^= 1; // inside a weight: still a loadable model
    writeFileSync(p, b);
  });
  try {
    await assert.rejects(load(dir, { ort }), /piece_k2\.onnx \(piece_k2\) is corrupted: sha256 differs/);
    await load(dir, { ort, verifyHashes: false });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('bad tokens, states and options are refused with a clear message', async () => {
  await assert.rejects(model.forward([[1, 256]]), /token id 256 out of range \[0, 256\)/);
  await assert.rejects(model.forward([[-1]]), /token id -1 out of range/);
  await assert.rejects(model.forward([[1.5]]), /integer token ids/);
  await assert.rejects(model.forward([]), /tokens is empty/);
  await assert.rejects(model.forward([[1, 2], [3]]), /rows differ in length/);
  const { state } = await model.forward([[1, 2]]);
  await assert.rejects(model.forward([[1], [2]], state), /state has batch 1 but tokens have batch 2/);
  await assert.rejects(model.forward([[1]], { pastK: 1 }), /belongs to another model/);
  const steps = await load(exportDir, { ort, path: 'steps' });
  await assert.rejects(steps.forward([[1]], state), /state was built for the unrolled path, this model runs steps/);
  const first = (o) => model.generate('hi', o).next();
  await assert.rejects(first({ temperature: -1 }), /temperature must be a finite number >= 0/);
  await assert.rejects(first({ topK: 1.5 }), /topK must be an integer >= 0/);
  await assert.rejects(first({ topP: 0 }), /topP must be in \(0, 1\]/);
  await assert.rejects(first({ maxNewTokens: -1 }), /maxNewTokens must be an integer >= 0/);
  await assert.rejects(first({ repetitionPenalty: 0 }), /repetitionPenalty must be a finite number > 0/);
  await assert.rejects(first({ stop: 'x' }), /stop must be an array/);
  await assert.rejects(first({ seed: 'x' }), /seed must be an integer/);
  await assert.rejects(first({ top_k: 5 }), /unknown generation option 'top_k'/);
  await assert.rejects(model.generate('').next(), /prompt is empty/);
  await assert.rejects(model.score('a'), /need at least 2 bytes/);
});

test('issue 21: forward keeps only the last logits on request; the generation section is checked; tiny values sample the argmax', async () => {
  const ids = ref.tokens.slice(0, 75); // crosses two segment ends
  const all = await model.forward([ids, ids]);
  const last = await model.forward([ids, ids], null, { logits: 'last' });
  assert.deepEqual(last.dims, [2, 1, 256]);
  assert.deepEqual(last.logits.subarray(0, 256), all.logits.subarray(74 * 256, 75 * 256));
  assert.deepEqual(last.logits.subarray(256), all.logits.subarray(149 * 256, 150 * 256));
  await assert.rejects(model.forward([ids], null, { logits: 'first' }), /logits must be 'all' or 'last'/);
  for (const [gen, pattern] of [['null', /generation must be a JSON object .* got null/],
    ['{"top_p": 0}', /generation\.top_p must be in \(0, 1\]/], ['{"seed": 1}', /generation\.seed is not a generation option/]]) {
    await refused(editSidecar(/"generation": \{[^}]*\}/, `"generation": ${gen}`), pattern);
  }
  const z = Float32Array.from({ length: 256 }, (_, i) => (i === 9 ? 5 : Math.sin(i)));
  for (const temperature of [5e-324, 1e-300]) assert.equal(sampleToken(z, 0.5, { temperature }), 9);
  assert.equal(sampleToken(z, 0, { temperature: 1, topP: 5e-324 }), 9, 'u = 0 never picks a token of probability 0');
});

test('a state keeps its values through forward; pieces, whole and token by token agree', async () => {
  const ids = ref.tokens.slice(0, 40);
  const a = await model.forward([ids.slice(0, 10)]);
  const valid = (s) => Array.from({ length: 2 * 4 }, (_, r) => s.pastK.data.slice(r * s.pastK.dims[3] * 16,
    (r * s.pastK.dims[3] + s.pos % 32) * 16));  // (S B H) rows of the P valid keys (tiny: S 2, H 4, D 16)
  const before = valid(a.state);
  const b = await model.forward([ids.slice(10)], a.state); // crosses the segment end at 32
  assert.deepEqual(valid(a.state), before);
  assert.equal(b.state.pos, 40);
  const again = await model.forward([ids.slice(10, 20)], a.state); // a.state advanced twice: a copy, same numbers
  const fork = await model.forward([ids.slice(10, 12).reverse()], a.state);
  const third = await model.forward([ids.slice(10, 20)], a.state);
  assert.deepEqual(third.logits, again.logits);
  assert.deepEqual(valid(a.state), before);
  assert.notEqual(fork.state.pastK, again.state.pastK);
  const whole = await model.forward([ids]);
  let d = 0;
  for (let i = 0; i < 30 * 256; i++) d = Math.max(d, Math.abs(whole.logits[10 * 256 + i] - b.logits[i]));
  assert.ok(d <= 1e-5, `pieces vs whole: ${d}`);
  const batch = await model.forward([ids, ids]);
  assert.deepEqual(batch.dims, [2, 40, 256]);
  assert.deepEqual(batch.logits.subarray(40 * 256), batch.logits.subarray(0, 40 * 256));
});

test('seeded sampling repeats; stop sequences end generation, included in the output', async () => {
  const run = async (o) => {
    const out = [];
    for await (const t of model.generate(ref.prompt, { maxNewTokens: 24, temperature: 1, topK: 50, topP: 0.9, ...o })) {
      out.push(t);
    }
    return out;
  };
  const a = await run({ seed: 7 });
  assert.deepEqual(await run({ seed: 7 }), a);
  assert.equal(a.length, 24);
  const others = await Promise.all([1, 2, 3].map((seed) => run({ seed })));
  assert.ok(others.some((o) => o.join() !== a.join()), 'different seeds give different samples');
  const stop = Uint8Array.from(a.slice(3, 5));
  const stopped = await run({ seed: 7, stop: [stop] });
  const at = a.findIndex((_, i) => i >= 1 && a[i - 1] === stop[0] && a[i] === stop[1]);
  assert.deepEqual(stopped, a.slice(0, at + 1));
  const u = makeRng(123);
  const xs = Array.from({ length: 1000 }, u);
  assert.ok(xs.every((x) => x >= 0 && x < 1));
  assert.ok(Math.abs(xs.reduce((s, x) => s + x, 0) / 1000 - 0.5) < 0.05);
  assert.equal(sampleToken([0, 5, 5, 1], 0.3, { temperature: 0 }), 1, 'greedy: lowest id on ties');
});

test('canonical JSON and float formatting match Python\'s json.dumps; sha256 fallback matches node:crypto', () => {
  for (const [repr, value] of ref.floats) assert.equal(pyFloat(value), repr);
  assert.equal(canonicalModelJson(ref.canonical.text), ref.canonical.expected);
  for (const r of references) {
    const text = readFileSync(join(r.export, 'ressformer.json'), 'utf8');
    const digest = createHash('sha256').update(canonicalModelJson(text)).digest('hex');
    assert.equal(digest, JSON.parse(text).model_sha256);
  }
  for (const n of [0, 1, 55, 56, 63, 64, 65, 1000, 100003]) {
    const b = Uint8Array.from({ length: n }, (_, i) => (i * 7 + (i >> 8)) & 255);
    assert.equal(sha256Fallback(b), createHash('sha256').update(b).digest('hex'), `${n} bytes`);
  }
});

test('the CLI prints the greedy text; bad options exit 2 with one line, bad exports exit 1', () => {
  const cli = (...args) => spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8' });
  const r = cli(exportDir, '--prompt', ref.prompt, '--max-new-tokens', '128', '--temperature', '0', '--threads', '1');
  assert.equal(r.stderr, '');
  assert.equal(r.status, 0);
  assert.equal(r.stdout, `${ref.greedy_text}\n`);
  const s = cli(exportDir, '--prompt', 'a', '--max-new-tokens', '5', '--temperature', '0.8', '--top-k', '20',
    '--top-p', '0.9', '--seed', '3', '--stats');
  assert.equal(s.status, 0);
  assert.match(s.stderr, /5 tokens; .* decode [\d.]+ tokens\/s/);
  assert.equal(s.stdout, cli(exportDir, '--prompt', 'a', '--max-new-tokens', '5', '--temperature', '0.8',
    '--top-k', '20', '--top-p', '0.9', '--seed', '3').stdout, 'seeded runs repeat');
  for (const [args, code, pattern] of [
    [[exportDir, '--top-p', '2'], 2, /^error: --top-p must be in \(0, 1\]/],
    [[exportDir, '--temperature', 'hot'], 2, /^error: --temperature must be a number, got 'hot'/],
    [[exportDir, '--frobnicate'], 2, /^error: No such option '--frobnicate'/],
    [[], 2, /^error: Missing argument 'EXPORT_DIR'/],
    [[join(tmpdir(), 'no-such-export-folder')], 2, /^error: Invalid value for 'EXPORT_DIR': Directory .* does not exist/],
    [[exportDir, '--seed', '-1'], 2, /^error: --seed must be an integer >= 0, got -1/],
  ]) {
    const e = cli(...args);
    assert.equal(e.status, code, e.stderr);
    assert.match(e.stderr, pattern);
    assert.equal(e.stdout, '');
  }
});
