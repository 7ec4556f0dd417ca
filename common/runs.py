"""Run plumbing written once for every script: errors and the command line, seeding, per-task
defaults, the run folder (TensorBoard, `args.json`, optional wandb, `eval.csv`), checkpoints
(written atomically, loaded as data), resume, the `--eval-only` report and the end-of-run summary.

What a script keeps is what a reader needs to learn its method: the policy, the rollout, the
advantages or targets, the update.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import typing
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.nn as nn

from common.envs import EVAL_STREAM, TRAINING_STREAM, EpisodeTracker, evaluate, own_rng, stream_seed  # noqa: F401
from common.errors import DatasetError, NonFiniteError, TaskError, UsageError

CHECKPOINT_FORMAT = "dppo-checkpoint-v1"
FINETUNE_SCRIPTS = {"diffusion": "dppo_finetune.py", "gaussian": "gaussian_ppo.py", "gmm": "gmm_ppo.py", "flow": "reinflow.py"}
# what a policy checkpoint must hold besides its weights to rebuild the policy with no other file
HEADER_KEYS = ("format", "policy", "backbone", "arch", "task", "obs_dim", "action_dim", "horizon_steps", "cond_steps",
               "normalization")
OPTIONAL_HEADER_KEYS = ("denoising_steps", "std_limits")

ArgsT = TypeVar("ArgsT")


def check_finite(where: str, values: dict[str, float], *modules: nn.Module) -> None:
    """NonFiniteError naming the first non-finite value or module (one host sync for all the weights)."""
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    params = [p for m in modules for p in m.parameters()]
    if not bad and params and not torch.stack([p.isfinite().all() for p in params]).all().item():
        bad = [type(m).__name__ + " weights" for m in modules if not all(p.isfinite().all() for p in m.parameters())]
    if bad:
        raise NonFiniteError(f"non-finite {', '.join(bad)} at {where}; stopped before saving it (the last checkpoint "
                             "is the last good state): lower the learning rate or check the data and rewards")


def script_name(file: str) -> str:
    """`dppo_finetune` for `.../dppo_finetune.py`: the default `exp_name`, so a copied script keeps its own name."""
    return os.path.splitext(os.path.basename(file))[0]


def cli(main: Callable[[ArgsT], Any], args_type: type[ArgsT]) -> None:
    """`main(tyro.cli(Args))`; an error the user can fix, a command-line parse error included, ends in
    one line on stderr and exit code 2."""
    import contextlib
    import io

    import tyro

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(args_type)
    except SystemExit as e:
        if e.code not in (0, None):  # tyro's boxed message, folded to its first paragraph on one line
            lines = [line.strip("│╭╮╰╯─ \t") for line in captured.getvalue().splitlines()]
            lines = [line for line in lines if line] and lines[1:]
            message = " ".join(lines[:lines.index("")] if "" in lines else lines) or "bad command line"
            sys.stderr.write(f"error: {message} (see --help)\n")  # one write: lines of parallel ranks never interleave
        else:
            sys.stderr.write(captured.getvalue())
        raise
    sys.stderr.write(captured.getvalue())
    try:
        main(args)
    except (UsageError, TaskError, DatasetError, NonFiniteError, OSError) as e:  # FileNotFoundError is an OSError
        sys.stderr.write(f"error: {e}\n")  # one write (print makes two): lines of parallel ranks never interleave
        sys.exit(2)


@dataclasses.dataclass(frozen=True)
class Limits:
    """The numbers a flag may take, declared with its `Args` field (tyro ignores it) and checked by `check_args`:
    `num_envs: Annotated[int | None, runs.POSITIVE] = None`. A numeric field without one must be finite."""
    low: float = -math.inf
    high: float = math.inf
    strict: bool = False  # low itself refused: x > low
    inf_ok: bool = False  # inf allowed: it means "no limit"

    def refusal(self, value: float) -> str | None:
        """What `value` must be ("must be positive"), or None when it is allowed (NaN never is)."""
        above = value > self.low if self.strict else value >= self.low
        if above and value <= self.high and (self.inf_ok or math.isfinite(value)):
            return None
        if math.isfinite(self.low) and math.isfinite(self.high):
            return f"must be in {'(' if self.strict else '['}{self.low}, {self.high}]"
        if self.strict and self.low == 0 and not (above and math.isinf(value)):
            return "must be positive"
        return "must be a finite number" + ("" if self.low == -math.inf else f" {'>' if self.strict else '>='} {self.low}")


FINITE = Limits()  # every int or float field without its own Limits
POSITIVE = Limits(0, strict=True)
POSITIVE_OR_INF = Limits(0, strict=True, inf_ok=True)  # inf: no limit
NON_NEGATIVE = Limits(0)
FRACTION = Limits(0.0, 1.0)
RATE = Limits(0.0, 1.0, strict=True)  # a step or EMA rate: 0 would never move
SEED = Limits(0, 2**31 - 1)  # numpy seeds stay below 2**32 with the per-env offsets


def check_args(args: Any) -> None:
    """UsageError naming the first number of the dataclass `args` that its field's `Limits` refuse (a field without one:
    NaN and ±inf), each entry of a tuple or list field checked alike; None (a default not filled yet), booleans and other
    types pass."""
    hints = typing.get_type_hints(type(args), include_extras=True)
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        limits = next((m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Limits)), FINITE)
        for x in value if isinstance(value, (tuple, list)) else (value,):
            why = None if isinstance(x, bool) or not isinstance(x, (int, float)) else limits.refusal(x)
            if why:
                raise UsageError(f"--{f.name.replace('_', '-')} {why} (got {value})")
            if limits.inf_ok and x == math.inf:
                print(f"--{f.name.replace('_', '-')} inf: no limit")


def check_number(flag: str, value: float, limits: Limits) -> None:
    """UsageError unless `limits` allow `value`: a tool's number outside an `Args` dataclass (an argparse flag)."""
    why = limits.refusal(value)
    if why:
        raise UsageError(f"{flag} {why} (got {value})")


# The rules between flags that decide whether a run can do its work at all, one message each in every script
# that has the flags (checked before anything is written; `--eval-only` trains nothing and skips them).

def check_gradient_steps(n_updates: int, n_steps: int, num_envs: int, batch_size: int, replay_ratio: float) -> None:
    """UsageError unless a training iteration takes a gradient step: `n_updates` is the script's own count,
    int(n_steps·num_envs / batch_size · replay_ratio) (reference `num_batch`)."""
    if n_updates < 1:
        raise UsageError(f"no gradient step per iteration: --n-steps {n_steps} x --num-envs {num_envs} / --batch-size "
                         f"{batch_size} x --replay-ratio {replay_ratio} < 1; lower --batch-size or raise --replay-ratio, "
                         "--n-steps or --num-envs")


def check_minibatch(batch_size: int, n_steps: int, num_envs: int, denoising_steps: int | None = None) -> None:
    """UsageError unless one PPO minibatch fits in the samples of an iteration: n_steps·num_envs env-steps, times the
    K' fine-tuned denoising steps where each (env-step, denoising-step) pair is a sample (DPPO)."""
    samples = n_steps * num_envs * (denoising_steps or 1)
    if batch_size > samples:
        k = "" if denoising_steps is None else f" x K' {denoising_steps}"
        raise UsageError(f"--batch-size {batch_size} exceeds the {samples} samples of one iteration (--n-steps {n_steps} "
                         f"x --num-envs {num_envs}{k}); lower --batch-size or raise --n-steps or --num-envs")


def check_warmup(n_critic_warmup_itr: int, n_train_itr: int) -> None:
    """UsageError unless the actor steps at least once: it does from iteration `n_critic_warmup_itr` on (0-based)."""
    if n_critic_warmup_itr >= n_train_itr:
        raise UsageError(f"--n-critic-warmup-itr {n_critic_warmup_itr} leaves no iteration of --n-train-itr {n_train_itr} "
                         "in which the actor steps; lower --n-critic-warmup-itr or raise --n-train-itr")


def refuse_flags(args: Any, names: tuple[str, ...], why: str) -> None:
    """UsageError naming the first of `names` given a value other than its default: a flag that this
    mode of the script would not use is refused rather than silently ignored."""
    for f in dataclasses.fields(args):
        if f.name in names:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if getattr(args, f.name) != default:
                raise UsageError(f"--{f.name.replace('_', '-')} {why}")


def apply_defaults(args: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """Fill every field of `args` that is None from `defaults` (an explicit flag always wins) and
    return what was filled, so the script can show the values a run really uses."""
    filled = {}
    for key, value in defaults.items():
        if getattr(args, key) is None and value is not None:
            setattr(args, key, value)
            filled[key] = value
    return filled


def print_defaults(task_id: str, filled: dict[str, Any]) -> None:
    if filled:
        print(f"{task_id} defaults: " + ", ".join(f"{k}={v}" for k, v in filled.items()))


def seed_everything(seed: int, torch_deterministic: bool, torch_threads: int | None, cuda: bool) -> torch.device:
    """Seed `random`, numpy and torch, set determinism and CPU threads; return the device to use."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(torch_deterministic)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    keep_freed_memory()
    return torch.device("cuda" if torch.cuda.is_available() and cuda else "cpu")


def keep_freed_memory() -> bool:
    """glibc: serve tensors of up to 32 MB from the heap and keep freed memory in the process instead of mapping fresh
    pages from the kernel for each (an update allocates and frees MBs of activations per layer; every fresh page is a
    page fault). The CPU update runs ~7 % faster (docs/results.md "Speed"); the numbers are unchanged, the process keeps
    its peak memory. Returns whether it was applied (False off glibc: nothing to do there)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>; 32 MB is the largest mmap threshold it takes
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def set_float32_matmul_precision(precision: str) -> None:
    """Process-wide precision of float32 matmuls, in torch's per-backend settings: `highest` float32 (torch's
    default), `high` TF32, `medium` bf16 products on CPUs with AMX (oneDNN) and TF32 on GPUs. (Not
    `torch.set_float32_matmul_precision`: mixing it with the per-backend settings makes torch refuse to report
    the precision.)"""
    cpu, gpu = {"highest": ("none", "none"), "high": ("tf32", "tf32"), "medium": ("bf16", "tf32")}[precision]
    torch.backends.mkldnn.matmul.fp32_precision = cpu
    torch.backends.cuda.matmul.fp32_precision = gpu


ONEDNN_TOL = 1e-5  # the largest relative deviation from the default kernels that still counts as float32 (bf16: ~1e-3)
ONEDNN_SHAPES = ((1000, 523, 512),)  # (rows, in, out) checked when a script gives none
ONEDNN_ROWS = 1024  # row counts above this are checked at this many rows (a product's time per row is flat there)


def linear_shapes(rows: tuple[int, ...], *modules: nn.Module) -> tuple[tuple[int, int, int], ...]:
    """(rows, in, out) for each row count and each distinct `nn.Linear` of `modules`: the products of the run's own
    layers that `--onednn-matmul` checks (e.g. rows = (envs sampled at once, minibatch))."""
    dims = dict.fromkeys((m.in_features, m.out_features) for mod in modules for m in mod.modules() if isinstance(m, nn.Linear))
    return tuple((r, i, o) for r in dict.fromkeys(rows) for i, o in dims)


def measure_onednn(shapes: tuple[tuple[int, int, int], ...], timed: bool) -> tuple[float, float, float]:
    """oneDNN's float32 products against the default kernels' on random matrices of `shapes` (x Wᵀ + b, g W and gᵀ x of
    each (rows, in, out), rows capped at `ONEDNN_ROWS`): the largest deviation relative to the product's largest entry,
    and with `timed` the seconds of all products with each (best of 3 interleaved rounds; else NaN). PyTorch routes
    float32 matmuls to oneDNN only under its reduced-precision setting (`torch.backends.mkldnn.matmul.fp32_precision =
    "bf16"`), where oneDNN rounds the inputs to bf16 on CPUs with AMX and stays float32 elsewhere; the setting is
    restored before returning, and the global RNG is not drawn from."""
    mm = torch.backends.mkldnn.matmul
    before = mm.fp32_precision
    gen = torch.Generator().manual_seed(0)
    mats = [tuple(torch.randn(*s, generator=gen) for s in ((r, i), (o, i), (o,), (r, o)))
            for r, i, o in dict.fromkeys((min(r, ONEDNN_ROWS), i, o) for r, i, o in shapes)]

    def products(setting: str) -> list[torch.Tensor]:
        mm.fp32_precision = setting
        try:
            return [p for x, w, b, g in mats for p in (torch.nn.functional.linear(x, w, b), g @ w, g.T @ x)]
        finally:
            mm.fp32_precision = before

    default = products(before)
    err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(products("bf16"), default))
    best = {before: math.inf, "bf16": math.inf}
    for _ in range(3 if timed else 0):
        for setting in best:
            t0 = time.perf_counter()
            products(setting)
            best[setting] = min(best[setting], time.perf_counter() - t0)
    return err, *((best[before], best["bf16"]) if timed else (math.nan, math.nan))


def apply_matmul_flags(precision: str, onednn: str | bool, device: torch.device,
                       shapes: tuple[tuple[int, int, int], ...] = ONEDNN_SHAPES) -> str:
    """A script's `--float32-matmul-precision` and `--onednn-matmul auto|on|off` (docs/results.md "Speed"), process-wide:
    the precision set; oneDNN's float32 matmuls checked on the run's layer `shapes` (`measure_onednn`) and used wherever
    they stay within `ONEDNN_TOL` of the default kernels (`auto`: else the default kernels; `on`: else refused in one
    line), with `off` never. The check is deterministic on a CPU (no timing: where oneDNN keeps float32 it is the faster
    path, docs/results.md "Speed"). Prints the decision and why in one line and returns it, "on" or "off", for the run's
    `args.json`. (`onednn` True / False: a run saved before `auto`, as "on" / "off".)"""
    mode = ("on" if onednn else "off") if isinstance(onednn, bool) else onednn
    if mode not in ("auto", "on", "off"):
        raise UsageError(f"--onednn-matmul takes auto, on or off (got {mode!r})")
    if mode == "on" and precision != "highest":
        raise UsageError("--onednn-matmul keeps float32 products; it does not combine with "
                         f"--float32-matmul-precision {precision}")
    set_float32_matmul_precision(precision)
    use, why = False, "as asked"
    if mode == "on" and device.type != "cpu":
        raise UsageError(f"--onednn-matmul on is for CPU runs and this one runs on {device.type}; use --onednn-matmul off")
    if mode == "auto" and device.type != "cpu":
        why = f"the device is {device.type}, not a CPU"
    elif mode == "auto" and precision != "highest":
        why = f"--float32-matmul-precision {precision} sets the CPU's matmul kernels"
    elif mode != "off":
        err = measure_onednn(tuple(shapes) or ONEDNN_SHAPES, timed=False)[0]
        if not err <= ONEDNN_TOL:
            if mode == "on":
                raise UsageError(f"--onednn-matmul on: oneDNN would not compute in float32 on this CPU (relative deviation "
                                 f"{err:.1e} from the default kernels, over {ONEDNN_TOL:g}); use --onednn-matmul off")
            why = f"oneDNN would not compute in float32 on this CPU: relative deviation {err:.1e} > {ONEDNN_TOL:g}"
        else:
            use, why = True, f"float32 kept: relative deviation {err:.1e} <= {ONEDNN_TOL:g} on the run's layers"
    if use:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # oneDNN's path for float32 inputs; float32 here, as checked
    decided = "on" if use else "off"
    print(f"--onednn-matmul {mode}: {decided} ({'oneDNN' if use else 'default'} kernels; {why})")
    return decided


def compile_sampling(fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """A script's `--compile`: `torch.compile` of its sampling chain, drawing the same noise as eager (inductor's
    `fallback_random`); on a GPU in mode reduce-overhead, which replays CUDA graphs instead of launching each denoising
    step's small kernels."""
    import torch._inductor.config as inductor_config
    inductor_config.fallback_random = True
    return torch.compile(fn, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)


def args_dict(args: Any) -> dict[str, Any]:
    """The dataclass as plain data (tuples as lists) for checkpoints and `args.json`."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(args).items()}


def args_from_dict(args_type: type[ArgsT], saved: dict[str, Any]) -> ArgsT:
    """Rebuild the dataclass from `args_dict` output (lists back to tuples; unknown keys refused)."""
    fields = {f.name for f in dataclasses.fields(args_type)}
    unknown = set(saved) - fields
    if unknown:
        raise DatasetError(f"the run's saved arguments have fields this script does not know: {', '.join(sorted(unknown))}")
    return args_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


# ---- checkpoints ----

def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """Write atomically (a temp file `{name}.{random}.tmp` unique to this writer, then a rename; a resumed run removes one a
    killed save left: `stale_temp_files`). torch writes through a Python file, so a full disk is an OSError, not torch's
    RuntimeError; any OSError ends in one line naming `path`, never the temp file (removed), the previous one intact."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is as readable as any file
        os.replace(tmp, path)
    except OSError as e:
        kept = "the previous checkpoint there is intact" if os.path.isfile(path) else "nothing was written"
        error = OSError(f"cannot save the checkpoint {path} ({e.strerror or type(e).__name__}); {kept}: free disk space "
                        "or make the folder writable, then run again")
        error.errno = e.errno
        raise error from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def stale_temp_files(path: str) -> list[str]:
    """The temp files of `save_checkpoint(path, ...)` (`{name}.{mkstemp's [a-z0-9_]}.tmp`) that a killed save left."""
    d, name = os.path.split(os.path.abspath(path))
    return sorted(os.path.join(d, f) for f in os.listdir(d) if re.fullmatch(rf"{re.escape(name)}\.[a-z0-9_]+\.tmp", f))


def load_checkpoint(path: str, policy: str | None, pretrain_command: str, task: Any = None,
                    conversion: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint as data (`weights_only=True`) and check it holds a `policy` (any of this project's kinds when
    None) for `task` (when given); anything else is refused with one line naming the fix.

    The reference implementation's checkpoints (`--checkpoint paper` / `paper-unet`, or a file of irom-princeton/dppo)
    are converted in memory by the module `conversion()` returns (`loaders.convert`): the script hands it over, so that
    the run plumbing never loads the conversion and a run from this project's checkpoints never does either."""
    if path in PAPER_CHECKPOINTS:  # the reference's published pre-trained policy of the task, downloaded once
        if task is None:  # a script without --env-id (deploy_franka.py) takes the converted file
            kind = "" if path == "paper" else " --kind diffusion_unet"
            raise UsageError(f"--checkpoint {path}: this script takes a checkpoint file; convert the reference's first, "
                             f"e.g. python -m loaders.convert paper --env-id one-leg-low{kind}, and give the file it writes")
        if policy in ("gmm", None) or (policy != "diffusion" and path != "paper"):
            raise UsageError(f"--checkpoint {path}: the reference publishes no {policy} policy this project's network can "
                             f"load; pre-train one: {pretrain_command}")
        if conversion is None:
            raise UsageError(f"--checkpoint {path}: this script does not import the reference's checkpoints")
        path = conversion().paper_checkpoint(task, PAPER_CHECKPOINTS[path] if policy == "diffusion" else f"{policy}_mlp")
    if os.path.isdir(path):
        raise DatasetError(f"checkpoint {path!r} is a folder; give the checkpoint file inside it, e.g. "
                           f"{os.path.join(path, 'checkpoint.pt')}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found (pre-train one: {pretrain_command})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise DatasetError(f"checkpoint {path!r} is not a readable DPPO checkpoint ({type(e).__name__})") from None
    if is_reference_checkpoint(ckpt):  # a checkpoint of irom-princeton/dppo: converted in memory
        if task is None or conversion is None:
            raise DatasetError(f"{path!r} is a reference checkpoint; convert it first: python -m loaders.convert "
                               f"{path} --env-id {task.id if task else 'TASK'}")
        ckpt = conversion().load_reference(path, ckpt, task)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DatasetError(f"checkpoint {path!r} is not a DPPO checkpoint (no format {CHECKPOINT_FORMAT!r})")
    has_weights = any(k in ckpt for k in ("ema", "base", "actor"))
    missing = [k for k in HEADER_KEYS if k not in ckpt] + ([] if has_weights else ["ema"])
    if missing:
        raise DatasetError(f"checkpoint {path!r} lacks {', '.join(missing)}; it was not written by these scripts")
    if ckpt["policy"] != policy and (policy is not None or ckpt["policy"] not in FINETUNE_SCRIPTS):
        script = FINETUNE_SCRIPTS.get(ckpt["policy"], "another script")
        wanted = f"a {policy} one" if policy else f"one of {', '.join(FINETUNE_SCRIPTS)}"
        raise DatasetError(f"checkpoint {path!r} holds a {ckpt['policy']} policy, not {wanted}; use {script}")
    bad = [k for k, v in _tensors(ckpt) if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DatasetError(f"checkpoint {path!r} has non-finite values in {bad[0]}"
                           f"{f' (and {len(bad) - 1} more tensors)' if len(bad) > 1 else ''}; it cannot be used")
    check_policy_numbers(ckpt, f"checkpoint {path!r}")
    if task is not None and (ckpt["task"] != task.id or ckpt["obs_dim"] != task.obs_dim
                             or ckpt["action_dim"] != task.action_dim):
        raise DatasetError(f"checkpoint {path!r} is for task {ckpt['task']!r} (obs {ckpt['obs_dim']}, action "
                           f"{ckpt['action_dim']}), not {task.id!r} (obs {task.obs_dim}, action {task.action_dim})")
    return ckpt


def check_policy_numbers(header: dict[str, Any], where: str) -> None:
    """DatasetError naming `where` unless the header's numbers can run a policy: K (`denoising_steps`, when given; DDPM
    or Euler steps) an integer >= 1; the normalisation statistics (when given) finite, with min <= max in every dimension
    and as many dimensions as the header's obs_dim / action_dim (when given). A constant dimension (min == max) is
    allowed: the normaliser divides by max - min + 1e-6 (common/normalizer.py, as the reference's wrappers), so it maps
    to -1 and back to itself. The one check of `load_checkpoint` and loaders/convert.py."""
    K, stats = header.get("denoising_steps"), header.get("normalization", {})
    if K is not None and (isinstance(K, bool) or not isinstance(K, int) or K < 1):
        raise DatasetError(f"{where} has denoising_steps {K!r}; a diffusion or flow policy takes at least 1 denoising step")
    if isinstance(stats, dict) and not stats:
        return
    for g in ("obs", "action"):
        try:
            lo, hi = (torch.as_tensor(stats[f"{g}_{m}"], dtype=torch.float64).flatten() for m in ("min", "max"))
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError):
            raise DatasetError(f"{where}: its normalisation statistics have no {g}_min and {g}_max arrays") from None
        for key, v in ((f"{g}_min", lo), (f"{g}_max", hi)):
            if not v.isfinite().all():
                i = int((~v.isfinite()).nonzero()[0])
                raise DatasetError(f"{where}: normalisation statistic {key} is {v[i].item()} in dimension {i}; the "
                                   "statistics must be finite")
        if lo.shape != hi.shape:
            raise DatasetError(f"{where}: normalisation statistics {g}_min and {g}_max have {len(lo)} and {len(hi)} values")
        if header.get(f"{g}_dim") not in (None, len(lo)):  # statistics of another task: a shape error mid-run
            raise DatasetError(f"{where}: normalisation statistics {g}_min and {g}_max have {len(lo)} values, but its "
                               f"{g}_dim is {header[f'{g}_dim']}; the statistics are of another task")
        if (lo > hi).any():
            i = int((lo > hi).nonzero()[0])
            raise DatasetError(f"{where}: normalisation statistic {g}_min > {g}_max in dimension {i} ({lo[i].item():g} > "
                               f"{hi[i].item():g}): min and max swapped? (min == max, a constant dimension, is allowed)")


def is_reference_checkpoint(obj: Any) -> bool:
    """The layout the reference's agents save: `model` (and `ema` after pre-training) state dicts of `network.*`."""
    return (isinstance(obj, dict) and "format" not in obj and isinstance(obj.get("model"), dict)
            and any(isinstance(k, str) and k.startswith(("network.", "actor", "critic")) for k in obj["model"]))


# Built-in pre-trained diffusion checkpoints (made by `python dppo_pretrain.py --output checkpoints/avoid-m2_diffusion.pt`),
# used when a diffusion fine-tuning script gets no --checkpoint.
BUILTIN_DIFFUSION_CHECKPOINTS = {
    "avoid-m2": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints",
                             "avoid-m2_diffusion.pt")}
DIFFUSION_PRETRAIN_HINT = "python dppo_pretrain.py --env-id {}"
# `--checkpoint paper`: the pre-trained policy the reference implementation publishes for the task (loaders/convert.py);
# for diffusion scripts the MLP one (what the reference's DPPO configs fine-tune) or, with `paper-unet`, the UNet one
PAPER_CHECKPOINTS = {"paper": "diffusion_mlp", "paper-unet": "diffusion_unet"}


def diffusion_checkpoint_path(checkpoint: str | None, task_id: str) -> str:
    """--checkpoint; without one, the built-in pre-trained diffusion checkpoint of the task (Avoid M2) or else the
    paper's published one (`paper`, downloaded once by `load_checkpoint`)."""
    return checkpoint or BUILTIN_DIFFUSION_CHECKPOINTS.get(task_id) or "paper"


def default_flow_checkpoint(task_id: str) -> str:
    """`checkpoints/{task_id}_flow.pt` of this repository: where `flow_pretrain.py` writes its release checkpoint
    without --output, and where `reinflow.py` looks without --checkpoint."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", f"{task_id}_flow.pt")


def whole_network_weights(ckpt: dict[str, Any], path: str) -> dict[str, Any]:
    """The diffusion network a whole-network fine-tuning script (DRWR, DAWR, DIPO, IDQL, DQL, QSM,
    exact-likelihood PG) starts from: `actor` (the fine-tuned network such a script saves) or `ema`
    (a pre-training checkpoint). A DPPO fine-tuning checkpoint holds two networks (frozen `base` for
    the first K - K' steps, `actor_ft` for the last K'), which is not one network to fine-tune."""
    if "actor" in ckpt:
        return ckpt["actor"]
    if "ema" in ckpt:
        return ckpt["ema"]
    raise DatasetError(f"checkpoint {path!r} is a DPPO fine-tuning checkpoint (frozen base + actor_ft), not one network; "
                       "start from a pre-training checkpoint, or evaluate it with dppo_finetune.py --eval-only")


def load_weights(module: nn.Module, state_dict: Any, path: str) -> None:
    """`module.load_state_dict(state_dict)`; weights that do not fit the network the checkpoint's header
    describes (another architecture, missing or extra tensors) end in one line naming the checkpoint."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__).rstrip(".")
        raise DatasetError(f"checkpoint {path!r} does not fit the network its header describes ({detail}); "
                           "it was written for another architecture or version") from None


def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts/lists, with its dotted key."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in _tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _tensors(v, f"{prefix}[{i}]")]
    return []


def check_output_path(path: str | None, flag: str = "--output") -> None:
    """A file path whose folder exists or can be made, checked before any work is done."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file path such as {os.path.join(path, 'policy.pt')}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot write under {parent}")


def policy_header(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint that describes the policy (everything but weights and training state)."""
    return {k: ckpt[k] for k in (*HEADER_KEYS, *OPTIONAL_HEADER_KEYS) if k in ckpt}


def finetune_checkpoint(header: dict[str, Any], args: Any, modules: dict[str, nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any],
                        extra: dict[str, Any], itr: int, env_steps: int) -> dict[str, Any]:
    """Everything a fine-tuning run needs to continue: the policy header, its arguments, the
    weights of `modules` (e.g. base, actor_ft, critic), optimiser and scheduler states, `extra`
    state (reward scaler, ...), the torch RNG, the iteration and the env steps."""
    return {**header, "args": args_dict(args), **{name: m.state_dict() for name, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()}, **extra,
            "rng": {"torch": torch.get_rng_state()}, "itr": itr, "env_steps": env_steps}


def restore_training(ckpt: dict[str, Any], optimizers: dict[str, torch.optim.Optimizer],
                     schedulers: dict[str, Any]) -> tuple[int, int]:
    """Load what `finetune_checkpoint` saved into fresh optimisers and schedulers and the torch RNG;
    return (iteration, env steps) to continue from."""
    for name, opt in optimizers.items():
        opt.load_state_dict(ckpt["optimizers"][name])
    for name, sched in schedulers.items():
        sched.load_state_dict(ckpt["schedulers"][name])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["itr"], ckpt["env_steps"]


# ---- resume ----

# flags that may differ on resume (they do not change what the run computes, or extend it)
RESUME_OVERRIDABLE = ("n_train_itr", "n_epochs", "save_every", "track", "torch_threads", "cuda", "n_workers", "plot",
                      "wandb_project_name", "capture_video", "onednn_matmul")


def resume_args(args: ArgsT, saved: dict[str, Any], run_dir: str) -> ArgsT:
    """The run's own saved arguments; a flag given explicitly on the command line (a value that is not
    the field's default) either wins visibly (the RESUME_OVERRIDABLE ones, printed) or is refused."""
    try:
        resumed = args_from_dict(type(args), {**saved, "resume": run_dir})
    except DatasetError as e:  # e.g. a pixel run given to a state script
        raise DatasetError(f"--resume {run_dir}: {e}; is it a run of another script?") from None
    for f in dataclasses.fields(args):
        given = getattr(args, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if f.name in ("resume", "eval_only") or given == default or given == getattr(resumed, f.name):
            if f.name == "eval_only":
                setattr(resumed, f.name, given)
            continue
        if f.name == "env_id":  # aliases of the run's task are fine
            from common.tasks import get_task
            if get_task(given).id == saved.get("env_id"):
                continue
        if f.name not in RESUME_OVERRIDABLE:
            raise UsageError(f"--{f.name.replace('_', '-')} {given} differs from the resumed run's "
                             f"{getattr(resumed, f.name)}; a resumed run keeps its own arguments "
                             "(start a new run to change it)")
        print(f"resume: --{f.name.replace('_', '-')} {given} (the run had {getattr(resumed, f.name)})")
        setattr(resumed, f.name, given)
    return resumed


def check_resume_budget(run_dir: str, done: int, budget: int, flag: str, unit: str, left: str | None = None) -> None:
    """`--resume` never rewrites history: a budget (`flag`) below the `done` `unit`s of the run's checkpoint is refused,
    and so is one equal to it unless `left` names what the run still has to do at its end (its final evaluation, its
    --output), all the resume then does. Called before anything is written: a refusal leaves the folder as it was."""
    if budget < done or (budget == done and not left):
        raise UsageError(f"{flag} {budget}: the run {run_dir} has already done {done} {unit}" + ("; nothing is left to do"
                         if budget == done else ", and a resume never rewrites them") + f" (nothing was changed): give "
                         f"{flag} above {done} to train further, or start a new run")
    if budget == done:
        print(f"resume: the run has done its {done} {unit}; only {left} is left")


# what `finetune_checkpoint` writes and a resumed fine-tuning run reads
RESUME_KEYS = ("itr", "env_steps", "optimizers", "schedulers", "rng", "reward_scaler", "args", "base", "actor_ft", "critic")


def load_resume(run_dir: str, policy: str, pretrain_command: str, keys: tuple[str, ...] = RESUME_KEYS,
                method: str | None = None) -> dict[str, Any]:
    """The fine-tuning checkpoint of a run folder (its task is taken from the run itself); `keys`:
    what the script's own checkpoints hold (the PPO scripts' RESUME_KEYS by default). `method`: the
    script whose runs these are (the diffusion RL baselines save it as `method`; None: the PPO script of `policy`); a
    fine-tuning run of another script is refused naming that script."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--resume {run_dir}: no such run folder")
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), policy, pretrain_command)
    if "itr" in ckpt and ckpt.get("method") != method:
        other = ckpt.get("method") or script_name(FINETUNE_SCRIPTS[ckpt["policy"]])
        this = method or script_name(FINETUNE_SCRIPTS[policy])
        raise UsageError(f"--resume {run_dir} is a run of {other}.py, not of {this}.py; resume it with {other}.py")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise DatasetError(f"--resume {run_dir}: its checkpoint is not a fine-tuning checkpoint of this version "
                           f"(it lacks {', '.join(missing)})")
    return ckpt



def open_resume(args: ArgsT, run_dir: str | None, policy: str, pretrain_command: str,
                **load_kw: Any) -> tuple[dict[str, Any] | None, ArgsT]:
    """`--resume DIR`: the run's checkpoint (`load_resume`) and the run's own arguments, explicit flags winning visibly
    or refused (`resume_args`); (None, args) for a new run."""
    if not run_dir:
        return None, args
    ckpt = load_resume(run_dir, policy, pretrain_command, **load_kw)
    return ckpt, resume_args(args, ckpt["args"], run_dir)


def open_start(resume: dict[str, Any] | None, run_dir: str | None, path: str, policy: str, pretrain_command: str,
               task: Any, conversion: Callable[[], Any] | None = None) -> tuple[dict[str, Any], str]:
    """What a fine-tuning run starts from, and its file: the resumed run's checkpoint, else the one at `path`."""
    if resume is not None:
        return resume, os.path.join(str(run_dir), "checkpoint.pt")
    return load_checkpoint(path, policy, pretrain_command, task, conversion=conversion), path


def scratch_defaults(table: dict[str, dict[str, Any]], task_id: str, checkpoint: str | None, hint: str) -> dict[str, Any]:
    """--from-scratch (paper App. B.2): the task's row of a script's SCRATCH_DEFAULTS (the reference's
    `cfg/gym/scratch/<task>-v2/` configs); a checkpoint, or a task the table has no row for, is refused in one line."""
    if checkpoint:
        raise UsageError("--from-scratch starts from a random policy; drop --checkpoint (or --from-scratch)")
    if task_id not in table:
        raise UsageError(f"--from-scratch runs {', '.join(table)} (the reference's scratch configs), not {task_id}: "
                         f"pre-train it ({hint}) and fine-tune with --checkpoint")
    return table[task_id]


def open_scratch(resume: dict[str, Any] | None, run_dir: str | None, task: Any, horizon_steps: int, denoising_steps: int,
                 seed: int) -> tuple[dict[str, Any], str]:
    """What a diffusion run from scratch starts from, and its name in errors: the resumed run's checkpoint, else
    `common.scratch.random_diffusion_policy` (loaded only here) with K = `denoising_steps`, drawn from `seed`."""
    if resume is not None:
        return resume, os.path.join(str(run_dir), "checkpoint.pt")
    from common.scratch import random_diffusion_policy
    policy = random_diffusion_policy(task, horizon_steps, denoising_steps, seed)
    return {"format": CHECKPOINT_FORMAT, **policy}, "--from-scratch"


# ---- the run folder ----

def new_run_dir(task_id: str, exp_name: str, seed: int, root: str = "runs") -> str:
    """`runs/{task}__{exp_name}__{seed}__{unix time}`, created here and never shared: a second run
    started in the same second gets a `-2` suffix, and so on."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise UsageError(f"{root!r} is a file; run from another folder or move it (run folders go in ./{root}/)")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the run folder root {root!r} ({e.strerror})") from None
    base = os.path.join(root, f"{task_id}__{exp_name}__{seed}__{int(time.time())}")
    for n in range(1, 1000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"cannot create the run folder {path!r} ({e.strerror})") from None
    raise UsageError(f"could not create a new run folder next to {base}")


def eval_tail_cut(path: str) -> bool:
    """Whether `eval.csv` ends inside a row: a run killed while writing it (every complete row ends in a newline)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_eval_rows(path: str) -> list[dict[str, Any]]:
    """The complete rows of an `eval.csv` (none without the file): a last row cut by a killed write is left out, as
    its numbers may be cut too; a file not of these scripts (or with a short row before the last) ends in one line."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and eval_tail_cut(path):
            rows.pop()
        if any(None in r or None in r.values() for r in rows):
            raise ValueError("a row with too few or too many fields")
        [int(r["iteration"]) for r in rows]
    except (ValueError, KeyError, TypeError, csv.Error) as e:
        raise DatasetError(f"{path} is not a run's eval.csv ({type(e).__name__}); move it aside to resume") from None
    return rows


class EvalLog:
    """`eval.csv`: one row per evaluation, appended. On resume, the rows of iterations the checkpoint had not reached
    (iteration >= `resume_itr`: an interrupted iteration's, or the final evaluation of a budget now extended), which the
    resumed run redoes, move to `eval_superseded.csv` (appended to) and eval.csv is replaced (atomically) by the rows
    before, so a resumed run writes the same eval.csv as an uninterrupted one; without such rows it is left as it is."""

    FIELDS = ["iteration", "env_steps", "mode", "return_mean", "return_std", "success_rate", "n_episodes"]

    def __init__(self, run_dir: str, resume_itr: int | None = None) -> None:
        self.path = os.path.join(run_dir, "eval.csv")
        rows, cut = (read_eval_rows(self.path), resume_itr) if resume_itr is not None else ([], 0)
        self.rows: list[dict[str, Any]] = [r for r in rows if int(r["iteration"]) < cut]
        superseded = [r for r in rows if int(r["iteration"]) >= cut]
        if superseded:
            self.append(os.path.join(run_dir, "eval_superseded.csv"), superseded)
            print(f"resume: eval.csv rows of iterations >= {resume_itr} (redone now) moved to eval_superseded.csv")
        tail_cut = resume_itr is not None and os.path.isfile(self.path) and eval_tail_cut(self.path)
        if tail_cut:  # the killed run's half-written last row is dropped (its evaluation is redone)
            print("resume: eval.csv ended inside a row (the run was killed while writing it); that row is dropped")
        if superseded or tail_cut or not os.path.isfile(self.path):
            self.append(self.path + ".tmp", self.rows, "w")
            os.replace(self.path + ".tmp", self.path)

    def append(self, path: str, rows: list[dict[str, Any]], mode: str = "a") -> None:
        header = mode == "w" or not os.path.isfile(path)
        with open(path, mode, newline="") as f:
            w = csv.DictWriter(f, self.FIELDS, extrasaction="ignore")
            if header:
                w.writeheader()
            w.writerows(rows)

    def write(self, itr: int, env_steps: int, mode: str, result: dict[str, Any]) -> None:
        row = dict(iteration=itr, env_steps=env_steps, mode=mode, **{k: result[k] for k in self.FIELDS[3:]})
        self.rows.append(row)
        self.append(self.path, [row])


class RunFolder:
    """An open run folder: TensorBoard writer, `args.json`, the hyperparameter table, optional wandb
    and `eval.csv`. Opened only after every input has been checked, so a refused command leaves
    nothing behind; `config`: the script's `Args`, recorded as data. `--resume` reopens the run's own folder and only
    adds to it: `eval.csv` as `EvalLog` says; `args.json` (the arguments the run started with) is never rewritten, each
    resume appends to `resumes.jsonl` its time and the arguments that differ from it (the run's current ones: args.json
    updated by the last line); a new TensorBoard events file; the temp files of a killed save are removed."""

    def __init__(self, config: Any, task_id: str, exp_name: str, seed: int, *, track: bool = False,
                 wandb_project: str = "dppo", resume_dir: str | None = None, resume_itr: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = resume_dir or new_run_dir(task_id, exp_name, seed)
        self.paths_before: list | None = None  # Avoid: evaluation paths before training, for the picture
        self.checkpoint = os.path.join(self.dir, "checkpoint.pt")
        args_path, values = os.path.join(self.dir, "args.json"), args_dict(config)
        if resume_dir and os.path.exists(args_path) and not os.path.isfile(args_path):  # before anything is written
            raise UsageError(f"--resume {resume_dir}: its args.json is not a file; move it aside to resume")
        self.eval_log = EvalLog(self.dir, resume_itr if resume_dir else None)
        if resume_dir and os.path.isfile(args_path):
            try:
                with open(args_path) as f:
                    started = dict(json.load(f))
            except (ValueError, TypeError):  # not a run's args.json (left as it is): every argument is recorded
                started = {}
            with open(os.path.join(self.dir, "resumes.jsonl"), "a") as f:
                changed = {k: v for k, v in values.items() if k not in started or started[k] != v}
                f.write(json.dumps({"time": int(time.time()), "changed": changed}) + "\n")
        else:
            with open(args_path, "w") as f:
                json.dump(values, f, indent=1)
        for tmp in stale_temp_files(self.checkpoint) if resume_dir else []:
            os.remove(tmp)
            print(f"resume: removed {os.path.basename(tmp)} (left by a checkpoint save that was killed)")
        self.writer = SummaryWriter(self.dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(config).items())
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        if track:
            import wandb
            wandb.init(project=wandb_project, config=values, name=os.path.basename(self.dir), sync_tensorboard=True)

    def save_videos(self, itr: int, result: dict[str, Any]) -> None:
        """Move an evaluation's recorded episodes (`--capture-video`) into `videos/` as itr_{itr:04d}_*.mp4."""
        if result.get("videos"):
            from sims.video import save_videos
            result["videos"] = save_videos(result["videos"], os.path.join(self.dir, "videos"), f"itr_{itr:04d}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def log_eval(self, itr: int, env_steps: int, mode: str, result: dict[str, Any]) -> None:
        """One `eval.csv` row; deterministic evaluations also go to TensorBoard under `eval/`; the evaluation's
        recorded episodes (`--capture-video`) are moved to `videos/itr_{itr:04d}_ep{env}_return_..._success_....mp4`
        and `result["videos"]` becomes their paths."""
        self.save_videos(itr, result)
        self.eval_log.write(itr, env_steps, mode, result)
        if mode == "deterministic":
            self.scalars({"eval/episodic_return": result["return_mean"], "eval/success_rate": result["success_rate"]}, itr)

    def log_evaluation_iteration(self, itr: int, env_steps: int, result: dict[str, Any], last_train: dict[str, Any],
                                 bar: Any) -> None:
        """An evaluation-only iteration of a fine-tuning loop: the deterministic `result` row, the row of the
        training episodes since the last one (`last_train`, when there were any) and the progress bar."""
        self.log_eval(itr, env_steps, "deterministic", result)
        if last_train:
            self.log_eval(itr, env_steps, "stochastic", last_train)
        bar.set_postfix(steps=env_steps, eval_success=f"{result['success_rate']:.2f}",
                        eval_return=f"{result['return_mean']:.1f}")

    def log_iteration(self, itr: int, losses: dict[str, float], train: dict[str, Any], sps: float,
                      lrs: dict[str, float]) -> None:
        """`losses/*` (policy_loss, value_loss, approx_kl, clipfrac, explained_variance, ...),
        `charts/*` (episodic_return and success_rate of the episodes that ended, SPS, learning rates)."""
        names = {"pg_loss": "policy_loss", "v_loss": "value_loss"}
        self.scalars({f"losses/{names.get(k, k)}": v for k, v in losses.items()}, itr)
        self.scalars({"charts/episodic_return": train["return_mean"], "charts/success_rate": train["success_rate"],
                      "charts/SPS": sps, **{f"charts/{k}_learning_rate": v for k, v in lrs.items()}}, itr)

    def end_iteration(self, itr: int, logged: dict[str, float], train: dict[str, Any], sps: float,
                      lrs: dict[str, float], row: dict[str, Any], times: dict[str, float], bar: Any, env_steps: int) -> None:
        """The end of a training iteration, the same in every fine-tuning script: TensorBoard (`log_iteration`), the
        iteration's history `row` (its losses and statistics, learning rates and phase times) and the progress bar."""
        self.log_iteration(itr, logged, train, sps, lrs)
        row.update(logged)
        row.update({f"lr_{k}": v for k, v in lrs.items()})
        row.update({f"time_{k}": v for k, v in times.items()})
        bar.set_postfix(steps=env_steps, success=f"{train['success_rate']:.2f}", ret=f"{train['return_mean']:.1f}",
                        sps=f"{sps:.0f}")

    def finish(self, itr: int, env_steps: int, mode: str, final: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """Write the final evaluation row, the Avoid before/after picture (`trajectories.png`) when
        `paths_before` was taken, print the one-line summary (the run's first evaluation row -> `final`)
        and return what `main` returns: absolute run folder and checkpoint paths, the eval rows, the
        final evaluation and `extra`."""
        if self.paths_before is not None and "paths" in final:
            from sims.plots import plot_avoid_paths
            plot_avoid_paths({"before fine-tuning": self.paths_before, "after fine-tuning": final["paths"]},
                             os.path.join(self.dir, "trajectories.png"))
        rows = self.eval_log.rows
        first = rows[0] if rows else {"success_rate": math.nan, "return_mean": math.nan}
        self.log_eval(itr, env_steps, mode, final)
        self.writer.close()
        print(f"run folder {self.dir}: success {float(first['success_rate']):.2f} -> {final['success_rate']:.2f}, "
              f"return {float(first['return_mean']):.2f} -> {final['return_mean']:.2f}")
        return {"run_dir": os.path.abspath(self.dir), "checkpoint": os.path.abspath(self.checkpoint),
                "eval_rows": list(rows), "final_eval": final, **extra}


def object_state(obj: Any) -> Any:
    """Checkpoint data of an `extra` object: its `state_dict()`, else (e.g. a script's reward scaler) its attributes, numbers
    and arrays as float64/int64 tensors (loadable with weights_only=True); plain values (a string, a number) as they are."""
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    if not hasattr(obj, "__dict__"):
        return obj
    return {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else
            torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else None) for k, v in vars(obj).items()}


def load_object_state(obj: Any, state: Any) -> None:
    """Restore what `object_state` saved (attributes back to the arrays and Python numbers they were)."""
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
    elif hasattr(obj, "__dict__"):
        for k, v in state.items():
            setattr(obj, k, v.numpy().copy() if isinstance(getattr(obj, k, None), np.ndarray) else v.item())

# ---- the loop of a fine-tuning script ----

class Run:
    """What every fine-tuning loop repeats, so that the script's loop shows its method and a few calls: the evaluation
    (the policy on the task's envs, on its own random stream), `--eval-only`, the training state restored on resume, the
    run folder, episode statistics, history, phase timer, progress bar, SPS, the evaluation iterations and the
    log-and-save tail. Every setting comes as an explicit value; `config` (the script's `Args`) is only recorded.

        run = Run(args, envs, task, normalizer, policy, act_steps=T_e, device=device, seed=args.seed, ...)
        if args.eval_only:
            return run.eval_only(index=ckpt.get("itr", 0))
        run.start(resume, header, modules, optimizers, schedulers, extra)
        for itr in run.iterations(n_train_itr):
            if run.evaluation_iteration(itr):
                continue
            if run.need_reset or task.reset_every_iteration:
                obs = run.reset_envs(itr)
            for step in range(n_steps):
                ...; run.lap("sampling"); ...; obs, reward, term, trunc, info = envs.step(action); ...
                run.step(reward, term | trunc)
            run.end_rollout(itr)
            ...; run.lap("update")
            run.end_iteration(itr, losses, learning_rates)
        return run.finish()

    `policy(cond, deterministic)`: normalised observations (N, T_o, D_o) -> the normalised chunk to execute (N, T_a, D_a).
    Avoid is evaluated with the training noise (App. D.8), every other task deterministically; with `val_freq` > 0 an
    evaluation takes every val_freq-th iteration (Avoid: that iteration's training episodes are its row).
    """

    def __init__(self, config: Any, envs: Any, task: Any, normalizer: Any,
                 policy: Callable[[torch.Tensor, bool], torch.Tensor], *, act_steps: int, device: torch.device, seed: int,
                 exp_name: str, eval_n_steps: int | None = None, val_freq: int = 10, save_every: int = 1,
                 plot: bool = True, track: bool = False, wandb_project: str = "dppo", resume_dir: str | None = None) -> None:

        self.config, self.envs, self.task, self.normalizer, self.policy = config, envs, task, normalizer, policy
        self.act_steps, self.device, self.seed, self.exp_name = act_steps, device, seed, exp_name
        self.eval_n_steps, self.val_freq, self.save_every, self.plot = eval_n_steps, val_freq, save_every, plot
        self.track, self.wandb_project, self.resume_dir = track, wandb_project, resume_dir
        self.eval_deterministic = task.suite != "avoid"
        self.tracker = EpisodeTracker(envs.num_envs, act_steps, task.success_chunk_reward, task.success_return)
        self.timer = PhaseTimer(device)
        self.history: list[dict[str, Any]] = []
        self.last_train: dict[str, Any] = {}
        self.need_reset = True  # the envs must be reset before the next rollout (at the start, after an evaluation)
        self.start_itr = self.n_train_itr = self.env_steps = self.itr_env_steps = 0
        self.t_itr = time.time()
        print(f"envs: {envs.num_envs} x {task.id} on {envs.backend}")

    def evaluate(self, deterministic: bool, index: int) -> dict[str, Any]:
        """`common.envs.evaluate` of the policy, on the evaluation's own stream `index` (the iteration evaluated)."""

        def act(obs: np.ndarray) -> np.ndarray:
            cond = self.normalizer.normalize_obs(torch.as_tensor(obs, device=self.device))
            return self.normalizer.unnormalize_action(self.policy(cond, deterministic)).cpu().numpy()
        return evaluate(self.envs, act, self.task, self.act_steps, seed=self.seed + 1_000_000, index=index,
                        n_steps=self.eval_n_steps)

    def eval_only(self, index: int) -> dict[str, Any]:
        """`--eval-only` (`eval_only`, writes nothing) of the checkpoint of iteration `index`; closes the envs."""
        out = eval_only(self.evaluate, self.task.id, self.exp_name, self.seed, index)
        self.envs.close()
        return out

    def start(self, resume: dict[str, Any] | None, header: dict[str, Any], modules: dict[str, nn.Module],
              optimizers: dict[str, Any], schedulers: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Restore a resumed run's training state (optimisers, schedulers, each `extra` object (`load_object_state`), the
        torch RNG), or seed a new run's training stream (`stream_seed(seed, TRAINING_STREAM)`: what the script drew while
        building its networks does not change training's draws); take the Avoid "before" rollouts for the picture (an
        evaluation: its own stream). The run folder opens with the first iteration (`iterations`). The checkpoints hold
        `header`, the config, the `modules`' weights, optimisers, schedulers and `extra` (`object_state`)."""
        self.header, self.modules, self.optimizers, self.schedulers = header, modules, optimizers, schedulers
        self.extra = extra or {}
        if resume is not None:
            self.start_itr, self.env_steps = restore_training(resume, optimizers, schedulers)
            for key, obj in self.extra.items():
                load_object_state(obj, resume[key])
        else:
            torch.manual_seed(stream_seed(self.seed, TRAINING_STREAM))
        self.resumed = resume is not None
        self.before = None
        if self.task.suite == "avoid" and self.plot and self.start_itr == 0:
            self.before = self.evaluate(self.eval_deterministic, 0)

    def iterations(self, n_train_itr: int) -> Iterator[int]:
        """The iterations left, under a progress bar; each starts the iteration's clock (SPS) and phase timer. First the
        run folder opens (`RunFolder`), on resume once the budget is checked (`check_resume_budget`)."""
        from tqdm import tqdm

        left = range(self.start_itr, n_train_itr)  # an evaluation iteration takes no update: one must be left
        if left and self.eval_deterministic and self.val_freq > 0 and all(itr % self.val_freq == 0 for itr in left):
            raise UsageError(f"--n-train-itr {n_train_itr} with --val-freq {self.val_freq}: every iteration left is an "
                             f"evaluation without an update on {self.task.id}, so the policy would never train; raise "
                             "--n-train-itr, or --val-freq (0: evaluate only after the last iteration)")
        if self.resumed:
            final_written = any(int(r["iteration"]) >= self.start_itr
                                for r in read_eval_rows(os.path.join(str(self.resume_dir), "eval.csv")))
            check_resume_budget(str(self.resume_dir), self.start_itr, n_train_itr, "--n-train-itr", "iterations",
                                left=None if final_written else "its final evaluation")
        self.folder = RunFolder(self.config, self.task.id, self.exp_name, self.seed, track=self.track,
                                wandb_project=self.wandb_project, resume_dir=self.resume_dir, resume_itr=self.start_itr)
        if self.before is not None:
            self.folder.paths_before = self.before["paths"]
            self.folder.save_videos(0, self.before)  # --capture-video: the policy before fine-tuning, as itr_0000
        self.n_train_itr = n_train_itr
        self.bar = tqdm(range(self.start_itr, n_train_itr), initial=self.start_itr, total=n_train_itr, desc="iterations")
        for itr in self.bar:
            self.t_itr, self.itr_env_steps = time.time(), 0
            self.timer.reset()
            yield itr
        self.bar.close()

    def evaluation_iteration(self, itr: int) -> bool:
        """On tasks evaluated deterministically, every val_freq-th iteration is an evaluation and no update (as the
        reference's `TrainPPODiffusionAgent.run`): its row, the row of the training episodes since the last one and
        the progress bar; the envs are reset before the next rollout. Returns whether `itr` is one."""
        if not (self.eval_deterministic and self.val_freq > 0 and itr % self.val_freq == 0):
            return False
        result = self.evaluate(True, itr)
        self.folder.log_evaluation_iteration(itr, self.env_steps, result, self.last_train, self.bar)
        self.need_reset = True
        return True

    def reset_envs(self, itr: int) -> np.ndarray:
        """Reset the envs for iteration `itr` (seed + itr·N) and drop the episodes they were running."""
        obs = self.envs.reset(seed=self.seed + itr * self.envs.num_envs)
        self.tracker.reset()
        self.need_reset = False
        return obs

    def lap(self, phase: str) -> None:
        """The time since the last lap counts as `phase` (history's time_{phase} and cpu_{phase})."""
        self.timer.lap(phase)

    def step(self, reward: np.ndarray, done: np.ndarray) -> None:
        """After each chunk-step of the rollout: the episode statistics, the env steps, and the time since the last lap
        as `env`."""
        self.tracker.step(reward, np.asarray(done, dtype=bool))
        self.itr_env_steps += len(reward) * self.act_steps
        self.timer.lap("env")

    def end_rollout(self, itr: int) -> dict[str, Any]:
        """The training episodes that ended in this rollout (returned) start the iteration's history row; on Avoid, in
        an evaluation iteration, they are its `eval.csv` row."""
        self.env_steps += self.itr_env_steps
        self.last_train = self.tracker.pop()
        self.history.append({"iteration": itr, "env_steps": self.env_steps, **self.last_train})
        if not self.eval_deterministic and self.val_freq > 0 and itr % self.val_freq == 0:
            self.folder.log_eval(itr, self.env_steps, "stochastic", self.last_train)
        return self.last_train

    def end_iteration(self, itr: int, logged: dict[str, float], lrs: dict[str, float]) -> None:
        """TensorBoard, the history row (losses and statistics `logged`, learning rates `lrs`, phase times), the progress
        bar; the checkpoint every save_every iterations and after the last."""
        sps = self.itr_env_steps / (time.time() - self.t_itr)
        self.folder.end_iteration(itr, logged, self.last_train, sps, lrs, self.history[-1], self.timer.times, self.bar,
                                  self.env_steps)
        self.history[-1].update({f"cpu_{k}": v for k, v in self.timer.cpu_times.items()})
        if (itr + 1) % self.save_every == 0 or itr + 1 == self.n_train_itr:
            extra = {k: object_state(v) for k, v in self.extra.items()}
            save_checkpoint(self.folder.checkpoint, finetune_checkpoint(
                self.header, self.config, self.modules, self.optimizers, self.schedulers, extra, itr + 1, self.env_steps))

    def finish(self) -> dict[str, Any]:
        """A final evaluation row after the last update, the summary (`RunFolder.finish`); closes the envs. Returns what
        `main` returns: run folder, checkpoint, eval rows, the final evaluation and the history."""
        final = self.evaluate(self.eval_deterministic, self.n_train_itr)
        out = self.folder.finish(self.n_train_itr, self.env_steps, "deterministic" if self.eval_deterministic
                                 else "stochastic", final, {"history": self.history})
        self.envs.close()
        return out


# ---- evaluation report and small shared numbers ----

def eval_only(run_eval: Callable[[bool, int], dict[str, Any]], task_id: str, exp_name: str, seed: int,
              index: int = 0) -> dict[str, Any]:
    """`--eval-only`: the one evaluation function, deterministic and stochastic, printed, with the evaluation stream's
    `index` (the checkpoint's iteration: the training run's evaluation of these weights drew the same); nothing is written,
    except with `--capture-video`: the recorded episodes go to a new run folder
    `runs/{task_id}__{exp_name}__{seed}__{time}/videos/eval_only_{mode}_ep{env}_return_..._success_....mp4`
    (made only once the evaluations have succeeded; no eval.csv, no checkpoint)."""
    results = {}
    for mode, det in (("deterministic", True), ("stochastic", False)):
        r = results[mode] = run_eval(det, index)
        print(f"{mode}: return {r['return_mean']:.2f} ± {r['return_std']:.2f}, success {r['success_rate']:.3f} "
              f"over {r['n_episodes']} episodes" + (f", modes {r['mode_fractions']}" if "mode_fractions" in r else ""))
    if any(r.get("videos") for r in results.values()):
        from sims.video import save_videos
        folder = os.path.join(new_run_dir(task_id, exp_name, seed), "videos")
        for mode, r in results.items():
            r["videos"] = save_videos(r.get("videos", []), folder, f"eval_only_{mode}")
        print(f"videos: {folder}")
    return {"eval": results}


def cosine_annealing_warmup(lr: float, lr_min: float, first_cycle_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LambdaLR factor (of `lr`) per scheduler step s, as `irom-princeton/dppo` `util/scheduler.py`
    `CosineAnnealingWarmupRestarts` (gamma 1, cycle_mult 1): the LR starts at lr_min (s = 0), rises
    linearly to lr over `warmup_steps`, then follows a cosine from lr down to lr_min over
    first_cycle_steps - warmup_steps steps, and restarts every first_cycle_steps. Constant (factor
    exactly 1) when lr_min == lr."""
    if lr_min != lr and not 0 <= warmup_steps < first_cycle_steps:  # (constant schedules never divide)
        raise UsageError(f"the LR warm-up ({warmup_steps}) must be shorter than the LR cycle ({first_cycle_steps})")

    def f(step: int) -> float:
        if lr_min == lr:
            return 1.0
        if step == 0:  # the reference's init_lr() sets min_lr after construction
            return lr_min / lr
        s = step % first_cycle_steps
        if s < warmup_steps:
            return ((lr - lr_min) * s / warmup_steps + lr_min) / lr
        progress = (s - warmup_steps) / (first_cycle_steps - warmup_steps)
        return (lr_min + (lr - lr_min) * (1 + math.cos(math.pi * progress)) / 2) / lr
    return f


def optimizer_with_schedule(module: nn.Module, lr: float, lr_min: float, cycle_itr: int, warmup_itr: int,
                            weight_decay: float = 0.0) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay 0 in every reference fine-tuning config) with the reference's per-iteration
    cosine schedule (`cosine_annealing_warmup`; constant when lr_min == lr)."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine_annealing_warmup(lr, lr_min, cycle_itr, warmup_itr))


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor) -> float:
    var = y_true.var()
    return (1 - (y_true - y_pred).var() / var).item() if var > 0 else math.nan


class PhaseTimer:
    """Wall time (`times`) and process CPU time (`cpu_times`, which other jobs on a shared machine barely disturb) per
    phase of an iteration (env, sampling, update, ...). On CUDA it synchronises only at phase boundaries, where the
    rollout syncs anyway to hand actions to the envs."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._last = device, {}, time.perf_counter()
        self.cpu_times: dict[str, float] = {}
        self._last_cpu = time.process_time()

    def reset(self) -> None:
        self.times.clear()
        self.cpu_times.clear()
        self.lap("other")

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.process_time()
        self.times[phase] = self.times.get(phase, 0.0) + now - self._last
        self.cpu_times[phase] = self.cpu_times.get(phase, 0.0) + cpu - self._last_cpu
        self._last, self._last_cpu = now, cpu
