"""
The error a user can fix (a bad config key, a bad data file or row) and how a command reports it:
one line `error: ...` and exit status 2, no traceback. Every module raises ConfigError; the
commands (train.py, generate.py, sweep.py) install one_line_errors().
"""
import errno
import os
import sys

before_exit = []  # run before a one-line error's exit, which skips atexit (train.py: release out_dir's lock)

class ConfigError(ValueError):
    """a bad config key or bad input data: the script prints it as one line, without a traceback."""

def one_line_errors():
    """sys.excepthook for train.py: a ConfigError (and a full disk) ends the run with `error: ...`
    on stderr (rank 0 only under torchrun) and exit status 2 (1 for the disk); any other
    exception keeps its traceback."""
    def hook(kind, e, tb):
        disk = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (isinstance(e, ConfigError) or disk):
            return sys.__excepthook__(kind, e, tb)
        for f in before_exit:
            f()
        sys.stdout.flush()
        if int(os.environ.get("RANK", 0)) == 0:
            # the real stderr: torch.distributed wraps this hook and buffers sys.stderr until it returns
            bar = "tqdm" in sys.modules and bool(getattr(sys.modules["tqdm"].tqdm, "_instances", None))
            print(
                ("\n" if bar else "") + f"error: {e.strerror if disk and e.strerror else e}",
                file=sys.__stderr__,
                flush=True,
            )
        os._exit(1 if disk else 2)  # skips the process group's teardown, which would wait for the other ranks
    sys.excepthook = hook
