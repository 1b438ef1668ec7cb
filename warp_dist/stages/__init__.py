"""The stages before WARP: supervised fine-tuning on IMDB text (`sft`) and a sentiment reward model (`reward_model`).

    python launch/sft.py --config configs/stages/sft.yaml [dotted.key=value ...]
    python launch/reward_model.py --config configs/stages/reward_model.yaml [dotted.key=value ...]

Each writes one HF model folder (output_dir) with summary.json and config.yaml; a folder that already holds the
result of the same resolved config is left alone (one line, exit 0). See `config.py` and `output.py`.
"""
