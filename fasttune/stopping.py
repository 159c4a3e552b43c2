"""Stop signals: SIGTERM or SIGINT (Ctrl-C) ends a run after the step it is in, with a checkpoint.

- `StopSignals` replaces the two handlers while the loop runs. The first signal only sets a flag
  (and says so on rank 0); the loop adds the flag to the host all-reduce it does once per step
  anyway, so every rank learns of it at the same step, finishes that optimizer step, rank 0 writes
  the checkpoint, and all raise `Stopped`: the CLI prints its one line and exits 143 (SIGTERM) or
  130 (SIGINT), as a shell reports a process ended by that signal.
- A second Ctrl-C exits at once (130): checkpoints are renamed into place whole, so the last
  complete one stays intact. Under torchrun a Ctrl-C reaches each worker twice - from the terminal,
  then forwarded by torchrun - so there a second SIGINT within `SAME_WINDOW_S` of the first counts
  as the same one. A second SIGTERM changes nothing (SLURM and torchrun may both send one).
- `forward_to(child)`: the `--nproc` launcher passes SIGTERM on to torchrun and waits for it.
"""

import os
import signal
import threading
import time

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
SAME_WINDOW_S = 2.0


class Stopped(Exception):
    """The run stopped on a signal after writing its checkpoint; `code` is the exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class StopSignals:
    """A context manager: while inside, SIGTERM and SIGINT set `signum` instead of ending the process."""

    def __init__(self, main=True, forwarded=False):
        self.main, self.forwarded = main, forwarded  # forwarded: under torchrun (Ctrl-C arrives twice)
        self.signum, self.at, self._old = None, 0.0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python's rule for signal handlers
            for s in EXIT_CODES:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:  # under torchrun another rank may have been the one signalled
        return signal.Signals(self.signum).name if self.signum else "a signal to another rank"

    @property
    def code(self) -> int:
        return EXIT_CODES.get(self.signum, 143)

    def _say(self, text):
        if self.main:  # os.write, not print: the handler may interrupt a print of the progress bar
            os.write(2, ("\n" + text + "\n").encode())

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.at = signum, now
            self._say(f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                      "(Ctrl-C again to quit at once)")
        elif signum == signal.SIGINT and not (self.forwarded and now - self.at < SAME_WINDOW_S):
            self._say("second Ctrl-C: quitting now, without a new checkpoint; the last complete one is intact")
            os._exit(130)


def forward_to(child):
    """Wait for the `child` process (torchrun), passing SIGTERM on to it; a Ctrl-C reaches it (and its
    workers) from the terminal, so SIGINT is only noted. Returns the child's exit status, or 143/130
    when a signal ended it."""
    got = []

    def handle(signum, frame):
        got.append(signum)
        if signum == signal.SIGTERM:
            child.send_signal(signum)

    old = {s: signal.signal(s, handle) for s in EXIT_CODES}
    try:
        rc = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return EXIT_CODES[got[0]] if got and rc != 0 else rc
