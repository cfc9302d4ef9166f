"""Start or join Ray with the environment every rosepo worker needs.

Ray Train V2 polls its workers for health every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` seconds and
each ``ray.train.report`` waits for that poll: at the default (~2 s) a 0.1 s step takes 1.9 s.
The variable is read by the Train controller, an actor, so it is set both in this process
(inherited by a local cluster started here) and in the job's runtime_env (a joined cluster).

The console of a run is quiet unless ``--verbose`` (`set_console`): the driver's ``ray`` logger
at WARNING, Ray Data's console from WARNING up less its notices that are no user's concern
(`_shown`), Hugging Face's progress bars and third-party deprecation warnings off, in this process
and, through the ``worker_process_setup_hook`` `quiet_worker`, in every worker; Ray's
token-authentication notice for a new local cluster off; of the workers' lines Ray forwards, not
the core worker's ERROR-level notice of every training stage (`SKIP_WORKER_LINES`).
Ray Train's ``print`` patch is off in every worker, verbose or not (it wrote each line twice).
"""

from __future__ import annotations

import logging
import os
import warnings

from rosepo.errors import ConfigError

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.1"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
#: Environment of a quiet run, driver and workers alike: Hugging Face's progress bars ("Loading
#: weights", "Writing model shards", one per actor and model load) off.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
#: Ray's filter of the worker lines it forwards to the driver's console (documented in Ray's
#: "Configuring Logging"; its log files keep them), and what a quiet run filters: Ray Train's
#: controller creates its ``PreemptionWatcher`` actor with ``max_restarts > 0`` and arguments in the
#: object store, which Ray's core worker reports at ERROR level (``core_worker.cc``), once per
#: training stage, though nothing failed.
SKIP_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"
SKIP_WORKER_LINES = r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"
_verbose = False
#: Restarts of a dead scoring actor (the pairs and eval stages' Ray Data actor pools). Ray Data
#: keeps an actor pool's constructor arguments in the object store, and for a restartable actor Ray
#: logs at ERROR level, once per run, that a restart could lose them; with none, a stage whose actor
#: dies fails instead, and running it again starts it afresh.
SCORER_RESTARTS = 0


def worker_env_vars() -> dict[str, str]:
    """Environment of every Ray task/actor of a rosepo job: offline HF, one OMP thread per
    worker (2-core boxes oversubscribe otherwise), Ray Train's ``print`` as Python's. Nothing
    about the device: a job's workers may hold GPUs or not, and each training worker tells
    DeepSpeed its own (`rosepo.train.loop`)."""
    env = {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        HEALTH_CHECK_ENV: os.environ.get(HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S),
        # Ray Train 2.60 patches ``print`` in its workers to write each line twice (to stdout and,
        # through the root logger, to stderr); the driver then gets every ``tqdm_ray`` state twice,
        # and a second "closed" state opens a bar nobody closes, redrawn under every later line.
        PRINT_PATCH_ENV: "0",
    }
    return env if _verbose else {**env, **QUIET_ENV}


def set_console(verbose: bool) -> None:
    """Choose how much of Ray's and Hugging Face's own output a run prints. Quiet (the default):
    Ray's INFO logs, Ray Data's progress logs, Hugging Face's progress bars and DeepSpeed's
    deprecation warnings are off, in this process and (through `init_ray`) in every worker;
    rosepo's own lines, stage bars and metrics remain. ``verbose`` keeps everything. Call it
    before Ray starts and before transformers is imported (both read the environment then)."""
    global _verbose
    _verbose = verbose
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # Read by the driver when Ray is imported: the workers' lines it forwards are filtered there.
    os.environ.setdefault(SKIP_ENV, SKIP_WORKER_LINES)
    quiet_warnings()


def quiet_warnings() -> None:
    """Silence, in this process, the third-party warnings that are no user's concern: DeepSpeed
    0.19 gathers ZeRO partitions through ``torch.distributed.all_gather_into_tensor``, which torch
    2.13 deprecates with a FutureWarning once per process (every Train worker); peft 0.21 reads
    ``is_gradient_checkpointing``, which transformers 5 deprecates (every LoRA load); Ray Train
    2.60's own dataset manager passes Ray Data an option Ray Data deprecates (every training run);
    Ray Data 2.60 calls the actor options of ``map_batches`` (``max_restarts``) deprecated for 2.64
    (every scoring stage); and DeepSpeed's warning, in a process without a GPU, that it takes the
    CPU (a filter on its ``DeepSpeed`` logger: DeepSpeed sets that logger's level when imported)."""
    for name in ("torch\\.distributed\\.all_gather_into_tensor", "is_gradient_checkpointing"):
        warnings.filterwarnings("ignore", message=rf"`{name}` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated",
                            category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
    deepspeed = logging.getLogger("DeepSpeed")
    if _not_cpu_accelerator_note not in deepspeed.filters:
        deepspeed.addFilter(_not_cpu_accelerator_note)


def _not_cpu_accelerator_note(record: logging.LogRecord) -> bool:
    """False for DeepSpeed's "Setting accelerator to CPU" warning (`quiet_warnings`)."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


def quiet_worker() -> None:
    """Ray's ``worker_process_setup_hook`` of a quiet run (`init_ray`): in every Ray worker process
    (Train workers and controller, Ray Data actors and tasks), `quiet_warnings`, Ray Data's
    console lines from WARNING up and no line per Ray Train report."""
    quiet_warnings()
    _quiet_ray_data()
    _quiet_train_reports()


def _quiet_train_reports() -> None:
    """Not Ray Train's INFO line per ``ray.train.report`` and rank (``Reporting training result N:
    TrainingReport(...)``). Ray 2.60 names that logger by its file's path, outside ``ray.train``, so
    Ray Train's ``LoggingConfig`` misses it; set by name, before the module is imported."""
    import ray

    path = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(path).setLevel(logging.WARNING)


_dashboard_url = ""
#: Whether `init_ray` started the Ray it is connected to (a local one, which cannot grow).
_started_here = False


def init_ray(address: str = "", num_cpus: int | None = None, *, dashboard: bool = True) -> str:
    """Connect to Ray once per process; a no-op when Ray is already initialised. Returns the
    dashboard's URL ("" when it is off or Ray was initialised by someone else).

    ``address="auto"`` (or ``RAY_ADDRESS`` in the environment) joins a running cluster and
    ``num_cpus`` is ignored; otherwise a local Ray is started with the dashboard bound to
    127.0.0.1 on a free port (the dashboard's state API is what releases the CPUs of stopped
    Tune trials), and ``RAY_API_SERVER_ADDRESS`` is set to it here and in every worker.
    ``dashboard=False`` starts it without (a Ray installed without the dashboard's packages, as
    on the offline GPU machine; Tune's ASHA then cannot free a stopped trial's CPUs).
    """
    import ray

    global _dashboard_url, _started_here
    if ray.is_initialized():
        return _dashboard_url
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S)
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ctx = ray.init(address=address, runtime_env=_runtime_env(worker_env_vars()),
                       logging_level=_ray_log_level())
    else:
        # Ray's state API (used by Train's placement-group cleaner and to free stopped Tune
        # trials' CPUs) finds the dashboard by scanning for local Ray instances and fails when
        # there are several on the machine; naming it removes the guess.
        port = free_port()
        if dashboard:
            os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        if not _verbose:
            # Ray 2.60 turns token authentication on for every new local cluster (generating
            # ~/.ray/auth_token) and says so at WARNING unless RAY_AUTH_MODE is set; choosing the
            # mode here would skip the token's generation, so the notice is silenced instead.
            logging.getLogger(_AUTH_LOGGER).setLevel(logging.ERROR)
        env = {**worker_env_vars(), **({API_SERVER_ENV: os.environ[API_SERVER_ENV]} if dashboard else {})}
        ctx = ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                       dashboard_port=port, runtime_env=_runtime_env(env), logging_level=_ray_log_level(),
                       _system_config={"num_workers_soft_limit": idle_workers_kept(num_cpus)})
        _started_here = True
    _dashboard_url = ctx.dashboard_url or ""
    if not _verbose:
        quiet_warnings()  # again: Ray, once imported, puts its own warning filters in front
        _quiet_ray_data()
    return _dashboard_url


def check_gpus(demand: dict[str, int]) -> None:
    """Before any stage: can the connected Ray give ``demand`` (stage -> GPUs it holds at once,
    `rosepo.config.RunConfig.gpu_demand`)? A local Ray started here cannot grow, so too few GPUs
    is a `ConfigError` naming the stages; a cluster joined by address may be autoscaling (a
    CPU-only head is normal there), so it is a warning that the stages will wait for GPU nodes."""
    import ray

    if not demand:
        return
    have = ray.cluster_resources().get("GPU", 0)
    need = max(demand.values())
    if have >= need:
        return
    asks = ", ".join(f"{stage} {n}" for stage, n in demand.items())
    if not cluster_can_grow():
        raise ConfigError(f"the run asks for GPUs ({asks}) but this machine's Ray has {have:g}: set use_gpu: false "
                          "(and the stages' use_gpu), or run on a cluster with GPUs (ray_address: auto)")
    logging.getLogger("rosepo").warning(
        "the run asks for GPUs (%s); the cluster has %g now: its stages wait for the autoscaler to add GPU nodes "
        "(each training stage for up to its start_timeout_s)", asks, have)


def cluster_can_grow() -> bool:
    """Whether the connected Ray may gain nodes: a cluster joined by address may be autoscaling;
    the local Ray `init_ray` started cannot."""
    return not _started_here


def idle_workers_kept(num_cpus: int | None) -> int:
    """Idle task workers a local Ray keeps for reuse: its ``num_workers_soft_limit``, 2 per CPU.
    At Ray's default (1 per CPU) each idle worker above it exits after a second: a make run on 2
    CPUs started 46 worker processes, 19 of them task workers that exited idle, and in Ray 2.60
    about one such exit in twenty aborts (``Mutex corrupt`` in the opencensus ``DeltaProducer``
    harvester thread of Ray's core worker), a 14-line crash trace on the console. With 2 per CPU,
    12 builds of a samples folder had 2 idle exits and no abort (62 exits and 3 aborts before).
    More than 2 per CPU makes the raylet start that many workers at once, with a warning."""
    return 2 * (num_cpus or os.cpu_count() or 1)


def shutdown_ray() -> None:
    """Disconnect from Ray (stopping the local Ray `init_ray` started). Ray prints the workers'
    last forwarded lines (a progress bar's final frame) as it does, so they come before what is
    printed next, not after it at exit."""
    import ray

    global _dashboard_url, _started_here
    ray.shutdown()
    _dashboard_url, _started_here = "", False


def _runtime_env(env_vars: dict[str, str]) -> dict:
    """The runtime_env of a rosepo job: ``env_vars``, and `quiet_worker` in every worker unless verbose."""
    return {"env_vars": env_vars, **({} if _verbose else {"worker_process_setup_hook": "rosepo.runtime.quiet_worker"})}


def _quiet_ray_data() -> None:
    """Ray Data's console lines from WARNING up: its INFO lines are each dataset's execution plan,
    a line when it finishes and, when stdout is no terminal, a progress block every few seconds;
    and not its warning that progress bars are off (rosepo turns off the Train workers' own), nor
    the records `_shown` drops. Its log file (the session's ``ray-data.log``) keeps everything.
    Ray Data sets its handlers when imported."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)
            if _shown not in handler.filters:
                handler.addFilter(_shown)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


#: Ray Data's two ERROR lines before a task's user-code error (a `rosepo.errors.RosepoError` raised
#: in a task reaches the driver as one): "An exception was raised from a task of operator ...
#: set DataContext.max_errored_blocks" and "Exception occurred in user code, with the abbreviated
#: stack trace below" (the trace is logged to its file only). The exception itself still reaches
#: the caller: the CLI prints a rosepo error's one line, and any other error's traceback.
_USER_CODE_NOTICES = ("An exception was raised from a task of operator", "Exception occurred in user code")


#: Ray Data's warning, once per process, that the cluster "currently does not have any available
#: CPUs" when a dataset starts: it reads the cluster's resource view, which lags the tasks of the
#: dataset before by up to a second, so it fires in the samples stage (one dataset right after
#: another) with every CPU free.
_NO_CPU_WARNING = "Warning: The Ray cluster currently does not have any available CPUs"


def _shown(record: logging.LogRecord) -> bool:
    """Whether a quiet console shows a record of Ray Data's (`_quiet_ray_data`): not its issue
    detectors' reports, repeated every 30 s for as long as a dataset runs (an actor that holds a
    7 GiB pretrained LLM's activations is "high memory" for as long as it evaluates), nor its
    notices of a user-code error (`_USER_CODE_NOTICES`; an internal error's come with a traceback
    and stay), nor `_NO_CPU_WARNING`."""
    msg = str(record.msg)
    if record.name.startswith("ray.data._internal.issue_detection") or msg.startswith(_NO_CPU_WARNING):
        return False
    return record.exc_info is not None or not msg.startswith(_USER_CODE_NOTICES)


def is_verbose() -> bool:
    """Whether `set_console` asked for everything (``--verbose``)."""
    return _verbose


def train_logging():
    """Ray Train's ``LoggingConfig`` for a run: its INFO lines on the console (resources requested,
    the worker group's start, checkpoints created) only when verbose."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if _verbose else "WARNING")


def _ray_log_level() -> int:
    """The driver's ``ray`` logger level: INFO (Ray's default) when verbose, WARNING otherwise."""
    return logging.INFO if _verbose else logging.WARNING


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
