"""Test helper: run ``medqa train`` and send this very process a real signal at a chosen point.

    python tests/support/inject_fault.py SIGNAL WHERE N [medqa train args...]

SIGNAL is KILL, TERM or INT. WHERE is
  forward  during the forward of the N-th training micro-batch (counted from the run's start),
           once every checkpoint asked for before has landed (they are written in the
           background: without the wait, what is on disk at the kill would be a race)
  save     while the training state of step N is being written (on the writer's thread): every
           file is there but the manifest, which is written last

Nothing in medqa_loop knows about this: the hooks wrap its functions from outside, and the signal
is delivered by the kernel as any other. SIGKILL ends the process on the spot: no handler, no
cleanup, no flush. The tests then resume with the plain entry point.
"""

import os
import signal
import sys

import medqa_loop.loop as loop
import medqa_loop.checkpoint.state as state
import medqa_loop.checkpoint.writer as writer
from medqa_loop.train import main


def inject(signum: int, where: str, n: int) -> None:
    if where == "forward":
        forward, calls, writers = loop.model_loss_sum, [0], []
        make_writer = writer.CheckpointWriter.__init__

        def recording_init(self, *args, **kwargs):
            make_writer(self, *args, **kwargs)
            writers.append(self)

        def counting_forward(model, batch):
            if model.training:  # evaluation forwards do not count
                calls[0] += 1
                if calls[0] == n:
                    for w in writers:
                        w.wait()
                    os.kill(os.getpid(), signum)
            return forward(model, batch)

        writer.CheckpointWriter.__init__ = recording_init

        loop.model_loss_sum = counting_forward
    elif where == "save":
        write_manifest = state.StateSaver._write_manifest

        def dying_write_manifest(tmp):
            if tmp.name == f".tmp-step-{n}":
                os.kill(os.getpid(), signum)
            write_manifest(tmp)

        state.StateSaver._write_manifest = staticmethod(dying_write_manifest)
    else:
        raise SystemExit(f"unknown fault point {where!r}")


if __name__ == "__main__":
    name, where, n, *args = sys.argv[1:]
    inject(signal.Signals[f"SIG{name}"], where, int(n))
    main(args)
