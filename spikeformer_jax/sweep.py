r"""Declared config sweeps: list, run (resumable), print launch commands, collect.

  python sweep.py list     --config=configs/spikformer.py
  python sweep.py run      --config=configs/spikformer.py --sweep=digits-small --workdir=DIR [--parallel=2]
  python sweep.py commands --config=configs/spikformer.py --sweep=timesteps --workdir=DIR   # one per point, for a scheduler
  python sweep.py collect  --workdir=DIR [--metric=test_top1] [--x=model.T]
  python sweep.py run      --config=configs/a2os2a.py --sweep=table1 --workdir=DIR --runlocal  # smoke run
  python sweep.py run      --config=configs/spikformer.py --sweep=timesteps --workdir=DIR \
      --launcher=slurm --slurm_partition=gpu --slurm_time=8:00:00 --slurm_gpus_per_point=1 [--detach]

JAX's options (`--jax_log_compiles`, `--jax_platforms=cpu`, ...) apply to
every point.

`--set KEY=VALUE` (repeatable; VALUE parsed as JSON, else a string) sets a
field in every point, e.g. `--set data.name=npz --set data.path=/data/c10.npz`;
a field a point sets itself keeps the point's value, and `list`, `run` and
`commands` print a warning naming those fields and points.
Every point is expanded and validated before anything runs. Each point trains
in DIR/<point>; rerunning `run` skips finished points and resumes interrupted
ones; a point whose directory was trained with another config is refused, not
mixed; failures are recorded in DIR/status.json and do not stop the sweep. SIGTERM
(a scheduler's stop), Ctrl-C or SIGHUP starts no new point and is passed on to the
running ones, which save their step (exit 143 / 130 / 129, as train.py; rerun to
resume). A damaged status.json or point final_metrics.json is named, moved
aside and redone, not a reason to refuse the sweep.
`commands` writes DIR/sweep.json too, so `collect` works on scheduler-launched
points. `collect` writes DIR/results.{csv,md,png}.

`--launcher=slurm` submits the unfinished points as one SLURM job array (a
task per point, `task` below), waits for them (`--detach`: returns at once; a
later `run` waits, `collect` tabulates what has finished) and records each in
status.json as the local runner does; points still queued or running in SLURM
are not submitted again. `--parallel` there caps the tasks running at once.
`task` is what each array task runs. With `--parallel=N` on a host with GPUs
or TPU chips, the local runner gives each point its own devices where there
are enough.

Installed (`pip install .`), `spikeformer-sweep` and `python -m spikeformer_jax.sweep` take
the same arguments from any directory; `--config=configs/<family>.py:VARIANT`
names the packaged config when there is no such file where it runs.
"""

import os
import signal
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from spikeformer_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

COMMANDS = ('list', 'run', 'commands', 'point', 'collect', 'task')
# The flags each command needs (`point`: what `commands` prints, one per point).
_NEEDS = {
  'list': ('config',),
  'run': ('config', 'sweep', 'workdir'),
  'commands': ('config', 'sweep', 'workdir'),
  'point': ('config', 'sweep', 'point', 'workdir'),
  'collect': ('workdir',),
  'task': ('config', 'sweep', 'point', 'workdir'),
}
# The flags that only `run --launcher=slurm` takes.
_SLURM_ONLY = (
  'detach',
  'slurm_partition',
  'slurm_time',
  'slurm_gpus_per_point',
  'slurm_cpus_per_point',
  'slurm_sbatch',
)

_CONFIG = flags.DEFINE_string(
  'config', None, 'Config file declaring the sweep (configs/x.py, no :VARIANT).'
)
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep name (see `list`).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory (one subdirectory per point).')
_PARALLEL = flags.DEFINE_integer(
  'parallel',
  1,
  '(run) Points trained at once (each on its own GPUs / TPU chips where the host has enough); '
  'with --launcher=slurm, the most array tasks running at once (default: no limit).',
)
_LAUNCHER = flags.DEFINE_enum(
  'launcher',
  'local',
  ['local', 'slurm'],
  '(run) local: the points as processes on this machine; slurm: one SLURM job array, a task '
  'per unfinished point (sbatch, squeue).',
)
_DETACH = flags.DEFINE_bool(
  'detach',
  False,
  '(run --launcher=slurm) Submit and return at once; a later `run` waits for the points, '
  '`collect` tabulates what has finished.',
)
_SLURM_PARTITION = flags.DEFINE_string(
  'slurm_partition', '', "(--launcher=slurm) Partition ('' = the cluster's default)."
)
_SLURM_TIME = flags.DEFINE_string(
  'slurm_time',
  '',
  "(--launcher=slurm) Time limit of each point, sbatch's --time (e.g. 4:00:00, 2-00:00:00; "
  "'' = the partition's default).",
)
_SLURM_GPUS = flags.DEFINE_integer(
  'slurm_gpus_per_point', 0, '(--launcher=slurm) GPUs of each point (--gres=gpu:N).'
)
_SLURM_CPUS = flags.DEFINE_integer(
  'slurm_cpus_per_point',
  0,
  "(--launcher=slurm) CPUs of each point (--cpus-per-task; 0 = the cluster's default).",
)
_SLURM_SBATCH = flags.DEFINE_multi_string(
  'slurm_sbatch',
  [],
  '(--launcher=slurm) An extra sbatch option, an #SBATCH line of its own (repeatable), '
  'e.g. --slurm_sbatch=--mem=32G --slurm_sbatch=--qos=high.',
)
_POINT = flags.DEFINE_string('point', None, '(point) The point to train.')
_SET = flags.DEFINE_multi_string(
  'set',
  [],
  'KEY=VALUE (repeatable; VALUE parsed as JSON, else a string): a field set in every point.',
)
_RUNLOCAL = flags.DEFINE_bool(
  'runlocal', False, "Add ',runlocal' to every point's config: a smoke run of the sweep."
)
_METRIC = flags.DEFINE_string('metric', 'test_top1', '(collect) Sort / plot metric.')
_X = flags.DEFINE_string('x', '', '(collect) Swept field on the plot x axis.')


def main(argv: list[str]) -> int:
  """The sweep command `argv[1]` (absl's main: argv[0] is the program); its exit status."""
  if len(argv) != 2 or argv[1] not in COMMANDS:
    got = f'got {" ".join(argv[1:])!r}' if len(argv) > 1 else 'none given'
    cli.exit_usage(
      f'give one command, {" | ".join(COMMANDS)} ({got}); e.g. '
      'python sweep.py list --config=configs/spikformer.py.'
    )
  command = argv[1]
  missing = [f'--{n}' for n in _NEEDS[command] if not flags.FLAGS[n].value]
  if missing:
    cli.exit_usage(f'{command} needs {" ".join(missing)}.')
  if _PARALLEL.value < 1:
    cli.exit_usage(
      f'--parallel={_PARALLEL.value}: the number of points trained at once must be >= 1.'
    )
  slurm = command == 'run' and _LAUNCHER.value == 'slurm'
  misplaced = [f'--{n}' for n in _SLURM_ONLY if flags.FLAGS[n].present and not slurm]
  if misplaced:
    cli.exit_usage(f'{" ".join(misplaced)}: only `run --launcher=slurm` takes it.')
  # The flags a command needs were checked above: '' is never used.
  config = cli.config_file(_CONFIG.value) or ''  # configs/x.py: also outside a checkout
  workdir, sweep, runlocal = _WORKDIR.value or '', _SWEEP.value or '', _RUNLOCAL.value

  from spikeformer_jax import config_lib, errors, storage, sweeps  # pylint: disable=import-outside-toplevel

  try:
    common = config_lib.parse_set(_SET.value)
  except errors.ConfigError as e:
    cli.exit_usage(errors.one_line(e))
  if workdir:  # a sweep directory is local or gs://: another scheme is one line (errors.report)
    storage.check(workdir)
  # Other errors: errors.report (cli.run): a user error one line and status 1,
  # a stop that saved the running points' steps (errors.Stopped) 143 / 130.
  try:
    if command == 'list':
      module = sweeps.load_config_module(config)
      for name in sweeps.declared_sweeps(module):
        points = sweeps.get_points(config, name, common, validate=False, runlocal=runlocal)
        print(f'{name}: {len(points)} points')
        for p in points:
          print(f'  {p.name}')
        _warn(sweeps.overridden_common(points, common))
    elif command == 'commands':
      points = sweeps.get_points(config, sweep, common, runlocal=runlocal)
      _warn(sweeps.overridden_common(points, common))  # stderr: stdout is the commands
      sweeps.write_manifest(config, sweep, workdir, points, common, runlocal)
      for p in points:
        cmd = sweeps.point_command(
          config, sweep, p.name, storage.join(workdir, p.name), common, runlocal
        )
        print(' '.join(_quote(c) for c in cmd))
    elif command == 'run':
      # While no point runs, SIGTERM (or SIGHUP) stops at once, in one line
      # (sweeps.run passes it on to the points while they run).
      for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup
          signal.signal(signum, _stopped_between_points)
      if slurm:
        options = sweeps.SlurmOptions(
          partition=_SLURM_PARTITION.value,
          time=_SLURM_TIME.value,
          gpus_per_point=_SLURM_GPUS.value,
          cpus_per_point=_SLURM_CPUS.value,
          sbatch=tuple(_SLURM_SBATCH.value),
          at_once=_PARALLEL.value if flags.FLAGS['parallel'].present else 0,
        )
        result = sweeps.run_slurm(
          config,
          sweep,
          workdir,
          options=options,
          common=common,
          runlocal=runlocal,
          detach=_DETACH.value,
        )
      else:
        result = sweeps.run(
          config, sweep, workdir, parallel=_PARALLEL.value, common=common, runlocal=runlocal
        )
      if _DETACH.value:
        return _detached(result, workdir)
      failed = sorted(n for n, s in result.items() if s != 'finished')
      print(
        f'{len(result) - len(failed)}/{len(result)} points finished'
        + (f'; not finished: {", ".join(f"{n} ({result[n]})" for n in failed)}' if failed else '')
        + '.'
      )
      sweeps.collect(workdir)
      return 1 if failed else 0
    elif command == 'task':
      job = '_'.join(
        filter(None, (os.environ.get('SLURM_ARRAY_JOB_ID'), os.environ.get('SLURM_ARRAY_TASK_ID')))
      )
      return sweeps.run_task(config, sweep, _POINT.value or '', workdir, common, runlocal, job)
    elif command == 'point':
      from absl import logging  # pylint: disable=import-outside-toplevel

      logging.set_verbosity(logging.WARNING)
      try:
        sweeps.run_point(config, sweep, _POINT.value or '', workdir, common, runlocal)
      except errors.WorkdirBusy as e:  # `run` records the point as busy, not failed
        errors.report(e, traceback=cli.TRACEBACK.value)
        return sweeps.BUSY_EXIT
    else:
      rows = sweeps.collect(workdir, metric=_METRIC.value, x=_X.value)
      print(storage.read_text(storage.join(workdir, 'results.md')), end='')
      print(f'{len(rows)} points; wrote {workdir}/results.csv, results.md, results.png')
  except KeyboardInterrupt:  # while no point ran (`run` passes it on to running ones)
    print(
      'interrupted (SIGINT) while no point was running; rerun the same command to go on.',
      file=sys.stderr,
    )
    return 130
  return 0


def _detached(result: dict, workdir: str) -> int:
  """`run --detach`'s summary; exit status 1 if a point is neither finished
  nor in SLURM (a conflict, a damaged file)."""
  from spikeformer_jax import sweeps  # pylint: disable=import-outside-toplevel

  done = [n for n, s in result.items() if s == 'finished']
  waiting = [n for n, s in result.items() if s in (*sweeps.IN_SLURM, 'busy')]
  other = sorted(n for n in result if n not in done and n not in waiting)
  print(
    f'{len(done)}/{len(result)} points finished, {len(waiting)} in SLURM'
    + (f'; not submitted: {", ".join(f"{n} ({result[n]})" for n in other)}' if other else '')
    + '. `sweep.py run` with the same arguments, without --detach, waits for them; '
    f'`sweep.py collect --workdir={workdir}` tabulates what has finished.'
  )
  sweeps.collect(workdir)
  return 1 if other else 0


def _stopped_between_points(signum, _frame):
  from spikeformer_jax import errors, sweeps  # pylint: disable=import-outside-toplevel

  what, name, code = sweeps.STOP_SIGNALS[signum]
  raise errors.Stopped(
    f'{what} ({name}) while no point was running; rerun the same command to go on.', code
  )


def _warn(message: str):
  if message:
    print(message, file=sys.stderr)


def _quote(s: str) -> str:
  return s if all(c.isalnum() or c in '-_=./:,' for c in s) else "'" + s.replace("'", "'\\''") + "'"


def run():
  """`spikeformer-sweep`, `python -m spikeformer_jax.sweep`, `python sweep.py`."""
  # JAX's options become environment variables, which every point inherits.
  sys.argv = [sys.argv[0], *cli.jax_flags_to_env(sys.argv[1:])]
  cli.run(main, config_names=(), jax_flags=False)  # mistakes: one line, exit status 2


if __name__ == '__main__':
  run()
