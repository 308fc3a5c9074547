"""Video metadata CSVs (EVA's `robotwin_videos.csv`): reading, validation, filtering and splits.

Columns (spec eva.md F.2):
  required  video_path, caption, height, width, fps, n_frames
  optional  split ('training' / 'validation' / 'test'), trim_start, trim_end, prompt_embed_path,
            video_latent_path, clip_embed_path, gemini_caption / original_caption (caption
            fallbacks), has_bbox, crop_top / crop_bottom / crop_left / crop_right

Paths in the CSV are relative to the data root. Records are plain dicts with typed values.
Without a `split` column, the validation split is the last `int(n * test_percentage)` indices of
a `random.Random(0)` shuffle of the filtered records, exactly as the original, so a JAX run and a
PyTorch run on the same CSV hold out the same videos.
"""

from __future__ import annotations

import csv
import math
import os
import random
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from eva_jax.utils.files import atomic_path

REQUIRED_COLUMNS = ("video_path", "caption", "height", "width", "fps", "n_frames")
INT_COLUMNS = ("height", "width", "n_frames", "trim_start", "trim_end",
               "crop_top", "crop_bottom", "crop_left", "crop_right")
FLOAT_COLUMNS = ("fps",)
BOOL_COLUMNS = ("has_bbox",)
CAPTION_FALLBACKS = ("gemini_caption", "original_caption")
SPLITS = ("training", "validation", "test", "all")

# EVA's RoboTwin filter (configurations/dataset/robotwin.yaml); height/width are unrestricted.
DEFAULT_FILTERING = dict(n_frames=(0, 2000), fps=(0, 100), height=(0, 4096), width=(0, 4096))


# The smallest value each integer column may hold (the others: 0); a frame size or count of 0 or less, or
# an fps of 0, fails later as a negative frame index or an empty clip that names neither row nor column.
_INT_MINIMUM = {"height": 1, "width": 1, "n_frames": 1}


def _convert(value: str, column: str, where: str) -> Any:
  if column in INT_COLUMNS:
    lo = _INT_MINIMUM.get(column, 0)
    try:
      number = int(float(value))
    except (ValueError, OverflowError):  # "abc", "nan", "inf"
      raise ValueError(f"{where}: column {column!r} must be an integer, found {value!r}") from None
    if number < lo:
      raise ValueError(f"{where}: column {column!r} must be an integer >= {lo}, found {value!r}")
    return number
  if column in FLOAT_COLUMNS:
    try:
      number = float(value)
    except ValueError:
      raise ValueError(f"{where}: column {column!r} must be a number, found {value!r}") from None
    if not math.isfinite(number) or number <= 0:
      raise ValueError(f"{where}: column {column!r} must be a finite number > 0, found {value!r}")
    return number
  if column in BOOL_COLUMNS:
    return value.strip().lower() in ("1", "true", "yes")
  return value


def read_csv_rows(path: str | Path, what: str = "metadata CSV") -> tuple[list[str], list[dict[str, str]]]:
  """(columns, rows) of a CSV as raw strings ([] columns when it is empty); every open and decode error
  names the file and row."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{what} {path} does not exist")
  if not path.is_file():
    raise IsADirectoryError(f"{what} {path} is not a file")
  rows: list[dict[str, str]] = []
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      columns = list(reader.fieldnames or [])
      rows.extend(reader)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not a UTF-8 text CSV (row {len(rows)}): {e}") from None
  except csv.Error as e:  # NUL bytes, an unterminated quote at the end of the file
    raise ValueError(f"{path}: malformed CSV at row {len(rows)}: {e}") from None
  except PermissionError as e:
    raise PermissionError(f"{what} {path}: {e.strerror}") from None
  return columns, rows


def read_metadata(path: str | Path) -> list[dict[str, Any]]:
  """Rows of a metadata CSV as typed dicts; `row` holds the 0-based data row for error messages.

  Empty optional cells are dropped from the record (so `'trim_start' in record` means "given").
  Every error names the file, and the row and column where there is one.
  """
  path = Path(path)
  columns, rows = read_csv_rows(path)
  if not columns:
    raise ValueError(f"{path}: the metadata CSV is empty (expected a header row with {list(REQUIRED_COLUMNS)})")
  missing = [c for c in REQUIRED_COLUMNS if c not in columns]
  if missing:
    raise ValueError(f"{path}: missing required column(s) {missing}; found columns {columns}")
  return [_record(row, i, columns, f"{path} row {i} (video_path={row.get('video_path')!r})")
          for i, row in enumerate(rows)]


def _record(row: Mapping[str, Any], i: int, columns: Sequence[str], where: str) -> dict[str, Any]:
  rec: dict[str, Any] = {"row": i}
  for col, val in row.items():
    if col is None:
      raise ValueError(f"{where}: more cells than the {len(columns)} header columns")
    val = "" if val is None else val
    if val == "":
      if col in REQUIRED_COLUMNS and col != "caption":
        raise ValueError(f"{where}: required column {col!r} is empty")
      if col != "caption":
        continue
    rec[col] = _convert(val, col, where)
  for lo, hi in (("trim_start", "trim_end"), ("crop_top", "crop_bottom"), ("crop_left", "crop_right")):
    if lo in rec and hi in rec and rec[hi] <= rec[lo]:
      raise ValueError(f"{where}: column {hi!r} ({rec[hi]}) must be greater than {lo!r} ({rec[lo]})")
  if not rec.get("caption"):
    rec["caption"] = next((rec[c] for c in CAPTION_FALLBACKS if rec.get(c)), "")
  return rec


def write_metadata(path: str | Path, records: Iterable[Mapping[str, Any]],
                   columns: Sequence[str] | None = None) -> None:
  """Writes records as a CSV, atomically (a temporary file renamed over `path` once complete, so an
  interrupted run leaves the old CSV or none); columns default to the required ones then any others."""
  records = list(records)
  if columns is None:
    columns = list(REQUIRED_COLUMNS)
    for r in records:
      columns += [k for k in r if k not in columns and k != "row"]
  with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in records:
      writer.writerow({k: _format(r.get(k, "")) for k in columns})
    f.flush()
    os.fsync(f.fileno())


def _format(v: Any) -> Any:
  if isinstance(v, float) and v.is_integer():
    return int(v)
  return v


def source_frames(n_frames: int, fps: float, src_fps: float) -> int:
  """Source frames that cover a clip of `n_frames` at `fps` (original: round(n_frames / fps * src_fps))."""
  return round(n_frames / fps * src_fps)


def filter_records(records: Sequence[Mapping[str, Any]],
                   filtering: Mapping[str, Sequence[float] | None] | None = None) -> list[dict]:
  """Keeps records whose height, width, fps and (trimmed) frame count lie in the closed ranges."""
  filtering = dict(DEFAULT_FILTERING if filtering is None else filtering)
  kept = []
  for r in records:
    h = r["crop_bottom"] - r["crop_top"] if "crop_top" in r and "crop_bottom" in r else r["height"]
    w = r["crop_right"] - r["crop_left"] if "crop_left" in r and "crop_right" in r else r["width"]
    n = r["trim_end"] - r["trim_start"] if "trim_start" in r and "trim_end" in r else r["n_frames"]
    values = dict(height=h, width=w, fps=r["fps"], n_frames=n)
    if all(rng is None or rng[0] <= values[k] <= rng[1] for k, rng in filtering.items()):
      kept.append(dict(r))
  return kept


def split_records(records: Sequence[Mapping[str, Any]], split: str,
                  test_percentage: float = 0.01) -> list[dict]:
  """The records of one split: by the `split` column when present, else the original's seeded shuffle."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  records = [dict(r) for r in records]
  if split == "all" or not records:
    return records
  if any("split" in r for r in records):
    return [r for r in records if r.get("split") == split]
  order = list(range(len(records)))
  random.Random(0).shuffle(order)
  num_test = int(len(records) * test_percentage)
  if split == "training":
    chosen = order[:-num_test] if num_test > 0 else order
  else:
    chosen = order[-num_test:] if num_test > 0 else []
  return [records[i] for i in chosen]


def load_records(data_root: str | Path, metadata_path: str | Path, split: str = "training",
                 test_percentage: float = 0.01, filtering=None,
                 require: Sequence[str] = ()) -> list[dict]:
  """read -> filter -> split; `require` names optional columns every kept record must have.

  `metadata_path` is relative to `data_root` unless absolute. Raises when nothing is left, so an
  empty split fails at start-up rather than as a stalled data loader.
  """
  path = Path(data_root) / metadata_path
  records = read_metadata(path)
  n_read = len(records)
  records = split_records(filter_records(records, filtering), split, test_percentage)
  for r in records:
    absent = [c for c in require if c not in r]
    if absent:
      raise ValueError(f"{path} row {r['row']} (video_path={r['video_path']!r}): missing "
                       f"{absent}; run scripts/cache_embeddings.py to fill these columns")
  if not records:
    raise ValueError(f"{path}: no records left for split {split!r} ({n_read} read); check "
                     "test_percentage, the `split` column or the filtering ranges")
  return records
