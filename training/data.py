"""Fine-tuning data: JSON lines or parquet with the columns query, positive and optionally negatives.

Everything is checked before any training starts: a missing column, an empty or non-string text,
negatives that are not a list of texts, a file without rows. Each refusal names the file, the row
and what to do.
"""

import json
import random
from pathlib import Path
from typing import List, Optional, Tuple

from nomic_moe_files.errors import UserError


def _read_rows(path: Path) -> List[Tuple[int, dict]]:
    if not path.is_file():
        raise UserError(f"{path}: no such file", "pass a .jsonl or .parquet file with the columns query, positive[, negatives]")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(str(path))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:160]})", "write it again") from None
        return list(enumerate(table.to_pylist(), 1))
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise UserError(f"{path}: unknown format {path.suffix!r}", "use JSON lines (.jsonl) or parquet")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: invalid JSON ({e.msg})", "fix the line; every line is one JSON object") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{number}: a JSON {type(obj).__name__}, not an object", "every line is one JSON object")
            rows.append((number, obj))
    return rows


def load_pairs(path, name: str = "TRAIN") -> List[dict]:
    """[{query, positive, negatives?}] from ``path``, every row checked."""
    path = Path(path).expanduser()
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"{path}: {name} has no rows", "give it one (query, positive) pair per row")
    out = []
    n_neg = None
    for number, row in rows:
        where = f"{path}:{number}"
        for col in ("query", "positive"):
            if col not in row:
                raise UserError(f"{where}: no column {col!r} (found {', '.join(sorted(row)) or 'nothing'})",
                                "each row needs query and positive (and optionally negatives, a list)")
            if not isinstance(row[col], str) or not row[col].strip():
                raise UserError(f"{where}: {col} is {'empty' if isinstance(row[col], str) else type(row[col]).__name__}",
                                "every query and positive must be a non-empty string")
        pair = {"query": row["query"], "positive": row["positive"]}
        negs = row.get("negatives")
        if negs is not None:
            if not isinstance(negs, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in negs):
                raise UserError(f"{where}: negatives must be a list of non-empty strings", "fix the row, or drop the column")
            if n_neg is None:
                n_neg = len(negs)
            elif len(negs) != n_neg:
                raise UserError(f"{where}: {len(negs)} negatives where earlier rows have {n_neg}",
                                "give every row the same number of negatives, or drop them and mine with --hard-negatives")
            pair["negatives"] = list(negs)
        elif n_neg:
            raise UserError(f"{where}: no negatives where earlier rows have {n_neg}", "give every row negatives, or none")
        out.append(pair)
    return out


def split_held_out(pairs: List[dict], fraction: float = 0.1, limit: int = 1000, seed: int = 0):
    """(train, held out) when no EVAL file is given: a seeded slice of TRAIN, whole queries only."""
    if len(pairs) < 10:
        raise UserError(f"TRAIN has {len(pairs)} rows, too few to hold some out for evaluation", "pass --eval EVAL, or more rows")
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    n = max(1, min(limit, int(len(pairs) * fraction)))
    held = set(idx[:n])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def to_dataset(pairs: List[dict]):
    """A datasets.Dataset with the columns sentence-transformers' ranking losses read in order:
    query, positive, negative_1..negative_k."""
    from datasets import Dataset

    columns = {"query": [p["query"] for p in pairs], "positive": [p["positive"] for p in pairs]}
    k = len(pairs[0].get("negatives", []))
    for j in range(k):
        columns[f"negative_{j + 1}"] = [p["negatives"][j] for p in pairs]
    return Dataset.from_dict(columns)


def retrieval_task(pairs: List[dict]):
    """(queries, corpus, relevant) for InformationRetrievalEvaluator: each distinct positive (and
    negative) text is one document; a query's relevant documents are its positives."""
    doc_ids, queries, relevant = {}, {}, {}

    def doc(text: str) -> str:
        return doc_ids.setdefault(text, f"d{len(doc_ids)}")

    query_ids = {}
    for p in pairs:
        qid = query_ids.setdefault(p["query"], f"q{len(query_ids)}")
        queries[qid] = p["query"]
        relevant.setdefault(qid, set()).add(doc(p["positive"]))
        for n in p.get("negatives", []):
            doc(n)
    corpus = {i: t for t, i in doc_ids.items()}
    return queries, corpus, relevant


def matryoshka_dims(text: Optional[str], hidden: int) -> List[int]:
    if not text:
        return [hidden] + ([256] if hidden > 256 else [])
    try:
        dims = sorted({int(d) for d in text.split(",")}, reverse=True)
    except ValueError:
        raise UserError(f"--matryoshka {text!r}", "give dimensions separated by commas, e.g. 768,256") from None
    bad = [d for d in dims if not 1 <= d <= hidden]
    if bad:
        raise UserError(f"--matryoshka {text}: {bad} outside 1..{hidden}", f"use dimensions up to {hidden}, e.g. {hidden},256")
    return dims
