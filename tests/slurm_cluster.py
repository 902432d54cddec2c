"""A real single-node SLURM for the tests, private to one test session.

Debian's slurm-wlm and munge (installed with apt-get when absent, if this is
root on Debian: `ensure_packages`). `Cluster()` writes its own slurm.conf and
munge key under a fresh temporary directory, starts munged (as the `munge`
user, with its own socket), slurmctld and slurmd (in the foreground, `-D`, as
children of this process) on free loopback ports, and waits until `sinfo`
shows the node idle: well under a second once installed. `stop()` ends the
three daemons by PID (other sessions may run SLURM on the same machine: never
by name) and removes the directory.

Use (tests/conftest.py's session fixture `slurm` yields a Cluster):

    job = cluster.sbatch('script.sbatch', '--output=/tmp/x/%j.out', env={'VAR': 'v'})
    state = cluster.wait(job)            # 'COMPLETED', 'FAILED', 'CANCELLED', ...
    cluster.job(job)['ExitCode']         # scontrol's fields (no accounting: sacct fails)
    cluster.run('srun', '-n', '2', 'hostname')   # any client command, SLURM_CONF set
    pathlib.Path('/tmp/x/%d.out' % job).read_text()

- One partition, `Cluster.PARTITION` ('debug', the default), of one node named
  after this host (`cluster.node`, so that JAX's detection resolves it: it
  takes the coordinator's host name from SLURM_STEP_NODELIST), with
  `Cluster.CPUS` (8) CPUs whatever the machine has (SlurmdParameters=
  config_overrides): a 2-task run and a 4-point array fit on 2 real cores.
  `--cpus-per-task` above 8 or `--nodes=2` fail at submission
  (EnforcePartLimits=ALL), never pend for ever.
- Jobs run as the submitting user (root) in the directory they were submitted
  from (cluster.run/sbatch default: the project root) and inherit the caller's
  environment plus `env` (sbatch's default --export=ALL).
- No accounting daemon: sacct fails, and a finished job stays visible to
  `scontrol show job` for an hour (MinJobAge). `wait` polls that.
- JAX's SLURM detection takes its coordinator port from the job id
  (61440 + id % 4096); FirstJobId is random so that two private clusters on
  one machine rarely reuse one.
- The environment for client commands is `cluster.env` (SLURM_CONF); the
  daemons' logs are in `cluster.root / 'log'` (`cluster.logs()` on failure).
"""

from __future__ import annotations

import os
import pathlib
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

PACKAGES = ('slurm-wlm', 'munge')
BINARIES = ('slurmctld', 'slurmd', 'munged', 'sbatch', 'srun', 'sinfo', 'scontrol', 'scancel')
ROOT = pathlib.Path(__file__).resolve().parents[1]


class Unavailable(RuntimeError):
  """SLURM cannot run here: the reason, for a test's skip."""


def _missing() -> list[str]:
  return [b for b in BINARIES if shutil.which(b) is None]


def ensure_packages(timeout: int = 300) -> None:
  """Installs slurm-wlm and munge with apt-get if any binary is missing
  (about 20-30 s). Raises Unavailable where that is impossible."""
  if not _missing():
    return
  if os.geteuid() != 0 or shutil.which('apt-get') is None:
    raise Unavailable(
      f'{", ".join(_missing())} not installed (apt-get install {" ".join(PACKAGES)})'
    )
  import filelock  # pylint: disable=g-import-not-at-top

  # Two test workers may both want them: one installs, the other waits.
  with filelock.FileLock(os.path.join(tempfile.gettempdir(), 'spikeformer_jax_slurm_apt.lock')):
    if not _missing():
      return
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    steps = (
      ['apt-get', 'update', '-qq'],
      ['apt-get', 'install', '-y', '-qq', '--no-install-recommends',
       '-o', 'DPkg::Lock::Timeout=120', *PACKAGES],
    )  # fmt: skip
    for cmd in steps:
      try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
      except subprocess.TimeoutExpired:
        raise Unavailable(f'{" ".join(cmd)} took over {timeout} s') from None
      if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ['']
        raise Unavailable(f'{" ".join(cmd[:2])} failed ({p.returncode}): {tail[0]}')
  if _missing():
    raise Unavailable(f'installed {" ".join(PACKAGES)}, still missing {", ".join(_missing())}')


def _free_ports(n: int) -> list[int]:
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:  # all bound at once: n different ports
      s.bind(('127.0.0.1', 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


_CONF = """\
ClusterName=spikeformer
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits for the last run's credential to expire: 120 s by default.
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# No cgroups here: plain process tracking, no task binding, no MPI plugin.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# An oversized request fails at submission instead of pending for ever.
EnforcePartLimits=ALL
# The configured CPUs, not the machine's: 2 tasks fit on any machine.
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
FirstJobId={first_job_id}
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
SchedulerParameters=sched_interval=1
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{gpus} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
  """A running private cluster (see the module docstring); `stop()` ends it."""

  PARTITION = 'debug'
  CPUS = 8
  GPUS = 8

  def __init__(self, start_timeout: float = 30.0):
    ensure_packages()
    if os.geteuid() != 0:  # munged runs as the munge user, slurmd as root
      raise Unavailable('a private SLURM needs root (munged as user munge, slurmd as root)')
    self.node = socket.gethostname().split('.')[0]
    try:
      if socket.gethostbyname(self.node) != '127.0.0.1':  # JAX connects to it by name
        raise Unavailable(f'host name {self.node} does not resolve to 127.0.0.1')
    except OSError:
      raise Unavailable(f'host name {self.node} does not resolve') from None
    self.root = pathlib.Path(tempfile.mkdtemp(prefix='spikeformer_slurm_'))
    self._procs: list[subprocess.Popen] = []
    try:
      self._start(start_timeout)
    except BaseException:
      self.stop()
      raise

  def _start(self, timeout: float) -> None:
    root = self.root
    root.chmod(0o755)  # munged (user munge) reaches its directory through it
    for d in ('state', 'spool', 'log', 'run', 'munge'):
      (root / d).mkdir()
    munge = pwd.getpwnam('munge')
    key = root / 'munge' / 'munge.key'
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    for p in (root / 'munge', key):
      os.chown(p, munge.pw_uid, munge.pw_gid)
    (root / 'munge').chmod(0o755)  # munged refuses a socket directory others can write
    ctld_port, slurmd_port = _free_ports(2)
    conf = root / 'slurm.conf'
    # GPUs in name only (no device files): jobs may ask for them as on a GPU
    # cluster and are told which (CUDA_VISIBLE_DEVICES); JAX_PLATFORMS=cpu.
    (root / 'dev').mkdir()
    for i in range(self.GPUS):  # slurmd counts a GPU per file: plain empty files
      (root / 'dev' / f'gpu{i}').touch()
    (root / 'gres.conf').write_text(
      f'AutoDetect=off\nNodeName={self.node} Name=gpu File={root}/dev/gpu[0-{self.GPUS - 1}]\n'
    )
    conf.write_text(
      _CONF.format(
        node=self.node,
        root=root,
        ctld_port=ctld_port,
        slurmd_port=slurmd_port,
        first_job_id=random.randrange(1000, 1_000_000),
        cpus=self.CPUS,
        gpus=self.GPUS,
        partition=self.PARTITION,
      )
    )
    self.env = dict(os.environ, SLURM_CONF=str(conf))
    for k in list(self.env):  # a caller inside a SLURM job: not this cluster's
      if k.startswith(('SLURM_', 'SBATCH_', 'SRUN_', 'SALLOC_')) and k != 'SLURM_CONF':
        del self.env[k]
    log = open(root / 'log' / 'daemons.out', 'ab')  # pylint: disable=consider-using-with
    m = root / 'munge'
    self._spawn(
      ['munged', '-F', '--force', f'--socket={m}/munge.socket.2', f'--key-file={key}',
       f'--pid-file={m}/munged.pid', f'--seed-file={m}/munged.seed', f'--log-file={m}/munged.log'],
      log, user=munge,
    )  # fmt: skip
    self._until(lambda: (m / 'munge.socket.2').exists(), timeout, 'munged did not start')
    self._spawn(['slurmctld', '-D', '-i'], log)
    self._spawn(['slurmd', '-D', '-N', self.node], log)
    self._until(self._idle, timeout, f'the node {self.node} did not come up idle')

  def _spawn(self, cmd, log, user=None) -> None:
    kw = {}
    if user is not None:
      kw = {'user': user.pw_uid, 'group': user.pw_gid, 'extra_groups': []}
    self._procs.append(
      subprocess.Popen(
        cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        start_new_session=True, **kw,
      )
    )  # fmt: skip

  def _until(self, ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
      dead = [p.args[0] for p in self._procs if p.poll() is not None]
      if dead or time.monotonic() > deadline:
        raise Unavailable(f'{what} ({", ".join(dead) or "timeout"}); {self.logs(1)}')
      time.sleep(0.1)

  def _idle(self) -> bool:
    p = self.run('sinfo', '-h', '-N', '-o', '%t', check=False, timeout=10)
    return p.returncode == 0 and p.stdout.strip() == 'idle'

  def logs(self, lines: int = 20) -> str:
    """The last lines of the daemons' logs (for a failure's message)."""
    out = []
    for f in sorted(self.root.rglob('*.log')) + [self.root / 'log' / 'daemons.out']:
      if f.is_file():
        tail = f.read_text(errors='replace').strip().splitlines()[-lines:]
        out.append(f'{f.name}: ' + ' | '.join(tail))
    return '; '.join(out)

  def run(self, *cmd, check=True, timeout=60, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """A client command (sinfo, srun, scontrol, ...) against this cluster."""
    p = subprocess.run(
      cmd, env=dict(self.env, **(env or {})), cwd=cwd, capture_output=True, text=True,
      timeout=timeout,
    )  # fmt: skip
    if check and p.returncode:
      raise RuntimeError(f'{" ".join(cmd)}: exit {p.returncode}: {p.stderr.strip()[-2000:]}')
    return p

  def sbatch(self, *args, env=None, cwd=ROOT) -> int:
    """`sbatch ARGS` (a script path and options); the job id."""
    return int(self.run('sbatch', '--parsable', *args, env=env, cwd=cwd).stdout.split(';')[0])

  def job(self, job_id: int) -> dict[str, str]:
    """`scontrol show job`'s fields (JobState, ExitCode, Restarts, StdOut, ...)."""
    out = self.run('scontrol', '-o', 'show', 'job', str(job_id)).stdout
    return dict(re.findall(r'(\w+)=(\S*)', out))

  def state(self, job_id: int) -> str:
    return self.job(job_id)['JobState']

  def wait(self, job_id: int, timeout: float = 300, until=None) -> str:
    """Waits until the job has ended (or `until(state)` holds); its state."""
    done = until or (lambda s: s not in ('PENDING', 'CONFIGURING', 'RUNNING', 'COMPLETING',
                                         'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'SUSPENDED'))  # fmt: skip
    deadline = time.monotonic() + timeout
    while not done(state := self.state(job_id)):
      if time.monotonic() > deadline:
        self.run('scancel', str(job_id), check=False)
        raise TimeoutError(f'job {job_id} still {state} after {timeout} s; {self.logs(5)}')
      time.sleep(0.2)
    return state

  def stop(self) -> None:
    """Cancels the jobs left, ends the daemons (SIGTERM, then SIGKILL) by PID
    and removes the directory."""
    if self._procs and all(p.poll() is None for p in self._procs):
      try:
        left = self.run('squeue', '-h', '-o', '%i', check=False, timeout=10).stdout.split()
        if left:  # slurmstepd outlives slurmd: its tasks would too
          self.run('scancel', '--full', '--signal=KILL', *left, check=False, timeout=10)
          self.run('scancel', *left, check=False, timeout=10)
          deadline = time.monotonic() + 20
          while self.run('squeue', '-h', check=False, timeout=10).stdout.strip():
            if time.monotonic() > deadline:
              break
            time.sleep(0.2)
      except subprocess.TimeoutExpired:
        pass
    for p in reversed(self._procs):  # slurmd (and its jobs' steps) first
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
          p.wait(10)
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait()
    self._procs.clear()
    shutil.rmtree(self.root, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()
