"""Stop a fit cleanly on SIGTERM / SIGINT, and save on SIGUSR1, after the current optimizer step.

Used by :class:`~glow_lightning.callbacks.checkpoint.GlowCheckpoint`, which writes ``last.ckpt`` when a
stop or save is requested. Schedulers send SIGTERM (Kubernetes, preemptible VMs, ``scancel``), a
user Ctrl-C sends SIGINT, SLURM's ``#SBATCH --signal=SIGUSR1@90`` sends SIGUSR1 ahead of the time
limit (Lightning's SLURM handler then writes ``hpc_ckpt_N.ckpt`` and requeues the job). Exit codes
follow the shell convention 128 + signal number (143 for SIGTERM, 130 for SIGINT).

- The handlers only record the signal; the fit stops after the step in progress through Lightning's
  own SIGTERM path (``SIGTERMException`` at the end of the training batch). A second SIGINT raises
  ``KeyboardInterrupt`` at once, as Python's default handler does.
- A DataLoader worker forked from the main process inherits the handlers; there they do nothing
  (the main process shuts the workers down), so ``kill -TERM -<process group>`` or ``scancel`` ends
  the run as a signal to the main process alone does, not with a worker error.
- Under DDP a signal may reach a single rank: the flags are all-reduced (MAX) once per step when
  ``world_size > 1``, so all ranks stop at the same step; only rank 0 writes (Lightning's
  ``trainer.save_checkpoint``).

Private library API used here (check on upgrades): ``Trainer._signal_connector.received_sigterm`` (the
flag Lightning's loops test after each batch; the public ``trainer.received_sigterm`` is read-only) and
``Trainer._accelerator_connector.cluster_environment`` (SLURM's requeue signal).
Source for the exit-code convention: the POSIX shell, "Exit Status for Commands"
(https://pubs.opengroup.org/onlinepubs/9699919799/utilities/V3_chap02.html#tag_18_08_02).
"""

from __future__ import annotations

import os
import signal

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def requeue_signal(trainer) -> int:
    """SLURM's requeue signal of this run (Lightning's ``SLURMEnvironment.requeue_signal``), else SIGUSR1."""
    environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
    return int(getattr(environment, "requeue_signal", None) or signal.SIGUSR1)


def exit_code(signum: int) -> int:
    """The shell's exit status of a command ended by signal ``signum`` (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + int(signum)


class SignalFlags:
    """Signal handlers that record a stop (SIGTERM / SIGINT) or save request (SIGUSR1) for the fit loop."""

    def __init__(self):
        self.signum: int | None = None  # the stop signal received, if any
        self.save_requested = False
        self._pid: int | None = None
        self._previous: dict[int, object] = {}
        self._trainer = None

    @property
    def installed(self) -> bool:
        return self._pid is not None

    def install(self, trainer) -> None:
        """Install the handlers (main thread only); the previous ones are chained (SIGUSR1) or kept for restore."""
        if self.installed or not hasattr(signal, "SIGUSR1"):  # no SIGUSR1 on Windows: leave Lightning's handling
            return
        self._pid, self._trainer = os.getpid(), trainer
        handlers = {int(s): self._stop for s in STOP_SIGNALS}
        handlers[requeue_signal(trainer)] = self._save
        try:
            for signum, handler in handlers.items():
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, handler)
        except ValueError:  # not the main thread
            self.uninstall()

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous, self._pid = {}, None

    def _stop(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides
            return
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = self.signum or int(signum)
        if self._trainer.world_size <= 1:  # under DDP, sync() sets it on every rank at the same step
            self._trainer._signal_connector.received_sigterm = True  # Lightning stops after this batch

    def _save(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        self.save_requested = True
        previous = self._previous.get(int(signum))
        if callable(previous):  # Lightning's SLURM handler: hpc_ckpt_N.ckpt and the requeue
            previous(signum, frame)

    def sync(self, trainer) -> None:
        """All ranks agree on the flags (one all-reduce per step, only when ``world_size > 1``)."""
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        flags = torch.tensor(
            [self.signum or 0, int(self.save_requested)], device=trainer.strategy.root_device, dtype=torch.int64
        )
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if int(flags[0]):
            self.signum = int(flags[0])
            trainer._signal_connector.received_sigterm = True
        self.save_requested = bool(flags[1])
