# the paper's SFT + DPO setting (Pythia-1b): SFT on alpaca-gpt4, DPO on rm-hh-rlhf, trained
# together. Compare methods with --method=sequential|mix|alright|maxright and --lambd.
# torchrun --nproc_per_node=8 train.py config/sft_dpo.py --method=alright --lambd=0.5
out_dir = "out/pythia1b-sft-dpo"
pretrain = "EleutherAI/pythia-1b"
lora_rank = 32
lora_alpha = 32
target_modules = "query_key_value"
method = "alright"
lambd = 0.5
obj_1 = "sft"
dataset_1 = "vicgalle/alpaca-gpt4"
input_key = "instruction"
output_key = "output"
input_template_1 = "User: {}\nAssistant: "
obj_2 = "dpo"
dataset_2 = "Dahoas/rm-hh-rlhf"
prompt_key = "prompt"            # '\n\nHuman: ...\n\nAssistant:' dialogues, used as they are
chosen_key = "chosen"
rejected_key = "rejected"
input_template_2 = "{}"
dpo_beta = 0.1
precompute_ref = True            # reference log-probs once; the policy's adapters off is the reference
learning_rate = 5e-5
lr_scheduler = "constant"
adam_betas = (0.9, 0.95)
weight_decay = 0.0
max_norm = 1.0
train_batch_size = 64
micro_train_batch_size = 8
max_len_1 = max_len_2 = 512
max_epochs = 1
dtype = "bfloat16"
eval_interval = 100
eval_iters = 8
