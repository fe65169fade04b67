/** `chipmunk doctor`: can this host run chipmunk, and what to do if not. */
import type { Command } from 'commander';

import { runHostChecks } from '../../shared/host/capabilities.js';
import { doctorExitCode, doctorJson, renderDoctorTable } from '../doctor.js';
import { addJsonOption } from '../options.js';
import { printJson } from '../output.js';

export function registerDoctorCommand(program: Command): void {
  addJsonOption(program.command('doctor').description('check this host: tools, kernel features and settings chipmunk needs')).action(
    async (opts: { json?: boolean }) => {
      const checks = await runHostChecks();
      if (opts.json) printJson(doctorJson(checks));
      else process.stdout.write(`${renderDoctorTable(checks)}\n`);
      process.exitCode = doctorExitCode(checks);
    },
  );
}
