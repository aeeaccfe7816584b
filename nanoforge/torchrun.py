"""torchrun, ending in one line instead of a traceback when it is stopped or a worker fails.

    python -m nanoforge.torchrun --standalone --nproc_per_node=2 -m stages.train

Notable:
- It is torch's own launcher (`torch.distributed.run.main`, what the `torchrun` script
  calls) in this process: every option, the rendezvous, forwarding a signal to the
  workers and waiting for them (train saves a checkpoint) are torchrun's, unchanged.
- torchrun turns SIGTERM/SIGINT into a SignalException that ends in a traceback and exit 1,
  although the workers stopped cleanly (train: checkpoint saved, exit 143). Here it is one
  line after the workers' own and exit 128 + the signal (143 for SIGTERM), what the train
  stage itself returns and what the orchestrator reads as "stopped; run again to resume".
- A failed worker (ChildFailedError) is one `error:` line naming its rank and exit code
  (its own error is printed above it) and exits with that code, not torchrun's 1.
- Multi-node: the c10d store lives in the first agent that arrived; when that node dies the
  others lose the rendezvous (RendezvousError, a traceback wall in torchrun). Here it is one
  `error:` line saying a node is gone and how to resume (the same command on every node,
  any node count), exit 1.
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        # the workers said what they did (train: "stopped: ... checkpoint saved"): one line to close
        print(f"torchrun: {name}, the workers were stopped; exit {128 + int(exc.sigval)}", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit {failure.exitcode}"
        print(f"error: {len(exc.failures)} worker(s) failed, first rank {rank} ({how}); its error is printed above",
              file=sys.stderr)
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode if failure.exitcode < 0 else 1
        return code
    except RendezvousError as exc:
        cause = " ".join(str(exc.__cause__ or exc).split())[:200]
        print(f"error: lost the rendezvous with the other nodes ({type(exc).__name__}: {cause}): a node died or "
              "left (the first to arrive holds the c10d store); the workers here were stopped. Run the same "
              "command on every node that is left: training resumes from the last checkpoint, at any node count",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
