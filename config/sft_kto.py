# SFT + KTO in one run (Llama-3.2-1B-Instruct, LoRA): SFT on alpaca-gpt4, KTO on unpaired thumbs-up /
# thumbs-down completions (trl-lib/kto-mix-14k: prompt and completion as chat messages, label true or
# false). The reference is the base model: the policy with its adapters off. beta 0.1 and equal
# desirable / undesirable weights are KTO's defaults; with fewer desirable rows than undesirable
# ones, raise kto_desirable_weight_2 so that w_d n_d / (w_u n_u) lies in [1, 4/3].
# torchrun --nproc_per_node=8 train.py config/sft_kto.py --method=alright --lambd=0.3
out_dir = "out/llama1b-sft-kto"
pretrain = "meta-llama/Llama-3.2-1B-Instruct"
lora_rank = 16
lora_alpha = 32
target_modules = "all-linear"
method = "alright"
lambd = 0.3
obj_1 = "sft"
dataset_1 = "vicgalle/alpaca-gpt4"
input_key = "instruction"
output_key = "output"
apply_chat_template = True
obj_2 = "kto"
dataset_2 = "trl-lib/kto-mix-14k"
eval_split_2 = "test"
prompt_key_2 = "prompt"
completion_key_2 = "completion"
label_key_2 = "label"
dpo_beta_2 = 0.1                 # KTO's beta
kto_desirable_weight_2 = 1.0
kto_undesirable_weight_2 = 1.0
precompute_ref = True            # the reference log-probs of each row and of its mismatched row, once
learning_rate = 5e-6
lr_scheduler = "cosine"
warmup_ratio = 0.1
train_batch_size = 64
micro_train_batch_size = 4
max_len_1 = max_len_2 = 1024
max_epochs = 1
dtype = "bfloat16"
gradient_checkpointing = True
eval_interval = 100
eval_iters = 8
