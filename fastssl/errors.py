"""The one exception type that reaches users, and the checks every tool makes at its boundary.

Anything a user can fix (a recipe key, a path, a corrupt file, a missing optional package) is raised as
`UserError` with a one-line message naming the value received and what was expected. The command-line
tools catch it, print `error: <message>` and exit with status 2; everything else is a bug and keeps its
traceback. `ArgumentParser` gives argparse's own errors the same one-line form. With several processes,
`raise_together` raises one process's error on all of them (none is left waiting at a collective) and
`from_main` gives all of them the main process's decision.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from functools import wraps


class UserError(Exception):
    """An error caused by user input; its message is shown as one line, without a traceback."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class Terminated(KeyboardInterrupt):
    """SIGTERM inside sigterm_as_interrupt(). A KeyboardInterrupt, so every clean-up written for Ctrl-C (removing
    a half-written output) runs for a scheduler's time limit or `kill` too."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread instead of killing the process at once (which
    skips every clean-up). Later SIGTERMs are ignored so they cannot cut the clean-up short; SIGKILL still ends it."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def _error_line(message: str) -> str:
    """`error: ...`, or `error: [rank N] ...` on a non-main process of a distributed launch. Every rank keeps
    printing (a data error may strike one rank only, and a silent rank would hide it); the tag tells the
    otherwise identical lines of `accelerate launch` apart."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        world, rank = 1, 0
    return f"error: [rank {rank}] {message}" if world > 1 and rank != 0 else f"error: {message}"


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a tool's main(): UserError, Ctrl-C and SIGTERM (Terminated) become one line on stderr and a non-zero
    exit (130 and 143 for the signals, as the shell reports a process they killed)."""

    @wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs) or 0
        except UserError as e:
            print(_error_line(str(e)), file=sys.stderr)
            return 2
        except Terminated:
            print(_error_line("terminated (SIGTERM)"), file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            print(_error_line("interrupted"), file=sys.stderr)
            return 130
        except Exception as e:
            if not _compiler_failed(e):
                raise
            reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            print(_error_line(f"torch.compile could not build its kernels: {reason}; run eager with model.compile=false "
                              "data.compile=false (bench: --compile false)"), file=sys.stderr)
            return 2

    return wrapper


def _compiler_failed(error: BaseException) -> bool:
    """torch.compile's backend failed (no working C++ compiler on a CPU, or Triton's build of its launcher on a
    GPU): a fact of the machine, answered with one line and the switch that avoids it. Found by class name, so
    that this module imports no torch."""
    return any(c.__name__ == "BackendCompilerFailed" and c.__module__.startswith("torch._dynamo")
               for c in type(error).__mro__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with the tools' error form: one `error:` line instead of the usage block, exit 2.
    Sub-parsers are of this class too (argparse's add_subparsers defaults parser_class to type(self))."""

    def error(self, message: str):
        print(_error_line(f"{' '.join(message.split())} (see --help)"), file=sys.stderr)
        sys.exit(2)

    def add_subparsers(self, **kwargs):
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_command_args(self, argv: list[str] | None = None) -> argparse.Namespace:
        """parse_intermixed_args for a parser with sub-commands, so `section.key=value` overrides may sit between
        options. argparse refuses intermixed parsing of a sub-parsers positional (TypeError), so the chosen
        sub-command's own parser parses everything after its name. The parent takes no options of its own."""
        argv = sys.argv[1:] if argv is None else list(argv)
        commands = self._commands
        if argv and argv[0] in commands.choices:
            args = commands.choices[argv[0]].parse_intermixed_args(argv[1:])
            setattr(args, commands.dest, argv[0])
            return args
        return self.parse_args(argv)  # --help, or a missing or unknown command: argparse's own message


SEED_MAX = 2**32 - 1  # numpy's and accelerate's set_seed bound


def seed_option(text: str) -> int:
    """argparse type of a --seed: an integer in [0, 2**32 - 1], as every seeded library accepts."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; expected an integer in [0, 2**32 - 1]") from None
    if not 0 <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{seed}; expected an integer in [0, 2**32 - 1]")
    return seed


def resolve_device(choice: str | None, option: str = "--device") -> str:
    """'auto' | 'cpu' | 'cuda' (None = auto) -> 'cuda' or 'cpu', refusing a GPU that is not there."""
    import torch

    choice = "auto" if choice is None else choice
    if choice not in ("auto", "cpu", "cuda"):
        raise UserError(f"{option} {choice!r}; expected auto, cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} cuda but torch sees no CUDA GPU on this machine; use auto or cpu")
    return "cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu"


def resolve_compile(flag: str, device, key: str = "model.compile") -> bool:
    """A recipe's auto | true | false compile switch: auto compiles on CUDA (compiling on a CPU costs a minute
    or more and gains little)."""
    valid = ("auto", "true", "false")
    if flag not in valid:
        raise UserError(f"unknown {key} {flag!r}; valid: {', '.join(valid)}")
    return flag == "true" or (flag == "auto" and device.type == "cuda")


def raise_together(accelerator, failure: str | None) -> None:
    """Raise UserError(failure) on every process if any process has one: a rank that raised alone would leave
    the others waiting at their next collective until its timeout."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        failures: list = [None] * accelerator.num_processes
        dist.all_gather_object(failures, failure)
        failure = next((f for f in failures if f), None)
    if failure:
        raise UserError(failure)


def from_main(accelerator, value):
    """The main process's `value` on every process: a decision that reads files (which another node may see
    late) is taken once, so every process takes the same branch before the next collective."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value
