// The Python runtime's reference values (tests/js_reference.py), each naming its export folder.
// tests/test_js.py sets RESSFORMER_REFERENCES (comma-separated reference.json paths); without it
// (`npm test` on its own) tests/js_reference.py builds them once with the repository's Python
// (RESSFORMER_PYTHON, else ../../.venv/bin/python, else python3) under the system's temp folder
// (`ressformer-js-reference`; delete it to rebuild). `npm test` runs this file first, so that the test
// files, which node runs in parallel processes, find the references built.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

function build() {
  const root = join(tmpdir(), 'ressformer-js-reference');
  const list = join(root, 'references.txt');
  if (!existsSync(list)) {
    const venv = join(here, '..', '..', '..', '.venv', 'bin', 'python');
    const python = process.env.RESSFORMER_PYTHON ?? (existsSync(venv) ? venv : 'python3');
    execFileSync(python, [join(here, '..', '..', '..', 'tests', 'js_reference.py'), root], { stdio: ['ignore', 'ignore', 'inherit'] });
  }
  return readFileSync(list, 'utf8');
}

export const references = (process.env.RESSFORMER_REFERENCES || build()).split(',')
  .map((p) => JSON.parse(readFileSync(p, 'utf8')));
/** The first reference's export: the tests that need any export use it. */
export const exportDir = references[0].export;
export const reference = references[0];

/** max |a - b| over two equal-length numeric sequences. */
export function maxAbsDiff(a, b) {
  if (a.length !== b.length) throw new Error(`lengths differ: ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}
