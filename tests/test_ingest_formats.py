"""recscale.ingest: every input format on tiny hand-written files with exactly known datasets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recscale.config import IngestConfig
from recscale.dataset import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA, open_dataset
from recscale.ingest import IngestResult, ingest

Row = tuple[int, int, int | None, float]


def row_counts(quality: dict) -> dict[str, int]:
    keys = ("rows_in", "accepted", "rejected", "interactions", "duplicates", "folded")
    return {k: quality[k] for k in keys}


def run(tmp_path: Path, sources: list[Path | str], **config: object) -> IngestResult:
    return ingest(sources, tmp_path / "ds", IngestConfig(**config), progress=False)  # type: ignore[arg-type]


def rows(result: IngestResult) -> list[Row]:
    table = result.dataset.interactions_table()
    assert table.schema.equals(INTERACTIONS_SCHEMA)
    return list(
        zip(
            table.column("user_idx").to_pylist(),
            table.column("item_idx").to_pylist(),
            table.column("ts").to_pylist(),
            table.column("value").to_pylist(),
            strict=True,
        )
    )


def ids(result: IngestResult) -> tuple[list[str], list[str]]:
    users, items = result.dataset.users, result.dataset.items
    assert users.column("user_idx").to_pylist() == list(range(users.num_rows))
    assert items.column("item_idx").to_pylist() == list(range(items.num_rows))
    assert users.schema.field(0) == USERS_SCHEMA.field(0)
    assert items.schema.field(1) == ITEMS_SCHEMA.field(1)
    return users.column("user_id").to_pylist(), items.column("item_id").to_pylist()


# a small log used in several formats: string ids, one pair seen twice (the later one wins)
LOG = [
    ("u2", "i1", 4.5, 1000),
    ("u1", "i2", 3.0, 2000),
    ("u1", "i1", 5.0, 3000),
    ("u2", "i1", 2.0, 4000),
]
LOG_ROWS: list[Row] = [(0, 0, 3000, 5.0), (0, 1, 2000, 3.0), (1, 0, 4000, 2.0)]
LOG_IDS = (["u1", "u2"], ["i1", "i2"])


def write_csv(
    path: Path, delim: str = ",", header: str | None = "user_id,item_id,rating,ts"
) -> Path:
    lines = [] if header is None else [header.replace(",", delim)]
    lines += [delim.join(str(x) for x in row) for row in LOG]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("name", "delim"),
    [("log.csv", ","), ("log.tsv", "\t"), ("log.txt", ";"), ("log.dat", "|"), ("log.dat", "::")],
)
def test_delimited_with_header(tmp_path: Path, name: str, delim: str) -> None:
    result = run(tmp_path, [write_csv(tmp_path / name, delim)])
    assert rows(result) == LOG_ROWS
    assert ids(result) == LOG_IDS
    manifest = result.dataset.manifest
    assert manifest.columns == {
        "user": "user_id",
        "item": "item_id",
        "time": "ts",
        "value": "rating",
    }
    assert manifest.value_kind == "rating"
    assert manifest.options["resolved_sources"][0]["delimiter"] == delim
    assert manifest.options["resolved_sources"][0]["header"] is True
    assert row_counts(result.quality) == {
        "rows_in": 4,
        "accepted": 4,
        "rejected": 0,
        "interactions": 3,
        "duplicates": 1,
        "folded": 1,
    }


def test_csv_without_header_numeric_ids_in_numeric_order(tmp_path: Path) -> None:
    # ids 10 and 2: numeric order puts 2 first (string order would not)
    src = tmp_path / "log.csv"
    src.write_text("10,5,1.5,100\n2,7,2.0,200\n10,7,3.0,300\n")
    result = run(tmp_path, [src])
    assert ids(result) == (["2", "10"], ["5", "7"])
    assert rows(result) == [(0, 1, 200, 2.0), (1, 0, 100, 1.5), (1, 1, 300, 3.0)]
    assert result.dataset.manifest.columns == {
        "user": "column0",
        "item": "column1",
        "value": "column2",
        "time": "column3",
    }


def test_headerless_three_columns_with_unix_times_are_user_item_time(tmp_path: Path) -> None:
    src = tmp_path / "log.txt"
    src.write_text("1 2 1500000000\n1 3 1500000100\n2 2 1500000200\n")
    result = run(tmp_path, [src])
    assert rows(result) == [
        (0, 0, 1500000000, 1.0),
        (0, 1, 1500000100, 1.0),
        (1, 0, 1500000200, 1.0),
    ]
    assert result.dataset.manifest.value_kind == "implicit"


def test_header_flag_and_named_columns(tmp_path: Path) -> None:
    src = tmp_path / "log.csv"
    src.write_text("7,a,x,3\n8,b,y,4\n")
    result = run(
        tmp_path, [src], header=False, user_col="column1", item_col="column2", value_col="column3"
    )
    assert ids(result) == (["a", "b"], ["x", "y"])
    assert rows(result) == [(0, 0, None, 3.0), (1, 1, None, 4.0)]


def test_explicit_columns_and_implicit_value(tmp_path: Path) -> None:
    src = tmp_path / "clicks.csv"
    src.write_text("when,who,what,junk\n2021-01-01T00:00:00Z,b,x,1\n2021-01-02 12:00:00,a,x,2\n")
    result = run(tmp_path, [src], user_col="who", item_col="what", time_col="when")
    assert ids(result) == (["a", "b"], ["x"])
    assert rows(result) == [(0, 0, 1609588800, 1.0), (1, 0, 1609459200, 1.0)]
    assert result.dataset.manifest.value_kind == "implicit"
    assert result.quality["value"] == {"min": 1.0, "max": 1.0, "mean": 1.0}


def test_time_format(tmp_path: Path) -> None:
    src = tmp_path / "log.csv"
    src.write_text("user,item,date\n1,1,02/01/2021\n2,1,31/12/2020\n")
    result = run(tmp_path, [src], time_format="%d/%m/%Y")
    assert rows(result) == [
        (0, 0, 1609545600, 1.0),
        (1, 0, 1609372800, 1.0),
    ]  # 2021-01-02, 2020-12-31


def test_quoted_csv_fields(tmp_path: Path) -> None:
    src = tmp_path / "log.csv"
    src.write_text('user,item,rating\n"a, the first",x,1\nb,"say ""hi""",2\n')
    result = run(tmp_path, [src])
    assert ids(result) == (["a, the first", "b"], ['say "hi"', "x"])
    assert rows(result) == [(0, 1, None, 1.0), (1, 0, None, 2.0)]


def test_gzip_csv_and_crlf(tmp_path: Path) -> None:
    src = tmp_path / "log.csv.gz"
    text = "user_id,item_id,rating,ts\r\n" + "".join(
        ",".join(str(x) for x in row) + "\r\n" for row in LOG
    )
    src.write_bytes(gzip.compress(text.encode()))
    result = run(tmp_path, [src])
    assert rows(result) == LOG_ROWS
    assert ids(result) == LOG_IDS


def test_json_lines(tmp_path: Path) -> None:
    src = tmp_path / "log.jsonl"
    src.write_text(
        "".join(
            json.dumps({"userId": u, "itemId": i, "rating": r, "timestamp": t, "extra": [1]}) + "\n"
            for u, i, r, t in LOG
        )
    )
    result = run(tmp_path, [src])
    assert rows(result) == LOG_ROWS
    assert ids(result) == LOG_IDS
    assert result.dataset.manifest.sources[0].format == "jsonl"
    packed = tmp_path / "log.jsonl.gz"
    packed.write_bytes(gzip.compress(src.read_bytes()))
    assert rows(ingest([packed], tmp_path / "gz", progress=False)) == LOG_ROWS


def log_table() -> pa.Table:
    users, items, ratings, ts = zip(*LOG, strict=True)
    return pa.table(
        {
            "user": list(users),
            "item": list(items),
            "rating": pa.array(ratings, pa.float32()),
            "timestamp": pa.array(ts, pa.timestamp("s")),
        }
    )


def test_parquet_file_directory_and_glob(tmp_path: Path) -> None:
    table = log_table()
    single = tmp_path / "one.parquet"
    pq.write_table(table, single)
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(table.slice(0, 2), folder / "a.parquet")
    pq.write_table(table.slice(2), folder / "b.parquet")
    for name, source in [("file", single), ("dir", folder), ("glob", folder / "*.parquet")]:
        result = ingest([source], tmp_path / name, progress=False)
        assert rows(result) == LOG_ROWS, name
        assert ids(result) == LOG_IDS, name
    assert [s.rows for s in open_dataset(tmp_path / "glob").manifest.sources] == [2, 2]


def test_parquet_integer_ids_and_integer_times(tmp_path: Path) -> None:
    src = tmp_path / "log.parquet"
    pq.write_table(
        pa.table(
            {"user_id": [30, 4, 4], "item_id": [1, 1, 2], "ts": [5, 6, 7], "count": [2, 3, 4]}
        ),
        src,
    )
    result = run(tmp_path, [src])
    assert ids(result) == (["4", "30"], ["1", "2"])
    assert rows(result) == [(0, 0, 6, 3.0), (0, 1, 7, 4.0), (1, 0, 5, 2.0)]
    assert result.dataset.manifest.value_kind == "count"


def write_ml100k(folder: Path) -> None:
    folder.mkdir()
    (folder / "u.data").write_text("2\t1\t4\t881250949\n1\t2\t3\t891717742\n1\t1\t5\t878887116\n")
    flags_1 = ["0"] * 19
    flags_1[3] = flags_1[4] = "1"  # Animation, Children's
    flags_2 = ["0"] * 19
    flags_2[8] = "1"  # Drama
    (folder / "u.item").write_bytes(
        (
            "1|Toy Story (1995)|01-Jan-1995||http://x/1|" + "|".join(flags_1) + "\n"
            "2|Misérables, Les (1995)|01-Jan-1995||http://x/2|" + "|".join(flags_2) + "\n"
        ).encode("latin-1")
    )
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime"]
    genres += ["Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery"]
    genres += ["Romance", "Sci-Fi", "Thriller", "War", "Western"]
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(genres)) + "\n")
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")


def test_movielens_100k_folder(tmp_path: Path) -> None:
    write_ml100k(tmp_path / "ml-100k")
    result = run(tmp_path, [tmp_path / "ml-100k"])
    assert rows(result) == [(0, 0, 878887116, 5.0), (0, 1, 891717742, 3.0), (1, 0, 881250949, 4.0)]
    items = result.dataset.items.to_pylist()
    assert [(i["item_id"], i["title"], i["genres"]) for i in items] == [
        ("1", "Toy Story (1995)", ["Animation", "Children's"]),
        ("2", "Misérables, Les (1995)", ["Drama"]),
    ]
    assert str(items[0]["release_date"]) == "1995-01-01"
    users = result.dataset.users.to_pylist()
    assert users[1] == {
        "user_idx": 1,
        "user_id": "2",
        "age": 53,
        "gender": "F",
        "occupation": "other",
        "zip_code": "94043",
    }
    assert result.dataset.manifest.sources[0].format == "movielens"
    assert result.dataset.item_titles([1]) == ["Misérables, Les (1995)"]


def test_movielens_1m_files(tmp_path: Path) -> None:
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    ratings = folder / "ratings.dat.gz"
    ratings.write_bytes(
        gzip.compress(b"1::1193::5::978300760\n1::661::3::978302109\n2::661::4::978300000\n")
    )
    (folder / "movies.dat").write_bytes(
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "9999::Célestine (1990)::Drama\n".encode("latin-1")
    )
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    result = run(tmp_path, [ratings])
    assert ids(result) == (["1", "2"], ["661", "1193"])
    assert rows(result) == [(0, 0, 978302109, 3.0), (0, 1, 978300760, 5.0), (1, 0, 978300000, 4.0)]
    items = result.dataset.items.to_pylist()
    assert items[0]["genres"] == ["Animation", "Children's", "Musical"]
    assert items[1]["title"] == "One Flew Over the Cuckoo's Nest (1975)"
    assert result.dataset.users.to_pylist()[1]["age"] == 56
    # the folder works too, and a movie nobody rated gets no index
    assert open_dataset(run(tmp_path / "f", [folder]).dataset.path).n_items == 2


def test_movielens_latest_csv_with_quoted_titles(tmp_path: Path) -> None:
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n31,Dangerous Minds (1995),Drama\n"
        '1029,"American President, The (1995)",Comedy|Drama|Romance\n'
        "5,Nothing (2000),(no genres listed)\n"
    )
    result = run(tmp_path, [folder])
    assert rows(result) == [(0, 0, 1260759144, 2.5), (0, 1, 1260759179, 3.0)]
    items = result.dataset.items.to_pylist()
    assert items[1]["title"] == "American President, The (1995)"
    assert items[1]["genres"] == ["Comedy", "Drama", "Romance"]


def test_lightgcn_folder_yields_dataset_and_given_split(tmp_path: Path) -> None:
    folder = tmp_path / "gowalla-like"
    folder.mkdir()
    (folder / "train.txt.gz").write_bytes(gzip.compress(b"0 0 1 2\n1 1 3\n2 0\n"))
    (folder / "test.txt").write_text("0 3\n1 2\n2 1 2\n")
    result = run(tmp_path, [folder])
    # idx == original id: ids 0..n-1 in numeric order
    assert ids(result) == (["0", "1", "2"], ["0", "1", "2", "3"])
    assert rows(result) == [
        (0, 0, None, 1.0),
        (0, 1, None, 1.0),
        (0, 2, None, 1.0),
        (0, 3, None, 1.0),
        (1, 1, None, 1.0),
        (1, 2, None, 1.0),
        (1, 3, None, 1.0),
        (2, 0, None, 1.0),
        (2, 1, None, 1.0),
        (2, 2, None, 1.0),
    ]
    split = result.dataset.split("given")
    train = split.interactions("train")
    test = split.interactions("test")
    assert sorted(zip(train.user_idx.tolist(), train.item_idx.tolist(), strict=True)) == [
        (0, 0), (0, 1), (0, 2), (1, 1), (1, 3), (2, 0),
    ]  # fmt: skip
    assert sorted(zip(test.user_idx.tolist(), test.item_idx.tolist(), strict=True)) == [
        (0, 3), (1, 2), (2, 1), (2, 2),
    ]  # fmt: skip
    assert split.meta["counts"] == {"train": 6, "valid": 0, "test": 4}
    assert not split.has("valid")
    assert result.dataset.manifest.value_kind == "implicit"


def test_items_and_users_files(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "log.csv")
    (tmp_path / "items.csv").write_text(
        "item_id,title,genres,year\ni1,First,A|B,2001\ni2,Second,,2002\ni9,Unused,C,2009\n"
    )
    pq.write_table(
        pa.table({"user_id": ["u1", "u2"], "country": ["fr", "de"]}), tmp_path / "u.parquet"
    )
    result = run(
        tmp_path,
        [src],
        items_file=str(tmp_path / "items.csv"),
        users_file=str(tmp_path / "u.parquet"),
    )
    assert result.dataset.items.to_pylist() == [
        {"item_idx": 0, "item_id": "i1", "title": "First", "genres": ["A", "B"], "year": 2001},
        {"item_idx": 1, "item_id": "i2", "title": "Second", "genres": [], "year": 2002},
    ]
    assert result.dataset.users.to_pylist() == [
        {"user_idx": 0, "user_id": "u1", "country": "fr"},
        {"user_idx": 1, "user_id": "u2", "country": "de"},
    ]


def test_several_sources_in_one_dataset(tmp_path: Path) -> None:
    a = tmp_path / "a.csv"
    a.write_text("user,item\n1,1\n2,2\n")
    b = tmp_path / "b.jsonl"
    b.write_text('{"user": 3, "item": 1}\n{"user": 1, "item": 2}\n')
    result = run(tmp_path, [a, b])
    assert rows(result) == [
        (0, 0, None, 1.0),
        (0, 1, None, 1.0),
        (1, 1, None, 1.0),
        (2, 0, None, 1.0),
    ]
    assert [(s.format, s.rows) for s in result.dataset.manifest.sources] == [
        ("csv", 2),
        ("jsonl", 2),
    ]
    assert [s["rows_in"] for s in result.quality["sources"]] == [2, 2]


def test_row_groups_follow_rows_per_group(tmp_path: Path) -> None:
    src = tmp_path / "log.csv"
    src.write_text("user,item\n" + "".join(f"{u},{i}\n" for u in range(10) for i in range(25)))
    result = run(tmp_path, [src], rows_per_group=100)
    files = result.dataset.interaction_files()
    groups = [
        pq.ParquetFile(f).metadata.row_group(g).num_rows
        for f in files
        for g in range(pq.ParquetFile(f).metadata.num_row_groups)
    ]
    assert groups == [100, 100, 50]
    assert len(files) == 1
