"""
Sample from a trained model: a quick look at what a run learned.

    python sample.py --out_dir=out/demo/alright --prompt="red fox"
    python sample.py --model=HuggingFaceTB/SmolLM2-135M-Instruct --apply_chat_template=True --prompt="hi"

Loads out_dir/final (or --model: any Hugging Face checkpoint dir or hub id) and prints
num_samples completions of the prompt, formatted the way train.py formats training prompts.
Every default below is a config key: override it as --key=value (or in a config file).
"""
import os
import sys

import torch

# -----------------------------------------------------------------------------
out_dir = "out"           # the run to sample from: reads out_dir/final
model = ""                # HF checkpoint dir or hub id; overrides out_dir
prompt = "Hello"          # or FILE:path to read the prompt from a file
num_samples = 3
max_new_tokens = 64
temperature = 0.8         # 0 = greedy; < 1 sharper, > 1 more random
top_k = 50                # sample among the k most likely tokens only (0 = all)
seed = 1337
template = "User: {}\nAssistant: "  # train.py's input_template_1 default
apply_chat_template = False  # format with the tokenizer's chat template instead of template
device = ""               # '' = cuda when available, else cpu
dtype = ""                # '' = bfloat16 where the GPU supports it, else float32 | float16 | float64
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature=1.0, top_k=0, eos_token_id=None, generator=None):
    """Extends input_ids (B, T) by up to max_new_tokens tokens; returns (B, T + n), n <= max_new_tokens.
    temperature=0 is greedy; top_k > 0 samples among the k most likely tokens only; generator
    (on the model's device) makes sampling reproducible. A row that emits eos_token_id is done and
    is padded with eos from then on; generation stops once every row is done."""
    # no KV cache: each step recomputes the forward over the whole sequence, O(T^2) per token.
    # slow for long outputs, but short and plainly correct, which is what a sanity check needs.
    ids = input_ids
    ctx = model.config.n_positions  # learned positions (gpt2) cannot go past their table
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -ctx:] if ctx else ids)[:, -1, :].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done, eos_token_id)
            done = done | (nxt == eos_token_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if done.all():
            break
    return ids

if __name__ == "__main__":
    import configurator
    from model import GPT, load_tokenizer
    _cfg = {k: globals()[k] for k in config_keys}
    configurator.apply(sys.argv[1:], _cfg)
    globals().update(_cfg)

    path = model or os.path.join(out_dir, "final")
    if not model and not os.path.isdir(path):
        sys.exit(f"{path} does not exist: train first (python train.py ... --out_dir={out_dir}) "
                 f"or pass --model=<HF checkpoint dir or hub id>")
    if not device:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not dtype:
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    gpt = GPT.from_pretrained(path, dtype=getattr(torch, dtype), device=device).eval()
    tokenizer = load_tokenizer(path)

    if prompt.startswith("FILE:"):
        with open(prompt[5:], encoding="utf-8") as f:
            prompt = f.read()
    if apply_chat_template:
        if not tokenizer.chat_template:
            sys.exit(f"{path}: the tokenizer has no chat template; use --template instead")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    elif "{}" not in template:
        sys.exit(f"--template {template!r} has no '{{}}' for the prompt")
    else:
        text = template.replace("{}", prompt, 1)
    # the same ids training saw: a bos where the tokenizer adds one by default, once
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and tokenizer("")["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids = [bos] + ids
    x = torch.tensor([ids] * (1 if temperature == 0 else num_samples), device=device)  # greedy: one is enough

    generator = torch.Generator(device=device).manual_seed(seed)
    y = generate(gpt, x, max_new_tokens, temperature, top_k, eos, generator)
    for row in y[:, x.shape[1]:].tolist():
        if eos in row:
            row = row[:row.index(eos)]
        print(text + tokenizer.decode(row, skip_special_tokens=True))
        print("---------------")
