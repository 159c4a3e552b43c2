"""Where data comes from: JSON/JSONL files, Parquet/CSV/Arrow files, `datasets` folders and hub ids.

    read_data(spec, data_cfg) -> [(where, record)]

Every reader of records (SFT examples, preference pairs, prompts) comes through here, and every
problem with the data is a DataError naming the file and the line or record.

`spec` is `data.train` or `data.eval`:
- a .json / .jsonl file: read here, `where` is "file:line" (JSONL) or "file: record i";
- a .parquet, .csv or .arrow file, a folder written by `Dataset.save_to_disk`, or a folder of such
  files: read through the `datasets` library, `where` is "file: row i";
- anything else (`org/name`): a hub dataset through `datasets.load_dataset(spec, data.subset,
  split=data.split)` (needs network access at run time).
`data.columns` then renames the user's columns onto the format's, e.g.
`{instruction = "question", output = "answer"}`. Missing values (None, which `datasets` fills in
for fields some rows lack) are dropped, so a row reads like the JSON record it came from.
"""

import json
from pathlib import Path

TABLES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DataError(ValueError):
    """A problem with the data, naming the file, the line or record, and what to do."""


def read_records(path) -> list[tuple[str, dict]]:
    """[(where, record)] from a JSON list or a JSONL file; `where` is "file:line" for errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        out = []
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
            out.append((f"{path}: record {i}", rec))
        return out
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                            "JSON object") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((f"{path}:{n}", rec))
    return out


def read_data(spec: str, data_cfg) -> list[tuple[str, dict]]:
    path = Path(spec)
    if path.suffix in (".json", ".jsonl"):
        records = read_records(path)
    else:
        records = [(f"{spec}: row {i}", {k: v for k, v in row.items() if v is not None})
                   for i, row in enumerate(_dataset(spec, path, data_cfg))]
        if not records:
            raise DataError(f"{spec}: the dataset has no rows")
    columns = getattr(data_cfg, "columns", None) or {}
    return [(where, _rename(rec, columns, where)) for where, rec in records] if columns else records


def _dataset(spec, path, data_cfg):
    import datasets

    split, subset = getattr(data_cfg, "split", "train") or "train", getattr(data_cfg, "subset", "") or None
    try:
        if path.is_file():
            if path.suffix not in TABLES:
                raise DataError(f"{spec}: unknown file type {path.suffix!r}; use .json, .jsonl, .parquet, .csv or .arrow")
            return datasets.load_dataset(TABLES[path.suffix], data_files=str(path), split="train")
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{spec}: no split {split!r} (it has {', '.join(ds)}); set data.split")
                ds = ds[split]
            return ds
        # org/name, where a name may hold dots (teknium/OpenHermes-2.5) but not a data file's suffix
        hub_id = (not path.is_absolute() and not spec.startswith((".", "~")) and spec.count("/") == 1
                  and path.suffix not in (*TABLES, ".json", ".jsonl", ".txt"))
        if not path.exists() and not hub_id:
            raise DataError(f"{spec}: no such file, folder or hub dataset (a hub id looks like org/name)")
        return datasets.load_dataset(spec, subset, split=split)  # a folder of data files, or a hub id
    except DataError:
        raise
    except (FileNotFoundError, ValueError, OSError, ConnectionError) as e:
        raise DataError(f"{spec}: cannot read it with the datasets library: {str(e).splitlines()[0][:300]}") from None


def _rename(rec, columns, where):
    out = dict(rec)
    for target, source in columns.items():
        if source not in out:
            raise DataError(f"{where}: data.columns maps {target!r} onto column {source!r}, which this record lacks "
                            f"(it has {', '.join(sorted(rec))})")
        out[target] = out.pop(source)
    return out
