"""A warm interpreter for the tests' train.py runs. A run of a tiny model spends ~5 of its ~7 CPU
seconds importing torch (with torch._dynamo, which the optimizer imports), transformers and datasets;
the suite runs train.py hundreds of times. This process imports them once, then runs each request in
a fork of itself: the child points fds 0/1/2 at /dev/null and the request's files, takes the
request's directory, environment and argv, runs the script as __main__ (runpy), then the atexit
handlers, and leaves with the script's exit code, as `python train.py ...` would. No project module
is imported here, so each run imports the repository's code fresh.

Protocol (one JSON object per line): request {"argv", "cwd", "env", "stdout", "stderr"} on stdin;
answers {"pid": ...} when the child starts and {"rc": ...} when it ends (negative: killed by that
signal, as subprocess reports it). helpers.run_train falls back to a plain subprocess whenever
this process cannot serve a request the same way (torchrun, BIPOST_TEST_WARM=0); one such process
serves one environment."""
import atexit
import json
import os
import random
import runpy
import signal
import sys
import threading
import traceback

import numpy as np
import torch
import torch._dynamo  # noqa: F401  (torch.optim imports it on the first optimizer: 1-2 s)
import datasets  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
import safetensors.torch  # noqa: F401

def child(req):
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = list(req["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
        random.seed()  # a fresh process draws fresh seeds
        np.random.seed()
        code, interrupted = 0, False
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException as e:  # what the interpreter does: the script's sys.excepthook (train.py's
            sys.excepthook(type(e), e, e.__traceback__)  # ends a ConfigError in one line, exit 2), else 1
            code, interrupted = 1, isinstance(e, KeyboardInterrupt)
        threading._shutdown()  # the interpreter's exit: join non-daemon threads, then atexit, then flush
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        if interrupted:  # an uncaught KeyboardInterrupt ends the process by SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)

def main():
    if threading.active_count() != 1:  # a fork copies one thread: refuse, the helper runs subprocesses
        print(json.dumps({"error": f"{threading.active_count()} threads after the imports"}), flush=True)
        return
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)

if __name__ == "__main__":
    main()
