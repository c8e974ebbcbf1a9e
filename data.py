"""
Data: read rows (local files, save_to_disk folders, hub ids, blends of those), tokenize them
for SFT/KD and DPO with the prompt masked, collate them (optionally packed), and stream them
to the ranks of a data-parallel run.

Conventions used everywhere below:
- every row keeps its original fields plus "_id": its row index in its source (int), or
  "<source>:<row index>" (str) in a blend. Ids are given before any holdout, sampling or
  filtering, so they always point back to the original row (the selector keys its logits by them).
- labels are already shifted: labels[t] is the target of position t, i.e. input_ids[t+1] when
  token t+1 is a response token, else -100. Prompt tokens and padding never count.
- attention_mask holds segment ids: 0 = padding, 1, 2, ... = the document within the row. The
  model attends causally within a segment only, so packed documents never see each other.
- an example's token fields (input_ids, labels, chosen_ids, ...) are sequences of ints: numpy
  views of datasets' memory-mapped tokenized cache for rows read through Arrow (no python object
  per token), python lists for rows given as python dicts. The collators take either.
"""
import contextlib
import functools
import json
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F

from errors import ConfigError  # a bad row or file: one line naming it, no traceback
from model import needs_mask

FILE_EXTS = (".json", ".jsonl", ".parquet", ".csv")

# -----------------------------------------------------------------------------
# reading rows

def _decode(path, raw):
    # the text of a file, or an error naming the file, line and byte that are not UTF-8
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); "
                          f"re-encode the file as UTF-8") from None

def _read_jsonl(path, text):
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}, line {lineno}: expected a JSON object, found {type(row).__name__}")
        rows.append(row)
    return rows

def _read_json(path):
    # a .json file is either one list of objects or json lines under another name
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    if not text.lstrip().startswith("["):
        return _read_jsonl(path, text)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}, line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path}: expected a list of JSON objects")
    return rows

def _is_dataset(eval_split):
    # an eval_split naming a dataset of its own (a path or a hub id) rather than a split name
    first = eval_split.split(",")[0].strip()
    return "/" in first or os.sep in first or first.lower().endswith(FILE_EXTS)

# -----------------------------------------------------------------------------
# data identity: datasets knows a local file by its path and mtime, which cp -p, rsync -a, tar x
# and coarse-mtime filesystems keep across a change of content. Everything cached from a local
# source here (its Arrow conversion, its tokenized rows) is keyed on its bytes instead.

def cache_root():
    """where the caches of this module go: under datasets' cache (HF_DATASETS_CACHE), never beside
    the data, so a read-only data folder works."""
    import datasets
    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "bipost")

def _hash_file(path):
    # sha256 of a file's bytes in 1 MiB blocks (sha256: hashlib's fastest where the CPU has SHA instructions)
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()

def file_digest(path):
    """"<size>-<sha256>" of a file. Hashed once: a memo under cache_root() keeps the digest while the
    file's size, mtime, ctime, inode and device are those it was hashed at. ctime cannot be set
    back, so a rewrite in place whose mtime was restored is hashed again."""
    import hashlib
    st = os.stat(path)
    # taken before reading: a write while it is hashed leaves a stale stamp, so the next read hashes again
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    name = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
    memo = os.path.join(cache_root(), "digests", f"{name}.json")
    try:
        with open(memo) as f:
            m = json.load(f)
        if m["stamp"] == stamp:
            return m["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = f"{st.st_size}-{_hash_file(path)}"
    try:  # written whole then renamed: another rank or run reads the old memo or the new one
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        tmp = f"{memo}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"path": os.path.realpath(path), "stamp": stamp, "digest": digest}, f)
        os.replace(tmp, memo)
    except OSError:
        pass  # no memo: hashed again next time
    return digest

def _content_key(paths, root):
    """sha256 of the names (relative to root) and digests of local files: the key of a file, of a
    folder of data files or of a save_to_disk folder changes when any of its files does."""
    import hashlib
    named = [[os.path.relpath(p, root), file_digest(p)] for p in paths]
    return hashlib.sha256(json.dumps(named).encode()).hexdigest()[:32]

def _folder_files(folder):
    # the files of a local folder of data files, hidden ones left out as datasets leaves them out
    out = []
    for d, dirs, files in os.walk(folder):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.join(d, f) for f in sorted(files) if not f.startswith(".")]
    return out

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

def _split_files(folder, split):
    """the data files of a local folder that datasets reads as `split` (its file-name patterns:
    train.jsonl / test.jsonl, data/train-0.parquet, ...; every data file when none names a split)."""
    from datasets.data_files import DataFilesDict, get_data_patterns
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(folder), base_path=folder).get(split) or []
    except Exception:  # no data files: load_dataset says so
        return []
    return sorted(str(f) for f in files)

def _one_format(folder, split, files):
    """a folder's files of one split in one format: datasets reads only its most common format and
    leaves the other files out without a word. Mixed formats are refused, naming the files, rather
    than read together: a CSV file has no types, so its values would not mean what the JSON's do."""
    fmts = {}
    for f in files:
        if os.path.splitext(f)[1].lower() in FORMATS:
            fmts.setdefault(FORMATS[os.path.splitext(f)[1].lower()], []).append(os.path.relpath(f, folder))
    if len(fmts) > 1:
        listed = "; ".join(f"{fmt}: {', '.join(fs)}" for fmt, fs in fmts.items())
        raise ConfigError(f"{folder}: its {split!r} data files are of {len(fmts)} formats ({listed}), and a folder is "
                          f"read in one format; convert them to one format, or move the others out")

def _column_types(src):
    # {column: type} of a source read alone; a python list (types mixed within the file): keys only
    if isinstance(src, list):
        return {k: "mixed" for r in src for k in r}
    return {k: v.dtype if hasattr(v, "dtype") else str(v) for k, v in src.features.items()}

def _columns_differ(folder, files):
    """why datasets could not read a folder's files as one table, naming them: their columns, or a
    column's types, differ between files (each file read alone, into its own cache). None when
    they agree."""
    cols = {os.path.relpath(f, folder): _column_types(_read_source(f, "train")) for f in files}
    def named(fs):  # a few file names of a group
        return ", ".join(fs[:3]) + (f" and {len(fs) - 3} more" if len(fs) > 3 else "")
    groups = {}
    for f, c in cols.items():
        groups.setdefault(tuple(sorted(c)), []).append(f)
    if len(groups) > 1:
        return "their columns differ: " + "; ".join(f"{named(fs)} {'have' if len(fs) > 1 else 'has'} {', '.join(c)}"
                                                      for c, fs in groups.items())
    for k in next(iter(cols.values()), {}):
        types = {}
        for f, c in cols.items():
            types.setdefault(c[k], []).append(f)
        if len(types) > 1 and "mixed" not in types:
            return f"column {k!r} has other types in other files: " + ", ".join(f"{t} in {named(fs)}"
                                                                                  for t, fs in types.items())
    return None

def _keyed(ds, key):
    """ds with a fingerprint that also holds key: the fingerprints of its selections and maps,
    and so the tokenized cache (_map_part), follow the content."""
    from datasets.fingerprint import Hasher
    ds._fingerprint = Hasher.hash([ds._fingerprint, key])
    return ds

def _read_source(name, split):
    """One source, unread: a datasets.Dataset (Arrow, memory-mapped, so no row is in Python yet) of a
    local file, a save_to_disk folder or a hub id; a list of dicts only for a .json/.jsonl file
    that pyarrow cannot read (mixed types), or an error naming the file, line and column. A local
    file or folder of files is converted into a cache folder keyed on its content (_content_key)."""
    ext = os.path.splitext(name)[1].lower()
    is_disk = os.path.isdir(name) and any(
        os.path.exists(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")
    )
    if ext in FILE_EXTS and not os.path.isfile(name):
        raise ConfigError(f"{name}: no such file")
    if (ext in FILE_EXTS or os.path.exists(os.path.join(name, "state.json"))) and split != "train":
        raise ConfigError(f"{name}: a single file or Dataset has only the 'train' split, not {split!r} "
                         f"(name the eval set as a file or folder of its own: eval_split=PATH)")
    import datasets
    key = None  # a file, or a folder of data files: keyed before datasets converts it
    if os.path.isfile(name):
        key = _content_key([name], os.path.dirname(os.path.abspath(name)))
    elif os.path.isdir(name) and not is_disk:
        key = _content_key(_folder_files(name), name)
    cache_dir = os.path.join(cache_root(), "sources", key) if key else None
    files = _split_files(name, split) if os.path.isdir(name) and not is_disk else []  # a folder of data files
    _one_format(name, split, files)
    if ext in (".json", ".jsonl"):
        try:
            return _keyed(datasets.Dataset.from_json(name, cache_dir=cache_dir), key)
        except Exception:  # the python reader says what is wrong, or reads what arrow cannot type
            return _read_json(name)
    try:
        if ext == ".parquet":
            ds = datasets.Dataset.from_parquet(name, cache_dir=cache_dir)
        elif ext == ".csv":
            ds = datasets.Dataset.from_csv(name, cache_dir=cache_dir)
        elif is_disk:
            ds = datasets.load_from_disk(name)
        else:  # a hub id (known by its revision), or a folder of data files
            ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as e:
        differ = _columns_differ(name, files) if len(files) > 1 else None
        if differ:
            raise ConfigError(f"{name}: its {split!r} files cannot be read as one dataset: {differ}; give every file "
                              f"the same columns, of the same types") from e
        where = "" if ext or os.path.exists(name) else " (not a local file or folder, so tried the hub)"
        raise ConfigError(f"{name}: could not load split {split!r}{where}: {type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{name}: no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    if is_disk:  # its fingerprint is state.json's, which a replaced data file keeps: add the files' bytes
        key = _content_key([f["filename"] for f in ds.cache_files], name)
    return _keyed(ds, key) if key else ds

def _read_all(spec, split):
    """[(name, source)] for each comma-separated source of spec, none of them empty."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"no dataset given (spec {spec!r})")
    sources = []
    for n in names:
        src = _read_source(n, split)
        if len(src) == 0:
            raise ConfigError(f"{n}: the dataset is empty (split {split!r} has 0 rows)")
        sources.append((n, src))
    return sources

def blend_probs(probs, n, what="probs"):
    """the n proportions of a blend's probs ("0.7,0.3"): n numbers, finite, >= 0, of positive sum;
    else an error starting with what (the argument or config key)."""
    try:
        p = [float(x) for x in probs.split(",")]
    except ValueError:
        raise ConfigError(f"{what}: {probs!r} is not a comma-separated list of numbers") from None
    if len(p) != n:
        raise ConfigError(
            f"{what}: {probs!r} gives {len(p)} proportions for {n} source{'s' * (n != 1)} (one per source)"
        )
    bad = [x for x in p if not math.isfinite(x) or x < 0]
    if bad:
        raise ConfigError(f"{what}: {probs!r} holds {bad[0]}; proportions are finite numbers >= 0")
    if not 0 < sum(p) < math.inf:
        raise ConfigError(f"{what}: {probs!r} sums to {sum(p)}; give at least one source a positive proportion")
    return p

def check_blend(spec, probs, spec_key, probs_key, unique=False, own_probs=False):
    """a blend's keys, before anything is read: probs as blend_probs says, for a blend of several
    sources (a single source ignores them, unless own_probs: they were set for it alone); unique:
    no source listed twice, under any spelling of its path (the rows of both would carry the same ids)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if probs and (len(names) > 1 or own_probs):
        blend_probs(probs, len(names), f"config key {probs_key}")
    if unique:
        seen = {}
        for n in names:
            where = os.path.realpath(n) if os.path.exists(n) else n
            if where in seen:
                also = f" (also as {seen[where]})" if seen[where] != n else ""
                raise ConfigError(f"config key {spec_key}: {n} is listed twice in the blend{also}; method=select keeps "
                                  f"one weight per row id: list each source once")
            seen[where] = n

def _ids(name, idx, blend):
    # a row's id: its index in the source, "<source>:<index>" in a blend
    return [f"{name}:{i}" for i in idx] if blend else list(idx)

def _not_utf8(name):
    # pyarrow keeps invalid bytes; they fail only when a row is read
    if name.lower().endswith((".json", ".jsonl")):
        _read_json(name)  # raises the error naming the line, column and byte
    return ConfigError(f"{name}: a selected row is not UTF-8; re-encode the file as UTF-8")

def _clean(row, id_):
    # Arrow gives every row every column; a key a row lacks (None) is left out, as in the file
    return {**{k: v for k, v in row.items() if v is not None}, "_id": id_}

def _take(name, src, idx, ids):
    # rows idx of a source as dicts with their "_id": the only rows that become python objects
    try:
        rows = [src[i] for i in idx] if isinstance(src, list) else src.select(idx).to_list()
    except UnicodeDecodeError:
        raise _not_utf8(name) from None
    return [_clean(r, i) for r, i in zip(rows, ids)]

class Rows:
    """Rows of sources not read into python yet: parts [(name, source, indices, ids)]. len() reads
    nothing; iterating reads the rows (dicts with "_id", in order). tokenize_sft / tokenize_dpo
    tokenize the Arrow parts with datasets' map (cached on disk, in worker processes)."""

    def __init__(self, parts):
        self.parts = parts

    def __len__(self):
        return sum(len(idx) for _, _, idx, _ in self.parts)

    def __iter__(self):
        for name, src, idx, ids in self.parts:
            yield from _take(name, src, idx, ids)

    def first(self):
        """the first row, or None: reads that row alone."""
        for name, src, idx, ids in self.parts:
            if len(idx):
                return _take(name, src, idx[:1], ids[:1])[0]
        return None

def _held(n, k):
    # k of a source's n row indices, spread evenly over it and independent of the seed,
    # so every run and every method is evaluated on the same rows
    return sorted({int((j + 0.5) * n / k) for j in range(k)})

def _skip(positions, held):
    # source indices of sorted positions counted among the rows that are not held out
    out, j = [], 0
    for p in positions:
        while j < len(held) and held[j] <= p + j:
            j += 1
        out.append(p + j)
    return out

def _sample(n, c, rng):
    # c positions of n rows: whole passes, then a random subset (kept in order)
    full, rest = divmod(c, n)
    return list(range(n)) * full + sorted(rng.sample(range(n), rest))

def _plan(sources, max_samples, probs, seed, eval_frac, eval_max_samples):
    """[(train indices, held-out indices)] per source, on indices only. A source asked for c rows
    (max_samples, or its share of a blend) holds out round(eval_frac * min(c, n)) of its n rows
    (at least one; eval_max_samples > 0 caps the total, shared in proportion), spread evenly over
    it; its training rows are then drawn from the others."""
    rng = random.Random(seed)
    sizes = [len(src) for _, src in sources]
    if len(sources) == 1:
        counts = [max_samples if 0 < max_samples < sizes[0] else sizes[0]]
    else:
        p = blend_probs(probs, len(sources)) if probs else [1.0] * len(sources)
        total = max_samples or sum(sizes)
        exact = [total * x / sum(p) for x in p]
        counts = [int(x) for x in exact]
        for i in sorted(range(len(p)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
            counts[i] += 1  # largest remainders, so the counts add up to total
    ks = [max(1, round(min(c, n) * eval_frac)) if eval_frac > 0 else 0 for c, n in zip(counts, sizes)]
    if eval_max_samples > 0 and sum(ks) > eval_max_samples:
        ks = [max(1, round(k * eval_max_samples / sum(ks))) for k in ks]
    plan = []
    for n, c, k in zip(sizes, counts, ks):
        if k >= n:
            raise ConfigError(f"eval_frac={eval_frac} would hold out {k} of {n} rows, leaving nothing to train on")
        held = _held(n, k) if k else []
        pos = _sample(n - k, c, rng) if len(sources) > 1 or c < n - k else range(n - k)
        uniq = sorted(set(pos))
        where = dict(zip(uniq, _skip(uniq, held)))
        plan.append(([where[q] for q in pos], held))
    return plan

@contextlib.contextmanager
def rank0_first(enabled=True):
    """Rank 0 reads first (datasets converts files to Arrow and caches them), then the other ranks
    read its cache rather than converting the same files at once. Needs the cache on a shared
    filesystem to save work across nodes (else each node converts its own). enabled=False: every
    rank at once (a stream has no cache to share)."""
    dist = torch.distributed
    on = enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if on and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:  # rank 0 failing lets the others go on to fail with the same message
        if on and dist.get_rank() == 0:
            dist.barrier()

def data_digest(o):
    """sha256 of an objective's row ids and token lengths (train and eval)."""
    import hashlib
    n = lambda e: [len(e[k]) for k in ("input_ids", "chosen_ids", "rejected_ids") if k in e]
    return hashlib.sha256(json.dumps([[e["id"], n(e)] for e in o.train + o.eval]).encode()).hexdigest()

def check_same_data(objectives, world_size):
    """every rank read the same rows: a node-local file or path that differs between ranks would
    train on a mix, or hang."""
    for o in objectives:
        digests = [None] * world_size
        torch.distributed.all_gather_object(digests, data_digest(o))
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise ConfigError(f"objective {o.i} (dataset_{o.i}): rank(s) {bad} read other rows than rank 0 "
                              f"(ids or token lengths differ); every rank must see the same data")

def load_rows(spec, split="train", max_samples=0, probs="", seed=42, eval_split="", eval_frac=0.0, eval_max_samples=0):
    """Training rows of spec: a .json/.jsonl/.parquet/.csv file, a save_to_disk folder, a hub id,
    or a comma-separated blend of those. Sources are read as Arrow datasets and sampled on indices:
    only the rows returned become python objects.
    - one source: every row of `split` in file order; max_samples > 0 keeps a random subset of
      that many rows (seeded, kept in file order). Ids are row indices (int).
    - a blend: the blend has max_samples rows (0: the sum of the sources' sizes), shared out by
      probs ("0.7,0.3", normalized; default equal). A source asked for more rows than it has is
      repeated (whole passes plus a random subset), fewer gives a random subset. Ids are
      "<source>:<row index>". Rows are concatenated source by source; the Loader shuffles.
    - eval_frac > 0 and no eval_split: the held-out slice of load_splits is left out first, so
      training never takes an eval row."""
    return load_splits(spec, split, eval_split, max_samples, probs, seed, eval_frac, eval_max_samples, _eval=False)[0]

def load_streaming(spec, split="train", max_samples=0, seed=42, eval_frac=0.0, eval_max_samples=0, buffer_size=10_000,
                   _train=True):
    """(train_rows, eval_rows) of one source read as a stream (datasets' streaming mode: nothing is
    downloaded or converted beyond the rows read), for sets too large for the disk. The eval rows
    are the first k = round(eval_frac * max_samples) rows of the stream (at least one; capped by
    eval_max_samples); the training rows are max_samples rows of the rest, drawn through a seeded
    shuffle buffer of buffer_size rows. Ids are row positions in the stream, as for files."""
    import datasets
    if "," in spec:
        raise ConfigError(f"streaming reads one source, got the blend {spec!r}")
    if max_samples <= 0:
        raise ConfigError("streaming needs max_samples > 0 (a stream has no length to take a share of)")
    ext = os.path.splitext(spec)[1].lower()
    if ext in FILE_EXTS:
        if not os.path.isfile(spec):
            raise ConfigError(f"{spec}: no such file")
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}[ext]
        ds = datasets.load_dataset(kind, data_files=spec, split=split, streaming=True)
    else:
        if os.path.isdir(spec):  # a folder of data files: read in one format, as when not streamed
            _one_format(spec, split, _split_files(spec, split))
        ds = datasets.load_dataset(spec, split=split, streaming=True)
    ds = ds.map(lambda r, i: {"_id": i}, with_indices=True)
    k = max(1, round(eval_frac * max_samples)) if eval_frac > 0 else 0
    if eval_max_samples > 0:
        k = min(k, eval_max_samples)
    clean = lambda rows: [{key: v for key, v in r.items() if v is not None} for r in rows]
    held = clean(ds.take(k)) if k else []
    if not _train:  # the held-out rows alone (generate.py): the stream is read no further
        return [], held
    train = clean(ds.skip(k).shuffle(seed=seed, buffer_size=buffer_size).take(max_samples))
    if len(train) < max_samples:
        raise ConfigError(
            f"{spec}: the stream has {len(train) + k} rows, fewer than max_samples={max_samples} + {k} held out"
        )
    return train, held

def objective_splits(c, seed, eval_frac, streaming, lazy=False, _train=True):
    """(train_rows, eval_rows) of one objective's keys c (dataset, train_split, eval_split,
    max_samples, dataset_probs, eval_max_samples) as train.py reads them, a stream (load_streaming,
    an eval_split file read whole, capped at its first eval_max_samples rows) or not (load_splits);
    generate.py --objective=i reads the same held-out rows through it."""
    if not streaming:
        return load_splits(c.dataset, c.train_split, c.eval_split, c.max_samples, c.dataset_probs, seed, eval_frac,
                           c.eval_max_samples, lazy=lazy)
    rows, held = load_streaming(c.dataset, c.train_split, c.max_samples, seed, 0.0 if c.eval_split else eval_frac,
                                c.eval_max_samples, _train=_train)
    if c.eval_split:  # a file of its own
        held = load_rows(c.eval_split)[: c.eval_max_samples or None]
    return rows, held

def load_splits(spec, train_split="train", eval_split="", max_samples=0, probs="", seed=42, eval_frac=0.0,
                eval_max_samples=0, _eval=True, lazy=False):
    """(train_rows, eval_rows). The eval rows are, in order of precedence:
    - eval_split naming a dataset of its own (it contains a "/" or ends in .json/.jsonl/.parquet/
      .csv: a file, "./folder", a hub id, or a comma list of them): its rows, with its own ids;
    - any other eval_split is a split name: that split of every source (ids as for training);
    - eval_frac > 0: a held-out slice of every source, eval_frac of the rows training uses from
      it (max_samples or its share of a blend; at least one row), spread evenly over the source;
    - otherwise none. eval_max_samples > 0 caps the eval rows (evenly spread); they are never
      resampled or repeated.
    lazy=True: each is a Rows (nothing read yet; tokenize_* maps it with datasets), else a list."""
    sources = _read_all(spec, train_split)
    blend = len(sources) > 1
    plan = _plan(sources, max_samples, probs, seed, 0.0 if eval_split else eval_frac, eval_max_samples)
    def rows(parts, blend):  # [(name, source, indices)] -> a Rows (lazy) or its rows as a list
        r = Rows([(n, src, idx, _ids(n, idx, blend)) for n, src, idx in parts])
        return r if lazy else list(r)
    train = rows([(n, src, idx) for (n, src), (idx, _) in zip(sources, plan)], blend)
    if not _eval:
        return train, []
    if eval_split and _is_dataset(eval_split):
        held = _read_all(eval_split, "train")
        blend = len(held) > 1
    elif eval_split:
        held = _read_all(spec, eval_split)
    else:
        return train, rows([(n, src, idx) for (n, src), (_, idx) in zip(sources, plan)], blend)
    total = sum(len(src) for _, src in held)  # a given eval set: capped evenly, source by source
    ks = [len(src) if not 0 < eval_max_samples < total else max(1, round(len(src) * eval_max_samples / total))
          for _, src in held]
    return train, rows([(n, src, _held(len(src), k)) for (n, src), k in zip(held, ks)], blend)

# -----------------------------------------------------------------------------
# tokenizing

def _where(source, row, i):
    return f"{source or 'data'} row {row.get('_id', i)}"

def _keys(row):
    return [k for k in row if k != "_id"]

def _field(row, key, where):
    if key not in row:
        raise ConfigError(f"{where}: missing key {key!r} (keys present: {_keys(row)})")
    if not isinstance(row[key], str):
        raise ConfigError(f"{where}: field {key!r} must be a string, found {type(row[key]).__name__}")
    return row[key]

def _prompt_text(row, key, where):
    # a prompt field: a string with text in it (an empty prompt trains an answer to nothing)
    text = _field(row, key, where)
    if not text.strip():
        raise ConfigError(f"{where}: field {key!r}{'' if key == 'prompt' else ' (the prompt)'} is "
                          f"{'only whitespace' if text else 'empty'}; fix or remove the row")
    return text

def _messages(messages, where, key):
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise ConfigError(
            f"{where}: field {key!r} must be a non-empty list of {{'role': str, 'content': str}} messages"
        )
    return messages

def _chat_parts(tokenizer, prompt, completion, where, key, prompt_of=""):
    """(prompt, response) texts of a conversation given as prompt messages and completion messages:
    the prompt rendered with the generation prompt, the response what the full rendering adds
    after it. The completion starts and ends with the assistant's message; the prompt (prompt_of
    names where it comes from) has a message with text."""
    if not any(m["content"].strip() for m in prompt):
        raise ConfigError(f"{where}: the prompt ({prompt_of or f'the messages of {key!r} before the answer'}) has no "
                          f"message with text; fix or remove the row")
    for m in (completion[0], completion[-1]):
        if m["role"] != "assistant":
            raise ConfigError(f"{where}: the answer in {key!r} must start and end with the assistant's message, "
                              f"found role {m['role']!r}")
    if not tokenizer.chat_template:
        raise ConfigError(f"{where}: chat messages need a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(text):
        raise ConfigError(f"{where}: the chat template does not render {key!r} as prompt + response, "
                          f"so the prompt cannot be masked")
    response = full[len(text):]
    if tokenizer.eos_token and response.rstrip().endswith(tokenizer.eos_token):
        response = response.rstrip()  # chatml's newline after the closing eos: _encode would add a second eos
    return text, response

def _chat(tokenizer, messages, where, key):
    # (prompt, response) texts of a conversation whose last message is the answer
    messages = _messages(messages, where, key)
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the last message of {key!r} must be the assistant's, "
                         f"found role {messages[-1]['role']!r}")
    return _chat_parts(tokenizer, messages[:-1], messages[-1:], where, key)

def _prompt(tokenizer, text, template, apply_chat_template, system=""):
    if apply_chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if "{}" not in template:
        raise ConfigError(f"template {template!r} has no '{{}}' for the prompt text")
    return (system + "\n" if system else "") + template.replace("{}", text, 1)

def _encode(tokenizer, prompts, responses):
    # prompts get the bos a tokenizer adds by default (llama), once; responses end with eos
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token")
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    bos = [bos] if bos is not None and tokenizer("")["input_ids"][:1] == [bos] else []
    P = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    R = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    P = [bos + list(p) if bos and list(p[:1]) != bos else list(p) for p in P]
    R = [list(r) if list(r[-1:]) == [eos] else list(r) + [eos] for r in R]
    return P, R

def _example(prompt_ids, response_ids, max_len):
    # (input_ids, labels, truncated), or None when not one response token fits in max_len
    ids = (prompt_ids + response_ids)[: max_len or None]
    labels = [ids[t + 1] if t + 1 >= len(prompt_ids) else -100 for t in range(len(ids) - 1)] + [-100]
    if all(x == -100 for x in labels):
        return None
    return ids, labels, len(ids) < len(prompt_ids) + len(response_ids)

def _report(source, n_rows, n_kept, truncated, max_len, prompt_lens, verbose):
    name = source or "data"
    if n_kept == 0 and n_rows > 0:
        raise ConfigError(f"{name}: no examples left: all {n_rows} rows have a prompt that leaves no room for a "
                          f"response token under max_len={max_len} (shortest prompt: {min(prompt_lens)} tokens)")
    if verbose and n_rows > 0:
        print(f"{name}: {n_kept} examples from {n_rows} rows, {n_rows - n_kept} dropped (prompt too long "
              f"for max_len={max_len}), {truncated} truncated")

def _sft_texts(tokenizer, row, where, input_key, output_key, template, apply_chat_template, system_key):
    # (prompt, response) texts of one SFT row
    if "messages" in row and input_key not in row:
        return _chat(tokenizer, row["messages"], where, "messages")
    if isinstance(row.get(input_key), list) and isinstance(row.get(output_key), list):  # prompt and answer as messages
        return _chat_parts(tokenizer, _messages(row[input_key], where, input_key),
                           _messages(row[output_key], where, output_key), where, f"{input_key} + {output_key}",
                           f"field {input_key!r}")
    system = _field(row, system_key, where) if system_key else ""
    return (_prompt(tokenizer, _prompt_text(row, input_key, where), template, apply_chat_template, system),
            _field(row, output_key, where))

def _dpo_texts(tokenizer, row, where, prompt_key, chosen_key, rejected_key, template, apply_chat_template):
    # (prompt, chosen, rejected) texts of one preference row
    for key in (chosen_key, rejected_key):
        if key not in row:
            _field(row, key, where)  # raises, naming the key
    chosen, rejected = row[chosen_key], row[rejected_key]
    if isinstance(chosen, list) or isinstance(rejected, list) or isinstance(row.get(prompt_key), list):  # messages
        both = f"{chosen_key!r} and {rejected_key!r}"
        chosen, rejected = _messages(chosen, where, chosen_key), _messages(rejected, where, rejected_key)
        if isinstance(row.get(prompt_key), list):  # the prompt's messages, then each answer's
            prompt, prompt_of = _messages(row[prompt_key], where, prompt_key), f"field {prompt_key!r}"
        else:  # whole conversations: the prompt is the messages they share (a string prompt beside them is not used)
            k = next((j for j, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
            if k == 0:
                raise ConfigError(f"{where}: {both} are whole conversations that share no first message (the prompt); "
                                  f"fix or remove the row")
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
            prompt_of = f"the messages {both} share"
            if not chosen or not rejected:
                raise ConfigError(f"{where}: {chosen_key if not chosen else rejected_key!r} has no message after those "
                                  f"{both} share: no answer to compare; fix or remove the row")
        p, c = _chat_parts(tokenizer, prompt, chosen, where, chosen_key, prompt_of)
        _, r = _chat_parts(tokenizer, prompt, rejected, where, rejected_key, prompt_of)
    elif prompt_key in row:
        p = _prompt(tokenizer, _prompt_text(row, prompt_key, where), template, apply_chat_template)
        c, r = _field(row, chosen_key, where), _field(row, rejected_key, where)
    else:
        c, r = _field(row, chosen_key, where), _field(row, rejected_key, where)
        k = os.path.commonprefix([c, r]).rfind("Assistant:")
        if k < 0:
            raise ConfigError(f"{where}: missing key {prompt_key!r} (keys present: {_keys(row)}), and "
                             f"{chosen_key!r}/{rejected_key!r} share no prefix ending in 'Assistant:' (hh-rlhf format)")
        k += len("Assistant:")
        p, c, r = c[:k], c[k:], r[k:]
    if c == r:  # the pair teaches nothing: its DPO loss stays ln 2 and its gradient 0
        raise ConfigError(f"{where}: {chosen_key!r} and {rejected_key!r} are the same response; fix or remove the row")
    return p, c, r

SFT_FIELDS, DPO_FIELDS = ("input_ids", "labels"), ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
FLOAT_FIELDS = ("weight",)  # per-row numbers kept as one-element sequences beside the token fields

def _weight(row, key, where):
    """a row's weight (weight_key): a finite number >= 0."""
    if key not in row:
        raise ConfigError(
            f"{where}: missing key {key!r} (the row weight named by weight_key; keys present: {_keys(row)})"
        )
    w = row[key]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ConfigError(f"{where}: field {key!r} (the row weight) must be a finite number >= 0, found {w!r}")
    return [float(w)]

def _label(row, key, where):
    """a KTO row's label (label_key): true = a desirable completion, false = an undesirable one."""
    if key not in row:
        raise ConfigError(f"{where}: missing key {key!r} (the KTO label; keys present: {_keys(row)})")
    if not isinstance(row[key], bool):
        raise ConfigError(f"{where}: field {key!r} (the KTO label) must be true or false, found {row[key]!r}")
    return [int(row[key])]

def _scalars(rows, source, weight_key, label_key):
    """{field: value} of each row's weight / label, as the tokenized example carries them."""
    out = []
    for i, row in enumerate(rows):
        where, x = _where(source, row, i), {}
        if weight_key:
            x["weight"] = _weight(row, weight_key, where)
        if label_key:
            x["desirable"] = _label(row, label_key, where)
        out.append(x)
    return out

def _extra_fields(weight_key, label_key):
    return (("weight",) if weight_key else ()) + (("desirable",) if label_key else ())

def _sft_rows(rows, tokenizer, max_len, source, weight_key="", label_key="", **keys):
    """[(example or None when dropped, prompt length, truncated)] per row: the SFT tokenizing step."""
    texts = [_sft_texts(tokenizer, row, _where(source, row, i), **keys) for i, row in enumerate(rows)]
    P, R = _encode(tokenizer, [p for p, _ in texts], [r for _, r in texts])
    res = []
    for i, (row, p, r, x) in enumerate(zip(rows, P, R, _scalars(rows, source, weight_key, label_key))):
        ex = _example(p, r, max_len)
        res.append((None if ex is None else {"id": row.get("_id", i), "input_ids": ex[0], "labels": ex[1], **x},
                    len(p), ex is not None and ex[2]))
    return res

def _dpo_rows(rows, tokenizer, max_len, source, weight_key="", **keys):
    """[(example or None when dropped, prompt length, truncated)] per row: the DPO tokenizing step."""
    texts = [_dpo_texts(tokenizer, row, _where(source, row, i), **keys) for i, row in enumerate(rows)]
    extra = _scalars(rows, source, weight_key, "")
    P, C = _encode(tokenizer, [t[0] for t in texts], [t[1] for t in texts])
    _, R = _encode(tokenizer, [], [t[2] for t in texts])
    res = []
    for i, (row, p, c, r, x) in enumerate(zip(rows, P, C, R, extra)):
        ec, er = _example(p, c, max_len), _example(p, r, max_len)
        keep = ec is not None and er is not None
        res.append(({"id": row.get("_id", i), "chosen_ids": ec[0], "chosen_labels": ec[1],
                     "rejected_ids": er[0], "rejected_labels": er[1], **x} if keep else None,
                    len(p), keep and (ec[2] or er[2])))
    return res

def _map_cache(src, sel, fn, features):
    """map's arguments that put a selection's tokenized cache under cache_root()/tokenized/<source>
    (not beside a save_to_disk folder's data, which may be read-only), named by a fingerprint of
    the selection (the source's content and the row indices, _keyed) and of the function (its
    tokenizer, keys and row ids, hashed as datasets hashes a map's function)."""
    from datasets.fingerprint import Hasher, generate_random_fingerprint
    try:
        fp = Hasher.hash([sel._fingerprint, fn, features])
    except Exception:  # not picklable: as datasets does, a fresh cache file
        fp = generate_random_fingerprint()
    folder = os.path.join(cache_root(), "tokenized", src._fingerprint)
    os.makedirs(folder, exist_ok=True)
    return dict(cache_file_name=os.path.join(folder, f"cache-{fp}.arrow"), new_fingerprint=fp)

def _map_part(part, per_row, fields, num_proc, verbose):
    """per_row over one part of a Rows. An Arrow part goes through datasets' map: batches of rows
    read straight from Arrow, the result written to a cache file under HF_DATASETS_CACHE keyed on
    the source's content (_map_cache: a later run with the same rows, tokenizer and keys reads it
    instead; ranks after rank 0 read rank 0's), num_proc worker processes (0: this one). The
    examples' token fields are views of the cache file (_arrow_examples)."""
    import datasets
    name, src, idx, ids = part
    if isinstance(src, list) or not len(idx):  # (no rows: a map would return a table without columns)
        return per_row(_take(name, src, idx, ids))

    def fn(batch, pos):
        rows = [_clean(dict(zip(batch, vals)), ids[p]) for vals, p in zip(zip(*batch.values()), pos)]
        out = {"id": [], "kept": [], "prompt_len": [], "truncated": [], **{f: [] for f in fields}}
        for row, (ex, n, t) in zip(rows, per_row(rows)):
            out["id"].append(row["_id"])
            out["kept"].append(ex is not None)
            out["prompt_len"].append(n)
            out["truncated"].append(bool(t))
            for f in fields:
                out[f].append(ex[f] if ex is not None else [])
        return out
    V = datasets.Value
    features = datasets.Features({"id": V("string" if ids and isinstance(ids[0], str) else "int64"), "kept": V("bool"),
                                  "prompt_len": V("int64"), "truncated": V("bool"),
                                  **{f: datasets.Sequence(V("float64" if f in FLOAT_FIELDS else "int64"))
                                     for f in fields}})
    was_off = datasets.are_progress_bars_disabled()
    if not verbose or len(idx) < 50_000:  # a bar only where tokenizing takes a while
        datasets.disable_progress_bars()
    try:
        sel = src.select(idx)
        cache = _map_cache(src, sel, fn, features) if src.cache_files else {}  # (in memory: no cache, as datasets does)
        mapped = sel.map(fn, batched=True, with_indices=True, num_proc=num_proc or None, features=features,
                         remove_columns=src.column_names, desc=f"tokenizing {name}", **cache)
        return _arrow_examples(mapped.with_format("arrow")[:], fields)
    except UnicodeDecodeError:
        raise _not_utf8(name) from None
    finally:
        if not was_off:
            datasets.enable_progress_bars()

def _arrow_examples(table, fields):
    """(example or None, prompt length, truncated) per row of the map's Arrow table. The token
    fields are numpy views of the table's buffers (the memory-mapped cache file): held examples
    cost pages of that file, not a python int per token (BENCHMARKS.md, "Large datasets")."""
    col = lambda k: table.column(k).to_pylist()
    ids, kept, plen, trunc = col("id"), col("kept"), col("prompt_len"), col("truncated")
    tokens = {}
    for f in fields:
        tokens[f] = []
        for chunk in table.column(f).chunks:  # list<int64>: offsets into one flat buffer of values
            off, vals = chunk.offsets.to_numpy(), chunk.values.to_numpy()
            tokens[f] += [vals[a:b] for a, b in zip(off[:-1].tolist(), off[1:].tolist())]
    return [({"id": i, **{f: tokens[f][r] for f in fields}} if k else None, n, t)
            for r, (i, k, n, t) in enumerate(zip(ids, kept, plen, trunc))]

def _tokenize(rows, per_row, fields, source, max_len, verbose, num_proc):
    # examples of rows: a list, or a Rows whose Arrow parts go through datasets' map
    if isinstance(rows, Rows):
        res = [r for part in rows.parts for r in _map_part(part, per_row, fields, num_proc, verbose)]
    else:
        res = per_row(rows)
    out = [ex for ex, _, _ in res if ex is not None]
    _report(source, len(res), len(out), sum(bool(t) for ex, _, t in res if ex is not None), max_len,
            [n for _, n, _ in res], verbose)
    return out

def tokenize_sft(rows, tokenizer, max_len, input_key="input", output_key="output", template="User: {}\nAssistant: ",
                 apply_chat_template=False, system_key="", source="", verbose=False, num_proc=0, weight_key="",
                 label_key=""):
    """SFT/KD examples {"id", "input_ids", "labels"}. A row is either input/output strings (the
    prompt is template with {} = input, or the chat template when apply_chat_template; the
    system_key field, when given, goes first: as a system message, or as a line before the
    template), or a chat row {"messages": [{role, content}, ...]} rendered with the chat template,
    whose loss is on the last message only (it must be the assistant's). The response gets eos
    (unless it already ends with it) and is cut at the end to fit max_len; rows whose prompt
    leaves no room for a response token are dropped (an error when that leaves nothing; no rows
    in, no examples out). source names the data in messages and in the verbose counts.
    rows: a list of dicts, or a Rows (load_splits(lazy=True)), tokenized with datasets' map
    (cached, num_proc processes). weight_key: the column of each row's weight (example "weight",
    [w]); label_key: the column of a KTO row's label (example "desirable", [0 or 1])."""
    keys = dict(input_key=input_key, output_key=output_key, template=template, apply_chat_template=apply_chat_template,
                system_key=system_key, weight_key=weight_key, label_key=label_key)
    per_row = functools.partial(_sft_rows, tokenizer=tokenizer, max_len=max_len, source=source, **keys)
    return _tokenize(
        rows, per_row, SFT_FIELDS + _extra_fields(weight_key, label_key), source, max_len, verbose, num_proc
    )

def tokenize_dpo(rows, tokenizer, max_len, prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                 template="User: {}\nAssistant: ", apply_chat_template=False, source="", verbose=False, num_proc=0,
                 weight_key=""):
    """DPO examples {"id", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}. A row is
    - prompt/chosen/rejected strings: the prompt is rendered as in tokenize_sft;
    - chosen and rejected message lists: the prompt is every message but the last (the two lists
      must agree on it), rendered with the chat template; the responses are the last messages;
    - hh-rlhf style: no prompt key, chosen and rejected are whole "\\n\\nHuman: ... \\n\\nAssistant: ..."
      dialogues; the prompt is their longest shared prefix cut after its last "Assistant:", used
      as is (no template). Truncation, dropping and rows (a list or a Rows) as in tokenize_sft, per pair."""
    keys = dict(prompt_key=prompt_key, chosen_key=chosen_key, rejected_key=rejected_key, template=template,
                apply_chat_template=apply_chat_template, weight_key=weight_key)
    per_row = functools.partial(_dpo_rows, tokenizer=tokenizer, max_len=max_len, source=source, **keys)
    return _tokenize(rows, per_row, DPO_FIELDS + _extra_fields(weight_key, ""), source, max_len, verbose, num_proc)

def _split_prompt(ids, labels):
    """(prompt ids, completion ids) of a tokenized example: the completion starts where the labels do."""
    start = next(t for t, y in enumerate(labels) if y != -100) + 1
    return list(ids[:start]), list(ids[start:])

def _mismatched(prompts):
    """for each row j of a KTO set, the row whose completion goes with row j's prompt in its
    mismatched row: the rows grouped by prompt (in order of first appearance) and shifted along
    that order by s = min(m, n - m), m the largest group's size, cycled. Every completion is used
    once, and each row gets another prompt's completion when m <= n / 2 (pairs: each pair's
    prompt takes the next pair's chosen and rejected answers); a prompt shared by more rows than
    all others together keeps 2m - n of its own, the fewest possible."""
    groups = {}
    for j, p in enumerate(prompts):
        groups.setdefault(np.asarray(p, dtype=np.int64).tobytes(), []).append(j)
    order = [j for g in groups.values() for j in g]
    n, m = len(order), max(map(len, groups.values()), default=0)
    shift = min(m, n - m) or 1
    other = [0] * n
    for t, j in enumerate(order):
        other[j] = order[(t + shift) % n]
    return other

def tokenize_kto(rows, tokenizer, max_len, prompt_key="prompt", completion_key="completion", label_key="label",
                 chosen_key="chosen", rejected_key="rejected", template="User: {}\nAssistant: ",
                 apply_chat_template=False, source="", verbose=False, num_proc=0, weight_key=""):
    """KTO examples, laid out as pairs: "chosen_*" the row (prompt + completion + eos, tokenized as
    tokenize_sft), "rejected_*" its mismatched row for the reference point z0 (its prompt with
    another prompt's completion, _mismatched), "desirable" [0 or 1]. Unpaired rows {prompt, completion,
    label}; a set whose first row has chosen / rejected and no completion is read as pairs, each
    pair giving a desirable row (id "<id>/chosen") and an undesirable one ("<id>/rejected")."""
    first = rows.first() if isinstance(rows, Rows) else (rows[0] if len(rows) else None)
    common = dict(template=template, apply_chat_template=apply_chat_template, source=source, verbose=verbose,
                  num_proc=num_proc, weight_key=weight_key)
    if first is not None and completion_key not in first and chosen_key in first and rejected_key in first:
        singles = []
        for e in tokenize_dpo(rows, tokenizer, max_len, prompt_key, chosen_key, rejected_key, **common):
            x = {"weight": e["weight"]} if weight_key else {}
            for side, good in (("chosen", 1), ("rejected", 0)):
                singles.append({"id": f"{e['id']}/{side}", "input_ids": e[f"{side}_ids"], "labels": e[f"{side}_labels"],
                                "desirable": [good], **x})
    else:
        singles = tokenize_sft(rows, tokenizer, max_len, prompt_key, completion_key, label_key=label_key, **common)
    parts = [_split_prompt(e["input_ids"], e["labels"]) for e in singles]
    other = _mismatched([p for p, _ in parts])
    out = []
    for j, e in enumerate(singles):
        kl = _example(parts[j][0], parts[other[j]][1], max_len)  # a prompt that kept its own answer fits
        out.append({"id": e["id"], "chosen_ids": e["input_ids"], "chosen_labels": e["labels"], "rejected_ids": kl[0],
                    "rejected_labels": kl[1], "desirable": e["desirable"],
                    **({"weight": e["weight"]} if weight_key else {})})
    return out

# -----------------------------------------------------------------------------
# collating

def _row(docs, ids_key="input_ids", labels_key="labels"):
    # one row of the batch: documents laid end to end, segment ids 1, 2, ..., positions per document
    lens = [len(d[ids_key]) for d in docs]
    cat = lambda k: np.concatenate([np.asarray(d[k], dtype=np.int64) for d in docs])
    return (cat(ids_key), cat(labels_key), np.repeat(np.arange(1, len(docs) + 1), lens),
            np.concatenate([np.arange(n) for n in lens]))

def _batch(rows, pad_id, ids):
    T = max(len(r[0]) for r in rows)
    def pad(k, value):
        out = np.full((len(rows), T), value, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, :len(r[k])] = r[k]
        return torch.from_numpy(out)
    return {"input_ids": pad(0, pad_id), "labels": pad(1, -100), "attention_mask": pad(2, 0),
            "position_ids": pad(3, 0), "ids": ids}  # tensors are (B, T), right-padded

def _weighted(examples):
    """the examples carry weights (weight_key) other than 1: a batch of weights 1 is collated as an
    unweighted one, so its loss is today's to the bit."""
    return "weight" in examples[0] and any(float(e["weight"][0]) != 1.0 for e in examples)

def collate_sft(examples, pad_id, packing=False, max_len=0):
    """A batch of SFT/KD examples. Unpacked: one example per row. packing=True: the examples (one
    micro-batch of the Loader, so batch_size counts documents, not rows) go first-fit, in order,
    into rows of at most max_len tokens (max_len=0: the longest example's length), each document
    a segment of its own. ids lists the example ids row by row, segment by segment."""
    if not packing:
        bins = [[e] for e in examples]
    else:
        cap, bins, sizes = max_len or max(len(e["input_ids"]) for e in examples), [], []
        for e in examples:
            n = len(e["input_ids"])
            if n > cap:
                raise ConfigError(f"example {e['id']} has {n} tokens, more than the packing length {cap}")
            j = next((j for j, s in enumerate(sizes) if s + n <= cap), len(bins))
            if j == len(bins):
                bins.append([])
                sizes.append(0)
            bins[j].append(e)
            sizes[j] += n
    batch = _batch([_row(b) for b in bins], pad_id, [e["id"] for b in bins for e in b])
    if _weighted(examples):  # per token: each document's tokens carry its row's weight (0 on padding)
        w = np.zeros(batch["input_ids"].shape)
        for r, b in enumerate(bins):
            w[r, : sum(len(d["input_ids"]) for d in b)] = np.concatenate(
                [np.full(len(d["input_ids"]), d["weight"][0]) for d in b]
            )
        batch["weights"] = torch.from_numpy(w)
    return batch

def collate_dpo(examples, pad_id):
    """A batch of B pairs as 2B rows, the B chosen first then the B rejected, padded to one length.
    ids has the B pair ids; "weights" [B] the pairs' weights when the examples have them."""
    rows = [_row([e], "chosen_ids", "chosen_labels") for e in examples]
    rows += [_row([e], "rejected_ids", "rejected_labels") for e in examples]
    batch = _batch(rows, pad_id, [e["id"] for e in examples])
    if _weighted(examples):
        batch["weights"] = torch.tensor([float(e["weight"][0]) for e in examples], dtype=torch.float64)
    return batch

def collate_kto(examples, pad_id):
    """A batch of B KTO rows: the rows themselves (as SFT rows), "kl" their B mismatched rows (a
    batch of its own: no gradient flows through them), "desirable" [B] bools, "weights" [B] when given."""
    batch = _batch([_row([e], "chosen_ids", "chosen_labels") for e in examples], pad_id, [e["id"] for e in examples])
    batch["kl"] = _batch(
        [_row([e], "rejected_ids", "rejected_labels") for e in examples], pad_id, [e["id"] for e in examples]
    )
    batch["desirable"] = torch.tensor([bool(e["desirable"][0]) for e in examples])
    if _weighted(examples):
        batch["weights"] = torch.tensor([float(e["weight"][0]) for e in examples], dtype=torch.float64)
    return batch

# -----------------------------------------------------------------------------
# streaming to ranks

def pad_cat(batches, pad_id, device):
    """concatenates micro-batches (of different objectives) into one, rows right-padded to one
    length, and moves it to the device. attention_mask is None when plain causal attention is
    exact (rows right-padded, nothing packed), decided here on the CPU copy: the model would
    otherwise decide on the device, a host sync per forward."""
    T = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "labels": -100, "attention_mask": 0, "position_ids": 0}
    x = {k: torch.cat([F.pad(b[k], (0, T - b[k].shape[1]), value=v) if b[k].shape[1] < T else b[k] for b in batches])
         for k, v in fill.items()}
    if not needs_mask(x["attention_mask"]):
        x["attention_mask"] = None
    return {k: v if v is None else v.to(device, non_blocking=True) for k, v in x.items()}

class Loader:
    """One infinite stream of example indices: epoch e is a permutation of range(N) drawn from a
    torch.Generator seeded with seed + e (identity when shuffle=False), epochs laid end to end.
    Each optimizer step takes the next G = batch_size * grad_accum * world_size indices, crossing
    into the next epoch when needed, so no sample is skipped and every batch is full. Rank r takes
    the contiguous block [r * batch_size * grad_accum, (r + 1) * batch_size * grad_accum) of them.
    The state is the number of indices consumed, so resuming continues with the exact next batch."""

    def __init__(self, examples, batch_size, grad_accum, rank, world_size, seed, collate_fn, shuffle=True):
        if not examples:
            raise ConfigError("Loader: no examples")
        self.examples, self.batch_size, self.grad_accum = examples, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.collate_fn, self.shuffle = collate_fn, shuffle
        self.pos = 0  # indices of the stream consumed, by all ranks together
        self._perms = {}  # epoch -> permutation, only the ones in use

    @property
    def epoch(self):
        return self.pos // len(self.examples)

    @property
    def steps_per_epoch(self):
        return -(-len(self.examples) // (self.batch_size * self.grad_accum * self.world_size))

    def _index(self, p):
        epoch, i = divmod(p, len(self.examples))
        if not self.shuffle:
            return i
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {e: q for e, q in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(len(self.examples), generator=g).tolist()
        return self._perms[epoch][i]

    def next_step(self):
        """This rank's grad_accum micro-batches (batch_size examples each) of the next optimizer step."""
        B, n = self.batch_size, self.batch_size * self.grad_accum
        idx = [self._index(self.pos + self.rank * n + k) for k in range(n)]
        self.pos += n * self.world_size
        return [self.collate_fn([self.examples[i] for i in idx[m * B:(m + 1) * B]]) for m in range(self.grad_accum)]

    def state_dict(self):
        return {"pos": self.pos, "seed": self.seed}

    def load_state_dict(self, d):
        self.pos, self.seed, self._perms = int(d["pos"]), int(d["seed"]), {}

def eval_batches(examples, batch_size, rank, world_size, collate_fn):
    """This rank's evaluation batches, in a fixed order. Rank r gets examples[r::world_size]; a
    rank one example short gets a filler (a copy of examples[0] with every label -100 and id None),
    so every rank runs the same number of batches of the same sizes (no rank waits in a collective)
    and no real example is counted twice. The filler adds nothing to SFT/KD token sums; a DPO loop
    counts only the pairs whose id is not None."""
    if not examples:
        return []
    per_rank = -(-len(examples) // world_size)
    shard = examples[rank::world_size]
    if len(shard) < per_rank:
        filler = {k: [-100] * len(v) if k.endswith("labels") else v for k, v in examples[0].items()}
        shard = shard + [{**filler, "id": None}]
    return [collate_fn(shard[i:i + batch_size]) for i in range(0, per_rank, batch_size)]
