"""evalgen.py against values worked out by hand and against transformers' own logits on the same
weights: ROUGE-L, exact match, win rate, token agreement, answer log-probs, sequence KL, the
implicit-reward and reward-model judges, and each objective's metrics end to end."""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import data as D
import evalgen as E
import objectives
from model import GPT, byte_tokenizer

def test_text_metrics_by_hand():
    # LCS of [the cat sat on the mat] and [the cat is on the mat] = the cat on the mat: P = R = 5/6
    assert E.rouge_l("The cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # [a b c] vs [a c d e]: LCS a c = 2, P = 2/3, R = 2/4, F = 2PR / (P + R) = 4/7
    assert E.rouge_l("a b c", "a, c d e!") == pytest.approx(4 / 7)
    assert E.rouge_l("x y", "z") == 0.0 and E.rouge_l("", "") == 1.0 and E.rouge_l("", "a") == 0.0
    assert E.exact_match(" PEACH RAT\n", "PEACH RAT") == 1.0 and E.exact_match("PEACH RAT!", "PEACH RAT") == 0.0
    m = E.sft_metrics(["PEACH RAT", "HAND", "x"], ["PEACH RAT", "HAND SOFT", "EAGLE INK"])
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["rouge_l"] == pytest.approx((1 + 2 * 1 * 0.5 / 1.5 + 0) / 3)  # HAND vs HAND SOFT: P 1, R 1/2
    assert E.win_rate([1, 2, 3], [0, 2, 4]) == pytest.approx((1 + 0.5 + 0) / 3)
    assert E.token_agreement([1, 2, 3], [1, 5, 3, 4]) == 0.5 and E.token_agreement([], []) == 1.0

def test_split_example_matches_data_py():
    tok = byte_tokenizer()
    ex = D.tokenize_sft([{"input": "owl", "output": "OWL"}], tok, 64)[0]
    p, r = E.split_example(ex["input_ids"], ex["labels"])
    assert tok.decode(p) == "User: owl\nAssistant: " and r == list(b"OWL") + [tok.eos_token_id]

BYTE_IDS = dict(vocab_size=258, bos_token_id=None, eos_token_id=256, pad_token_id=257)

def hf_pair(mktemp, config_class, **kw):
    """two random tiny byte-level models (policy, reference) of a family, as GPT and as transformers."""
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, **BYTE_IDS, **kw)
        hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double().eval()
        path = str(mktemp(f"m{seed}"))
        hf.save_pretrained(path)
        out.append((GPT.from_pretrained(path, dtype=torch.float64).eval(), hf))
    return out

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return hf_pair(tmp_path_factory.mktemp, transformers.LlamaConfig)

PROMPTS = [list(b"User: owl\nAssistant: "), list(b"User: red fox\nAssistant: ")]
ANSWERS = [list(b"OWL!") + [256], list(b"RED")]

def hf_logps(hf, p, a):
    """(T, V) log-probs of the positions that predict a, from transformers on prompt + answer."""
    with torch.no_grad():
        logits = hf(torch.tensor([p + a])).logits[0].double()
    return F.log_softmax(logits[len(p) - 1:len(p) + len(a) - 1], dim=-1)

def check_logps_and_kl(pair):
    """answer log-probs and sequence KL of a (policy, reference) pair against transformers' logits."""
    (pol, hf_pol), (ref, hf_ref) = pair
    got = E.answer_logps(pol, PROMPTS, ANSWERS, pad=257)
    want = [hf_logps(hf_pol, p, a).gather(-1, torch.tensor(a)[:, None]).sum().item() for p, a in zip(PROMPTS, ANSWERS)]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    kl = E.sequence_kl(pol, ref, PROMPTS, ANSWERS, pad=257)
    want = []
    for p, a in zip(PROMPTS, ANSWERS):
        s, t = hf_logps(hf_pol, p, a), hf_logps(hf_ref, p, a)
        want.append(sum((s[i].exp() * (s[i] - t[i])).sum().item() for i in range(len(a))))
    assert kl.tolist() == pytest.approx(want, rel=1e-6) and min(want) > 0
    assert E.sequence_kl(pol, pol, PROMPTS, ANSWERS, pad=257).abs().max().item() < 1e-12

def test_answer_logps_and_sequence_kl_against_transformers(pair):
    check_logps_and_kl(pair)

def test_answer_logps_and_sequence_kl_with_final_softcap(tmp_path_factory):
    """gemma 2's final logit soft-cap is applied by evalgen's heads: log-probs and sequence KL of two
    soft-capped models equal transformers' (whose logits are capped)."""
    capped = hf_pair(tmp_path_factory.mktemp, transformers.Gemma2Config, head_dim=8, sliding_window=16,
                     final_logit_softcapping=0.5)
    assert capped[0][0].config.final_softcap == 0.5
    check_logps_and_kl(capped)

def test_implicit_reward_judge(pair):
    (pol, hf_pol), (ref, hf_ref) = pair
    beta = 0.3
    got = E.judge(pol, ref, byte_tokenizer(), PROMPTS, ANSWERS, beta)
    for g, p, a in zip(got.tolist(), PROMPTS, ANSWERS):
        lp = lambda hf: hf_logps(hf, p, a).gather(-1, torch.tensor(a)[:, None]).sum().item()
        assert g == pytest.approx(beta * (lp(hf_pol) - lp(hf_ref)), rel=1e-6)

def hf_greedy_answer(hf, p, n):
    with torch.no_grad():
        y = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n, eos_token_id=256, pad_token_id=257)[
            0, len(p) :
        ].tolist()
    return y[:y.index(256)] if 256 in y else y

def test_sft_evaluate_end_to_end(pair):
    (pol, hf_pol), _ = pair
    tok = byte_tokenizer()
    greedy = tok.decode(hf_greedy_answer(hf_pol, PROMPTS[0], 12))
    rows = [{"input": "owl", "output": greedy}, {"input": "red fox", "output": "zzz qqq"}]
    m, gens = objectives.evaluate("sft", pol, None, tok, D.tokenize_sft(rows, tok, 80), max_new_tokens=12)
    assert gens[0]["output"] == greedy and gens[1]["reference"] == "zzz qqq"
    assert m["exact_match"] == 0.5
    assert m["rouge_l"] == pytest.approx((1.0 + E.rouge_l(gens[1]["output"], "zzz qqq")) / 2)

def test_dpo_and_kd_evaluate_end_to_end(pair):
    (pol, hf_pol), (ref, hf_ref) = pair
    tok, n, beta = byte_tokenizer(), 10, 0.5
    rows = [
        {"prompt": "owl", "chosen": "OWL!", "rejected": "OWL"},
        {"prompt": "red fox", "chosen": "RED!", "rejected": "RED"},
    ]
    ex = D.tokenize_dpo(rows, tok, 80)
    m, gens = objectives.evaluate("dpo", pol, ref, tok, ex, max_new_tokens=n, beta=beta)
    # by hand from transformers: greedy answers of both models, their implicit rewards, then the pairs
    lp = lambda hf, p, a: hf_logps(hf, p, a).gather(-1, torch.tensor(a)[:, None]).sum().item()
    r = lambda p, a: beta * (lp(hf_pol, p, a) - lp(hf_ref, p, a))
    close = lambda a: a + [256] if len(a) < n else a
    wins = []
    for p in PROMPTS:
        a, b = hf_greedy_answer(hf_pol, p, n), hf_greedy_answer(hf_ref, p, n)
        ra, rb = r(p, close(a)), r(p, close(b))
        wins.append(1.0 if ra > rb else 0.5 if ra == rb else 0.0)
    assert m["win_rate"] == pytest.approx(sum(wins) / 2) and m["judge"] == "implicit"
    acc = [float(r(p, list(c.encode()) + [256]) > r(p, list(j.encode()) + [256]))
           for p, c, j in zip(PROMPTS, ["OWL!", "RED!"], ["OWL", "RED"])]
    assert m["pref_accuracy"] == pytest.approx(sum(acc) / 2)
    assert gens[0]["ref_output"] == tok.decode(hf_greedy_answer(hf_ref, PROMPTS[0], n))
    # kd: the student against its teacher
    sft_ex = D.tokenize_sft([{"input": "owl", "output": "x"}, {"input": "red fox", "output": "y"}], tok, 80)
    m, _ = objectives.evaluate("kd", pol, ref, tok, sft_ex, max_new_tokens=n)
    s = [hf_greedy_answer(hf_pol, p, n) for p in PROMPTS]
    t = [hf_greedy_answer(hf_ref, p, n) for p in PROMPTS]
    assert m["teacher_exact"] == sum(a == b for a, b in zip(s, t)) / 2
    assert m["teacher_token_agreement"] == pytest.approx(sum(E.token_agreement(a, b) for a, b in zip(s, t)) / 2)
    kl = [sum((x.exp() * (x - y)).sum().item() for x, y in zip(hf_logps(hf_pol, p, a), hf_logps(hf_ref, p, a)))
          for p, a in zip(PROMPTS, s)]
    assert m["seq_kl"] == pytest.approx(sum(kl) / 2, rel=1e-6)
    assert m["seq_kl_per_token"] == pytest.approx(sum(kl) / sum(map(len, s)), rel=1e-6)
    same, _ = objectives.evaluate("kd", pol, pol, tok, sft_ex, max_new_tokens=n)
    assert same["teacher_exact"] == 1.0 and same["teacher_token_agreement"] == 1.0 and abs(same["seq_kl"]) < 1e-12

def test_reward_model_with_its_own_tokenizer(pair, tmp_path):
    """the judge decodes prompt + answer and the reward model re-encodes the text with its own
    (here word-level) tokenizer: the scores are what the reward model gives that text by hand."""
    (pol, _), (ref, _) = pair
    import tokenizers
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[UNK]", "[PAD]", "User", ":", "owl", "Assistant", "OWL", "!", "red", "fox", "RED"]
    w = Tokenizer(models.WordLevel({x: i for i, x in enumerate(words)}, unk_token="[UNK]"))
    w.pre_tokenizer = pre_tokenizers.Split(pattern=tokenizers.Regex(r"\w+|[^\w\s]"), behavior="isolated")
    wt = transformers.PreTrainedTokenizerFast(tokenizer_object=w, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=1)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    wt.save_pretrained(tmp_path / "rm")
    rm = E.load_reward_model(str(tmp_path / "rm"), dtype=torch.float64)
    tok = byte_tokenizer()
    got = E.judge(pol, ref, tok, PROMPTS, ANSWERS, 0.1, rm)
    for g, p, a in zip(got.tolist(), PROMPTS, ANSWERS):
        text = tok.decode(p + a, skip_special_tokens=True)
        enc = wt(text, return_tensors="pt")
        assert enc["input_ids"][0].tolist() != tok(text)["input_ids"]  # a different tokenization
        with torch.no_grad():
            assert g == pytest.approx(rm[0](**enc).logits[0, 0].item(), abs=1e-12)
    cfg.num_labels = 2
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm2")
    wt.save_pretrained(tmp_path / "rm2")
    with pytest.raises(ValueError, match="has 2 outputs; a reward model gives one score"):
        E.load_reward_model(str(tmp_path / "rm2"))

def test_train_writes_eval_gen(tmp_path):
    """train.py with eval_gen_interval=0: eval_gen.json, the answers and the summary hold what
    evalgen gives the exported final/ model on the same held-out examples."""
    import json
    from helpers import metrics, run_train
    from model import load_tokenizer
    out = tmp_path / "run"
    run_train(out, "--max_iters=6", "--eval_gen_interval=0", "--eval_gen_samples=8", "--eval_gen_max_new_tokens=12")
    hist = json.loads((out / "eval_gen.json").read_text())
    assert [h["iter"] for h in hist] == [6] and set(hist[0]["objectives"]) == {"1", "2"}
    summary = json.loads((out / "summary.json").read_text())
    final = GPT.from_pretrained(str(out / "final")).eval()
    tok = load_tokenizer(str(out / "final"))
    rows = [json.loads(l) for l in open("data/toy_sft_eval.jsonl")]
    m, gens = objectives.evaluate("sft", final, None, tok, D.tokenize_sft(rows, tok, 40)[:8], max_new_tokens=12)
    assert hist[0]["objectives"]["1"] == m
    assert summary["gen_exact_match_1"] == m["exact_match"] and summary["gen_rouge_l_1"] == m["rouge_l"]
    written = [json.loads(l) for l in (out / "eval_gen" / "iter_0000006_1.jsonl").read_text().splitlines()]
    assert written == gens
    d = hist[0]["objectives"]["2"]
    assert d["judge"] == "implicit" and 0 <= d["win_rate"] <= 1 and summary["gen_win_rate_2"] == d["win_rate"]
    assert metrics(out, "eval_gen")[-1]["gen_pref_accuracy_2"] == d["pref_accuracy"]

def test_demo_behaviour_shares_by_hand(tmp_path):
    import json
    import demo
    d = tmp_path / "run" / "eval_gen"
    d.mkdir(parents=True)
    rows = lambda *g: "".join(json.dumps({"prompt": f"User: {p}\nAssistant: ", "output": o}) + "\n" for p, o in g)
    (d / "iter_0000005_1.jsonl").write_text(rows(("red fox", "x")))  # an earlier evaluation: not read
    (d / "iter_0000010_1.jsonl").write_text(rows(("red fox", "RED FOX"), ("owl", "OWL!")))
    (d / "iter_0000010_2.jsonl").write_text(rows(("cat", "!"), ("a b", "A B!!")))
    # format (UPPERCASE words, '!'s or not): RED FOX, OWL!, A B!! = 3 of 4 ('!' alone is not); with '!': OWL!, A B!!;
    # exactly the prompt in UPPERCASE: RED FOX, OWL, A B
    assert demo.behaviour(str(tmp_path / "run")) == {"fmt": 0.75, "pref": 0.5, "exact": 0.75}
