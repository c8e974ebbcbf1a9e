# the shipped toy trade-off on CPU: a tiny byte-level llama trained from scratch.
# objective 1 = SFT (answer a word in UPPERCASE), objective 2 = DPO (prefer the word reversed
# over the uppercase answer): the two conflict, so training one forgets the other.
out_dir = "out/demo/alright"
obj_1 = "sft"
obj_2 = "dpo"
method = "alright"
lambd = 0.5
dataset_1 = "data/toy_sft.jsonl"
eval_split_1 = "data/toy_sft_eval.jsonl"
dataset_2 = "data/toy_pref.jsonl"
eval_split_2 = "data/toy_pref_eval.jsonl"
max_len_1 = max_len_2 = 48
model_n_layer = 2
model_n_embd = 64
model_n_head = 4
model_n_kv_head = 2
model_intermediate_size = 176
train_batch_size = 16
micro_train_batch_size = 16
learning_rate = 3e-3
dpo_beta = 0.1
max_iters = 300
eval_interval = 50
log_interval = 10
