"""The real CLI end to end on a small log: exact output lines, one-line errors, nothing clobbered."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from recscale.cli import main

EVENTS = """user_id,title_id,watched_at,watch_fraction
a,x,2020-01-01T00:00:00Z,1.0
a,y,2020-01-02T00:00:00Z,0.5
a,z,2020-01-03T00:00:00Z,0.5
b,x,2020-01-01T00:00:00Z,1.0
b,y,2020-01-04T00:00:00Z,1.0
b,w,2020-01-05T00:00:00Z,1.0
c,y,2020-01-01T00:00:00Z,1.0
c,z,2020-01-02T00:00:00Z,1.0
c,w,2020-01-03T00:00:00Z,1.0
c,v,2020-01-06T00:00:00Z,1.0
d,x,2020-01-01T00:00:00Z,1.0
d,v,nope,1.0
e,w,2020-01-01T00:00:00Z,1.0
e,x,2020-01-02T00:00:00Z,1.0
e,y,2020-01-03T00:00:00Z,1.0
"""
TITLES = "title_id,title,genres\nx,Ex Film,Drama\ny,Why Film,Comedy\nz,Zed Film,Drama\nw,Double,Horror\nv,Vee,Drama\n"


def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def events(tmp_path: Path) -> Path:
    (tmp_path / "events.csv").write_text(EVENTS)
    (tmp_path / "titles.csv").write_text(TITLES)
    return tmp_path / "events.csv"


def ingest_args(events: Path, out: Path) -> list[str]:
    return [
        "ingest", str(events), "--out", str(out), "--user-col", "user_id", "--item-col", "title_id",
        "--time-col", "watched_at", "--value-col", "watch_fraction",
        "--items-file", str(events.parent / "titles.csv"), "--quiet",
    ]  # fmt: skip


def test_pipeline_through_the_cli(events: Path, tmp_path: Path, capsys) -> None:
    ds = tmp_path / "ds"
    code, out, err = run_cli(*ingest_args(events, ds), capsys=capsys)
    assert code == 0, err
    assert f"wrote {ds}" in out
    assert "15" in out and "bad_timestamp" in out  # 15 rows in, one rejected for its time

    code, out, err = run_cli(
        "split", str(ds), "--strategy", "leave-last", "--no-valid", capsys=capsys
    )
    assert code == 0, err
    assert out.splitlines()[-1].startswith(
        "split 'leave-last' (leave-last): train 10  valid 0  test 4"
    )

    run = tmp_path / "run"
    code, out, err = run_cli(
        "train", str(ds), "--split", "leave-last", "--model", "popularity", "--run", str(run), "--quiet",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() == f"run written to {run}"

    code, out, err = run_cli("evaluate", str(run), "--k", "1,2", capsys=capsys)
    assert code == 0, err
    scores = json.loads((run / "eval.json").read_text())
    assert scores["users"] == 4
    assert "recall@1" in out and "ndcg@2" in out

    code, out, err = run_cli("recommend", str(run), "--user", "a", "-k", "2", capsys=capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "top 2 for user a (popularity):"
    # a saw x, y in train; of the rest, w has 2 training views, z 1, v none
    assert [line.split()[1] for line in lines[1:]] == ["w", "z"]
    assert "Double" in lines[1]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["split", "{tmp}/nope"], r"^DatasetError: dataset '.*nope' does not exist"),
        (["evaluate", "{tmp}/norun"], r"^RunError: .*norun"),
        (
            ["ingest", "{tmp}/missing.csv", "--out", "{tmp}/ds"],
            r"^SourceNotFoundError: .*missing\.csv",
        ),
        (
            ["train", "{tmp}/ds", "--epochs", "0"],
            r"^ConfigError: .*--epochs: .*expected a positive integer, got '0'",
        ),
        (
            ["evaluate", "{tmp}/run", "--k", "ten"],
            r"^ConfigError: .*--k: .*comma-separated integers",
        ),
        (
            ["split", "{tmp}/ds", "--strategy", "sideways"],
            r"^ConfigError: .*--strategy: invalid choice: 'sideways'",
        ),
        (["frobnicate"], r"^ConfigError: .*invalid choice: 'frobnicate'"),
        (
            ["train", "{tmp}/ds", "--param", "=3"],
            r"^ConfigError: .*--param: expected KEY=VALUE, got '=3'",
        ),
    ],
)
def test_errors_are_one_line(args: list[str], expected: str, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(*[a.format(tmp=tmp_path) for a in args], capsys=capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(expected, err.strip()), err


def test_bad_input_leaves_the_existing_dataset_untouched(
    events: Path, tmp_path: Path, capsys
) -> None:
    ds = tmp_path / "ds"
    assert run_cli(*ingest_args(events, ds), capsys=capsys)[0] == 0
    before = tree_digest(ds)
    code, _, err = run_cli(*ingest_args(events, ds)[:-1], "--user-col", "usr", capsys=capsys)
    assert code == 1 and err.startswith("SchemaError: ") and "usr" in err
    code, _, err = run_cli(
        "split", str(ds), "--strategy", "temporal", "--test-quantile", "2", capsys=capsys
    )
    assert code == 1 and err.startswith("ConfigError: ")
    assert tree_digest(ds) == before


def test_unknown_user_is_a_clear_error(events: Path, tmp_path: Path, capsys) -> None:
    ds, run = tmp_path / "ds", tmp_path / "run"
    assert run_cli(*ingest_args(events, ds), capsys=capsys)[0] == 0
    assert (
        run_cli("split", str(ds), "--strategy", "leave-last", "--no-valid", capsys=capsys)[0] == 0
    )
    train = [
        "train",
        str(ds),
        "--split",
        "leave-last",
        "--model",
        "popularity",
        "--run",
        str(run),
        "--quiet",
    ]
    assert run_cli(*train, capsys=capsys)[0] == 0
    code, _, err = run_cli("recommend", str(run), "--user", "zz", capsys=capsys)
    assert code == 1
    assert err.strip().startswith("UnknownIdError: unknown user id 'zz'")


def test_installed_entry_point_and_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recscale", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("ingest", "split", "train", "evaluate", "recommend", "demo"):
        assert command in result.stdout


def test_model_hyper_parameters_from_flags(events: Path, tmp_path: Path, capsys) -> None:
    ds = tmp_path / "ds"
    assert run_cli(*ingest_args(events, ds), capsys=capsys)[0] == 0
    assert (
        run_cli("split", str(ds), "--strategy", "leave-last", "--no-valid", capsys=capsys)[0] == 0
    )
    run = tmp_path / "run"
    code, _, err = run_cli(
        "train", str(ds), "--model", "mf-bpr", "--run", str(run), "--epochs", "1", "--quiet",
        "--param", "dim=8", "--param", "lr=2e-2", "--param", "hard_negatives=false",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    model = tomllib.loads((run / "config.toml").read_text())["model"]
    assert (model["dim"], model["lr"], model["hard_negatives"]) == (8, 0.02, False)

    code, _, err = run_cli(
        "train", str(ds), "--model", "mf-bpr", "--run", str(tmp_path / "r2"),
        "--param", "dim=many", capsys=capsys,
    )  # fmt: skip
    assert code == 1
    assert re.search(r"^ConfigError: .*dim: got 'many'", err.strip()), err


def test_train_help_names_every_registered_model() -> None:
    from recscale.cli import MODEL_NAMES
    from recscale.models import MODELS

    assert set(MODEL_NAMES) == set(MODELS)
