"""Where runs live: a local directory, or Cloud Storage (`gs://bucket/run`).

Every path the project writes or reads goes through this module, which hands
local paths to `os` exactly as before (a local workdir behaves bit for bit as
it always did) and `gs://` paths to `etils.epath` over gcsfs, the stack orbax
and MaxText use. `os.path` must never see a `gs://` path:
`os.path.abspath('gs://b/run')` is `<cwd>/gs:/b/run`, a local folder.

An object store is not a file system, and the differences decide the callers'
designs:
  * no append: a file is written whole (`write_text`, one PUT, atomic);
  * no hard links and no O_EXCL: `create_exclusive` is the store's conditional
    create (`ifGenerationMatch=0`: of racing writers, exactly one wins);
  * no local clock: `modified` is the server's time of the last write;
  * listings are cached by gcsfs: `listdir`, `exists` and `isdir` drop the
    cache first, so files another process wrote are seen;
  * a rename is a copy and a delete (`move`): not atomic, so nothing relies on
    one for correctness there.

Only `gs://` is accepted among URLs: orbax 0.12 cannot checkpoint elsewhere
(`s3://` raises "Checkpoint path should be absolute", or with OCDBT off writes
the arrays to a local `./s3:/` folder), so `check` refuses other schemes in one
line before anything starts.

Testing against a local server (tests/gcs_server.py starts fake-gcs-server):
STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT and FSSPEC_GCS_TOKEN=anon for
gcsfs, TENSORSTORE_GCS_HTTP_URL (same address) and
GOOGLE_AUTH_TOKEN_FOR_TESTING for tensorstore (orbax's arrays),
NO_GCE_CHECK=true, and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (else gcsfs
2026.10 waits tens of seconds per call on a gRPC probe).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import time
from typing import Any

from spikeformer_jax import errors

SCHEMES = ('gs',)  # URL schemes a run may live under


def scheme(path) -> str | None:
  """'gs' for 'gs://b/x', None for a local path."""
  path = os.fspath(path)
  head, sep, _ = path.partition('://')
  return head.lower() if sep and head.isalnum() else None


def is_remote(path) -> bool:
  return scheme(path) is not None


def check(path, what: str = '--workdir') -> str:
  """`path` as a string, or one line refusing a scheme runs cannot live under."""
  path = os.fspath(path)
  s = scheme(path)
  if s is not None and s not in SCHEMES:
    raise errors.ConfigError(
      f'{what}={path}: {s}:// is not supported (orbax cannot write checkpoints there); '
      'use a local path, a mounted file system, or gs://BUCKET/PATH.'
    )
  if s is not None and not path.partition('://')[2].strip('/'):
    raise errors.ConfigError(f'{what}={path} names no bucket; use gs://BUCKET/PATH.')
  return path


def _gcsfs():
  """The gcsfs file system epath uses (fsspec caches one instance per
  arguments: dropping its listing cache here drops epath's)."""
  from spikeformer_jax import extras  # pylint: disable=import-outside-toplevel

  extras.require('gcsfs', extra='gcs', package='gcsfs', needed_for='a gs:// path')
  import fsspec  # pylint: disable=import-outside-toplevel

  return fsspec.filesystem('gcs', finalize_on_close=True)


def _key(path: str) -> str:
  """'gs://b/x/' -> 'b/x' (gcsfs's form)."""
  return path.partition('://')[2].rstrip('/')


def epath(path):
  """`path` as an etils.epath.Path (for code that takes one, such as orbax)."""
  from etils import epath as epath_lib  # pylint: disable=import-outside-toplevel

  if is_remote(path):
    _gcsfs()  # one line naming the [gcs] extra if gcsfs is missing
  return epath_lib.Path(os.fspath(path))


# ------------------------------------------------------------------ names


def join(path, *parts) -> str:
  path = os.fspath(path)
  if is_remote(path):
    return posixpath.join(path, *map(os.fspath, parts))
  return os.path.join(path, *map(os.fspath, parts))


def dirname(path) -> str:
  path = os.fspath(path)
  if is_remote(path):
    head = posixpath.dirname(path.rstrip('/'))
    return head if '://' in head and _key(head) else path.rstrip('/')
  return os.path.dirname(path)


def basename(path) -> str:
  path = os.fspath(path)
  return posixpath.basename(path.rstrip('/')) if is_remote(path) else os.path.basename(path)


def abspath(path) -> str:
  """A local path made absolute; a URL as it is."""
  path = os.fspath(path)
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


# ------------------------------------------------------------ file system


def invalidate(path=None):
  """Drops gcsfs's cached listings (of `path`'s directory and parents, or all)."""
  fs = _gcsfs()
  fs.invalidate_cache(None if path is None else _key(os.fspath(path)))


def exists(path) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.exists(path)
  invalidate(path)
  return _gcsfs().exists(_key(path))


def isdir(path) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.isdir(path)
  invalidate(path)
  return _gcsfs().isdir(_key(path))


def isfile(path) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.isfile(path)
  invalidate(path)
  return _gcsfs().isfile(_key(path))


def listdir(path) -> list[str]:
  """The names in `path` (fresh: what other processes wrote too). On a store a
  directory is a name prefix: one with nothing under it lists as empty."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.listdir(path)
  fs = _gcsfs()
  fs.invalidate_cache(_key(path))
  try:
    entries = fs.ls(_key(path), detail=False)
  except FileNotFoundError:
    return []
  names = [posixpath.basename(e.rstrip('/')) for e in entries]
  return [n for n in names if n]


def makedirs(path):
  """mkdir -p; a no-op on an object store (directories are name prefixes)."""
  path = os.fspath(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path):
  """Deletes a file; FileNotFoundError if there is none."""
  path = os.fspath(path)
  if not is_remote(path):
    os.remove(path)
    return
  fs = _gcsfs()
  if not fs.exists(_key(path)):
    raise FileNotFoundError(path)
  fs.rm_file(_key(path))
  fs.invalidate_cache(_key(path))


def rmtree(path, ignore_errors: bool = False):
  path = os.fspath(path)
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=ignore_errors)
    return
  fs = _gcsfs()
  try:
    fs.rm(_key(path), recursive=True)
  except (OSError, ValueError):
    if not ignore_errors:
      raise
  fs.invalidate_cache(_key(path))


def move(src, dst):
  """Moves a file or a directory tree (on a store: copies, then deletes)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if not is_remote(src) and not is_remote(dst):
    shutil.move(src, dst)
    return
  if is_remote(src) != is_remote(dst):
    raise ValueError(f'move between a local path and a URL: {src} -> {dst}')
  fs = _gcsfs()
  fs.invalidate_cache(_key(src))
  # Copy, then delete: what gcsfs's mv falls back to where the store has no
  # moveTo (fake-gcs-server), without its error logs.
  fs.copy(_key(src), _key(dst), recursive=True)
  fs.rm(_key(src), recursive=True)
  fs.invalidate_cache(_key(src))
  fs.invalidate_cache(_key(dst))


def open_file(path, mode: str = 'r', **kwargs):
  """open() for either kind of path. On a store, 'w' writes the object whole at
  close; 'a' is refused (gcsfs would overwrite: see the module docstring)."""
  path = os.fspath(path)
  if not is_remote(path):
    return open(path, mode, **kwargs)  # noqa: SIM115
  if 'a' in mode or '+' in mode:
    raise ValueError(f'open({path!r}, {mode!r}): an object store cannot append or update')
  if 'b' not in mode:
    kwargs.setdefault('encoding', 'utf-8')
  if 'r' in mode:
    invalidate(path)
  return _gcsfs().open(_key(path), mode, **kwargs)


def read_bytes(path) -> bytes:
  path = os.fspath(path)
  if not is_remote(path):
    with open(path, 'rb') as f:
      return f.read()
  fs = _gcsfs()
  fs.invalidate_cache(_key(path))
  return fs.cat_file(_key(path))


def read_text(path, errors_: str = 'strict') -> str:
  return read_bytes(path).decode('utf-8', errors=errors_)


def write_bytes(path, data: bytes):
  """Writes a file whole, atomically: readers see the old or the new content
  (locally through a temporary file and a rename; on a store one PUT is)."""
  path = os.fspath(path)
  if not is_remote(path):
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
    return
  fs = _gcsfs()
  fs.pipe_file(_key(path), data)
  fs.invalidate_cache(_key(path))


def write_text(path, text: str):
  write_bytes(path, text.encode('utf-8'))


def create_exclusive(path, data: bytes) -> bool:
  """Creates `path` holding `data` if nothing is there; False if something is.

  Of processes racing to create one path, exactly one gets True: O_EXCL
  locally (written whole at once: a reader may see it empty for a moment), the
  store's conditional create (`ifGenerationMatch=0`) on Cloud Storage."""
  path = os.fspath(path)
  if not is_remote(path):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    return True
  fs = _gcsfs()
  try:
    fs.pipe_file(_key(path), data, mode='create')
  except FileExistsError:
    return False
  finally:
    fs.invalidate_cache(_key(path))
  return True


def info(path) -> dict[str, Any]:
  """{'size', 'modified' (seconds, by the store's or file system's clock),
  'generation' (an object's version on a store; None locally)}."""
  path = os.fspath(path)
  if not is_remote(path):
    st = os.stat(path)
    return {'size': st.st_size, 'modified': st.st_mtime, 'generation': None}
  fs = _gcsfs()
  fs.invalidate_cache(_key(path))
  i = fs.info(_key(path))
  updated = i.get('updated') or i.get('mtime')
  if hasattr(updated, 'timestamp'):
    modified = updated.timestamp()
  else:
    import datetime  # pylint: disable=import-outside-toplevel

    modified = datetime.datetime.fromisoformat(str(updated).replace('Z', '+00:00')).timestamp()
  return {'size': int(i.get('size') or 0), 'modified': modified, 'generation': i.get('generation')}


def now(directory) -> float:
  """The current time by `directory`'s own clock (the store's, or the file
  system's: NFS servers keep theirs), so that hosts whose clocks differ agree
  on how old a file is. Writes and deletes a small probe file."""
  directory = os.fspath(directory)
  probe = join(directory, f'.now-{os.getpid()}-{time.monotonic_ns()}')
  try:
    write_bytes(probe, b'')
    t = info(probe)['modified']
    remove(probe)
    return t
  except OSError:
    return time.time()


# ----------------------------------------------- conditional writes (stores)


def errors_of_the_store() -> tuple[type[BaseException], ...]:
  """What a failed request raises: OSError (a missing object or bucket, a
  refused request) and gcsfs's HttpError (a server error after its retries)."""
  try:
    from gcsfs.retry import HttpError  # pylint: disable=import-outside-toplevel
  except ImportError:
    return (OSError,)
  return (OSError, HttpError)


def write_if_generation(path, data: bytes, generation) -> str | None:
  """Replaces the object `path` with `data` only if its current version is
  `generation` (the store's `ifGenerationMatch`): the new generation, or None
  if the object was replaced or deleted meanwhile. Of writers racing with one
  generation, exactly one succeeds. Cloud Storage only (a local file has no
  generation). gcsfs's own writes take no precondition but `ifGenerationMatch=0`,
  so this is its upload request with one."""
  import json  # pylint: disable=import-outside-toplevel
  from urllib.parse import quote  # pylint: disable=import-outside-toplevel

  path = os.fspath(path)
  if not is_remote(path):
    raise ValueError(f'{path}: a local file has no generation')
  fs = _gcsfs()
  bucket, _, key = _key(path).partition('/')
  head = json.dumps({'name': key})
  body = (
    b'--==0==\nContent-Type: application/json; charset=UTF-8\n\n'
    + head.encode()
    + b'\n--==0==\nContent-Type: application/octet-stream\n\n'
    + data
    + b'\n--==0==--'
  )
  try:
    out = fs.call(
      'POST',
      f'{fs._location}/upload/storage/v1/b/{quote(bucket)}/o',  # pylint: disable=protected-access
      uploadType='multipart',
      headers={'Content-Type': 'multipart/related; boundary="==0=="'},
      data=body,
      json_out=True,
      ifGenerationMatch=str(generation),
    )
  except (FileExistsError, FileNotFoundError):  # 412: another version (or none) is there
    return None
  finally:
    fs.invalidate_cache(_key(path))
  return str(out['generation'])


def remove_if_generation(path, generation) -> bool:
  """Deletes the object `path` only if its current version is `generation`
  (`ifGenerationMatch` on the delete); False if another version (or none) is
  there. Cloud Storage only. (fake-gcs-server ignores this precondition on
  deletes; callers check what they delete first as well.)"""
  path = os.fspath(path)
  if not is_remote(path):
    raise ValueError(f'{path}: a local file has no generation')
  fs = _gcsfs()
  bucket, _, key = _key(path).partition('/')
  try:
    fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=str(generation))
  except (FileExistsError, FileNotFoundError):
    return False
  finally:
    fs.invalidate_cache(_key(path))
  return True


def put_tree(local_dir, remote_dir, sizes: dict[str, int] | None = None) -> dict[str, int]:
  """Uploads the files under the local directory `local_dir` to `remote_dir`
  (same relative names), each whole. `sizes` ({relative name: size} of an
  earlier call) skips the files that have not grown since; returns the new one."""
  sizes = dict(sizes or {})
  for parent, _, names in os.walk(local_dir):
    for name in sorted(names):
      src = os.path.join(parent, name)
      rel = os.path.relpath(src, local_dir).replace(os.sep, '/')
      size = os.path.getsize(src)
      if sizes.get(rel) == size:
        continue
      with open(src, 'rb') as f:
        write_bytes(join(remote_dir, rel), f.read())
      sizes[rel] = size
  return sizes
