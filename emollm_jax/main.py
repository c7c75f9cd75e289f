"""Entry point: `python -m emollm_jax.main --config configs/emobench.py[:variant] --workdir DIR --mode MODE`.

Modes: `train`, `eval`, `predict`, `plan` (AOT memory plan on fake devices, no weights), `all` (train, then
eval on the trained params; the default). `--config.a.b=value` (or `--config.a.b value`) overrides any config
key; the config is made by `configuration.load_config`, as the ablation driver, the benchmarks and the tests
make it. A config error (unknown key, bad value, missing input path) or a bad predict request is one line on
stderr and exit status 2; a workdir another run holds, or a damaged checkpoint with no good one before it,
one line and exit status 1 (the traceback too with `--verbosity=1`). Training stopped by SIGTERM (preemption)
saves a checkpoint and exits with status 75; the same command resumes. The console shows progress bars, this
project's own lines and every warning and error; third-party INFO logs (orbax, absl, grain, jax) go to
`<workdir>/run.log` with everything else, and `--verbosity=1` brings them back to the console
(`emollm_jax.logs`). Multi-host: pass
`--coordinator_address/--num_processes/--process_id` (or rely on the cluster environment).
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import ml_collections
from absl import app, flags

from data_pipeline import storage
from emollm_jax import configuration, logs

_DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "emobench.py")

flags.DEFINE_string("config", _DEFAULT_CONFIG, "Config file, optionally with :variant; --config.a.b=value "
                    "overrides a key of it.")
flags.DEFINE_string("workdir", "./workdir", "Run directory: data, tokenizer, checkpoints, logs, reports.")
flags.DEFINE_enum("mode", "all", ["train", "eval", "predict", "plan", "all"], "What to run.")
flags.DEFINE_string("init_from", None, "HF dir or orbax params checkpoint to start from (over config.init).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_integer("plan_devices", None, "--mode=plan: fake CPU devices (default config.plan.num_devices).")
flags.DEFINE_string("image", None, "--mode=predict: image file.")
flags.DEFINE_string("video", None, "--mode=predict: video file or frame directory; a model with an audio "
                    "tower also hears the file's sound track.")
flags.DEFINE_string("audio", None, "--mode=predict: sound file (wav, flac, mp3, ogg, or a container's audio "
                    "track), alone or beside --image / --video (then instead of the video's own sound).")
flags.DEFINE_string("question", None, "--mode=predict: the question.")
flags.DEFINE_string("jsonl", None, "--mode=predict: JSONL of requests.")
flags.DEFINE_string("task", None, "--mode=predict: EmoBench task, to parse the answer into a label.")

FLAGS = flags.FLAGS
log = logging.getLogger("emollm_jax")


class Args(NamedTuple):
    """What `parse_args` leaves for `main`: the arguments absl did not take, and the config overrides."""

    argv: list[str]
    overrides: list[str]


def parse_args(argv: list[str]) -> Args:
    """absl's flag parsing, after taking the `--config.a.b=value` overrides out of `argv`."""
    rest, overrides = configuration.split_config_args(argv)
    return Args(app.parse_flags_with_usage(rest), overrides)


def _use_fake_devices(n: int) -> None:
    """Plan mode compiles for `n` CPU devices; must run before JAX initialises its backends."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def main(args: Args) -> None:
    if len(args.argv) > 1:
        raise app.UsageError(f"unexpected arguments: {args.argv[1:]}")
    try:
        run_mode(configuration.load_config(FLAGS.config, args.overrides))
    except Exception as e:
        status = _exit_status(e)
        if status is None:
            raise
        if FLAGS.verbosity >= 1:
            traceback.print_exc()
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(status)


def _exit_status(e: Exception) -> int | None:
    """Exit status of an error the user can act on (reported in one line), None for anything else."""
    from emollm_jax.predict import RequestError
    from emollm_jax.workdir import WorkdirBusy

    if isinstance(e, configuration.ConfigError | RequestError):
        return 2
    if isinstance(e, WorkdirBusy):
        return 1
    # These modules import JAX; an error of theirs means they are loaded (a config error must not load them).
    checkpoint, hooks = sys.modules.get("emollm_jax.checkpoint"), sys.modules.get("emollm_jax.hooks")
    if checkpoint is not None and isinstance(e, checkpoint.CheckpointDamaged):
        return 1
    if hooks is not None and isinstance(e, hooks.Preempted):
        return hooks.Preempted.exit_code
    if hooks is not None and isinstance(e, hooks.NonFiniteError):
        return 1
    return None


def run_mode(config: ml_collections.ConfigDict) -> None:
    """Validates `config`, then runs `--mode` with it."""
    from emollm_jax import run_config

    run_config.parse_sections(config)  # field errors before JAX starts
    logs.configure(FLAGS.verbosity)
    if FLAGS.mode == "plan":
        _use_fake_devices(int(FLAGS.plan_devices or config.plan.num_devices))

    import jax

    from emollm_jax import init_config, sharding

    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = init_config.resolve(config, FLAGS.init_from)  # the model blocks a pretrained checkpoint implies
    run_config.validate_config(config, jax.device_count())
    logs.configure(FLAGS.verbosity, jax.process_index())
    workdir = storage.absolute(FLAGS.workdir)  # a local directory or a URL (gs://bucket/run)
    log.info("variant %s, mode %s, workdir %s, %d devices (%d processes)", config.variant, FLAGS.mode,
             workdir, jax.device_count(), jax.process_count())

    if FLAGS.mode == "plan":
        from emollm_jax.plan import run_plan

        run_plan(config, jax.device_count())
        return
    _check_inputs(config)
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    from emollm_jax.workdir import lock_run

    lock = lock_run(workdir, FLAGS.mode, jax.process_index(), jax.process_count())
    logs.add_file(workdir, jax.process_index())  # after the lock: a refused run writes nothing here
    try:
        _run_modes(config, workdir)
    finally:
        lock.release()


def _check_inputs(config: ml_collections.ConfigDict) -> None:
    """Input paths named by key and the predict request, before anything is written."""
    from emollm_jax.experiment import check_paths

    check_paths(config, FLAGS.init_from)
    if FLAGS.mode == "predict":
        from emollm_jax.predict import check_request

        check_request(question=FLAGS.question, jsonl=FLAGS.jsonl, image=FLAGS.image, video=FLAGS.video,
                      audio=FLAGS.audio)


def _run_modes(config: ml_collections.ConfigDict, workdir: str) -> None:
    """config.json, then `--mode`'s work, in a workdir this run holds."""
    import jax

    if jax.process_index() == 0:
        text = config.to_json_best_effort(indent=1, sort_keys=True)
        storage.write_text(storage.join(workdir, "config.json"), text)

    model = tokenizer = None
    if FLAGS.mode in ("train", "all"):
        from flax import nnx

        from emollm_jax import experiment, train

        result = train.train(config, workdir, init_from=FLAGS.init_from)
        if FLAGS.mode == "all":
            graphdef, _, rest = train.abstract_model(result.model_cfg, config.seed)
            model = nnx.merge(graphdef, result.params, rest)
            tokenizer = experiment.load_tokenizer(experiment.prepare_data(config, workdir))
    if FLAGS.mode in ("eval", "all"):
        from emollm_jax.evaluate import run_eval

        init_from = FLAGS.init_from if FLAGS.mode == "eval" else None
        results = run_eval(config, workdir, model=model, tokenizer=tokenizer, init_from=init_from)
        if jax.process_index() == 0:
            report = storage.path(workdir) / "eval" / "report.md"
            print(report.read_text().split("\n## ", 1)[0], flush=True)  # the per-task table, not the listings
            log.info("EmoBench mean accuracy %.4f (report: %s)", results["emobench_mean"], report)
    if FLAGS.mode == "predict":
        from emollm_jax.predict import run_predict

        run_predict(config, workdir, image=FLAGS.image, video=FLAGS.video, audio=FLAGS.audio,
                    question=FLAGS.question, jsonl=FLAGS.jsonl, task=FLAGS.task, init_from=FLAGS.init_from)


def run() -> None:
    app.run(main, flags_parser=parse_args)


if __name__ == "__main__":
    run()
