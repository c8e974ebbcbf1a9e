"""generate.py against transformers: KV-cache greedy decoding of padded batches token for token
against the no-cache full forward and transformers' generate, for every family; sampling against
the model's own next-token distribution; the script end to end; bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import decoding
import generate as G
from decoding import generate
from model import GPT, byte_tokenizer
from test_model import FAMILIES, MOE, V, make_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = torch.tensor([list(b"red fox"), list(b"cat dog")])  # (2, 7) byte ids

def padded_batch(lengths, seed=0):
    """left-padded random prompts of the given lengths: ids (B, T), mask (B, T), the rows."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, V, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask, rows

@pytest.mark.parametrize("name", list(FAMILIES) + ["gemma2_final_softcap"])
def test_cache_greedy_equals_full_forward_and_transformers(name, tmp_path):
    hf = make_hf(name, tmp_path)
    with torch.no_grad():  # peaked logits: no near-ties in the argmax
        for p in hf.parameters():
            p.mul_(3.0) if p.dim() == 2 else None
    hf.save_pretrained(tmp_path)
    # sdpa: transformers' eager attention in float64 turns left-padded rows into NaN; families
    # whose attention SDPA cannot compute (gemma2's score soft-cap: newer transformers refuse sdpa,
    # 5.17 runs it without the cap) are compared on eager attention, row by row, unpadded
    padded = not getattr(hf.config, "attn_logit_softcapping", None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="sdpa" if padded else "eager", dtype=torch.float64
    )
    hf.eval()
    ours = GPT.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    ids, mask, rows = padded_batch([9, 4, 1, 6])
    n = 12
    with torch.no_grad():  # the decoding head: the full forward's last logits (soft-capped where the model caps)
        torch.testing.assert_close(
            ours(ids[:1], head_fn=decoding.last_logits), ours(ids[:1])[:, -1], atol=1e-12, rtol=0
        )
    cached = generate(ours, ids, n, attention_mask=mask)
    full = generate(ours, ids, n, attention_mask=mask, use_cache=False)
    # the configs' default 2/50256 are real tokens here
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
    assert cached.shape == (4, 9 + n)
    assert torch.equal(cached, full)
    # the one-shape step a CUDA graph replays (frozen cache, all keys masked past the position), eager here
    assert torch.equal(generate(ours, ids, n, attention_mask=mask, cuda_graph=True), cached)
    if padded:
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=0)
        assert torch.equal(cached, ref)
    # every row as it would come out alone, without padding
    for i, r in enumerate(rows):
        alone = generate(ours, r[None], n)
        assert torch.equal(alone[0, len(r):], cached[i, 9:])
        if not padded:
            assert torch.equal(alone, hf.generate(r[None], do_sample=False, max_new_tokens=n, pad_token_id=0))
    # a right-padded batch is left-aligned first: the same tokens
    right = torch.zeros_like(ids)
    rmask = torch.zeros_like(mask)
    for i, r in enumerate(rows):
        right[i, :len(r)], rmask[i, :len(r)] = r, 1
    assert torch.equal(generate(ours, right, n, attention_mask=rmask), cached)

@pytest.mark.parametrize("name", list(MOE))
def test_moe_cache_and_frozen_step_equal_full_forward(name, tmp_path):
    """experts (routing per token): the cached and the one-shape (CUDA-graph) steps give the
    no-cache loop's tokens on a padded batch (transformers' experts refuse float64: logits are
    compared in test_model)."""
    make_hf(name, tmp_path)
    ours = GPT.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    ids, mask, _ = padded_batch([9, 4, 1, 6])
    full = generate(ours, ids, 10, attention_mask=mask, use_cache=False)
    assert torch.equal(generate(ours, ids, 10, attention_mask=mask), full)
    assert torch.equal(generate(ours, ids, 10, attention_mask=mask, cuda_graph=True), full)

def test_kv_cache_logits_match_full_forward(tmp_path):
    """the cache's prefill + one-token steps give the full forward's logits at every position."""
    from model import KVCache
    make_hf("qwen3", tmp_path)
    m = GPT.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    ids, mask, rows = padded_batch([7, 3], seed=4)
    x = torch.cat([ids, torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(5))], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    pos = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = m(x, attention_mask=full_mask, position_ids=pos)
        cache = KVCache(m.config, 2, x.shape[1], dtype=torch.float64)
        got = [m(x[:, :7], attention_mask=mask, position_ids=pos[:, :7], kv_cache=cache)]
        for t in range(7, x.shape[1]):
            got.append(m(x[:, t:t + 1], position_ids=pos[:, t:t + 1], kv_cache=cache))
    got = torch.cat(got, dim=1)
    real = full_mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-10
    assert torch.isfinite(got).all()  # padding queries see themselves: no NaN rows

@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"])
def test_fused_decoding_equals_unfused(name, tmp_path):
    """KVCache.fuse (q|k|v and gate|up concatenated once per cache) gives the separate projections'
    logits at prefill and at every step, padded rows included; families stored fused (phi3, gpt2)
    have nothing to fuse."""
    from model import KVCache
    make_hf(name, tmp_path)
    m = GPT.from_pretrained(str(tmp_path)).eval()  # float32: the dtype the speed-up is for
    ids, mask, _ = padded_batch([7, 3, 5], seed=2)
    steps = torch.randint(1, V, (3, 6), generator=torch.Generator().manual_seed(3))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    def run(fuse):
        cache = KVCache(m.config, 3, 13)
        if fuse:
            cache.fuse(m)
        with torch.no_grad():
            out = [m(ids, attention_mask=mask, position_ids=pos, kv_cache=cache)]
            for t in range(6):
                out.append(m(steps[:, t:t + 1], position_ids=pos[:, -1:] + t + 1, kv_cache=cache))
        return torch.cat(out, dim=1), cache
    want, _ = run(False)
    got, cache = run(True)
    separate = name not in ("phi3", "gpt2")
    assert all((f is not None and set(f) == {"qkv", "gate_up"}) == separate for f in cache.fused)
    if separate:
        w, b = cache.fused[0]["qkv"]
        a = m.blocks[0].attn
        assert torch.equal(w, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        assert (b is None) == (a.q_proj.bias is None)
    real = torch.cat([mask, torch.ones(3, 6, dtype=torch.long)], dim=1).bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-5

@pytest.mark.parametrize("threads", [1, 2])
def test_decoding_products_are_f_linear(threads):
    """model.linear, the decoding step's products: for 1-64 float32 rows (1-8 on one thread) on a
    CPU without autograd it runs w @ x.T (the weight as the left operand: faster there), which is
    the float64 product to rounding, in the input's shape, bias or not; with autograd, more rows or
    another dtype it is F.linear itself, bit for bit."""
    from model import few_rows
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 40, generator=g), torch.randn(96, generator=g)
    was, limit = torch.get_num_threads(), 64 if threads > 1 else 8
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            assert few_rows(torch.zeros(limit, 1, 40)) and not few_rows(torch.zeros(limit + 1, 1, 40))
        check_decoding_products(w, b, g, limit)
    finally:
        torch.set_num_threads(was)

def check_decoding_products(w, b, g, limit):
    from model import linear
    for rows in (1, 3, limit):
        x = torch.randn(rows, 1, 40, generator=g)
        for bias in (None, b):
            with torch.inference_mode():
                got = linear(x, w, bias)
            want = x.double() @ w.double().T + (0 if bias is None else bias.double())
            assert got.shape == (rows, 1, 96) and got.is_contiguous()
            assert (got - want).abs().max().item() <= 1e-4
            xt = x.view(rows, 40).t()  # the path taken: w @ x.T, bit for bit
            assert torch.equal(
                got.view(rows, 96), (torch.mm(w, xt) if bias is None else torch.addmm(b[:, None], w, xt)).t()
            )
    x = torch.randn(limit + 1, 40, generator=g)
    for ctx, xx, ww, bb in [(torch.inference_mode(), x, w, b), (torch.enable_grad(), x[:8], w, b),
                            (torch.inference_mode(), x[:8].double(), w.double(), b.double())]:
        with ctx:
            assert torch.equal(linear(xx, ww, bb), torch.nn.functional.linear(xx, ww, bb))

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """a random tiny llama over the byte vocabulary, saved with the byte tokenizer."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=257)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = str(tmp_path_factory.mktemp("tiny"))
    hf.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path, hf.double()

def hf_greedy(hf, ids, n, **kw):
    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, **kw)

def test_eos_stops_like_transformers(tiny):
    path, hf = tiny
    ours = GPT.from_pretrained(path, dtype=torch.float64).eval()
    new = generate(ours, PROMPTS[:1], 16)[0, 7:].tolist()
    j = min((i for i, t in enumerate(new) if i >= 6 and new.index(t) == i), default=0)  # mid-way, first there
    eos = new[j]
    one = generate(ours, PROMPTS[:1], 16, eos_token_id=eos)
    assert one[0, 7:].tolist() == new[:j + 1]  # stops right after emitting eos
    assert torch.equal(one, hf_greedy(hf, PROMPTS[:1], 16, eos_token_id=eos))
    both = generate(ours, PROMPTS, 16, eos_token_id=eos, pad_token_id=257)
    assert torch.equal(both, hf_greedy(hf, PROMPTS, 16, eos_token_id=eos, pad_token_id=257))

def test_top_k_1_is_greedy_and_seed_reproducible(tiny):
    ours = GPT.from_pretrained(tiny[0]).eval()
    greedy = generate(ours, PROMPTS, 12)
    assert torch.equal(
        generate(ours, PROMPTS, 12, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(3)), greedy
    )
    assert torch.equal(
        generate(ours, PROMPTS, 12, temperature=0.7, top_p=1e-6, generator=torch.Generator().manual_seed(3)), greedy
    )
    runs = []
    for global_seed in (1, 2):  # the generator alone decides
        torch.manual_seed(global_seed)
        runs.append(generate(ours, PROMPTS, 12, temperature=1.5, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(
        runs[0], generate(ours, PROMPTS, 12, temperature=1.5, generator=torch.Generator().manual_seed(8))
    )

@pytest.mark.parametrize("k,p", [(5, 1.0), (0, 0.6), (8, 0.7)])
def test_sampling_follows_the_truncated_distribution(tiny, k, p):
    ours = GPT.from_pretrained(tiny[0], dtype=torch.float64).eval()
    temp, n = 2.0, 4000
    with torch.no_grad():
        probs = torch.softmax(ours(PROMPTS[:1])[0, -1] / temp, dim=-1)  # (V,)
    # by hand: the k most likely, then the smallest prefix holding p of the renormalized mass
    order = probs.argsort(descending=True)[:k or None]
    q = probs[order] / probs[order].sum()
    keep = order[:int((q.cumsum(0) < p).sum()) + 1] if p < 1 else order
    want = torch.zeros_like(probs)
    want[keep] = probs[keep] / probs[keep].sum()
    first = generate(ours, PROMPTS[:1].repeat(n, 1), 1, temperature=temp, top_k=k, top_p=p,
                     generator=torch.Generator().manual_seed(0))[:, -1]
    assert set(first.tolist()) <= set(keep.tolist())
    freq = torch.bincount(first, minlength=probs.numel()).double() / n
    assert (freq - want).abs().max().item() < 0.04  # ~5 standard errors at n=4000

def test_stop_strings(tiny):
    path, hf = tiny
    tok = byte_tokenizer()
    ours = GPT.from_pretrained(path, dtype=torch.float64).eval()
    text = "User: red fox\nAssistant: "
    x = torch.tensor([list(text.encode())])
    new = hf_greedy(hf, x, 20)[0, x.shape[1]:].tolist()  # 10 bytes of noise, a newline, 'tlI' later
    assert decoding.generate_texts(ours, tok, [text], 20)[0] == tok.decode(new)
    j = new.index(ord("\n"))
    y = generate(ours, x, 20, stop_fn=decoding.stop_checker(tok, ["\n"]))
    assert y[0, x.shape[1]:].tolist() == new[:j + 1]  # stopped on the token that completed the stop string
    assert decoding.generate_texts(ours, tok, [text, "User: owl\nAssistant: "], 20, stops=["\n"])[0] == tok.decode(
        new[:j]
    )
    k = bytes(new).index(b"tl")
    assert k > j
    assert decoding.generate_texts(ours, tok, [text], 20, stops=["tl"])[0] == tok.decode(new[:k])
    assert generate(ours, x, 20, stop_fn=decoding.stop_checker(tok, ["tl"])).shape[1] == x.shape[1] + k + 2

def test_bad_input_is_a_clear_error(tiny):
    path, _ = tiny
    ours = GPT.from_pretrained(path).eval()
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="exceed the model's context of 128"):
        generate(ours, torch.ones(1, 129, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="prompt 1: 130 tokens, the model's context holds 1 to 128"):
        decoding.generate_texts(ours, tok, ["hi", "x" * 130], 4)
    # a prompt near the context: generation ends at the context length
    assert generate(ours, torch.ones(1, 125, dtype=torch.long), 10).shape == (1, 128)
    with pytest.raises(ValueError, match="prompt row 1: empty prompt in 'prompt'"):
        [decoding.format_prompt(tok, r, i) for i, r in enumerate([{"prompt": "a"}, {"prompt": " "}])]
    with pytest.raises(ValueError, match="has no tokens"):
        generate(ours, torch.ones(2, 3, dtype=torch.long), 4, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="not a non-empty string"):
        decoding.parse_stop(tok, '["\\n", ""]')
    assert decoding.parse_stop(tok, '["\\n", "User:"]') == ["\n", "User:"]
    # a word-level tokenizer with an unknown token: a stop string outside its vocabulary can never appear
    from tokenizers import Tokenizer, models, pre_tokenizers
    w = Tokenizer(models.WordLevel({"[UNK]": 0, "red": 1, "fox": 2}, unk_token="[UNK]"))
    w.pre_tokenizer = pre_tokenizers.Whitespace()
    wt = transformers.PreTrainedTokenizerFast(tokenizer_object=w, unk_token="[UNK]")
    assert decoding.parse_stop(wt, "fox") == ["fox"]
    with pytest.raises(ValueError, match="'zebra' contains text this tokenizer cannot encode"):
        decoding.parse_stop(wt, "zebra")

def hf_text(hf, text, n):
    tok = byte_tokenizer()
    x = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    y = hf_greedy(hf, x, n, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, x.shape[1]:].tolist()
    y = y[:y.index(tok.eos_token_id)] if tok.eos_token_id in y else y
    return tok.decode(y, skip_special_tokens=True)

def test_script_jsonl_to_jsonl(tiny, tmp_path):
    path, hf = tiny
    rows = [
        {"prompt": "red fox", "id": 3},
        {"input": "cat", "extra": [1]},
        {"instruction": "a much longer prompt here"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = G.main([f"--pretrain={path}", f"--prompts={tmp_path / 'in.jsonl'}", f"--out={tmp_path / 'out.jsonl'}",
                  "--max_new_tokens=6", "--temperature=0", "--apply_chat_template=false", "--generator_name=tiny",
                  "--dtype=float64", "--batch_size=2"])
    written = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == got and len(written) == 3
    for r, w in zip(rows, written):
        text = next(r[k] for k in ("prompt", "input", "instruction") if k in r)
        assert {k: w[k] for k in r} == r  # the input row's fields kept
        assert w["instruction"] == text and w["generator"] == "tiny"
        assert w["output"] == hf_text(hf, f"User: {text}\nAssistant: ", 6)

def test_script_from_a_run_dir(tiny, tmp_path):
    """--out_dir: final/, the run's template and, with --objective, its eval split; --adapter: an
    unmerged LoRA gives what the merged one gives."""
    from lora import inject, merge, save_adapter
    path, hf = tiny
    run = tmp_path / "run"
    m = GPT.from_pretrained(path, dtype=torch.float64)
    inject(m, 4, 8, 0.0, "all-linear")
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    save_adapter(m, str(run / "final" / "adapter"))
    merge(m).save_pretrained(str(run / "final"))
    byte_tokenizer().save_pretrained(str(run / "final"))
    (tmp_path / "eval.jsonl").write_text('{"q": "red fox", "a": "x"}\n{"q": "owl", "a": "y"}\n')
    (run / "config.json").write_text(json.dumps({"dataset_1": str(tmp_path / "eval.jsonl"),
                                                 "eval_split_1": str(tmp_path / "eval.jsonl"), "input_key": "q",
                                                 "obj_1": "sft", "input_template_1": "Q: {}\nA: ",
                                                 "apply_chat_template_1": False}))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(run / "final")).double()
    args = ["--max_new_tokens=5", "--temperature=0", "--dtype=float64"]
    got = G.main([f"--out_dir={run}", "--objective=1", *args])
    assert [r["q"] for r in got] == ["red fox", "owl"] and got[0]["generator"] == "run"
    assert set(got[0]) == {"q", "a", "instruction", "output", "generator"}  # the row's own fields, no loader ids
    assert [r["output"] for r in got] == [hf_text(merged, f"Q: {q}\nA: ", 5) for q in ("red fox", "owl")]
    unmerged = G.main([f"--pretrain={path}", f"--adapter={run / 'final' / 'adapter'}", "--prompt=owl",
                       "--input_template=Q: {}\nA: ", *args])
    assert unmerged[0]["output"] == got[1]["output"]

def test_cli_errors(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "generate.py", f"--out_dir={tmp_path}", "--prompt=hi"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "final does not exist: train first" in p.stderr
    assert "Traceback" not in p.stderr

def test_bench_generate_runs_the_same_tokens():
    """bench.py --mode=generate: the three generators agree on every token of the timed runs."""
    import bench
    cfg = {k: getattr(bench, k) for k in bench.config_keys}
    cfg.update(model_n_layer=2, model_n_embd=32, model_n_head=4, model_n_kv_head=2, model_intermediate_size=64,
               model_vocab_size=97, batch_size=3, prompt_len=5, seq_len=12, rounds=2, device="cpu")
    res = bench.bench_generate(cfg)
    assert (
        res["same_tokens_transformers"] == 1.0
        and res["same_tokens_no_cache"] == 1.0
        and res["same_tokens_unfused"] == 1.0
    )
    assert len(res["vs_transformers_rounds"]) == 2 and len(res["no_cache"]["runs_s"]) == 1
    assert res["vs_no_cache"] == pytest.approx(res["no_cache"]["seconds"] / res["generate.py"]["seconds"])
    # a llama: the floor runs
    assert len(res["kernels_only"]["runs_s"]) == 2 and res["kernels_only_vs_transformers"] > 0

@pytest.mark.parametrize("lora", [False, True])
def test_from_a_checkpoint_like_final(tiny, tmp_path, lora):
    """--out_dir=RUN --ckpt=latest rebuilds the run's model from its config and model.pt (LoRA:
    the pretrain base plus the adapter): the same answers as final/, which the last checkpoint wrote."""
    from helpers import run_train
    run = tmp_path / "run"
    extra = [f"--pretrain={tiny[0]}", "--lora_rank=4", "--learning_rate=3e-2"] if lora else []
    run_train(run, "--max_iters=4", "--obj_2=", *extra)
    args = ["--prompt=red fox", "--max_new_tokens=8", "--temperature=0", f"--out_dir={run}"]
    final = G.main(args)
    got = G.main(args + ["--ckpt=latest"])
    assert got[0]["output"] == final[0]["output"]
    base = (
        G.main([f"--pretrain={tiny[0]}", "--prompt=red fox", "--max_new_tokens=8", "--temperature=0"]) if lora else None
    )
    assert not lora or base[0]["output"] != final[0]["output"]  # the adapter changed what the model says
    with pytest.raises(ValueError, match="no checkpoint at"):
        G.main(args + [f"--ckpt={tmp_path}"])

def test_objective_prompts_are_the_runs_own_held_out_rows():
    """--objective=i reads the eval rows train.py held out (after max_samples, capped), none of the
    rows it trained on: a run's config.json names the data, the sample size and the cap."""
    import data as D
    cfg = {"dataset_1": "data/toy_sft.jsonl", "max_samples_1": 40, "eval_frac": 0.1, "eval_max_samples": 1000,
           "seed": 42, "train_split": "train", "eval_split": "", "dataset_probs": ""}
    rows = G.read_prompt_rows(objective=1, run_cfg=cfg)
    train, held = D.load_splits("data/toy_sft.jsonl", max_samples=40, seed=42, eval_frac=0.1, eval_max_samples=1000)
    assert len(rows) == len(held) == 4  # round(0.1 x 40)
    trained = {json.dumps(r, sort_keys=True) for r in ({k: v for k, v in t.items() if k != "_id"} for t in train)}
    assert not trained & {json.dumps(r, sort_keys=True) for r in rows}
