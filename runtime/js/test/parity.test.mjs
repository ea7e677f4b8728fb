// Parity with the Python runtime (tests/js_reference.py): logits fed whole and token by token across
// segments, greedy generation, bits per byte, sampling decisions; on onnxruntime-node and on
// onnxruntime-web (its WebAssembly backend, run in Node).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as ortNode from 'onnxruntime-node';
import * as ortWeb from 'onnxruntime-web';
import { load, sampleToken } from '../ressformer.mjs';
import { maxAbsDiff, references } from './reference.mjs';

ortWeb.env.wasm.numThreads = 1;
const BACKENDS = [['onnxruntime-node', ortNode], ['onnxruntime-web', ortWeb]];

for (const ref of references) {
  const tag = `tiny export ${ref.export.split(/[\\/]/).slice(-2).join('/')}`;
  const tol = ref.tolerance;

  for (const [backend, ort] of BACKENDS) {
    test(`${tag}, ${backend}: logits equal the Python runtime's, whole and token by token`, async () => {
      const model = await load(ref.export, { ort, threads: backend === 'onnxruntime-node' ? 1 : undefined });
      const T = ref.tokens.length;
      assert.ok(T > 2 * model.segmentLen, 'the reference spans at least two segment ends');
      const whole = await model.forward([ref.tokens]);
      assert.deepEqual(whole.dims, [1, T, 256]);
      const dWhole = maxAbsDiff(whole.logits, ref.logits_whole.flat());
      let state = null;
      const steps = [];
      for (const t of ref.tokens) {
        const r = await model.forward([[t]], state);
        state = r.state;
        steps.push(...r.logits);
      }
      const dSteps = maxAbsDiff(steps, ref.logits_steps.flat());
      console.log(`# ${tag}, ${backend}: ${T} positions, max |logit JS - Python|: whole ` +
        `${dWhole.toExponential(2)}, token by token ${dSteps.toExponential(2)} (tolerance ${tol}; Python's ` +
        `own whole vs token by token ${ref.python_whole_vs_steps.toExponential(2)})`);
      assert.ok(dWhole <= tol, `whole: max abs difference ${dWhole} > ${tol}`);
      assert.ok(dSteps <= tol, `token by token: max abs difference ${dSteps} > ${tol}`);
      assert.equal(state.pos, T);
      await model.release();
    });

    test(`${tag}, ${backend}: greedy generation gives the Python runtime's 128 tokens and text`, async () => {
      const model = await load(ref.export, { ort });
      const run = async (options) => {
        const out = [];
        for await (const t of model.generate(ref.prompt, { maxNewTokens: 128, temperature: 0, ...options })) out.push(t);
        return out;
      };
      const toks = await run({});
      assert.equal(toks.length, 128);
      assert.deepEqual(toks, ref.greedy);
      assert.deepEqual(await run({ repetitionPenalty: 1.3 }), ref['greedy_penalized_1.3']);
      let text = '';
      for await (const s of model.generateText(ref.prompt, { maxNewTokens: 128, temperature: 0 })) text += s;
      assert.equal(text, ref.greedy_text);
      await model.release();
    });
  }

  test(`${tag}: the step-graph path (trained K and K + 1) equals the Python runtime's`, async () => {
    for (const [k, want] of Object.entries(ref.steps_path)) {
      const model = await load(ref.export, { ort: ortNode, threads: 1, steps: Number(k), path: 'steps' });
      assert.equal(model.path, 'steps');
      const whole = await model.forward([ref.tokens]);
      const d = maxAbsDiff(whole.logits, want.logits_whole.flat());
      console.log(`# ${tag}, steps path K=${k}: max |logit JS - Python| ${d.toExponential(2)}`);
      assert.ok(d <= tol, `K=${k}: max abs difference ${d} > ${tol}`);
      const toks = [];
      for await (const t of model.generate(ref.prompt, { maxNewTokens: 40, temperature: 0 })) toks.push(t);
      assert.deepEqual(toks, want.greedy);
      await model.release();
    }
  });

  test(`${tag}: bits per byte equal the Python runtime's`, async () => {
    const model = await load(ref.export, { ort: ortNode, threads: 1 });
    const s = await model.score(ref.score_text);
    assert.equal(s.bytes, ref.score.bytes);
    assert.equal(s.predicted, ref.score.predicted);
    assert.ok(Math.abs(s.bitsPerByte - ref.score.bits_per_byte) < 1e-6, `${s.bitsPerByte} vs ${ref.score.bits_per_byte}`);
    await model.release();
  });
}

test('sampling decisions equal the Python runtime\'s for the same uniforms', () => {
  for (const c of references[0].sampling) {
    const got = sampleToken(Float32Array.from(c.logits), c.u, { temperature: c.temperature, topK: c.top_k, topP: c.top_p });
    assert.equal(got, c.token, JSON.stringify({ ...c, logits: undefined }));
  }
});
