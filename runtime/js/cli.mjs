#!/usr/bin/env node
// node runtime/js/cli.mjs EXPORT_DIR --prompt TEXT --max-new-tokens N [--temperature T --top-k K --top-p P
//   --seed S --repetition-penalty R --stop TEXT ... --steps K --threads N --stats]
// Prints the generated text as it is produced (`--temperature 0` is greedy); options left out take the
// export's `generation` defaults. --steps K: test-time depth (the step graphs where K is not unrolled). --stats: tokens/s on stderr. Errors: one line; exit 2 (usage) or 1.
import { parseArgs } from 'node:util';

const USAGE = 'usage: node cli.mjs EXPORT_DIR --prompt TEXT --max-new-tokens N [--temperature T] [--top-k K] ' +
  '[--top-p P] [--seed S] [--repetition-penalty R] [--stop TEXT]... [--steps K] [--threads N] [--stats]';
const NUMBERS = { 'max-new-tokens': 'maxNewTokens', temperature: 'temperature', 'top-k': 'topK', 'top-p': 'topP',
  seed: 'seed', 'repetition-penalty': 'repetitionPenalty' };

function fail(message, code) {
  process.stderr.write(`error: ${message}\n`);
  process.exit(code);
}

const [major] = process.versions.node.split('.').map(Number);
if (major < 20) fail(`Node.js 20 or newer is needed, this is ${process.version}`, 1);

let args;
try {
  const options = { prompt: { type: 'string' }, stop: { type: 'string', multiple: true }, steps: { type: 'string' },
    threads: { type: 'string' }, stats: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } };
  for (const k of Object.keys(NUMBERS)) options[k] = { type: 'string' };
  args = parseArgs({ options, allowPositionals: true });
} catch (e) {
  fail(`${e.message}\n${USAGE}`, 2);
}
const { values, positionals } = args;
if (values.help) {
  process.stdout.write(`${USAGE}\n`);
  process.exit(0);
}
if (positionals.length !== 1) fail(`give one EXPORT_DIR\n${USAGE}`, 2);
const number = (flag, text, integer) => {
  const v = Number(text);
  if (text.trim() === '' || !Number.isFinite(v) || (integer && !Number.isInteger(v))) {
    fail(`--${flag} must be ${integer ? 'an integer' : 'a number'}, got '${text}'`, 2);
  }
  return v;
};
const gen = {};
for (const [flag, key] of Object.entries(NUMBERS)) {
  if (values[flag] !== undefined) gen[key] = number(flag, values[flag], !['temperature', 'top-p', 'repetition-penalty'].includes(flag));
}
if (values.stop) gen.stop = values.stop;
const prompt = values.prompt ?? '\n';

try {
  const ort = await import('onnxruntime-node');
  const { load } = await import('./ressformer.mjs');
  const model = await load(positionals[0], {
    ort, steps: values.steps === undefined ? undefined : number('steps', values.steps, true),
    threads: values.threads === undefined ? undefined : number('threads', values.threads, true),
  });
  const dec = new TextDecoder('utf-8');
  const t0 = performance.now();
  let first = 0, n = 0;
  for await (const t of model.generate(prompt, gen)) {
    if (n++ === 0) first = performance.now();
    process.stdout.write(dec.decode(Uint8Array.of(t), { stream: true }));
  }
  const t1 = performance.now();
  process.stdout.write('\n');
  if (values.stats) {
    const decode = n > 1 ? (n - 1) / ((t1 - first) / 1000) : 0;
    process.stderr.write(`${n} tokens; prompt + first token ${(first - t0).toFixed(1)} ms; decode ` +
      `${decode.toFixed(1)} tokens/s\n`);
  }
  await model.release();
} catch (e) {
  fail(e.message ?? String(e), e instanceof TypeError || e instanceof RangeError ? 2 : 1);
}
