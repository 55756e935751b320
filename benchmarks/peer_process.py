"""The benchmarks' peer side (diffusers) in a process of its own.

A user's run holds one library, not both. In one process the two share
glibc's heap, so memory either side frees moves under the other: measured on
a 2-core VM, our first train step after the peer's ran up to 2x slower, and
once XLA's scratch memory is kept for reuse (`ddpm_jax.cpu_memory`) the
peer's blocks fragment the heap it is reused from. So the
benchmarks build the peer in a spawned process and drive it call by call,
interleaved with ours.
"""
import functools
import multiprocessing
from typing import Any, Callable


def _serve(conn, factory, args, kwargs) -> None:
  """The peer process: `obj = factory(*args, **kwargs)`, then `obj.NAME(*args)` per message.

  Every reply is ('ok', result) or ('error', exception); a failed call does
  not end the process, a failed `factory` does.
  """
  from ddpm_jax import cpu_memory  # pylint: disable=g-import-not-at-top
  cpu_memory.reuse_scratch()  # the settings of the benchmark's own process

  try:
    try:
      obj = factory(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      conn.send(("error", e))  # raised again in the parent
      return
    conn.send(("ok", None))
    while (message := conn.recv()) is not None:
      name, call_args = message
      try:
        answer = ("ok", getattr(obj, name)(*call_args))
      except Exception as e:  # pylint: disable=broad-except
        answer = ("error", e)
      conn.send(answer)
  finally:
    conn.close()


class PeerProcess:
  """`factory(*args, **kwargs)` built in a spawned process; `peer.NAME(*a)` calls its method.

  `factory` must be importable by name (a module-level class or function)
  and every argument and result picklable. An exception in the process is
  raised again by the call that caused it. Use as a context manager (or call
  `close()`) to end the process.
  """

  def __init__(self, factory: Callable[..., Any], *args, **kwargs):
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._process = ctx.Process(target=_serve, args=(child, factory, args, kwargs),
                                daemon=True)
    self._process.start()
    child.close()
    try:
      self._receive()
    except BaseException:
      self.close()
      raise

  def _receive(self) -> Any:
    try:
      status, value = self._conn.recv()
    except EOFError:
      raise RuntimeError(f"the peer process died (exit code {self._process.exitcode}); "
                         "its error is above.") from None
    if status == "error":
      raise value
    return value

  def _call(self, name: str, *args) -> Any:
    self._conn.send((name, args))
    return self._receive()

  def __getattr__(self, name: str) -> Callable[..., Any]:
    if name.startswith("_"):
      raise AttributeError(name)
    return functools.partial(self._call, name)

  def close(self) -> None:
    if self._process.is_alive():
      try:
        self._conn.send(None)
      except OSError:
        pass
      self._process.join(timeout=60)
      if self._process.is_alive():
        self._process.kill()
    self._conn.close()

  def __enter__(self) -> "PeerProcess":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
