"""Test-only fault injection: ``python tests/faults.py KILL_STEP [HOOK] jgoat-args...`` runs ``jgoat`` with a callback
that SIGKILLs the process at step index KILL_STEP (HOOK ``begin``: before that step runs; ``fetch``: when the rows
up to that step are fetched, before any logger writes them; ``save``: while the checkpoint of step KILL_STEP is being
saved, once every shard is written to orbax's temporary folder and before it is committed)."""

import os
import pathlib
import signal
import sys

from jgoat import cli, trainer


class KillAt(trainer.Callback):
    def __init__(self, step: int, hook: str = "begin"):
        self.step, self.hook = step, hook
        if hook == "save":
            import orbax.checkpoint as ocp

            finalize = ocp.CompositeCheckpointHandler.finalize

            def killing_finalize(handler, directory):
                if pathlib.Path(directory).name.split(".")[0] == str(step):
                    os.kill(os.getpid(), signal.SIGKILL)
                return finalize(handler, directory)

            ocp.CompositeCheckpointHandler.finalize = killing_finalize

    def on_step_begin(self, loop, step):
        if self.hook == "begin" and step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_metrics(self, loop, rows):
        if self.hook == "fetch" and any(r["step"] == self.step for r in rows):
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    step, hook, *argv = sys.argv[1:]
    sys.exit(cli.main(argv, callbacks=[KillAt(int(step), hook)]))
