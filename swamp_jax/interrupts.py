"""Ctrl-C during a run: it stops the run between saves, and is never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT
arrives. Two places need care:

- Inside an orbax save, or a wait for one, an interrupt leaves the save
  half-started and its threads failing at exit. ``deferred`` holds Ctrl-C
  back until such a block returns.
- Inside a garbage-collector callback (jax registers one), a ``__del__`` or
  a weakref callback, Python prints the ``KeyboardInterrupt`` as "Exception
  ignored" and drops it, and a run went on as if Ctrl-C had not been pressed
  (CI saw one ignore it for 120 s). ``handled`` remembers every Ctrl-C, and
  ``check`` (between training chunks, and when a deferred block ends) raises
  the one that was dropped.

Outside ``handled`` (a run in a thread, or in a program with a SIGINT
handler of its own) all three do nothing, and Ctrl-C is the program's.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class _CtrlC:
  """The SIGINT handler of one run: remembers, then raises unless deferred."""

  def __init__(self):
    self.received = False
    self.deferring = 0

  def __call__(self, signum, frame):
    self.received = True
    if not self.deferring:
      raise KeyboardInterrupt


_active: _CtrlC | None = None


@contextlib.contextmanager
def handled():
  """Ctrl-C for the block (a run), if SIGINT has Python's default handler
  and this is the main thread; otherwise the block runs unchanged."""
  global _active
  if (
    _active is not None
    or threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
  ):
    yield
    return
  _active = _CtrlC()
  signal.signal(signal.SIGINT, _active)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _active = None


def check():
  """Raises ``KeyboardInterrupt`` if Ctrl-C was pressed in this run (outside
  a deferred block), whether or not Python delivered it."""
  if _active is not None and _active.received and not _active.deferring:
    raise KeyboardInterrupt


@contextlib.contextmanager
def deferred():
  """Holds Ctrl-C back until the block ends, then raises it."""
  if _active is None:
    yield
    return
  _active.deferring += 1
  try:
    yield
  finally:
    _active.deferring -= 1
  check()
