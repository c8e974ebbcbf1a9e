# bench.py preset: the GPU figures of BENCHMARKS.md. A Llama-3.2-1B-shaped fresh init (hidden 2048,
# 16 layers, 32 query / 8 key-value heads, MLP 8192, vocab 128256), bf16 autocast over float32
# weights, full fine-tuning, 4 x 1024 tokens (dpo: 4 pairs), every case beside the peers:
#   python bench.py config/bench_llama1b.py --compare=True
#   python bench.py config/bench_llama1b.py --cases=sft --seq_len=2048 --prompt_len=512    # MFU at 4 x 2048
#   python bench.py config/bench_llama1b.py --cases=sft,dpo,kd --lora_rank=16 --target_modules=q_proj,v_proj \
#       --compare=True
model_vocab_size = 128256
model_n_layer = 16
model_n_head = 32
model_n_kv_head = 8
model_n_embd = 2048
model_intermediate_size = 8192
dtype = "bfloat16"
batch_size = 4
seq_len = 1024
prompt_len = 256
warmup_iters = 3
iters = 10
memory = False            # one fresh process per case: slow at this size; set True for the dpo case
peak_flops = 989e12       # H100 / H200 SXM bf16 dense; MFU = the step's FLOPs (bench.py's count by part) / step time /
                          # this
