"""Rewards of an online objective (rewards.py) and its prompts (rollout.tokenize_prompts): the overlong
reward worked by hand and against TRL's, the columns a reward function gets when rows lack some,
a reward model shorter than prompt + completion, and every bad input stopped with one line naming
the key, the file or the row."""
import pytest
import torch

import rewards
import rollout as R
from errors import ConfigError
from helpers import check_config, refused, run_train, train_defaults
from model import byte_tokenizer

TEMPLATE = "User: {}\nAssistant: "

# -----------------------------------------------------------------------------
# the overlong reward

def test_overlong_by_hand_and_against_trl():
    """DAPO's soft punishment with L = max_new_tokens = 10, B = overlong_buffer = 4: lengths <= 6 get 0,
    then (6 - n) / 4: 7 -> -0.25, 8 -> -0.5, 9 -> -0.75, 10 -> -1; beyond L, -1. overlong_buffer 0 is
    L // 5 = 2: 8 -> 0, 9 -> -0.5, 10 -> -1. TRL's get_soft_overlong_punishment gives the same."""
    ids = [[1] * n for n in (0, 3, 6, 7, 8, 9, 10, 12)]
    texts = [""] * len(ids)
    got = rewards.overlong(texts, texts, completion_ids=ids, max_new_tokens=10, overlong_buffer=4)
    assert got == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    assert rewards.overlong(texts, texts, completion_ids=ids, max_new_tokens=10) == [0, 0, 0, 0, 0, -0.5, -1, -1]
    trl_rewards = pytest.importorskip("trl.rewards")
    assert got == trl_rewards.get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)(ids)

def test_overlong_beside_another_reward_with_weights():
    """reward_fn = "lowercase,overlong", reward_weights = "1,0.5": the sum of lowercase and half the
    punishment, each completion's length in tokens (its eos counted) given by the rollout."""
    r = rewards.Rewards("lowercase,overlong", "1,0.5", "", 2)
    comps = [list(b"ab") + [256], list(b"abcdefgh")]  # 3 and 8 tokens
    total, parts = r(["p", "p"], ["ab", "abcdefgh"], [{}, {}], completion_ids=comps, max_new_tokens=8,
                     overlong_buffer=4)
    assert parts["overlong"].tolist() == [0.0, -1.0] and parts["lowercase"].tolist() == [1.0, 1.0]
    assert total.tolist() == [1.0, 1.0 - 0.5]

def test_overlong_buffer_is_checked():
    import checks
    c, po = train_defaults(obj_1="grpo", obj_2="", dataset_1="data/toy_whisper.jsonl", reward_fn_1="lowercase,overlong",
                           max_len_1=48, max_new_tokens_1=8, num_generations_1=4, train_batch_size=8,
                           micro_train_batch_size=4)
    check_config(dict(c), po)
    with pytest.raises(ConfigError) as e:
        check_config(dict(c, overlong_buffer_1=9), po)
    assert "overlong_buffer_1" in str(e.value) and "max_new_tokens_1" in str(e.value)

# -----------------------------------------------------------------------------
# columns: every row gets every column

def test_rows_lacking_a_column_pass_none_and_a_shipped_reward_names_the_row():
    """half the rows lack `answer`: every prompt example still has the column (None where the row lacks
    it), so a batch whose first row lacks it passes it all the same, and exact_answer stops on the row
    without one, naming it (not a KeyError naming no row, nor 'None' scored as an answer)."""
    tok = byte_tokenizer()
    rows = [{"prompt": "q0", "answer": "1", "_id": 0}, {"prompt": "q1", "_id": 1},
            {"prompt": "q2", "answer": "3", "_id": 2}]
    ex = R.tokenize_prompts(rows, tok, 48, max_new_tokens=8)
    assert [e["columns"] for e in ex] == [{"answer": "1"}, {"answer": None}, {"answer": "3"}]
    r = rewards.Rewards("exact_answer", "", "", 1)
    cols = [dict(e["columns"], _id=e["id"]) for e in (ex[2], ex[0])]
    assert r(["", ""], ["3", "2"], cols)[0].tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError) as e:
        r(["", ""], ["3", "None"], [dict(ex[2]["columns"], _id=2), dict(ex[1]["columns"], _id=1)])
    assert "reward_fn_1 'exact_answer'" in str(e.value) and "row 1" in str(e.value), str(e.value)
    # a row with no answer but a solution (NuminaMath's column) is scored against it
    cols = [{"answer": "4", "solution": None}, {"answer": None, "solution": "\\boxed{5}"}]
    assert r(["", ""], ["4", "5"], cols)[0].tolist() == [1, 1]

def test_a_batch_of_rows_with_other_keys_passes_their_union():
    """columns that differ within a batch (a dataset read without a schema): each function gets every
    key of the batch, None where a row lacks it, whichever row comes first."""
    seen = {}
    def f(prompts, completions, **kw):
        seen.update(kw)
        return [0.0] * len(completions)
    r = rewards.Rewards("lowercase", "", "", 1)
    r.fns, r.names = [f], ["f"]
    r(["", ""], ["a", "b"], [{"_id": 0}, {"answer": "x", "_id": 1}])
    assert seen["answer"] == [None, "x"] and seen["_id"] == [0, 1]

# -----------------------------------------------------------------------------
# refusals

def test_reward_fn_naming_nothing_is_refused():
    """reward_fn_1=" , " names no function: with no reward model every reward would be 0 (no gradient
    ever); refused before anything loads, naming the key."""
    import checks
    c, po = train_defaults(obj_1="grpo", obj_2="", dataset_1="data/toy_whisper.jsonl", reward_fn_1=" , ",
                           max_len_1=48, max_new_tokens_1=8, num_generations_1=4, train_batch_size=8,
                           micro_train_batch_size=4)
    with pytest.raises(ConfigError) as e:
        check_config(dict(c), po)
    assert "reward_fn_1" in str(e.value) and "names none" in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:
        rewards.Rewards(" , ", "", "", 1)
    assert "reward_fn_1" in str(e.value)

@pytest.mark.parametrize("body,words", [
    ("def f(prompts, completions, **kw):\n    return {float(j): c for j, c in enumerate(completions)}\n",
     ["reward_fn_1", "returned a dict"]),  # its keys are numbers: it trained on them
    ("import sys\ndef f(prompts, completions, **kw):\n    sys.exit(3)\n", ["reward_fn_1", "sys.exit(3)"]),
    ("def f(prompts, completions, **kw):\n    return 'ab'\n", ["reward_fn_1", "returned a str"]),
])
def test_bad_reward_returns_are_named(tmp_path, body, words):
    (tmp_path / "f.py").write_text(body)
    r = rewards.Rewards(f"{tmp_path / 'f.py'}:f", "", "", 1)
    with pytest.raises(ConfigError) as e:
        r(["p", "p"], ["a", "b"], [{"_id": 7}, {"_id": 8}])
    for w in words:
        assert w in str(e.value), (w, str(e.value))

@pytest.mark.parametrize("body,words", [
    ("def f(prompts, completions, **kw)\n    return [0.0]\n", ["reward_fn_1", "f.py", "line 1", "SyntaxError"]),
    ("import numpy\nimport no_such_module_here\n", ["reward_fn_1", "f.py", "line 2", "ModuleNotFoundError"]),
    ("raise SystemExit(4)\n", ["reward_fn_1", "f.py", "line 1", "sys.exit(4)"]),
])
def test_a_reward_file_that_cannot_load_is_named(tmp_path, body, words):
    (tmp_path / "f.py").write_text(body)
    with pytest.raises(ConfigError) as e:
        rewards.load_function(f"{tmp_path / 'f.py'}:f", "reward_fn_1")
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)

def test_a_reward_function_calling_sys_exit_stops_the_run_in_one_line(tmp_path):
    """through train.py: exit status 2 and one line naming the key and the function (it was the
    function's own status 3, silently)."""
    (tmp_path / "f.py").write_text("import sys\ndef f(prompts, completions, **kw):\n    sys.exit(3)\n")
    p = run_train(tmp_path / "run", "--obj_1=grpo", "--dataset_1=data/toy_whisper.jsonl", "--obj_2=",
                  f"--reward_fn_1={tmp_path / 'f.py'}:f", "--max_len_1=48", "--max_new_tokens_1=4",
                  "--num_generations_1=2", "--train_batch_size=4", "--micro_train_batch_size=4", "--max_samples_1=8",
                  "--eval_max_samples_1=2", "--max_iters=1", check=False)
    refused(p, "reward_fn_1", "f.py:f", "sys.exit(3)")

@pytest.mark.parametrize("row,words", [
    ({"prompt": ""}, ["q.jsonl row 1", "'prompt'", "empty"]),
    ({"prompt": "  \n\t"}, ["q.jsonl row 1", "'prompt'", "blank"]),
    ({"question": "what"}, ["q.jsonl row 1", "missing key 'prompt'", "question"]),
])
def test_bad_prompts_are_named(row, words):
    """an empty or blank prompt, and a row without one: refused naming the file, the row and the
    prompt key (not the fallback input key)."""
    rows = [{"prompt": "fine", "_id": 0}, dict(row, _id=1)]
    with pytest.raises(ConfigError) as e:
        R.tokenize_prompts(rows, byte_tokenizer(), 48, max_new_tokens=8, source="q.jsonl")
    for w in words:
        assert w in str(e.value), (w, str(e.value))

# -----------------------------------------------------------------------------
# a reward model shorter than prompt + completion

def test_a_short_reward_model_scores_the_texts_last_tokens(tmp_path):
    """a GPT-2 reward model with 24 positions: a text of more tokens is cut to its last 24 (the
    completion, which it scores at the last token), so the score is transformers' on those; a short
    text is scored whole. (It was an IndexError inside the model's forward.)"""
    import transformers
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=258, n_positions=24, n_embd=16, n_layer=1, n_head=2, num_labels=1,
                                  pad_token_id=tok.pad_token_id)
    rm = transformers.GPT2ForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    r = rewards.Rewards("", "", str(tmp_path / "rm"), 1)
    prompts, comps = ["User: a long prompt here\nAssistant: ", "User: hi\n"], ["the long answer", "ok"]
    got, _ = r(prompts, comps, [{}, {}])
    with torch.no_grad():
        ids = [tok(p + c)["input_ids"] for p, c in zip(prompts, comps)]
        assert len(ids[0]) > 24 >= len(ids[1])
        want = [rm(input_ids=torch.tensor([x[-24:]])).logits[0, 0].item() for x in ids]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-6), (got, want)
