"""``imgclf train | evaluate | summary | table | status | cancel | data | calibrate``.

The reference README's commands run with ``python train.py`` -> ``imgclf train`` and
``configs/`` -> ``config/recipes/``; trailing ``KEY VALUE`` (or ``KEY=VALUE``) pairs override
the recipe.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from imgclf import catalog
from imgclf import config as C


class CLIError(Exception):
    pass


MAX_MESSAGE = 500


def _build_config(args) -> C.Config:
    cfg = C.build(args.config, C.parse_overrides(args.overrides))
    return cfg


def cmd_train(args) -> int:
    from imgclf import data, runs
    from imgclf.launch import Resources, get, run

    cfg = _build_config(args)
    runs.preflight(cfg)  # everything the engine would refuse fails here, before anything is written
    if not get(args.launcher).submits:  # in-process: this machine's device is the run's
        from imgclf.engine import distenv
        from imgclf.engine.precision import Precision

        Precision(C.precision(cfg), distenv.current(cfg.device)[1])  # e.g. O3 (fp16) without CUDA
        ranks = int(os.environ.get("WORLD_SIZE", "1") or 1)  # torchrun's, else one process
    else:
        ranks = args.tasks if args.gpus == 0 else args.gpus
    if cfg.train.dist.world_size > 0 and cfg.train.dist.world_size != ranks:
        raise C.ConfigError(f"train.dist.world_size: {cfg.train.dist.world_size} but this command starts {ranks} "
                            "process(es); use launcher local/slurm with that many --tasks or --gpus (-1 = any)")
    from imgclf.utils import check_folder

    for key in ("data_root", "dataset.dataset_dir"):
        if C.get_key(cfg, key):
            check_folder(C.get_key(cfg, key), key)
    folder = cfg.dataset.dataset_dir or None
    d = data.load(cfg.dataset.name, root=cfg.data_root, folder=folder, write_cache=False)
    out = args.output_dir or cfg.train.output_dir or runs.default_dir(cfg)
    from imgclf.utils import check_folder

    check_folder(out, "--output-dir" if args.output_dir else "train.output_dir" if cfg.train.output_dir
                 else "the run directory")
    runs.check_target(cfg, out, resume=args.resume or cfg.train.resume)
    data.store(d, folder, root=cfg.data_root)  # accepted: cached once, for the run to read
    run_dir = runs.prepare(cfg, out, resume=args.resume or cfg.train.resume)
    resources = Resources(tasks=args.tasks, gpus=args.gpus)
    result = run(run_dir, launcher=args.launcher, resources=resources, progress=not args.quiet)
    if result.get("diverged"):
        print(f"imgclf train: error: {result['message']}", file=sys.stderr)
        return 1
    print(f"{run_dir}: test error {result['test_error']:.2f}% after {result['epochs']} epochs "
          f"({result['wall_seconds']:.0f} s)")
    return 0


def cmd_evaluate(args) -> int:
    from imgclf.engine.evaluator import evaluate_run

    out = evaluate_run(args.run)
    if out.get("diverged"):
        print(f"{args.run}: diverged ({out.get('message')})")
        return 0
    print(f"{args.run}: test error {out['test_error']:.2f}% (loss {out['test_loss']:.4f}, n={out['n_test']})")
    return 0


def cmd_summary(args) -> int:
    import torch

    from imgclf.models import build
    from imgclf.models.summary import summarize

    from imgclf import runs

    cfg = _build_config(args)
    shape = runs.input_shape(cfg)
    n_classes = runs.n_classes(cfg)
    with torch.device("cpu"):
        model = build(cfg, in_channels=shape[0], n_classes=n_classes)
    info = summarize(model, (1, *shape))
    info.update({"model": cfg.model.name, "input_shape": list(shape), "n_classes": n_classes})
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"model        {cfg.model.name}")
        print(f"input        {'x'.join(map(str, shape))}, {n_classes} classes")
        print(f"parameters   {info['params']:,} ({info['params'] / 1e6:.2f}M)")
        print(f"MACs         {info['macs']:,} ({info['macs'] / 1e6:.1f}M)")
        print(f"output shape {info['output_shape']}")
    return 0


def cmd_table(args) -> int:
    from imgclf.tables import report, spec

    table = spec.load(args.spec, recipes_dir=args.recipes)
    frame = report.aggregate(table, args.runs, partial=args.partial)
    out_dir = Path(args.out)
    report.write(table, frame, out_dir)
    print(report.render_markdown(table, frame))
    return 0


def cmd_status(args) -> int:
    from imgclf import status

    print(status.render(status.table_status(args.spec, args.runs, args.recipes)))
    return 0


def _seed_dirs(target: str, runs: str, recipes: str) -> list[Path]:
    """A table spec's seeds, a run's seeds (results/runs/<run_id>) or one seed's folder."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from imgclf.tables import spec

        table = spec.load(path, recipes)
        return [Path(runs) / r.run_id / f"seed{s}" for r in table.rows if r.run_id for s in r.seeds]
    if not path.is_dir():
        raise CLIError(f"{target}: not a table spec (.yaml), a run, a seed or a pack folder")
    from imgclf.launch import jobs

    packed = (jobs.read_record(path) or {}).get("seeds") if not path.name.startswith("seed") else None
    if isinstance(packed, list):  # a pack's folder (results/packs/<pack>): the seeds its job trains
        return [Path(s) for s in packed if isinstance(s, str)]
    return [path] if path.name.startswith("seed") else sorted(d for d in path.glob("seed*") if d.is_dir())


def cmd_cancel(args) -> int:
    from imgclf.launch import jobs

    dirs = [d for t in args.targets for d in _seed_dirs(t, args.runs, args.recipes)]
    lines = jobs.cancel(dirs)
    for line in lines:
        print(line)
    print(f"imgclf cancel: {len(lines)} SLURM job(s) cancelled ({len(dirs)} seed(s) looked at)")
    return 0


def cmd_data(args) -> int:
    from imgclf import data

    d = data.prepare(args.dataset, root=args.root, source=getattr(args, "from"), download=args.download)
    print(f"{d.name}: {len(d.train_labels)} train + {len(d.test_labels)} test images, "
          f"{d.n_channels}x{d.image_size}x{d.image_size}, {d.n_classes} classes; cached at "
          f"{data.cache_path(d.name)}")
    return 0


def cmd_calibrate(args) -> int:
    from imgclf import calibrate

    calibrate.check_arguments(args)
    return calibrate.calibrate(args)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error (the usage itself is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got '{text}'")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    from imgclf import launch

    p = _Parser(prog="imgclf", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run (recipe + KEY VALUE overrides)")
    t.add_argument("--config", required=True, help="recipe YAML, e.g. config/recipes/cifar/resnet_preact.yaml")
    t.add_argument("--output-dir", help="run directory (default results/runs/<run_id>/seed<seed>)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    t.add_argument("--launcher", default=launch.DEFAULT, choices=launch.names())
    t.add_argument("--tasks", type=_at_least(1), default=1, help="DDP ranks on CPU (local/slurm launchers)")
    t.add_argument("--gpus", type=_at_least(0), default=0, help="GPUs per node (local/slurm launchers)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs=argparse.REMAINDER, help="KEY VALUE ... or KEY=VALUE ...")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score a finished run's final weights -> RUN/eval.json")
    e.add_argument("--run", required=True)
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("summary", help="parameters, MACs and output shape of a recipe's model")
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true")
    s.add_argument("overrides", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_summary)

    tb = sub.add_parser("table", help="aggregate finished runs of a table spec and render it")
    tb.add_argument("spec", help="config/tables/<table>.yaml")
    tb.add_argument("--partial", action="store_true", help="render what has finished, marking incomplete rows")
    tb.add_argument("--runs", default="results/runs")
    tb.add_argument("--out", default="results/tables")
    tb.add_argument("--recipes", default="config/recipes")
    tb.set_defaults(func=cmd_table)

    st = sub.add_parser("status", help="every seed of a table: done, running, queued, failed, missing")
    st.add_argument("spec", help="config/tables/<table>.yaml")
    st.add_argument("--runs", default="results/runs")
    st.add_argument("--recipes", default="config/recipes")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("cancel", help="scancel the queued or running SLURM jobs of a table, run or seed")
    c.add_argument("targets", nargs="+", help="config/tables/<table>.yaml, results/runs/<run_id>[/seed<k>]")
    c.add_argument("--runs", default="results/runs")
    c.add_argument("--recipes", default="config/recipes")
    c.set_defaults(func=cmd_cancel)

    d = sub.add_parser("data", help="prepare + verify a dataset under the data root")
    d.add_argument("dataset", help=" | ".join((e.aliases or (e.name.lower(),))[0] for e in catalog.DATASETS.values()))
    d.add_argument("--root", default=None, help="data root (default $IMGCLF_DATA_ROOT or resources/data)")
    d.add_argument("--from", default=None, help="an archive (.tar.gz/.tgz) or folder to unpack into the root")
    d.add_argument("--download", action="store_true",
                   help="download the official release (torchvision, MD5-checked) when the folder is missing")
    d.set_defaults(func=cmd_data)

    from imgclf import calibrate

    cal = sub.add_parser("calibrate", help="measure img/s of k = 1, 2, 4 training processes on one device "
                                           "-> config/calibration.json (the plan's GPU-hours)")
    calibrate.add_arguments(cal)
    cal.set_defaults(func=cmd_calibrate)
    return p


def _utf8_output() -> None:
    """Print UTF-8 whatever the locale (under LC_ALL=C Python's own choice is ASCII, and the first
    label with an 'é', or the table's 'Δ' column, would end the command with a traceback)."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="surrogateescape")


def main(argv: list[str] | None = None) -> int:
    _utf8_output()
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "data" and args.root is None:
        from imgclf.data import data_root

        args.root = str(data_root())
    from imgclf.data import DataError
    from imgclf.launch.jobs import JobError
    from imgclf.tables.spec import SpecError
    from imgclf.utils import shown

    try:
        return args.func(args)
    except (C.ConfigError, SpecError, DataError, CLIError, JobError, OSError, ValueError) as e:
        message = re.sub(r"\s*\n\s*", " ", str(e).strip())  # one line, whatever the message held
        message = shown(message)  # a control character a value brought in is shown, never sent to the terminal
        if len(message) > MAX_MESSAGE:  # values are cut where they are echoed; this is the backstop
            message = message[:MAX_MESSAGE - 1] + "…"
        print(f"imgclf {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imgclf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
