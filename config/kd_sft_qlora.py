# config/kd_sft.py (Llama-3-8B learns from Llama-3-8B-Instruct by distillation, objective 1, and
# from OpenOrca's responses by SFT, objective 2) with its frozen weights in 4 bits (QLoRA): the
# student's base under its LoRA adapters and the teacher, NF4 with double quantization (quant.py).
# It runs on 1, 2, 4 or 8 GPUs of 24 GB unchanged (the global batch stays 32):
# torchrun --nproc_per_node=2 train.py config/kd_sft_qlora.py --lambd=0.3
#
# Memory per GPU (Llama-3-8B: 32 blocks of 218.1M weights = 6.98B, embedding and head 525M each):
#   blocks in NF4: 4 bits a weight + an int8 scale per 64 + a float32 factor per 256 scales
#                  = 4.127 bits: 6.98B x 4.127 / 8                                  3.60 GB  (bf16: 13.96 GB)
#   embedding and output head stay bf16: 2 x 525M x 2 B                              2.10 GB
#   one 8B model                                                                      5.70 GB  (bf16: 16.06 GB)
#   student base + teacher                                                           11.40 GB  (bf16: 32.12 GB)
#   LoRA r16 on q_proj, v_proj: 6.8M weights, float32 weight + grad + Adam's 2 states  0.11 GB
#   activations (micro-batch 1 x 2048 tokens, gradient checkpointing): 32 saved hidden
#   states 0.54 GB, one block recomputed ~0.3 GB, the chunked head's [523, 128256] float32
#   logits for student and teacher 2 x 0.27 GB, one weight dequantized at a time <= 0.12 GB  ~1.5 GB
#   total                                                                            ~13 GB + the CUDA context
# so each GPU holds both models whole (zero_stage 0, DDP: the 4-bit weights are left out of its
# broadcast) on a 24 GB card, where kd_sft.py in bf16 needs 8 GPUs with zero_stage 3 (each holds
# 1/8 of both models, 4 GB) or 40 GB and more per GPU without sharding. zero_stage=3 shards the
# 4-bit weights too (11.4 GB / N per GPU). Host memory: each rank reads a model on its CPU in
# float32 (32 GB for 8B) and quantizes it onto its GPU weight by weight.
# final/ holds the adapters merged into the original bf16 Llama-3-8B (re-read from pretrain, not
# the 4-bit weights) and final/adapter the PEFT adapter, which loads on that same base.
out_dir = "out/llama3-8b-kd-sft-qlora"
pretrain = "meta-llama/Meta-Llama-3-8B"
ref_model = "meta-llama/Meta-Llama-3-8B-Instruct"  # the KD teacher (frozen, 4-bit)
quantize = "nf4"                 # the student's base and the teacher; quantize_1 = '' would keep the teacher bf16
lora_rank = 16
lora_alpha = 16
target_modules = "q_proj,v_proj"
method = "alright"
lambd = 0.5
train_batch_size = 32            # 1 per GPU x 16 accumulation x 2 GPUs (32 x 1 on one GPU)
micro_train_batch_size = 1
learning_rate = 1e-5
obj_1 = "kd"
dataset_1 = "Open-Orca/OpenOrca"
input_key = "question"
output_key = "response"
max_samples_1 = 6400
obj_2 = "sft"
dataset_2 = "Open-Orca/OpenOrca"
max_samples_2 = 6400             # input_key_2 / output_key_2 default to the keys above
max_len_1 = max_len_2 = 2048
max_epochs = 2
zero_stage = 0
dtype = "bfloat16"
gradient_checkpointing = True
eval_interval = 0
save_interval = 0
log_interval = 1
