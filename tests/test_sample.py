"""sample.py against transformers: greedy decoding token for token against LlamaForCausalLM.generate,
sampling checked against the model's own next-token distribution, and the script end to end."""
import os
import runpy
import subprocess
import sys

import pytest
import torch
import transformers

from model import GPT, byte_tokenizer
from sample import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = torch.tensor([list(b"red fox"), list(b"cat dog")])  # (2, 7) byte ids

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """a random tiny llama over the byte vocabulary, saved with the byte tokenizer; no eos in its
    generation config, so transformers runs to max_new_tokens unless told otherwise."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.3,  # peaked logits: no near-ties in the argmax
                                   bos_token_id=None, eos_token_id=None, pad_token_id=257)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = str(tmp_path_factory.mktemp("tiny"))
    hf.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path, hf.double()

def hf_greedy(hf, ids, n, **kw):
    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, **kw)

def test_greedy_matches_transformers(tiny):
    path, hf = tiny
    ours = GPT.from_pretrained(path, dtype=torch.float64).eval()
    got = generate(ours, PROMPTS, 16, temperature=0)
    assert got.shape == (2, 7 + 16) and got.dtype == torch.long
    assert torch.equal(got, hf_greedy(hf, PROMPTS, 16))

def test_eos_stops_like_transformers(tiny):
    path, hf = tiny
    ours = GPT.from_pretrained(path, dtype=torch.float64).eval()
    new = generate(ours, PROMPTS[:1], 16, temperature=0)[0, 7:].tolist()
    j = min((i for i, t in enumerate(new) if i >= 6 and new.index(t) == i), default=0)  # mid-way, first there
    eos = new[j]
    one = generate(ours, PROMPTS[:1], 16, temperature=0, eos_token_id=eos)
    assert one[0, 7:].tolist() == new[:j + 1]  # stops right after emitting eos
    assert torch.equal(one, hf_greedy(hf, PROMPTS[:1], 16, eos_token_id=eos))
    # a batch: finished rows are padded with eos (transformers pads with pad_token_id; set it to eos)
    both = generate(ours, PROMPTS, 16, temperature=0, eos_token_id=eos)
    assert torch.equal(both, hf_greedy(hf, PROMPTS, 16, eos_token_id=eos, pad_token_id=eos))

def test_top_k_1_is_greedy_and_seed_reproducible(tiny):
    ours = GPT.from_pretrained(tiny[0]).eval()
    greedy = generate(ours, PROMPTS, 12, temperature=0)
    assert torch.equal(generate(ours, PROMPTS, 12, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(3)), greedy)
    runs = []
    for global_seed in (1, 2):  # the generator alone decides: the global RNG state does not matter
        torch.manual_seed(global_seed)
        runs.append(generate(ours, PROMPTS, 12, temperature=1.5, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(runs[0], runs[1])
    other = generate(ours, PROMPTS, 12, temperature=1.5, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)

def test_top_k_samples_from_the_renormalized_top_k(tiny):
    ours = GPT.from_pretrained(tiny[0], dtype=torch.float64).eval()
    k, temp, n = 5, 2.0, 4000
    with torch.no_grad():
        logits = ours(PROMPTS[:1])[0, -1]  # (V,)
    top = torch.topk(logits, k)
    want = torch.zeros_like(logits)
    want[top.indices] = torch.softmax(top.values / temp, dim=-1)
    first = generate(ours, PROMPTS[:1].repeat(n, 1), 1, temperature=temp, top_k=k,
                     generator=torch.Generator().manual_seed(0))[:, -1]
    assert set(first.tolist()) <= set(top.indices.tolist())
    freq = torch.bincount(first, minlength=logits.numel()).double() / n
    assert (freq - want).abs().max().item() < 0.04  # ~5 standard errors at n=4000

def expected_greedy(path, text, n):
    tok = byte_tokenizer()
    ours = GPT.from_pretrained(path).eval()
    x = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    new = generate(ours, x, n, temperature=0, eos_token_id=tok.eos_token_id)[0, x.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return text + tok.decode(new, skip_special_tokens=True) + "\n---------------\n"

def test_script_end_to_end(tiny):
    path = tiny[0]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    p = subprocess.run([sys.executable, "sample.py", f"--model={path}", "--prompt=hi", "--max_new_tokens=5",
                        "--temperature=0"], cwd=ROOT, env=env, capture_output=True, timeout=120)
    out = p.stdout.decode("utf-8")  # bytes: no newline translation of generated '\r'
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")[-3000:]
    assert expected_greedy(path, "User: hi\nAssistant: ", 5) in out
    assert out.count("---------------") == 1  # greedy prints one completion

def run_script(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    runpy.run_path(os.path.join(ROOT, "sample.py"), run_name="__main__")

def test_chat_template_and_sampled_runs(tiny, monkeypatch, capsys):
    path = tiny[0]
    # the byte tokenizer's chat template renders a user turn exactly like the default template
    run_script(monkeypatch, f"--model={path}", "--prompt=red fox", "--max_new_tokens=6", "--temperature=0",
               "--apply_chat_template=True")
    assert expected_greedy(path, "User: red fox\nAssistant: ", 6) in capsys.readouterr().out
    outs = []
    for _ in range(2):
        run_script(monkeypatch, f"--model={path}", "--prompt=red fox", "--num_samples=3", "--max_new_tokens=6")
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].count("---------------") == 3  # the seed fixes the samples

def test_missing_final_dir_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"final does not exist: train first .* or pass --model="):
        run_script(monkeypatch, f"--out_dir={tmp_path}")
