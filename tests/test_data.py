"""
data.py: reading every source kind and row format, prompt masking with shifted labels, truncation,
blends and ids, error messages, packing, the Loader stream and eval sharding, and the toy data.
Expected token ids are written by hand for the byte tokenizer (byte b = id b, eos = 256, pad = 257).
"""
import importlib.util
import json
import os
import sys
from collections import Counter

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from helpers import as_lists, write_jsonl  # noqa: E402
from model import byte_tokenizer  # noqa: E402

EOS, PAD = 256, 257
PROMPT_HI = list(b"User: hi\nAssistant: ")  # 20 bytes

pytestmark = pytest.mark.usefixtures("datasets_cache")  # datasets' caches under tmp_path

@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()

def shifted(prompt, response):
    # the labels by definition: position t predicts token t+1 when t+1 is a response token
    return [-100] * (len(prompt) - 1) + response + [-100]

# -----------------------------------------------------------------------------
# sources and formats

ROWS = [{"input": "hi", "output": "HI"}, {"input": "yo", "output": "YO"}, {"input": "ok", "output": "OK"}]

def write_source(kind, tmp_path, rows):
    import datasets
    ds = datasets.Dataset.from_list(rows)
    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", rows)
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows, indent=1))
        return str(tmp_path / "d.json")
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "d.parquet"))
        return str(tmp_path / "d.parquet")
    if kind == "csv":
        ds.to_csv(str(tmp_path / "d.csv"), index=False)
        return str(tmp_path / "d.csv")
    if kind == "disk":
        ds.save_to_disk(str(tmp_path / "disk"))
        return str(tmp_path / "disk")
    if kind == "disk_dict":
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
        return str(tmp_path / "dd")

@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "disk", "disk_dict"])
def test_source_kinds_load_same_rows_with_ids(kind, tmp_path, tok):
    spec = write_source(kind, tmp_path, ROWS)
    rows = data.load_rows(spec)
    assert rows == [{**r, "_id": i} for i, r in enumerate(ROWS)]
    ex = data.tokenize_sft(rows, tok, max_len=64)
    assert [e["id"] for e in ex] == [0, 1, 2]
    assert ex[0]["input_ids"] == PROMPT_HI + list(b"HI") + [EOS]
    assert ex[0]["labels"] == [-100] * 19 + [72, 73, EOS, -100]

def test_split_of_a_dataset_dict_and_eval_split(tmp_path):
    spec = write_source("disk_dict", tmp_path, ROWS)
    train, ev = data.load_splits(spec, eval_split="test")
    assert len(train) == 3 and ev == [{**ROWS[0], "_id": 0}]
    with pytest.raises(ValueError, match=r"no split 'dev' \(splits: \['train', 'test'\]\)"):
        data.load_rows(spec, split="dev")
    f = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(ValueError, match="only the 'train' split"):
        data.load_splits(f, eval_split="test")

def test_sft_template_system_and_chat_template(tok):
    rows = [{"input": "hi", "output": "HI", "sys": "be loud", "_id": 7}]
    ex = data.tokenize_sft(rows, tok, 64, template="Q: {} A:", system_key="sys")[0]
    prompt = list(b"be loud\nQ: hi A:")
    assert ex["id"] == 7 and ex["input_ids"] == prompt + [72, 73, EOS]
    assert ex["labels"] == shifted(prompt, [72, 73, EOS])
    ex = data.tokenize_sft(rows, tok, 64, apply_chat_template=True, system_key="sys")[0]
    prompt = list(b"System: be loud\nUser: hi\nAssistant: ")
    assert ex["input_ids"] == prompt + [72, 73, EOS]
    assert ex["labels"] == shifted(prompt, [72, 73, EOS])

def test_sft_chat_messages_loss_on_last_assistant_only(tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "B"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "D"}]
    ex = data.tokenize_sft([{"messages": msgs}], tok, 64)[0]
    prompt = list(b"User: a\nAssistant: B\nUser: c\nAssistant: ")
    response = list(b"D\n") + [EOS]
    assert ex["input_ids"] == prompt + response
    assert ex["labels"] == shifted(prompt, response)
    assert [x for x in ex["labels"] if x != -100] == [68, 10, EOS]

def test_dpo_prompt_strings(tok):
    ex = data.tokenize_dpo([{"prompt": "hi", "chosen": "ih", "rejected": "HI"}], tok, 64)[0]
    assert ex["id"] == 0
    assert ex["chosen_ids"] == PROMPT_HI + [105, 104, EOS]
    assert ex["chosen_labels"] == [-100] * 19 + [105, 104, EOS, -100]
    assert ex["rejected_ids"] == PROMPT_HI + [72, 73, EOS]
    assert ex["rejected_labels"] == [-100] * 19 + [72, 73, EOS, -100]

def test_dpo_message_lists(tok):
    user = {"role": "user", "content": "hi"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "ih"}],
        "rejected": [user, {"role": "assistant", "content": "HI"}],
    }
    ex = data.tokenize_dpo([row], tok, 64)[0]
    assert ex["chosen_ids"] == PROMPT_HI + list(b"ih\n") + [EOS]
    assert ex["chosen_labels"] == shifted(PROMPT_HI, list(b"ih\n") + [EOS])
    assert ex["rejected_ids"] == PROMPT_HI + list(b"HI\n") + [EOS]
    bad = {"chosen": row["chosen"], "rejected": [{"role": "user", "content": "yo"}, row["rejected"][1]]}
    with pytest.raises(ValueError, match="row 0: 'chosen' and 'rejected' are whole conversations that share no first"):
        data.tokenize_dpo([bad], tok, 64)

def test_dpo_hh_dialogues(tok):
    head = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    row = {"chosen": head + " same x", "rejected": head + " same yy"}  # shared prefix runs past the last "Assistant:"
    ex = data.tokenize_dpo([row], tok, 128)[0]
    prompt = list(head.encode())
    assert ex["chosen_ids"] == prompt + list(b" same x") + [EOS]
    assert ex["chosen_labels"] == shifted(prompt, list(b" same x") + [EOS])
    assert ex["rejected_ids"] == prompt + list(b" same yy") + [EOS]
    assert ex["rejected_labels"] == shifted(prompt, list(b" same yy") + [EOS])

def test_bos_added_once_for_tokenizers_that_add_one():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    inner = byte_tokenizer().backend_tokenizer
    inner.add_special_tokens(["<s>"])  # id 258
    inner.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 258)])
    t = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<s>")
    t.chat_template = "<s>" + byte_tokenizer().chat_template  # this one renders the bos itself
    row = [{"input": "hi", "output": "HI"}]
    for apply in (False, True):
        ex = data.tokenize_sft(row, t, 64, apply_chat_template=apply)[0]
        assert ex["input_ids"] == [258] + PROMPT_HI + [72, 73, EOS]
        assert ex["labels"] == [-100] * 20 + [72, 73, EOS, -100]

# -----------------------------------------------------------------------------
# blends, sampling, eval holdout

def test_blend_ids_and_probs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"x": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"x": f"b{i}"} for i in range(4)])
    rows = data.load_rows(f"{a},{b}", probs="0.75,0.25", max_samples=8)
    # 8 rows: 6 drawn from a's 10 without repeats, 2 from b's 4
    assert Counter(r["_id"].rsplit(":", 1)[0] for r in rows) == {a: 6, b: 2}
    assert len({r["_id"] for r in rows if r["_id"].startswith(a)}) == 6
    for r in rows:  # every id points back to its original row
        name, i = r["_id"].rsplit(":", 1)
        assert r["x"] == ("a" if name == a else "b") + i
    # no max_samples: the blend is as long as both sources together (14), shared equally by default,
    # so b gives 7 rows out of its 4: one whole pass plus 3 rows drawn without repeats
    rows = data.load_rows(f"{a},{b}")
    ids = Counter(r["_id"] for r in rows)
    assert len(rows) == 14 and sum(v for k, v in ids.items() if k.startswith(b)) == 7
    assert sorted(v for k, v in ids.items() if k.startswith(b)) == [1, 2, 2, 2]
    # proportions rounded by largest remainder: 0.7 * 10 = 7, 0.3 * 10 = 3
    rows = data.load_rows(f"{a},{b}", probs="7,3", max_samples=10, seed=1)
    assert Counter(r["_id"].rsplit(":", 1)[0] for r in rows) == {a: 7, b: 3}

def test_single_source_max_samples_keeps_original_ids(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"x": str(i)} for i in range(10)])
    rows = data.load_rows(a, max_samples=4, seed=3)
    assert len(rows) == 4 and [r["_id"] for r in rows] == sorted(r["_id"] for r in rows)
    assert all(r["x"] == str(r["_id"]) for r in rows)
    assert rows == data.load_rows(a, max_samples=4, seed=3)  # deterministic
    assert len(data.load_rows(a, max_samples=99)) == 10

def test_eval_holdout_and_eval_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"x": str(i)} for i in range(20)])
    train, ev = data.load_splits(a, eval_frac=0.1)
    assert [r["_id"] for r in ev] == [5, 15]  # int((j + 0.5) * 20 / 2)
    assert [r["_id"] for r in train] == [i for i in range(20) if i not in (5, 15)]
    assert data.load_rows(a, eval_frac=0.1) == train
    # max_samples=5: eval_frac of the 5 rows used, so one row (the middle one), never trained on
    train, ev2 = data.load_splits(a, max_samples=5, eval_frac=0.1)
    assert [r["_id"] for r in ev2] == [10] and len(train) == 5 and 10 not in {r["_id"] for r in train}
    assert [r["_id"] for r in data.load_splits(a, eval_frac=0.001)[1]] == [10]  # at least one row
    e = write_jsonl(tmp_path / "e.jsonl", [{"x": "e0"}, {"x": "e1"}])
    train, ev = data.load_splits(a, eval_split=e, eval_frac=0.1)  # a file given: no holdout
    assert len(train) == 20 and ev == [{"x": "e0", "_id": 0}, {"x": "e1", "_id": 1}]

def test_eval_holdout_follows_max_samples_and_is_capped(tmp_path):
    """the held-out slice is eval_frac of the rows used (max_samples, or a source's share of a
    blend), not of the whole split, spread evenly over the source: int((j + 0.5) * n / k)."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"x": str(i)} for i in range(1000)])
    train, ev = data.load_splits(a, max_samples=100, eval_frac=0.1)
    assert [r["_id"] for r in ev] == [50 + 100 * j for j in range(10)]  # 10 = 0.1 * 100, not 100
    assert len(train) == 100 and not {r["_id"] for r in ev} & {r["_id"] for r in train}
    assert all(r["x"] == str(r["_id"]) for r in train + ev)
    assert data.load_rows(a, max_samples=100, eval_frac=0.1) == train
    train, ev = data.load_splits(a, eval_frac=0.1, eval_max_samples=4)  # 100 would be held out; capped
    assert [r["_id"] for r in ev] == [125, 375, 625, 875] and len(train) == 996
    # a blend: each source holds out eval_frac of its share (50 rows each: 5), the cap shared alike
    b = write_jsonl(tmp_path / "b.jsonl", [{"x": str(i)} for i in range(200)])
    train, ev = data.load_splits(f"{a},{b}", max_samples=100, eval_frac=0.1)
    assert Counter(r["_id"].rsplit(":", 1)[0] for r in ev) == {a: 5, b: 5}
    assert [r["_id"] for r in ev][5:] == [f"{b}:{20 + 40 * j}" for j in range(5)]
    assert len(train) == 100 and not {r["_id"] for r in ev} & {r["_id"] for r in train}
    train, ev = data.load_splits(f"{a},{b}", max_samples=100, eval_frac=0.1, eval_max_samples=4)
    assert [r["_id"] for r in ev] == [f"{a}:250", f"{a}:750", f"{b}:50", f"{b}:150"]
    e = write_jsonl(tmp_path / "e.jsonl", [{"x": f"e{i}"} for i in range(10)])  # a given eval set: capped too
    assert [r["_id"] for r in data.load_splits(a, eval_split=e, eval_max_samples=2)[1]] == [2, 7]

@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_only_the_rows_used_become_python(kind, tmp_path, monkeypatch):
    """a split is read as Arrow and sampled on indices: the rows turned into python objects are
    the rows used (10 trained + 1 held out), not the 3000 of the split."""
    import datasets
    rows = [{"input": f"q{i}", "output": f"a{i}"} for i in range(3000)]
    spec = write_source(kind, tmp_path, rows)
    made = []
    to_list = datasets.Dataset.to_list
    monkeypatch.setattr(datasets.Dataset, "to_list", lambda self: made.append(len(self)) or to_list(self))
    monkeypatch.setattr(data, "_read_json", lambda *a: pytest.fail("a valid json file read row by row in python"))
    train, ev = data.load_splits(spec, max_samples=10, eval_frac=0.1)
    assert sorted(made) == [1, 10] and len(train) == 10 and [r["_id"] for r in ev] == [1500]
    assert all(r == {**rows[r["_id"]], "_id": r["_id"]} for r in train + ev)

# -----------------------------------------------------------------------------
# tokenizing with datasets' map

def map_rows(kind, i):
    """row i of a file of `kind`: every row format, a prompt too long for max_len=24 (dropped) every
    7th row, a response cut every 5th."""
    q, a = ("x" * 30 if i % 7 == 3 else f"q{i}"), ("y" * 30 if i % 5 == 1 else f"A{i}")
    if kind == "sft":
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} if i % 3 == 0 \
            else {"input": q, "output": a}
    if kind == "dpo":
        return {"prompt": q, "chosen": a, "rejected": a + "!"}
    return {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: no"}  # hh

def tokenize(kind, rows, tok, **kw):
    f = data.tokenize_sft if kind == "sft" else data.tokenize_dpo
    return f(rows, tok, 24, template="{}", source="s", verbose=True, **kw)

@pytest.mark.parametrize("kind,blend,num_proc", [("sft", False, 0), ("dpo", False, 0), ("hh", False, 0),
                                                  ("sft", True, 0), ("dpo", True, 2)])
def test_map_tokenizing_equals_python(kind, blend, num_proc, tmp_path, tok, capsys):
    """load_splits(lazy=True) gives Rows, tokenized with datasets' map (in num_proc processes):
    the same examples, ids (a blend's "source:row") and counts as the python path on the same rows."""
    a = write_jsonl(tmp_path / "a.jsonl", [map_rows(kind, i) for i in range(60)])
    spec = a + "," + write_jsonl(tmp_path / "b.jsonl", [map_rows(kind, i) for i in range(60, 100)]) if blend else a
    train, ev = data.load_splits(spec, max_samples=50, eval_frac=0.1, seed=3, lazy=True)
    # 10% of each source's share
    assert isinstance(train, data.Rows) and len(train) == 50 and len(ev) == (4 if blend else 5)
    for rows in (train, ev):
        got = tokenize(kind, rows, tok, num_proc=num_proc)
        said = capsys.readouterr().out
        want = tokenize(kind, list(rows), tok)
        assert said == capsys.readouterr().out and "examples from" in said
        assert as_lists(got) == want and got
        assert isinstance(got[0]["id"], str if blend else int)
        # no python int per token: views of the map's Arrow buffers (the memory-mapped cache file)
        assert all(isinstance(v, np.ndarray) and v.base is not None for e in got for k, v in e.items() if k != "id")
    assert len(tokenize(kind, train, tok)) < len(train)  # rows were dropped (and ids kept) on both paths

def test_map_tokenizing_an_empty_part(tmp_path, tok):
    """a blend part none of whose rows is drawn tokenizes to nothing, beside a part that has rows
    (datasets' map of no rows returns a table without the mapped columns)."""
    import datasets
    src = datasets.Dataset.from_json(write_jsonl(tmp_path / "e.jsonl", [map_rows("sft", i) for i in range(8)]))
    rows = data.Rows([("e", src, [], []), ("e", src, [0, 1, 2], ["e:0", "e:1", "e:2"]), ("e", src, [], [])])
    assert data.tokenize_sft(data.Rows(rows.parts[:1]), tok, 24, template="{}") == []
    got = data.tokenize_sft(rows, tok, 24, template="{}")
    assert as_lists(got) == data.tokenize_sft(list(rows), tok, 24, template="{}") and len(got) == 3

def test_map_tokenizing_reads_its_cache(tmp_path, tok, monkeypatch):
    """a second tokenization of the same rows, with the same tokenizer and keys, in this process or
    in another (rank 1 after rank 0), reads the first one's cache file: the tokenizer is not called."""
    import subprocess
    import datasets
    spec = write_jsonl(tmp_path / "d.jsonl", [map_rows("sft", i) for i in range(200)])
    calls = []
    tok_call = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(1) or tok_call(self, *a, **k))
    first = as_lists(tokenize("sft", data.load_splits(spec, max_samples=150, lazy=True)[0], tok))
    assert calls
    calls.clear()
    assert as_lists(tokenize("sft", data.load_splits(spec, max_samples=150, lazy=True)[0], tok)) == first and not calls
    # other rows
    assert as_lists(tokenize("sft", data.load_splits(spec, max_samples=151, lazy=True)[0], tok)) != first and calls
    code = f"""
import sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
import datasets, data, test_data
from model import byte_tokenizer
datasets.config.HF_DATASETS_CACHE = {datasets.config.HF_DATASETS_CACHE!r}
tok = byte_tokenizer()
calls, f = [], type(tok).__call__
type(tok).__call__ = lambda self, *a, **k: calls.append(1) or f(self, *a, **k)
ex = test_data.tokenize("sft", data.load_splits({spec!r}, max_samples=150, lazy=True)[0], tok)
print(len(calls), len(ex))
"""
    out = (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        .stdout.splitlines()[-1]
        .split()
    )
    assert out == ["0", str(len(first))]

@pytest.mark.parametrize("num_proc", [0, 2])
def test_map_tokenizing_errors_name_the_row(num_proc, tmp_path, tok):
    rows = [map_rows("dpo", i) for i in range(30)]
    del rows[17]["rejected"]
    spec = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=r"^s row 17: missing key 'rejected'"):
        tokenize("dpo", data.load_splits(spec, lazy=True)[0], tok, num_proc=num_proc)

# -----------------------------------------------------------------------------
# truncation and errors

def test_truncation_dropping_and_ids(tok, capsys):
    rows = [{"input": "aaaa", "output": "b"},           # 4 + 2 tokens: kept whole
            {"input": "a" * 8, "output": "b"},          # prompt fills max_len: dropped
            {"input": "aa", "output": "b" * 8},         # 2 + 9 tokens: cut to 8, eos lost
            {"input": "a" * 7, "output": "bb"}]         # 7 + 3 tokens: cut to 8, one response token left
    ex = data.tokenize_sft(rows, tok, 8, template="{}", source="toy", verbose=True)
    assert (
        "toy: 3 examples from 4 rows, 1 dropped (prompt too long for max_len=8), 2 truncated" in capsys.readouterr().out
    )
    assert [e["id"] for e in ex] == [0, 2, 3]
    assert ex[0]["labels"] == [-100, -100, -100, 98, EOS, -100]
    assert ex[1]["input_ids"] == [97, 97] + [98] * 6 and ex[1]["labels"] == [-100] + [98] * 6 + [-100]
    assert ex[2]["input_ids"] == [97] * 7 + [98] and ex[2]["labels"] == [-100] * 6 + [98, -100]
    pairs = [{"prompt": "a" * 8, "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b" * 9, "rejected": "c"}]
    ex = data.tokenize_dpo(pairs, tok, 8, template="{}", verbose=True)
    assert (
        "data: 1 examples from 2 rows, 1 dropped (prompt too long for max_len=8), 1 truncated"
        in capsys.readouterr().out
    )
    assert ex[0]["id"] == 1 and len(ex[0]["chosen_ids"]) == 8 and ex[0]["rejected_ids"] == [97, 99, EOS]

def test_error_messages(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "A"}\n{"input": "b", "output": "B"}\n{"input": "c", output: "C"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: malformed JSON"):
        data.load_rows(str(bad))
    rows = [{"input": "a", "output": "A"}, {"input": "b", "answer": "B"}]
    with pytest.raises(ValueError, match=r"sft row 1: missing key 'output' \(keys present: \['input', 'answer'\]\)"):
        data.tokenize_sft(rows, tok, 64, source="sft")
    with pytest.raises(ValueError, match=r"row 0: field 'output' must be a string, found int"):
        data.tokenize_sft([{"input": "a", "output": 5}], tok, 64)
    with pytest.raises(ValueError, match=r"row 0: missing key 'prompt' \(keys present: \['chosen', 'rejected'\]\)"):
        data.tokenize_dpo([{"chosen": "x", "rejected": "y"}], tok, 64)
    with pytest.raises(ValueError, match=r"row 0: missing key 'rejected'"):
        data.tokenize_dpo([{"prompt": "p", "chosen": "x"}], tok, 64)
    long = [{"input": "a" * 30, "output": "b"}, {"input": "a" * 40, "output": "b"}]
    with pytest.raises(ValueError, match=r"no examples left: all 2 rows .* max_len=16 \(shortest prompt: 48 tokens\)"):
        data.tokenize_sft(long, tok, 16)
    assert data.tokenize_sft([], tok, 16) == []  # e.g. no eval set
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the dataset is empty \(split 'train' has 0 rows\)"):
        data.load_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="nope.jsonl: no such file"):
        data.load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="last message of 'messages' must be the assistant's"):
        data.tokenize_sft([{"messages": [{"role": "user", "content": "a"}]}], tok, 64)

# -----------------------------------------------------------------------------
# collating

def examples(lengths, prompt=2):
    # example k: tokens 10k, 10k+1, ...; the first `prompt` tokens are the prompt
    out = []
    for k, n in enumerate(lengths):
        ids = [10 * k + t for t in range(n)]
        out.append({"id": f"s:{k}", "input_ids": ids, "labels": [-100] * (prompt - 1) + ids[prompt:] + [-100]})
    return out

def test_collate_unpacked():
    b = data.collate_sft(examples([3, 5]), PAD)
    assert b["input_ids"].tolist() == [[0, 1, 2, PAD, PAD], [10, 11, 12, 13, 14]]
    assert b["labels"].tolist() == [[-100, 2, -100, -100, -100], [-100, 12, 13, 14, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 4] and b["position_ids"][0, :3].tolist() == [0, 1, 2]
    assert b["ids"] == ["s:0", "s:1"]

def test_packing_matches_unpacked_per_document():
    ex = examples([5, 4, 3, 6])
    plain = data.collate_sft(ex, PAD)
    packed = data.collate_sft(ex, PAD, packing=True, max_len=9)
    # first fit in order: [5, 4] fill row 0, 3 and 6 go to row 1
    assert packed["input_ids"].shape == (2, 9) and packed["ids"] == ["s:0", "s:1", "s:2", "s:3"]
    assert packed["attention_mask"].tolist() == [[1] * 5 + [2] * 4, [1] * 3 + [2] * 6]
    where = {"s:0": (0, 0), "s:1": (0, 5), "s:2": (1, 0), "s:3": (1, 3)}  # (row, start)
    for k, e in enumerate(ex):
        row, start = where[e["id"]]
        n = len(e["input_ids"])
        for key in ("input_ids", "labels", "position_ids"):
            assert packed[key][row, start:start + n].tolist() == plain[key][k, :n].tolist()
        assert set(packed["attention_mask"][row, start:start + n].tolist()) == {1 if start == 0 else 2}
    # a document's labels never reach into the next one
    assert packed["labels"][0, 4].item() == -100
    # max_len=0 packs up to the longest example: 2 + 2 + 2 fill one row of 6, then the 6 alone
    assert data.collate_sft(examples([2, 2, 2, 6]), PAD, packing=True)["attention_mask"].tolist() == [
        [1, 1, 2, 2, 3, 3],
        [1] * 6,
    ]
    with pytest.raises(ValueError, match="more than the packing length 4"):
        data.collate_sft(ex, PAD, packing=True, max_len=4)

def test_collate_dpo():
    ex = [{"id": 0, "chosen_ids": [1, 2, 3], "chosen_labels": [-100, 3, -100],
           "rejected_ids": [1, 4], "rejected_labels": [4, -100]},
          {"id": 1, "chosen_ids": [5], "chosen_labels": [-100],
           "rejected_ids": [5, 6, 7, 8], "rejected_labels": [6, 7, 8, -100]}]
    b = data.collate_dpo(ex, PAD)
    assert b["input_ids"].tolist() == [[1, 2, 3, PAD], [5, PAD, PAD, PAD], [1, 4, PAD, PAD], [5, 6, 7, 8]]
    assert b["labels"].tolist() == [[-100, 3, -100, -100], [-100] * 4, [4, -100, -100, -100], [6, 7, 8, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert b["ids"] == [0, 1]

# -----------------------------------------------------------------------------
# loader

ids_of = lambda batch: batch  # collate that keeps the example ids themselves

def steps(loader, n):
    return [[x for mb in loader.next_step() for x in mb] for _ in range(n)]

def test_two_ranks_cover_an_epoch_once():
    ex = list(range(16))
    r0, r1 = (data.Loader(ex, 2, 2, r, 2, seed=0, collate_fn=ids_of) for r in (0, 1))
    assert r0.steps_per_epoch == 2
    s0, s1 = steps(r0, 2), steps(r1, 2)
    assert sorted(sum(s0, []) + sum(s1, [])) == ex
    assert r0.epoch == 1 and r0.state_dict() == {"pos": 16, "seed": 0}
    assert steps(r0, 2) != s0  # epoch 1 is a new permutation
    mbs = data.Loader(ex, 2, 2, 0, 2, seed=0, collate_fn=ids_of).next_step()
    assert len(mbs) == 2 and all(len(mb) == 2 for mb in mbs)

def test_uneven_epochs_skip_nothing():
    ex = list(range(10))  # G = 4 does not divide 10
    loaders = [data.Loader(ex, 1, 2, r, 2, seed=5, collate_fn=ids_of) for r in (0, 1)]
    seen = Counter()
    for _ in range(3 * 10 // 4 + 1):  # 32 indices: 3 full epochs and 2 of the 4th
        for ld in loaders:
            batch = sum(ld.next_step(), [])
            assert len(batch) == 2
            seen.update(batch)
    assert sum(seen.values()) == 32 and all(3 <= seen[i] <= 4 for i in ex)
    loaders = [data.Loader(ex, 1, 2, r, 2, seed=5, collate_fn=ids_of) for r in (0, 1)]
    seen = Counter(x for _ in range(5) for ld in loaders for x in sum(ld.next_step(), []))
    assert seen == {i: 2 for i in ex}  # 5 steps of 4 = exactly two epochs

def test_resume_continues_with_the_next_batch():
    ex = list(range(10))
    a = data.Loader(ex, 3, 1, 0, 1, seed=7, collate_fn=ids_of)
    steps(a, 4)
    state = json.loads(json.dumps(a.state_dict()))
    expected = steps(a, 3)
    b = data.Loader(ex, 3, 1, 0, 1, seed=123, collate_fn=ids_of)
    b.load_state_dict(state)
    assert steps(b, 3) == expected and b.epoch == a.epoch == 2  # 21 indices of 10

def test_batch_accum_world_splits_see_the_same_samples():
    ex = list(range(13))
    one = data.Loader(ex, 4, 1, 0, 1, seed=1, collate_fn=ids_of)
    two = [data.Loader(ex, 1, 2, r, 2, seed=1, collate_fn=ids_of) for r in (0, 1)]
    for _ in range(8):
        assert sorted(steps(one, 1)[0]) == sorted(steps(two[0], 1)[0] + steps(two[1], 1)[0])
    plain = data.Loader(ex, 4, 1, 0, 1, seed=1, collate_fn=ids_of, shuffle=False)
    assert steps(plain, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 0, 1, 2]]

def test_eval_batches_shard_without_repeats():
    ex = examples([3, 3, 3, 3, 3])
    shards = [data.eval_batches(ex, 2, r, 2, lambda b: b) for r in (0, 1)]
    assert [[len(b) for b in s] for s in shards] == [[2, 1], [2, 1]]
    assert [[e["id"] for b in s for e in b] for s in shards] == [["s:0", "s:2", "s:4"], ["s:1", "s:3", None]]
    filler = shards[1][1][0]
    assert filler["labels"] == [-100] * 3 and filler["input_ids"] == ex[0]["input_ids"]
    b = data.eval_batches(ex, 2, 1, 2, lambda b: data.collate_sft(b, PAD))[1]
    assert b["ids"] == [None] and (b["labels"] == -100).all()
    assert data.eval_batches([], 2, 0, 2, list) == []

# -----------------------------------------------------------------------------
# toy data

def load_make_toy():
    spec = importlib.util.spec_from_file_location("make_toy", os.path.join(ROOT, "data", "make_toy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

def test_make_toy_deterministic_and_files_current():
    files = load_make_toy().make()
    assert files == load_make_toy().make()
    for name, rows in files.items():
        path = os.path.join(ROOT, "data", name)
        assert os.path.getsize(path) < 200_000
        with open(path) as f:
            assert [json.loads(line) for line in f] == rows, f"{name} is stale: run python data/make_toy.py"

def test_toy_data_rules():
    files = load_make_toy().make()
    sft, pref, noisy = files["toy_sft.jsonl"], files["toy_pref.jsonl"], files["toy_noisy.jsonl"]
    labels = files["toy_noisy_labels.jsonl"]
    assert (
        len(sft) == len(pref) == 2000 and len(noisy) == len(labels) == 1000 and len(files["toy_trusted.jsonl"]) == 200
    )
    for r in sft + files["toy_sft_eval.jsonl"] + files["toy_trusted.jsonl"]:
        assert r["output"] == r["input"].upper() and len(f"User: {r['input']}\nAssistant: {r['output']}") <= 48
    for r in pref + files["toy_pref_eval.jsonl"]:
        assert r["chosen"] == r["prompt"].upper() + "!" and r["rejected"] == r["prompt"].upper()
    assert [x["id"] for x in labels] == list(range(1000))
    assert sum(x["corrupted"] for x in labels) == 300
    for r, x in zip(noisy, labels):
        assert (r["output"] != r["input"].upper()) == x["corrupted"]
        assert len(r["output"]) == len(r["input"])
    train_prompts = {r["input"] for r in sft + noisy + files["toy_trusted.jsonl"]} | {r["prompt"] for r in pref}
    eval_prompts = {r["input"] for r in files["toy_sft_eval.jsonl"]} | {
        r["prompt"] for r in files["toy_pref_eval.jsonl"]
    }
    assert len(eval_prompts) == 400 and not train_prompts & eval_prompts

def test_chatml_turn_end_gives_one_eos():
    """a chatml-style template closes each turn with eos and a newline: the answer's labels end at
    that eos, once (not eos, newline, eos); dpo pairs alike."""
    t = byte_tokenizer()
    t.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    user = {"role": "user", "content": "a"}
    ex = data.tokenize_sft([{"messages": [user, {"role": "assistant", "content": "B"}]}], t, 64)[0]
    prompt = list(b"<user>a") + [EOS] + list(b"\n<assistant>")
    assert ex["input_ids"] == prompt + [66, EOS]
    assert [x for x in ex["labels"] if x != -100] == [66, EOS]
    row = {
        "chosen": [user, {"role": "assistant", "content": "B"}],
        "rejected": [user, {"role": "assistant", "content": "C"}],
    }
    ex = data.tokenize_dpo([row], t, 64)[0]
    assert ex["chosen_ids"] == prompt + [66, EOS] and ex["rejected_ids"] == prompt + [67, EOS]

def test_streaming_reads_only_what_it_takes(tmp_path, monkeypatch):
    """streaming: the first round(eval_frac x max_samples) rows of the stream are held out, the
    training rows are max_samples others (seeded), ids are stream positions and match the file's
    rows; no Arrow copy of the file is made; train.py trains on it."""
    import datasets
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(3000):
            f.write(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n")
    monkeypatch.setattr(datasets.Dataset, "from_json", lambda *a, **k: pytest.fail("converted the file"))
    train, held = data.load_streaming(str(path), max_samples=40, seed=3, eval_frac=0.1)
    assert [r["_id"] for r in held] == [0, 1, 2, 3]
    assert len(train) == 40 and len({r["_id"] for r in train}) == 40 and min(r["_id"] for r in train) >= 4
    assert all(r["input"] == f"q{r['_id']}" and r["output"] == f"a{r['_id']}" for r in train + held)
    again, _ = data.load_streaming(str(path), max_samples=40, seed=3, eval_frac=0.1)
    other, _ = data.load_streaming(str(path), max_samples=40, seed=4, eval_frac=0.1)
    assert [r["_id"] for r in again] == [r["_id"] for r in train] != [r["_id"] for r in other]
    with pytest.raises(data.ConfigError, match="max_samples"):
        data.load_streaming(str(path))
    monkeypatch.undo()
    from helpers import metrics, run_train
    run_train(
        tmp_path / "run", "--streaming=True", "--max_iters=2", "--train_batch_size=4", "--micro_train_batch_size=2"
    )
    assert [l["iter"] for l in metrics(tmp_path / "run")] == [1, 2]

# -----------------------------------------------------------------------------
# prompts: never empty; preference rows as TRL's conversational formats; KTO's mismatched rows

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

def msg(role, text):
    return {"role": role, "content": text}

def turn(role, text):
    """one message as CHATML renders it, by hand: its bytes, eos (id 256), the newline after it."""
    return list(f"<|im_start|>{role}\n{text}".encode()) + [EOS, 10]

U, A = (lambda text: msg("user", text)), (lambda text: msg("assistant", text))
SFT, PAIR, KTO = {"input": "hi", "output": "HI"}, {"prompt": "hi", "chosen": "HI!", "rejected": "HI"}, \
    {"prompt": "hi", "completion": "HI", "label": True}

@pytest.mark.parametrize("kind, good, bad, words", [
    ("sft", SFT, {"input": "", "output": "x"}, "field 'input' (the prompt) is empty"),
    ("sft", SFT, {"input": " \n\t", "output": "x"}, "field 'input' (the prompt) is only whitespace"),
    ("sft", {"messages": [U("hi"), A("x")]}, {"messages": [U("  "), A("x")]},
     "the prompt (the messages of 'messages' before the answer) has no message with text"),
    ("dpo", PAIR, {"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
    ("orpo", PAIR, {"prompt": "\n\n", "chosen": "a", "rejected": "b"}, "field 'prompt' is only whitespace"),
    ("dpo", {"prompt": [U("hi")], "chosen": [A("a")], "rejected": [A("b")]},
     {"prompt": [U(" ")], "chosen": [A("a")], "rejected": [A("b")]}, "the prompt (field 'prompt') has no message"),
    ("kto", {"prompt": [U("hi")], "completion": [A("a")], "label": True},
     {"prompt": [U(""), U("\t")], "completion": [A("a")], "label": False},
     "the prompt (field 'prompt') has no message"),
    ("simpo", {"chosen": [U("hi"), A("a")], "rejected": [U("hi"), A("b")]},
     {"chosen": [U(" "), A("a")], "rejected": [U(" "), A("b")]},
     "the prompt (the messages 'chosen' and 'rejected' share) has no message with text"),
    ("kto", KTO, {"prompt": " ", "completion": "a", "label": True}, "field 'prompt' is only whitespace"),
    ("kto", PAIR, {"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty")])
def test_an_empty_prompt_is_refused_naming_file_row_and_field(tmp_path, kind, good, bad, words):
    """a row whose prompt has no text would train an answer to nothing: refused, naming the file,
    the row and the field, read as train.py reads it (Arrow, the kind's own tokenizing)."""
    import objectives
    t = byte_tokenizer()
    t.chat_template = CHATML
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad, good])
    common = dict(tokenizer=t, max_len=64, template="User: {}\nAssistant: ", apply_chat_template=False, verbose=False,
                  num_proc=0)
    with pytest.raises(data.ConfigError) as e:
        objectives.KINDS[kind].tokenize(data.load_splits(path, lazy=True)[0], path, objectives.make(kind).cfg, common)
    assert str(e.value).startswith(f"{path} row 1: ") and words in str(e.value), str(e.value)

@pytest.mark.parametrize("kind", ["dpo", "simpo", "orpo", "kto"])
def test_preference_rows_in_trl_conversational_formats(tmp_path, kind):
    """TRL's conversational preference rows: an explicit prompt (messages) with one answer message
    each, and the implicit prompt (two whole conversations; the prompt is the messages they share,
    so an answer may be several messages): each kind tokenizes them, read through Arrow as train.py
    reads them, to the tokens written here by hand from the template. KTO's pairs give a desirable
    and an undesirable row each, whose mismatched rows take the other pair's answers."""
    import objectives
    t = byte_tokenizer()
    t.chat_template = CHATML
    rows = [{"prompt": [msg("system", "be loud"), msg("user", "hi")], "chosen": [msg("assistant", "HI!")],
             "rejected": [msg("assistant", "hi")]},
            {"chosen": [msg("user", "yo"), msg("assistant", "YO"), msg("user", "again"), msg("assistant", "YO!")],
             "rejected": [msg("user", "yo"), msg("assistant", "yo"), msg("user", "again"), msg("assistant", "yo!")]}]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    common = dict(tokenizer=t, max_len=200, template="User: {}\nAssistant: ", apply_chat_template=False, verbose=False,
                  num_proc=0)
    ex = as_lists(objectives.KINDS[kind].tokenize(data.load_splits(path, lazy=True)[0], path, objectives.make(kind).cfg,
                                                  common))
    gen = list(b"<|im_start|>assistant\n")
    prompts = [turn("system", "be loud") + turn("user", "hi") + gen, turn("user", "yo") + gen]
    # the answers: what follows the prompt, up to the last eos (the newline after it is not the answer's)
    answers = [(list(b"HI!") + [EOS], list(b"hi") + [EOS]),
               (list(b"YO") + [EOS, 10] + turn("user", "again") + list(b"<|im_start|>assistant\nYO!") + [EOS],
                list(b"yo") + [EOS, 10] + turn("user", "again") + list(b"<|im_start|>assistant\nyo!") + [EOS])]
    if kind != "kto":
        assert [e["id"] for e in ex] == [0, 1]
        for e, p, (c, r) in zip(ex, prompts, answers):
            assert e["chosen_ids"] == p + c and e["chosen_labels"] == shifted(p, c)
            assert e["rejected_ids"] == p + r and e["rejected_labels"] == shifted(p, r)
        return
    assert [e["id"] for e in ex] == ["0/chosen", "0/rejected", "1/chosen", "1/rejected"]
    assert [e["desirable"] for e in ex] == [[1], [0], [1], [0]]
    for e, (i, side) in zip(ex, [(0, 0), (0, 1), (1, 0), (1, 1)]):
        p, a, other = prompts[i], answers[i][side], answers[1 - i][side]
        assert e["chosen_ids"] == p + a and e["chosen_labels"] == shifted(p, a)
        assert e["rejected_ids"] == p + other and e["rejected_labels"] == shifted(p, other)

def hf_logps(m, rows):
    """summed answer-token log-probs of transformers' model m, one row at a time: rows of (ids, labels)."""
    import torch
    out = []
    for ids, labels in rows:
        lp = torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        out.append(sum(lp[t, y].item() for t, y in enumerate(labels) if y != -100))
    return out

def test_kto_mismatched_rows_take_another_prompts_completion(tmp_path):
    """KTO's reference point z0 is the mean reward of the mismatched rows (a prompt with a
    completion that is not an answer to it). Pairs (each a desirable and an undesirable row of
    one prompt) and unpaired rows with a prompt's two rows side by side: every mismatched row,
    listed here by hand, is its prompt with another prompt's completion, each completion once;
    z0 of a step is their mean reward on transformers' logits (policy minus reference)."""
    import torch

    import objectives
    from helpers import tiny_hf
    from model import GPT
    from step import Step
    tok = byte_tokenizer()
    P = lambda p: list(f"User: {p}\nAssistant: ".encode())
    row = lambda p, a: (P(p) + list(a.encode()) + [EOS], shifted(P(p), list(a.encode()) + [EOS]))
    pairs = [{"prompt": p, "chosen": p.upper(), "rejected": p[::-1]} for p in ("sky", "red fox", "oak")]
    # pair i's prompt takes pair i+1's answers (cycled): chosen with chosen, rejected with rejected
    want = [row("sky", "RED FOX"), row("sky", "xof der"), row("red fox", "OAK"), row("red fox", "kao"),
            row("oak", "SKY"), row("oak", "yks")]
    unpaired = [{"prompt": p, "completion": c, "label": good} for p, c, good in
                [("sky", "SKY", True), ("sky", "sky", False), ("red fox", "RED FOX", True), ("red fox", "fox", False),
                 ("oak", "OAK", True)]]
    # grouped by prompt (sky 0-1, red fox 2-3, oak 4), shifted by the largest group's 2 rows
    want_unpaired = [row("sky", "RED FOX"), row("sky", "fox"), row("red fox", "OAK"), row("red fox", "SKY"),
                     row("oak", "sky")]
    hf = [tiny_hf(tmp_path / f"m{k}", k).double() for k in (0, 1)]
    ours = [GPT.from_pretrained(str(tmp_path / f"m{k}"), dtype=torch.float64).requires_grad_(False) for k in (0, 1)]
    # (policy, reference): the roles that make the mean reward positive (z0 clamps a negative one to 0)
    with torch.no_grad():
        for rows, kl, (pi, ref) in ((pairs, want, (0, 1)), (unpaired, want_unpaired, (1, 0))):
            ex = as_lists(data.tokenize_kto(rows, tok, 64))
            assert [(e["rejected_ids"], e["rejected_labels"]) for e in ex] == [(list(i), list(l)) for i, l in kl]
            r = [a - b for a, b in zip(hf_logps(hf[pi], kl), hf_logps(hf[ref], kl))]
            step = Step(ours[pi], ours[pi], pad_id=tok.pad_token_id)
            z0 = step.normalizers(objectives.make("kto", ref=ours[ref]), [data.collate_kto(ex, tok.pad_token_id)])["z0"]
            # (transformers' RMSNorm rounds through float32 in a float64 model: agreement to ~1e-8)
            assert sum(r) > 0 and abs(z0 - sum(r) / len(r)) < 1e-7, (z0, sum(r) / len(r))
