# SFT + SimPO in one run (Llama-3.2-1B-Instruct, LoRA): SFT on alpaca-gpt4, SimPO on UltraFeedback's
# binarized pairs (chat messages, rendered with the model's chat template). SimPO needs no reference
# model. Its beta is not DPO's 0.1: the SimPO recipes use beta 2-2.5 and gamma 0.5-1.6 (TRL's
# CPOTrainer with loss_type="simpo" defaults to gamma 0.5).
# torchrun --nproc_per_node=8 train.py config/sft_simpo.py --method=alright --lambd=0.3
out_dir = "out/llama1b-sft-simpo"
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
obj_2 = "simpo"
dataset_2 = "HuggingFaceH4/ultrafeedback_binarized"
train_split_2 = "train_prefs"
eval_split_2 = "test_prefs"
chosen_key = "chosen"            # message lists: every message but the last is the prompt
rejected_key = "rejected"
dpo_beta_2 = 2.5                 # SimPO's beta
simpo_gamma_2 = 1.4              # the target margin (gamma / beta = 0.55, the Llama-3 recipe)
learning_rate = 1e-5
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
