"""Data where users keep it: Parquet, CSV and Arrow files, `save_to_disk` folders and folders of data
files (the `load_dataset` path hub ids take), read through the `datasets` library, with
`data.columns` mapping other column names onto the format's."""

import json
from pathlib import Path

import datasets
import pytest

from fasttune.builtin import byte_tokenizer as builtin_tokenizer
from fasttune.config import DataConfig, PrefDataConfig
from fasttune.data import load_sft
from fasttune.sources import DataError, read_data
from fasttune.preference import load_pairs

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
ROWS = [json.loads(line) for line in open(DATA / "sft_alpaca.jsonl")][:12]


def _renamed(rows):
    return [{"question": r["instruction"], "answer": r["output"], **({"input": r["input"]} if r.get("input") else {})}
            for r in rows]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    ds = datasets.Dataset.from_list(_renamed(ROWS))
    ds.to_parquet(str(root / "sft.parquet"))
    ds.to_csv(str(root / "sft.csv"), index=False)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(root / "saved"))
    (root / "repo").mkdir()
    ds.to_parquet(str(root / "repo" / "train.parquet"))
    arrow = datasets.Dataset.from_list(ROWS)
    arrow.save_to_disk(str(root / "plain"))
    return root, next((root / "plain").glob("*.arrow"))


@pytest.mark.parametrize("kind", ["sft.parquet", "sft.csv", "saved", "repo", "arrow"])
def test_every_source_gives_the_jsonl_records(files, kind):
    root, arrow = files
    spec = str(arrow if kind == "arrow" else root / kind)
    cfg = DataConfig(columns={} if kind == "arrow" else {"instruction": "question", "output": "answer"})
    records = read_data(spec, cfg)
    norm = lambda r: {k: v for k, v in r.items() if v not in ("", None)}  # noqa: E731 - CSV has no empty strings
    assert [norm(rec) for _, rec in records] == [norm(r) for r in ROWS]
    assert records[3][0].endswith("row 3")


def test_sft_from_parquet_equals_sft_from_jsonl(files, tmp_path):
    root, _ = files
    tok = builtin_tokenizer()
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    want, _ = load_sft(str(jsonl), tok, DataConfig())
    got, _ = load_sft(str(root / "sft.parquet"), tok, DataConfig(columns={"instruction": "question", "output": "answer"}))
    assert [e.input_ids for e in got] == [e.input_ids for e in want]
    assert [e.labels for e in got] == [e.labels for e in want]


def test_split_of_a_saved_dataset_dict(files):
    root, _ = files
    assert len(read_data(str(root / "saved"), DataConfig(split="test"))) == 3
    with pytest.raises(DataError, match="no split 'dev'"):
        read_data(str(root / "saved"), DataConfig(split="dev"))


def test_pairs_from_csv_with_columns(tmp_path):
    rows = [json.loads(line) for line in open(DATA / "dpo_pairs.jsonl")][:5]
    datasets.Dataset.from_list([{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows
                                if all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected"))]
                               ).to_csv(str(tmp_path / "pairs.csv"), index=False)
    cfg = PrefDataConfig(columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    from fasttune.config import DPOSection

    pairs, report = load_pairs(str(tmp_path / "pairs.csv"), builtin_tokenizer(), cfg, DPOSection())
    assert len(pairs) == report.pairs > 0


def test_errors_name_the_source_and_the_column(files, tmp_path):
    root, _ = files
    with pytest.raises(DataError, match="data.columns maps 'instruction' onto column 'prompt'"):
        read_data(str(root / "sft.parquet"), DataConfig(columns={"instruction": "prompt"}))
    with pytest.raises(DataError, match="no such file"):
        read_data(str(tmp_path / "missing"), DataConfig())
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown file type"):
        read_data(str(tmp_path / "x.txt"), DataConfig())


def test_hub_ids_with_subset_and_split(tmp_path, monkeypatch):
    """`org/name` goes through `datasets.load_dataset(spec, data.subset, split=data.split)`, the call a
    hub id takes. datasets resolves such an id to a folder of that name under the working directory
    before it asks the hub, so a repository laid out as on the hub (subsets declared in its README)
    exercises the whole path offline. A dotted name is a hub id too, not a missing file."""
    repo = tmp_path / "myorg" / "math-v1.5"
    for subset, rows in (("easy", ROWS[:3]), ("hard", ROWS[3:8])):
        (repo / subset).mkdir(parents=True)
        for split, part in (("train", rows), ("test", rows[:1])):
            (repo / subset / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
        f"  - split: test\n    path: {s}/test.jsonl\n" for s in ("easy", "hard")) + "---\n")
    monkeypatch.chdir(tmp_path)
    got = read_data("myorg/math-v1.5", DataConfig(subset="hard"))
    assert [r for _, r in got] == ROWS[3:8] and got[0][0] == "myorg/math-v1.5: row 0"
    assert [r for _, r in read_data("myorg/math-v1.5", DataConfig(subset="easy", split="test"))] == ROWS[:1]

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no hub here: the call must still be made
    with pytest.raises(DataError, match="teknium/OpenHermes-2.5: cannot read it with the datasets library"):
        read_data("teknium/OpenHermes-2.5", DataConfig())
