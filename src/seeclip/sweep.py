"""Sweeps: every (variant, protocol, target, seed) of a preset, resumable, in N processes.

A sweep is a list of labelled variants (overrides on one preset) crossed with split families,
target domains and seeds. Each combination is one ordinary run folder
(:func:`seeclip.runner.run_eval`), so a sweep adds no state of its own:

- a finished run (``done``) is skipped, an unfinished one is redone;
- each run holds an exclusive lock (``fcntl.flock`` on ``<run folder>/lock``) while it works,
  so two sweeps over one runs folder never compute a run twice at once; a run locked by
  another process is waited for at the end;
- ``jobs`` processes (``spawn``, one torch thread each by default) share the feature cache,
  which the parent fills first so that no two processes build it at once;
- stopping the sweep (Ctrl-C, or SIGTERM from ``kill``, ``timeout`` or a scheduler) stops its
  worker processes too; finished runs stay finished, so the same command resumes.

A sweep file (YAML) names everything::

    config: configs/digits.yaml
    protocols: [full, daml]
    targets: all            # or a list of domains
    seeds: [0, 1, 2]
    overrides: []           # applied to every variant
    variants:
      zeroshot: [method=zeroshot]
      seeclip_no_pseudo: [method=seeclip, train.pseudo_unknowns=none]

On the command line a variant is ``METHOD[:key=value,key=value...]``; its label is the method,
or ``label=...`` among its overrides, or the method and the overrides' last key parts.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from seeclip import distributed
from seeclip.config import ConfigError, apply_overrides, parse_variants
from seeclip.io import file_lock
from seeclip.run_config import RunConfig, load_config

LOCK = "lock"  # the file a run folder is locked by while a process computes it


@dataclass(frozen=True)
class Variant:
    """A labelled setting: ``overrides`` applied to the sweep's preset."""

    label: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class SweepSpec:
    config: str  # the preset every variant starts from
    variants: tuple[Variant, ...]
    protocols: tuple[str, ...] = ("full",)
    targets: tuple[str, ...] | None = None  # None: every target of the benchmark
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()  # applied to every variant, before its own

    def __post_init__(self) -> None:
        labels = [v.label for v in self.variants]
        if not labels:
            raise ConfigError("a sweep needs at least one variant (--methods or variants:)")
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ConfigError(
                f"variant label(s) {', '.join(dupes)} given twice; label each "
                "variant differently (label=...)"
            )


def parse_variant(text: str) -> Variant:
    """``coop`` or ``seeclip:train.pseudo_unknowns=none,loss.alpha=0`` as a :class:`Variant`."""
    method, _, rest = text.partition(":")
    if not method or "=" in method:
        raise ConfigError(
            f"variant {text!r}: expected METHOD[:key=value,...], e.g. "
            "seeclip:train.pseudo_unknowns=none"
        )
    overrides = [o.strip() for o in rest.split(",") if o.strip()]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"variant {text!r}: {bad[0]!r} is not key=value")
    labels = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "label"]
    rest_ov = [o for o in overrides if o.split("=", 1)[0] != "label"]
    if labels:
        label = labels[-1]
    elif rest_ov:
        parts = [f"{o.split('=', 1)[0].rsplit('.', 1)[-1]}={o.split('=', 1)[1]}" for o in rest_ov]
        label = f"{method}[{','.join(parts)}]"
    else:
        label = method
    return Variant(label, (f"method={method}", *rest_ov))


def load_sweep(path: str | Path) -> SweepSpec:
    """A sweep file (see the module docstring) as a :class:`SweepSpec`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    allowed = {"config", "protocols", "targets", "seeds", "overrides", "variants"}
    if not isinstance(raw, dict) or set(raw) - allowed or "variants" not in raw:
        raise ConfigError(
            f"{path}: a sweep file has `variants:` and optionally "
            f"{', '.join(sorted(allowed - {'variants'}))}, nothing else"
        )
    if "config" not in raw:
        raise ConfigError(f"{path}: name the preset, e.g. `config: configs/digits.yaml`")
    out = [Variant(label, ov) for label, ov in parse_variants(raw["variants"], path).items()]
    targets = raw.get("targets", "all")
    return SweepSpec(
        config=str(raw["config"]),
        variants=tuple(out),
        protocols=tuple(_as_list(raw.get("protocols", ["full"]))),
        targets=None if targets in ("all", None) else tuple(_as_list(targets)),
        seeds=tuple(int(s) for s in _as_list(raw.get("seeds", [0]))),
        overrides=tuple(_as_list(raw.get("overrides", []))),
    )


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def plan(spec: SweepSpec) -> list[RunConfig]:
    """Every run of the sweep, each with its label (configs validated before anything runs).

    Seed-major order: all of seed 0 first, so that an interrupted sweep leaves whole tables
    of fewer seeds rather than some rows with every seed and others with none."""
    from seeclip.datasets import get_benchmark
    from seeclip.methods.registry import METHODS
    from seeclip.wiring import check_inputs

    base = load_config(spec.config, spec.overrides)
    per_variant = []
    for variant in spec.variants:
        cfg = apply_overrides(base, list(variant.overrides))
        if cfg.method not in METHODS:
            raise ConfigError(
                f"variant {variant.label!r}: unknown method {cfg.method!r}; "
                f"choose one of {', '.join(sorted(METHODS))} (or a label of "
                "the sweep file)"
            )
        cfg = dataclasses.replace(cfg, label=None if variant.label == cfg.method else variant.label)
        check_inputs(cfg)  # random weights on a real benchmark, a missing generator: up front
        cells = []
        for protocol in spec.protocols:
            data = dataclasses.replace(cfg.data, protocol=protocol)
            bench = get_benchmark(
                data.benchmark, classes_file=data.classes_file, data_root=data.data_root
            )
            if protocol not in bench.protocols:
                raise ConfigError(
                    f"benchmark {data.benchmark} has no protocol {protocol!r}; "
                    f"it has {', '.join(bench.protocols)}"
                )
            targets = spec.targets or bench.targets
            unknown = [t for t in targets if t not in bench.targets]
            if unknown:
                raise ConfigError(
                    f"{data.benchmark} has no target domain {unknown[0]!r}; "
                    f"its targets are {', '.join(bench.targets)}"
                )
            cells += [
                dataclasses.replace(cfg, data=dataclasses.replace(data, target=t)) for t in targets
            ]
        per_variant.append(cells)
    return [
        dataclasses.replace(c, seed=seed)
        for seed in spec.seeds
        for cells in per_variant
        for c in cells
    ]


def is_done(cfg: RunConfig, runs_dir: str | Path, validate=None) -> bool:
    """Finished, and validated when ``validate`` (LODO settings) asks for it."""
    run_dir = cfg.run_dir(runs_dir)
    if not (run_dir / "done").exists():
        return False
    if validate is None:
        return True
    from seeclip.validation import read_validation

    saved = read_validation(run_dir)
    return saved is not None and saved.get("settings") == dataclasses.asdict(validate)


@contextmanager
def run_lock(run_dir: Path, *, wait: bool) -> Iterator[bool]:
    """Hold ``run_dir/lock`` exclusively; yields False (without waiting) when another process
    holds it and ``wait`` is False. The lock goes with the process, even if it dies."""
    with file_lock(run_dir / LOCK, wait=wait) as held:
        yield held


@dataclass(frozen=True)
class Outcome:
    """What one run of a sweep came to."""

    cfg: RunConfig
    status: str  # ran | reused | busy (another process holds it) | failed
    run_dir: Path
    record: dict | None = None
    seconds: float = 0.0
    error: str | None = None


def execute(
    cfg: RunConfig,
    runs_dir: str,
    cache_dir: str | None,
    validate=None,
    wait: bool = False,
    progress: bool = False,
) -> Outcome:
    """One run under its lock (validated on the sources too when ``validate`` is given)."""
    from seeclip.validation import evaluate

    run_dir = cfg.run_dir(runs_dir)
    start = time.perf_counter()
    try:
        with run_lock(run_dir, wait=wait) as locked:
            if not locked:
                return Outcome(cfg, "busy", run_dir)
            result, _ = evaluate(
                cfg, runs_dir=runs_dir, cache_dir=cache_dir, progress=progress, validate=validate
            )
    except Exception as err:  # one bad run must not stop the others; reported at the end
        return Outcome(
            cfg,
            "failed",
            run_dir,
            seconds=time.perf_counter() - start,
            error=f"{type(err).__name__}: {err}",
        )
    status = "reused" if result.cached and validate is None else "ran"
    return Outcome(cfg, status, run_dir, result.record, time.perf_counter() - start)


def _init_worker(threads: int, device: str) -> None:
    import torch

    torch.set_num_threads(threads)
    distributed.use_device(torch.device(device))  # the parent's --device


def warm_feature_caches(configs: Sequence[RunConfig], *, cache_dir: str | None, progress: bool):
    """Build each (benchmark tree, backbone) feature cache once, here, before workers start."""
    from seeclip.run_data import load_run_data

    seen = set()
    for cfg in configs:
        key = (
            cfg.data.benchmark,
            cfg.data.data_root,
            cfg.data.classes_file,
            cfg.backbone.name,
            cfg.backbone.pretrained,
        )
        if key not in seen:
            seen.add(key)
            try:
                load_run_data(cfg, cache_dir=cache_dir, progress=progress)
            except Exception:  # noqa: BLE001 - the run itself fails with this error, reported
                continue


@dataclass
class SweepResult:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def records(self) -> list[dict]:
        return [o.record for o in self.outcomes if o.record is not None]


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """A SIGTERM (``kill``, ``timeout``, a batch scheduler) unwinds like Ctrl-C, exit status 143.

    Python's default for SIGTERM ends the process at once, with no ``finally``: a sweep's
    workers would be left waiting for work forever. Only the main thread can take signals, so
    elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_parallel(
    fn: Callable,
    tasks: Sequence[tuple],
    *,
    jobs: int,
    on_result: Callable,
    initializer: Callable | None = None,
    initargs: tuple = (),
) -> None:
    """``fn(*task)`` for every task in ``jobs`` spawned processes; ``on_result`` gets each result
    in the parent as it arrives.

    Stopping the parent (Ctrl-C, SIGTERM) stops the workers too: the tasks not started are
    cancelled and the running ones end with their process (a run folder is only marked done
    when it is complete, so a resumed sweep redoes exactly those).
    """
    ctx = multiprocessing.get_context("spawn")
    others = set(multiprocessing.active_children())  # the caller's own processes stay untouched
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=initializer, initargs=initargs)
    try:
        with _sigterm_unwinds():
            pending = {pool.submit(fn, *task) for task in tasks}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    on_result(fut.result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in set(multiprocessing.active_children()) - others:
            worker.terminate()
        raise
    pool.shutdown()


def run_sweep(
    configs: Sequence[RunConfig],
    *,
    runs_dir: str = "runs",
    cache_dir: str | None = None,
    jobs: int = 1,
    threads: int = 1,
    validate=None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run every config not finished yet, ``jobs`` at a time; finished ones are read back."""
    start = time.perf_counter()
    result = SweepResult()
    todo = []
    for cfg in configs:
        if is_done(cfg, runs_dir, validate):
            from seeclip.records import final_record
            from seeclip.run_data import check_same_data

            run_dir = cfg.run_dir(runs_dir)
            record = final_record(run_dir)
            if record is not None:  # reused only for the data it saw
                check_same_data(cfg, record, run_dir)
            result.outcomes.append(Outcome(cfg, "reused", run_dir, record))
        else:
            todo.append(cfg)
    n_done = len(configs) - len(todo)
    if not todo:
        log(f"all {len(configs)} runs finished earlier under {runs_dir}: nothing to do")
        result.seconds = time.perf_counter() - start
        return result
    log(
        f"{len(configs)} runs: {n_done} finished earlier, {len(todo)} to run "
        f"({jobs} process{'es' if jobs > 1 else ''}, {threads} torch thread"
        f"{'s' if threads > 1 else ''} each) under {runs_dir}"
    )
    import torch

    torch.set_num_threads(threads)
    warm_feature_caches(todo, cache_dir=cache_dir, progress=progress)
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress, smoothing=0.1)
    busy: list[RunConfig] = []

    def finish(outcome: Outcome) -> None:
        if outcome.status == "busy":
            busy.append(outcome.cfg)
            return
        result.outcomes.append(outcome)
        bar.update(1)
        bar.set_postfix_str(f"{outcome.cfg.run_name()} {outcome.status}", refresh=False)
        if outcome.status == "failed":
            bar.write(f"FAILED {outcome.run_dir}: {outcome.error}")

    args = (runs_dir, cache_dir, validate)
    try:
        if jobs <= 1:
            with _sigterm_unwinds():
                for cfg in todo:
                    finish(execute(cfg, *args))
        else:
            init = (threads, str(distributed.device()))  # workers use the parent's --device
            run_parallel(
                execute,
                [(cfg, *args) for cfg in todo],
                jobs=jobs,
                on_result=finish,
                initializer=_init_worker,
                initargs=init,
            )
    except (KeyboardInterrupt, SystemExit):
        bar.close()
        log(
            f"stopped: {sum(o.status != 'failed' for o in result.outcomes)} runs are finished "
            f"under {runs_dir}; the same command resumes with the others"
        )
        raise
    for cfg in busy:  # another process held these: wait for it, then read (or redo) the run
        bar.set_postfix_str(f"waiting for {cfg.run_name()} (another process)", refresh=True)
        finish(execute(cfg, *args, wait=True))
    bar.close()
    result.seconds = time.perf_counter() - start
    return result
