r"""Declared config sweeps: list, run (resumable), print launch commands, collect.

  python sweep.py list     --config=configs/spikformer.py
  python sweep.py run      --config=configs/spikformer.py --sweep=digits-small --workdir=DIR [--parallel=2]
  python sweep.py commands --config=configs/spikformer.py --sweep=timesteps --workdir=DIR   # one per point, for a scheduler
  python sweep.py collect  --workdir=DIR [--metric=test_top1] [--x=model.T]
  python sweep.py run      --config=configs/a2os2a.py --sweep=table1 --workdir=DIR --runlocal  # smoke run

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

Installed (`pip install .`), `spikeformer-sweep` and `python -m spikeformer_jax.sweep` take
the same arguments from any directory; `--config=configs/<family>.py:VARIANT`
names the packaged config when there is no such file where it runs.
"""

import argparse
import os
import signal
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('command', choices=('list', 'run', 'commands', 'point', 'collect'))
  parser.add_argument('--config', help='config file declaring the sweep (configs/x.py)')
  parser.add_argument('--sweep', help='sweep name (see `list`)')
  parser.add_argument('--workdir', help='sweep directory (one subdirectory per point)')
  parser.add_argument('--parallel', type=int, default=1, help='points trained at once')
  parser.add_argument('--point', help='(point) the point to train')
  parser.add_argument('--set', action='append', dest='common', metavar='KEY=VALUE')
  parser.add_argument('--runlocal', action='store_true',
                      help="add ',runlocal' to every point's config: a smoke run of the sweep")
  parser.add_argument('--metric', default='test_top1', help='(collect) sort / plot metric')
  parser.add_argument('--x', default='', help='(collect) swept field on the plot x axis')
  from spikeformer_jax import cli  # pylint: disable=import-outside-toplevel
  args = parser.parse_args(cli.jax_flags_to_env(sys.argv[1:] if argv is None else argv))
  args.config = cli.config_file(args.config)  # configs/x.py: also outside a checkout

  from spikeformer_jax import config_lib, errors, sweeps  # pylint: disable=import-outside-toplevel
  need = {'list': ('config',), 'run': ('config', 'sweep', 'workdir'),
          'commands': ('config', 'sweep', 'workdir'),
          'point': ('config', 'sweep', 'point', 'workdir'), 'collect': ('workdir',)}
  missing = [f'--{n}' for n in need[args.command] if not getattr(args, n)]
  if missing:
    parser.error(f'{args.command} needs {" ".join(missing)}')
  if args.parallel < 1:
    print(f'error: --parallel={args.parallel}: the number of points trained at once must be '
          '>= 1.', file=sys.stderr)
    return 2
  common = config_lib.parse_set(args.common)
  try:
    if args.command == 'list':
      module = sweeps.load_config_module(args.config)
      for name in sweeps.declared_sweeps(module):
        points = sweeps.get_points(args.config, name, common, validate=False,
                                   runlocal=args.runlocal)
        print(f'{name}: {len(points)} points')
        for p in points:
          print(f'  {p.name}')
        _warn(sweeps.overridden_common(points, common))
    elif args.command == 'commands':
      points = sweeps.get_points(args.config, args.sweep, common, runlocal=args.runlocal)
      _warn(sweeps.overridden_common(points, common))  # stderr: stdout is the commands
      sweeps.write_manifest(args.config, args.sweep, args.workdir, points, common, args.runlocal)
      for p in points:
        cmd = sweeps.point_command(args.config, args.sweep, p.name,
                                   os.path.join(args.workdir, p.name), common, args.runlocal)
        print(' '.join(_quote(c) for c in cmd))
    elif args.command == 'run':
      # While no point runs, SIGTERM (or SIGHUP) stops at once, in one line
      # (sweeps.run passes it on to the points while they run).
      for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup
          signal.signal(signum, _stopped_between_points)
      result = sweeps.run(args.config, args.sweep, args.workdir, parallel=args.parallel,
                          common=common, runlocal=args.runlocal)
      failed = sorted(n for n, s in result.items() if s != 'finished')
      print(f'{len(result) - len(failed)}/{len(result)} points finished'
            + (f'; not finished: {", ".join(f"{n} ({result[n]})" for n in failed)}'
               if failed else '') + '.')
      sweeps.collect(args.workdir)
      return 1 if failed else 0
    elif args.command == 'point':
      from absl import logging  # pylint: disable=import-outside-toplevel
      logging.set_verbosity(logging.WARNING)
      try:
        sweeps.run_point(args.config, args.sweep, args.point, args.workdir, common,
                         args.runlocal)
      except errors.Stopped as e:  # step saved: 143 / 130, as train.py, for schedulers
        print(errors.one_line(e), file=sys.stderr)
        return e.exit_code
      except errors.WorkdirBusy as e:  # `run` records the point as busy, not failed
        print(f'error: {errors.one_line(e)}', file=sys.stderr)
        return sweeps.BUSY_EXIT
    else:
      rows = sweeps.collect(args.workdir, metric=args.metric, x=args.x)
      with open(os.path.join(args.workdir, 'results.md'), encoding='utf-8') as f:
        print(f.read(), end='')
      print(f'{len(rows)} points; wrote {args.workdir}/results.csv, results.md, results.png')
  except errors.Stopped as e:  # `run` passed the signal on and its points saved
    print(errors.one_line(e), file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:  # while no point ran (`run` passes it on to running ones)
    print('interrupted (SIGINT) while no point was running; rerun the same command to go on.',
          file=sys.stderr)
    return 130
  except sweeps.InvalidPoints as e:  # a line per invalid point reads better than one
    print(f'error: {e}', file=sys.stderr)
    return 1
  except errors.CLEAR as e:
    print(f'error: {errors.one_line(e)}', file=sys.stderr)
    return 1
  return 0


def _stopped_between_points(signum, _frame):
  from spikeformer_jax import errors, sweeps  # pylint: disable=import-outside-toplevel
  what, name, code = sweeps.STOP_SIGNALS[signum]
  raise errors.Stopped(f'{what} ({name}) while no point was running; rerun the same command '
                       'to go on.', code)


def _warn(message: str):
  if message:
    print(message, file=sys.stderr)


def _quote(s: str) -> str:
  return s if all(c.isalnum() or c in '-_=./:,' for c in s) else "'" + s.replace("'", "'\\''") + "'"


def run():
  """`spikeformer-sweep`, `python -m spikeformer_jax.sweep`, `python sweep.py`."""
  sys.exit(main())


if __name__ == '__main__':
  run()
