"""Corpus input files: JSON lines, parquet or CSV; a file, a folder of them, or a glob.

Rows are read with their position so that a bad one can be named: (file, row) where row counts
from 1 (for JSON lines and CSV, the line number where the row starts). A row is bad when its id is
missing or repeated, or its text is missing, empty or not a string; scan() finds them all before
any work starts.
"""

import csv
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from nomic_moe_files.errors import UserError

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def resolve_inputs(spec: str) -> List[Path]:
    """INPUT -> the sorted list of files it names."""
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        what = f"the glob {spec!r}"
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"{path} does not exist", "pass a .jsonl, .parquet or .csv file, a folder of them, or a glob")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        what = str(path)
    files = [f.resolve() for f in files if f.suffix.lower() in SUFFIXES and not f.name.startswith(".")]
    if not files:
        raise UserError(f"{what} holds no .jsonl, .json, .parquet or .csv file", "point INPUT at the corpus files")
    return files


def kind(path: Path) -> str:
    return SUFFIXES[path.suffix.lower()]


@dataclass
class Row:
    ordinal: int  # 0-based index among the file's rows (blank JSON lines are not rows)
    number: int  # 1-based position in its file for messages (the line, for JSON lines and CSV)
    id: object
    text: object
    problem: Optional[str] = None  # set for a row that cannot be parsed at all
    offset: int = 0  # byte offset where the row starts (JSON lines: where a part can seek to)


def _jsonl_rows(path: Path, text_col: str, id_col: str, start: int = 0, offset: int = 0, line: int = 0) -> Iterator[Row]:
    """Rows from byte ``offset`` on, whose first row has ordinal ``start`` on line ``line`` + 1."""
    with open(path, "rb") as f:
        f.seek(offset)
        ordinal, number = start, line
        while True:
            at = f.tell()
            raw = f.readline()
            if not raw:
                return
            number += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: line {number} is not UTF-8 ({e.reason})", "re-encode the file as UTF-8") from None
            if not text.strip():
                continue  # a blank line is not a row
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield Row(ordinal, number, None, None, f"invalid JSON ({e.msg}, column {e.colno})", at)
            else:
                if isinstance(obj, dict):
                    yield Row(ordinal, number, obj.get(id_col), obj.get(text_col), None, at)
                else:
                    yield Row(ordinal, number, None, None, f"a JSON {type(obj).__name__}, not an object", at)
            ordinal += 1


def _csv_rows(path: Path, text_col: str, id_col: str) -> Iterator[Row]:
    with open(path, "r", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a readable CSV file ({e})", "save it as UTF-8 CSV with a header row") from None
        cols = {name: i for i, name in enumerate(header)}
        start = reader.line_num + 1
        try:
            for ordinal, values in enumerate(reader):
                row_id = values[cols[id_col]] if id_col in cols and cols[id_col] < len(values) else None
                text = values[cols[text_col]] if text_col in cols and cols[text_col] < len(values) else None
                yield Row(ordinal, start, row_id if row_id != "" else None, text)
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}: CSV error near line {reader.line_num} ({e})", "fix the file (quoting, encoding)") from None


def _parquet_rows(path: Path, text_col: str, id_col: str, start: int = 0) -> Iterator[Row]:
    """Rows from ordinal ``start`` on; whole row groups before it are not read."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow's errors are plain ArrowInvalid/OSError
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:160]})", "write it again, or export JSON lines") from None
    names = pf.schema_arrow.names
    cols = [c for c in (id_col, text_col) if c in names]
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n <= start:
            first += n
            continue
        data = pf.read_row_group(g, columns=cols).to_pydict()
        ids = data.get(id_col, [None] * n)
        texts = data.get(text_col, [None] * n)
        for i in range(max(0, start - first), n):
            yield Row(first + i, first + i + 1, ids[i], texts[i])
        first += n


READERS = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}


def rows(path: Path, text_col: str, id_col: str) -> Iterator[Row]:
    return READERS[kind(path)](path, text_col, id_col)


def part_rows(path: Path, text_col: str, id_col: str, start: int, end: int, offset: int = 0, line: int = 0) -> List[Row]:
    """Rows with ordinals in [start, end): JSON lines seek to ``offset``, parquet skips row groups, CSV reads through."""
    k = kind(path)
    if k == "jsonl":
        source = _jsonl_rows(path, text_col, id_col, start, offset, line)
    elif k == "parquet":
        source = _parquet_rows(path, text_col, id_col, start)
    else:
        source = _csv_rows(path, text_col, id_col)
    out = []
    for row in source:
        if row.ordinal >= end:
            break
        if row.ordinal >= start:
            out.append(row)
    return out


def columns_present(path: Path, text_col: str, id_col: str) -> Tuple[bool, bool]:
    """(has id column, has text column) from the header / schema / first object; missing ones refuse early."""
    k = kind(path)
    if k == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(str(path)).schema_arrow.names
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:160]})", "write it again") from None
        return id_col in names, text_col in names
    if k == "csv":
        with open(path, "r", encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
        return id_col in header, text_col in header
    with open(path, encoding="utf-8", errors="replace") as f:  # JSON lines: the first object says
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return id_col in obj, text_col in obj
    return True, True  # no object at all: every row is reported as bad


def problem(row: Row, seen: set) -> Optional[str]:
    """Why a row cannot be embedded, or None. ``seen`` collects the ids so far (duplicates are bad)."""
    if row.problem:
        return row.problem
    if row.id is None:
        return "missing id"
    if isinstance(row.id, float) or not isinstance(row.id, (str, int)) or isinstance(row.id, bool):
        return f"id of type {type(row.id).__name__} (ids are strings or integers)"
    if row.text is None:
        return "missing text"
    if not isinstance(row.text, str):
        return f"text of type {type(row.text).__name__}, not a string"
    if not row.text.strip():
        return "empty text"
    if row.id in seen:
        return f"duplicate id {row.id!r}"
    seen.add(row.id)
    return None


@dataclass
class FileScan:
    path: Path
    rows: int = 0  # every row, good and bad
    bad: List[Tuple[int, int, object, str]] = field(default_factory=list)  # (ordinal, row number, id, problem)
    boundaries: List[Tuple[int, int, int]] = field(default_factory=list)  # per part: (first ordinal, byte offset, lines before)


def scan(files: List[Path], text_col: str, id_col: str, part_size: int, progress=None) -> Tuple[List[FileScan], str]:
    """Every row of every file checked, and the files cut into parts of ``part_size`` rows; with the
    type of the good ids ("int" or "str", the output's id column).

    Runs before any work, so a bad row is named (or set aside) instead of lost.
    """
    seen: set = set()
    id_types = set()
    out = []
    for path in files:
        has_id, has_text = columns_present(path, text_col, id_col)
        missing = [c for c, ok in ((id_col, has_id), (text_col, has_text)) if not ok]
        if missing:
            raise UserError(
                f"{path}: no column {' or '.join(repr(c) for c in missing)}",
                "name the columns with --text-column / --id-column",
            )
        fs = FileScan(path)
        for row in rows(path, text_col, id_col):
            if row.ordinal % part_size == 0:
                fs.boundaries.append((row.ordinal, row.offset, row.number - 1))
            fs.rows += 1
            why = problem(row, seen)
            if why:
                fs.bad.append((row.ordinal, row.number, row.id if isinstance(row.id, (str, int)) else None, why))
            else:
                id_types.add(type(row.id))
            if progress:
                progress(1)
        out.append(fs)
    if len(id_types) > 1:
        raise UserError("ids mix strings and integers across the corpus", "make every id a string (or every id an integer)")
    return out, "int" if id_types == {int} else "str"
