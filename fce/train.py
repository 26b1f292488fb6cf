"""One run from a validated config: build, track, train, checkpoint, and end cleanly.

The entry points (run.py, the sweep driver) compose and validate the config and call ``run``
with the run's output directory; nothing here reads Hydra's global state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fce import checkpoint
from fce.callbacks import Checkpoints, Figures, OnEval
from fce.config import ConfigError, RunConfig, user_settings
from fce.factory import build, resolve_device, run_name
from fce.interrupts import RunInterrupted, deferred_interrupts
from fce.progress import Progress
from fce.provenance import git_commit
from fce.resume import Resume, load_into, load_resume
from fce.tracking import NullTracker, Tracker, TrackingError, TrackingFault, flatten
from fce.trainer import DivergenceError, StopRun, Trainer

log = logging.getLogger("fce")


class RunFault(RuntimeError):
    """The run's disk or its store failed mid-run; the message names the fault, the step and
    the checkpoint to resume from."""


@dataclass
class RunContext:
    """What the entry point knows and the run needs: where things go and how it was called."""

    output_dir: Path
    project_root: Path
    overrides: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    on_run_created: Callable[[str], None] | None = None
    name_suffix: str = ""  # after the run's name: a grid job's swept values


@contextlib.contextmanager
def claimed(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir`` for this process: a second process on the same run (two resumes,
    or a resume while the original still trains) is refused. The lock dies with the process."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / ".lock", "a+")  # noqa: SIM115 (held across the yield)
    except OSError as error:
        raise ConfigError(f"output directory {output_dir}: {error.strerror}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise ConfigError(
                f"{output_dir}: this run is live in {owner}; wait for it or stop it first"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


def open_tracker(
    cfg: RunConfig, context: RunContext, run_id: str | None, output_dir: Path, device: str
) -> Tracker:
    """The ``tracking`` group's tracker, with the run's name and provenance tags."""
    tags = {
        "git_commit": git_commit(context.project_root),
        "overrides": " ".join(context.overrides),
        "device": device,
        "output_dir": str(output_dir),
        **context.tags,
    }
    name = cfg.tracking.get("run_name") or run_name(cfg)
    if context.name_suffix:
        name = f"{name} {context.name_suffix}"
    try:
        return instantiate(cfg.tracking)(
            run_name=name, run_id=run_id, tags=tags, project_root=context.project_root
        )
    except TrackingError as error:
        raise ConfigError(str(error)) from None


def used_settings(cfg: RunConfig) -> dict[str, str]:
    """The run's settings as MLflow params, without those of a model it never uses: a compare
    view of FCE and NCE runs would show NCE's flow settings (its noise is a fitted Gaussian)
    as if they mattered. The ``name`` of every group stays, for grouping runs."""
    from fce.factory import target_of

    estimator = target_of(cfg.estimator)
    fitted_noise = cfg.estimator.get("noise") == "gaussian"
    uses_flow = estimator.evaluates_flow and not fitted_noise
    unused = [] if uses_flow else ["flow.", "optimizer.lr_flow"]
    unused += [] if estimator.evaluates_ebm else ["ebm.", "optimizer.lr_ebm", "train.ema_decay"]
    unused += [] if estimator.uses_rule else ["threshold."]  # it alternates the two players
    return {
        key: value
        for key, value in flatten(user_settings(cfg)).items()
        if key.endswith(".name") or not any(key.startswith(u) for u in unused)
    }


def run(cfg: RunConfig, context: RunContext) -> dict[str, float]:
    """Train as ``cfg`` says, logged by its tracker; return the final metrics.

    Raises:
        ConfigError: bad input found after composition (device, resume); no run is created.
        DivergenceError: a non-finite value; the run is marked FAILED, checkpoints kept.
        RunInterrupted: SIGINT/SIGTERM; a checkpoint is written and the run marked KILLED.
        RunFault: a checkpoint or the store could not be written mid-run (a full disk, a
            locked store, a dead server); a checkpoint is kept and the run marked FAILED
            where the store can still be written.
        StopRun: raised by ``context.on_eval`` (a pruned trial); the run is marked KILLED
            and tagged ``stopped_early``.
    """
    started = time.perf_counter()
    # From here a signal is noted and acted on at a safe point: before the tracked run
    # exists (nothing to end), or at a step boundary (a checkpoint, the run marked KILLED).
    with deferred_interrupts() as stop:
        resume = load_resume(cfg)
        continued = resume is not None and resume.state is not None
        torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        # A resumed run keeps writing into the directory it started in.
        output_dir = resume.output_dir if resume and resume.output_dir else context.output_dir
        with claimed(output_dir):
            if resume is None and (output_dir / "config.yaml").exists():
                raise ConfigError(
                    f"{output_dir}: already holds a run; continue it with train.resume="
                    f"{output_dir}, or choose another hydra.run.dir"
                )
            try:
                try:
                    if not continued:
                        # First: a run dir with config.yaml and no checkpoint is one killed
                        # early, which ``train.resume`` starts again in place.
                        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
                        (output_dir / "config.yaml").write_text(config_yaml)
                    # Before the store is touched: a resumed FINISHED run stays FINISHED.
                    checkpoint.check_writable(output_dir / "checkpoints")
                except OSError as error:
                    message = f"{output_dir}: cannot write there ({error.strerror})"
                    raise ConfigError(message) from None
                except checkpoint.CheckpointError as error:
                    raise ConfigError(str(error)) from None
                trainer = build(cfg, device).trainer()
                if continued:
                    load_into(trainer, resume)
                stop.check()
                run_id = tracked_run(resume.state) if continued else None
                tracker = open_tracker(cfg, context, run_id, output_dir, str(device))
            except ConfigError:
                if resume is None:
                    unwrite(output_dir)
                raise
            if context.on_run_created is not None and tracker.run_id is not None:
                context.on_run_created(tracker.run_id)
            return _train(cfg, context, trainer, tracker, stop, output_dir, resume, started)


def unwrite(output_dir: Path) -> None:
    """Remove what a refused run wrote in its new directory (its config.yaml, an empty
    checkpoints/): else the same command, corrected, is refused as "already holds a run"."""
    (output_dir / "config.yaml").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty, or not a directory: not ours to remove
        (output_dir / "checkpoints").rmdir()


def _train(cfg, context, trainer, tracker, stop, output_dir, resume, started) -> dict[str, float]:
    """The run from its first step to its status; a signal is acted on at a step boundary,
    never in the middle of a store write, so the run always ends with a status."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    checkpoint_dir = output_dir / "checkpoints"
    continued = resume is not None and resume.state is not None

    def save_checkpoint(trainer: Trainer) -> Path:
        state = {
            "trainer": trainer.state_dict(),
            "config": resolved,
            "tracker_run_id": tracker.run_id,
        }
        try:
            return checkpoint.save(state, checkpoint_dir, trainer.step)
        except OSError as error:
            reason = error.strerror or str(error)
            raise RunFault(f"cannot write a checkpoint in {checkpoint_dir} ({reason})") from error

    def stopped(fault: Exception, write: bool) -> RunFault:
        """The fault, the step, and the checkpoint to resume from (written now if ``write``:
        the store failed, so the steps it lacks are kept in the checkpoint instead)."""
        newest = checkpoint.list_checkpoints(checkpoint_dir)
        where = f"newest checkpoint {newest[-1]}" if newest else "no checkpoint yet"
        if write:
            trainer.attach(NullTracker(), trainer.callbacks)  # nothing more to the failed store
            try:
                where = f"checkpoint {save_checkpoint(trainer)}"
            except RunFault as failed:
                where = f"{failed}; {where}"
        return RunFault(
            f"{fault}; stopped at step {trainer.step}, {where} "
            f"(resume with train.resume={output_dir})"
        )

    progress = Progress(cfg.progress)
    callbacks = [stop, progress, Figures(cfg.train.plot_every)]
    callbacks.append(Checkpoints(save_checkpoint, cfg.train.checkpoint_every))
    if context.on_eval is not None:
        callbacks.append(OnEval(context.on_eval))
    trainer.attach(tracker, callbacks)
    status, final, error = "FAILED", {}, None
    try:
        if continued:
            _continue(trainer, tracker, resume)
        else:
            tracker.log_params(used_settings(cfg))
            tracker.log_artifact(output_dir / "config.yaml")
        log.info(
            "ready in %.1fs: %s on %s, %s steps, %s",
            time.perf_counter() - started,
            cfg.flow.name,
            cfg.dataset.name,
            trainer.total_steps,
            tracker.describe(),
        )
        try:
            stop.check()  # a signal during the set-up: the run exists, end it KILLED
            final = trainer.run()
        except StopRun:
            status = "KILLED"
            tracker.set_tags({"stopped_early": "true"})
            raise
        except RunInterrupted:
            status = "KILLED"
            path = save_checkpoint(trainer)
            log.warning("interrupted at step %d; checkpoint %s", trainer.step, path)
            raise
        finally:
            progress.close()
        final_path = checkpoint.list_checkpoints(checkpoint_dir)[-1]
        tracker.log_artifact(final_path, "checkpoints")
        wall = time.perf_counter() - started
        tracker.log_metrics({"wall_time_s": wall}, trainer.step)
        status = "FINISHED"
        log.info(
            "finished %d steps in %.0fs: %s",
            trainer.step,
            wall,
            "  ".join(f"{k} {v:.4g}" for k, v in final.items()),
        )
        log.info("%s", where_things_went(tracker, output_dir))
        return final
    except DivergenceError as diverged:
        error = str(diverged)
        saved = checkpoint.list_checkpoints(checkpoint_dir)
        kept = f"last good checkpoint kept: {saved[-1]}" if saved else "no checkpoint before it"
        log.error("%s; %s", diverged, kept)
        raise
    except (TrackingFault, RunFault) as fault:
        status = "FAILED"
        failure = stopped(fault, write=isinstance(fault, TrackingFault))
        error = str(failure)
        raise failure from fault
    finally:
        outcome = {"status": status, "step": trainer.step, "error": error}
        keep_run_files(cfg, output_dir)
        _end(tracker, output_dir, outcome, time.perf_counter() - started, final)


def keep_run_files(cfg: RunConfig, output_dir: Path) -> None:
    """A run directory deleted (or emptied) while the run trained: its checkpoints are written
    again by the next save, but its config.yaml and log are not; write the config again and
    say what is lost, rather than end with them silently gone."""
    lost = [
        Path(h.baseFilename).name
        for h in logging.getLogger().handlers
        if isinstance(h, logging.FileHandler)
        and Path(h.baseFilename).parent == output_dir.absolute()
        and not Path(h.baseFilename).exists()
    ]
    config_yaml = output_dir / "config.yaml"
    if not config_yaml.exists():
        lost.append("config.yaml")
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            config_yaml.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        except OSError as failed:
            log.warning("could not write %s again (%s)", config_yaml, failed.strerror)
    if lost:
        log.warning(
            "%s lost %s while the run trained (deleted?); config.yaml written again, the "
            "log's lines before now are gone",
            output_dir,
            " and ".join(lost),
        )


def _continue(trainer: Trainer, tracker: Tracker, resume: Resume) -> None:
    """Record what changed since the checkpoint (loaded already, ``load_into``), and log the
    steps the store lacks (its writes failed before the checkpoint was saved; the tracker
    skips those it holds)."""
    log.info("resuming from %s at step %d", resume.path, trainer.step)
    if resume.changed:
        changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in resume.changed.items())
        tracker.set_tags({f"fce.resumed_at_step_{trainer.step}": changes})
    for name, (steps, values) in trainer.history.history.items():
        tracker.log_history(steps, {name: values})


def _end(
    tracker: Tracker, output_dir: Path, outcome: dict, wall: float, final: dict[str, float]
) -> None:
    """The run's outcome beside its checkpoints (``metrics.json``, whatever the tracker), then
    its status in the store. Each write is tried even when the other fails (a full disk, a
    dead store), and the status is the last write: nothing after it can change it."""
    try:
        write_json(output_dir / "metrics.json", {**outcome, "wall_time_s": wall, **final})
    except OSError as failed:
        log.warning("could not write %s (%s)", output_dir / "metrics.json", failed.strerror)
    status = outcome["status"]
    try:
        tracker.finish(status)
    except TrackingFault as failed:
        log.warning(
            "%s: the run is not marked %s there; the next run on this host that opens "
            "the store marks it KILLED",
            failed,
            status,
        )
        if status == "FINISHED":  # no other error on its way: this one is the run's
            raise RunFault(
                f"{failed}; the run finished but its status was not recorded "
                f"(resume with train.resume={output_dir} to record it)"
            ) from None


def tracked_run(state: dict) -> str | None:
    """The id of the tracker's run a checkpoint belongs to (None: not tracked); older
    checkpoints keep it under ``mlflow_run_id``."""
    return state.get("tracker_run_id", state.get("mlflow_run_id"))


def where_things_went(tracker: Tracker, output_dir: Path) -> str:
    """One line: the run's directory, and its tracked run and how to look at it."""
    if tracker.run_id is None:
        return f"outputs in {output_dir} ({tracker.describe(full=True)})"
    return f"outputs in {output_dir}; {tracker.describe(full=True)}"


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file
        raise
