#!/usr/bin/env node
import { buildProgram, EXIT } from '../cli/program.js';
import { StorageError } from '../errors.js';
import { runServer } from './run-server.js';
import { runWorker } from './run-worker.js';

// The one place that reads process.env and wires the process; everything else takes it as input.
let exitCode: number = EXIT.ok;
const program = buildProgram(
  { env: process.env, cwd: process.cwd(), out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s), isTTY: Boolean(process.stderr.isTTY) },
  (code) => { exitCode = code; },
  { runWorker, runServer },
);
program.exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : EXIT.usage));
try {
  await program.parseAsync(process.argv);
  process.exitCode = exitCode;
} catch (err) {
  process.stderr.write(`stevedore: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(err instanceof StorageError && err.code !== 'InvalidInput' ? EXIT.failed : EXIT.usage);
}
