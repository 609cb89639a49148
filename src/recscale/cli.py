"""The ``recscale`` command: one subcommand per stage.

Each subcommand turns its flags (over an optional TOML config) into the stage's frozen config and
calls the stage function; no logic lives here. Any :class:`RecscaleError` is printed as one line,
``TypeName: message``, with exit status 1; a bad flag is a ``ConfigError`` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from recscale.config import (
    EvalConfig,
    IngestConfig,
    SplitConfig,
    TrainConfig,
    config_from_dict,
    load_toml,
    parse_toml_value,
)
from recscale.errors import ConfigError, RecscaleError

# the registry's names, spelled out so that `--help` does not import PyTorch (a test keeps the two
# in step)
MODEL_NAMES = (
    "popularity",
    "ials",
    "mf-bpr",
    "lightgcn",
    "bspm",
    "two-tower",
    "sasrec",
    "ease",
    "itemknn",
)

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line ConfigErrors instead of usage dumps."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _k_list(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 10,20,50, got {text!r}"
        ) from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"expected positive cut-offs like 10,20,50, got {text!r}")
    return ks


def _merge(
    cls: type, file_tables: dict[str, Any], table: str, flags: dict[str, Any], where: str
) -> Any:
    """Defaults < the config file's ``[table]`` < flags that were given."""
    values = dict(file_tables.get(table, {}))
    values.update({k: v for k, v in flags.items() if v is not None})
    return config_from_dict(cls, values, where=where)


def _model_param(text: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value; a bare word that is not TOML is taken as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, parse_toml_value(raw)


def _file_tables(path: str | None, allowed: set[str]) -> dict[str, Any]:
    if path is None:
        return {}
    tables = load_toml(path)
    unknown = sorted(set(tables) - allowed)
    if unknown:
        raise ConfigError(
            f"{path}: unknown table [{unknown[0]}]; allowed tables are: {', '.join(sorted(allowed))}"
        )
    return tables


# --- subcommands -------------------------------------------------------------------------------


def _spark_session(args: argparse.Namespace) -> Any:
    """The Spark session of ``--engine spark`` (spark-submit's, else one on ``--spark-master``)."""
    if args.engine != "spark":
        if args.spark_master is not None:
            raise ConfigError("--spark-master is for --engine spark; add --engine spark or drop it")
        return None
    from recscale.ingest.spark_engine import spark_session

    return spark_session(args.spark_master)


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=["duckdb", "spark"],
        default="duckdb",
        help="duckdb (one machine, out-of-core; default) or spark (PySpark; same output)",
    )
    p.add_argument(
        "--spark-master",
        metavar="URL",
        help="--engine spark outside spark-submit: the master, e.g. local[4] (default local[*])",
    )


def _cmd_ingest(args: argparse.Namespace) -> int:
    from recscale.ingest import format_quality, ingest

    tables = _file_tables(args.config, {"ingest"})
    flags = {
        "format": args.format,
        "user_col": args.user_col,
        "item_col": args.item_col,
        "time_col": args.time_col,
        "value_col": args.value_col,
        "delimiter": args.delimiter,
        "dedupe": args.dedupe,
        "min_user_interactions": args.min_user_interactions,
        "min_item_interactions": args.min_item_interactions,
        "positive_threshold": args.positive_threshold,
        "memory_limit": args.memory_limit,
        "items_file": args.items_file,
        "users_file": args.users_file,
    }
    if args.no_header:
        flags["header"] = False
    if args.order_from_input:
        flags["order_from_input"] = True
    config = _merge(IngestConfig, tables, "ingest", flags, args.config or "flags")
    result = ingest(
        args.sources,
        args.out,
        config,
        append=args.append,
        progress=not args.quiet,
        engine=args.engine,
        spark=_spark_session(args),
    )
    print(format_quality(result.quality))
    print(f"wrote {result.dataset.path}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from recscale.ingest.split import make_split

    tables = _file_tables(args.config, {"split"})
    flags = {
        "strategy": args.strategy,
        "name": args.name,
        "seed": args.seed,
        "k": args.k,
        "test_fraction": args.test_fraction,
        "valid_fraction": args.valid_fraction,
        "test_quantile": args.test_quantile,
        "cutoff": args.cutoff,
    }
    if args.no_valid:
        flags["valid"] = False
    config = _merge(SplitConfig, tables, "split", flags, args.config or "flags")
    split = make_split(args.dataset, config, engine=args.engine, spark=_spark_session(args))
    counts = split.meta["counts"]
    print(
        f"split {split.name!r} ({config.strategy}): train {counts['train']:,}  "
        f"valid {counts['valid']:,}  test {counts['test']:,}  -> {split.path}"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from recscale.train import train

    tables = _file_tables(args.config, {"train", "model"})
    flags = {
        "model": args.model,
        "split": args.split,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": args.device,
    }
    if args.quiet:
        flags["progress"] = False
    config = _merge(TrainConfig, tables, "train", flags, args.config or "flags")
    model_table = {**tables.get("model", {}), **dict(args.param or [])}
    if args.spark is not None:
        from recscale.train.spark import train_with_spark

        path = train_with_spark(
            args.dataset,
            config,
            model_table,
            num_processes=args.spark,
            run_dir=args.run,
            resume=args.resume,
        )
        print(f"run written to {path}")
        return 0
    run = train(args.dataset, config, model_table, run_dir=args.run, resume=args.resume)
    # under torchrun every rank runs this command; rank 0 speaks for the run
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run written to {run.path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from recscale.evaluate import format_metrics_table
    from recscale.train import Run

    config = EvalConfig(
        **{k: v for k, v in {"ks": args.k, "part": args.part}.items() if v is not None}
    )
    run = Run.open(args.run)
    metrics = run.evaluate(config)
    print(format_metrics_table([(run.config.model, metrics)], config.ks))
    print(f"wrote {run.path / 'eval.json'}")
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from recscale.train import Run

    run = Run.open(args.run)
    recs = run.recommend(args.user, args.k, exclude_seen=not args.include_seen)
    if args.json:
        print(json.dumps({"user": args.user, "items": recs}, indent=2))
        return 0
    print(f"top {len(recs)} for user {args.user} ({run.config.model}):")
    for rec in recs:
        title = f"  {rec['title']}" if rec.get("title") else ""
        print(f"{rec['rank']:>3}. {rec['item_id']:<12} {rec['score']:>9.4f}{title}")
    return 0


def _index_param(text: str) -> tuple[str, int]:
    key, _, value = text.partition("=")
    try:
        return key.strip().replace("-", "_"), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=INTEGER (e.g. m=32, nlist=256), got {text!r}"
        ) from None


def _cmd_export(args: argparse.Namespace) -> int:
    from recscale.index import export_index

    index = export_index(
        args.run,
        args.index,
        kind=args.kind,
        params=dict(args.param or []),
        collection=args.collection,
        token=args.token or os.environ.get("MILVUS_TOKEN"),
    )
    info = index.info
    index.close()
    params = ", ".join(f"{k}={v}" for k, v in info.params.items())
    print(
        f"wrote {info.backend} {info.kind} index{f' ({params})' if params else ''} of "
        f"{info.n_items:,} items and {info.n_users:,} users ({info.dim} dims, "
        f"{info.similarity}) to {args.index}"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from recscale.service import ServedModel, ServiceSettings, create_app

    settings = ServiceSettings.from_env(
        run=args.run,
        index=args.index,
        api_key=args.api_key,
        unknown_user=args.unknown_user,
        max_k=args.max_k,
        max_history=args.max_history,
        collection=args.collection,
        milvus_token=args.token or os.environ.get("MILVUS_TOKEN"),
    )
    # loaded before the server starts, so a bad run or index is an error here, not a 503 later
    served = ServedModel.load(
        settings.run, settings.index, collection=settings.collection, token=settings.milvus_token
    )
    print(
        f"serving {served.version} ({served.model}, {served.index.info.backend} "
        f"{served.index.info.kind}) on http://{args.host}:{args.port} "
        f"(API key {'required' if settings.api_key else 'off'}; docs at /docs)",
        flush=True,
    )
    uvicorn.run(
        create_app(settings, served),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from recscale.demo import DemoConfig, run_demo

    config = DemoConfig(
        **{
            k: v
            for k, v in {
                "users": args.users,
                "items": args.items,
                "events": args.events,
                "epochs": args.epochs,
                "seed": args.seed,
            }.items()
            if v is not None
        }
    )
    run_demo(Path(args.out), config, progress=not args.quiet)
    return 0


# --- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recscale", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"recscale {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("ingest", help="raw logs -> dataset directory (DuckDB or Spark)")
    p.add_argument("sources", nargs="+", help="files, globs or directories")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument(
        "--format", choices=["auto", "csv", "tsv", "jsonl", "parquet", "movielens", "lightgcn"]
    )
    p.add_argument("--user-col")
    p.add_argument("--item-col")
    p.add_argument("--time-col")
    p.add_argument("--value-col")
    p.add_argument("--delimiter")
    p.add_argument("--no-header", action="store_true", help="csv/tsv: the first line is data")
    p.add_argument(
        "--order-from-input",
        action="store_true",
        help="no time column: ts = line number, so each user's order follows the file",
    )
    p.add_argument("--dedupe", choices=["keep-first", "keep-last", "sum", "count", "none"])
    p.add_argument("--min-user-interactions", type=int, metavar="N")
    p.add_argument("--min-item-interactions", type=int, metavar="N")
    p.add_argument(
        "--positive-threshold", type=float, metavar="X", help="values below X are not positives"
    )
    p.add_argument("--memory-limit", metavar="SIZE", help="DuckDB memory limit, e.g. 2GB (default)")
    p.add_argument("--items-file", help="item metadata (id, title, genres, ...) to join")
    p.add_argument("--users-file", help="user metadata to join")
    p.add_argument(
        "--append", action="store_true", help="add to an existing dataset, keeping its indices"
    )
    p.add_argument("--config", help="TOML file with an [ingest] table")
    _engine_flags(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("split", help="dataset -> train/valid/test split")
    p.add_argument("dataset")
    p.add_argument("--strategy", choices=["leave-last", "temporal", "random", "given"])
    p.add_argument("--name", help="split name (default: the strategy)")
    p.add_argument("--seed", type=int)
    p.add_argument("--k", type=_positive_int, help="leave-last: items per user held out")
    p.add_argument("--test-fraction", type=float)
    p.add_argument("--valid-fraction", type=float)
    p.add_argument("--test-quantile", type=float, help="temporal: cutoff as a quantile of time")
    p.add_argument("--cutoff", type=int, help="temporal: cutoff as a unix time")
    p.add_argument("--no-valid", action="store_true", help="no validation carve-out")
    p.add_argument("--config", help="TOML file with a [split] table")
    _engine_flags(p)
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser("train", help="train a model on a split; writes a run directory")
    p.add_argument("dataset")
    p.add_argument("--split", help="split name (default: leave-last)")
    p.add_argument("--model", help=" | ".join(MODEL_NAMES))
    p.add_argument("--config", help="TOML file with [train] and [model] tables")
    p.add_argument(
        "--param",
        action="append",
        type=_model_param,
        metavar="KEY=VALUE",
        help="a [model] hyper-parameter (repeatable; a TOML value: 64, 1e-3, 'bpr', true); "
        "overrides the config file",
    )
    # --run-dir first: after `torchrun ... -m recscale train`, torchrun's own parser rejects
    # `--run` as an abbreviation of its --run-path
    p.add_argument(
        "--run-dir",
        "--run",
        dest="run",
        metavar="RUN_DIR",
        help="run directory (default: runs/<dataset>-<model>)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--spark",
        type=_positive_int,
        metavar="N",
        help="train in N data-parallel processes started by Spark's TorchDistributor "
        "(the spark extra); --batch-size stays the global batch",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="full-ranking metrics of a run; writes RUN/eval.json")
    p.add_argument("run")
    p.add_argument("--k", type=_k_list, help="cut-offs, e.g. 10,20,50")
    p.add_argument("--part", choices=["test", "valid"])
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("recommend", help="top items for one user of a run")
    p.add_argument("run")
    p.add_argument("--user", required=True, help="original user id")
    p.add_argument("-k", type=_positive_int, default=10)
    p.add_argument(
        "--include-seen", action="store_true", help="do not hide the user's training items"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_recommend)

    p = sub.add_parser(
        "export", help="a run's vectors -> vector index (Milvus Lite, Milvus, FAISS)"
    )
    p.add_argument("--run", required=True, help="run directory (with embeddings/)")
    p.add_argument(
        "--index",
        required=True,
        metavar="PATH_OR_URI",
        help="a .db file (Milvus Lite), http://host:port (Milvus), or a directory (FAISS)",
    )
    p.add_argument("--kind", choices=["flat", "hnsw", "ivf"], default="flat", help="flat is exact")
    p.add_argument(
        "--param",
        action="append",
        type=_index_param,
        metavar="NAME=N",
        help="hnsw: m, ef_construction, ef_search; ivf: nlist, nprobe (repeatable)",
    )
    p.add_argument("--collection", help="Milvus collection prefix (default: recscale)")
    p.add_argument("--token", help="Milvus token (default: $MILVUS_TOKEN)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="an HTTP service of a run's recommendations (FastAPI)")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument(
        "--index",
        metavar="PATH_OR_URI",
        help="its index from `recscale export` (default: an exact FAISS index in memory)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="required in X-API-Key (default: $RECSCALE_API_KEY)")
    p.add_argument(
        "--unknown-user",
        choices=["popular", "404"],
        default="popular",
        help="answer an unknown user with popular items (flagged) or 404",
    )
    p.add_argument("--max-k", type=_positive_int, default=100)
    p.add_argument("--max-history", type=_positive_int, default=1000)
    p.add_argument("--collection", help="Milvus collection prefix (default: recscale)")
    p.add_argument("--token", help="Milvus token (default: $MILVUS_TOKEN)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="the whole pipeline on a synthetic viewing log")
    p.add_argument("--out", default="demo-out", help="where raw files, dataset and runs go")
    p.add_argument("--users", type=_positive_int)
    p.add_argument("--items", type=_positive_int)
    p.add_argument("--events", type=_positive_int)
    p.add_argument("--epochs", type=_positive_int, help="MF-BPR epochs")
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recscale")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (also used by ``python -m recscale``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ConfigError as exc:
        print(f"ConfigError: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except RecscaleError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing already stored was changed", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
