"""Writes docs/config_reference.md from the comments of the config builders.

  python docs/gen_config_reference.py           # rewrite the page
  python docs/gen_config_reference.py --check   # exit 1 if the page is stale

The code is the one source of truth: every field is documented by the
comments where the function that builds it sets it (config_lib.base_config,
config_lib.data_config, the builders they call, common.shared_fields, every
registered family's model_config and every attention kind's own fields). A
field's text is the comment block just above it, its trailing comment, and
the comment lines below that continue the trailing one at the same column.
Defaults are the builder's literal values (or its parameters' defaults);
values a variant passes in read "per variant". Valid names that come from a
registry (attention kinds, families, datasets) are read from it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import pathlib
import sys
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / 'docs' / 'config_reference.md'
COMMAND = 'python docs/gen_config_reference.py'

if str(ROOT) not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, str(ROOT))

from spikeformer_jax import attention, config_lib, data, models  # pylint: disable=wrong-import-position
from spikeformer_jax.models import common  # pylint: disable=wrong-import-position

# Fields whose valid values are a registry's names: listed from it, never by hand.
CHOICES = {
  'model.attention': attention.names,
  'model.name': models.names,
  'data.name': lambda: data.NAMES,
}


@functools.cache
def _module_source(path: str):
  """(ast tree, {line: (column, text, standalone)}, lines) of a source file."""
  text = pathlib.Path(path).read_text()
  comments = {}
  for tok in tokenize.generate_tokens(io.StringIO(text).readline):
    if tok.type == tokenize.COMMENT:
      line, col = tok.start
      standalone = not tok.line[:col].strip()
      comments[line] = (col, tok.string.lstrip('#').strip(), standalone)
  return ast.parse(text), comments, text.splitlines()


def _function_node(fn) -> tuple[ast.FunctionDef, dict, list]:
  tree, comments, lines = _module_source(inspect.getsourcefile(fn))
  line = fn.__code__.co_firstlineno
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.FunctionDef)
      and node.name == fn.__name__
      and (node.lineno == line or any(d.lineno == line for d in node.decorator_list))
    ):
      return node, comments, lines
  raise LookupError(f'{fn.__qualname__}: source not found')


class Builder:
  """One config-building function: its parameters, comments and namespace."""

  def __init__(self, fn):
    self.fn = fn
    self.node, self.comments, self.lines = _function_node(fn)
    self.globals = fn.__globals__
    self.params = {n: p.default for n, p in inspect.signature(fn).parameters.items()}
    # Names the function computes: a value built from them is shown as written.
    self.locals = set(self.params) | {
      t.id
      for n in ast.walk(self.node)
      if isinstance(n, ast.Assign)
      for t in n.targets
      if isinstance(t, ast.Name)
    }

  def doc(self, key_node: ast.AST, value: ast.AST, group: bool) -> str:
    """The comment text of the field whose key starts at key_node."""
    first = key_node.lineno
    code = self.lines[first - 1]
    col = len(code) - len(code.lstrip())
    parts = []
    line = first - 1  # the block just above, at the indentation of the field's line
    above = []
    while line in self.comments and self.comments[line][2] and self.comments[line][0] == col:
      above.append(self.comments[line][1])
      line -= 1
    parts += reversed(above)
    last = first if group else value.end_lineno
    trailing = [
      ln for ln in range(first, last + 1) if ln in self.comments and not self.comments[ln][2]
    ]
    for ln in trailing:
      parts.append(self.comments[ln][1])
    if trailing:  # continuation lines, aligned under the trailing comment
      tcol = self.comments[trailing[-1]][0]
      ln = trailing[-1] + 1
      while ln in self.comments and self.comments[ln][2] and self.comments[ln][0] == tcol:
        parts.append(self.comments[ln][1])
        ln += 1
    return ' '.join(p for p in parts if p)

  def names_in(self, node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

  def default(self, value: ast.AST) -> str:
    if isinstance(value, ast.Name) and value.id in self.params:
      d = self.params[value.id]
      return '(per variant)' if d is inspect.Parameter.empty else f'`{d!r}`'
    if isinstance(value, ast.Name) and value.id in self.locals:
      return '(computed)'
    if self.names_in(value) & self.locals:
      return f'`{ast.unparse(value)}`'
    try:
      v = eval(compile(ast.Expression(value), '<config>', 'eval'), self.globals)  # pylint: disable=eval-used
    except Exception:  # pylint: disable=broad-except
      return f'`{ast.unparse(value)}`'
    return f'`{v!r}`'

  def callee(self, value: ast.AST):
    """The function a call node calls, when it is one of the package's."""
    if not isinstance(value, ast.Call):
      return None
    try:
      fn = eval(compile(ast.Expression(value.func), '<config>', 'eval'), self.globals)  # pylint: disable=eval-used
    except Exception:  # pylint: disable=broad-except
      return None
    if inspect.isfunction(fn) and fn.__module__.startswith('spikeformer_jax'):
      return fn
    return None

  def fields(self):
    """(key node, name, value node) of every field the function sets, in order."""
    out = []
    for stmt in self.node.body:
      if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
        if isinstance(target, ast.Attribute):
          out.append((target, target.attr, stmt.value))
        elif _dict_call(stmt.value) is not None:
          out += _keywords(_dict_call(stmt.value))
      elif isinstance(stmt, ast.Return) and stmt.value is not None:
        if _dict_call(stmt.value) is not None:
          out += _keywords(_dict_call(stmt.value))
    return out


def _dict_call(node):
  """The `dict(...)` of `dict(...)` or `ConfigDict(dict(...))`, else None."""
  if not isinstance(node, ast.Call):
    return None
  name = ast.unparse(node.func)
  if name == 'dict':
    return node
  if name.endswith('ConfigDict') and node.args:
    return _dict_call(node.args[0])
  return None


def _keywords(call: ast.Call):
  out = []
  for kw in call.keywords:
    # A keyword node's position is its name's (3.9+); ** has none before 3.11.
    out.append((kw, kw.arg, kw.value))
  return out


class Page:
  """The sections of the reference, in the order they are found."""

  def __init__(self):
    self.sections = []  # (anchor, title, intro, rows)
    self.anchors = {}  # builder function -> anchor

  def add(self, fn, prefix: str, title: str | None = None, anchor: str | None = None) -> str:
    if fn in self.anchors:
      return self.anchors[fn]
    anchor = anchor or prefix.rstrip('.').replace('.', '-') or 'run'
    self.anchors[fn] = anchor
    b = Builder(fn)
    src = pathlib.Path(inspect.getsourcefile(fn)).relative_to(ROOT)
    title = title or f'`{prefix.rstrip(".")}`'
    intro = inspect.cleandoc(fn.__doc__ or '')
    rows = []
    section = [anchor, title, f'{intro}\n\nBuilt by `{fn.__name__}` in `{src}`.'.strip(), rows]
    self.sections.append(section)
    self._rows(b, b.fields(), prefix, rows)
    return anchor

  def _rows(self, b: Builder, fields, prefix: str, rows: list):
    for key, name, value in fields:
      fn = b.callee(value)
      inline = _dict_call(value)
      if name is None:  # **builder(): fields merged into this level
        if fn is attention.config_fields:
          for kind in map(attention.get, attention.names()):
            for field, make in kind.config.items():
              a = self.add(
                make, f'{prefix}{field}.', f'`{prefix}{field}` (attention kind `{kind.name}`)'
              )
              rows.append(
                (
                  f'`{prefix}{field}.*`',
                  '',
                  f'The own field of attention kind `{kind.name}`: [`{prefix}{field}`](#{a}).',
                )
              )
        elif fn is not None:
          a = self.add(fn, prefix, f'`{prefix.rstrip(".")}`: every family')
          rows.append((f'`{prefix}*`', '', f'The fields every family shares: [{a}](#{a}).'))
        continue
      path = prefix + name
      doc = b.doc(key, value, group=inline is not None or fn is not None)
      if path in CHOICES:
        doc = (
          (doc.rstrip('.') + '. ' if doc else '')
          + 'Valid: '
          + ', '.join(f'`{n}`' for n in CHOICES[path]())
          + '.'
        )
      if inline is not None:
        if doc:
          rows.append((f'`{path}`', '', doc))
        self._rows(b, _keywords(inline), path + '.', rows)
      elif fn is not None:
        a = self.add(fn, path + '.')
        rows.append((f'`{path}.*`', '', (doc + ' ' if doc else '') + f'See [`{path}`](#{a}).'))
      else:
        rows.append((f'`{path}`', b.default(value), doc))

  def markdown(self) -> str:
    out = [
      '# Config field reference',
      '',
      '<!-- Generated by `' + COMMAND + '` from the comments of the config builders; '
      'edit those comments, not this page. -->',
      '',
      'Every field of `config`, with its default and meaning, generated from the comments '
      'in the code that builds the configs (run `' + COMMAND + '` after editing them; '
      '`tests/test_docs.py` checks that this page is current). A variant of '
      '`configs/<family>.py` sets its own values; `--config.FIELD=VALUE` overrides any '
      'field (see [Configs](configs.md)).',
      '',
    ]
    for anchor, title, intro, rows in self.sections:
      out += [
        f'## {title} {{#{anchor}}}',
        '',
        intro,
        '',
        '| field | default | meaning |',
        '|---|---|---|',
      ]
      out += ['| ' + ' | '.join(c.replace('|', '\\|') for c in row) + ' |' for row in rows]
      out.append('')
    return '\n'.join(out)


def generate() -> str:
  page = Page()
  page.add(config_lib.base_config, '', 'Run and training')
  page.add(config_lib.data_config, 'data.')
  page.add(common.shared_fields, 'model.', '`model`: every family')
  for name in models.names():
    page.add(models.get(name).model_config, 'model.', f'`model`: family `{name}`', f'model-{name}')
  return page.markdown()


def main(argv):
  text = generate()
  if '--check' in argv[1:]:
    if not PAGE.exists() or PAGE.read_text() != text:
      print(f'{PAGE.relative_to(ROOT)} is stale: run `{COMMAND}`.')
      return 1
    return 0
  PAGE.write_text(text)
  print(f'wrote {PAGE.relative_to(ROOT)}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
