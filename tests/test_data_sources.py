"""Data identity: the Arrow conversion and the tokenized cache of a source follow its content (a
file rewritten with its mtime set back, a save_to_disk folder whose arrow file was replaced), a
read-only data folder is never written to, and a blend's proportions and files are checked
before anything loads. Expected rows are read back with json; expected tokens come from the
python tokenizing path, which has no cache."""
import json
import os
import shutil
import stat
import sys

import pytest

from helpers import ROOT, as_lists, check_config, read_jsonl, refused, run_train, write_jsonl

sys.path.insert(0, ROOT)
import data  # noqa: E402
from model import byte_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("datasets_cache")  # datasets' caches under tmp_path

@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()

def rows_of(n, tag="a"):
    return [{"input": f"q{i}", "output": f"{tag}{i}"} for i in range(n)]

def tokens(rows, tok):
    return as_lists(data.tokenize_sft(rows, tok, 32, template="{}"))

def reference(path, tok):
    """the examples of every row of a file, read with json and tokenized on the python path (no cache)."""
    return tokens([{**r, "_id": i} for i, r in enumerate(read_jsonl(path))], tok)

def rewrite_keeping_mtime(path, rows, in_place=False):
    """rewrites a file and sets its atime and mtime back, as cp -p, rsync -a or tar x leave them;
    in_place keeps the inode too (the bytes are overwritten through the same open file)."""
    st = os.stat(path)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with open(path, "r+" if in_place else "w") as f:
        f.write(text)
        f.truncate()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns

# -----------------------------------------------------------------------------
# a file's caches follow its content

def test_file_cut_with_its_mtime_restored_reads_its_new_rows(tmp_path, tok):
    """100 rows converted and tokenized, then the file cut to 10 rows with its mtime set back: both
    the rows (Arrow conversion) and the examples (tokenized cache) are the 10 new ones."""
    path = write_jsonl(tmp_path / "d.jsonl", rows_of(100))
    assert len(data.load_rows(path)) == 100
    assert as_lists(data.tokenize_sft(data.load_splits(path, lazy=True)[0], tok, 32, template="{}")) == reference(
        path, tok
    )
    rewrite_keeping_mtime(path, rows_of(10, tag="b"))
    got = data.load_rows(path)
    assert got == [{**r, "_id": i} for i, r in enumerate(rows_of(10, tag="b"))]
    lazy = data.tokenize_sft(data.load_splits(path, lazy=True)[0], tok, 32, template="{}")
    assert as_lists(lazy) == reference(path, tok) and len(lazy) == 10

def test_same_size_rewrite_in_place_with_mtime_restored(tmp_path, tok):
    """the same size, the same inode and the same mtime, other bytes: the change of ctime (which no
    tool can set back) is enough for the file to be hashed again."""
    path = write_jsonl(tmp_path / "d.jsonl", rows_of(40, tag="a"))
    first = data.tokenize_sft(data.load_splits(path, max_samples=30, lazy=True)[0], tok, 32, template="{}")
    ino, size = os.stat(path).st_ino, os.stat(path).st_size
    rewrite_keeping_mtime(path, rows_of(40, tag="b"), in_place=True)
    assert (os.stat(path).st_ino, os.stat(path).st_size) == (ino, size)
    again = as_lists(data.tokenize_sft(data.load_splits(path, max_samples=30, lazy=True)[0], tok, 32, template="{}"))
    want = [e for e in reference(path, tok) if e["id"] in {e["id"] for e in again}]
    assert again == want and len(again) == 30 and again != as_lists(first)
    assert all(bytes(t for t in e["input_ids"] if t < 256).endswith(b"b" + str(e["id"]).encode()) for e in again)

def test_file_is_hashed_once_while_unchanged(tmp_path, monkeypatch):
    """the content digest is computed on the first read and reused while size, mtime, ctime and inode
    agree; a touch (new mtime) hashes it again, and the rows stay the file's."""
    path = write_jsonl(tmp_path / "d.jsonl", rows_of(50))
    hashed = []
    real = data._hash_file
    monkeypatch.setattr(data, "_hash_file", lambda p: hashed.append(p) or real(p))
    for _ in range(3):
        assert len(data.load_rows(path)) == 50
    assert hashed == [path]
    os.utime(path)
    assert len(data.load_rows(path)) == 50 and hashed == [path, path]

# -----------------------------------------------------------------------------
# save_to_disk folders

def save(rows, folder):
    import datasets
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return str(folder)

def arrow_file(folder):
    (name,) = [f for f in os.listdir(folder) if f.startswith("data-") and f.endswith(".arrow")]
    return os.path.join(folder, name)

def test_folder_whose_arrow_file_was_replaced_is_tokenized_again(tmp_path, tok):
    """a save_to_disk folder whose data file was replaced but whose state.json (its fingerprint) was
    kept, as a copy of the data file alone leaves it: the examples are the new rows'."""
    folder = save(rows_of(30, tag="a"), tmp_path / "ds")
    old = as_lists(data.tokenize_sft(data.load_splits(folder, lazy=True)[0], tok, 32, template="{}"))
    other = save(rows_of(30, tag="zz"), tmp_path / "other")
    shutil.copyfile(arrow_file(other), arrow_file(folder))
    new = as_lists(data.tokenize_sft(data.load_splits(folder, lazy=True)[0], tok, 32, template="{}"))
    assert new == tokens([{**r, "_id": i} for i, r in enumerate(rows_of(30, tag="zz"))], tok) and new != old

def listing(folder):
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
                  for d, _, fs in os.walk(folder) for f in fs)

@pytest.mark.parametrize("kind", ["disk", "jsonl"])
def test_data_folder_is_never_written(tmp_path, tok, kind):
    """converting and tokenizing (in 2 processes too) write only under HF_DATASETS_CACHE: the folder
    holding the data is left as it was (a read-only mount works), and the examples are right."""
    rows = rows_of(40)
    if kind == "disk":
        src = save(rows, tmp_path / "ds")
    else:
        (tmp_path / "ds").mkdir()
        src = write_jsonl(tmp_path / "ds" / "d.jsonl", rows)
    before = listing(tmp_path / "ds")
    for num_proc in (0, 2, 0):  # the second 0 reads the cache
        got = data.tokenize_sft(
            data.load_splits(src, max_samples=35, lazy=True)[0], tok, 32, template="{}", num_proc=num_proc
        )
        ids = {e["id"] for e in got}
        assert as_lists(got) == [
            e for e in tokens([{**r, "_id": i} for i, r in enumerate(rows)], tok) if e["id"] in ids
        ]
        assert len(got) == 35
    assert listing(tmp_path / "ds") == before

def read_only_mount(src, dst, code):
    """runs python code with src mounted read-only at dst (a private mount namespace: root only);
    None where this machine does not allow it."""
    import subprocess
    os.makedirs(dst)
    mount = f"mount --bind {src} {dst} && mount -o remount,bind,ro {dst}"
    if (
        not shutil.which("unshare")
        or subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True).returncode
    ):
        return None
    cmd = f"{mount} && ! touch {dst}/x 2>/dev/null && exec {sys.executable} -c \"$0\""  # (touch: it is read-only)
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", cmd, code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )

def test_read_only_save_to_disk_folder(tmp_path, tok):
    """a save_to_disk folder on a read-only filesystem (root: a read-only bind mount; others: the
    folder's write bits removed) is tokenized, into HF_DATASETS_CACHE, to the right examples."""
    import datasets
    folder = save(rows_of(20), tmp_path / "ds")
    want = tokens([{**r, "_id": i} for i, r in enumerate(rows_of(20))], tok)
    if os.geteuid() == 0:  # root writes through a read-only mode
        code = f"""
import json, sys; sys.path.insert(0, {ROOT!r})
import datasets, data, numpy
from model import byte_tokenizer
datasets.config.HF_DATASETS_CACHE = {datasets.config.HF_DATASETS_CACHE!r}
ex = data.tokenize_sft(data.load_splits({str(tmp_path / "ro")!r}, lazy=True)[0], byte_tokenizer(), 32, template="{{}}")
print(json.dumps([{{k: v.tolist() if isinstance(v, numpy.ndarray) else v for k, v in e.items()}} for e in ex]))
"""
        p = read_only_mount(folder, str(tmp_path / "ro"), code)
        if p is None:
            pytest.skip("running as root, and this machine allows no read-only mount (root writes through a "
                        "read-only mode); test_data_folder_is_never_written checks nothing is written")
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads(p.stdout.splitlines()[-1]) == want
        return
    modes = {}
    for d, _, fs in os.walk(folder):
        for p in [d] + [os.path.join(d, f) for f in fs]:
            modes[p] = os.stat(p).st_mode
    try:
        for p in sorted(modes, reverse=True):
            os.chmod(p, modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        got = data.tokenize_sft(data.load_splits(folder, lazy=True)[0], tok, 32, template="{}")
        assert as_lists(got) == want
    finally:
        for p, m in modes.items():
            os.chmod(p, m)

# -----------------------------------------------------------------------------
# folders of data files

def test_a_folder_of_two_formats_is_refused_naming_its_files(tmp_path):
    """datasets reads a folder in its most common format and leaves the other files out without a
    word (a.jsonl and b.csv: the 100 rows of a.jsonl, of 200): refused, naming the files and their
    formats, streamed or not. Files of one format are all read, in file order (a README beside them
    is no data); split names in file names still choose the split's files."""
    import datasets
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows_of(100, "a"))
    datasets.Dataset.from_list(rows_of(100, "b")).to_csv(str(folder / "b.csv"), index=False)
    with pytest.raises(data.ConfigError) as e:
        data.load_rows(str(folder))
    assert str(e.value) == (f"{folder}: its 'train' data files are of 2 formats (json: a.jsonl; csv: b.csv), and a "
                            f"folder is read in one format; convert them to one format, or move the others out")
    with pytest.raises(data.ConfigError, match=r"2 formats \(json: a.jsonl; csv: b.csv\)"):
        data.load_streaming(str(folder), max_samples=5)
    os.remove(folder / "b.csv")
    write_jsonl(folder / "b.jsonl", rows_of(100, "b"))
    (folder / "README.md").write_text("# the rows\n")
    rows = data.load_rows(str(folder))
    assert [r["output"] for r in rows] == [f"a{i}" for i in range(100)] + [f"b{i}" for i in range(100)]
    split = tmp_path / "split"
    split.mkdir()
    write_jsonl(split / "train.jsonl", rows_of(5, "t"))
    write_jsonl(split / "test.jsonl", rows_of(3, "e"))
    train, held = data.load_splits(str(split), eval_split="test")
    assert [r["output"] for r in train] == ["t0", "t1", "t2", "t3", "t4"]
    assert [r["output"] for r in held] == ["e0", "e1", "e2"]

def test_a_folder_whose_files_differ_in_columns_names_them(tmp_path):
    """files of one folder with other columns, or a column of another type (a weight 1 in one file
    and 1.5 in the other), fail in datasets with a DatasetGenerationError naming no file: the
    error names each file and its columns, or the column and each file's type."""
    for name, a, b, words in [
            ("cols", rows_of(3), [{"prompt": "q", "completion": "c"}] * 3,
             "their columns differ: a.jsonl has input, output; b.jsonl has completion, prompt"),
            ("types", [{**r, "w": 1} for r in rows_of(3)], [{**r, "w": 1.5} for r in rows_of(3)],
             "column 'w' has other types in other files: int64 in a.jsonl, float64 in b.jsonl")]:
        folder = tmp_path / name
        folder.mkdir()
        write_jsonl(folder / "a.jsonl", a)
        write_jsonl(folder / "b.jsonl", b)
        with pytest.raises(data.ConfigError) as e:
            data.load_rows(str(folder))
        assert str(e.value) == (f"{folder}: its 'train' files cannot be read as one dataset: {words}; give every "
                                f"file the same columns, of the same types")

# -----------------------------------------------------------------------------
# a blend's proportions and files, checked before anything loads

TWO = ["--obj_1=sft", "--dataset_1=data/toy_sft.jsonl,data/toy_calm.jsonl", "--max_iters=1", "--print_config=True"]

@pytest.fixture(scope="module")
def blend_config(tmp_path_factory):
    """train.py's checked config (--print_config) of a run whose dataset_1 is a blend of 2 files."""
    p = run_train(tmp_path_factory.mktemp("cfg") / "run", *TWO, base=[])
    return {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(p.stdout.splitlines()[-1]).items()}

@pytest.mark.parametrize("probs,words", [("nan,1", ["nan"]), ("1,inf", ["inf"]), ("-0.5,1", ["-0.5"]),
                                         ("0.5", ["gives 1", "2 sources"]), ("0.2,0.3,0.5", ["gives 3", "2 sources"]),
                                         ("a,b", ["'a,b'"]), ("0,0", ["sum"]), ("1e308,1e308", ["sum"])])
def test_bad_dataset_probs_are_named(blend_config, probs, words):
    """checks.check, which train.py runs before anything loads (in-process here: each is a
    refusal of train.py as test_bad_dataset_probs_stop_train_py shows for one)."""
    import checks
    import configurator
    import objectives
    with pytest.raises(configurator.ConfigError) as e:
        check_config({**blend_config, "dataset_probs": probs}, objectives.per_objective_keys())
    assert str(e.value).startswith("config key dataset_probs: ") and all(w in str(e.value) for w in words), str(e.value)

def test_bad_dataset_probs_stop_train_py(tmp_path):
    refused(run_train(tmp_path / "run", *TWO, "--dataset_probs=nan,1", check=False, base=[]), "dataset_probs", "nan")

def test_per_objective_dataset_probs_name_their_key(tmp_path):
    p = run_train(tmp_path / "run", *TWO, "--obj_2=sft", "--dataset_2=data/toy_sft.jsonl,data/toy_calm.jsonl",
                  "--dataset_probs_2=1,nan", check=False, base=[])
    refused(p, "dataset_probs_2", "nan")
    # set for one source alone: the objective is not the blend they were written for
    p = run_train(tmp_path / "run", *TWO, "--obj_2=sft", "--dataset_2=data/toy_sft.jsonl", "--dataset_probs_2=0.5,0.5",
                  check=False, base=[])
    refused(p, "dataset_probs_2", "gives 2", "1 source ")
    # the shared key is for the blends: an objective of one source leaves it aside, as before
    p = run_train(tmp_path / "run", *TWO, "--obj_2=sft", "--dataset_2=data/toy_sft.jsonl", "--dataset_probs=0.7,0.3",
                  check=False, base=[])
    assert p.returncode == 0 and json.loads(p.stdout.splitlines()[-1])["dataset_probs"] == "0.7,0.3", p.stderr[-2000:]

def test_bad_probs_through_the_api_are_one_error(tmp_path):
    a, b = write_jsonl(tmp_path / "a.jsonl", rows_of(5)), write_jsonl(tmp_path / "b.jsonl", rows_of(5))
    for probs in ("nan,1", "1,inf", "x,1"):
        with pytest.raises(data.ConfigError, match="probs"):
            data.load_rows(f"{a},{b}", probs=probs)

def test_same_file_twice_in_a_select_blend_is_named(tmp_path):
    """method=select keeps one weight per row id: a file listed twice in dataset_2 (under any spelling)
    would give two rows one id."""
    p = run_train(tmp_path / "run", "--method=select", "--obj_1=sft", "--obj_2=sft",
                  "--dataset_1=data/toy_trusted.jsonl", "--dataset_2=data/toy_noisy.jsonl,./data/toy_noisy.jsonl",
                  "--max_iters=1", "--print_config=True", check=False, base=[])
    refused(p, "dataset_2", "data/toy_noisy.jsonl", "twice")
