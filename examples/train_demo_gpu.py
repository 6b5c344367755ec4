"""Retrain both demo models in one call within a wall-time budget, resumably, then evaluate them and plot
their loss curves: the one command a session with a GPU runs.

    python examples/train_demo_gpu.py --out-dir runs/demo --device cuda --budget-seconds 480 \\
        --mae-images 10000000 --dino-images 3000000 --batch-size 512 --data-root DATA --bring-back "$OUT"

``train_mae.py`` and ``train_dino.py`` run as two processes at once on the one device (``--sequential``:
one after the other), each with ``--checkpoint-dir OUT_DIR/{mae,dino}``. A fresh run is given the training
part of the budget as ``--max-seconds``, so it shortens its plan to what fits after timing steps 20-60 and
ends its schedule properly (``--no-fit`` keeps the plan and pauses instead); every run also stops, state
saved, at ``--stop-after-seconds``. Exit status 0 when both models are complete, 3 when one is not:
run the same command again to continue (``--resume`` is passed where a state exists). Then ``evaluate_demo.py`` measures the new weights, the shipped ones and
the random-weights baseline (``OUT_DIR/evaluation.md``), and ``plot_training_loss.py`` draws the curves
(``OUT_DIR/loss_curves.png``) and prints their flatness.

``--models dino`` trains only the DINO model (the shipped ``demo:mae`` already meets its target; ``--models
mae`` the MAE alone, with ``train_mae.py``'s defaults, the shipped recipe).

``--bring-back DIR`` copies the results into DIR in the same layout, at most 8 files (states only for runs
not yet complete): give that copy as ``--out-dir`` on a fresh machine to continue there.

    OUT_DIR/mae/state.pt  OUT_DIR/mae/loss.jsonl  OUT_DIR/mae.pth
    OUT_DIR/dino/state.pt OUT_DIR/dino/loss.jsonl OUT_DIR/dino.pth
    OUT_DIR/loss_curves.png OUT_DIR/evaluation.md
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from demo_data import FASHION_MNIST, missing_fashion_mnist
from plot_training_loss import flatness, images_per_second, read_loss_log
from training_run import LOSS_LOG, STATE_FILE

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent
SCRIPTS = {"mae": "train_mae.py", "dino": "train_dino.py"}
INCOMPLETE_EXIT = 3  # a model's plan is not complete yet: run the same command again
# Seconds kept out of the training budget: the runs' start-up before their clocks start and their last save.
START_AND_SAVE_MARGIN = 30.0


def python_env() -> dict[str, str]:
    """The children's environment: unbuffered output and attnflow importable from this checkout."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def read_state(checkpoint_dir: Path) -> dict | None:
    """The facts of a saved training state (no tensors kept), or None where there is none."""
    import torch

    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {"step": state["step"], "steps": state["steps"], "complete": state["complete"],
            "images_seen": state["step"] * state["arguments"]["batch_size"],
            "planned_images": state["steps"] * state["arguments"]["batch_size"], "seconds": round(state["seconds"], 1),
            "runs": state["runs"], "final_loss": sum(state["losses"][-20:]) / max(1, len(state["losses"][-20:]))}


def training_command(args: argparse.Namespace, name: str, seconds: float) -> list[str]:
    """The command line of one model's training run, given ``seconds`` of this call."""
    images = {"mae": args.mae_images, "dino": args.dino_images}[name]
    checkpoint_dir = args.out_dir / name
    command = [sys.executable, str(EXAMPLES / SCRIPTS[name]), "--images-seen", str(images),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device,
               "--data-root", str(args.data_root), "--out", str(args.out_dir / f"{name}.pth"),
               "--checkpoint-dir", str(checkpoint_dir), "--checkpoint-every", str(args.checkpoint_every),
               "--stop-after-seconds", f"{seconds:.0f}"]
    if (checkpoint_dir / STATE_FILE).is_file():
        command.append("--resume")
    elif args.fit:
        # a fresh run shortens its plan so that it ends inside this call, schedule and all
        command += ["--max-seconds", f"{0.95 * seconds:.0f}"]
    return command


def run_training(args: argparse.Namespace, seconds: float) -> dict[str, int]:
    """Train the models not yet complete, together or one after the other; their exit statuses."""
    todo = [n for n in args.models if not ((read_state(args.out_dir / n) or {}).get("complete")
                                           and (args.out_dir / f"{n}.pth").is_file())]
    codes: dict[str, int] = {n: 0 for n in args.models if n not in todo}
    children: dict[str, subprocess.Popen] = {}

    def forward(signum, frame):  # a stopped driver stops its runs cleanly: they save their states
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    start = time.monotonic()
    try:
        for name in todo:
            left = seconds
            if args.sequential:  # MAE gets its share; DINO what is left after it
                left = seconds * args.mae_share if name == "mae" and len(todo) > 1 else seconds - (time.monotonic() - start)
            log = open(args.out_dir / f"{name}_train.log", "w")
            command = training_command(args, name, max(1.0, left))
            print(f"[{name}] {' '.join(command)}", flush=True)
            children[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=python_env(), cwd=REPO)
            if args.sequential:
                codes[name] = children[name].wait()
        for name, child in children.items():
            codes[name] = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for name in children:
        tail = (args.out_dir / f"{name}_train.log").read_text().splitlines()[-4:]
        print(f"[{name}] exit {codes[name]}; last lines:\n  " + "\n  ".join(tail), flush=True)
    return codes


def evaluate(args: argparse.Namespace, complete: list[str]) -> int:
    specs = [f"demo:{n}={args.out_dir / f'{n}.pth'}" for n in complete] + ["demo:mae", "demo:dino", "demo:random"]
    command = [sys.executable, str(EXAMPLES / "evaluate_demo.py"), *specs, "--train", str(args.eval_train),
               "--test", str(args.eval_test), "--data-root", str(args.data_root), "--device", args.device,
               "--table", str(args.out_dir / "evaluation.md")]
    print(" ".join(command), flush=True)
    return subprocess.run(command, env=python_env(), cwd=REPO).returncode


def plot(args: argparse.Namespace) -> int:
    logs = [f"{n}={args.out_dir / n / LOSS_LOG}" for n in args.models if (args.out_dir / n / LOSS_LOG).is_file()]
    if not logs:
        return 0
    command = [sys.executable, str(EXAMPLES / "plot_training_loss.py"), *logs, "--out", str(args.out_dir / "loss_curves.png")]
    return subprocess.run(command + (["--log-x"] if args.log_x else []), env=python_env(), cwd=REPO).returncode


def bring_back(args: argparse.Namespace, states: dict[str, dict | None]) -> None:
    """Copy what a later session needs into --bring-back, in --out-dir's layout (at most 8 files)."""
    files = [Path("loss_curves.png"), Path("evaluation.md")]
    for name, state in states.items():
        files.append(Path(name) / LOSS_LOG)
        files.append(Path(f"{name}.pth") if state and state["complete"] else Path(name) / STATE_FILE)
    for rel in files:
        source = args.out_dir / rel
        if source.is_file():
            (args.bring_back / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, args.bring_back / rel)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-root", type=Path, default=FASHION_MNIST)
    p.add_argument("--models", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS),
                   help="the demo models to train (default both; the shipped demo:mae meets its target: --models dino)")
    p.add_argument("--mae-images", type=int, default=10_000_000, help="MAE's planned training images")
    p.add_argument("--dino-images", type=int, default=3_000_000, help="DINO's planned training images")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500_000, metavar="IMAGES")
    p.add_argument("--budget-seconds", type=float, default=480.0, help="wall time of this whole call")
    p.add_argument("--eval-seconds", type=float, default=90.0, help="kept out of the budget for evaluation and plots")
    p.add_argument("--no-fit", dest="fit", action="store_false",
                   help="keep the planned images (pause at the budget, continue in a later call) instead of "
                        "shortening a fresh plan to fit the budget")
    p.add_argument("--sequential", action="store_true", help="train MAE, then DINO, instead of both at once")
    p.add_argument("--mae-share", type=float, default=0.45, help="MAE's share of the training budget with --sequential")
    p.add_argument("--eval-train", type=int, default=10_000)
    p.add_argument("--eval-test", type=int, default=10_000)
    p.add_argument("--no-eval", dest="evaluate", action="store_false")
    p.add_argument("--log-x", action="store_true", help="loss curves over log-scaled images seen")
    p.add_argument("--bring-back", type=Path, metavar="DIR", help="copy the results a later session needs here")
    args = p.parse_args()
    started = time.monotonic()
    missing = missing_fashion_mnist(("train", "test"), args.data_root)
    if missing is not None:
        p.error(f"--data-root: {missing}")
    # absolute: the children run from the repository root
    args.out_dir, args.data_root = args.out_dir.resolve(), args.data_root.resolve()
    if args.bring_back is not None:
        args.bring_back = args.bring_back.resolve()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    train_seconds = args.budget_seconds - (args.eval_seconds if args.evaluate else 10.0) - START_AND_SAVE_MARGIN
    if train_seconds <= 0:
        p.error(f"--budget-seconds {args.budget_seconds} leaves no time to train after the evaluation and margins")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    codes = run_training(args, train_seconds)
    states = {n: read_state(args.out_dir / n) for n in args.models}
    complete = [n for n, s in states.items() if s and s["complete"] and (args.out_dir / f"{n}.pth").is_file()]
    plot(args)
    for name, state in states.items():
        log = args.out_dir / name / LOSS_LOG
        entries = read_loss_log(log) if log.is_file() else None
        speed = images_per_second(entries) if entries else None
        print(json.dumps({"model": name, "exit": codes.get(name), **(state or {}),
                          "images_per_second": round(speed, 1) if speed else None,
                          "relative_drop_last_10pct": flatness(entries)["relative_drop"] if entries else None}), flush=True)
    if args.bring_back is not None:  # before the evaluation too: a call cut short there still returns the weights
        bring_back(args, states)
    if args.evaluate and complete:
        evaluate(args, complete)
        if args.bring_back is not None:
            bring_back(args, states)
    incomplete = [n for n in args.models if n not in complete]
    print(json.dumps({"complete": complete, "incomplete": incomplete, "seconds": round(time.monotonic() - started, 1),
                      "continue_with": "the same command (paused runs resume)" if incomplete else None}), flush=True)
    raise SystemExit(0 if not incomplete else INCOMPLETE_EXIT)


if __name__ == "__main__":
    main()
