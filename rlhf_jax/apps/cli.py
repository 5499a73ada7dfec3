"""`rlhf-jax <command>`: train, sweep, plot, pipeline, compare, rounds, best_of_n, sample, score,
label, labels, serve.

    rlhf-jax train --config=experiments/<name>.py [--config.<key>=<value> ...] --workdir=<dir>
    rlhf-jax sweep --config=experiments/<name>.py --workdir=<dir>
    rlhf-jax compare --config=experiments/reviews/compare.py --workdir=<dir>
    rlhf-jax rounds --config=experiments/reviews/rounds.py --workdir=<dir>
    rlhf-jax serve --data=<dir> [--port=8000] [--policy=<run>]     (the labelling web app)
    rlhf-jax label --data=<dir>  /  rlhf-jax labels --data=<dir>     (terminal labeler / store stats)
    rlhf-jax best_of_n --policy=<run> --reward_model=<reward run> [--max_n=64]
    rlhf-jax plot <workdir> [<workdir> ...] --metric=<name>[,<name>] --out=<file.png> [--group_mean]
    rlhf-jax launch --num_processes=2 [--devices_per_process=4] -- train --config=... --workdir=...

train, sweep, pipeline and compare run as one of several processes (rlhf_jax.runtime.distributed) with
--coordinator_address=host:port --num_processes=N --process_id=i, on a cluster JAX detects, or
under `rlhf-jax launch` (N processes on this machine).

A mistake in what you give (a config value, a data file, a run directory, a damaged checkpoint)
is one line on stderr naming the file / key / step and what is allowed, with exit status 2;
add --debug (anywhere) to see the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import traceback

from rlhf_jax.apps import serve
from rlhf_jax.data import builders, loaders
from rlhf_jax.drivers import compare, pipeline, rounds
from rlhf_jax.models import evaluation, hf_export
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.people import labelers
from rlhf_jax.runtime import config as config_lib, distributed, plotting
from rlhf_jax.stages import registry, runs


def cmd_train(args, overrides):
    config = config_lib.load_config(args.config, overrides)
    registry.run_stage(config, args.workdir, args.allow_config_change)
    if distributed.is_main_process():
        print(f"done: {args.workdir}")


DISTRIBUTED_COMMANDS = ("train", "sweep", "pipeline", "compare", "rounds")  # the ones that join jax.distributed


def cmd_launch(argv):
    """`launch [flags] -- <command>`: parsed apart, so the command's own --config.* stay its own."""
    if "--" not in argv:
        raise config_lib.ConfigError("launch: put the command after `--`: rlhf-jax launch --num_processes=2 -- "
                                     "train --config=... --workdir=...")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="rlhf-jax launch", description="run a command as N processes on this "
                                "machine under jax.distributed (CPU processes use gloo collectives)")
    p.add_argument("--num_processes", type=int, required=True)
    p.add_argument("--devices_per_process", type=int, default=0,
                   help="fake CPU devices per process (XLA_FLAGS); 0 keeps the environment's devices")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    args = p.parse_args(argv[1:split])
    command = argv[split + 1:]
    if not command or command[0] not in DISTRIBUTED_COMMANDS:  # checked once here, not once per process
        raise config_lib.ConfigError(f"launch: {(command or [''])[0]!r} is not a command launch runs; expected one "
                                     f"of {', '.join(DISTRIBUTED_COMMANDS)} after `--`")
    return distributed.launch(command, args.num_processes, args.devices_per_process, args.port)


def sweep_runs(module, base_overrides):
    """`get_sweep()` returns a list of override dicts (a product or zip written in the file)."""
    if not hasattr(module, "get_sweep"):
        raise config_lib.ConfigError(f"{module.__file__} has no get_sweep()")
    sweep = module.get_sweep()
    # Runs are named by the keys that vary (all keys if none do): kl_coef=0.1, not also the
    # settings every run of the sweep shares.
    varying = {k for k in set().union(*sweep) if len({repr(o.get(k)) for o in sweep}) > 1}
    for overrides in sweep:
        name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items() if k in varying or not varying)
        yield name, list(base_overrides) + [(k, repr(v) if isinstance(v, (tuple, list)) else str(v))
                                           for k, v in overrides.items()]


def cmd_sweep(args, overrides):
    module = config_lib.load_config_module(args.config)
    planned = [(name, config_lib.load_config(args.config, run_overrides))
               for name, run_overrides in sweep_runs(module, overrides)]
    for name, config in planned:  # Every run's values, before the first one trains.
        try:
            registry.validate(config)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"sweep run {name}: {e}") from e
    workdirs = []
    for name, config in planned:
        workdir = os.path.join(args.workdir, name)
        print(f"=== sweep run {name}", flush=True)
        registry.run_stage(config, workdir, args.allow_config_change)
        workdirs.append(workdir)
    metrics = config.get("plot_metrics", ())
    if metrics:
        out = plotting.plot_runs(workdirs, list(metrics), os.path.join(args.workdir, "sweep.png"), strict=False)
        print(f"plot: {out}")


def cmd_plot(args, _overrides):
    out = plotting.plot_runs(args.workdirs, args.metric, args.out, group_mean=args.group_mean)
    print(f"wrote {out}")


def cmd_label(args, _overrides):
    n = labelers.label_in_terminal(args.data, annotator=args.annotator, answers_per_pair=args.answers_per_pair)
    print(f"{n} new answers saved in {os.path.join(args.data, 'labels.sqlite')}")


def cmd_labels(args, _overrides):
    """Per-annotator counts and agreement of a label store; optional exports."""
    store = labelers.open_store(args.data, args.answers_per_pair)
    stats = store.stats()
    print(f"{stats.num_pairs} pairs, {stats.num_complete} with {args.answers_per_pair} non-skip answers")
    print("| annotator | a | b | tie | skip | total |\n|---|---|---|---|---|---|")
    for name, c in sorted(stats.answers_per_annotator.items()):
        print(f"| {labelers.shown(name)} | {c['a']} | {c['b']} | {c['tie']} | {c['skip']} | {c['total']} |")
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
    print(f"pairwise agreement {fmt(stats.pairwise_agreement)}, Fleiss' kappa {fmt(stats.fleiss_kappa)}")
    for key, (ok, n) in sorted(stats.agreement_by_pair_of_annotators.items()):
        print(f"  {labelers.shown(key)}: {ok}/{n} agree")
    if args.export_jsonl:
        print(f"{store.export_jsonl(args.export_jsonl)} answers written to {args.export_jsonl}")
    if args.export_tfds:
        sources = store.export_preferences(args.export_tfds)
        print(f"preferences {({s: len(v) for s, v in sources.items()})} written to {args.export_tfds} "
              "(read it with config.data = datasets.preferences(), config.data_dir = that folder)")


def cmd_serve(args, _overrides):
    serve.serve(args)


def cmd_rounds(args, overrides):
    rounds.run_rounds(args.config, overrides, args.workdir)


def cmd_pipeline(args, overrides):
    pipeline.run_pipeline(args.config, overrides, args.workdir)


def cmd_compare(args, overrides):
    compare.run_comparison(args.config, overrides, args.workdir)


def cmd_best_of_n(args, _overrides):
    run_config = config_lib.read_resolved_config(args.policy)
    tokenizer = make_tokenizer(run_config.get("tokenizer"))
    _, graphdef, params = runs.load_policy(args.policy)
    rm_seq_len = int(config_lib.read_resolved_config(args.reward_model).seq_len)
    reward = evaluation.make_reward(runs.load_reward_model(args.reward_model), tokenizer, rm_seq_len)
    # Held-out prompts: the split of the policy run's own dataset (SFT: its (prompt, review) pairs).
    source = builders.load_dataset(run_config.data, args.data_dir or run_config.data_dir)[args.split]
    prompts = loaders.prompt_texts(source, range(min(args.num_prompts, len(source))))
    ns = [2 ** i for i in range(args.max_n.bit_length()) if 2 ** i <= args.max_n]
    rows = evaluation.best_of_n((graphdef, params), tokenizer, prompts, reward=reward,
                                gold_fn=labelers.load_function(args.gold_function), ns=ns,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print("| n | KL (log n - (n-1)/n) | gold | RM score |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['kl']:.3f} | {r['gold']:+.3f} +- {r['gold_sem']:.3f} | {r['rm']:+.3f} +- {r['rm_sem']:.3f} |")


def check_flags(args, **rules):
    """`--flag` values against `rules` {flag: (ok(value), what is allowed)}: one line naming the flag."""
    for flag, (ok, allowed) in rules.items():
        value = getattr(args, flag)
        if not ok(value):
            raise config_lib.ConfigError(f"--{flag}={value!r}: expected {allowed}")


def cmd_sample(args, overrides):
    check_flags(args, num=(lambda n: n >= 1, "an integer >= 1"),
                max_new_tokens=(lambda n: n >= 1, "an integer >= 1"),
                temperature=(lambda t: math.isfinite(t) and t > 0, "a finite number > 0"))
    for i, text in enumerate(runs.sample_from_run(args.workdir, args.prompt, args.num, args.temperature,
                                                      args.max_new_tokens, args.greedy)):
        print(f"--- sample {i + 1}\n{args.prompt}{text}")


def cmd_score(args, overrides):
    print(f"{runs.score_from_run(args.workdir, args.prompt, args.response):.4f}")


def check_export_target(out: str, workdir: str, overwrite: bool) -> None:
    """--out must not be a run (export writes a config.json that would replace the run's), nor
    a file, nor a folder with files in it unless --overwrite says they may be replaced."""
    real = os.path.realpath(out)
    if real == os.path.realpath(workdir) or real.startswith(os.path.realpath(workdir) + os.sep):
        raise config_lib.ConfigError(f"--out={out} is inside the run {workdir}: its config.json would be replaced; "
                                     "export to a folder of its own")
    if os.path.exists(out) and not os.path.isdir(out):
        raise config_lib.ConfigError(f"--out={out} is a file; expected a folder (it is created if missing)")
    if os.path.isdir(out) and any(os.path.exists(os.path.join(out, name)) for name in ("checkpoints", "handoff", "DONE")):
        raise config_lib.ConfigError(f"--out={out} holds an rlhf_jax run; export to a folder of its own")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise config_lib.ConfigError(f"--out={out} exists and is not empty; pass --overwrite to replace its files")


def cmd_export(args, _overrides):
    check_export_target(args.out, args.workdir, args.overwrite)
    model_config, _, params = runs.load_policy(args.workdir, args.seed_index)
    tokenizer = config_lib.read_resolved_config(args.workdir).get("tokenizer") or {}
    try:
        written = hf_export.export_hf(model_config, params, args.out,
                                      tokenizer.get("path") if tokenizer.get("kind") == "hf" else None)
    except ValueError as e:
        raise config_lib.ConfigError(f"{args.workdir}: {e}") from None
    print("\n".join(written))


def build_parser():
    parser = argparse.ArgumentParser(prog="rlhf-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"train": cmd_train, "sweep": cmd_sweep, "pipeline": cmd_pipeline, "compare": cmd_compare,
                "rounds": cmd_rounds}
    assert tuple(commands) == DISTRIBUTED_COMMANDS
    for name, fn in commands.items():
        p = sub.add_parser(name, help=f"{name} from a config file; --config.<key>=<value> overrides")
        p.add_argument("--config", required=True, help="experiments/<name>.py[:arg]")
        p.add_argument("--workdir", required=True)
        p.add_argument("--allow_config_change", action="store_true",
                       help="resume a workdir whose saved config.json differs")
        p.add_argument("--coordinator_address", default="", help="host:port of process 0 (multi-process runs)")
        p.add_argument("--num_processes", type=int, default=0)
        p.add_argument("--process_id", type=int, default=-1)
        p.add_argument("--distributed_timeout_s", type=int, default=300,
                       help="how long to wait for every process to join")
        p.set_defaults(fn=fn, distributed=True)
    # (Listed for --help; main() parses `launch` itself so the command after `--` stays whole.)
    sub.add_parser("launch", help="run a command as N processes on this machine under jax.distributed: "
                   "launch --num_processes=N [--devices_per_process=D] [--port=P] -- train ...")
    p = sub.add_parser("plot", help="curves from metrics.jsonl of one or more workdirs")
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--metric", required=True, help="name, or several separated by commas")
    p.add_argument("--out", required=True)
    p.add_argument("--group_mean", action="store_true", help="average the workdirs as seeds of one run")
    p.set_defaults(fn=cmd_plot)
    p = sub.add_parser("label", help="label preference pairs in the terminal (1 / 2 / tie / skip / quit)")
    p.add_argument("--data", required=True)
    p.add_argument("--annotator", default="human", help="your name, stored with each answer")
    p.add_argument("--answers_per_pair", type=int, default=1)
    p.set_defaults(fn=cmd_label)
    p = sub.add_parser("labels", help="a label store's counts per annotator and agreement; JSONL / TFDS export")
    p.add_argument("--data", required=True, help="folder with labels.sqlite (and/or pairs.jsonl)")
    p.add_argument("--answers_per_pair", type=int, default=1)
    p.add_argument("--export_jsonl", default="", help="write every answer with its pair to this file")
    p.add_argument("--export_tfds", default="", help="write the preference dataset (majority vote) here")
    p.set_defaults(fn=cmd_labels)
    p = sub.add_parser("serve", help="the labelling web app (queue, chat-and-compare, stats)")

    serve.add_arguments(p)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("sample", help="print several responses of a trained language model")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true")
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("best_of_n", help="best-of-n sampling from a policy against a reward model, n = 1, 2, 4, ...")
    p.add_argument("--policy", required=True, help="a run with a policy (sft, ppo, dpo, ...)")
    p.add_argument("--reward_model", required=True, help="a reward run")
    p.add_argument("--max_n", type=int, default=64)
    p.add_argument("--num_prompts", type=int, default=128, help="prompts of the policy run's dataset")
    p.add_argument("--split", default="validation")
    p.add_argument("--data_dir", default="", help="where that dataset lives (default: the run's data_dir)")
    p.add_argument("--gold_function", default="rlhf_jax.people.labelers:vader_gold_score")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.set_defaults(fn=cmd_best_of_n)
    p = sub.add_parser("export", help="write a run's policy as a Hugging Face checkpoint (GPT-2, Llama, Qwen2 or Qwen3 layout)")
    p.add_argument("--workdir", required=True, help="a run with a policy (pretrain, sft, ppo, dpo)")
    p.add_argument("--out", required=True, help="folder for config.json, model.safetensors (+ tokenizer files)")
    p.add_argument("--seed_index", type=int, default=0, help="which seed of a num_seeds > 1 run")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out folder")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("score", help="print the reward model's score of a response")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--response", required=True)
    p.set_defaults(fn=cmd_score)
    return parser


def _quiet_background_failures() -> None:
    """A checkpoint that cannot be written (a full disk) or read (a file cut short) fails in
    Orbax's background threads, asyncio tasks and TensorStore callbacks first: each prints its
    traceback (20 or more for one full disk, some only as the tasks are collected at exit, some
    as exceptions Python ignores) around the one line that names the step and the cause.
    Without --debug those are dropped: ERROR records with a traceback from the asyncio and absl
    loggers, and unraisable exceptions. Everything else these loggers say is kept."""
    def keep(record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info)

    for name in ("asyncio", "absl"):
        logging.getLogger(name).addFilter(keep)
    sys.unraisablehook = lambda unraisable: None


def main(argv=None):
    own_process = argv is None  # (in-process callers, tests among them, keep their own hooks)
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if own_process and not debug:
        _quiet_background_failures()
    joined = False
    try:
        if argv[:1] == ["launch"]:
            return cmd_launch(argv)
        rest, overrides = config_lib.split_override_args(argv)
        args = build_parser().parse_args(rest)
        if overrides and args.command not in DISTRIBUTED_COMMANDS:
            raise config_lib.ConfigError(f"--config.* overrides do not apply to `{args.command}`")
        if getattr(args, "distributed", False):  # Before anything touches a device.
            joined = distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                            args.distributed_timeout_s)
        args.fn(args, overrides)
        return 0
    except config_lib.UserError as e:
        code = _one_line(f"{e.kind}: {e}", debug)
    except (OSError, UnicodeError) as e:  # a path that is missing, unreadable, unwritable, not UTF-8
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        code = _one_line(f"file error: {where}{e.strerror if getattr(e, 'strerror', None) else e}", debug)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("rlhf-jax: stopped by Ctrl-C (a training run checkpointed its last step: the same command "
              "resumes it)", file=sys.stderr)
        code = 130
    if joined:  # One process of several failed: leave now. JAX's exit handler would wait for the
        sys.stdout.flush()  # others in a shutdown barrier (they wait for this one) and end in a
        sys.stderr.flush()  # DEADLINE_EXCEEDED traceback that buries the line above.
        os._exit(code)
    return code


def _one_line(message: str, debug: bool) -> int:
    """Exit status 2 with the message on one line (what it quotes from elsewhere may not be)."""
    if debug:
        traceback.print_exc()
    print(f"rlhf-jax: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
