# the original BiPOST bi-objective example: Llama-3-8B learns from Llama-3-8B-Instruct by
# distillation (objective 1) and from OpenOrca's responses by SFT (objective 2) in one run.
# torchrun --nproc_per_node=8 train.py config/kd_sft.py --lambd=0.3
out_dir = "out/llama3-8b-kd-sft"
pretrain = "meta-llama/Meta-Llama-3-8B"
ref_model = "meta-llama/Meta-Llama-3-8B-Instruct"  # the KD teacher (frozen, bf16, on every GPU)
lora_rank = 16
lora_alpha = 16
target_modules = "q_proj,v_proj"
method = "alright"
lambd = 0.5
train_batch_size = 32            # 1 per GPU x 4 accumulation x 8 GPUs
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
zero_stage = 3
dtype = "bfloat16"               # flash attention is used on CUDA when flash-attn is installed
gradient_checkpointing = True
eval_interval = 0                # the original's --eval_steps -1
save_interval = 0
log_interval = 1
