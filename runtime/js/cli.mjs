#!/usr/bin/env node
// node runtime/js/cli.mjs EXPORT_DIR --prompt TEXT --max-new-tokens N [--temperature T --top-k K --top-p P
//   --seed S --repetition-penalty R --stop TEXT ... --steps K --threads N --stats]
// Prints the generated text as it is produced (`--temperature 0` is greedy); options left out take the
// export's `generation` defaults. --steps K: test-time depth (the step graphs where K is not unrolled). --stats:
// tokens/s on stderr. Errors: one line `error: ...`, with the Python CLI's exit codes: 2 for a usage error (an
// option checked against the same rules, SAMPLING_RULES = runtime/sampling.py RULES), 1 for a failure.
import { parseArgs } from 'node:util';

const USAGE = 'usage: node cli.mjs EXPORT_DIR --prompt TEXT --max-new-tokens N [--temperature T] [--top-k K] ' +
  '[--top-p P] [--seed S] [--repetition-penalty R] [--stop TEXT]... [--steps K] [--threads N] [--stats]';
// flag -> the rule's name (Python's option name) in SAMPLING_RULES
const NUMBERS = { 'max-new-tokens': 'max_new_tokens', temperature: 'temperature', 'top-k': 'top_k', 'top-p': 'top_p',
  seed: 'seed', 'repetition-penalty': 'repetition_penalty' };
const HELP = '(see `node cli.mjs --help`)';

function fail(message, code) {
  const line = String(message).split('\n').map((s) => s.trim()).filter(Boolean).join(' | ');
  process.stderr.write(`error: ${line}\n`);
  process.exit(code);
}

const [major] = process.versions.node.split('.').map(Number);
if (major < 20) fail(`Node.js 20 or newer is needed, this is ${process.version}`, 1);

let args;
try {
  const options = { prompt: { type: 'string' }, stop: { type: 'string', multiple: true }, steps: { type: 'string' },
    threads: { type: 'string' }, stats: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } };
  for (const k of Object.keys(NUMBERS)) options[k] = { type: 'string' };
  // As click does, `--seed -1` is an option and its value: parseArgs wants `--seed=-1` for a value with a dash.
  const argv = process.argv.slice(2), joined = [];
  for (let i = 0; i < argv.length; i++) {
    const opt = options[argv[i].slice(2)];
    if (argv[i].startsWith('--') && opt?.type === 'string' && i + 1 < argv.length) joined.push(`${argv[i]}=${argv[++i]}`);
    else joined.push(argv[i]);
  }
  args = parseArgs({ args: joined, options, allowPositionals: true });
} catch (e) { // the Python CLI's (click's) words
  const unknown = /^Unknown option '([^']*)'/.exec(e.message);
  const missing = /^Option '(--[\w-]+)[^']*' argument missing/.exec(e.message);
  const msg = unknown ? `No such option '${unknown[1]}'.` : missing ? `Option '${missing[1]}' requires an argument.` : e.message;
  fail(`${msg} ${HELP}`, 2);
}
const { values, positionals } = args;
if (values.help) {
  process.stdout.write(`${USAGE}\n`);
  process.exit(0);
}
if (positionals.length === 0) fail(`Missing argument 'EXPORT_DIR'. ${HELP}`, 2);
if (positionals.length > 1) {
  fail(`Got unexpected extra argument${positionals.length > 2 ? 's' : ''} (${positionals.slice(1).join(' ')}) ${HELP}`, 2);
}
const PY_FLOAT = { nan: NaN, '+nan': NaN, '-nan': NaN, inf: Infinity, '+inf': Infinity, '-inf': -Infinity,
  infinity: Infinity, '+infinity': Infinity, '-infinity': -Infinity }; // Python's float() spellings
const number = (flag, text, integer) => {
  const special = integer ? undefined : PY_FLOAT[text.trim().toLowerCase()];
  if (special !== undefined) return special; // the rule says why it is refused
  const v = Number(text);
  if (text.trim() === '' || !Number.isFinite(v) || (integer && !Number.isInteger(v))) {
    fail(`--${flag} must be ${integer ? 'an integer' : 'a number'}, got '${text}' ${HELP}`, 2);
  }
  return v;
};
const { SAMPLING_RULES, recoverFolder, ruleError } = await import('./ressformer.mjs');
const gen = {};
for (const [flag, name] of Object.entries(NUMBERS)) {
  if (values[flag] === undefined) continue;
  const v = number(flag, values[flag], SAMPLING_RULES[name].type === 'integer');
  const msg = ruleError(name, v, `--${flag}`, values[flag].trim());
  if (msg) fail(`${msg} ${HELP}`, 2);
  gen[SAMPLING_RULES[name].js] = v;
}
if (values.stop?.some((x) => x === '')) fail(`--stop takes a non-empty text ${HELP}`, 2);
if (values.stop) gen.stop = values.stop;
const positive = (flag) => {
  if (values[flag] === undefined) return undefined;
  const v = number(flag, values[flag], true);
  if (v < 1) fail(`--${flag} must be >= 1, got ${v} ${HELP}`, 2);
  return v;
};
const steps = positive('steps'), threads = positive('threads');
{ // EXPORT_DIR: an existing folder (after undoing an interrupted replacement), a usage error otherwise
  const { stat } = await import('node:fs/promises');
  const dir = positionals[0];
  await recoverFolder(dir);
  const st = await stat(dir).catch(() => null);
  if (!st) fail(`Invalid value for 'EXPORT_DIR': Directory '${dir}' does not exist. ${HELP}`, 2);
  if (!st.isDirectory()) fail(`Invalid value for 'EXPORT_DIR': Directory '${dir}' is a file. ${HELP}`, 2);
}
const prompt = values.prompt ?? '\n';

try {
  const ort = await import('onnxruntime-node');
  const { load } = await import('./ressformer.mjs');
  const model = await load(positionals[0], { ort, steps, threads });
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
} catch (e) { // options were checked above: whatever fails now is a failure (a bad export, a full pipe ...)
  fail(e.message ?? String(e), 1);
}
