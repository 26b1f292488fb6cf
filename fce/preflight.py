"""The checks before torch loads: a command line's bad input becomes one line and exit code 2
in a fraction of a second, before any job starts.

Torch-free. ``fce.cli.launch`` runs them for run.py (composing every value of a grid's lists,
and completing ``train.resume=<run>`` with the saved run's settings); the sweep's command
(``fce.sweep.command``) uses the group, store and directory checks.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override
from hydra.experimental.callback import Callback

from fce.errors import ConfigError, fail
from fce.schema import NAMED_GROUPS, options

if TYPE_CHECKING:
    from omegaconf import DictConfig

USER_GROUPS = (
    "dataset",
    "ebm",
    "flow",
    "optimizer",
    "threshold",
    "schedule",
    "estimator",
    "tracking",
    "experiment",
)


def exit_quietly_on_signals() -> None:
    """SIGINT/SIGTERM before a run exists: one line and the shell's exit code (130, 143).

    There is nothing to save or end yet; Python's default would print a KeyboardInterrupt
    traceback from whatever import was loading. A run replaces these handlers with its own
    (``fce.interrupts``), which stop at a step boundary.
    """

    def handler(signum: int, _frame: object) -> None:
        sys.stderr.write("error: interrupted before the run started\n")
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def group_options(conf_dir: Path, group: str) -> list[str]:
    return list(options(group, conf_dir))


def options_in(directories: list[Path], group: str) -> list[str]:
    return [option for directory in directories for option in options(group, directory)]


def search_path(overrides: list[Override]) -> list[Path]:
    """The directories ``hydra.searchpath=[file://...]`` adds to conf/: options of a user's
    own (a flow class of theirs and its YAML file) are options like the project's."""
    return [
        Path(str(entry).removeprefix("file://"))
        for override in overrides
        if override.key_or_group == "hydra.searchpath"
        for entry in (override.value() or [])
        if str(entry).startswith("file://")
    ]


def parse(args: Sequence[str]) -> list[Override] | None:
    """The overrides as Hydra's own grammar reads them; None if they do not parse (composing
    them then reports the error in Hydra's words, made one line)."""
    try:
        return OverridesParser.create().parse_overrides(list(args))
    except Exception:
        return None


def values(override: Override) -> list[str] | None:
    """The values an override gives its key, as override strings: one, or each of a sweep's
    (a list, ``choice``, ``range``); None for a ``glob``, which Hydra expands itself."""
    if not override.is_sweep_override():
        value = override.value()
        return ["" if value is None else str(value)]
    if isinstance(override.value(), Glob):
        return None
    return list(override.sweep_string_iterator())


def check_group_choices(args: Sequence[str], conf_dir: Path) -> None:
    """Reject ``group=option`` for an option that does not exist, naming the choices, and
    ``~group`` for a group every run needs (before composing: the defaults list names a
    recipe by ``${experiment}_${dataset}``, which Hydra cannot resolve without the group)."""
    parsed = parse(args) or []
    extra = search_path(parsed)
    for override in parsed:
        group = override.key_or_group
        if group not in USER_GROUPS:
            continue
        if override.is_delete() and group != "experiment":
            fail(f"{group}: has no value (removed with ~{group}?); every run needs it")
        allowed = sorted({*group_options(conf_dir, group), *options_in(extra, group)})
        for option in values(override) or []:
            if option not in ("", "null") and option not in allowed:
                fail(f"{group}={option}: unknown {group}; choose one of: {', '.join(allowed)}")


def every_value_of_each_sweep(args: Sequence[str]) -> list[list[str]]:
    """The concrete jobs of a grid that together use every value of every swept key once: the
    first value of each, then each other value of one key with the first of the rest (a
    ``glob`` is left out: Hydra expands it)."""
    parsed = parse(args)
    if parsed is None:
        return [list(args)]
    swept = [(o, values(o)) for o in parsed]
    base = [
        f"{o.get_key_element()}={v[0]}" if o.is_sweep_override() else o.input_line
        for o, v in swept
        if v is not None
    ]
    jobs = [base]
    for override, swept_values in swept:
        if not override.is_sweep_override() or swept_values is None:
            continue
        first = f"{override.get_key_element()}={swept_values[0]}"
        for option in swept_values[1:]:
            jobs.append(
                [f"{override.get_key_element()}={option}" if a == first else a for a in base]
            )
    return jobs


def resume_in_place(argv: Sequence[str]) -> list[str]:
    """``hydra.run.dir=<the run's directory>`` for ``train.resume=<run dir or its checkpoint>``
    (unless a directory is given): the run goes on in its folder, not in a new one. Hydra's
    record of the run (``.hydra/``) is left as the run wrote it: rewritten by a resume, it
    would keep the settings of one that was refused, and the next resume would read them."""
    if any(a in ("-m", "--multirun") for a in argv) or any(
        a.lstrip("+").startswith("hydra.run.dir=") for a in argv
    ):
        return []
    targets = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("train.resume=")]
    if not targets or targets[-1] in ("", "null"):
        return []
    target = Path(targets[-1]).expanduser()
    if target.is_file() and target.parent.name == "checkpoints":
        target = target.parent.parent
    elif target.is_dir() and target.name == "checkpoints":
        target = target.parent
    if not target.is_dir() or not (
        (target / "config.yaml").is_file() or (target / ".hydra").is_dir()
    ):
        return []  # not a run directory: the resumed run gets one of its own
    return [f"hydra.run.dir={target.resolve()}", "hydra.output_subdir=null"]


def _key(arg: str) -> str:
    """The key an override sets: ``+train.max_steps=3`` -> ``train.max_steps``."""
    return arg.lstrip("+~").split("=", 1)[0]


def _covers(keys: set[str], key: str) -> bool:
    """Whether ``key`` is one of ``keys`` or inside one of them (a group given whole)."""
    return any(key == k or key.startswith(f"{k}.") for k in keys)


def override_value(value: object) -> str:
    """A Python value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if "'" in text or "\\" in text or "${" in text:
        raise ValueError(f"{text!r} cannot be an override")
    return f"'{text}'"


def _saved_config(target: Path) -> tuple[Path | None, dict | None]:
    """(the run's directory or None for a bare checkpoint, the config it ran with last): the
    newest readable checkpoint's, else the run's config.yaml, else Hydra's copy."""
    run_dir = None
    if target.is_dir():
        run_dir = target.parent if target.name == "checkpoints" else target
    elif target.is_file() and target.parent.name == "checkpoints":
        run_dir = target.parent.parent
    from fce import checkpoint

    has_checkpoint = target.is_file() or any(
        checkpoint.list_checkpoints(d) for d in (target, target / "checkpoints")
    )
    if has_checkpoint:
        try:
            _, state, _ = checkpoint.resolve(target)
            return run_dir, state.get("config")
        except (checkpoint.CheckpointError, ValueError):
            return run_dir, None  # reported in one line once the run starts
    from omegaconf import OmegaConf

    from fce.config import load_run_config

    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml") if run_dir else ():
        if path.is_file():
            try:
                return run_dir, OmegaConf.to_container(load_run_config(path))
            except Exception:  # cut short by a kill while it was written: fce.resume says
                return run_dir, None
    return run_dir, None


def with_saved_run(argv: Sequence[str], conf_dir: Path) -> list[str]:
    """``train.resume=<run>``: the saved run's settings, then the command line's on top.

    The run's own Hydra overrides come first (``<run>/.hydra/overrides.yaml``; else the group
    options its config names), then every setting of the saved config the command line does
    not give (so a default changed in conf/ since does not change a resumed run), then the
    command line: what may change on resume changes, and anything else given that differs
    from the saved run is refused by ``fce.resume`` in one line.
    """
    argv = list(argv)
    targets = [a.split("=", 1)[1] for a in argv if _key(a) == "train.resume" and "=" in a]
    if (
        not targets
        or targets[-1] in ("", "null")
        or any(a in ("-m", "--multirun", "--help", "-h", "--cfg", "-c", "--info") for a in argv)
    ):
        return argv
    run_dir, saved = _saved_config(Path(targets[-1]).expanduser())
    if saved is None:
        return argv  # nothing readable to resume: fce.resume says why
    from omegaconf import OmegaConf

    from fce.config import upgrade, user_settings

    given = {_key(a) for a in argv if not a.startswith("-")}
    overrides_yaml = run_dir / ".hydra" / "overrides.yaml" if run_dir else None
    if overrides_yaml is not None and overrides_yaml.is_file():
        base = [str(o) for o in OmegaConf.load(overrides_yaml)]
    else:
        directories = [conf_dir, *search_path(parse(argv) or [])]
        base = [
            f"{group}={option}"
            for group in USER_GROUPS
            if (option := saved_option(directories, group, saved.get(group))) is not None
        ]
    base = [o for o in base if not _covers(given | {"train.resume"}, _key(o))]
    flags = [a for a in argv if a.startswith("-")]
    args = [*base, *(a for a in argv if not a.startswith("-"))]
    if "experiment" in given:
        return [*flags, *args]  # the keys it sets are the command line's
    from hydra.core.global_hydra import GlobalHydra

    from fce.compose import compose

    try:
        now = _leaves(user_settings(compose(args)))
        then = _leaves(user_settings(upgrade(OmegaConf.create(saved))))
        restored = [
            f"{key}={override_value(value)}"
            for key, value in then.items()
            if key in now and now[key] != value and not _covers(given, key)
        ]
        compose([*args, *restored])  # each restored value must compose
    except Exception:
        return argv  # the command line as typed: preflight names what is wrong with it
    finally:
        GlobalHydra.instance().clear()
    return [*flags, *args, *restored]


def saved_option(conf_dirs: Sequence[Path], group: str, node: object) -> str | None:
    """The option of ``group`` a saved run's config chose: the name its node carries, else,
    for a group whose nodes carry no name (``tracking``) and whose every option declares a
    ``_target_`` of its own, the option with the node's; None where neither tells."""
    if not isinstance(node, dict):
        return None
    choices = sorted({o for d in conf_dirs for o in options(group, d)})
    if node.get("name") in choices:
        return node["name"]
    if group in NAMED_GROUPS or node.get("_target_") is None:
        return None
    from omegaconf import OmegaConf

    targets = {}
    for directory in conf_dirs:
        for option in options(group, directory):
            target = OmegaConf.load(directory / group / f"{option}.yaml").get("_target_")
            if target is None or option in targets:
                return None  # inherited from a default, or an option in two places
            targets[option] = target
    same = [o for o, t in targets.items() if t == node["_target_"]]
    unique = len(set(targets.values())) == len(targets)
    return same[0] if unique and len(same) == 1 else None


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"train.max_steps": 60, "ebm.hidden": [32, 32], ...}``: a config's leaves, typed."""
    found: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found.update(_leaves(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def preflight(argv: Sequence[str], conf_dir: Path, config_name: str = "config") -> None:
    """Compose the configs a grid's command line asks for (each value of each swept key) and
    validate them, or exit with one line: before any job starts, so that a bad later value
    does not fail after the first jobs have run.

    Hydra's own messages for these cases span several lines; this gives one. A single run is
    composed once, by Hydra, and checked by ``SingleRunChecks``.
    """
    overrides = [a for a in argv if ("=" in a or a.startswith("~")) and not a.startswith("-")]
    if any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c") for a in argv):
        return None
    check_group_choices([a for a in argv if not a.startswith("-")], conf_dir)  # with ~group
    # Launcher and other hydra.* settings are Hydra's own; the job config is checked here,
    # composed from the search path the command line gives (a user's own conf directory).
    where = [a for a in overrides if a.lstrip("+").startswith("hydra.searchpath=")]
    overrides = [a for a in overrides if not a.lstrip("+").startswith("hydra")]
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from fce.compose import compose, composition_error
    from fce.config import validate
    from fce.tracking import TrackingError

    jobs = every_value_of_each_sweep(overrides)
    try:
        # Every value of a multirun's lists, not only the first job's: a bad later value
        # must not fail after the first jobs have run.
        composed = [compose([*job, *where], config_name, return_hydra_config=True) for job in jobs]
    except Exception as error:  # composition: unknown key, wrong type, bad syntax
        fail(composition_error(error))
    finally:
        GlobalHydra.instance().clear()
    cfg = composed[0]
    multirun = command_mode(argv) == "multirun"
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith(f"{key}=")]
    node = cfg.hydra.sweep if key == "hydra.sweep.dir" else cfg.hydra.run
    run_dir = given[-1] if given else OmegaConf.to_container(node)["dir"]
    check_writable_dir(f"{key}={run_dir}", run_dir)
    try:
        for job in composed:
            with open_dict(job):
                del job["hydra"]
            validate(job)
        check_store(cfg.tracking.get("uri"))
    except (ConfigError, TrackingError) as error:
        fail(str(error))


def command_mode(argv: Sequence[str]) -> str:
    """What a command line asks Hydra for, read by Hydra's own argument parser (so that its
    abbreviations, ``--multir``, count): ``"run"`` (one job), ``"multirun"`` (a grid: ``-m``
    or ``hydra.mode=MULTIRUN``) or ``"info"`` (help, ``--cfg``, ``--info``, completion)."""
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(list(argv))
    except SystemExit:  # a flag Hydra refuses: Hydra says so itself
        return "info"
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return "info"
    modes = [a.split("=", 1)[1] for a in args.overrides if a.lstrip("+").startswith("hydra.mode=")]
    if args.multirun or (modes and modes[-1] == "MULTIRUN"):
        return "multirun"
    return "run"


class SingleRunChecks(Callback):
    """The checks of a single run on the config Hydra composed for it (conf/config.yaml's
    ``hydra.callbacks``), before Hydra makes the run's directory and before torch loads:
    the directory writable, the config valid, the store usable; else one line, exit 2.

    Hydra turns a callback's exception into a warning and goes on, so every failure here
    ends the process itself (``fail``). A grid's jobs are checked by ``preflight`` before the
    first starts, and each again by the job (``fce.cli.run_job``) where its launcher runs it.
    """

    done = False  # whether this process's single run was checked

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, open_dict

        from fce.compose import composition_error
        from fce.config import name_options, validate
        from fce.tracking import TrackingError

        try:
            HydraConfig.instance().set_config(config)  # for ${hydra:...} in the job's values
            run_dir = OmegaConf.to_container(config.hydra.run)["dir"]  # as typed
            check_writable_dir(f"hydra.run.dir={run_dir}", run_dir)
            job = config.copy()
            with open_dict(job):
                del job["hydra"]
            name_options(job, config.hydra.runtime.choices)
            validate(job)
            check_store(job.tracking.get("uri"))
        except (ConfigError, TrackingError) as error:
            fail(str(error))
        except Exception as error:  # an interpolation that does not resolve, say
            fail(composition_error(error))
        SingleRunChecks.done = True


def check_store(uri: str | None) -> None:
    """A SQLite store must be a file (not in memory, not a directory) in a writable directory,
    writable itself and empty or MLflow's; an HTTP server must answer (in seconds, not
    MLflow's minutes of retries)."""
    from fce.tracking import check_reachable, check_sqlite_store

    if uri and uri.startswith("sqlite:///") and uri.removeprefix("sqlite:///") != ":memory:":
        check_writable_dir(f"tracking.uri={uri}", str(Path(uri.removeprefix("sqlite:///")).parent))
    if uri and uri.startswith("sqlite:"):
        check_sqlite_store(uri)
    elif uri:
        check_reachable(uri)


def check_study_storage(storage: str, tracking: str) -> None:
    """An Optuna storage must not be an MLflow store (``tracking`` is the resolved tracking
    URI): both keep an ``alembic_version`` table, and each would write into the other's."""
    from fce.tracking.housekeeping import MLFLOW_TABLES, sqlite_tables

    same = storage == tracking
    if storage.startswith("sqlite:///") and not same:
        database = Path(storage.removeprefix("sqlite:///"))
        if tracking.startswith("sqlite:///"):
            same = database.resolve() == Path(tracking.removeprefix("sqlite:///")).resolve()
        tables = sqlite_tables(database) if database.is_file() else None
        if not same and tables and tables >= MLFLOW_TABLES:
            raise ConfigError(
                f"sweep.storage={storage}: {database} is an MLflow store; Optuna's tables "
                "would mix with MLflow's; use a file of its own, e.g. "
                f"sqlite:///{database.parent / 'optuna.db'}"
            )
    if same:
        raise ConfigError(
            f"sweep.storage={storage}: the MLflow store (tracking.uri) too; Optuna's tables "
            "would mix with MLflow's; use a storage of its own, e.g. sqlite:///<dir>/optuna.db"
        )


def check_writable_dir(setting: str, directory: str) -> None:
    """Fail unless ``directory`` (interpolations allowed) can be created and written in.

    Hydra would otherwise fail with a traceback when it creates the run's directory. The part
    before the first interpolation is checked: its deepest existing ancestor must be a
    directory we can write a file in (a write test, since permissions do not stop root).
    """
    fixed = Path(directory.split("${", 1)[0] or ".").absolute()
    existing = next(p for p in (fixed, *fixed.parents) if p.exists())
    if not existing.is_dir():
        fail(f"{setting}: {existing} is a file, not a directory; choose a writable directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        fail(f"{setting}: cannot write in {existing} ({error.strerror}); choose another")
