# the toy trade-off with an online objective (CPU, about a minute): objective 1 = SFT (answer a word
# in UPPERCASE), objective 2 = GRPO on prompts "whisper <words>" with a verifiable reward that wants
# the words back in lowercase (rewards.lowercase + rewards.char_match). RL on the new prompts
# drags the plain prompts' answers along: trained after SFT, it undoes the SFT format.
#   python train.py config/demo_grpo.py --method=sequential
out_dir = "out/demo_grpo/alright"
obj_1 = "sft"
obj_2 = "grpo"
method = "alright"
lambd = 0.5
dataset_1 = "data/toy_sft.jsonl"
eval_split_1 = "data/toy_sft_eval.jsonl"
dataset_2 = "data/toy_whisper.jsonl"
eval_split_2 = "data/toy_whisper_eval.jsonl"
max_len_1 = 48
max_len_2 = 64
model_n_layer = 2
model_n_embd = 64
model_n_head = 4
model_n_kv_head = 2
model_intermediate_size = 176
train_batch_size = 16
micro_train_batch_size = 16
learning_rate = 1e-3
max_new_tokens_2 = 16
num_generations_2 = 4     # completions per prompt: a micro-batch of 16 rows = 4 prompts x 4
reward_fn_2 = "lowercase,char_match"  # the share of lowercase letters + of characters equal to the answer column's
max_iters = 300
eval_interval = 25
eval_iters = 4           # 64 held-out rows per objective
log_interval = 10
