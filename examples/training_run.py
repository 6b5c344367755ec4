"""Resumable training runs for the demo models' scripts (``train_mae.py``, ``train_dino.py``).

A run given ``--checkpoint-dir DIR`` keeps in ``DIR/state.pt`` everything its next step depends on: the
networks (MAE's decoder, DINO's teacher and heads included), the optimiser, the step reached and the planned
number of steps, extra tensors (DINO's centre), the states of every random generator (torch's, CUDA's,
numpy's, Python's and the data stream's own) and the per-step losses. The state is written every
``--checkpoint-every`` images, when ``--stop-after-images`` / ``--stop-after-seconds`` is reached, and on
SIGTERM or SIGINT (after the step in flight), always through a temporary file and ``os.replace``, so a
kill at any moment leaves the previous state whole. ``--resume`` continues from it: the steps that follow
are the ones an unsplit run would have taken (bit for bit on the same device and thread count).

The training loss goes to ``DIR/loss.jsonl``, one JSON object per logging interval:
``{"step", "images_seen", "loss" (mean over the interval), "lr", "seconds" (training wall time over all
runs), ...}``; ``examples/plot_training_loss.py`` draws it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from demo_data import FASHION_MNIST, TrainingClock, missing_fashion_mnist

STATE_FILE = "state.pt"
LOSS_LOG = "loss.jsonl"
STATE_FORMAT = 1
# Flags that say how this invocation runs, not what is trained: they may change between a run and its resumption.
RUN_CONTROL_FLAGS = frozenset({
    "device", "data_root", "out", "checkpoint_dir", "checkpoint_every", "resume", "stop_after_images",
    "stop_after_seconds", "max_seconds", "log_every",
})
LOG_POINTS = 200  # loss log entries over a whole run unless --log-every says otherwise
PRINT_POINTS = 20  # progress lines on stdout over a whole run
# Exit status of a run stopped by a signal after saving its state: the shell's 128 + signal number.
SIGNAL_EXIT_BASE = 128


def add_run_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The flags both training scripts share: the plan, the device and data, and run control."""
    parser.add_argument("--images-seen", type=int, default=600_000, help="training images in the whole plan")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=str(FASHION_MNIST))
    parser.add_argument("--max-seconds", type=float,
                        help="train fewer steps if steps 20-60 show the plan would take longer (first run only: "
                             "a resumed run keeps the plan saved in its state)")
    parser.add_argument("--out", default=out, help="the final float16 checkpoint, written when the plan is complete")
    control = parser.add_argument_group("resumable runs")
    control.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                         help=f"keep the training state in DIR/{STATE_FILE} and the loss log in DIR/{LOSS_LOG}")
    control.add_argument("--checkpoint-every", type=int, default=200_000, metavar="IMAGES",
                         help="save the state every IMAGES images")
    control.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint-dir")
    control.add_argument("--stop-after-images", type=int, metavar="IMAGES",
                         help="save the state and stop (exit 0) once IMAGES images have been seen; --resume continues")
    control.add_argument("--stop-after-seconds", type=float, metavar="S",
                         help="save the state and stop (exit 0) after S seconds of this invocation; --resume continues")
    control.add_argument("--log-every", type=int, metavar="IMAGES", help=f"loss log interval (default: the plan / {LOG_POINTS})")


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Reject flag values that cannot work (exit 2) and return the training device."""
    for flag in ("images_seen", "batch_size", "checkpoint_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    needs_dir = [f for f in ("resume", "stop_after_images", "stop_after_seconds") if getattr(args, f) not in (None, False)]
    if needs_dir and args.checkpoint_dir is None:
        parser.error(f"--{needs_dir[0].replace('_', '-')} needs --checkpoint-dir")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    missing = missing_fashion_mnist(("train",), args.data_root)
    if missing is not None:
        parser.error(f"--data-root: {missing}")
    return device


def training_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that shape what is trained (a resumed run must be given the same ones)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUN_CONTROL_FLAGS}


def fail(message: str) -> None:
    """A user error of the training scripts: one line on stderr, exit status 1."""
    raise SystemExit(f"error: {message}")


def _rng_states(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # numpy's key array as a list: the state file stays loadable with weights_only=True
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    np_state = states["numpy"]
    np.random.set_state({**np_state, "state": {"key": np.array(np_state["state"]["key"], dtype=np.uint32),
                                              "pos": np_state["state"]["pos"]}})
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))


class TrainingRun:
    """The step loop of one training script, resumable from ``--checkpoint-dir``.

    Build the networks, optimiser and generators first (with the script's seed), then this object: on
    ``--resume`` it loads their saved states and the random generators' states over them. Iterate over it
    for the step numbers to train, call :meth:`record` once per step, and when the loop ends check
    :attr:`complete` (the plan is done: write the final checkpoint) or call :meth:`exit_incomplete`.
    """

    def __init__(self, script: str, args: argparse.Namespace, device: torch.device, planned_steps: int,
                 modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                 tensors: dict[str, torch.Tensor] | None = None, generators: dict[str, torch.Generator] | None = None):
        self.script, self.args, self.device = script, args, device
        self.modules, self.optimizer = modules, optimizer
        self.tensors, self.generators = tensors or {}, generators or {}
        self.step, self.steps = 0, planned_steps
        self.losses: list[float] = []  # one per step taken, over all runs
        # losses still on the device: reading each at once would wait for the GPU at every step
        self._pending: list[torch.Tensor] = []
        self.log: list[dict[str, Any]] = []  # the loss log's entries, over all runs
        self.seconds_before = 0.0  # training wall time of the earlier runs
        self.runs = 1
        self.complete = False
        self.stopped_by: str | None = None  # why this invocation stopped before the plan's end
        self._signal: int | None = None
        self.dir: Path | None = args.checkpoint_dir
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if args.resume:
                self._load()
            elif self.state_path.exists():
                fail(f"{self.state_path} already holds a training state: pass --resume to continue it, "
                     "or give another --checkpoint-dir")
            self._rewrite_log()
        every = args.log_every or max(1, args.images_seen // LOG_POINTS)
        self.log_every_steps = max(1, every // args.batch_size)
        # the plan is shortened to --max-seconds only by the run that times steps 20-60 from step 0
        self.clock = TrainingClock(self.steps, args.max_seconds if self.step == 0 else None)
        self._last_lr = 0.0
        self._extra: dict[str, float] = {}

    @property
    def state_path(self) -> Path:
        assert self.dir is not None
        return self.dir / STATE_FILE

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / LOSS_LOG

    @property
    def seconds(self) -> float:
        """Training wall time over all runs so far."""
        return self.seconds_before + self.clock.seconds

    @property
    def images_seen(self) -> int:
        return self.step * self.args.batch_size

    def __iter__(self) -> Iterator[int]:
        """The step numbers left to train; stops early (state saved) on a signal or a --stop-after-* limit."""
        handlers = {}
        if self.dir is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            while self.step < self.steps:
                if self.step in TrainingClock.CALIBRATION:
                    self._read_losses()  # waits for the device, so the clock times finished steps
                self.steps = self.clock.tick(self.step)
                yield self.step
                self.step += 1
                self._after_step()
                self.stopped_by = self._stop_reason()
                if self.stopped_by is not None:
                    self.save()
                    return
                if self.dir is not None and self._checkpoint_due():
                    self.save()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        self.complete = True
        if self.dir is not None:
            self.save()

    def record(self, loss: torch.Tensor, lr: float, **extra: float) -> None:
        """The step just taken: its loss (a scalar tensor, read from the device only when logged), learning
        rate and any other scheduled value worth logging."""
        self._pending.append(loss.detach().float().reshape(()))
        # plain floats: the state file stays loadable with weights_only=True
        self._last_lr, self._extra = float(lr), {k: float(v) for k, v in extra.items()}

    def _read_losses(self) -> None:
        if self._pending:
            self.losses.extend(torch.stack(self._pending).cpu().tolist())
            self._pending.clear()

    def final_loss(self, last: int = 20) -> float:
        """Mean loss of the last ``last`` steps."""
        self._read_losses()
        tail = self.losses[-last:]
        return sum(tail) / len(tail)

    def summary(self) -> dict[str, Any]:
        """Run facts for the final checkpoint's ``training`` record."""
        seconds = self.seconds
        return {
            "images_seen": self.steps * self.args.batch_size, "batch_size": self.args.batch_size, "steps": self.steps,
            "seed": self.args.seed, "final_loss": self.final_loss(), "seconds": round(seconds, 1),
            "images_per_second": round(self.images_seen / seconds, 1) if seconds > 0 else None, "runs": self.runs,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
        }

    def exit_incomplete(self) -> None:
        """End an invocation stopped before the plan's end: exit 0 for a --stop-after-* limit, 128 + the
        signal number for a signal, after saying how to continue."""
        print(json.dumps({"stopped": self.stopped_by, "images_seen": self.images_seen,
                          "planned_images": self.steps * self.args.batch_size, "state": str(self.state_path),
                          "continue_with": "the same command with --resume"}), flush=True)
        raise SystemExit(SIGNAL_EXIT_BASE + self._signal if self._signal is not None else 0)

    def save(self) -> None:
        """Write the training state atomically: a temporary file beside it, then os.replace."""
        assert self.dir is not None
        self._read_losses()
        state = {
            "format": STATE_FORMAT, "script": self.script, "arguments": training_arguments(self.args),
            "device_type": self.device.type, "step": self.step, "steps": self.steps, "complete": self.complete,
            "seconds": self.seconds, "runs": self.runs, "losses": self.losses, "log": self.log,
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "tensors": dict(self.tensors),
            "generators": {name: g.get_state() for name, g in self.generators.items()},
            "rng": _rng_states(self.device),
        }
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def _load(self) -> None:
        path = self.state_path
        if not path.is_file():
            fail(f"--resume: no training state {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file that is not a torch state: name it, no traceback
            fail(f"{path}: not a readable training state ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            fail(f"{path}: not a training state of format {STATE_FORMAT}")
        if state["script"] != self.script:
            fail(f"{path} was written by {state['script']}, not {self.script}")
        if state["device_type"] != self.device.type:
            fail(f"{path} was trained on {state['device_type']}; resume it with --device {state['device_type']}")
        now = training_arguments(self.args)
        for flag, saved in state["arguments"].items():
            if now.get(flag) != saved:
                fail(f"{path} was trained with --{flag.replace('_', '-')} {saved}; "
                     f"resume it with the same value, not {now.get(flag)}")
        try:
            for name, module in self.modules.items():
                module.load_state_dict(state["modules"][name])
            self.optimizer.load_state_dict(state["optimizer"])
            for name, tensor in self.tensors.items():
                tensor.copy_(state["tensors"][name])
            for name, generator in self.generators.items():
                generator.set_state(state["generators"][name])
            _set_rng_states(state["rng"], self.device)
        except (KeyError, RuntimeError, ValueError) as e:
            fail(f"{path} does not fit {self.script}'s networks: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        self.step, self.steps, self.complete = state["step"], state["steps"], state["complete"]
        self.losses, self.log = list(state["losses"]), list(state["log"])
        self.seconds_before, self.runs = state["seconds"], state["runs"] + 1

    def _rewrite_log(self) -> None:
        """The loss log as the state knows it: entries a killed run wrote after its last save are dropped
        (those steps are trained again)."""
        tmp = self.log_path.with_name(self.log_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(entry) + "\n" for entry in self.log))
        os.replace(tmp, self.log_path)

    def _after_step(self) -> None:
        done = self.step - 1  # the step just taken, numbered from 0
        printing = done % max(1, self.steps // PRINT_POINTS) == 0 or self.step == self.steps
        logging = self.step % self.log_every_steps == 0 or self.step == self.steps
        if not (printing or logging):
            return
        self._read_losses()
        if printing:
            print(json.dumps({"step": done, "loss": round(self.losses[-1], 4), "images_seen": self.images_seen,
                              "seconds": round(self.seconds, 1)}), flush=True)
        if not logging:
            return
        entry = {"step": self.step, "images_seen": self.images_seen, "loss": self.losses[-1], "lr": self._last_lr,
                 "seconds": round(self.seconds, 3), **self._extra}
        since = self.log[-1]["step"] if self.log else 0
        interval = self.losses[since:]
        entry.update(loss=sum(interval) / len(interval), steps_in_interval=len(interval))
        self.log.append(entry)
        if self.dir is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _checkpoint_due(self) -> bool:
        every, batch = self.args.checkpoint_every, self.args.batch_size
        return self.images_seen // every > (self.images_seen - batch) // every

    def _stop_reason(self) -> str | None:
        if self.step >= self.steps:
            return None
        if self._signal is not None:
            return signal.Signals(self._signal).name
        if self.args.stop_after_images is not None and self.images_seen >= self.args.stop_after_images:
            return "--stop-after-images"
        if self.args.stop_after_seconds is not None and self.clock.seconds >= self.args.stop_after_seconds:
            return "--stop-after-seconds"
        return None

    def _on_signal(self, signum: int, frame: Any) -> None:
        # only a flag: the step in flight finishes, then the state is saved and the run exits
        self._signal = signum
