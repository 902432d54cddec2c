"""The documentation: the site builds, the field reference is current, and
every shell command on a page runs or says why not.

The convention for shell blocks (```bash, ```sh, ```shell, ```console) in
README.md and docs/**/*.md. The line just before the fence may be

    <!-- not run here: REASON -->   the block is not run (REASON required:
                                    what it needs that a test machine lacks)
    <!-- runlocal: COMMAND -->      COMMAND runs instead: the block's programs
                                    and every --flag the block uses, plus small
                                    overrides (e.g. a `,runlocal` variant)
    <!-- same as: PAGE -->          every command of the block stands, token for
                                    token, in a block of PAGE, which runs it (the
                                    README repeats the quickstart and CIFAR-10
                                    pages: run once, kept identical)

and a block with neither runs as written. How a page's commands run: with
bash (`set -e`), in order, from the repository root (so `python train.py`
and `configs/...` resolve) with the repository on PYTHONPATH, and every
`/tmp/` in them replaced by one temporary directory per page, so that a
page's commands can share a workdir (train, then evaluate it) and no run
touches the real /tmp, on one CPU device (as on a reader's machine, not the
suite's 8 simulated ones). In ```console blocks only the `$ ` lines are commands.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').rglob('*.md'))]
SHELLS = ('bash', 'sh', 'shell', 'console')
FENCE = re.compile(r'^(\s*)(```+|~~~+)\s*([\w+-]*)')
MARK = re.compile(r'<!--\s*(not run here|runlocal|same as)\s*:(.*?)-->', re.S)


def shell_blocks(page: pathlib.Path):
  """(line, language, text, mark, argument) of every fenced block of a page;
  mark is 'not run here', 'runlocal' or None."""
  lines = page.read_text().splitlines()
  out, i = [], 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, fence, lang = m.groups()
    j = i + 1
    while j < len(lines) and not lines[j].strip().startswith(fence):
      j += 1
    body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]]
    mark = arg = None
    if i > 0 and lines[i - 1].strip().endswith('-->'):
      k = i - 1  # the comment may span lines; it must end just before the fence
      while k > 0 and '<!--' not in lines[k]:
        k -= 1
      found = MARK.search('\n'.join(lines[k:i]))
      if found:
        mark, arg = found.group(1), ' '.join(found.group(2).split())
    if lang in SHELLS:
      out.append((i + 1, lang, '\n'.join(body), mark, arg))
    i = j + 1
  return out


def commands(lang: str, text: str) -> list[str]:
  """The commands of a block: continuation lines joined, comments dropped."""
  if lang == 'console':
    text = '\n'.join(ln[2:] for ln in text.splitlines() if ln.startswith('$ '))
  text = text.replace('\\\n', ' ')
  out = []
  for line in text.splitlines():
    try:
      tokens = shlex.split(line, comments=True)
    except ValueError:
      tokens = line.split()
    if tokens:
      out.append(tokens)
  return out


def program(tokens: list[str]) -> str:
  """`python train.py`, `python -m spikeformer_jax.fidelity`, `pip`, ..."""
  if tokens[0] in ('python', 'python3'):
    return ' '.join(tokens[:3] if len(tokens) > 2 and tokens[1] == '-m' else tokens[:2])
  return tokens[0]


def flags(tokens: list[str]) -> set[str]:
  return {t.lstrip('[').split('=')[0].rstrip(']') for t in tokens if t.lstrip('[').startswith('--')}


def all_blocks():
  return [(page, *b) for page in PAGES for b in shell_blocks(page)]


def _id(block):
  return f'{block[0].relative_to(ROOT)}:{block[1]}'


def test_every_block_follows_the_convention():
  """A reason for every exempt block; a runlocal command runs the block's
  programs with every flag the block sets; a block the same as another page's
  has each of its commands there."""
  blocks = all_blocks()
  assert len(blocks) > 5, 'no shell blocks found: is the parser broken?'
  problems = []
  for block in blocks:
    page, line, lang, text, mark, arg = block
    if mark == 'not run here' and not arg:
      problems.append(f'{_id(block)}: "not run here" needs a reason')
    if mark == 'runlocal':
      want = [tok for cmd in commands('bash', arg) for tok in cmd]
      programs = {program(c) for c in commands('bash', arg.replace('&&', '\n').replace(';', '\n'))}
      for cmd in commands(lang, text):
        if program(cmd) not in programs:
          problems.append(f'{_id(block)}: runlocal does not run {program(cmd)!r}')
        missing = flags(cmd) - flags(want)
        if missing:
          problems.append(f'{_id(block)}: runlocal lacks {sorted(missing)}')
    if mark == 'same as':
      other = ROOT / arg
      there = (
        [c for b in shell_blocks(other) for c in commands(b[1], b[2])] if other.is_file() else []
      )
      for cmd in commands(lang, text):
        if cmd not in there:
          problems.append(f'{_id(block)}: {" ".join(cmd)!r} is not on {arg}')
  assert not problems, '\n'.join(problems)


def test_convention_parser(tmp_path):
  """The parser sees marks, flags and programs (a check on the check)."""
  text = (
    'x\n<!-- runlocal: python train.py --a=1 --b=2 -->\n```bash\n'
    'python train.py --a=3 \\\n  --b=4  # note\n```\n\n<!-- not run here: -->\n'
    '```sh\npip install x\n```\n```console\n$ python eval.py --c=1\nout\n```\n'
  )
  p = tmp_path / 'p.md'
  p.write_text(text)
  blocks = shell_blocks(p)
  assert [(b[1], b[3], b[4]) for b in blocks] == [
    ('bash', 'runlocal', 'python train.py --a=1 --b=2'),
    ('sh', 'not run here', ''),
    ('console', None, None),
  ]
  assert commands('bash', blocks[0][2]) == [['python', 'train.py', '--a=3', '--b=4']]
  assert commands('console', blocks[2][2]) == [['python', 'eval.py', '--c=1']]
  assert flags(['python', 'eval.py', '[--split=test]', '--x']) == {'--split', '--x'}
  assert program(['python', '-m', 'spikeformer_jax.fidelity', 'a.npz']) == (
    'python -m spikeformer_jax.fidelity'
  )
  p.write_text('<!-- same as: docs/quickstart.md -->\n```bash\npython eval.py\n```\n')
  assert [(b[3], b[4]) for b in shell_blocks(p)] == [('same as', 'docs/quickstart.md')]
  assert _page_script(p) is None  # run on the page it names, not again here


def _load_generator():
  spec = importlib.util.spec_from_file_location(
    'gen_config_reference', ROOT / 'docs' / 'gen_config_reference.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_reference_is_current():
  gen = _load_generator()
  page = ROOT / 'docs' / 'config_reference.md'
  assert page.read_text() == gen.generate(), (
    f'docs/config_reference.md is stale: run `{gen.COMMAND}`'
  )


def test_config_reference_lists_every_field():
  """Every field of a config of each family appears on the page, and every
  registered attention kind is named there (the page cannot fall behind)."""
  from spikeformer_jax import attention  # pylint: disable=g-import-not-at-top
  from spikeformer_jax.configs import msvit, sdt, spikformer  # pylint: disable=g-import-not-at-top

  text = (ROOT / 'docs' / 'config_reference.md').read_text()
  listed = set(re.findall(r'^\| `([\w.]+)(?:\.\*)?`', text, re.M))

  def keys(d, prefix=''):
    for k, v in d.items():
      if isinstance(v, dict) and v:
        yield from keys(v, f'{prefix}{k}.')
      else:
        yield prefix + k

  missing = set()
  for module in (spikformer, sdt, msvit):
    missing |= {k for k in keys(module.get_config().to_dict()) if k not in listed}
  assert not missing, f'fields missing from docs/config_reference.md: {sorted(missing)}'
  for kind in attention.names():
    assert f'`{kind}`' in text


def test_mkdocs_build_strict(tmp_path):
  pytest.importorskip('mkdocs', reason='mkdocs comes with the [docs] extra')
  pytest.importorskip('material', reason='mkdocs-material comes with the [docs] extra')
  r = subprocess.run(
    [sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(tmp_path / 'site')],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert r.returncode == 0, r.stdout + r.stderr


def _page_script(page: pathlib.Path) -> str | None:
  parts = []
  for block in shell_blocks(page):
    line, lang, text, mark, arg = block
    if mark in ('not run here', 'same as'):
      continue
    if mark == 'runlocal':
      cmd = arg
    elif lang == 'console':
      cmd = '\n'.join(ln[2:] for ln in text.splitlines() if ln.startswith('$ '))
    else:
      cmd = text
    parts.append(f'echo "+ {page.name}:{line}"\n{cmd}')
  return '\n'.join(parts) if parts else None


@pytest.mark.slow
@pytest.mark.parametrize(
  'page', [p for p in PAGES if _page_script(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_page_commands_run(page, tmp_path):
  script = _page_script(page).replace('/tmp/', f'{tmp_path}/')
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])]),
  )
  env.pop('JAX_NUM_CPU_DEVICES', None)  # one CPU device, as on a reader's machine
  r = subprocess.run(
    ['bash', '-e', '-o', 'pipefail', '-c', script],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert r.returncode == 0, (
    f'a command of {page.relative_to(ROOT)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}'
  )
