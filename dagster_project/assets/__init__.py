"""The asset graph, by part (docs/method.md explains each stage):

    data.py         vqa_source, judgement_tables, rationale_sft_set, perception_corpus, eval_set
    base_models.py  base_policy_checkpoint (the tiny policy pretrained to perceive), base_judge_checkpoint
    models.py       sft_checkpoint (policy 0), judge_checkpoint
    evaluation.py   sft_eval and its blank-image check; iteration_eval[k]
    iteration.py    start_policy[k], calibration_prompts[k], preference_set[k], policy_checkpoint[k]
    sharded.py      candidate_pool[k] and pairwise_scores[k]: graph assets whose steps run in shards
    partitions.py   iterations as dynamic partitions; the pool and tags of model steps
    trained.py      the table of trainings, and reuse of a model trained from the same inputs

Each asset function is short: it reads its settings, calls ``src_assets``, stores the result and describes it
in metadata. Its ``@reads`` declaration (``versions.py``) names the settings and method modules it uses.
"""
