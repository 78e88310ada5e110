"""Hostile custom implementations (issue 16): each breaks the audit a different way, after
which the sweep must go on with the point in error and the cause named. Each is otherwise a
correct BCE-with-logits, so that "error" can only come from the hostility itself."""
import ctypes
import os
import signal

import torch
import torch.nn.functional as F


def _bce(x, y, reduction="mean", **options):
    return F.binary_cross_entropy_with_logits(x, y, reduction=reduction, **options)


def segfault(x, y, reduction="mean", **options):
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    return _bce(x, y, reduction, **options)


def exit0(x, y, reduction="mean", **options):
    os._exit(0)


def system_exit(x, y, reduction="mean", **options):
    raise SystemExit(3)


def c_hang(x, y, reduction="mean", **options):
    # C code that never returns to Python: with SIGALRM blocked, the in-process timeout
    # cannot even interrupt the sleep; only killing the process stops it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    ctypes.CDLL(None).sleep(100)
    return _bce(x, y, reduction, **options)


def huge(x, y, reduction="mean", **options):
    torch.empty(50 << 30, dtype=torch.uint8).fill_(1)  # 50 GiB
    return _bce(x, y, reduction, **options)


def mutate(x, y, reduction="mean", **options):
    with torch.no_grad():
        x.mul_(2)
    return _bce(x, y, reduction, **options)


def chdir(x, y, reduction="mean", **options):
    os.chdir("/")
    return _bce(x, y, reduction, **options)


def torch_state(x, y, reduction="mean", **options):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(torch.get_num_threads() + 1)
    return _bce(x, y, reduction, **options)


def prints(x, y, reduction="mean", **options):
    print("HOSTILE PRINT")
    os.write(1, b"HOSTILE FD1\n")
    return _bce(x, y, reduction, **options)


_calls = [0]


def exit_when_timed(x, y, reduction="mean", **options):
    # Correct for the evaluation's two calls, then exits: only its timing dies.
    _calls[0] += 1
    if _calls[0] > 2:
        os._exit(5)
    return _bce(x, y, reduction, **options)
