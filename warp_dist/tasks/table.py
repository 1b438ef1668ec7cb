"""The rows of one split of a dataset, as a list of dicts: a local file (jsonl, json, csv, parquet, arrow), a local
folder (one file per split named <split>.<ext>, or a folder written by datasets' `save_to_disk`), or a hub dataset
id (through `datasets.load_dataset`). Every failure is a `DataError` of one line naming the field."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


class DataError(ValueError):
    """Prompts that cannot be had as configured; the message is one line naming the data.* field."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_file(path: Path) -> list[dict]:
    """The rows of one local file, by its extension."""
    ext = path.suffix.lower()
    if ext == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"data.path={str(path)!r} could not be read: line {n} is not JSON "
                                        f"({exc.msg})") from None
        return rows
    if ext == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]} or {"rows": [...]}: the one list of rows it holds
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list):
            raise DataError(f"data.path={str(path)!r}: a .json file must hold a list of rows (or one key with it)")
        return data
    if ext == ".csv":
        csv.field_size_limit(sys.maxsize)
        with open(path, newline="", encoding="utf-8") as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    if ext == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if ext == ".arrow":
        import pyarrow as pa

        try:
            with pa.memory_map(str(path)) as src:
                return pa.ipc.open_stream(src).read_all().to_pylist()  # datasets' cache files are streams
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as src:
                return pa.ipc.open_file(src).read_all().to_pylist()
    raise DataError(f"data.path={str(path)!r}: unknown file type {ext or '(none)'}; allowed {' | '.join(EXTENSIONS)}")


def _in_folder(folder: Path, split: str) -> Path | list[Path] | None:
    """The file(s) of `split` in a folder: <split>.<ext>, <split>-*.<ext> shards, or data/<split>...; None: not there."""
    for base in (folder, folder / "data"):
        for ext in EXTENSIONS:
            one = base / f"{split}{ext}"
            if one.is_file():
                return one
            shards = sorted(base.glob(f"{split}-*{ext}"))
            if shards:
                return shards
    return None


def _from_disk(folder: Path, split: str, key: str) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{key}={split!r} is not a split of {folder}: it has {', '.join(ds)}")
        ds = ds[split]
    return ds.to_list()


def read_local(path: Path, split: str, key: str = "data.split") -> list[dict]:
    if path.is_file():
        if split != "train":
            raise DataError(f"{key}={split!r}: data.path={str(path)!r} is one file, whose rows are the split train; "
                            f"name a folder holding {split}.jsonl (or another file type), or the file itself")
        return read_file(path)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _from_disk(path, split, key)
    found = _in_folder(path, split)
    if found is None:
        present = sorted({p.name for base in (path, path / "data") if base.is_dir() for p in base.iterdir()
                          if p.suffix.lower() in EXTENSIONS})
        raise DataError(f"{key}={split!r}: no {split}.<{'|'.join(e[1:] for e in EXTENSIONS)}> in {path} "
                        f"(it holds {', '.join(present) or 'no data files'})")
    files = found if isinstance(found, list) else [found]
    return [row for f in files for row in read_file(f)]


def read_hub(path: str, name: str, split: str, key: str = "data.split") -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(path, name or None, split=split)
    except Exception as exc:  # noqa: BLE001 - a hub failure of any kind: one line saying which and what to do
        raise DataError(f"data.path={path!r} (data.name={name!r}, {key}={split!r}) could not be loaded "
                        f"({_first_line(exc)}); offline, point data.path at a local file or folder") from None
    return ds.to_list()


def read_split(path: str, name: str, split: str, key: str = "data.split") -> list[dict]:
    """The rows of `split` (the data.split or data.eval_split named by `key`); a local path wins over a hub id.
    A split may also be a file path of its own (data.eval_split=held_out.jsonl)."""
    if Path(split).suffix.lower() in EXTENSIONS and Path(split).expanduser().is_file():
        where, rows = split, _read_guarded(Path(split).expanduser(), "train", key)
    else:
        local = Path(path).expanduser()
        if local.exists():
            where, rows = path, _read_guarded(local, split, key)
        elif Path(path).suffix.lower() in EXTENSIONS or path.startswith((".", "/", "~")):
            raise DataError(f"data.path={path!r}: no such file or folder")
        else:
            where, rows = path, read_hub(path, name, split, key)
    if not rows:
        raise DataError(f"{key}={split!r} of {where} is empty: no rows")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{key}={split!r} of {where}: row {bad} is {type(rows[bad]).__name__}, not a mapping of "
                        "columns")
    return rows


def _read_guarded(path: Path, split: str, key: str) -> list[dict]:
    try:
        return read_local(path, split, key)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken file of any kind: one line naming it
        raise DataError(f"data.path={str(path)!r} could not be read ({_first_line(exc)})") from None
